//! Agent tokens from the command line (`token create`, `token list`, `token
//! revoke`): each opens the database, applies pending migrations, acts, and
//! closes it again. The API's token checks live in [`crate::auth`].

use crate::auth;
use crate::config::Config;
use crate::store::Store;

/// Creates an agent token for `pop`, stores its SHA-256 and returns the
/// token (shown once; it cannot be recovered later).
pub async fn create_agent_token(config: &Config, pop: &str) -> anyhow::Result<String> {
    create_agent_token_with_id(config, pop)
        .await
        .map(|(token, _)| token)
}

/// Like [`create_agent_token`], also returning the token's id (for `token
/// list` and `token revoke`).
pub async fn create_agent_token_with_id(config: &Config, pop: &str) -> anyhow::Result<(String, String)> {
    anyhow::ensure!(
        auth::valid_pop(pop),
        "PoP name {pop:?} must be 1 to 32 lowercase letters, digits, '-' or '_'"
    );
    let store = Store::open(config).await?;
    crate::migrate_tolerant(&store, config).await?;
    let token = auth::new_token(pop);
    let id = uuid::Uuid::now_v7().to_string();
    let r = store.insert_token(&auth::hash_token(&token), &id, pop).await;
    store.close().await;
    r?;
    Ok((token, id))
}

/// `token list`: one line per token (id, PoP, creation time), never the token.
pub async fn list_agent_tokens(config: &Config, pop: Option<&str>) -> anyhow::Result<String> {
    let store = Store::open(config).await?;
    crate::migrate_tolerant(&store, config).await?;
    let r = store.list_tokens(pop).await;
    store.close().await;
    let mut out = format!("{:<38} {:<12} CREATED\n", "ID", "POP");
    for (id, pop, created) in r? {
        let at = chrono::DateTime::from_timestamp_millis(created).map_or_else(
            || created.to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        out.push_str(&format!("{id:<38} {pop:<12} {at}\n"));
    }
    Ok(out)
}

/// `token revoke --id`: deletes the token; replicas stop accepting it once
/// their cache entry expires (30 s).
pub async fn revoke_agent_token(config: &Config, id: &str) -> anyhow::Result<String> {
    let store = Store::open(config).await?;
    crate::migrate_tolerant(&store, config).await?;
    let r = store.revoke_token(id).await;
    store.close().await;
    match r? {
        Some(pop) => Ok(pop),
        None => anyhow::bail!("no agent token has id {id:?} (see `token list`)"),
    }
}
