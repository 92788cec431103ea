//! Back-channel logout (OpenID Connect Back-Channel Logout 1.0): a logout token signed afresh for
//! each delivery, POSTed to the client's registered URI exactly as registered.
use serde_json::{json, Map};

use super::clients;
use crate::app::AppState;
use crate::clock::random_token;
use crate::store::{Account, BrowserSession};

/// Signs a logout token for one client and session.
pub fn logout_token(
    state: &AppState,
    client: &clients::Client,
    account: &Account,
    sid: &str,
) -> anyhow::Result<String> {
    let now = state.clock.now();
    let mut claims = Map::new();
    claims.insert("iss".into(), json!(state.config.issuer));
    claims.insert("aud".into(), json!(client.client_id));
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(now + 120));
    claims.insert("jti".into(), json!(random_token()));
    claims.insert(
        "sub".into(),
        json!(super::claims::subject(state, client, &account.sub)),
    );
    claims.insert("sid".into(), json!(sid));
    claims.insert(
        "events".into(),
        json!({ "http://schemas.openid.net/event/backchannel-logout": {} }),
    );
    state
        .current_keys()
        .sign(&client.id_token_signed_response_alg, "logout+jwt", claims)
}

/// One delivery attempt with a freshly signed token: POSTed to the URI exactly as registered.
pub async fn deliver(
    state: &AppState,
    client: &clients::Client,
    account: &Account,
    sid: &str,
) -> Result<String, String> {
    let uri = client
        .backchannel_logout_uri
        .clone()
        .ok_or_else(|| "no backchannel_logout_uri".to_string())?;
    let token =
        logout_token(state, client, account, sid).map_err(|e| format!("cannot sign: {e}"))?;
    let response = state
        .http
        .post(&uri)
        .timeout(std::time::Duration::from_secs(2))
        .form(&[("logout_token", token)])
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(status.to_string())
    } else {
        Err(format!("answered {status}"))
    }
}

/// Notifies every client of the session that registered a back-channel URI, at once with a
/// 2-second timeout each; failures go to the outbox and are retried in the background.
pub async fn notify(state: &AppState, session: &BrowserSession, client_ids: &[String]) {
    let Ok(Some(account)) = state.store.get_account(&session.account_id).await else {
        return;
    };
    for client_id in client_ids {
        let Ok(Some(client)) = clients::find(state, client_id).await else {
            continue;
        };
        if client.backchannel_logout_uri.is_none() {
            continue;
        }
        if let Err(error) = deliver(state, &client, &account, &session.sid).await {
            tracing::warn!(client_id = %client_id, error = %error, "back-channel logout failed; queued for retry");
            let now = state.clock.now();
            let job = crate::store::OutboxJob {
                id: crate::clock::random_id(),
                kind: "backchannel_logout".into(),
                recipient: client_id.clone(),
                subject: String::new(),
                payload: serde_json::json!({
                    "client_id": client_id, "account_id": account.id, "sid": session.sid,
                })
                .to_string(),
                message_id: String::new(),
                attempts: 1,
                next_attempt_at: now + 1,
                last_error: Some(error),
                created_at: now,
                sent_at: None,
                failed_at: None,
                lease_owner: None,
                lease_until: None,
            };
            if let Err(e) = state.store.enqueue(&job).await {
                tracing::error!(error = %e, "cannot queue a back-channel logout retry");
            }
        }
    }
}
