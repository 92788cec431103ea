//! Errors shown to people and errors returned to relying parties. Internal causes are logged once
//! here and never sent to anyone.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::ui::Locale;

/// A page-level failure; the page middleware renders it as `error.html` in the visitor's language.
#[derive(Debug, Clone)]
pub struct PageError {
    pub status: StatusCode,
    pub title_key: &'static str,
    pub message_key: &'static str,
    /// A protocol error code worth showing (e.g. `invalid_request`); never internals.
    pub detail: Option<String>,
    pub back_url: Option<String>,
    pub locale: Option<Locale>,
}

impl PageError {
    pub fn new(status: StatusCode, message_key: &'static str) -> Self {
        Self {
            status,
            title_key: "error_title",
            message_key,
            detail: None,
            back_url: None,
            locale: None,
        }
    }
    pub fn bad_request(message_key: &'static str, detail: impl Into<String>) -> Self {
        Self {
            detail: Some(detail.into()),
            ..Self::new(StatusCode::BAD_REQUEST, message_key)
        }
    }
    pub fn csrf() -> Self {
        Self {
            back_url: Some("/login".into()),
            ..Self::new(StatusCode::FORBIDDEN, "error_csrf")
        }
    }
    pub fn expired() -> Self {
        Self {
            back_url: Some("/login".into()),
            ..Self::new(StatusCode::BAD_REQUEST, "error_request_expired")
        }
    }
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "error_not_found")
    }
    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "error_directory_unavailable",
        )
    }
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "error_internal")
    }
    pub fn in_locale(mut self, locale: Locale) -> Self {
        self.locale = Some(locale);
        self
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = status.into_response();
        response.extensions_mut().insert(self);
        response
    }
}

impl From<crate::store::StoreError> for PageError {
    fn from(e: crate::store::StoreError) -> Self {
        PageError::internal(e)
    }
}

impl From<anyhow::Error> for PageError {
    fn from(e: anyhow::Error) -> Self {
        PageError::internal(e)
    }
}

/// An RFC 6749 error response (token, introspection, revocation endpoints).
#[derive(Debug)]
pub struct OAuthError {
    pub status: StatusCode,
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    pub fn new(error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error,
            description: description.into(),
        }
    }
    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new("invalid_request", description)
    }
    pub fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new("invalid_grant", description)
    }
    pub fn invalid_client(description: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            ..Self::new("invalid_client", description)
        }
    }
    pub fn server_error(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            ..Self::new("server_error", "the server could not complete the request")
        }
    }
}

impl From<crate::store::StoreError> for OAuthError {
    fn from(e: crate::store::StoreError) -> Self {
        OAuthError::server_error(e)
    }
}

impl From<anyhow::Error> for OAuthError {
    fn from(e: anyhow::Error) -> Self {
        OAuthError::server_error(e)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.error, "error_description": self.description });
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"nidan\", charset=\"UTF-8\""),
            );
        }
        response
    }
}

/// A bearer-token failure at userinfo (RFC 6750 §3).
#[derive(Debug)]
pub struct BearerError {
    pub status: StatusCode,
    pub error: Option<&'static str>,
    pub description: &'static str,
}

impl BearerError {
    pub fn missing() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            error: None,
            description: "",
        }
    }
    pub fn invalid_token(description: &'static str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            error: Some("invalid_token"),
            description,
        }
    }
    pub fn invalid_request(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: Some("invalid_request"),
            description,
        }
    }
    /// The store could not answer: 503 with `server_error`, logged once here.
    pub fn server_error(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "userinfo could not be answered");
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: Some("server_error"),
            description: "the server could not check the token; try again",
        }
    }
    pub fn insufficient_scope(description: &'static str) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            error: Some("insufficient_scope"),
            description,
        }
    }
}

impl IntoResponse for BearerError {
    fn into_response(self) -> Response {
        let challenge = match self.error {
            Some(error) => format!(
                "Bearer realm=\"nidan\", error=\"{error}\", error_description=\"{}\"",
                self.description
            ),
            None => "Bearer realm=\"nidan\"".to_string(),
        };
        let mut response = match self.error {
            Some(error) => (
                self.status,
                axum::Json(json!({ "error": error, "error_description": self.description })),
            )
                .into_response(),
            None => self.status.into_response(),
        };
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if !self.status.is_server_error() {
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                headers.insert(header::WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}
