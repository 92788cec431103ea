//! Discovery (OpenID Connect Discovery 1.0) and the JWKS, both served from memory.
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::app::AppState;
use crate::config::{Config, ACR_PASSWORD, ACR_SECOND_PASSWORD, AUTH_METHODS, GRANT_TYPES, SCOPES};

pub fn document(config: &Config) -> Value {
    let issuer = &config.issuer;
    json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "userinfo_endpoint": format!("{issuer}/userinfo"),
        "jwks_uri": format!("{issuer}/jwks"),
        "introspection_endpoint": format!("{issuer}/introspect"),
        "revocation_endpoint": format!("{issuer}/revoke"),
        "end_session_endpoint": format!("{issuer}/logout"),
        "scopes_supported": SCOPES,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": GRANT_TYPES,
        "subject_types_supported": ["public", "pairwise"],
        "id_token_signing_alg_values_supported": crate::keys::ALGORITHMS,
        "userinfo_signing_alg_values_supported": ["none"],
        "token_endpoint_auth_methods_supported": AUTH_METHODS,
        "token_endpoint_auth_signing_alg_values_supported": ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
        "code_challenge_methods_supported": ["S256"],
        "acr_values_supported": [ACR_PASSWORD, ACR_SECOND_PASSWORD],
        "claims_supported": [
            "sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr", "azp", "sid",
            "name", "family_name", "given_name", "preferred_username", "email", "email_verified",
            "student_id", "affiliation"
        ],
        "claims_parameter_supported": true,
        "claim_types_supported": ["normal"],
        "request_parameter_supported": false,
        "request_uri_parameter_supported": false,
        "require_request_uri_registration": false,
        "prompt_values_supported": ["none", "login", "consent", "select_account"],
        "display_values_supported": ["page", "touch"],
        "ui_locales_supported": ["ja", "en"],
        "claims_locales_supported": ["ja", "en"],
        "authorization_response_iss_parameter_supported": true,
        "backchannel_logout_supported": true,
        "backchannel_logout_session_supported": true,
        "frontchannel_logout_supported": false,
        "service_documentation": format!("{issuer}/manual"),
    })
}

fn json_bytes(bytes: bytes::Bytes) -> Response {
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

pub async fn discovery(State(state): State<AppState>) -> Response {
    json_bytes(state.discovery.clone())
}

pub async fn jwks(State(state): State<AppState>) -> Response {
    let mut response = json_bytes(state.current_keys().jwks.clone());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/jwk-set+json"),
    );
    response
}
