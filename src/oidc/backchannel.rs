//! Back-channel logout (OpenID Connect Back-Channel Logout 1.0): a logout token signed afresh for
//! each delivery, POSTed to the client's registered URI exactly as registered.
use serde_json::{json, Map};

use super::clients;
use crate::app::AppState;
use crate::clock::random_token;
use crate::store::{Account, BrowserSession};

/// Signs a logout token for one client and session.
pub fn logout_token(state: &AppState, client: &clients::Client, account: &Account, sid: &str) -> anyhow::Result<String> {
    let now = state.clock.now();
    let mut claims = Map::new();
    claims.insert("iss".into(), json!(state.config.issuer));
    claims.insert("aud".into(), json!(client.client_id));
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(now + 120));
    claims.insert("jti".into(), json!(random_token()));
    claims.insert("sub".into(), json!(super::claims::subject(state, client, &account.sub)));
    claims.insert("sid".into(), json!(sid));
    claims.insert(
        "events".into(),
        json!({ "http://schemas.openid.net/event/backchannel-logout": {} }),
    );
    state
        .current_keys()
        .sign(&client.id_token_signed_response_alg, "logout+jwt", claims)
}

/// Delivers logout tokens to every client of the session that registered a back-channel URI,
/// each with a 2-second timeout. Returns the clients whose delivery failed.
pub async fn notify(state: &AppState, session: &BrowserSession, client_ids: &[String]) -> Vec<String> {
    let Ok(Some(account)) = state.store.get_account(&session.account_id).await else {
        return vec![];
    };
    let mut failed = Vec::new();
    for client_id in client_ids {
        let Ok(Some(client)) = clients::find(state, client_id).await else { continue };
        let Some(uri) = client.backchannel_logout_uri.clone() else { continue };
        let delivered = match logout_token(state, &client, &account, &session.sid) {
            Ok(token) => state
                .http
                .post(&uri)
                .timeout(std::time::Duration::from_secs(2))
                .form(&[("logout_token", token)])
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()),
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a logout token");
                false
            }
        };
        if !delivered {
            tracing::warn!(client_id = %client_id, "back-channel logout delivery failed");
            failed.push(client_id.clone());
        }
    }
    failed
}

