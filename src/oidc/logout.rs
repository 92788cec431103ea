//! Logout: the menu's logout button and RP-Initiated Logout 1.0 on one route. A valid
//! `id_token_hint` (expired is fine) logs out without a page; otherwise the student confirms.
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use minijinja::context;
use serde_json::Value;
use url::Url;

use super::clients::{self, Client};
use super::params::{is_form, Params};
use crate::app::{see_other, AppState};
use crate::auth::csrf::{self, Browser};
use crate::auth::session::{self, clear_cookie, SESSION_COOKIE};
use crate::error::PageError;
use crate::store::BrowserSession;

pub async fn logout(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, PageError> {
    let raw = if method == Method::POST && is_form(&headers) {
        body.to_vec()
    } else {
        query.unwrap_or_default().into_bytes()
    };
    let params = Params::parse(&raw)
        .map_err(|e| PageError::bad_request("error_invalid_request", e.describe()))?;
    let locale = state.locale_for(&headers, params.get("lang"), params.get("ui_locales"));
    let bad =
        |detail: &str| PageError::bad_request("error_invalid_request", detail).in_locale(locale);

    // A hint that does not verify counts as no hint: the student is asked to confirm.
    let hint = params.get("id_token_hint").and_then(|token| {
        let claims = state.current_keys().verify_own(token)?;
        (claims.get("iss").and_then(Value::as_str) == Some(state.config.issuer.as_str()))
            .then_some(claims)
    });
    let hint_audience = hint.as_ref().and_then(|c| match c.get("aud") {
        Some(Value::String(a)) => Some(a.clone()),
        Some(Value::Array(a)) => a.first().and_then(Value::as_str).map(str::to_string),
        _ => None,
    });
    let client_id = match (params.get("client_id"), &hint_audience) {
        (Some(id), Some(aud)) if id != aud => {
            return Err(bad("client_id does not match id_token_hint"))
        }
        (Some(id), _) => Some(id.to_string()),
        (None, aud) => aud.clone(),
    };
    let client: Option<std::sync::Arc<Client>> = match &client_id {
        Some(id) => Some(
            clients::find(&state, id)
                .await
                .map_err(|_| PageError::internal("client lookup failed"))?
                .ok_or_else(|| bad("unknown client_id"))?,
        ),
        None => None,
    };
    let redirect = match params.get("post_logout_redirect_uri") {
        Some(uri) => {
            let client = client
                .as_ref()
                .ok_or_else(|| bad("post_logout_redirect_uri needs client_id or id_token_hint"))?;
            if !client.post_logout_redirect_uris.iter().any(|u| u == uri) {
                return Err(bad(
                    "post_logout_redirect_uri is not registered for this client",
                ));
            }
            let mut url = Url::parse(uri).map_err(|_| bad("invalid post_logout_redirect_uri"))?;
            if let Some(state_param) = params.get("state") {
                url.query_pairs_mut().append_pair("state", state_param);
            }
            Some(url.to_string())
        }
        None => None,
    };

    let current = session::current(&state, &headers).await?;
    let confirmed = method == Method::POST
        && params
            .get("csrf")
            .is_some_and(|t| csrf::verify(&state, &headers, t).is_some());
    let hint_matches = match (&hint, &current, &client) {
        (Some(claims), Some(session), Some(client)) => {
            let account = state.store.get_account(&session.account_id).await?;
            let sid_ok = claims
                .get("sid")
                .and_then(Value::as_str)
                .is_none_or(|sid| sid == session.sid);
            account.is_some_and(|a| {
                claims.get("sub").and_then(Value::as_str)
                    == Some(super::claims::subject(&state, client, &a.sub).as_str())
            }) && sid_ok
        }
        _ => false,
    };
    if let Some(session) = &current {
        if !(confirmed || hint_matches) {
            let browser = Browser::from_headers(&state, &headers);
            let ctx = context! {
                csrf => browser.csrf_token(&state),
                client_id => client_id,
                post_logout_redirect_uri => params.get("post_logout_redirect_uri"),
                state => params.get("state"),
                ui_locales => params.get("ui_locales"),
                menu => false,
            };
            return state.page(locale, "logout_confirm.html", ctx, &browser, &headers);
        }
        end_session(&state, session).await?;
    }
    let mut response = match redirect {
        Some(url) => see_other(&url),
        None => {
            let browser = Browser::from_headers(&state, &headers);
            state.page(
                locale,
                "logged_out.html",
                context! { menu => false },
                &browser,
                &headers,
            )?
        }
    };
    response
        .headers_mut()
        .append(header::SET_COOKIE, clear_cookie(&state, SESSION_COOKIE));
    Ok(response.into_response())
}

/// Ends the session at nidan, revokes its grants that lack offline access and tells the relying
/// parties that registered a back-channel logout URI.
pub async fn end_session(state: &AppState, session: &BrowserSession) -> Result<(), PageError> {
    let now = state.clock.now();
    if !state.store.end_session(&session.id, now).await? {
        return Ok(());
    }
    let clients = state.store.session_clients(&session.id).await?;
    state
        .store
        .revoke_session_grants(&session.id, true, now)
        .await?;
    super::backchannel::notify(state, session, &clients).await;
    Ok(())
}
