//! The authorization endpoint. Until the client and redirect URI are known to be good, errors are
//! pages; after that they are redirects carrying `error`, `state` and `iss`.
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use super::clients::{self, Client};
use super::params::Params;
use crate::app::{see_other, AppState};
use crate::auth::csrf::Browser;
use crate::auth::levels::{decide, required_level, Decision, Level};
use crate::auth::session;
use crate::clock::{random_id, random_token, Timestamp};
use crate::crypto::token_digest;
use crate::enroll::Enrollment;
use crate::error::PageError;
use crate::store::{Account, AuthorizationCode, BrowserSession, LoginTransaction};

/// Pending requests live at least this long, bound to the browser.
pub const LOGIN_TRANSACTION_LIFETIME: i64 = 2 * 3600;

/// A validated authorization request, stored while the student signs in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthRequest {
    pub client_id: String,
    pub redirect_uri: String,
    pub scope: Vec<String>,
    pub state: Option<String>,
    pub nonce: Option<String>,
    pub code_challenge: Option<String>,
    pub prompt: Vec<String>,
    pub max_age: Option<i64>,
    pub acr_values: Vec<String>,
    pub claims: Option<Value>,
    pub ui_locales: Option<String>,
    pub login_hint: Option<String>,
}

impl AuthRequest {
    pub fn prompt_login(&self) -> bool {
        self.prompt.iter().any(|p| p == "login")
    }
    pub fn prompt_none(&self) -> bool {
        self.prompt.iter().any(|p| p == "none")
    }
    /// The lowest level an essential `acr` claim accepts.
    pub fn essential_acr(&self) -> Option<Level> {
        let acr = self.claims.as_ref()?.get("id_token")?.get("acr")?;
        if acr.get("essential").and_then(Value::as_bool) != Some(true) {
            return None;
        }
        let mut values: Vec<&str> = acr
            .get("values")
            .and_then(Value::as_array)
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(value) = acr.get("value").and_then(Value::as_str) {
            values.push(value);
        }
        values.into_iter().filter_map(Level::from_acr).min()
    }

    /// The redirect back to the client with `params` plus `state` and `iss` (RFC 9207).
    pub fn redirect_with(&self, issuer: &str, params: &[(&str, &str)]) -> Response {
        let mut url = Url::parse(&self.redirect_uri).expect("registered redirect URIs are URLs");
        {
            let mut query = url.query_pairs_mut();
            for (k, v) in params {
                query.append_pair(k, v);
            }
            if let Some(state) = &self.state {
                query.append_pair("state", state);
            }
            query.append_pair("iss", issuer);
        }
        see_other(url.as_str())
    }

    pub fn error_redirect(&self, issuer: &str, error: &str, description: &str) -> Response {
        self.redirect_with(
            issuer,
            &[("error", error), ("error_description", description)],
        )
    }
}

struct RedirectError(&'static str, String);

fn invalid(description: impl Into<String>) -> RedirectError {
    RedirectError("invalid_request", description.into())
}

pub async fn authorize(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, PageError> {
    let raw = if method == Method::POST {
        if !super::params::is_form(&headers) {
            return Err(PageError::bad_request(
                "error_invalid_request",
                "invalid_request",
            ));
        }
        body.to_vec()
    } else {
        query.unwrap_or_default().into_bytes()
    };
    let mut params = Params::parse(&raw)
        .map_err(|e| PageError::bad_request("error_invalid_request", e.describe()))?;
    let locale = state.locale_for(&headers, params.get("lang"), params.get("ui_locales"));
    let client_id = params
        .get("client_id")
        .ok_or_else(|| {
            PageError::bad_request("error_invalid_request", "client_id is missing")
                .in_locale(locale)
        })?
        .to_string();
    let client = clients::find(&state, &client_id)
        .await
        .map_err(|_| PageError::internal("client lookup failed"))?
        .ok_or_else(|| {
            PageError::bad_request("error_unknown_client", "invalid_client").in_locale(locale)
        })?;
    let redirect_uri = params.get("redirect_uri").unwrap_or("").to_string();
    if !client.redirect_uris.contains(&redirect_uri) {
        return Err(
            PageError::bad_request("error_bad_redirect_uri", "invalid_redirect_uri")
                .in_locale(locale),
        );
    }
    let mut request = AuthRequest {
        client_id: client_id.clone(),
        redirect_uri,
        scope: vec![],
        state: params.take("state"),
        nonce: None,
        code_challenge: None,
        prompt: vec![],
        max_age: None,
        acr_values: vec![],
        claims: None,
        ui_locales: None,
        login_hint: None,
    };
    if let Err(RedirectError(error, description)) = validate(&client, &mut params, &mut request) {
        return Ok(request.error_redirect(&state.config.issuer, error, &description));
    }
    let browser = Browser::from_headers(&state, &headers);
    let session = if client.sso {
        session::current(&state, &headers).await?
    } else {
        None
    };
    let now = state.clock.now();
    let decision = decide(&state, &client, &request, session.as_ref(), None, now);
    let mut response = match (decision, session) {
        (Decision::Issue { level, auth_time }, Some(session)) => {
            state.store.touch_session(&session.id, now).await?;
            let account = state
                .store
                .get_account(&session.account_id)
                .await?
                .ok_or_else(|| PageError::internal("session without account"))?;
            let needs_second = required_level(&client, &request) == Level::SecondPassword;
            let enrollment = Enrollment::of(&account);
            if enrollment != Enrollment::Done && crate::enroll::required(&state, needs_second) {
                if request.prompt_none() {
                    return Ok(request.error_redirect(
                        &state.config.issuer,
                        "interaction_required",
                        "the student must finish registration",
                    ));
                }
                let tx = new_transaction(&state, &browser, &request, now).await?;
                enrollment
                    .page(Some(&tx))
                    .map(|p| see_other(&crate::auth::login::with_lang(&p, locale)))
                    .unwrap_or_else(|| see_other("/login"))
            } else {
                issue_code(&state, &request, &session, &account, level, auth_time).await?
            }
        }
        (_, _) if request.prompt_none() => {
            return Ok(request.error_redirect(
                &state.config.issuer,
                "login_required",
                "the student must sign in",
            ));
        }
        (decision, _) => {
            let tx = new_transaction(&state, &browser, &request, now).await?;
            let page = if decision == Decision::StepUp {
                "/login/step-up"
            } else {
                "/login"
            };
            see_other(&format!("{page}?tx={tx}"))
        }
    };
    browser.set_cookie_if_new(&state, response.headers_mut());
    Ok(response)
}

/// Stores the request while the student signs in, bound to this browser; returns its id.
async fn new_transaction(
    state: &AppState,
    browser: &Browser,
    request: &AuthRequest,
    now: Timestamp,
) -> Result<String, PageError> {
    let tx = LoginTransaction {
        id: random_id(),
        browser_digest: browser.digest(),
        client_id: request.client_id.clone(),
        request: serde_json::to_string(request).map_err(anyhow::Error::from)?,
        account_id: None,
        created_at: now,
        expires_at: now + LOGIN_TRANSACTION_LIFETIME,
        completed_at: None,
    };
    state.store.insert_login_transaction(&tx).await?;
    Ok(tx.id)
}

fn validate(
    client: &Client,
    params: &mut Params,
    request: &mut AuthRequest,
) -> Result<(), RedirectError> {
    if params.has("request") {
        return Err(RedirectError(
            "request_not_supported",
            "request objects are not supported".into(),
        ));
    }
    if params.has("request_uri") {
        return Err(RedirectError(
            "request_uri_not_supported",
            "request_uri is not supported".into(),
        ));
    }
    match params.get("response_type") {
        None => return Err(invalid("response_type is missing")),
        Some("code") => {}
        Some(_) => {
            return Err(RedirectError(
                "unsupported_response_type",
                "only response_type=code is supported".into(),
            ))
        }
    }
    if params.get("response_mode").is_some_and(|m| m != "query") {
        return Err(invalid("only response_mode=query is supported"));
    }
    if !client.allows_grant("authorization_code") {
        return Err(RedirectError(
            "unauthorized_client",
            "this client may not use the authorization code flow".into(),
        ));
    }
    let mut scope: Vec<String> = Vec::new();
    for s in params
        .get("scope")
        .unwrap_or("")
        .split(' ')
        .filter(|s| !s.is_empty())
    {
        if !scope.iter().any(|x| x == s) {
            scope.push(s.to_string());
        }
    }
    if !scope.iter().any(|s| s == "openid") {
        return Err(RedirectError(
            "invalid_scope",
            "scope must include openid".into(),
        ));
    }
    if let Some(bad) = scope.iter().find(|s| !client.scopes.contains(s)) {
        return Err(RedirectError(
            "invalid_scope",
            format!("scope {bad} is not allowed for this client"),
        ));
    }
    if !client.may_use_offline_access() {
        scope.retain(|s| s != "offline_access");
    }
    request.scope = scope;
    match (
        params.get("code_challenge"),
        params.get("code_challenge_method"),
    ) {
        (Some(challenge), Some("S256")) => {
            let valid = (43..=128).contains(&challenge.len())
                && challenge
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
            if !valid {
                return Err(invalid("code_challenge is malformed"));
            }
            request.code_challenge = Some(challenge.to_string());
        }
        (Some(_), _) => return Err(invalid("code_challenge_method must be S256")),
        (None, Some(_)) => return Err(invalid("code_challenge_method without code_challenge")),
        (None, None) if client.is_public() => {
            return Err(invalid(
                "public clients must use PKCE (code_challenge with S256)",
            ))
        }
        (None, None) => {}
    }
    let prompt: Vec<String> = params
        .get("prompt")
        .unwrap_or("")
        .split(' ')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    if let Some(bad) = prompt
        .iter()
        .find(|p| !matches!(p.as_str(), "none" | "login" | "consent" | "select_account"))
    {
        return Err(invalid(format!("prompt value {bad} is not supported")));
    }
    if prompt.iter().any(|p| p == "none") && prompt.len() > 1 {
        return Err(invalid("prompt=none cannot be combined with other values"));
    }
    request.prompt = prompt;
    if let Some(max_age) = params.get("max_age") {
        match max_age.parse::<i64>() {
            Ok(v) if v >= 0 => request.max_age = Some(v),
            _ => return Err(invalid("max_age must be a non-negative integer")),
        }
    }
    request.acr_values = params
        .get("acr_values")
        .unwrap_or("")
        .split(' ')
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect();
    if let Some(claims) = params.get("claims") {
        match serde_json::from_str::<Value>(claims) {
            Ok(v) if v.is_object() => request.claims = Some(v),
            _ => return Err(invalid("claims must be a JSON object")),
        }
    }
    request.nonce = params.take("nonce");
    request.ui_locales = params.take("ui_locales");
    request.login_hint = params.take("login_hint");
    Ok(())
}

/// Issues a code for the request and redirects the browser to the client (303).
pub async fn issue_code(
    state: &AppState,
    request: &AuthRequest,
    session: &BrowserSession,
    account: &Account,
    level: Level,
    auth_time: Timestamp,
) -> Result<Response, PageError> {
    let now = state.clock.now();
    let code = random_token();
    let row = AuthorizationCode {
        digest: token_digest(&code),
        client_id: request.client_id.clone(),
        account_id: account.id.clone(),
        session_id: session.id.clone(),
        sid: session.sid.clone(),
        redirect_uri: request.redirect_uri.clone(),
        scope: request.scope.join(" "),
        claims_request: request.claims.as_ref().map(Value::to_string),
        nonce: request.nonce.clone(),
        code_challenge: request.code_challenge.clone(),
        acr: level.acr().to_string(),
        auth_time,
        claims: super::claims::snapshot(account).to_string(),
        created_at: now,
        expires_at: now + state.config.lifetimes.authorization_code.as_secs() as i64,
        consumed_at: None,
        grant_id: None,
        replayed_at: None,
    };
    state.store.insert_code(&row).await?;
    Ok(request
        .redirect_with(&state.config.issuer, &[("code", &code)])
        .into_response())
}

/// A pending request, checked to belong to this browser and still be open.
pub async fn load_transaction(
    state: &AppState,
    tx_id: &str,
    browser: &Browser,
) -> Result<(LoginTransaction, AuthRequest), PageError> {
    let tx = state
        .store
        .get_login_transaction(tx_id)
        .await?
        .filter(|tx| tx.completed_at.is_none() && tx.expires_at > state.clock.now())
        .filter(|tx| {
            crate::crypto::constant_time_eq(
                tx.browser_digest.as_bytes(),
                browser.digest().as_bytes(),
            )
        })
        .ok_or_else(PageError::expired)?;
    let request: AuthRequest = serde_json::from_str(&tx.request).map_err(PageError::internal)?;
    Ok((tx, request))
}
