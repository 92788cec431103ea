//! The token endpoint: one entry point dispatching on the grant type, each grant in its own
//! function. A code or refresh token is consumed in the same transaction that stores what it
//! issues, with a conditional update, so two replicas can never both redeem one.
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::claims;
use super::clients::{self, Client};
use super::params::{is_form, Params};
use crate::app::AppState;
use crate::clock::{random_id, random_token};
use crate::crypto::{pkce_s256_matches, token_digest};
use crate::error::OAuthError;
use crate::store::{AccessToken, AuthorizationCode, Consume, Grant, RefreshToken};

pub async fn token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    if !is_form(&headers) {
        return Err(OAuthError::invalid_request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let params = Params::parse(&body).map_err(|e| OAuthError::invalid_request(e.describe()))?;
    let client = clients::authenticate(&state, &headers, &params).await?;
    let grant_type = params
        .get("grant_type")
        .ok_or_else(|| OAuthError::invalid_request("grant_type is missing"))?;
    if !matches!(
        grant_type,
        "authorization_code" | "refresh_token" | "client_credentials"
    ) {
        return Err(OAuthError::new(
            "unsupported_grant_type",
            "this grant type is not supported",
        ));
    }
    if !client.allows_grant(grant_type) {
        return Err(OAuthError::new(
            "unauthorized_client",
            "this client may not use this grant type",
        ));
    }
    let (body, grant) = match grant_type {
        "authorization_code" => (
            authorization_code(&state, &client, &params).await?,
            "authorization_code",
        ),
        "refresh_token" => (
            refresh_token(&state, &client, &params).await?,
            "refresh_token",
        ),
        _ => (
            client_credentials(&state, &client, &params).await?,
            "client_credentials",
        ),
    };
    crate::metrics::token_issued(grant);
    Ok(no_store(axum::Json(body).into_response()))
}

pub fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

async fn authorization_code(
    state: &AppState,
    client: &Client,
    params: &Params,
) -> Result<Value, OAuthError> {
    let code = params
        .get("code")
        .ok_or_else(|| OAuthError::invalid_request("code is missing"))?;
    let now = state.clock.now();
    let digest = token_digest(code);
    // Another client's code is unknown to this one and stays unused.
    let Some(code) = state
        .store
        .get_code(&digest)
        .await?
        .filter(|c| c.client_id == client.client_id)
    else {
        return Err(OAuthError::invalid_grant("unknown code"));
    };
    if code.consumed_at.is_some() {
        return Err(code_replayed(state, &code.digest, now).await?);
    }
    if let Err(why) = check_code(&code, params, now) {
        // A failed attempt uses the code up: whoever holds it gets one try.
        state
            .store
            .redeem_code(&digest, &client.client_id, &random_id(), now)
            .await?;
        return Err(OAuthError::invalid_grant(why));
    }
    let scopes: Vec<&str> = code.scope.split(' ').collect();
    let offline = scopes.contains(&"offline_access") && client.may_use_offline_access();
    let lifetime = if offline {
        state.config.lifetimes.refresh_token.as_secs() as i64
    } else {
        state.config.session.absolute_timeout.as_secs() as i64
    };
    let grant = Grant {
        id: random_id(),
        client_id: client.client_id.clone(),
        account_id: Some(code.account_id.clone()),
        session_id: Some(code.session_id.clone()),
        sid: Some(code.sid.clone()),
        scope: code.scope.clone(),
        claims_request: code.claims_request.clone(),
        acr: Some(code.acr.clone()),
        auth_time: Some(code.auth_time),
        claims: code.claims.clone(),
        offline: i64::from(offline),
        created_at: now,
        expires_at: now + lifetime,
        revoked_at: None,
    };
    let account = state
        .store
        .get_account(&code.account_id)
        .await?
        .ok_or_else(|| OAuthError::invalid_grant("the account no longer exists"))?;
    let minted = Minted::new(state, client, &grant, &code.scope);
    let consume = Consume::Code {
        digest: &digest,
        client_id: &client.client_id,
        grant_id: &grant.id,
    };
    // The code, the grant and its tokens change together, or not at all.
    if !minted.commit(state, consume, Some(&grant)).await? {
        return Err(code_replayed(state, &digest, now).await?);
    }
    let body = minted.response(
        state,
        client,
        &grant,
        &account.sub,
        code.nonce.as_deref(),
        true,
    )?;
    // A replay that raced this exchange may have found no grant to revoke yet.
    if state
        .store
        .get_code(&digest)
        .await?
        .is_some_and(|c| c.replayed_at.is_some())
    {
        state
            .store
            .revoke_grant(&grant.id, state.clock.now())
            .await?;
    }
    Ok(body)
}

/// The checks a code must pass before it is exchanged.
fn check_code(code: &AuthorizationCode, params: &Params, now: i64) -> Result<(), &'static str> {
    if code.expires_at <= now {
        return Err("the code has expired");
    }
    if params.get("redirect_uri") != Some(code.redirect_uri.as_str()) {
        return Err("redirect_uri does not match the authorization request");
    }
    match (&code.code_challenge, params.get("code_verifier")) {
        (Some(challenge), Some(verifier)) if pkce_s256_matches(verifier, challenge) => Ok(()),
        (Some(_), Some(_)) => Err("code_verifier does not match"),
        (Some(_), None) => Err("code_verifier is missing"),
        (None, Some(_)) => Err("code_verifier given but no code_challenge was sent"),
        (None, None) => Ok(()),
    }
}

/// A code presented again: it is marked (so an exchange still in flight revokes its own grant)
/// and what the first exchange issued is revoked (RFC 6749 §4.1.2).
async fn code_replayed(state: &AppState, digest: &str, now: i64) -> Result<OAuthError, OAuthError> {
    state.store.mark_code_replayed(digest, now).await?;
    if let Some(code) = state.store.get_code(digest).await? {
        if let Some(grant_id) = &code.grant_id {
            state.store.revoke_grant(grant_id, now).await?;
            let event = crate::audit::Event {
                kind: "grant_revoked",
                account_id: Some(&code.account_id),
                client_id: Some(&code.client_id),
                outcome: "authorization code replayed",
                ..Default::default()
            };
            state.audit(event).await;
        }
    }
    Ok(OAuthError::invalid_grant("the code was already used"))
}

async fn refresh_token(
    state: &AppState,
    client: &Client,
    params: &Params,
) -> Result<Value, OAuthError> {
    let presented = params
        .get("refresh_token")
        .ok_or_else(|| OAuthError::invalid_request("refresh_token is missing"))?;
    let now = state.clock.now();
    let digest = token_digest(presented);
    let grace = state.config.lifetimes.refresh_grace.as_secs() as i64;
    let unknown = || OAuthError::invalid_grant("unknown refresh token");
    let token = state
        .store
        .find_refresh_token(&digest)
        .await?
        .ok_or_else(unknown)?;
    // Another client's refresh token is unknown to this one and stays unused.
    let grant = state
        .store
        .get_grant(&token.grant_id)
        .await?
        .filter(|g| g.client_id == client.client_id)
        .ok_or_else(unknown)?;
    let within_grace = grace > 0
        && token.revoked_at.is_none()
        && token.consumed_at.is_some_and(|t| now - t <= grace);
    if token.consumed_at.is_some() && !within_grace {
        return Err(refresh_replayed(state, client, &token.grant_id, now).await?);
    }
    if grant.revoked_at.is_some()
        || token.revoked_at.is_some()
        || token.expires_at <= now
        || grant.expires_at <= now
    {
        return Err(OAuthError::invalid_grant(
            "the refresh token is no longer valid",
        ));
    }
    if grant.offline == 0 {
        // Without offline_access, refresh tokens end with the browser session.
        let alive = match &grant.session_id {
            Some(id) => state
                .store
                .get_session(id)
                .await?
                .is_some_and(|s| s.is_active(state, now)),
            None => false,
        };
        if !alive {
            state.store.revoke_grant(&grant.id, now).await?;
            return Err(OAuthError::invalid_grant("the session has ended"));
        }
    }
    let account_id = grant.account_id.clone().unwrap_or_default();
    let account = state
        .store
        .get_account(&account_id)
        .await?
        .ok_or_else(|| OAuthError::invalid_grant("the account no longer exists"))?;
    let mut grant = grant;
    // Refresh the claims from the directory; a student it no longer has loses the grant.
    match state.directory.lookup(&account.username).await {
        Ok(Some(user)) if user.id == account.directory_id => {
            let mut refreshed = account.clone();
            refreshed.claims = Value::Object(user.claims).to_string();
            let snapshot = claims::snapshot(&refreshed).to_string();
            if snapshot != grant.claims {
                state
                    .store
                    .update_grant_claims(&grant.id, &snapshot)
                    .await?;
                grant.claims = snapshot;
            }
        }
        Ok(_) => {
            state.store.revoke_grant(&grant.id, now).await?;
            return Err(OAuthError::invalid_grant(
                "the student is no longer in the directory",
            ));
        }
        Err(e) => {
            tracing::warn!(error = %e, "directory unavailable during refresh; keeping stored claims");
        }
    }
    let granted: Vec<&str> = token.scope.split(' ').collect();
    let scope = match params.get("scope") {
        Some(requested) => {
            let requested: Vec<&str> = requested.split(' ').filter(|s| !s.is_empty()).collect();
            if let Some(bad) = requested.iter().find(|s| !granted.contains(s)) {
                return Err(OAuthError::new(
                    "invalid_scope",
                    format!("scope {bad} was not granted"),
                ));
            }
            requested.join(" ")
        }
        None => token.scope.clone(),
    };
    let minted = Minted::new(state, client, &grant, &scope);
    // Inside the grace window the token was already rotated: issue again without consuming.
    let consume = if token.consumed_at.is_some() {
        Consume::Nothing
    } else {
        Consume::Refresh { digest: &digest }
    };
    if !minted.commit(state, consume, None).await? {
        return Err(refresh_replayed(state, client, &token.grant_id, now).await?);
    }
    let with_id_token = scope.split(' ').any(|s| s == "openid");
    minted.response(state, client, &grant, &account.sub, None, with_id_token)
}

/// Reuse of a rotated refresh token: someone has a copy, so the whole grant goes.
async fn refresh_replayed(
    state: &AppState,
    client: &Client,
    grant_id: &str,
    now: i64,
) -> Result<OAuthError, OAuthError> {
    state.store.revoke_grant(grant_id, now).await?;
    let event = crate::audit::Event {
        kind: "grant_revoked",
        client_id: Some(&client.client_id),
        outcome: "refresh token replayed",
        details: format!("grant {grant_id}"),
        ..Default::default()
    };
    state.audit(event).await;
    Ok(OAuthError::invalid_grant(
        "the refresh token was already used",
    ))
}

async fn client_credentials(
    state: &AppState,
    client: &Client,
    params: &Params,
) -> Result<Value, OAuthError> {
    if client.is_public() {
        return Err(OAuthError::new(
            "unauthorized_client",
            "public clients cannot use client_credentials",
        ));
    }
    let requested: Vec<&str> = params
        .get("scope")
        .unwrap_or("")
        .split(' ')
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = requested.iter().find(|s| {
        !client.scopes.iter().any(|c| c == *s) || matches!(**s, "openid" | "offline_access")
    }) {
        return Err(OAuthError::new(
            "invalid_scope",
            format!("scope {bad} cannot be granted to a client"),
        ));
    }
    let now = state.clock.now();
    let lifetime = state.config.lifetimes.access_token.as_secs() as i64;
    // Self-contained: nothing is stored (see `service_token`).
    let scope = requested.join(" ");
    let access = super::service_token::issue(state, &client.client_id, &scope, now, now + lifetime);
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": lifetime,
    });
    if !scope.is_empty() {
        body["scope"] = Value::String(scope);
    }
    Ok(body)
}

/// Tokens made for a grant, stored by `commit` before anyone sees them.
struct Minted {
    access: String,
    access_row: AccessToken,
    refresh: Option<(String, RefreshToken)>,
    scope: String,
}

impl Minted {
    fn new(state: &AppState, client: &Client, grant: &Grant, scope: &str) -> Minted {
        let now = state.clock.now();
        let access = random_token();
        let expires_at = (now + state.config.lifetimes.access_token.as_secs() as i64)
            .min(grant.expires_at.max(now + 60));
        let access_row = AccessToken {
            digest: token_digest(&access),
            grant_id: grant.id.clone(),
            scope: scope.to_string(),
            created_at: now,
            expires_at,
            revoked_at: None,
        };
        let refresh = client.allows_grant("refresh_token").then(|| {
            let token = random_token();
            let row = RefreshToken {
                digest: token_digest(&token),
                grant_id: grant.id.clone(),
                scope: grant.scope.clone(),
                created_at: now,
                expires_at: grant.expires_at,
                consumed_at: None,
                revoked_at: None,
            };
            (token, row)
        });
        Minted {
            access,
            access_row,
            refresh,
            scope: scope.to_string(),
        }
    }

    async fn commit(
        &self,
        state: &AppState,
        consume: Consume<'_>,
        grant: Option<&Grant>,
    ) -> Result<bool, OAuthError> {
        let refresh = self.refresh.as_ref().map(|(_, row)| row);
        Ok(state
            .store
            .commit_tokens(consume, grant, &self.access_row, refresh, state.clock.now())
            .await?)
    }

    /// The token response: access token, refresh token when the client may refresh, ID token.
    fn response(
        &self,
        state: &AppState,
        client: &Client,
        grant: &Grant,
        account_sub: &str,
        nonce: Option<&str>,
        with_id_token: bool,
    ) -> Result<Value, OAuthError> {
        let mut body = json!({
            "access_token": self.access,
            "token_type": "Bearer",
            "expires_in": state.config.lifetimes.access_token.as_secs(),
            "scope": self.scope,
        });
        if let Some((refresh, _)) = &self.refresh {
            body["refresh_token"] = Value::String(refresh.clone());
        }
        if with_id_token {
            let id_token = id_token(
                state,
                client,
                grant,
                &self.scope,
                account_sub,
                nonce,
                Some(&self.access),
            )?;
            body["id_token"] = Value::String(id_token);
        }
        Ok(body)
    }
}

pub fn id_token(
    state: &AppState,
    client: &Client,
    grant: &Grant,
    scope: &str,
    account_sub: &str,
    nonce: Option<&str>,
    access_token: Option<&str>,
) -> Result<String, OAuthError> {
    let now = state.clock.now();
    let alg = client.id_token_signed_response_alg.as_str();
    let scopes: Vec<&str> = scope.split(' ').collect();
    let snapshot: Value = serde_json::from_str(&grant.claims).unwrap_or_default();
    let claims_request: Option<Value> = grant
        .claims_request
        .as_deref()
        .and_then(|c| serde_json::from_str(c).ok());
    let requested = claims::requested(claims_request.as_ref(), "id_token");
    let mut payload: Map<String, Value> = claims::release(&snapshot, &scopes, client, requested);
    payload.insert("iss".into(), json!(state.config.issuer));
    payload.insert(
        "sub".into(),
        json!(claims::subject(state, client, account_sub)),
    );
    payload.insert("aud".into(), json!(client.client_id));
    payload.insert("azp".into(), json!(client.client_id));
    payload.insert("iat".into(), json!(now));
    payload.insert(
        "exp".into(),
        json!(now + state.config.lifetimes.id_token.as_secs() as i64),
    );
    if let Some(auth_time) = grant.auth_time {
        payload.insert("auth_time".into(), json!(auth_time));
    }
    if let Some(acr) = &grant.acr {
        payload.insert("acr".into(), json!(acr));
        // Both factors are passwords: never "mfa".
        payload.insert("amr".into(), json!(["pwd"]));
    }
    if let Some(sid) = &grant.sid {
        payload.insert("sid".into(), json!(sid));
    }
    if let Some(nonce) = nonce {
        payload.insert("nonce".into(), json!(nonce));
    }
    if let Some(token) = access_token {
        payload.insert("at_hash".into(), json!(crate::keys::half_hash(alg, token)));
    }
    let keys = state.current_keys();
    Ok(keys.sign(alg, "JWT", payload)?)
}
