//! Browser sessions and the cookies that carry them. The cookie holds a random value; the store
//! keeps its digest. The value changes at every login and step-up; the public `sid` stays while
//! the same student is signed in.
use axum::http::{header, HeaderMap, HeaderValue};

use crate::app::AppState;
use crate::clock::{random_id, random_token, Timestamp};
use crate::crypto::token_digest;
use crate::store::{BrowserSession, StoreResult};

pub const SESSION_COOKIE: &str = "nidan_session";
pub const BROWSER_COOKIE: &str = "nidan_browser";

/// `__Host-` prefixed names on https (with `Secure`), plain names on a loopback http issuer.
pub fn cookie_name(state: &AppState, base: &str) -> String {
    if state.config.is_https() {
        format!("__Host-{base}")
    } else {
        base.to_string()
    }
}

pub fn read_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty() && v.len() <= 256)
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Lax, Path=/, Secure on https; `max_age` None = browser session.
pub fn set_cookie(state: &AppState, base: &str, value: &str, max_age: Option<i64>) -> HeaderValue {
    let mut cookie = format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Lax",
        cookie_name(state, base)
    );
    if state.config.is_https() {
        cookie.push_str("; Secure");
    }
    if let Some(age) = max_age {
        cookie.push_str(&format!("; Max-Age={age}"));
    }
    HeaderValue::from_str(&cookie).expect("cookie values are base64url")
}

pub fn clear_cookie(state: &AppState, base: &str) -> HeaderValue {
    set_cookie(state, base, "", Some(0))
}

impl BrowserSession {
    /// Neither ended nor past its idle or absolute limit.
    pub fn is_active(&self, state: &AppState, now: Timestamp) -> bool {
        let idle = state.config.session.idle_timeout.as_secs() as i64;
        self.ended_at.is_none() && now < self.expires_at && now - self.last_seen_at < idle
    }
}

/// The browser's active session, if its cookie names one.
pub async fn current(state: &AppState, headers: &HeaderMap) -> StoreResult<Option<BrowserSession>> {
    let Some(cookie) = read_cookie(headers, &cookie_name(state, SESSION_COOKIE)) else {
        return Ok(None);
    };
    let session = state
        .store
        .find_session_by_cookie(&token_digest(&cookie))
        .await?;
    let now = state.clock.now();
    Ok(session.filter(|s| s.is_active(state, now)))
}

/// True when the browser's cookie names a session that timed out (idle or absolute) rather than
/// one the student ended: the login page then says why the student was logged out.
pub async fn timed_out(state: &AppState, headers: &HeaderMap) -> StoreResult<bool> {
    let Some(cookie) = read_cookie(headers, &cookie_name(state, SESSION_COOKIE)) else {
        return Ok(false);
    };
    let session = state
        .store
        .find_session_by_cookie(&token_digest(&cookie))
        .await?;
    let now = state.clock.now();
    Ok(session.is_some_and(|s| s.ended_at.is_none() && !s.is_active(state, now)))
}

/// Signs `account_id` in after a university-password check: the same session (same `sid`) with a
/// new cookie value when the same student was signed in, otherwise a new session. Returns the
/// session, the new cookie value and the session this replaced for another student, if any.
pub async fn sign_in(
    state: &AppState,
    existing: Option<BrowserSession>,
    account_id: &str,
    second_password_checked: bool,
    (university_hash, university_hash_until): (String, Timestamp),
) -> StoreResult<(BrowserSession, String, Option<BrowserSession>)> {
    let now = state.clock.now();
    let cookie = random_token();
    let absolute = state.config.session.absolute_timeout.as_secs() as i64;
    let second_at = second_password_checked.then_some(now);
    match existing {
        Some(mut session) if session.account_id == account_id => {
            session.cookie_digest = token_digest(&cookie);
            session.password_at = now;
            session.last_seen_at = now;
            if second_at.is_some() {
                session.second_password_at = second_at;
            }
            session.university_password_hash = Some(university_hash);
            session.university_password_hash_until = Some(university_hash_until);
            state.store.update_session(&session).await?;
            Ok((session, cookie, None))
        }
        other => {
            if let Some(old) = &other {
                state.store.end_session(&old.id, now).await?;
            }
            let session = BrowserSession {
                id: random_id(),
                cookie_digest: token_digest(&cookie),
                account_id: account_id.to_string(),
                sid: random_id(),
                created_at: now,
                last_seen_at: now,
                expires_at: now + absolute,
                password_at: now,
                second_password_at: second_at,
                university_password_hash: Some(university_hash),
                university_password_hash_until: Some(university_hash_until),
                ended_at: None,
            };
            state.store.insert_session(&session).await?;
            Ok((session, cookie, other))
        }
    }
}
