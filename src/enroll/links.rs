//! One-time links (`/link/<token>`): 256 random bits, stored hashed, bound to one purpose and one
//! account, valid 30 minutes, superseded by a newer link of the same purpose, consumed by one
//! atomic statement. GET only shows a page (mail scanners follow links); POST consumes.
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use minijinja::context;

use super::{live_tx, login_url, read_form};
use crate::app::AppState;
use crate::auth::csrf::Browser;
use crate::clock::random_token;
use crate::crypto::token_digest;
use crate::error::PageError;
use crate::store::{Account, OneTimeLink};
use crate::ui::Locale;

pub const VERIFY_EMAIL: &str = "verify_email";
pub const CHANGE_EMAIL: &str = "change_email";
pub const RESET: &str = "reset";

/// What the mail for a link says and where it goes.
pub struct LinkMail<'a> {
    pub purpose: &'static str,
    pub to: &'a str,
    /// The address being registered (verify/change), if any.
    pub new_email: Option<&'a str>,
    pub template: &'static str,
    pub subject_key: &'static str,
}

/// Creates a link and queues its mail in one transaction (older links of the purpose die).
pub async fn create(
    state: &AppState,
    account: &Account,
    mail: LinkMail<'_>,
    locale: Locale,
    tx: Option<String>,
) -> Result<(), PageError> {
    let now = state.clock.now();
    let token = random_token();
    let lifetime = state.config.lifetimes.one_time_link.as_secs() as i64;
    let url = format!("{}/link/{token}", state.config.issuer);
    let ctx = context! {
        url => url,
        minutes => lifetime / 60,
        email => mail.new_email,
        username => account.username.clone(),
    };
    let (subject, text) = crate::mail::render(state, locale, mail.template, mail.subject_key, ctx)?;
    let job = crate::mail::job(state, mail.to, &subject, &text, now)?;
    let link = OneTimeLink {
        digest: token_digest(&token),
        purpose: mail.purpose.into(),
        account_id: account.id.clone(),
        email: mail.new_email.map(str::to_string),
        locale: locale.as_str().into(),
        login_transaction_id: tx,
        created_at: now,
        expires_at: now + lifetime,
        consumed_at: None,
        superseded_at: None,
    };
    state.store.insert_link_with_mail(&link, &job).await?;
    state.outbox_wakeup.notify_one();
    Ok(())
}

/// Why a link cannot be used, for the page that says so.
pub async fn invalid_reason(state: &AppState, digest: &str) -> Result<&'static str, PageError> {
    let now = state.clock.now();
    Ok(match state.store.find_link(digest).await? {
        None => "invalid",
        Some(link) if link.consumed_at.is_some() => "used",
        Some(link) if link.superseded_at.is_some() || link.expires_at <= now => "expired",
        Some(_) => "invalid",
    })
}

pub fn invalid_page(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    locale: Locale,
    reason: &str,
) -> Result<Response, PageError> {
    let status = if reason == "invalid" {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::GONE
    };
    state.page_with_status(
        status,
        locale,
        "link_invalid.html",
        context! { reason => reason },
        browser,
        headers,
    )
}

fn plausible(token: &str) -> bool {
    (20..=128).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A live link, or the page explaining why it is not.
pub async fn live(
    state: &AppState,
    token: &str,
) -> Result<Result<OneTimeLink, &'static str>, PageError> {
    if !plausible(token) {
        return Ok(Err("invalid"));
    }
    let digest = token_digest(token);
    let now = state.clock.now();
    match state.store.find_link(&digest).await? {
        Some(link)
            if link.consumed_at.is_none()
                && link.superseded_at.is_none()
                && link.expires_at > now =>
        {
            Ok(Ok(link))
        }
        _ => Ok(Err(invalid_reason(state, &digest).await?)),
    }
}

fn link_locale(
    state: &AppState,
    headers: &HeaderMap,
    lang: Option<&str>,
    link: Option<&OneTimeLink>,
) -> Locale {
    state.locale_for(headers, lang.or(link.map(|l| l.locale.as_str())), None)
}

#[derive(serde::Deserialize)]
pub struct LangQuery {
    lang: Option<String>,
}

pub async fn link_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(token): Path<String>,
    axum::extract::Query(query): axum::extract::Query<LangQuery>,
) -> Result<Response, PageError> {
    let browser = Browser::from_headers(&state, &headers);
    let link = match live(&state, &token).await? {
        Ok(link) => link,
        Err(reason) => {
            let locale = link_locale(&state, &headers, query.lang.as_deref(), None);
            return invalid_page(&state, &headers, &browser, locale, reason);
        }
    };
    let locale = link_locale(&state, &headers, query.lang.as_deref(), Some(&link));
    let action = format!("/link/{token}");
    if link.purpose == RESET {
        // The reset link's page is the form itself.
        return state.page(
            locale,
            "reset.html",
            context! { action => action, errors => Vec::<String>::new() },
            &browser,
            &headers,
        );
    }
    let ctx =
        context! { purpose => link.purpose.clone(), email => link.email.clone(), action => action };
    state.page(locale, "link_confirm.html", ctx, &browser, &headers)
}

pub async fn link_submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(token): Path<String>,
    connect: axum::extract::ConnectInfo<std::net::SocketAddr>,
    body: Bytes,
) -> Result<Response, PageError> {
    let (params, browser) = read_form(&state, &headers, &body)?;
    let link = match live(&state, &token).await? {
        Ok(link) => link,
        Err(reason) => {
            let locale = link_locale(&state, &headers, params.get("lang"), None);
            return invalid_page(&state, &headers, &browser, locale, reason);
        }
    };
    let locale = link_locale(&state, &headers, params.get("lang"), Some(&link));
    if link.purpose == RESET {
        return super::account::reset_submit(
            &state, &headers, &browser, locale, &token, link, &params, connect.0,
        )
        .await;
    }
    let now = state.clock.now();
    let Some(link) = state.store.consume_link(&link.digest, now).await? else {
        let reason = invalid_reason(&state, &token_digest(&token)).await?;
        return invalid_page(&state, &headers, &browser, locale, reason);
    };
    let account = state
        .store
        .get_account(&link.account_id)
        .await?
        .ok_or_else(PageError::not_found)?;
    let email = link.email.clone().unwrap_or_default();
    state
        .store
        .set_account_email(&account.id, &email, now)
        .await?;
    let tx = live_tx(&state, link.login_transaction_id.as_deref(), &browser).await;
    if link.purpose == CHANGE_EMAIL {
        if let Some(old) = account
            .email
            .as_deref()
            .filter(|old| *old != email && account.email_verified_at.is_some())
        {
            let ctx = context! {
                when => state.local_datetime(now),
                new_email_masked => crate::mail::mask_email(&email),
            };
            crate::mail::send(
                &state,
                locale,
                old,
                "email_changed_notice",
                "mail_subject_email_changed",
                ctx,
            )
            .await?;
        }
        state
            .audit(crate::audit::Event {
                kind: "email_change",
                account_id: Some(&account.id),
                outcome: "email changed",
                ..Default::default()
            })
            .await;
        let next = if super::signed_in(&state, &headers).await?.is_some() {
            "/account".to_string()
        } else {
            login_url(None)
        };
        return state.page(
            locale,
            "email_changed.html",
            context! { next_url => next },
            &browser,
            &headers,
        );
    }
    state
        .audit(crate::audit::Event {
            kind: "enrollment",
            account_id: Some(&account.id),
            outcome: "email verified",
            ..Default::default()
        })
        .await;
    state.page(
        locale,
        "email_registered.html",
        context! { login_url => login_url(tx.as_deref()) },
        &browser,
        &headers,
    )
}
