//! The students' login page (the seed's 在学生ログイン), the step-up page that asks only for the
//! second password, and the menu page a sign-in without a pending request leads to.
use axum::body::Bytes;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use minijinja::context;
use serde::Deserialize;

use super::csrf::Browser;
use super::levels::{decide, required_level, Decision, Level};
use super::normalize_username;
use super::session::{self, set_cookie, SESSION_COOKIE};
use super::throttle;
use crate::app::{see_other, AppState};
use crate::audit::Event;
use crate::clock::{random_bytes, random_id, random_token};
use crate::crypto::{b64url, token_digest};
use crate::directory::DirectoryError;
use crate::enroll::Enrollment;
use crate::error::PageError;
use crate::metrics;
use crate::oidc::authorize::{issue_code, load_transaction, AuthRequest};
use crate::store::{Account, BrowserSession, LoginTransaction};
use crate::ui::Locale;

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    tx: Option<String>,
    lang: Option<String>,
}

type Pending = Option<(LoginTransaction, AuthRequest)>;

/// Keeps the student's language across a redirect to our own pages.
pub fn with_lang(url: &str, locale: Locale) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}lang={}", locale.as_str())
}

/// How long the hash of the university password typed at a full login stays on the session.
pub const UNIVERSITY_HASH_LIFETIME: i64 = 15 * 60;

async fn pending(
    state: &AppState,
    tx: Option<&str>,
    browser: &Browser,
) -> Result<Pending, PageError> {
    match tx.filter(|t| !t.is_empty()) {
        Some(tx) => Ok(Some(load_transaction(state, tx, browser).await?)),
        None => Ok(None),
    }
}

fn page_locale(
    state: &AppState,
    headers: &HeaderMap,
    lang: Option<&str>,
    pending: &Pending,
) -> Locale {
    let ui_locales = pending.as_ref().and_then(|(_, r)| r.ui_locales.as_deref());
    state.locale_for(headers, lang, ui_locales)
}

#[allow(clippy::too_many_arguments)]
fn login_form(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    locale: Locale,
    pending: &Pending,
    username: Option<&str>,
    error: Option<&str>,
    status: StatusCode,
) -> Result<Response, PageError> {
    login_form_with_notice(
        state, headers, browser, locale, pending, username, error, status, None,
    )
}

#[allow(clippy::too_many_arguments)]
fn login_form_with_notice(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    locale: Locale,
    pending: &Pending,
    username: Option<&str>,
    error: Option<&str>,
    status: StatusCode,
    notice: Option<&str>,
) -> Result<Response, PageError> {
    let ctx = context! {
        tx => pending.as_ref().map(|(tx, _)| tx.id.clone()),
        username => username.map(str::to_string).or_else(|| pending.as_ref().and_then(|(_, r)| r.login_hint.clone())),
        error => error,
        notice => notice,
        password_change_url => state.config.password_change_url.clone(),
    };
    state.page_with_status(status, locale, "login.html", ctx, browser, headers)
}

pub async fn login_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Result<Response, PageError> {
    let browser = Browser::from_headers(&state, &headers);
    let pending = pending(&state, query.tx.as_deref(), &browser).await?;
    let locale = page_locale(&state, &headers, query.lang.as_deref(), &pending);
    // After an automatic logout, say so (the seed's notes promise it).
    let notice = session::timed_out(&state, &headers)
        .await?
        .then_some("session_expired");
    login_form_with_notice(
        &state,
        &headers,
        &browser,
        locale,
        &pending,
        None,
        None,
        StatusCode::OK,
        notice,
    )
}

pub async fn login_submit(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PageError> {
    let (params, browser) = crate::enroll::read_form(&state, &headers, &body)?;
    let pending = pending(&state, params.get("tx"), &browser).await?;
    let locale = page_locale(&state, &headers, params.get("lang"), &pending);
    let username = normalize_username(params.get("username").unwrap_or(""));
    let password = params.get("password").unwrap_or("");
    let second_password = params.get("second_password").unwrap_or("");
    let fail = |key: &str| {
        login_form(
            &state,
            &headers,
            &browser,
            locale,
            &pending,
            Some(&username),
            Some(key),
            StatusCode::OK,
        )
    };
    // An empty password is an unauthenticated bind to some directories: refuse it before asking.
    if username.is_empty() || password.is_empty() || username.len() > 256 || password.len() > 1024 {
        return fail("login_failed");
    }
    let ip = state.client_ip(&headers, peer);
    // Throttling comes before the directory; a refusal looks and takes like a wrong password.
    let audit = |outcome: &'static str, account_id: Option<String>, details: String| {
        let state = state.clone();
        async move {
            let event = Event {
                kind: "login",
                account_id: account_id.as_deref(),
                address: Some(ip.to_string()),
                outcome,
                details,
                ..Event::default()
            };
            state.audit(event).await;
        }
    };
    let Some(reservation) = throttle::reserve_university(&state, &username, ip).await? else {
        state.hasher.verify(None, password).await;
        metrics::login("throttled", "none");
        audit("refused: throttled", None, format!("user ID {username}")).await;
        return fail("login_failed");
    };
    let started = std::time::Instant::now();
    let answer = state.directory.authenticate(&username, password).await;
    let outcome = match &answer {
        Ok(_) => "ok",
        Err(DirectoryError::Unavailable(_)) => "unavailable",
        Err(_) => "refused",
    };
    metrics::directory(outcome, started.elapsed().as_secs_f64());
    let user = match answer {
        Ok(user) => user,
        Err(DirectoryError::InvalidCredentials | DirectoryError::Disabled) => {
            reservation.failed(&state).await?;
            metrics::login("wrong_password", "none");
            audit(
                "failed: university password",
                None,
                format!("user ID {username}"),
            )
            .await;
            return fail("login_failed");
        }
        Err(DirectoryError::PasswordExpired) => {
            reservation.succeeded(&state).await?;
            metrics::login("password_expired", "none");
            audit(
                "refused: university password expired",
                None,
                format!("user ID {username}"),
            )
            .await;
            return fail("password_expired");
        }
        Err(DirectoryError::Unavailable(why)) => {
            reservation.succeeded(&state).await?;
            metrics::login("directory_unavailable", "none");
            tracing::warn!(reason = %why, "directory unavailable at login");
            return Err(PageError::unavailable().in_locale(locale));
        }
    };
    let claims = serde_json::Value::Object(user.claims.clone()).to_string();
    let account = state
        .store
        .upsert_account(
            &user.id,
            &user.username,
            &claims,
            &random_id(),
            &b64url(&random_bytes::<16>()),
            state.clock.now(),
        )
        .await?;
    let enrolled = Enrollment::of(&account) == Enrollment::Done;
    let second_checked = match (&account.second_password_hash, second_password.is_empty()) {
        (Some(hash), false) if enrolled => {
            let Some(second) = throttle::reserve_second_password(&state, &account.id).await? else {
                // The university password was right, so the lock may be told, with the help desk.
                reservation.succeeded(&state).await?;
                metrics::login("locked", "none");
                audit(
                    "refused: second password locked",
                    Some(account.id.clone()),
                    String::new(),
                )
                .await;
                return locked_page(
                    &state,
                    &headers,
                    &browser,
                    locale,
                    &pending,
                    &account,
                    "login.html",
                )
                .await;
            };
            if !state.hasher.verify(Some(hash), second_password).await {
                reservation.succeeded(&state).await?;
                let locked = second.failed(&state).await?;
                metrics::login("wrong_second_password", "none");
                audit(
                    "failed: second password",
                    Some(account.id.clone()),
                    String::new(),
                )
                .await;
                if locked {
                    audit(
                        "lockout: second password",
                        Some(account.id.clone()),
                        String::new(),
                    )
                    .await;
                }
                return fail("login_failed");
            }
            second.succeeded_fully(&state).await?;
            true
        }
        _ => false,
    };
    reservation.succeeded_fully(&state).await?;
    let existing = session::current(&state, &headers).await?;
    let existing = match existing {
        Some(old) if old.account_id != account.id => {
            // Another student signs in on this browser: the previous one is logged out everywhere.
            crate::oidc::logout::end_session(&state, &old).await?;
            None
        }
        other => other,
    };
    // Kept 15 minutes for the "differs from the university password" rule; never the password.
    let university_hash = (
        state.hasher.hash_short_lived(password).await,
        state.clock.now() + UNIVERSITY_HASH_LIFETIME,
    );
    let (session, cookie, _) = session::sign_in(
        &state,
        existing,
        &account.id,
        second_checked,
        university_hash,
    )
    .await?;
    let level = if second_checked {
        "second-password"
    } else {
        "password"
    };
    metrics::login("success", level);
    audit(
        "success",
        Some(account.id.clone()),
        format!("level {level}"),
    )
    .await;
    signed_in_response(&state, pending, &session, &account, locale, &cookie).await
}

/// The response after a login or step-up: where to go next, with the new session cookie.
async fn signed_in_response(
    state: &AppState,
    pending: Pending,
    session: &BrowserSession,
    account: &Account,
    locale: Locale,
    cookie: &str,
) -> Result<Response, PageError> {
    let mut response = continue_after_login(state, pending, session, account, locale).await?;
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state, SESSION_COOKIE, cookie, None),
    );
    Ok(response)
}

/// After a successful check: finish the pending request, ask for the step-up, or open the menu.
async fn continue_after_login(
    state: &AppState,
    pending: Pending,
    session: &BrowserSession,
    account: &Account,
    locale: Locale,
) -> Result<Response, PageError> {
    let enrollment = Enrollment::of(account);
    let Some((tx, request)) = pending else {
        return Ok(see_other(
            &enrollment
                .page(None)
                .map(|p| with_lang(&p, locale))
                .unwrap_or_else(|| "/account".into()),
        ));
    };
    let client = crate::oidc::clients::find(state, &request.client_id)
        .await
        .map_err(|_| PageError::internal("client lookup failed"))?
        .ok_or_else(PageError::expired)?;
    let needs_second = required_level(&client, &request) == Level::SecondPassword;
    if let Some(page) = enrollment
        .page(Some(&tx.id))
        .filter(|_| crate::enroll::required(state, needs_second))
    {
        // No authorization completes until enrollment is finished.
        return Ok(see_other(&with_lang(&page, locale)));
    }
    let now = state.clock.now();
    match decide(
        state,
        &client,
        &request,
        Some(session),
        Some(tx.created_at),
        now,
    ) {
        Decision::Issue { level, auth_time } => {
            if !state.store.complete_login_transaction(&tx.id, now).await? {
                return Err(PageError::expired());
            }
            issue_code(state, &request, session, account, level, auth_time).await
        }
        Decision::StepUp | Decision::Login => {
            Ok(see_other(&format!("/login/step-up?tx={}", tx.id)))
        }
    }
}

fn step_up_form(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    locale: Locale,
    pending: &Pending,
    account: &Account,
    error: Option<&str>,
) -> Result<Response, PageError> {
    let ctx = context! {
        tx => pending.as_ref().map(|(tx, _)| tx.id.clone()),
        username => account.username.clone(),
        error => error,
    };
    state.page(locale, "step_up.html", ctx, browser, headers)
}

pub async fn step_up_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Result<Response, PageError> {
    let browser = Browser::from_headers(&state, &headers);
    let pending = pending(&state, query.tx.as_deref(), &browser).await?;
    let Some((_, account)) = crate::enroll::signed_in(&state, &headers).await? else {
        let target = match &pending {
            Some((tx, _)) => format!("/login?tx={}", tx.id),
            None => "/login".into(),
        };
        return Ok(see_other(&target));
    };
    // A student without a second password yet finishes enrollment instead.
    if let Some(page) =
        Enrollment::of(&account).page(pending.as_ref().map(|(tx, _)| tx.id.as_str()))
    {
        return Ok(see_other(&page));
    }
    let locale = page_locale(&state, &headers, query.lang.as_deref(), &pending);
    step_up_form(&state, &headers, &browser, locale, &pending, &account, None)
}

pub async fn step_up_submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PageError> {
    let (params, browser) = crate::enroll::read_form(&state, &headers, &body)?;
    let pending = pending(&state, params.get("tx"), &browser).await?;
    let locale = page_locale(&state, &headers, params.get("lang"), &pending);
    let Some((mut session, account)) = crate::enroll::signed_in(&state, &headers).await? else {
        return Ok(see_other("/login"));
    };
    if let Some(page) =
        Enrollment::of(&account).page(pending.as_ref().map(|(tx, _)| tx.id.as_str()))
    {
        return Ok(see_other(&page));
    }
    let second_password = params.get("second_password").unwrap_or("");
    if second_password.is_empty() {
        return step_up_form(
            &state,
            &headers,
            &browser,
            locale,
            &pending,
            &account,
            Some("second_password_empty"),
        );
    }
    let Some(reservation) = throttle::reserve_second_password(&state, &account.id).await? else {
        return locked_page(
            &state,
            &headers,
            &browser,
            locale,
            &pending,
            &account,
            "step_up.html",
        )
        .await;
    };
    if !state
        .hasher
        .verify(account.second_password_hash.as_deref(), second_password)
        .await
    {
        let locked = reservation.failed(&state).await?;
        metrics::step_up("failure");
        state
            .audit(Event {
                kind: "step_up",
                account_id: Some(&account.id),
                outcome: if locked {
                    "failed; second password locked"
                } else {
                    "failed"
                },
                ..Event::default()
            })
            .await;
        return step_up_form(
            &state,
            &headers,
            &browser,
            locale,
            &pending,
            &account,
            Some("login_failed"),
        );
    }
    reservation.succeeded_fully(&state).await?;
    metrics::step_up("success");
    state
        .audit(Event {
            kind: "step_up",
            account_id: Some(&account.id),
            outcome: "success",
            ..Event::default()
        })
        .await;
    let now = state.clock.now();
    let cookie = random_token();
    session.cookie_digest = token_digest(&cookie);
    session.second_password_at = Some(now);
    session.last_seen_at = now;
    state.store.update_session(&session).await?;
    signed_in_response(&state, pending, &session, &account, locale, &cookie).await
}

/// The second-password level is locked: say until when, with the help desk (shown only after the
/// university password was right, or inside a signed-in session).
async fn locked_page(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    locale: Locale,
    pending: &Pending,
    account: &Account,
    template: &str,
) -> Result<Response, PageError> {
    let until = throttle::second_password_locked_until(state, &account.id)
        .await?
        .map(|t| state.local_time(t))
        .unwrap_or_default();
    let ctx = context! {
        tx => pending.as_ref().map(|(tx, _)| tx.id.clone()),
        username => account.username.clone(),
        error => "locked",
        until => until,
        password_change_url => state.config.password_change_url.clone(),
    };
    state.page_with_status(
        StatusCode::TOO_MANY_REQUESTS,
        locale,
        template,
        ctx,
        browser,
        headers,
    )
}

/// The menu (gear) page. It needs the second password entered within `menu_reauth`.
pub async fn account_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Result<Response, PageError> {
    let (_, account) = match crate::enroll::account::menu_session(&state, &headers).await? {
        Ok(found) => found,
        Err(redirect) => return Ok(redirect),
    };
    let browser = Browser::from_headers(&state, &headers);
    let locale = state.locale_for(&headers, query.lang.as_deref(), None);
    let claims: serde_json::Value = serde_json::from_str(&account.claims).unwrap_or_default();
    let ctx = context! {
        menu => true,
        username => account.username.clone(),
        display_name => claims.get("name").and_then(|v| v.as_str()).map(str::to_string),
        email => account.email.clone(),
    };
    state.page(locale, "account.html", ctx, &browser, &headers)
}
