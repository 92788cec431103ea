//! A client's own access tokens (the client_credentials grant). Such a token carries its grant —
//! the client, the scope, when it was issued and when it expires — under an HMAC-SHA256 tag keyed
//! from the key-encryption key, so issuing one writes nothing and every replica can check one.
//! Resource servers still see an opaque string and ask the introspection endpoint; revoking one
//! records its digest until it would have expired. A user's access token, by contrast, is a random
//! reference to a stored grant, so signing out or revoking the grant ends it at once.
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::clock::{random_id, Timestamp};
use crate::crypto::{b64url, b64url_decode, constant_time_eq, keyed_tag, token_digest};
use crate::error::OAuthError;
use crate::store::{AccessToken, Grant, TokenView};

/// What a client's token says about itself.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceClaims {
    /// The client the token was issued to.
    #[serde(rename = "c")]
    pub client_id: String,
    #[serde(rename = "s")]
    pub scope: String,
    #[serde(rename = "i")]
    pub issued_at: Timestamp,
    #[serde(rename = "e")]
    pub expires_at: Timestamp,
    /// Makes every token unique, so revoking one leaves the others.
    #[serde(rename = "j")]
    pub jti: String,
}

/// Issues a token for `client_id` with `scope`, living until `expires_at`.
pub fn issue(
    state: &AppState,
    client_id: &str,
    scope: &str,
    issued_at: Timestamp,
    expires_at: Timestamp,
) -> String {
    let claims = ServiceClaims {
        client_id: client_id.to_string(),
        scope: scope.to_string(),
        issued_at,
        expires_at,
        jti: random_id(),
    };
    let payload = b64url(&serde_json::to_vec(&claims).expect("plain fields serialize"));
    let tag = b64url(&keyed_tag(&state.secrets.client_token, payload.as_bytes()));
    format!("{payload}.{tag}")
}

/// The claims of a token this provider issued, whatever its expiry; `None` for anything else
/// (a user's access token, a forged or altered one).
pub fn open(state: &AppState, token: &str) -> Option<ServiceClaims> {
    let (payload, presented) = token.rsplit_once('.')?;
    let expected = keyed_tag(&state.secrets.client_token, payload.as_bytes());
    if !constant_time_eq(&expected, &b64url_decode(presented)?) {
        return None;
    }
    serde_json::from_slice(&b64url_decode(payload)?).ok()
}

/// A live client token as introspection sees it: not expired, not revoked, its client still
/// registered.
pub async fn active(state: &AppState, token: &str) -> Result<Option<TokenView>, OAuthError> {
    let Some(claims) = open(state, token) else {
        return Ok(None);
    };
    if claims.expires_at <= state.clock.now() {
        return Ok(None);
    }
    let registered = super::clients::find(state, &claims.client_id)
        .await?
        .is_some_and(|c| c.allows_grant("client_credentials"));
    let digest = token_digest(token);
    if !registered || state.store.client_token_revoked(&digest).await? {
        return Ok(None);
    }
    let grant = Grant {
        id: claims.jti,
        client_id: claims.client_id,
        account_id: None,
        session_id: None,
        sid: None,
        scope: claims.scope.clone(),
        claims_request: None,
        acr: None,
        auth_time: None,
        claims: "{}".into(),
        offline: 0,
        created_at: claims.issued_at,
        expires_at: claims.expires_at,
        revoked_at: None,
    };
    let token = AccessToken {
        digest,
        grant_id: grant.id.clone(),
        scope: claims.scope,
        created_at: claims.issued_at,
        expires_at: claims.expires_at,
        revoked_at: None,
    };
    Ok(Some(TokenView {
        token,
        grant,
        owner: None,
    }))
}
