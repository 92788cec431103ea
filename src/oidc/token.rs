//! The token endpoint: one entry point dispatching on the grant type, each grant in its own
//! function. Codes and refresh tokens are redeemed with one atomic statement each.
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
use crate::store::{AccessToken, Grant, Redeemed, RefreshToken};

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
    let grant_id = random_id();
    let code = match state
        .store
        .redeem_code(&token_digest(code), &client.client_id, &grant_id, now)
        .await?
    {
        Redeemed::Fresh(code) => code,
        Redeemed::AlreadyUsed(code) => {
            // Marked first: an exchange still in flight sees the mark after storing its grant.
            state.store.mark_code_replayed(&code.digest, now).await?;
            // A replayed code revokes what the first redemption issued (RFC 6749 §4.1.2).
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
            return Err(OAuthError::invalid_grant("the code was already used"));
        }
        Redeemed::NotFound => return Err(OAuthError::invalid_grant("unknown code")),
    };
    if code.client_id != client.client_id {
        return Err(OAuthError::invalid_grant(
            "the code was issued to another client",
        ));
    }
    if code.expires_at <= now {
        return Err(OAuthError::invalid_grant("the code has expired"));
    }
    if params.get("redirect_uri") != Some(code.redirect_uri.as_str()) {
        return Err(OAuthError::invalid_grant(
            "redirect_uri does not match the authorization request",
        ));
    }
    match (&code.code_challenge, params.get("code_verifier")) {
        (Some(challenge), Some(verifier)) if pkce_s256_matches(verifier, challenge) => {}
        (Some(_), Some(_)) => {
            return Err(OAuthError::invalid_grant("code_verifier does not match"))
        }
        (Some(_), None) => return Err(OAuthError::invalid_grant("code_verifier is missing")),
        (None, Some(_)) => {
            return Err(OAuthError::invalid_grant(
                "code_verifier given but no code_challenge was sent",
            ))
        }
        (None, None) => {}
    }
    let scopes: Vec<&str> = code.scope.split(' ').collect();
    let offline = scopes.contains(&"offline_access") && client.may_use_offline_access();
    let lifetime = if offline {
        state.config.lifetimes.refresh_token.as_secs() as i64
    } else {
        state.config.session.absolute_timeout.as_secs() as i64
    };
    let grant = Grant {
        id: grant_id,
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
    state.store.insert_grant(&grant).await?;
    let account = state
        .store
        .get_account(&code.account_id)
        .await?
        .ok_or_else(|| OAuthError::invalid_grant("the account no longer exists"))?;
    let body = issue_tokens(
        state,
        client,
        &grant,
        &code.scope,
        &account.sub,
        code.nonce.as_deref(),
        true,
    )
    .await?;
    // A replay that raced this exchange may have found no grant to revoke yet.
    if state
        .store
        .get_code(&code.digest)
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
    let token = match state
        .store
        .redeem_refresh_token(&digest, &client.client_id, now)
        .await?
    {
        Redeemed::Fresh(token) => token,
        Redeemed::AlreadyUsed(token)
            if grace > 0
                && token.revoked_at.is_none()
                && token.consumed_at.is_some_and(|t| now - t <= grace) =>
        {
            // The client lost the response to its last refresh: allow a retry inside the window.
            token
        }
        Redeemed::AlreadyUsed(token) => {
            // Reuse of a rotated token: someone has a copy, so the whole grant goes.
            state.store.revoke_grant(&token.grant_id, now).await?;
            let event = crate::audit::Event {
                kind: "grant_revoked",
                client_id: Some(&client.client_id),
                outcome: "refresh token replayed",
                details: format!("grant {}", token.grant_id),
                ..Default::default()
            };
            state.audit(event).await;
            return Err(OAuthError::invalid_grant(
                "the refresh token was already used",
            ));
        }
        Redeemed::NotFound => return Err(OAuthError::invalid_grant("unknown refresh token")),
    };
    let grant = state
        .store
        .get_grant(&token.grant_id)
        .await?
        .ok_or_else(|| OAuthError::invalid_grant("unknown refresh token"))?;
    if grant.client_id != client.client_id {
        return Err(OAuthError::invalid_grant(
            "the refresh token was issued to another client",
        ));
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
    let grant = state.store.get_grant(&grant.id).await?.unwrap_or(grant);
    issue_tokens(
        state,
        client,
        &grant,
        &scope,
        &account.sub,
        None,
        scope.split(' ').any(|s| s == "openid"),
    )
    .await
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
    let grant = Grant {
        id: random_id(),
        client_id: client.client_id.clone(),
        account_id: None,
        session_id: None,
        sid: None,
        scope: requested.join(" "),
        claims_request: None,
        acr: None,
        auth_time: None,
        claims: "{}".into(),
        offline: 0,
        created_at: now,
        expires_at: now + lifetime,
        revoked_at: None,
    };
    state.store.insert_grant(&grant).await?;
    let access_token = new_access_token(state, &grant, &grant.scope).await?;
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": lifetime,
    });
    if !grant.scope.is_empty() {
        body["scope"] = Value::String(grant.scope.clone());
    }
    Ok(body)
}

async fn new_access_token(
    state: &AppState,
    grant: &Grant,
    scope: &str,
) -> Result<String, OAuthError> {
    let now = state.clock.now();
    let token = random_token();
    let expires_at = (now + state.config.lifetimes.access_token.as_secs() as i64)
        .min(grant.expires_at.max(now + 60));
    state
        .store
        .insert_access_token(&AccessToken {
            digest: token_digest(&token),
            grant_id: grant.id.clone(),
            scope: scope.to_string(),
            created_at: now,
            expires_at,
            revoked_at: None,
        })
        .await?;
    Ok(token)
}

/// Access token, refresh token (when the client may refresh) and ID token for a user grant.
async fn issue_tokens(
    state: &AppState,
    client: &Client,
    grant: &Grant,
    scope: &str,
    account_sub: &str,
    nonce: Option<&str>,
    with_id_token: bool,
) -> Result<Value, OAuthError> {
    let now = state.clock.now();
    let access_token = new_access_token(state, grant, scope).await?;
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": state.config.lifetimes.access_token.as_secs(),
        "scope": scope,
    });
    if client.allows_grant("refresh_token") {
        let refresh = random_token();
        state
            .store
            .insert_refresh_token(&RefreshToken {
                digest: token_digest(&refresh),
                grant_id: grant.id.clone(),
                scope: grant.scope.clone(),
                created_at: now,
                expires_at: grant.expires_at,
                consumed_at: None,
                revoked_at: None,
            })
            .await?;
        body["refresh_token"] = Value::String(refresh);
    }
    if with_id_token {
        let id_token = id_token(
            state,
            client,
            grant,
            scope,
            account_sub,
            nonce,
            Some(&access_token),
        )?;
        body["id_token"] = Value::String(id_token);
    }
    Ok(body)
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
