//! RP-initiated logout: with a valid `id_token_hint` (expired is fine) no page and a redirect to
//! the registered URI; without one a confirmation form. The session and its online grants end.
use reqwest::StatusCode;
use serde_json::json;

use crate::common::backchannel::{Delivery, LogoutReceiver};
use crate::common::*;
use crate::on_both_backends;

on_both_backends!(
    logout_with_id_token_hint_redirects_and_ends_the_session,
    logout_confirmation_without_a_hint,
);

fn logout_url(app: &TestApp, params: &[(&str, &str)]) -> String {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    app.url(&format!("/logout?{query}"))
}

/// Signs TARO in on a new browser through `rp-basic`; the browser and the tokens.
async fn signed_in(app: &TestApp) -> (Browser, Tokens) {
    let browser = app.browser();
    let tokens = app
        .tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    (browser, tokens)
}

async fn assert_signed_out(app: &TestApp, browser: &Browser) {
    let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    assert!(page.is_login_page(), "the session is gone: {page:?}");
}

async fn logout_with_id_token_hint_redirects_and_ends_the_session(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (browser, tokens) = signed_in(&app).await;
    let url = logout_url(
        &app,
        &[
            ("id_token_hint", tokens.id()),
            ("post_logout_redirect_uri", POST_LOGOUT_URI),
            ("state", "bye-123"),
        ],
    );
    let reply = browser.get(&url).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "no page: {reply:?}");
    let location = reply.location_url();
    assert!(location.as_str().starts_with(POST_LOGOUT_URI), "{location}");
    let state: Vec<(String, String)> = location.query_pairs().into_owned().collect();
    assert_eq!(state, vec![("state".to_string(), "bye-123".to_string())]);

    assert_signed_out(&app, &browser).await;
    let refresh = app.refresh("rp-basic", tokens.refresh()).await;
    assert_eq!(
        refresh.error(),
        "invalid_grant",
        "refresh tokens without offline_access end with the session: {refresh:?}"
    );
    assert_eq!(app.introspect(&tokens.access_token).await["active"], false);
}

async fn logout_confirmation_without_a_hint(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (browser, _) = signed_in(&app).await;
    let page = browser.get(&app.url("/logout")).await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    let form = html::forms(&page.body)
        .into_iter()
        .find(|f| f.action == "/logout")
        .unwrap_or_else(|| panic!("a confirmation form: {page:?}"));
    assert_eq!(form.method, "post");
    let csrf = form.value("csrf").expect("a csrf field").to_string();
    assert!(!csrf.is_empty());
    // Still signed in until the student confirms.
    browser
        .get(&Authz::new("rp-basic").url(&app.issuer))
        .await
        .code();

    let fields: Vec<(&str, &str)> = form
        .inputs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let done = browser.post("/logout", &fields).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert!(
        html::forms(&done.body).is_empty(),
        "the logged-out page has no form: {done:?}"
    );
    assert!(done.body.contains("role=\"status\""), "{done:?}");
    assert_signed_out(&app, &browser).await;
}

#[tokio::test]
async fn offline_access_outlives_the_session() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let authz = Authz::new("rp-basic").set("scope", "openid offline_access");
    let tokens = app
        .tokens_with(&browser, authz, &TARO, Level::Password)
        .await;
    let url = logout_url(&app, &[("id_token_hint", tokens.id())]);
    let reply = browser.get(&url).await;
    assert!(
        reply.status.is_success() || reply.status == StatusCode::SEE_OTHER,
        "{reply:?}"
    );
    assert_signed_out(&app, &browser).await;
    let refresh = app.refresh("rp-basic", tokens.refresh()).await;
    assert_eq!(refresh.status, StatusCode::OK, "{refresh:?}");
}

#[tokio::test]
async fn unregistered_post_logout_redirect_uri_is_an_error_page() {
    let app = TestApp::sqlite().await;
    let (browser, tokens) = signed_in(&app).await;
    for uri in [
        "https://evil.example/",
        "http://127.0.0.1:9999/?x=1",
        "http://127.0.0.1:9999",
    ] {
        let url = logout_url(
            &app,
            &[
                ("id_token_hint", tokens.id()),
                ("post_logout_redirect_uri", uri),
            ],
        );
        let reply = browser.get(&url).await;
        assert!(
            reply.is_error_page(StatusCode::BAD_REQUEST),
            "{uri}: {reply:?}"
        );
    }
    // Without a hint or client_id nobody says whose URI it is.
    let url = logout_url(&app, &[("post_logout_redirect_uri", POST_LOGOUT_URI)]);
    let reply = browser.get(&url).await;
    assert!(reply.is_error_page(StatusCode::BAD_REQUEST), "{reply:?}");
    // The session survived all of that.
    browser
        .get(&Authz::new("rp-basic").url(&app.issuer))
        .await
        .code();
}

#[tokio::test]
async fn expired_id_token_hint_is_still_accepted() {
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "session": { "idle_timeout": "2h" } }))
        .build()
        .await;
    let (browser, tokens) = signed_in(&app).await;
    app.advance(3600);
    let exp = tokens.id_claims()["exp"].as_i64().unwrap();
    assert!(exp < app.now(), "the hint has expired");
    let url = logout_url(
        &app,
        &[
            ("id_token_hint", tokens.id()),
            ("post_logout_redirect_uri", POST_LOGOUT_URI),
            ("state", "s1"),
        ],
    );
    let reply = browser.get(&url).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{reply:?}");
    assert!(reply
        .location
        .as_deref()
        .unwrap()
        .starts_with(POST_LOGOUT_URI));
    assert_signed_out(&app, &browser).await;
}

#[tokio::test]
async fn forged_id_token_hint_is_refused() {
    let app = TestApp::sqlite().await;
    let (browser, tokens) = signed_in(&app).await;
    // Same claims, signed by a key that is not ours.
    let key = josekit::jws::RS256.generate_key_pair(2048).unwrap();
    let mut header = josekit::jws::JwsHeader::new();
    header.set_key_id(jwt_header(tokens.id())["kid"].as_str().unwrap().to_string());
    let payload =
        josekit::jwt::JwtPayload::from_map(tokens.id_claims().as_object().unwrap().clone())
            .unwrap();
    let signer = josekit::jws::RS256
        .signer_from_jwk(&key.to_jwk_private_key())
        .unwrap();
    let forged = josekit::jwt::encode_with_signer(&payload, &header, &signer).unwrap();
    for hint in [forged.as_str(), "not-a-jwt"] {
        let url = logout_url(
            &app,
            &[
                ("id_token_hint", hint),
                ("post_logout_redirect_uri", POST_LOGOUT_URI),
            ],
        );
        let reply = browser.get(&url).await;
        // Not a valid hint: never a silent logout and redirect; the student confirms (or an
        // error page).
        let confirmation = reply.status == StatusCode::OK
            && html::forms(&reply.body)
                .iter()
                .any(|f| f.action == "/logout" && f.has("csrf"));
        assert!(
            confirmation || reply.is_error_page(StatusCode::BAD_REQUEST),
            "{reply:?}"
        );
    }
    browser
        .get(&Authz::new("rp-basic").url(&app.issuer))
        .await
        .code();
}

#[tokio::test]
async fn logout_post_without_a_valid_csrf_token_asks_again() {
    let app = TestApp::sqlite().await;
    let (browser, _) = signed_in(&app).await;
    let reply = browser.post("/logout", &[("csrf", "wrong")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(
        html::forms(&reply.body)
            .iter()
            .any(|f| f.action == "/logout" && f.has("csrf")),
        "the confirmation form again: {reply:?}"
    );
    browser
        .get(&Authz::new("rp-basic").url(&app.issuer))
        .await
        .code();
}

#[tokio::test]
async fn confirmed_logout_carries_the_redirect_and_state() {
    let app = TestApp::sqlite().await;
    let (browser, _) = signed_in(&app).await;
    let url = logout_url(
        &app,
        &[
            ("client_id", "rp-basic"),
            ("post_logout_redirect_uri", POST_LOGOUT_URI),
            ("state", "st-9"),
        ],
    );
    let page = browser.get(&url).await;
    let form = html::forms(&page.body)
        .into_iter()
        .find(|f| f.action == "/logout")
        .unwrap_or_else(|| panic!("a confirmation form: {page:?}"));
    let fields: Vec<(&str, &str)> = form
        .inputs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let reply = browser.post("/logout", &fields).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{reply:?}");
    let location = reply.location_url();
    assert!(location.as_str().starts_with(POST_LOGOUT_URI));
    assert!(location
        .query_pairs()
        .any(|(k, v)| k == "state" && v == "st-9"));
    assert_signed_out(&app, &browser).await;
}

#[tokio::test]
async fn logout_without_a_session_shows_the_logged_out_page() {
    let app = TestApp::sqlite().await;
    let reply = app.browser().get(&app.url("/logout")).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(!reply.status.is_server_error());
}

#[tokio::test]
async fn logout_of_another_students_hint_does_not_end_this_session_silently() {
    let app = TestApp::sqlite().await;
    let (_, jiro) = {
        let browser = app.browser();
        let tokens = app
            .tokens_with(&browser, Authz::new("rp-basic"), &JIRO, Level::Password)
            .await;
        (browser, tokens)
    };
    let (browser, _) = signed_in(&app).await;
    let url = logout_url(
        &app,
        &[
            ("id_token_hint", jiro.id()),
            ("post_logout_redirect_uri", POST_LOGOUT_URI),
        ],
    );
    let reply = browser.get(&url).await;
    // The hint names someone else: the student must confirm (or nothing happens).
    assert!(
        reply.status == StatusCode::OK
            && html::forms(&reply.body)
                .iter()
                .any(|f| f.action == "/logout"),
        "{reply:?}"
    );
    browser
        .get(&Authz::new("rp-basic").url(&app.issuer))
        .await
        .code();
}

const BCL_SECRET: &str = "bcl-secret-0123456789abcdef";

/// A client with a back-channel logout URI (with a query, which must be kept as registered).
fn bcl_client(receiver: &LogoutReceiver) -> TestClient {
    bcl_client_named(
        "rp-bcl",
        &format!("{}/backchannel?tenant=a%20b&x=1", receiver.base),
    )
}

fn bcl_client_named(client_id: &'static str, uri: &str) -> TestClient {
    TestClient {
        client_id,
        secret: Some(BCL_SECRET),
        settings: json!({
            "client_id": client_id,
            "redirect_uris": [REDIRECT_URI],
            "post_logout_redirect_uris": [POST_LOGOUT_URI],
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["authorization_code", "refresh_token"],
            "scopes": ["openid", "profile", "email", "student"],
            "backchannel_logout_uri": uri,
        }),
    }
}

async fn bcl_app(backend: Backend, receiver: &LogoutReceiver) -> TestApp {
    TestApp::builder(backend)
        .client(bcl_client(receiver))
        .build()
        .await
}

/// Verifies `jwt` with the key its `kid` names in the published JWKS; its claims.
async fn verify_with_jwks(app: &TestApp, jwt: &str) -> serde_json::Value {
    let header = jwt_header(jwt);
    assert_eq!(header["alg"], "RS256");
    let jwks = app.get("/jwks").await.json();
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .unwrap_or_else(|| panic!("kid {} is published", header["kid"]))
        .clone();
    let jwk = josekit::jwk::Jwk::from_map(key.as_object().unwrap().clone()).unwrap();
    let verifier = josekit::jws::RS256.verifier_from_jwk(&jwk).unwrap();
    let (payload, _) =
        josekit::jwt::decode_with_verifier(jwt, &verifier).expect("a valid signature");
    serde_json::Value::Object(payload.claims_set().clone())
}

/// Checks a logout token against the ID token of the session it ends.
async fn check_logout_token(
    app: &TestApp,
    delivery: &Delivery,
    id_claims: &serde_json::Value,
) -> String {
    assert_eq!(delivery.path, "/backchannel");
    assert_eq!(
        delivery.query.as_deref(),
        Some("tenant=a%20b&x=1"),
        "POSTed to the URI exactly as registered"
    );
    assert!(delivery
        .content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded")));
    let token = delivery
        .logout_token
        .as_deref()
        .expect("a logout_token field");
    assert_eq!(jwt_header(token)["typ"], "logout+jwt");
    let claims = verify_with_jwks(app, token).await;
    assert_eq!(claims["iss"], app.issuer);
    assert!(
        claims["aud"] == "rp-bcl" || claims["aud"] == json!(["rp-bcl"]),
        "{claims}"
    );
    assert_eq!(claims["sid"], id_claims["sid"]);
    assert_eq!(claims["sub"], id_claims["sub"]);
    assert!(claims.get("nonce").is_none(), "{claims}");
    assert!(claims["events"]
        .get("http://schemas.openid.net/event/backchannel-logout")
        .is_some_and(|e| e.is_object()));
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert!(
        exp > iat && exp - iat <= 120,
        "exp at most 2 minutes ahead: {claims}"
    );
    claims["jti"].as_str().expect("a jti").to_string()
}

on_both_backends!(backchannel_logout_reaches_the_client_before_the_answer);

async fn backchannel_logout_reaches_the_client_before_the_answer(backend: Backend) {
    let receiver = LogoutReceiver::start(0).await;
    let app = bcl_app(backend, &receiver).await;
    let browser = app.browser();
    let tokens = app
        .tokens_with(&browser, Authz::new("rp-bcl"), &TARO, Level::Password)
        .await;
    assert!(receiver.received().await.is_none());
    let url = logout_url(
        &app,
        &[
            ("id_token_hint", tokens.id()),
            ("post_logout_redirect_uri", POST_LOGOUT_URI),
        ],
    );
    let reply = browser.get(&url).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{reply:?}");
    let delivery = receiver
        .received()
        .await
        .expect("the logout token was POSTed before the answer");
    check_logout_token(&app, &delivery, &tokens.id_claims()).await;
    assert!(receiver.next(1).await.is_none(), "delivered once");
}

#[tokio::test]
async fn failed_backchannel_logout_is_retried_with_a_fresh_token() {
    let receiver = LogoutReceiver::start(1).await;
    let app = bcl_app(Backend::Sqlite, &receiver).await;
    let browser = app.browser();
    let tokens = app
        .tokens_with(&browser, Authz::new("rp-bcl"), &TARO, Level::Password)
        .await;
    let url = logout_url(&app, &[("id_token_hint", tokens.id())]);
    let reply = browser.get(&url).await;
    assert!(
        !reply.status.is_server_error(),
        "a failing RP does not fail the logout: {reply:?}"
    );
    assert_signed_out(&app, &browser).await;
    let first = receiver.received().await.expect("the first attempt");
    let first_jti = check_logout_token(&app, &first, &tokens.id_claims()).await;
    app.advance(5);
    let second = receiver.next(10).await.expect("a retry from the outbox");
    let second_jti = check_logout_token(&app, &second, &tokens.id_claims()).await;
    assert_ne!(first_jti, second_jti, "each attempt is signed afresh");
    assert!(
        receiver.next(2).await.is_none(),
        "no more attempts after a success"
    );
}

#[tokio::test]
async fn another_student_signing_in_notifies_the_relying_parties() {
    let receiver = LogoutReceiver::start(0).await;
    let app = bcl_app(Backend::Sqlite, &receiver).await;
    let browser = app.browser();
    let taro = app
        .tokens_with(&browser, Authz::new("rp-bcl"), &TARO, Level::Password)
        .await;
    let authz = Authz::new("rp-basic").set("prompt", "login");
    let page = browser.open(&authz.url(&app.issuer)).await;
    let reply = browser
        .submit_login(&page, JIRO.username, JIRO.password, "")
        .await;
    reply.code();
    let delivery = receiver.received().await.expect("Taro's session ended");
    check_logout_token(&app, &delivery, &taro.id_claims()).await;
}

#[tokio::test]
async fn idle_expiry_ends_only_nidans_session() {
    let receiver = LogoutReceiver::start(0).await;
    let app = bcl_app(Backend::Sqlite, &receiver).await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-bcl"), &TARO, Level::Password)
        .await;
    app.advance(16 * 60);
    let page = browser.open(&Authz::new("rp-bcl").url(&app.issuer)).await;
    assert!(page.is_login_page());
    browser
        .submit_login(&page, TARO.username, TARO.password, "")
        .await
        .code();
    assert!(
        receiver.next(1).await.is_none(),
        "no back-channel logout for an idle expiry"
    );
}

#[tokio::test]
async fn id_token_hint_for_another_client_than_client_id_is_refused() {
    let app = TestApp::sqlite().await;
    let (browser, tokens) = signed_in(&app).await;
    let url = logout_url(
        &app,
        &[
            ("id_token_hint", tokens.id()),
            ("client_id", "rp-other"),
            ("post_logout_redirect_uri", POST_LOGOUT_URI),
        ],
    );
    let reply = browser.get(&url).await;
    assert!(reply.is_error_page(StatusCode::BAD_REQUEST), "{reply:?}");
}

#[tokio::test]
async fn logout_by_post_with_a_hint() {
    let app = TestApp::sqlite().await;
    let (browser, tokens) = signed_in(&app).await;
    let reply = browser
        .post(
            &app.url("/logout"),
            &[
                ("id_token_hint", tokens.id()),
                ("post_logout_redirect_uri", POST_LOGOUT_URI),
                ("state", "posted"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{reply:?}");
    assert!(reply
        .location_url()
        .query_pairs()
        .any(|(k, v)| k == "state" && v == "posted"));
    assert_signed_out(&app, &browser).await;
}

#[tokio::test]
async fn logout_pages_follow_ui_locales() {
    let app = TestApp::sqlite().await;
    let (browser, _) = signed_in(&app).await;
    let page = browser
        .get(&logout_url(&app, &[("ui_locales", "en")]))
        .await;
    assert!(page.body.contains("<html lang=\"en\""), "{page:?}");
    let form = html::forms(&page.body)
        .into_iter()
        .find(|f| f.action == "/logout")
        .unwrap();
    let fields: Vec<(&str, &str)> = form
        .inputs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let done = browser.post("/logout", &fields).await;
    assert!(done.body.contains("<html lang=\"en\""), "{done:?}");
}

#[tokio::test]
async fn every_client_of_the_session_is_told() {
    let receiver = LogoutReceiver::start(0).await;
    let app = TestApp::builder(Backend::Sqlite)
        .client(bcl_client_named(
            "rp-bcl-a",
            &format!("{}/a", receiver.base),
        ))
        .client(bcl_client_named(
            "rp-bcl-b",
            &format!("{}/b", receiver.base),
        ))
        .build()
        .await;
    let browser = app.browser();
    let a = app
        .tokens_with(&browser, Authz::new("rp-bcl-a"), &TARO, Level::Password)
        .await;
    let authz = Authz::new("rp-bcl-b");
    let code = browser.get(&authz.url(&app.issuer)).await.code();
    app.exchange(&authz, &code).await;
    let reply = browser
        .get(&logout_url(&app, &[("id_token_hint", a.id())]))
        .await;
    assert!(!reply.status.is_server_error(), "{reply:?}");
    let mut told = Vec::new();
    while let Some(delivery) = receiver.received().await {
        let claims = jwt_payload(delivery.logout_token.as_deref().unwrap());
        assert_eq!(claims["sid"], a.id_claims()["sid"]);
        told.push((delivery.path.clone(), claims["aud"].clone()));
    }
    told.sort_by_key(|(path, _)| path.clone());
    assert_eq!(
        told,
        vec![
            ("/a".to_string(), json!("rp-bcl-a")),
            ("/b".to_string(), json!("rp-bcl-b"))
        ],
        "both clients, before the answer"
    );
}

#[tokio::test]
async fn a_slow_relying_party_does_not_hold_up_the_logout() {
    let receiver = LogoutReceiver::slow(std::time::Duration::from_secs(30)).await;
    let app = bcl_app(Backend::Sqlite, &receiver).await;
    let browser = app.browser();
    let tokens = app
        .tokens_with(&browser, Authz::new("rp-bcl"), &TARO, Level::Password)
        .await;
    let started = std::time::Instant::now();
    let reply = browser
        .get(&logout_url(
            &app,
            &[
                ("id_token_hint", tokens.id()),
                ("post_logout_redirect_uri", POST_LOGOUT_URI),
            ],
        ))
        .await;
    let took = started.elapsed();
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{reply:?}");
    // Two seconds per client plus load; far less than the 30 the RP would take.
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
    assert!(receiver.received().await.is_some(), "the attempt was made");
}
