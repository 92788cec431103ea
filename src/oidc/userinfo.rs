//! UserInfo (GET or POST; bearer token in the header or the form body) and the token lookups that
//! introspection and revocation share.
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::claims;
use super::clients;
use super::params::{is_form, Params};
use crate::app::AppState;
use crate::crypto::token_digest;
use crate::error::{BearerError, OAuthError};
use crate::store::{Grant, RefreshToken, TokenView};

/// A live access token with its grant: a user's (stored) or a client's own (self-contained).
pub async fn active_access_token(
    state: &AppState,
    token: &str,
) -> Result<Option<TokenView>, OAuthError> {
    if token.contains('.') {
        return super::service_token::active(state, token).await;
    }
    let now = state.clock.now();
    let Some(view) = state
        .store
        .find_access_token_with_grant(&token_digest(token))
        .await?
    else {
        return Ok(None);
    };
    if view.token.revoked_at.is_some()
        || view.token.expires_at <= now
        || view.grant.revoked_at.is_some()
    {
        return Ok(None);
    }
    Ok(Some(view))
}

/// A live refresh token with its grant.
pub async fn active_refresh_token(
    state: &AppState,
    token: &str,
) -> Result<Option<(RefreshToken, Grant)>, crate::store::StoreError> {
    let now = state.clock.now();
    let Some(row) = state.store.find_refresh_token(&token_digest(token)).await? else {
        return Ok(None);
    };
    if row.revoked_at.is_some() || row.consumed_at.is_some() || row.expires_at <= now {
        return Ok(None);
    }
    let Some(grant) = state.store.get_grant(&row.grant_id).await? else {
        return Ok(None);
    };
    if grant.revoked_at.is_some() {
        return Ok(None);
    }
    Ok(Some((row, grant)))
}

fn bearer_from_header(headers: &HeaderMap) -> Result<Option<String>, BearerError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| BearerError::invalid_request("malformed Authorization header"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim().to_string()))
        }
        _ => Err(BearerError::missing()),
    }
}

pub async fn userinfo(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, BearerError> {
    let from_header = bearer_from_header(&headers)?;
    let from_body = if method == Method::POST && is_form(&headers) {
        Params::parse(&body)
            .map_err(|_| BearerError::invalid_request("malformed form body"))?
            .get("access_token")
            .map(str::to_string)
    } else {
        None
    };
    let token = match (from_header, from_body) {
        (Some(_), Some(_)) => return Err(BearerError::invalid_request("send the token only once")),
        (Some(token), None) | (None, Some(token)) => token,
        (None, None) => return Err(BearerError::missing()),
    };
    // A store that cannot answer is our fault (5xx), never a reason to call the token invalid.
    let TokenView {
        token: access,
        grant,
        owner,
    } = active_access_token(&state, &token)
        .await
        .map_err(|e| BearerError::server_error(e.description))?
        .ok_or_else(|| {
            BearerError::invalid_token("the access token is invalid, expired or revoked")
        })?;
    let scopes: Vec<&str> = access.scope.split(' ').collect();
    if grant.account_id.is_none() || !scopes.contains(&"openid") {
        return Err(BearerError::insufficient_scope(
            "the token was not issued with the openid scope",
        ));
    }
    let client = clients::find(&state, &grant.client_id)
        .await
        .map_err(|e| BearerError::server_error(e.description))?
        .ok_or_else(|| BearerError::invalid_token("the client no longer exists"))?;
    let account =
        owner.ok_or_else(|| BearerError::invalid_token("the account no longer exists"))?;
    let snapshot: Value = serde_json::from_str(&grant.claims).unwrap_or_default();
    let claims_request: Option<Value> = grant
        .claims_request
        .as_deref()
        .and_then(|c| serde_json::from_str(c).ok());
    let mut body = claims::release(
        &snapshot,
        &scopes,
        &client,
        claims::requested(claims_request.as_ref(), "userinfo"),
    );
    body.insert(
        "sub".into(),
        json!(claims::subject(&state, &client, &account.sub)),
    );
    Ok(super::token::no_store(
        axum::Json(Value::Object(body)).into_response(),
    ))
}
