-- Retention (version 3): the sweep deletes calls oldest first, by creation
-- time, in small batches; this index lets each batch find them without
-- reading the table. Expand only: releases before this one never read it.
-- IF NOT EXISTS, so an index built beforehand (on a big Postgres table:
-- CREATE INDEX CONCURRENTLY IF NOT EXISTS calls_created_at ON calls
-- (created_at), which takes no write lock) makes this a no-op.
CREATE INDEX IF NOT EXISTS calls_created_at ON calls (created_at);
