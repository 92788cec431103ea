//! What bad requests get: authorization errors as pages (before the client and redirect URI are
//! trusted) or as redirects with `error`, `state` and `iss` (after); size limits; discovery and
//! JWKS as relying parties read them; security headers on pages.
use std::collections::HashSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;
use crate::on_both_backends;

on_both_backends!(
    unknown_client_gets_an_error_page,
    request_objects_are_not_supported,
);

/// Opens `authz` in a fresh browser and expects an error redirect to the client.
async fn error_redirect(app: &TestApp, authz: &Authz, error: &str) {
    let reply = app.browser().get(&authz.url(&app.issuer)).await;
    let params = reply.callback();
    assert_eq!(
        params.get("error").map(String::as_str),
        Some(error),
        "{reply:?}"
    );
    assert_eq!(params.get("state").map(String::as_str), Some(authz.state()));
    assert_eq!(
        params.get("iss"),
        Some(&app.issuer),
        "iss in every response"
    );
    assert!(!params.contains_key("code"));
}

/// Opens `url` and expects the HTML error page with `status` and no redirect.
async fn error_page(app: &TestApp, url: &str, status: StatusCode) -> Reply {
    let reply = app.browser().get(url).await;
    assert!(
        reply.is_error_page(status),
        "expected an error page: {reply:?}"
    );
    assert!(reply.body.contains("role=\"alert\""), "{reply:?}");
    reply
}

async fn unknown_client_gets_an_error_page(backend: Backend) {
    let app = TestApp::start(backend).await;
    let authz = Authz::new("rp-nobody");
    error_page(&app, &authz.url(&app.issuer), StatusCode::BAD_REQUEST).await;
}

async fn request_objects_are_not_supported(backend: Backend) {
    let app = TestApp::start(backend).await;
    let authz = Authz::new("rp-basic").set("request", "eyJhbGciOiJub25lIn0.e30.");
    error_redirect(&app, &authz, "request_not_supported").await;
    let authz = Authz::new("rp-basic").set("request_uri", "https://rp.example/request.jwt");
    error_redirect(&app, &authz, "request_uri_not_supported").await;
}

#[tokio::test]
async fn redirect_uri_must_match_exactly() {
    let app = TestApp::sqlite().await;
    for redirect_uri in [
        "http://127.0.0.1:9999/cb?extra=1",
        "http://127.0.0.1:9999/cb/",
        "http://127.0.0.1:9999/CB",
        "https://evil.example/cb",
    ] {
        let authz = Authz::new("rp-basic").set("redirect_uri", redirect_uri);
        error_page(&app, &authz.url(&app.issuer), StatusCode::BAD_REQUEST).await;
    }
    let authz = Authz::new("rp-basic").remove("redirect_uri");
    error_page(&app, &authz.url(&app.issuer), StatusCode::BAD_REQUEST).await;
    let authz = Authz::new("rp-basic").remove("client_id");
    error_page(&app, &authz.url(&app.issuer), StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn error_pages_follow_the_language() {
    let app = TestApp::sqlite().await;
    let url = Authz::new("rp-nobody").url(&app.issuer);
    let ja = app.browser().get(&url).await;
    assert!(
        ja.body.contains("<html lang=\"ja\""),
        "Japanese by default: {ja:?}"
    );
    let en = app
        .browser()
        .send(
            app.http
                .get(&url)
                .header("accept-language", "en-US,en;q=0.9"),
        )
        .await;
    assert!(en.body.contains("<html lang=\"en\""), "{en:?}");
}

#[tokio::test]
async fn duplicate_parameters_are_an_error() {
    let app = TestApp::sqlite().await;
    for name in ["state", "client_id", "redirect_uri", "scope"] {
        let value = Authz::new("rp-basic").get(name).unwrap().to_string();
        let authz = Authz::new("rp-basic").add(name, &value);
        let reply = app.browser().get(&authz.url(&app.issuer)).await;
        let as_page = reply.is_error_page(StatusCode::BAD_REQUEST);
        let as_redirect = reply.status == StatusCode::SEE_OTHER
            && reply.location.as_deref().is_some_and(|l| {
                l.starts_with(REDIRECT_URI) && l.contains("error=invalid_request")
            });
        assert!(as_page || as_redirect, "duplicate {name}: {reply:?}");
    }
}

#[tokio::test]
async fn response_type_must_be_code() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic").set("response_type", "token");
    error_redirect(&app, &authz, "unsupported_response_type").await;
    let authz = Authz::new("rp-basic").set("response_type", "code id_token");
    error_redirect(&app, &authz, "unsupported_response_type").await;
    let authz = Authz::new("rp-basic").remove("response_type");
    error_redirect(&app, &authz, "invalid_request").await;
    let authz = Authz::new("rp-basic").set("response_mode", "fragment");
    error_redirect(&app, &authz, "invalid_request").await;
}

#[tokio::test]
async fn scopes_must_include_openid_and_be_allowed() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic").set("scope", "profile");
    error_redirect(&app, &authz, "invalid_scope").await;
    // rp-public may not use `student`.
    let authz = Authz::new("rp-public").set("scope", "openid student");
    error_redirect(&app, &authz, "invalid_scope").await;
    let authz = Authz::new("rp-basic").set("scope", "openid admin");
    error_redirect(&app, &authz, "invalid_scope").await;
}

#[tokio::test]
async fn public_clients_must_use_pkce() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-public").without_pkce();
    error_redirect(&app, &authz, "invalid_request").await;
}

#[tokio::test]
async fn pkce_method_must_be_s256_and_the_challenge_well_formed() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic").set("code_challenge_method", "plain");
    error_redirect(&app, &authz, "invalid_request").await;
    let authz = Authz::new("rp-basic").remove("code_challenge_method");
    error_redirect(&app, &authz, "invalid_request").await;
    let authz = Authz::new("rp-basic").set("code_challenge", "short");
    error_redirect(&app, &authz, "invalid_request").await;
}

#[tokio::test]
async fn prompt_and_max_age_are_checked() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic").set("prompt", "none login");
    error_redirect(&app, &authz, "invalid_request").await;
    let authz = Authz::new("rp-basic").set("max_age", "-1");
    error_redirect(&app, &authz, "invalid_request").await;
    let authz = Authz::new("rp-basic").set("max_age", "soon");
    error_redirect(&app, &authz, "invalid_request").await;
    let authz = Authz::new("rp-basic").set("claims", "{not json");
    error_redirect(&app, &authz, "invalid_request").await;
}

#[tokio::test]
async fn ignorable_parameters_do_not_fail_the_request() {
    let app = TestApp::sqlite().await;
    for (name, value) in [
        ("prompt", "consent"),
        ("display", "popup"),
        ("acr_values", "urn:example:unknown"),
        ("ui_locales", "fr ja"),
        ("login_hint", "s2401001"),
        ("claims_locales", "ja"),
    ] {
        let authz = Authz::new("rp-basic").set(name, value);
        let page = app.browser().open(&authz.url(&app.issuer)).await;
        assert!(page.is_login_page(), "{name}={value}: {page:?}");
    }
}

#[tokio::test]
async fn login_hint_fills_in_the_user_id() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic").set("login_hint", TARO.username);
    let page = app.browser().open(&authz.url(&app.issuer)).await;
    let form = html::forms(&page.body)
        .into_iter()
        .find(|f| f.action == "/login")
        .unwrap();
    assert_eq!(form.value("username"), Some(TARO.username));
    assert_eq!(
        form.value("password"),
        Some(""),
        "password fields are always empty"
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused_without_a_server_error() {
    let app = TestApp::sqlite().await;
    let big = "x".repeat(200 * 1024);
    for path in [
        "/token",
        "/authorize",
        "/login",
        "/userinfo",
        "/introspect",
        "/logout",
    ] {
        let reply = app
            .http
            .post(app.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("a={big}"))
            .send()
            .await
            .unwrap();
        let reply = Reply::from(reply, None).await;
        assert!(
            matches!(
                reply.status,
                StatusCode::PAYLOAD_TOO_LARGE | StatusCode::BAD_REQUEST
            ),
            "{path}: {reply:?}"
        );
    }
    // The same without Content-Length (chunked).
    let status = chunked_post(&app, "/token", big.as_bytes()).await;
    assert!(status == 413 || status == 400, "chunked: {status}");
}

/// POSTs `body` with `Transfer-Encoding: chunked` over a raw connection; the status code.
async fn chunked_post(app: &TestApp, path: &str, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.issuer.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(b"2\r\na=\r\n").await;
    for chunk in body.chunks(8 * 1024) {
        let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        if stream.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"))
}

#[tokio::test]
async fn long_parameter_values_are_refused() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic").set("state", &"s".repeat(9000));
    let reply = app.browser().get(&authz.url(&app.issuer)).await;
    assert!(
        reply.status.is_client_error() || reply.status == StatusCode::SEE_OTHER,
        "{reply:?}"
    );
    assert!(!reply.status.is_server_error());
}

#[tokio::test]
async fn discovery_lists_what_relying_parties_need() {
    let app = TestApp::sqlite().await;
    let reply = app.get("/.well-known/openid-configuration").await;
    assert_eq!(reply.status, StatusCode::OK);
    let d = reply.json();
    let issuer = &app.issuer;
    assert_eq!(d["issuer"], *issuer);
    for (key, path) in [
        ("authorization_endpoint", "/authorize"),
        ("token_endpoint", "/token"),
        ("userinfo_endpoint", "/userinfo"),
        ("jwks_uri", "/jwks"),
        ("introspection_endpoint", "/introspect"),
        ("revocation_endpoint", "/revoke"),
        ("end_session_endpoint", "/logout"),
    ] {
        assert_eq!(d[key], format!("{issuer}{path}"), "{key}");
    }
    let list = |key: &str| -> Vec<String> {
        d[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} is a list: {d}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(list("response_types_supported"), ["code"]);
    assert_eq!(list("code_challenge_methods_supported"), ["S256"]);
    for grant in ["authorization_code", "refresh_token", "client_credentials"] {
        assert!(
            list("grant_types_supported").contains(&grant.to_string()),
            "{grant}"
        );
    }
    for acr in [ACR_PASSWORD, ACR_SECOND_PASSWORD] {
        assert!(
            list("acr_values_supported").contains(&acr.to_string()),
            "{acr}"
        );
    }
    for alg in ["RS256", "ES256", "EdDSA"] {
        assert!(list("id_token_signing_alg_values_supported").contains(&alg.to_string()));
    }
    for method in [
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
        "none",
    ] {
        assert!(list("token_endpoint_auth_methods_supported").contains(&method.to_string()));
    }
    for scope in ["openid", "profile", "email", "student", "offline_access"] {
        assert!(
            list("scopes_supported").contains(&scope.to_string()),
            "{scope}"
        );
    }
    for subject in ["public", "pairwise"] {
        assert!(list("subject_types_supported").contains(&subject.to_string()));
    }
    let claims = list("claims_supported");
    for claim in [
        "sub",
        "acr",
        "amr",
        "auth_time",
        "sid",
        "name",
        "email",
        "email_verified",
        "preferred_username",
        "student_id",
    ] {
        assert!(
            claims.contains(&claim.to_string()),
            "claims_supported has {claim}"
        );
    }
    assert_eq!(d["claims_parameter_supported"], true);
    assert_eq!(d["request_parameter_supported"], false);
    assert_eq!(d["request_uri_parameter_supported"], false);
    assert_eq!(d["authorization_response_iss_parameter_supported"], true);
    assert_eq!(d["backchannel_logout_supported"], true);
    assert_eq!(d["backchannel_logout_session_supported"], true);
    assert!(
        !list("token_endpoint_auth_methods_supported").is_empty()
            && !list("response_modes_supported").contains(&"fragment".to_string())
    );
}

#[tokio::test]
async fn jwks_publishes_only_public_keys_with_unique_kids() {
    let app = TestApp::sqlite().await;
    let reply = app.get("/jwks").await;
    assert_eq!(reply.status, StatusCode::OK);
    let jwks = reply.json();
    let keys = jwks["keys"].as_array().expect("keys");
    let mut kids = HashSet::new();
    let mut kinds = HashSet::new();
    for key in keys {
        for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
            assert!(
                key.get(private).is_none(),
                "private member {private} in {key}"
            );
        }
        let kid = key["kid"].as_str().expect("every key has a kid");
        assert!(kids.insert(kid.to_string()), "duplicate kid {kid}");
        kinds.insert(key["kty"].as_str().unwrap().to_string());
        if key["kty"] == "RSA" {
            let n = URL_SAFE_NO_PAD.decode(key["n"].as_str().unwrap()).unwrap();
            assert!(n.len() * 8 >= 2048, "RSA keys of at least 2048 bits");
        }
        assert!(key.get("use").is_none_or(|u| u == "sig"), "{key}");
    }
    for kty in ["RSA", "EC", "OKP"] {
        assert!(
            kinds.contains(kty),
            "a {kty} key for RS256/ES256/EdDSA: {jwks}"
        );
    }
}

#[tokio::test]
async fn pages_carry_the_security_headers() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    assert!(page.is_login_page());
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert!(page.header("x-powered-by").is_none());
    assert!(page
        .header("server")
        .is_none_or(|s| !s.chars().any(|c| c.is_ascii_digit())));
    assert!(
        page.header("strict-transport-security").is_none(),
        "no HSTS on http"
    );
    assert!(page
        .body
        .contains("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"));
    assert!(
        !page.body.contains("<script"),
        "pages work without JavaScript"
    );
}

#[tokio::test]
async fn unknown_paths_are_a_404_page() {
    let app = TestApp::sqlite().await;
    let reply = app.get("/no/such/page").await;
    assert!(reply.is_error_page(StatusCode::NOT_FOUND), "{reply:?}");
}

#[tokio::test]
async fn login_post_needs_the_csrf_token_of_this_browser() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    let form = html::forms(&page.body)
        .into_iter()
        .find(|f| f.action == "/login")
        .unwrap();
    let tx = form.value("tx").unwrap().to_string();
    let csrf = form.value("csrf").unwrap().to_string();
    let fields = |csrf: &str| -> Vec<(String, String)> {
        vec![
            ("csrf".into(), csrf.into()),
            ("tx".into(), tx.clone()),
            ("username".into(), TARO.username.into()),
            ("password".into(), TARO.password.into()),
            ("second_password".into(), String::new()),
        ]
    };
    // No token.
    let reply = browser
        .send(app.http.post(app.url("/login")).form(&fields("")))
        .await;
    assert!(reply.is_error_page(StatusCode::FORBIDDEN), "{reply:?}");
    // Another browser's token.
    let other = app.browser();
    let other_page = other.get("/login").await;
    let other_csrf = html::forms(&other_page.body)[0]
        .value("csrf")
        .unwrap()
        .to_string();
    let reply = browser
        .send(app.http.post(app.url("/login")).form(&fields(&other_csrf)))
        .await;
    assert!(reply.is_error_page(StatusCode::FORBIDDEN), "{reply:?}");
    // A foreign Origin.
    let reply = browser
        .send(
            app.http
                .post(app.url("/login"))
                .header("origin", "https://evil.example")
                .form(&fields(&csrf)),
        )
        .await;
    assert!(reply.is_error_page(StatusCode::FORBIDDEN), "{reply:?}");
    assert!(!browser.has_session());
    // Our own Origin and the right token: signed in.
    let reply = browser
        .send(
            app.http
                .post(app.url("/login"))
                .header("origin", &app.issuer)
                .form(&fields(&csrf)),
        )
        .await;
    reply.code();
}

#[tokio::test]
async fn pending_requests_belong_to_their_browser() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let first = browser.get(&Authz::new("rp-basic").url(&app.issuer)).await;
    let login_url = first.location.clone().unwrap();
    let thief = app.browser();
    let reply = thief.get(&login_url).await;
    assert!(!reply.status.is_server_error(), "{reply:?}");
    assert!(
        !reply.is_login_page()
            || html::forms(&reply.body)
                .iter()
                .all(|f| f.value("tx").is_none()),
        "another browser must not continue this request: {reply:?}"
    );
    let unknown = browser
        .get("/login?tx=0123456789abcdef0123456789abcdef")
        .await;
    assert!(unknown.status.is_client_error(), "{unknown:?}");
}

#[tokio::test]
async fn health_endpoints_answer() {
    let app = TestApp::sqlite().await;
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
    let body: Value = ready.json();
    assert_eq!(body["store"], json!("ok"));
}

#[tokio::test]
async fn oversized_form_posts_from_a_browser_get_a_page() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    let form = html::forms(&page.body)
        .into_iter()
        .find(|f| f.action == "/login")
        .unwrap();
    let big = "x".repeat(100 * 1024);
    let fields = [
        ("csrf", form.value("csrf").unwrap()),
        ("tx", form.value("tx").unwrap()),
        ("username", TARO.username),
        ("password", big.as_str()),
        ("second_password", ""),
    ];
    let reply = browser.post("/login", &fields).await;
    assert!(
        matches!(
            reply.status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::BAD_REQUEST
        ),
        "{reply:?}"
    );
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/html"))
            && reply.body.contains("role=\"alert\""),
        "a page that explains, not a bare status: {reply:?}"
    );
    assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test]
async fn development_pages_exist_on_a_loopback_issuer_with_file_mail() {
    let app = TestApp::sqlite().await;
    for path in ["/demo", "/dev/mail", "/metrics"] {
        let reply = app.get(path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {reply:?}");
    }
}
