//! The authorization code flow end to end, as an `openidconnect` relying party and a browser see
//! it, on SQLite and PostgreSQL: levels, sessions, prompt, max_age and the signing algorithms.
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;
use crate::on_both_backends;

on_both_backends!(
    code_flow_as_an_openidconnect_relying_party,
    second_password_login_reaches_the_second_password_level,
    client_secret_post_and_public_clients_complete_the_flow,
    es256_and_eddsa_id_tokens_for_clients_that_ask,
    existing_session_issues_a_code_without_the_login_page,
    idle_timeout_asks_for_the_login_again,
    using_the_session_restarts_the_idle_timer,
    prompt_none_without_a_session_is_login_required,
    prompt_none_with_a_session_issues_a_code,
    prompt_login_shows_the_login_page_despite_a_session,
    max_age_zero_shows_the_login_page,
    max_age_older_than_the_login_shows_the_login_page,
    acr_values_second_password_asks_only_for_the_second_password,
    client_min_acr_asks_for_the_step_up,
    second_password_level_for_an_unenrolled_student_issues_no_code,
    another_student_on_the_same_browser_ends_the_first_session,
);

fn aud_contains(claims: &Value, client_id: &str) -> bool {
    match &claims["aud"] {
        Value::String(aud) => aud == client_id,
        Value::Array(auds) => auds.iter().any(|a| a == client_id),
        _ => false,
    }
}

async fn code_flow_as_an_openidconnect_relying_party(backend: Backend) {
    let app = TestApp::start(backend).await;
    let rp = app.rp("rp-basic").await;
    let started = rp.start(&["profile", "email", "student"], &[]);
    let browser = app.browser();
    let login_time = app.now();

    let reply = browser.sign_in(&started.url, &TARO, Level::Password).await;
    let params = reply.callback();
    assert_eq!(params["state"], *started.state.secret());
    assert_eq!(params["iss"], app.issuer, "RFC 9207 iss in the response");
    assert!(!params.contains_key("error"), "{params:?}");

    let tokens = rp.exchange(&params["code"], started.verifier).await;
    let claims = rp.verify(&tokens, &started.nonce, "RS256");
    assert_eq!(claims["iss"], app.issuer);
    assert!(aud_contains(&claims, "rp-basic"), "{claims}");
    assert_eq!(claims["azp"], "rp-basic");
    assert_eq!(claims["acr"], ACR_PASSWORD);
    assert_eq!(claims["amr"], json!(["pwd"]), "never mfa: {claims}");
    assert_eq!(claims["auth_time"], json!(login_time));
    assert_eq!(claims["nonce"], *started.nonce.secret());
    assert!(
        claims["sid"].as_str().is_some_and(|s| !s.is_empty()),
        "{claims}"
    );
    assert!(claims["at_hash"].is_string());
    let sub = claims["sub"].as_str().expect("sub").to_string();
    assert!(
        !sub.contains(TARO.username),
        "sub must not leak the user ID: {sub}"
    );
    assert!(!claims.to_string().contains("mfa"));

    let userinfo = rp.userinfo(&tokens, &sub).await;
    assert_eq!(userinfo["sub"], sub);
    assert_eq!(userinfo["name"], "Taro Gakusei");
    assert_eq!(userinfo["family_name"], "Gakusei");
    assert_eq!(userinfo["given_name"], "Taro");
    assert_eq!(userinfo["preferred_username"], TARO.username);
    assert_eq!(userinfo["email"], TARO.email.unwrap());
    assert_eq!(userinfo["email_verified"], true);
    assert_eq!(userinfo["student_id"], "S2401001");
    assert_eq!(userinfo["affiliation"], "student");
}

async fn second_password_login_reaches_the_second_password_level(backend: Backend) {
    let app = TestApp::start(backend).await;
    let rp = app.rp("rp-basic").await;
    let started = rp.start(&["profile"], &[]);
    let browser = app.browser();
    let reply = browser
        .sign_in(&started.url, &TARO, Level::SecondPassword)
        .await;
    let tokens = rp.exchange(&reply.code(), started.verifier).await;
    let claims = rp.verify(&tokens, &started.nonce, "RS256");
    assert_eq!(claims["acr"], ACR_SECOND_PASSWORD);
    assert_eq!(
        claims["amr"],
        json!(["pwd"]),
        "both factors are passwords: {claims}"
    );
    assert_eq!(claims["auth_time"], json!(app.now()));
}

async fn client_secret_post_and_public_clients_complete_the_flow(backend: Backend) {
    let app = TestApp::start(backend).await;
    for client_id in ["rp-post", "rp-public"] {
        let rp = app.rp(client_id).await;
        let started = rp.start(&["profile"], &[]);
        let reply = app
            .browser()
            .sign_in(&started.url, &TARO, Level::Password)
            .await;
        let tokens = rp.exchange(&reply.code(), started.verifier).await;
        let claims = rp.verify(&tokens, &started.nonce, "RS256");
        assert!(aud_contains(&claims, client_id), "{claims}");
        assert_eq!(claims["azp"], client_id);
    }
}

async fn es256_and_eddsa_id_tokens_for_clients_that_ask(backend: Backend) {
    let app = TestApp::start(backend).await;
    for (client_id, alg) in [("rp-es256", "ES256"), ("rp-eddsa", "EdDSA")] {
        let rp = app.rp(client_id).await;
        let started = rp.start(&[], &[]);
        let reply = app
            .browser()
            .sign_in(&started.url, &TARO, Level::Password)
            .await;
        let tokens = rp.exchange(&reply.code(), started.verifier).await;
        // Checks the signature with the JWKS key of that type and at_hash with its hash.
        let claims = rp.verify(&tokens, &started.nonce, alg);
        assert_eq!(claims["azp"], client_id);
    }
}

async fn existing_session_issues_a_code_without_the_login_page(backend: Backend) {
    let app = TestApp::start(backend).await;
    let browser = app.browser();
    let login_time = app.now();
    let first = app
        .tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    app.advance(60);

    let authz = Authz::new("rp-basic");
    let reply = browser.get(&authz.url(&app.issuer)).await;
    let params = reply.callback();
    assert_eq!(params["state"], authz.state());
    assert_eq!(params["iss"], app.issuer);
    let second = app.exchange(&authz, &params["code"]).await;
    let (a, b) = (first.id_claims(), second.id_claims());
    assert_eq!(a["sid"], b["sid"], "same browser session, same sid");
    assert_eq!(a["sub"], b["sub"]);
    assert_eq!(
        b["auth_time"],
        json!(login_time),
        "no new authentication happened"
    );
}

async fn idle_timeout_asks_for_the_login_again(backend: Backend) {
    let app = TestApp::start(backend).await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    app.advance(16 * 60);
    let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    assert!(
        page.is_login_page(),
        "idle session must not be used: {page:?}"
    );
}

async fn using_the_session_restarts_the_idle_timer(backend: Backend) {
    let app = TestApp::start(backend).await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    for _ in 0..3 {
        app.advance(10 * 60);
        let reply = browser.get(&Authz::new("rp-basic").url(&app.issuer)).await;
        reply.code();
    }
}

async fn prompt_none_without_a_session_is_login_required(backend: Backend) {
    let app = TestApp::start(backend).await;
    let authz = Authz::new("rp-basic").set("prompt", "none");
    let reply = app.browser().get(&authz.url(&app.issuer)).await;
    let params = reply.callback();
    assert_eq!(params["error"], "login_required");
    assert_eq!(params["state"], authz.state());
    assert_eq!(params["iss"], app.issuer);
    assert!(!params.contains_key("code"));
}

async fn prompt_none_with_a_session_issues_a_code(backend: Backend) {
    let app = TestApp::start(backend).await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    let authz = Authz::new("rp-other").set("prompt", "none");
    let reply = browser.get(&authz.url(&app.issuer)).await;
    let code = reply.code();
    let tokens = app.exchange(&authz, &code).await;
    assert_eq!(tokens.id_claims()["acr"], ACR_PASSWORD);
}

async fn prompt_login_shows_the_login_page_despite_a_session(backend: Backend) {
    let app = TestApp::start(backend).await;
    let browser = app.browser();
    let first = app
        .tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    app.advance(300);
    let authz = Authz::new("rp-basic").set("prompt", "login");
    let page = browser.open(&authz.url(&app.issuer)).await;
    assert!(page.is_login_page(), "{page:?}");
    let reply = browser
        .submit_login(&page, TARO.username, TARO.password, "")
        .await;
    let second = app.exchange(&authz, &reply.code()).await;
    assert_eq!(
        second.id_claims()["auth_time"],
        json!(app.now()),
        "auth_time is the new login"
    );
    assert_eq!(first.id_claims()["sid"], second.id_claims()["sid"]);
}

async fn max_age_zero_shows_the_login_page(backend: Backend) {
    let app = TestApp::start(backend).await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    app.advance(5);
    let authz = Authz::new("rp-basic").set("max_age", "0");
    let page = browser.open(&authz.url(&app.issuer)).await;
    assert!(page.is_login_page(), "{page:?}");
    let reply = browser
        .submit_login(&page, TARO.username, TARO.password, "")
        .await;
    let tokens = app.exchange(&authz, &reply.code()).await;
    assert_eq!(tokens.id_claims()["auth_time"], json!(app.now()));
}

async fn max_age_older_than_the_login_shows_the_login_page(backend: Backend) {
    let app = TestApp::start(backend).await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    app.advance(5 * 60);
    let fresh_enough = Authz::new("rp-basic").set("max_age", "600");
    browser.get(&fresh_enough.url(&app.issuer)).await.code();
    let too_old = Authz::new("rp-basic").set("max_age", "120");
    let page = browser.open(&too_old.url(&app.issuer)).await;
    assert!(page.is_login_page(), "{page:?}");
}

async fn acr_values_second_password_asks_only_for_the_second_password(backend: Backend) {
    let app = TestApp::start(backend).await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    app.advance(30);
    let authz = Authz::new("rp-basic").set("acr_values", ACR_SECOND_PASSWORD);
    let page = browser.open(&authz.url(&app.issuer)).await;
    assert!(
        page.is_step_up_page(),
        "step-up, not the full login: {page:?}"
    );
    let reply = browser
        .submit_step_up(&page, TARO.second_password.unwrap())
        .await;
    let tokens = app.exchange(&authz, &reply.code()).await;
    let claims = tokens.id_claims();
    assert_eq!(claims["acr"], ACR_SECOND_PASSWORD);
    assert_eq!(claims["amr"], json!(["pwd"]));
    assert_eq!(claims["auth_time"], json!(app.now()));
}

async fn client_min_acr_asks_for_the_step_up(backend: Backend) {
    let app = TestApp::start(backend).await;
    let browser = app.browser();
    // A fresh browser: the full login page with all three fields satisfies the client at once.
    let authz = Authz::new("rp-step");
    let tokens = app
        .tokens_with(&browser, authz, &TARO, Level::SecondPassword)
        .await;
    assert_eq!(tokens.id_claims()["acr"], ACR_SECOND_PASSWORD);

    // A browser signed in at the password level is asked only for the second password.
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    let authz = Authz::new("rp-step");
    let page = browser.open(&authz.url(&app.issuer)).await;
    assert!(page.is_step_up_page(), "{page:?}");
    let wrong = browser.submit_step_up(&page, "Wrong-second-1").await;
    assert!(
        wrong.is_step_up_page(),
        "a wrong second password: the form again"
    );
    assert!(wrong.body.contains("role=\"alert\""), "{wrong:?}");
    let reply = browser
        .submit_step_up(&wrong, TARO.second_password.unwrap())
        .await;
    let tokens = app.exchange(&authz, &reply.code()).await;
    assert_eq!(tokens.id_claims()["acr"], ACR_SECOND_PASSWORD);
}

async fn second_password_level_for_an_unenrolled_student_issues_no_code(backend: Backend) {
    let app = TestApp::start(backend).await;
    let browser = app.browser();
    let authz = Authz::new("rp-basic").set("acr_values", ACR_SECOND_PASSWORD);
    let reply = browser
        .sign_in(&authz.url(&app.issuer), &HANAKO, Level::Password)
        .await;
    assert!(!reply.status.is_server_error(), "{reply:?}");
    let reply = browser.follow(reply).await;
    let gave_code = reply.status == StatusCode::SEE_OTHER
        && reply
            .location
            .as_deref()
            .is_some_and(|l| l.starts_with(REDIRECT_URI) && l.contains("code="));
    assert!(
        !gave_code,
        "an unenrolled student cannot reach the second-password level: {reply:?}"
    );
}

async fn another_student_on_the_same_browser_ends_the_first_session(backend: Backend) {
    let app = TestApp::start(backend).await;
    let browser = app.browser();
    let taro = app
        .tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    let authz = Authz::new("rp-basic").set("prompt", "login");
    let page = browser.open(&authz.url(&app.issuer)).await;
    let reply = browser
        .submit_login(&page, JIRO.username, JIRO.password, "")
        .await;
    let jiro = app.exchange(&authz, &reply.code()).await;
    assert_ne!(taro.id_claims()["sub"], jiro.id_claims()["sub"]);
    assert_ne!(
        taro.id_claims()["sid"],
        jiro.id_claims()["sid"],
        "a new session"
    );
    let refreshed = app.refresh("rp-basic", taro.refresh()).await;
    assert_eq!(
        refreshed.error(),
        "invalid_grant",
        "the first student's session ended, and its online refresh tokens with it"
    );
    assert_eq!(app.introspect(&taro.access_token).await["active"], false);
}

#[tokio::test]
async fn user_id_is_normalised_at_login() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic");
    let browser = app.browser();
    let page = browser.open(&authz.url(&app.issuer)).await;
    // Full-width, upper case, surrounding spaces: the same student.
    let reply = browser
        .submit_login(&page, "  Ｓ２４０１００１ ", TARO.password, "")
        .await;
    let tokens = app.exchange(&authz, &reply.code()).await;
    let userinfo = app.userinfo(&tokens.access_token).await.json();
    assert_eq!(userinfo["preferred_username"], TARO.username);
}

#[tokio::test]
async fn wrong_password_shows_the_form_again_without_the_password() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let authz = Authz::new("rp-basic");
    let page = browser.open(&authz.url(&app.issuer)).await;
    let typed = "Wrong-Password-xyz";
    let reply = browser.submit_login(&page, TARO.username, typed, "").await;
    assert!(reply.is_login_page(), "{reply:?}");
    assert!(reply.body.contains("role=\"alert\""), "{reply:?}");
    assert!(
        !reply.body.contains(typed),
        "the rejected password is never shown"
    );
    assert!(!browser.has_session());
    // Unknown user: the same page.
    let page = browser.open(&authz.url(&app.issuer)).await;
    let reply = browser
        .submit_login(&page, "s9999999", TARO.password, "")
        .await;
    assert!(reply.is_login_page() && reply.body.contains("role=\"alert\""));
    // A wrong second password for an enrolled student: the generic failure too.
    let page = browser.open(&authz.url(&app.issuer)).await;
    let reply = browser
        .submit_login(&page, TARO.username, TARO.password, "Wrong-second-9")
        .await;
    assert!(reply.is_login_page() && reply.body.contains("role=\"alert\""));
    assert!(!browser.has_session());
}

#[tokio::test]
async fn authorization_request_by_post_form() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let authz = Authz::new("rp-basic");
    let fields: Vec<(&str, &str)> = authz
        .params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let reply = browser.post(&app.url("/authorize"), &fields).await;
    let page = browser.follow(reply).await;
    let reply = browser
        .submit_login(&page, TARO.username, TARO.password, "")
        .await;
    app.exchange(&authz, &reply.code()).await;
}

#[tokio::test]
async fn login_answers_with_303_and_sets_safe_cookies() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let authz = Authz::new("rp-basic");
    let first = browser.get(&authz.url(&app.issuer)).await;
    assert_eq!(first.status, StatusCode::SEE_OTHER);
    assert!(first.is_redirect_to("/login"), "{first:?}");
    let page = browser.follow(first).await;
    let reply = browser
        .submit_login(&page, TARO.username, TARO.password, "")
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SEE_OTHER,
        "303 after the POST, never 307/308"
    );
    let cookies: Vec<&str> = reply
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let session = cookies
        .iter()
        .find(|c| c.starts_with("nidan_session="))
        .unwrap_or_else(|| panic!("a session cookie: {cookies:?}"));
    let lower = session.to_ascii_lowercase();
    assert!(lower.contains("httponly"), "{session}");
    assert!(lower.contains("samesite=lax"), "{session}");
    assert!(
        !lower.contains("secure"),
        "no Secure on a loopback http issuer: {session}"
    );
    assert!(lower.contains("path=/"), "{session}");
}

#[tokio::test]
async fn claims_parameter_releases_claims_by_name() {
    let app = TestApp::sqlite().await;
    let claims = json!({
        "id_token": { "email": null, "preferred_username": null },
        "userinfo": { "student_id": null }
    });
    let authz = Authz::new("rp-basic")
        .set("scope", "openid")
        .set("claims", &claims.to_string());
    let tokens = app
        .tokens_with(&app.browser(), authz, &TARO, Level::Password)
        .await;
    let id = tokens.id_claims();
    assert_eq!(id["email"], TARO.email.unwrap(), "{id}");
    assert_eq!(id["preferred_username"], TARO.username, "{id}");
    assert!(
        id.get("student_id").is_none(),
        "not asked for in the ID token: {id}"
    );
    let userinfo = app.userinfo(&tokens.access_token).await.json();
    assert_eq!(userinfo["student_id"], "S2401001", "{userinfo}");
    assert!(
        userinfo.get("name").is_none(),
        "profile was not granted: {userinfo}"
    );
}

#[tokio::test]
async fn scopes_limit_the_released_claims() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic").set("scope", "openid profile");
    let tokens = app
        .tokens_with(&app.browser(), authz, &TARO, Level::Password)
        .await;
    let userinfo = app.userinfo(&tokens.access_token).await.json();
    assert_eq!(userinfo["name"], "Taro Gakusei");
    assert!(userinfo.get("email").is_none(), "{userinfo}");
    assert!(userinfo.get("student_id").is_none(), "{userinfo}");
}

#[tokio::test]
async fn pairwise_clients_see_their_own_sub() {
    let app = TestApp::builder(Backend::Sqlite)
        .client(TestClient {
            client_id: "rp-pairwise",
            secret: Some("pairwise-secret-0123456789abcdef"),
            settings: json!({
                "client_id": "rp-pairwise",
                "redirect_uris": [REDIRECT_URI],
                "token_endpoint_auth_method": "client_secret_basic",
                "subject_type": "pairwise",
                "sector_identifier": "pairwise.example.ac.jp",
                "scopes": ["openid", "profile"],
            }),
        })
        .build()
        .await;
    let browser = app.browser();
    let public = app
        .tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    // The browser's session answers the second client at once.
    let authz = Authz::new("rp-pairwise").set("scope", "openid profile");
    let code = browser.get(&authz.url(&app.issuer)).await.code();
    let pairwise = app.exchange(&authz, &code).await;
    let (public_sub, pairwise_sub) = (
        public.id_claims()["sub"].clone(),
        pairwise.id_claims()["sub"].clone(),
    );
    assert_ne!(public_sub, pairwise_sub);
    let userinfo = app.userinfo(&pairwise.access_token).await.json();
    assert_eq!(
        userinfo["sub"], pairwise_sub,
        "userinfo uses the same pairwise sub"
    );
    // Stable: a second login gives the same pairwise sub.
    let again = app
        .tokens_with(
            &app.browser(),
            Authz::new("rp-pairwise").set("scope", "openid"),
            &TARO,
            Level::Password,
        )
        .await;
    assert_eq!(again.id_claims()["sub"], pairwise_sub);
}

#[tokio::test]
async fn login_page_without_a_pending_request_leads_to_the_account_page() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let page = browser.get("/login").await;
    assert!(page.is_login_page(), "{page:?}");
    let reply = browser
        .submit_login(
            &page,
            TARO.username,
            TARO.password,
            TARO.second_password.unwrap(),
        )
        .await;
    assert!(reply.is_redirect_to("/account"), "{reply:?}");
    let account = browser.get("/account").await;
    assert_eq!(account.status, StatusCode::OK, "{account:?}");
    let anonymous = app.browser().get("/account").await;
    assert!(anonymous.is_redirect_to("/login"), "{anonymous:?}");
}

#[tokio::test]
async fn essential_acr_claim_asks_for_the_step_up() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    let claims =
        json!({ "id_token": { "acr": { "essential": true, "values": [ACR_SECOND_PASSWORD] } } });
    let authz = Authz::new("rp-basic").set("claims", &claims.to_string());
    let page = browser.open(&authz.url(&app.issuer)).await;
    assert!(page.is_step_up_page(), "{page:?}");
    let reply = browser
        .submit_step_up(&page, TARO.second_password.unwrap())
        .await;
    let tokens = app.exchange(&authz, &reply.code()).await;
    assert_eq!(tokens.id_claims()["acr"], ACR_SECOND_PASSWORD);
}

#[tokio::test]
async fn the_lowest_listed_acr_the_session_meets_is_enough() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    let both = format!("{ACR_SECOND_PASSWORD} {ACR_PASSWORD}");
    let authz = Authz::new("rp-basic").set("acr_values", &both);
    let code = browser.get(&authz.url(&app.issuer)).await.code();
    let tokens = app.exchange(&authz, &code).await;
    assert_eq!(tokens.id_claims()["acr"], ACR_PASSWORD);
}

#[tokio::test]
async fn a_second_password_session_answers_password_level_clients_at_its_level() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    app.tokens_with(
        &browser,
        Authz::new("rp-basic"),
        &TARO,
        Level::SecondPassword,
    )
    .await;
    let authz = Authz::new("rp-other");
    let code = browser.get(&authz.url(&app.issuer)).await.code();
    let tokens = app.exchange(&authz, &code).await;
    assert_eq!(tokens.id_claims()["acr"], ACR_SECOND_PASSWORD);
}

#[tokio::test]
async fn session_cookie_changes_at_login_and_step_up_but_sid_stays() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let first = app
        .tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    let cookie_1 = browser.cookie("nidan_session").expect("a session cookie");

    let authz = Authz::new("rp-basic").set("acr_values", ACR_SECOND_PASSWORD);
    let page = browser.open(&authz.url(&app.issuer)).await;
    let reply = browser
        .submit_step_up(&page, TARO.second_password.unwrap())
        .await;
    let stepped = app.exchange(&authz, &reply.code()).await;
    let cookie_2 = browser.cookie("nidan_session").unwrap();
    assert_ne!(cookie_1, cookie_2, "a new cookie value at the step-up");

    let authz = Authz::new("rp-basic").set("prompt", "login");
    let page = browser.open(&authz.url(&app.issuer)).await;
    let reply = browser
        .submit_login(&page, TARO.username, TARO.password, "")
        .await;
    let again = app.exchange(&authz, &reply.code()).await;
    let cookie_3 = browser.cookie("nidan_session").unwrap();
    assert_ne!(cookie_2, cookie_3, "a new cookie value at every login");

    let sid = first.id_claims()["sid"].clone();
    assert_eq!(stepped.id_claims()["sid"], sid);
    assert_eq!(again.id_claims()["sid"], sid);

    // The old cookie values no longer open the session.
    let stale = app.browser();
    stale.set_cookie("nidan_session", &cookie_1);
    let page = stale.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    assert!(page.is_login_page(), "{page:?}");
}

#[tokio::test]
async fn pending_request_lives_at_least_an_hour() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let authz = Authz::new("rp-basic");
    let page = browser.open(&authz.url(&app.issuer)).await;
    app.advance(61 * 60);
    let reply = browser
        .submit_login(&page, TARO.username, TARO.password, "")
        .await;
    app.exchange(&authz, &reply.code()).await;
}

#[tokio::test]
async fn sso_false_clients_always_get_a_fresh_login() {
    let app = TestApp::builder(Backend::Sqlite)
        .client(TestClient {
            client_id: "rp-kiosk",
            secret: Some("kiosk-secret-0123456789abcdef"),
            settings: json!({
                "client_id": "rp-kiosk",
                "redirect_uris": [REDIRECT_URI],
                "token_endpoint_auth_method": "client_secret_basic",
                "scopes": ["openid", "profile", "email", "student"],
                "sso": false,
            }),
        })
        .build()
        .await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    let page = browser.open(&Authz::new("rp-kiosk").url(&app.issuer)).await;
    assert!(
        page.is_login_page(),
        "a shared terminal never reuses a session: {page:?}"
    );
}

#[tokio::test]
async fn unenrolled_student_completes_no_authorization() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let authz = Authz::new("rp-basic");
    let reply = browser
        .sign_in(&authz.url(&app.issuer), &HANAKO, Level::Password)
        .await;
    assert!(
        !reply
            .location
            .as_deref()
            .is_some_and(|l| l.starts_with(REDIRECT_URI)),
        "enrollment comes before any authorization: {reply:?}"
    );
    assert!(reply.is_redirect_to("/enroll/email"), "{reply:?}");
    // Coming back through the client does not skip it either.
    let again = browser.get(&Authz::new("rp-basic").url(&app.issuer)).await;
    assert!(
        !again
            .location
            .as_deref()
            .is_some_and(|l| l.starts_with(REDIRECT_URI)),
        "{again:?}"
    );
}

#[tokio::test]
async fn state_round_trips_exactly() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let state = "a b&c=d/é?#+%20";
    let authz = Authz::new("rp-basic").set("state", state);
    let reply = browser
        .sign_in(&authz.url(&app.issuer), &TARO, Level::Password)
        .await;
    assert_eq!(reply.callback()["state"], state);
    let authz = Authz::new("rp-basic")
        .set("state", state)
        .set("prompt", "none");
    let reply = browser.get(&authz.url(&app.issuer)).await;
    assert_eq!(reply.callback()["state"], state);
    let authz = Authz::new("rp-basic")
        .set("state", state)
        .set("response_type", "token");
    let reply = browser.get(&authz.url(&app.issuer)).await;
    assert_eq!(reply.callback()["state"], state);
}

#[tokio::test]
async fn redirect_uri_with_a_query_keeps_it() {
    let registered = "http://127.0.0.1:9999/cb?tenant=x%20y&lang=ja";
    let app = TestApp::builder(Backend::Sqlite)
        .client(TestClient {
            client_id: "rp-query",
            secret: Some("query-secret-0123456789abcdef"),
            settings: json!({
                "client_id": "rp-query",
                "redirect_uris": [registered],
                "token_endpoint_auth_method": "client_secret_basic",
                "scopes": ["openid", "profile", "email", "student"],
            }),
        })
        .build()
        .await;
    let authz = Authz::new("rp-query").set("redirect_uri", registered);
    let reply = app
        .browser()
        .sign_in(&authz.url(&app.issuer), &TARO, Level::Password)
        .await;
    let params = reply.callback();
    assert_eq!(params["tenant"], "x y", "{reply:?}");
    assert_eq!(params["lang"], "ja");
    assert_eq!(params["iss"], app.issuer);
    app.exchange(&authz, &params["code"]).await;
    // Without the query it is another URI.
    let other = Authz::new("rp-query").set("redirect_uri", REDIRECT_URI);
    let reply = app.browser().get(&other.url(&app.issuer)).await;
    assert!(reply.is_error_page(StatusCode::BAD_REQUEST), "{reply:?}");
}

#[tokio::test]
async fn prompt_none_never_shows_the_step_up_page() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    let authz = Authz::new("rp-step").set("prompt", "none");
    let reply = browser.get(&authz.url(&app.issuer)).await;
    let params = reply.callback();
    let error = params.get("error").map(String::as_str);
    assert!(
        matches!(error, Some("login_required" | "interaction_required")),
        "{params:?}"
    );
    assert_eq!(params["iss"], app.issuer);
}

#[tokio::test]
async fn a_login_form_submitted_twice_issues_one_code() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let authz = Authz::new("rp-basic");
    let page = browser.open(&authz.url(&app.issuer)).await;
    let first = browser
        .submit_login(&page, TARO.username, TARO.password, "")
        .await;
    first.code();
    let second = browser
        .submit_login(&page, TARO.username, TARO.password, "")
        .await;
    assert!(!second.status.is_server_error(), "{second:?}");
    assert!(
        !second
            .location
            .as_deref()
            .is_some_and(|l| l.contains("code=")),
        "a finished request gives no second code: {second:?}"
    );
}

#[tokio::test]
async fn id_token_lifetime_and_refresh_at_hash() {
    let app = TestApp::sqlite().await;
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let claims = tokens.id_claims();
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(iat, app.now());
    assert_eq!(exp - iat, 600, "lifetimes.id_token defaults to 10 minutes");
    assert_eq!(tokens.body["expires_in"], 600);
    let refreshed = Tokens::from(app.refresh("rp-basic", tokens.refresh()).await.json());
    let at_hash = {
        use base64::Engine;
        use sha2::Digest;
        let digest = sha2::Sha256::digest(refreshed.access_token.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..16])
    };
    assert_eq!(refreshed.id_claims()["at_hash"], at_hash);
}

#[tokio::test]
async fn reflected_values_are_escaped() {
    let app = TestApp::sqlite().await;
    let payload = "\"><script>alert(1)</script>";
    let authz = Authz::new("rp-basic").set("login_hint", payload);
    let page = app.browser().open(&authz.url(&app.issuer)).await;
    assert!(page.is_login_page(), "{page:?}");
    assert!(!page.body.contains("<script>alert(1)"), "{page:?}");
    let form = html::forms(&page.body)
        .into_iter()
        .find(|f| f.action == "/login")
        .unwrap();
    assert_eq!(
        form.value("username"),
        Some(payload),
        "escaped, not dropped"
    );

    let bad = Authz::new("rp-basic")
        .add("<script>x</script>", "1")
        .add("<script>x</script>", "2");
    let reply = app.browser().get(&bad.url(&app.issuer)).await;
    assert!(!reply.body.contains("<script>x"), "{reply:?}");
    let failed = {
        let browser = app.browser();
        let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
        browser
            .submit_login(&page, payload, "wrong-password", "")
            .await
    };
    assert!(!failed.body.contains("<script>alert(1)"), "{failed:?}");
}

#[tokio::test]
async fn an_aged_second_password_asks_only_for_the_step_up() {
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "session": { "step_up_lifetime": "30m" } }))
        .build()
        .await;
    let browser = app.browser();
    app.tokens_with(
        &browser,
        Authz::new("rp-basic"),
        &TARO,
        Level::SecondPassword,
    )
    .await;
    // Kept alive at the password level past the step-up lifetime.
    for _ in 0..4 {
        app.advance(10 * 60);
        let authz = Authz::new("rp-basic");
        let code = browser.get(&authz.url(&app.issuer)).await.code();
        let tokens = app.exchange(&authz, &code).await;
        let expected = if app.now() - tokens.id_claims()["auth_time"].as_i64().unwrap() <= 30 * 60 {
            ACR_SECOND_PASSWORD
        } else {
            ACR_PASSWORD
        };
        assert_eq!(tokens.id_claims()["acr"], expected);
    }
    let page = browser.open(&Authz::new("rp-step").url(&app.issuer)).await;
    assert!(
        page.is_step_up_page(),
        "only the second password again: {page:?}"
    );
}

#[tokio::test]
async fn max_age_older_than_the_second_password_asks_only_for_the_step_up() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    app.tokens_with(
        &browser,
        Authz::new("rp-basic"),
        &TARO,
        Level::SecondPassword,
    )
    .await;
    app.advance(20 * 60);
    // A fresh university password, the second password 20 minutes old.
    let authz = Authz::new("rp-basic").set("prompt", "login");
    let page = browser.open(&authz.url(&app.issuer)).await;
    browser
        .submit_login(&page, TARO.username, TARO.password, "")
        .await
        .code();
    app.advance(60);
    let authz = Authz::new("rp-basic")
        .set("acr_values", ACR_SECOND_PASSWORD)
        .set("max_age", "600");
    let page = browser.open(&authz.url(&app.issuer)).await;
    assert!(page.is_step_up_page(), "{page:?}");
    let reply = browser
        .submit_step_up(&page, TARO.second_password.unwrap())
        .await;
    let tokens = app.exchange(&authz, &reply.code()).await;
    assert_eq!(tokens.id_claims()["acr"], ACR_SECOND_PASSWORD);
    assert_eq!(tokens.id_claims()["auth_time"], json!(app.now()));
}

#[tokio::test]
async fn the_menu_needs_a_recent_second_password() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let page = browser.get("/login").await;
    let reply = browser
        .submit_login(
            &page,
            TARO.username,
            TARO.password,
            TARO.second_password.unwrap(),
        )
        .await;
    assert!(reply.is_redirect_to("/account"), "{reply:?}");
    assert_eq!(browser.get("/account").await.status, StatusCode::OK);
    app.advance(6 * 60);
    let reply = browser.get("/account").await;
    assert!(reply.is_redirect_to("/login/step-up"), "{reply:?}");
}

#[tokio::test]
async fn absolute_timeout_ends_the_session() {
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "session": { "idle_timeout": "9h", "absolute_timeout": "8h" } }))
        .build()
        .await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    app.advance(7 * 3600);
    browser
        .get(&Authz::new("rp-basic").url(&app.issuer))
        .await
        .code();
    app.advance(3600 + 1);
    let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    assert!(page.is_login_page(), "{page:?}");
}

#[tokio::test]
async fn every_nidan_cookie_is_httponly_and_lax() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let mut cookies = Vec::new();
    let first = browser.get(&Authz::new("rp-basic").url(&app.issuer)).await;
    let page = browser.follow(first.clone()).await;
    let login = browser
        .submit_login(
            &page,
            TARO.username,
            TARO.password,
            TARO.second_password.unwrap(),
        )
        .await;
    for reply in [&first, &page, &login] {
        for value in reply.headers.get_all("set-cookie") {
            cookies.push(value.to_str().unwrap().to_string());
        }
    }
    assert!(
        cookies.iter().any(|c| c.starts_with("nidan_browser=")),
        "{cookies:?}"
    );
    assert!(
        cookies.iter().any(|c| c.starts_with("nidan_session=")),
        "{cookies:?}"
    );
    for cookie in &cookies {
        let lower = cookie.to_ascii_lowercase();
        assert!(lower.contains("; httponly"), "{cookie}");
        assert!(lower.contains("; samesite=lax"), "{cookie}");
    }
}
