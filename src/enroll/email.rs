//! Email registration at first login (seed 2.1): the address twice, then a mail with a one-time
//! link; the registration completes when the link is confirmed.
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use minijinja::context;
use serde::Deserialize;

use super::links::{self, LinkMail};
use super::{email_errors, live_tx, normalize_email, read_form, signed_in, Enrollment};
use crate::app::{see_other, AppState};
use crate::auth::csrf::Browser;
use crate::error::PageError;
use crate::ui::Locale;

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    pub tx: Option<String>,
    pub lang: Option<String>,
}

pub fn form(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    locale: Locale,
    tx: Option<String>,
    email: Option<&str>,
    errors: Vec<&str>,
) -> Result<Response, PageError> {
    let status = super::errors_status(&errors);
    let ctx = context! {
        tx => tx,
        email => email,
        errors => errors,
        mail_from => state.config.mail.from.clone(),
    };
    state.page_with_status(status, locale, "enroll_email.html", ctx, browser, headers)
}

pub async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Result<Response, PageError> {
    let browser = Browser::from_headers(&state, &headers);
    let tx = live_tx(&state, query.tx.as_deref(), &browser).await;
    let Some((_, account)) = signed_in(&state, &headers).await? else {
        return Ok(see_other(&super::login_url(tx.as_deref())));
    };
    if Enrollment::of(&account) != Enrollment::NeedsEmail {
        return Ok(see_other(
            &Enrollment::of(&account)
                .page(tx.as_deref())
                .unwrap_or_else(|| "/account".into()),
        ));
    }
    let locale = state.locale_for(&headers, query.lang.as_deref(), None);
    form(&state, &headers, &browser, locale, tx, None, vec![])
}

pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PageError> {
    let (params, browser) = read_form(&state, &headers, &body)?;
    let tx = live_tx(&state, params.get("tx"), &browser).await;
    let locale = state.locale_for(&headers, params.get("lang"), None);
    let Some((_, account)) = signed_in(&state, &headers).await? else {
        return Ok(see_other(&super::login_url(tx.as_deref())));
    };
    if Enrollment::of(&account) != Enrollment::NeedsEmail {
        return Ok(see_other(
            &Enrollment::of(&account)
                .page(tx.as_deref())
                .unwrap_or_else(|| "/account".into()),
        ));
    }
    let email = normalize_email(params.get("email").unwrap_or(""));
    let confirmation = normalize_email(params.get("email_confirm").unwrap_or(""));
    let errors = email_errors(&state, &email, &confirmation);
    if !errors.is_empty() {
        return form(&state, &headers, &browser, locale, tx, Some(&email), errors);
    }
    let mail = LinkMail {
        purpose: links::VERIFY_EMAIL,
        to: &email,
        new_email: Some(&email),
        template: "verify_email",
        subject_key: "mail_subject_verify_email",
    };
    links::create(&state, &account, mail, locale, tx).await?;
    state
        .audit(crate::audit::Event {
            kind: "enrollment",
            account_id: Some(&account.id),
            outcome: "email link sent",
            ..Default::default()
        })
        .await;
    sent_page(&state, &headers, &browser, locale, "verify_email")
}

pub fn sent_page(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    locale: Locale,
    purpose: &str,
) -> Result<Response, PageError> {
    let ctx = context! {
        purpose => purpose,
        minutes => state.config.lifetimes.one_time_link.as_secs() / 60,
        mail_from => state.config.mail.from.clone(),
    };
    state.page(locale, "email_sent.html", ctx, browser, headers)
}
