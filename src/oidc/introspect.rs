//! Token introspection (RFC 7662) and revocation (RFC 7009). Both require client authentication;
//! public clients may not introspect.
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::clients;
use super::params::{is_form, Params};
use super::token::no_store;
use super::userinfo::{active_access_token, active_refresh_token};
use crate::app::AppState;
use crate::crypto::token_digest;
use crate::error::OAuthError;
use crate::store::{Grant, TokenOwner, TokenView};

async fn read(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(std::sync::Arc<clients::Client>, Params), OAuthError> {
    if !is_form(headers) {
        return Err(OAuthError::invalid_request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let params = Params::parse(body).map_err(|e| OAuthError::invalid_request(e.describe()))?;
    let client = clients::authenticate(state, headers, &params).await?;
    Ok((client, params))
}

/// What introspection reports of a live token.
struct Found {
    grant: Grant,
    token_type: &'static str,
    exp: i64,
    iat: i64,
    scope: String,
    owner: Option<TokenOwner>,
}

impl Found {
    fn access(view: TokenView) -> Found {
        let token = view.token;
        Found {
            grant: view.grant,
            token_type: "Bearer",
            exp: token.expires_at,
            iat: token.created_at,
            scope: token.scope,
            owner: view.owner,
        }
    }
}

/// A live refresh token with its grant and account.
async fn refresh_view(state: &AppState, token: &str) -> Result<Option<Found>, OAuthError> {
    let Some((token, grant)) = active_refresh_token(state, token).await? else {
        return Ok(None);
    };
    let owner = match &grant.account_id {
        Some(id) => state.store.get_account(id).await?.map(|a| TokenOwner {
            sub: a.sub,
            username: a.username,
        }),
        None => None,
    };
    Ok(Some(Found {
        grant,
        token_type: "refresh_token",
        exp: token.expires_at,
        iat: token.created_at,
        scope: token.scope,
        owner,
    }))
}

pub async fn introspect(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let (client, params) = read(&state, &headers, &body).await?;
    if client.is_public() {
        return Err(OAuthError::invalid_client(
            "public clients may not introspect tokens",
        ));
    }
    let token = params
        .get("token")
        .ok_or_else(|| OAuthError::invalid_request("token is missing"))?;
    let refresh_first = params.get("token_type_hint") == Some("refresh_token");
    let mut found = None;
    for kind in if refresh_first {
        ["refresh_token", "access_token"]
    } else {
        ["access_token", "refresh_token"]
    } {
        found = if kind == "access_token" {
            active_access_token(&state, token).await?.map(Found::access)
        } else {
            refresh_view(&state, token).await?
        };
        if found.is_some() {
            break;
        }
    }
    let Some(Found {
        grant,
        token_type,
        exp,
        iat,
        scope,
        owner,
    }) = found
    else {
        return Ok(no_store(
            axum::Json(json!({ "active": false })).into_response(),
        ));
    };
    let mut body = json!({
        "active": true,
        "client_id": grant.client_id,
        "token_type": token_type,
        "exp": exp,
        "iat": iat,
        "iss": state.config.issuer,
        "scope": scope,
    });
    if grant.account_id.is_some() {
        if let (Some(owner), Some(issued_to)) =
            (owner, clients::find(&state, &grant.client_id).await?)
        {
            body["sub"] = json!(super::claims::subject(&state, &issued_to, &owner.sub));
            body["username"] = json!(owner.username);
        }
        body["aud"] = json!(grant.client_id);
    }
    if let Some(acr) = &grant.acr {
        body["acr"] = json!(acr);
    }
    if let Some(auth_time) = grant.auth_time {
        body["auth_time"] = json!(auth_time);
    }
    if let Some(sid) = &grant.sid {
        body["sid"] = Value::String(sid.clone());
    }
    Ok(no_store(axum::Json(body).into_response()))
}

pub async fn revoke(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let (client, params) = read(&state, &headers, &body).await?;
    let token = params
        .get("token")
        .ok_or_else(|| OAuthError::invalid_request("token is missing"))?;
    let now = state.clock.now();
    let digest = token_digest(token);
    // Unknown tokens and other clients' tokens get the same 200 (RFC 7009 §2.2).
    if let Some(own) = super::service_token::open(&state, token) {
        if own.client_id == client.client_id && own.expires_at > now {
            state
                .store
                .revoke_client_token(&digest, own.expires_at)
                .await?;
        }
    } else if let Some(row) = state.store.find_access_token(&digest).await? {
        if let Some(grant) = state.store.get_grant(&row.grant_id).await? {
            if grant.client_id == client.client_id {
                state.store.revoke_access_token(&digest, now).await?;
            }
        }
    } else if let Some(row) = state.store.find_refresh_token(&digest).await? {
        if let Some(grant) = state.store.get_grant(&row.grant_id).await? {
            if grant.client_id == client.client_id {
                state.store.revoke_grant(&grant.id, now).await?;
                let event = crate::audit::Event {
                    kind: "token_revoked",
                    account_id: grant.account_id.as_deref(),
                    client_id: Some(&client.client_id),
                    outcome: "refresh token revoked by the client",
                    ..Default::default()
                };
                state.audit(event).await;
            }
        }
    }
    Ok(no_store(StatusCode::OK.into_response()))
}
