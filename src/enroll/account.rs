//! The menu's changes (seed 2.4 (a)(b)), the forgotten second password (2.4 (c)), the manual
//! (3.1) and the development mailbox.
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use minijinja::context;

use super::email::{sent_page, PageQuery};
use super::links::{self, LinkMail};
use super::second_password::{forget_university_hash, violations};
use super::{email_errors, errors_status, normalize_email, read_form, signed_in, Enrollment};
use crate::app::{see_other, AppState};
use crate::auth::csrf::Browser;
use crate::auth::second_password::{check, Violation};
use crate::auth::{normalize_username, throttle};
use crate::directory::DirectoryError;
use crate::error::PageError;
use crate::oidc::params::Params;
use crate::store::{Account, BrowserSession, OneTimeLink};
use crate::ui::Locale;

/// Reset is refused this long after an email change (a stolen mailbox must not take over).
const RESET_AFTER_EMAIL_CHANGE: i64 = 72 * 3600;

/// The menu needs an enrolled student with the second password entered within `menu_reauth`.
pub async fn menu_session(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Result<(BrowserSession, Account), Response>, PageError> {
    let Some((session, account)) = signed_in(state, headers).await? else {
        return Ok(Err(see_other("/login")));
    };
    if let Some(page) = Enrollment::of(&account).page(None) {
        return Ok(Err(see_other(&page)));
    }
    let reauth = state.config.session.menu_reauth.as_secs() as i64;
    let now = state.clock.now();
    if session.second_password_at.is_none_or(|t| now - t > reauth) {
        return Ok(Err(see_other("/login/step-up")));
    }
    Ok(Ok((session, account)))
}

fn email_form(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    locale: Locale,
    email: Option<&str>,
    errors: Vec<&str>,
) -> Result<Response, PageError> {
    let ctx = context! { menu => true, email => email, errors => errors.clone(), mail_from => state.config.mail.from.clone() };
    state.page_with_status(
        errors_status(&errors),
        locale,
        "account_email.html",
        ctx,
        browser,
        headers,
    )
}

pub async fn email_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Result<Response, PageError> {
    if let Err(redirect) = menu_session(&state, &headers).await? {
        return Ok(redirect);
    }
    let browser = Browser::from_headers(&state, &headers);
    let locale = state.locale_for(&headers, query.lang.as_deref(), None);
    email_form(&state, &headers, &browser, locale, None, vec![])
}

/// Checks the current second password (counted toward the lockout); Err holds the error key.
async fn check_current(
    state: &AppState,
    account: &Account,
    typed: &str,
) -> Result<Result<(), &'static str>, PageError> {
    let Some(reservation) = throttle::reserve_second_password(state, &account.id).await? else {
        return Ok(Err("locked"));
    };
    if !typed.is_empty()
        && state
            .hasher
            .verify(account.second_password_hash.as_deref(), typed)
            .await
    {
        reservation.succeeded_fully(state).await?;
        Ok(Ok(()))
    } else {
        reservation.failed(state).await?;
        Ok(Err("rule_current_wrong"))
    }
}

pub async fn email_submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PageError> {
    let (params, browser) = read_form(&state, &headers, &body)?;
    let locale = state.locale_for(&headers, params.get("lang"), None);
    let (_, account) = match menu_session(&state, &headers).await? {
        Ok(found) => found,
        Err(redirect) => return Ok(redirect),
    };
    let email = normalize_email(params.get("email").unwrap_or(""));
    let confirmation = normalize_email(params.get("email_confirm").unwrap_or(""));
    let mut errors = email_errors(&state, &email, &confirmation);
    if errors.is_empty() && account.email.as_deref() == Some(email.as_str()) {
        errors.push("email_same_as_current");
    }
    if let Err(key) = check_current(
        &state,
        &account,
        params.get("current_second_password").unwrap_or(""),
    )
    .await?
    {
        errors.push(key);
    }
    if !errors.is_empty() {
        return email_form(&state, &headers, &browser, locale, Some(&email), errors);
    }
    let mail = LinkMail {
        purpose: links::CHANGE_EMAIL,
        to: &email,
        new_email: Some(&email),
        template: "change_email",
        subject_key: "mail_subject_change_email",
    };
    links::create(&state, &account, mail, locale, None).await?;
    sent_page(&state, &headers, &browser, locale, "change_email")
}

fn second_password_form(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    locale: Locale,
    errors: Vec<&str>,
) -> Result<Response, PageError> {
    let ctx = context! { menu => true, errors => errors.clone() };
    state.page_with_status(
        errors_status(&errors),
        locale,
        "account_second_password.html",
        ctx,
        browser,
        headers,
    )
}

pub async fn second_password_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Result<Response, PageError> {
    if let Err(redirect) = menu_session(&state, &headers).await? {
        return Ok(redirect);
    }
    let browser = Browser::from_headers(&state, &headers);
    let locale = state.locale_for(&headers, query.lang.as_deref(), None);
    second_password_form(&state, &headers, &browser, locale, vec![])
}

pub async fn second_password_submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PageError> {
    let (params, browser) = read_form(&state, &headers, &body)?;
    let locale = state.locale_for(&headers, params.get("lang"), None);
    let (session, account) = match menu_session(&state, &headers).await? {
        Ok(found) => found,
        Err(redirect) => return Ok(redirect),
    };
    let new = params.get("new_second_password").unwrap_or("");
    let confirmation = params.get("new_second_password_confirm").unwrap_or("");
    let mut errors = Vec::new();
    if let Err(key) = check_current(
        &state,
        &account,
        params.get("current_second_password").unwrap_or(""),
    )
    .await?
    {
        errors.push(key);
    }
    errors.extend(violations(&state, &session, new, confirmation).await);
    if !errors.is_empty() {
        return second_password_form(&state, &headers, &browser, locale, errors);
    }
    let now = state.clock.now();
    let hash = state.hasher.hash(new).await;
    state
        .store
        .set_second_password(&account.id, &hash, now)
        .await?;
    forget_university_hash(&state, &session).await?;
    notify_second_password_changed(&state, &account, locale, now).await?;
    state
        .audit(crate::audit::Event {
            kind: "second_password_change",
            account_id: Some(&account.id),
            outcome: "changed",
            ..Default::default()
        })
        .await;
    state.page(
        locale,
        "second_password_changed.html",
        context! { next_url => "/account" },
        &browser,
        &headers,
    )
}

/// The notice goes to the registered address, and to the previous one after a recent change.
async fn notify_second_password_changed(
    state: &AppState,
    account: &Account,
    locale: Locale,
    now: i64,
) -> Result<(), PageError> {
    let mut recipients: Vec<&str> = account.email.as_deref().into_iter().collect();
    if let (Some(previous), Some(changed)) =
        (account.previous_email.as_deref(), account.email_changed_at)
    {
        if now - changed <= RESET_AFTER_EMAIL_CHANGE * 10 && !recipients.contains(&previous) {
            recipients.push(previous);
        }
    }
    for to in recipients {
        let ctx = context! { when => state.local_datetime(now) };
        crate::mail::send(
            state,
            locale,
            to,
            "second_password_changed_notice",
            "mail_subject_second_password_changed",
            ctx,
        )
        .await?;
    }
    Ok(())
}

fn forgot_form(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    locale: Locale,
    email: Option<&str>,
    errors: Vec<&str>,
) -> Result<Response, PageError> {
    let ctx = context! { errors => errors.clone(), email => email, mail_from => state.config.mail.from.clone() };
    state.page_with_status(
        errors_status(&errors),
        locale,
        "forgot.html",
        ctx,
        browser,
        headers,
    )
}

pub async fn forgot_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Result<Response, PageError> {
    let browser = Browser::from_headers(&state, &headers);
    let locale = state.locale_for(&headers, query.lang.as_deref(), None);
    forgot_form(&state, &headers, &browser, locale, None, vec![])
}

/// The same "sent" page whether or not the address is registered.
pub async fn forgot_submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PageError> {
    let (params, browser) = read_form(&state, &headers, &body)?;
    let locale = state.locale_for(&headers, params.get("lang"), None);
    let email = normalize_email(params.get("email").unwrap_or(""));
    if email.is_empty() || !super::email_is_valid(&email) {
        let key = if email.is_empty() {
            "email_required"
        } else {
            "email_invalid"
        };
        return forgot_form(&state, &headers, &browser, locale, Some(&email), vec![key]);
    }
    let now = state.clock.now();
    for account in state.store.find_accounts_by_email(&email).await? {
        if account
            .email_changed_at
            .is_some_and(|t| now - t < RESET_AFTER_EMAIL_CHANGE)
            || account.second_password_hash.is_none()
        {
            continue;
        }
        let mail = LinkMail {
            purpose: links::RESET,
            to: &email,
            new_email: None,
            template: "reset",
            subject_key: "mail_subject_reset",
        };
        links::create(&state, &account, mail, locale, None).await?;
    }
    sent_page(&state, &headers, &browser, locale, "reset")
}

/// POST of a reset link: university ID and password (must be the link's account), the new second
/// password twice. The link is consumed only when everything succeeded.
#[allow(clippy::too_many_arguments)]
pub async fn reset_submit(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    locale: Locale,
    token: &str,
    link: OneTimeLink,
    params: &Params,
    peer: SocketAddr,
) -> Result<Response, PageError> {
    let action = format!("/link/{token}");
    let form = |errors: Vec<&str>| {
        let ctx = context! { action => action.clone(), errors => errors.clone() };
        state.page_with_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            locale,
            "reset.html",
            ctx,
            browser,
            headers,
        )
    };
    let username = normalize_username(params.get("username").unwrap_or(""));
    let password = params.get("password").unwrap_or("");
    let new = params.get("new_second_password").unwrap_or("");
    let confirmation = params.get("new_second_password_confirm").unwrap_or("");
    if username.is_empty() || password.is_empty() {
        return form(vec!["reset_wrong_account_or_password"]);
    }
    let ip = state.client_ip(headers, peer);
    let Some(reservation) = throttle::reserve_university(state, &username, ip).await? else {
        state.hasher.verify(None, password).await;
        return form(vec!["reset_wrong_account_or_password"]);
    };
    let account = state
        .store
        .get_account(&link.account_id)
        .await?
        .ok_or_else(PageError::not_found)?;
    match state.directory.authenticate(&username, password).await {
        Ok(user) if user.id == account.directory_id => {}
        Ok(_)
        | Err(
            DirectoryError::InvalidCredentials
            | DirectoryError::Disabled
            | DirectoryError::PasswordExpired,
        ) => {
            reservation.failed(state).await?;
            return form(vec!["reset_wrong_account_or_password"]);
        }
        Err(DirectoryError::Unavailable(why)) => {
            reservation.succeeded(state).await?;
            tracing::warn!(reason = %why, "directory unavailable at reset");
            return Err(PageError::unavailable().in_locale(locale));
        }
    };
    reservation.succeeded(state).await?;
    let now = state.clock.now();
    if account
        .email_changed_at
        .is_some_and(|t| now - t < RESET_AFTER_EMAIL_CHANGE)
    {
        return form(vec!["reset_refused_recent_email_change"]);
    }
    let errors: Vec<&str> = check(new, confirmation, new == password)
        .into_iter()
        .map(Violation::message_key)
        .collect();
    if !errors.is_empty() {
        return form(errors);
    }
    let Some(_) = state.store.consume_link(&link.digest, now).await? else {
        let reason = links::invalid_reason(state, &link.digest).await?;
        return links::invalid_page(state, headers, browser, locale, reason);
    };
    let hash = state.hasher.hash(new).await;
    state
        .store
        .set_second_password(&account.id, &hash, now)
        .await?;
    // Proof of the university password and the mailbox lifts a second-password lock.
    state
        .store
        .throttle_clear(&format!("second:{}", account.id))
        .await?;
    notify_second_password_changed(state, &account, locale, now).await?;
    state
        .audit(crate::audit::Event {
            kind: "second_password_reset",
            account_id: Some(&account.id),
            outcome: "reset by email link",
            ..Default::default()
        })
        .await;
    state.page(locale, "reset_done.html", context! {}, browser, headers)
}

pub async fn manual(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Result<Response, PageError> {
    if state.config.manual_url != "/manual" {
        return Ok(see_other(&state.config.manual_url));
    }
    let browser = Browser::from_headers(&state, &headers);
    let locale = state.locale_for(&headers, query.lang.as_deref(), None);
    let menu = signed_in(&state, &headers).await?.is_some();
    state.page(
        locale,
        "manual.html",
        context! { menu => menu },
        &browser,
        &headers,
    )
}

/// `/dev/mail`: the local mailbox of a development instance (file transport only).
pub async fn dev_mail(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let browser = Browser::from_headers(&state, &headers);
    let locale = state.locale_for(&headers, None, None);
    let mut mails = Vec::new();
    let dir = &state.config.mail.path;
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.retain(|p| p.extension().is_some_and(|e| e == "eml"));
    names.sort();
    names.reverse();
    for path in names.into_iter().take(50) {
        let Ok(raw) = std::fs::read_to_string(&path) else {
            continue;
        };
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let head = head.replace("\r\n ", " ").replace("\r\n\t", " ");
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| decode_header(v.trim()))
                .unwrap_or_default()
        };
        mails.push(context! {
            id => path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default(),
            to => header("To: "),
            subject => header("Subject: "),
            created => header("Date: "),
            body => body.replace("\r\n", "\n"),
        });
    }
    state.page(
        locale,
        "dev_mail.html",
        context! { mails => mails },
        &browser,
        &headers,
    )
}

/// Decodes RFC 2047 `=?utf-8?b?…?=` words, as lettre writes non-ASCII subjects.
fn decode_header(value: &str) -> String {
    value
        .split_whitespace()
        .map(|word| {
            let inner = word
                .strip_prefix("=?utf-8?b?")
                .or_else(|| word.strip_prefix("=?UTF-8?B?"));
            match inner
                .and_then(|w| w.strip_suffix("?="))
                .and_then(crate::crypto::b64_decode)
            {
                Some(bytes) => String::from_utf8_lossy(&bytes).to_string(),
                None => format!("{word} "),
            }
        })
        .collect::<String>()
        .trim()
        .to_string()
}
