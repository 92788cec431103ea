//! CSRF protection for every form: a token derived from the browser cookie with a server key
//! (so every replica can check it), plus a refusal of foreign `Origin`s.
use axum::http::{header, HeaderMap};

use super::session::{cookie_name, read_cookie, set_cookie, BROWSER_COOKIE};
use crate::app::AppState;
use crate::clock::random_token;
use crate::crypto::{b64url, constant_time_eq, keyed_tag, token_digest};

/// The browser's random id (cookie `nidan_browser`); pending logins are bound to it.
pub struct Browser {
    pub token: String,
    /// True when the cookie has to be set on this response.
    pub is_new: bool,
}

impl Browser {
    pub fn from_headers(state: &AppState, headers: &HeaderMap) -> Browser {
        match read_cookie(headers, &cookie_name(state, BROWSER_COOKIE)) {
            Some(token) => Browser {
                token,
                is_new: false,
            },
            None => Browser {
                token: random_token(),
                is_new: true,
            },
        }
    }

    pub fn digest(&self) -> String {
        token_digest(&self.token)
    }

    pub fn csrf_token(&self, state: &AppState) -> String {
        b64url(&keyed_tag(&state.secrets.csrf, self.token.as_bytes()))
    }

    /// Adds the cookie to a response's headers when it is new.
    pub fn set_cookie_if_new(&self, state: &AppState, headers: &mut HeaderMap) {
        if self.is_new {
            headers.append(
                header::SET_COOKIE,
                set_cookie(state, BROWSER_COOKIE, &self.token, None),
            );
        }
    }
}

/// Checks a form post: the browser cookie exists, the token matches it, and any `Origin` is ours.
pub fn verify(state: &AppState, headers: &HeaderMap, form_token: &str) -> Option<Browser> {
    // Browsers send `Origin: null` with our `Referrer-Policy: no-referrer`; that, like a missing
    // Origin, leaves the decision to the token. A foreign origin or a cross-site fetch is refused.
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        if origin != "null" && origin != state.origin {
            return None;
        }
    }
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return None;
    }
    let token = read_cookie(headers, &cookie_name(state, BROWSER_COOKIE))?;
    let browser = Browser {
        token,
        is_new: false,
    };
    let expected = browser.csrf_token(state);
    constant_time_eq(expected.as_bytes(), form_token.as_bytes()).then_some(browser)
}

/// A fresh token for pages that render before any cookie exists.
pub fn new_browser() -> Browser {
    Browser {
        token: random_token(),
        is_new: true,
    }
}
