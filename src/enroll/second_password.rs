//! Second-password setup at first login (seed 2.2). The new password must differ from the
//! university password typed at the login that led here, compared through the short-lived hash
//! kept on the session (never the password itself).
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use minijinja::context;

use super::email::PageQuery;
use super::{live_tx, login_url, read_form, signed_in, Enrollment};
use crate::app::{see_other, AppState};
use crate::auth::csrf::Browser;
use crate::auth::second_password::{check, Violation};
use crate::error::PageError;
use crate::store::BrowserSession;
use crate::ui::Locale;

fn form(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    locale: Locale,
    tx: Option<String>,
    errors: Vec<&str>,
) -> Result<Response, PageError> {
    let status = super::errors_status(&errors);
    state.page_with_status(
        status,
        locale,
        "enroll_second_password.html",
        context! { tx => tx, errors => errors },
        browser,
        headers,
    )
}

/// Whether `candidate` is the university password of the last full login; None when that login
/// is older than 15 minutes (the hash is gone) and the student must sign in again.
pub async fn same_as_university(
    state: &AppState,
    session: &BrowserSession,
    candidate: &str,
) -> Option<bool> {
    let now = state.clock.now();
    let hash = session.university_password_hash.as_deref().filter(|_| {
        session
            .university_password_hash_until
            .is_some_and(|t| t > now)
    })?;
    Some(state.hasher.verify(Some(hash), candidate).await)
}

/// Forgets the short-lived hash once it has served.
pub async fn forget_university_hash(
    state: &AppState,
    session: &BrowserSession,
) -> Result<(), PageError> {
    let mut session = session.clone();
    session.university_password_hash = None;
    session.university_password_hash_until = None;
    state.store.update_session(&session).await?;
    Ok(())
}

/// The rules as catalog keys; `full_login_required` when the comparison is no longer possible.
pub async fn violations(
    state: &AppState,
    session: &BrowserSession,
    new: &str,
    confirmation: &str,
) -> Vec<&'static str> {
    let same = if new.is_empty() {
        Some(false)
    } else {
        same_as_university(state, session, new).await
    };
    let mut keys: Vec<&'static str> = check(new, confirmation, same.unwrap_or(false))
        .into_iter()
        .map(Violation::message_key)
        .collect();
    if same.is_none() {
        keys.push("full_login_required");
    }
    keys
}

pub async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Result<Response, PageError> {
    let browser = Browser::from_headers(&state, &headers);
    let tx = live_tx(&state, query.tx.as_deref(), &browser).await;
    let Some((_, account)) = signed_in(&state, &headers).await? else {
        return Ok(see_other(&login_url(tx.as_deref())));
    };
    if Enrollment::of(&account) != Enrollment::NeedsSecondPassword {
        return Ok(see_other(
            &Enrollment::of(&account)
                .page(tx.as_deref())
                .unwrap_or_else(|| "/account".into()),
        ));
    }
    let locale = state.locale_for(&headers, query.lang.as_deref(), None);
    form(&state, &headers, &browser, locale, tx, vec![])
}

pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PageError> {
    let (params, browser) = read_form(&state, &headers, &body)?;
    let tx = live_tx(&state, params.get("tx"), &browser).await;
    let locale = state.locale_for(&headers, params.get("lang"), None);
    let Some((session, account)) = signed_in(&state, &headers).await? else {
        return Ok(see_other(&login_url(tx.as_deref())));
    };
    if Enrollment::of(&account) != Enrollment::NeedsSecondPassword {
        return Ok(see_other(
            &Enrollment::of(&account)
                .page(tx.as_deref())
                .unwrap_or_else(|| "/account".into()),
        ));
    }
    let new = params.get("new_second_password").unwrap_or("");
    let confirmation = params.get("new_second_password_confirm").unwrap_or("");
    let errors = violations(&state, &session, new, confirmation).await;
    if !errors.is_empty() {
        return form(&state, &headers, &browser, locale, tx, errors);
    }
    let hash = state.hasher.hash(new).await;
    state
        .store
        .set_second_password(&account.id, &hash, state.clock.now())
        .await?;
    forget_university_hash(&state, &session).await?;
    state
        .audit(crate::audit::Event {
            kind: "enrollment",
            account_id: Some(&account.id),
            outcome: "second password set",
            ..Default::default()
        })
        .await;
    let ctx = context! { next_url => login_url(tx.as_deref()) };
    state.page(locale, "second_password_set.html", ctx, &browser, &headers)
}
