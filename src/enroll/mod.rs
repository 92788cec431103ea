//! Enrollment and recovery as in the seed: email registration, second-password setup, the menu's
//! email and second-password changes, the forgotten second password, and the one-time links that
//! carry them.
pub mod account;
pub mod email;
pub mod import;
pub mod links;
pub mod second_password;

use axum::body::Bytes;
use axum::http::HeaderMap;
use unicode_normalization::UnicodeNormalization;

use crate::app::AppState;
use crate::auth::csrf::{self, Browser};
use crate::auth::session;
use crate::error::PageError;
use crate::oidc::params::{is_form, Params};
use crate::store::{Account, BrowserSession};

/// What the student still has to do before any authorization completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrollment {
    NeedsEmail,
    NeedsSecondPassword,
    Done,
}

impl Enrollment {
    pub fn of(account: &Account) -> Enrollment {
        if account.email_verified_at.is_none() {
            Enrollment::NeedsEmail
        } else if account.second_password_hash.is_none() {
            Enrollment::NeedsSecondPassword
        } else {
            Enrollment::Done
        }
    }

    /// The page of the missing step, keeping the pending request.
    pub fn page(self, tx: Option<&str>) -> Option<String> {
        let path = match self {
            Enrollment::NeedsEmail => "/enroll/email",
            Enrollment::NeedsSecondPassword => "/enroll/second-password",
            Enrollment::Done => return None,
        };
        Some(match tx {
            Some(tx) => format!("{path}?tx={tx}"),
            None => path.to_string(),
        })
    }
}

/// Whether enrollment must be finished before this sign-in can complete: always (the seed's
/// behaviour), or with `enrollment = "on-demand"` only when the second-password level is needed.
pub fn required(state: &AppState, needs_second_password: bool) -> bool {
    state.config.enrollment == "always" || needs_second_password
}

/// Emails get NFKC and trimming before validation and before comparing with the confirmation.
pub fn normalize_email(raw: &str) -> String {
    raw.nfkc().collect::<String>().trim().to_string()
}

/// A plain syntax check; the real proof is the mail that arrives.
pub fn email_is_valid(email: &str) -> bool {
    let Some((local, domain)) = email.rsplit_once('@') else {
        return false;
    };
    email.len() <= 254
        && email.is_ascii()
        && !local.is_empty()
        && !local.contains('@')
        && local.len() <= 64
        && !email
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>()[],;:\\\"".contains(c))
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The allow/deny lists of `[mail]` (a domain matches itself and its subdomains).
pub fn domain_allowed(state: &AppState, email: &str) -> bool {
    let domain = email
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default();
    let matches = |rule: &String| {
        let rule = rule.trim_start_matches('@').to_ascii_lowercase();
        domain == rule || domain.ends_with(&format!(".{rule}"))
    };
    let mail = &state.config.mail;
    !mail.deny_domains.iter().any(matches)
        && (mail.allow_domains.is_empty() || mail.allow_domains.iter().any(matches))
}

/// The broken rules of an email + confirmation pair, as catalog keys.
pub fn email_errors(state: &AppState, email: &str, confirmation: &str) -> Vec<&'static str> {
    let mut errors = Vec::new();
    if email.is_empty() {
        errors.push("email_required");
    } else if !email_is_valid(email) {
        errors.push("email_invalid");
    } else if !domain_allowed(state, email) {
        errors.push("email_domain_not_allowed");
    }
    if email != confirmation {
        errors.push("email_mismatch");
    }
    errors
}

/// A form page answers 422 while it shows broken rules, 200 otherwise.
pub fn errors_status(errors: &[&str]) -> axum::http::StatusCode {
    if errors.is_empty() {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::UNPROCESSABLE_ENTITY
    }
}

/// A form post: parsed, CSRF-checked.
pub fn read_form(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Params, Browser), PageError> {
    if !is_form(headers) {
        return Err(PageError::bad_request(
            "error_invalid_request",
            "form expected",
        ));
    }
    let params = Params::parse(body)
        .map_err(|e| PageError::bad_request("error_invalid_request", e.describe()))?;
    let browser = csrf::verify(state, headers, params.get("csrf").unwrap_or(""))
        .ok_or_else(PageError::csrf)?;
    Ok((params, browser))
}

/// The signed-in student (restarting the idle timer), or None.
pub async fn signed_in(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(BrowserSession, Account)>, PageError> {
    let Some(session) = session::current(state, headers).await? else {
        return Ok(None);
    };
    state
        .store
        .touch_session(&session.id, state.clock.now())
        .await?;
    Ok(state
        .store
        .get_account(&session.account_id)
        .await?
        .map(|a| (session, a)))
}

/// `tx` when it names a pending request of this browser, for links back to the login page.
pub async fn live_tx(state: &AppState, tx: Option<&str>, browser: &Browser) -> Option<String> {
    let tx = tx.filter(|t| !t.is_empty())?;
    crate::oidc::authorize::load_transaction(state, tx, browser)
        .await
        .ok()
        .map(|(tx, _)| tx.id)
}

pub fn login_url(tx: Option<&str>) -> String {
    match tx {
        Some(tx) => format!("/login?tx={tx}"),
        None => "/login".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            normalize_email(" ａｂｃ@example.ac.jp "),
            "abc@example.ac.jp"
        );
        assert!(email_is_valid("taro.gakusei+x@mail.example.ac.jp"));
        assert!(!email_is_valid("taro@localhost"));
        assert!(!email_is_valid("taro@@example.jp"));
        assert!(!email_is_valid("ta ro@example.jp"));
        assert!(!email_is_valid("@example.jp"));
        assert!(!email_is_valid("taro@example..jp"));
        assert!(!email_is_valid("太郎@example.jp"));
    }
}
