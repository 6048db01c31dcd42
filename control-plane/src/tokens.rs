//! Tokens from the command line (`token create --pop` for agents, `token
//! create --operator` for people reading the fleet page, `token list`,
//! `token revoke`): each opens the database, applies pending migrations,
//! acts, and closes it again. The API's token checks live in [`crate::auth`].

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

/// Creates a read-only operator token for the person or team `name` (the
/// fleet page and `/v1/fleet…`), stores its SHA-256 and returns the token
/// (shown once) and its id.
pub async fn create_operator_token(config: &Config, name: &str) -> anyhow::Result<(String, String)> {
    anyhow::ensure!(
        auth::valid_pop(name),
        "operator name {name:?} must be 1 to 32 lowercase letters, digits, '-' or '_'"
    );
    let store = Store::open(config).await?;
    crate::migrate_tolerant(&store, config).await?;
    let token = auth::new_operator_token(name);
    let id = uuid::Uuid::now_v7().to_string();
    let r = store
        .insert_operator_token(&auth::hash_token(&token), &id, name, auth::OPERATOR_SCOPE)
        .await;
    store.close().await;
    r?;
    Ok((token, id))
}

/// `token list`: one line per token (id, PoP or `operator:<name>`, creation
/// time), never the token. With `pop`, only that PoP's agent tokens.
pub async fn list_agent_tokens(config: &Config, pop: Option<&str>) -> anyhow::Result<String> {
    let store = Store::open(config).await?;
    crate::migrate_tolerant(&store, config).await?;
    let r = store.list_tokens(pop).await;
    let ops = if pop.is_none() {
        store.list_operator_tokens().await
    } else {
        Ok(Vec::new())
    };
    store.close().await;
    let mut rows = r?;
    rows.extend(
        ops?.into_iter()
            .map(|(id, name, at)| (id, format!("operator:{name}"), at)),
    );
    let mut out = format!("{:<38} {:<12} CREATED\n", "ID", "POP");
    for (id, pop, created) in rows {
        let at = chrono::DateTime::from_timestamp_millis(created).map_or_else(
            || created.to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        out.push_str(&format!("{id:<38} {pop:<12} {at}\n"));
    }
    Ok(out)
}

/// `token revoke --id`: deletes the token (an agent's or an operator's,
/// with the operator's page sessions); replicas stop accepting it once
/// their cache entry expires (30 s). Returns the PoP, or `operator:<name>`.
pub async fn revoke_agent_token(config: &Config, id: &str) -> anyhow::Result<String> {
    let store = Store::open(config).await?;
    crate::migrate_tolerant(&store, config).await?;
    let r = async {
        if let Some(pop) = store.revoke_token(id).await? {
            return Ok(Some(pop));
        }
        Ok::<_, crate::store::StoreError>(
            store
                .revoke_operator_token(id)
                .await?
                .map(|name| format!("operator:{name}")),
        )
    }
    .await;
    store.close().await;
    match r? {
        Some(who) => Ok(who),
        None => anyhow::bail!("no token has id {id:?} (see `token list`)"),
    }
}
