//! Throttling as a student sees it: failures only count, a second-password lockout blocks only
//! the second-password level and is told only after a correct university password, unknown and
//! known user IDs get the same answer.
use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

/// An app where three failures lock, in a 15-minute window.
async fn strict_app() -> TestApp {
    TestApp::builder(Backend::Sqlite)
        .config(json!({
            "throttle": { "password_failures": 3, "second_password_failures": 3, "window": "15m" }
        }))
        .build()
        .await
}

/// The text of the page's `role="alert"` element.
fn alert(reply: &Reply) -> String {
    let start = reply
        .body
        .find("role=\"alert\"")
        .unwrap_or_else(|| panic!("an alert: {reply:?}"));
    let rest = &reply.body[start..];
    let end = rest.find("</div>").unwrap_or(rest.len());
    rest[..end].to_string()
}

/// One login attempt from a fresh page of `browser` for `rp-basic`.
async fn attempt(
    app: &TestApp,
    browser: &Browser,
    username: &str,
    password: &str,
    second: &str,
) -> Reply {
    let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    browser
        .submit_login(&page, username, password, second)
        .await
}

fn is_code(reply: &Reply) -> bool {
    reply.status == StatusCode::SEE_OTHER
        && reply
            .location
            .as_deref()
            .is_some_and(|l| l.starts_with(REDIRECT_URI) && l.contains("code="))
}

#[tokio::test]
async fn unknown_and_known_user_ids_get_the_same_failure() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let known = attempt(&app, &browser, TARO.username, "Wrong-pass-1", "").await;
    let unknown = attempt(&app, &browser, "s9999999", "Wrong-pass-1", "").await;
    let wrong_second = attempt(&app, &browser, TARO.username, TARO.password, "Wrong-2nd-1").await;
    assert_eq!(known.status, unknown.status);
    assert_eq!(alert(&known), alert(&unknown));
    assert_eq!(
        alert(&known),
        alert(&wrong_second),
        "the generic failure message"
    );
}

#[tokio::test]
async fn second_password_lockout_blocks_only_the_second_password_level() {
    let app = strict_app().await;
    let browser = app.browser();
    for _ in 0..3 {
        let reply = attempt(&app, &browser, TARO.username, TARO.password, "Wrong-2nd-1").await;
        assert!(
            !is_code(&reply) && reply.body.contains("role=\"alert\""),
            "{reply:?}"
        );
    }
    // Locked: the right second password is refused, and the page says so (the university
    // password was right) with the help desk.
    let locked = attempt(
        &app,
        &browser,
        TARO.username,
        TARO.password,
        TARO.second_password.unwrap(),
    )
    .await;
    assert!(!is_code(&locked), "{locked:?}");
    assert!(!locked.status.is_server_error());
    let generic = attempt(&app, &app.browser(), "s9999999", "x-Wrong-1", "").await;
    assert_ne!(
        alert(&locked),
        alert(&generic),
        "the lock is told: {locked:?}"
    );
    assert!(!browser.has_session());

    // The password level still works.
    let reply = attempt(&app, &browser, TARO.username, TARO.password, "").await;
    assert!(is_code(&reply), "{reply:?}");

    // The lock lasts the window.
    app.advance(15 * 60 + 1);
    let browser = app.browser();
    let reply = attempt(
        &app,
        &browser,
        TARO.username,
        TARO.password,
        TARO.second_password.unwrap(),
    )
    .await;
    assert!(is_code(&reply), "{reply:?}");
}

#[tokio::test]
async fn step_up_failures_count_toward_the_same_lock() {
    let app = strict_app().await;
    let browser = app.browser();
    app.tokens_with(&browser, Authz::new("rp-basic"), &TARO, Level::Password)
        .await;
    let authz = Authz::new("rp-step");
    let mut page = browser.open(&authz.url(&app.issuer)).await;
    for _ in 0..3 {
        page = browser.submit_step_up(&page, "Wrong-2nd-1").await;
        assert!(
            page.is_step_up_page() || page.status == StatusCode::TOO_MANY_REQUESTS,
            "{page:?}"
        );
    }
    let page = browser.open(&authz.url(&app.issuer)).await;
    let reply = if page.is_step_up_page() {
        browser
            .submit_step_up(&page, TARO.second_password.unwrap())
            .await
    } else {
        page
    };
    assert!(
        !is_code(&reply),
        "locked after three wrong second passwords: {reply:?}"
    );
}

#[tokio::test]
async fn wrong_university_passwords_lock_this_address_for_a_while() {
    let app = strict_app().await;
    let browser = app.browser();
    for _ in 0..3 {
        let reply = attempt(&app, &browser, TARO.username, "Wrong-pass-1", "").await;
        assert!(!is_code(&reply), "{reply:?}");
    }
    let refused = attempt(&app, &browser, TARO.username, TARO.password, "").await;
    assert!(!is_code(&refused), "locked: {refused:?}");
    let generic = attempt(&app, &app.browser(), "s9999999", "x-Wrong-1", "").await;
    assert_eq!(
        alert(&refused),
        alert(&generic),
        "a university-password lock looks like a failure"
    );
    // Refused attempts do not extend the lock: it ends one window after the third failure.
    app.advance(15 * 60 + 1);
    let reply = attempt(&app, &browser, TARO.username, TARO.password, "").await;
    assert!(is_code(&reply), "{reply:?}");
}

#[tokio::test]
async fn a_successful_login_forgets_earlier_failures() {
    let app = strict_app().await;
    let browser = app.browser();
    for _ in 0..2 {
        attempt(&app, &browser, TARO.username, "Wrong-pass-1", "").await;
    }
    let ok = attempt(
        &app,
        &app.browser(),
        TARO.username,
        TARO.password,
        TARO.second_password.unwrap(),
    )
    .await;
    assert!(is_code(&ok), "{ok:?}");
    for _ in 0..2 {
        attempt(&app, &browser, TARO.username, "Wrong-pass-1", "").await;
    }
    let reply = attempt(&app, &app.browser(), TARO.username, TARO.password, "").await;
    assert!(
        is_code(&reply),
        "two failures after a success do not lock: {reply:?}"
    );
}

#[tokio::test]
async fn another_student_is_not_locked_by_a_neighbours_failures() {
    let app = strict_app().await;
    let browser = app.browser();
    for _ in 0..3 {
        attempt(&app, &browser, TARO.username, "Wrong-pass-1", "").await;
    }
    let reply = attempt(&app, &browser, JIRO.username, JIRO.password, "").await;
    assert!(is_code(&reply), "{reply:?}");
}

#[tokio::test]
async fn failures_count_against_the_normalised_user_id() {
    let app = strict_app().await;
    let browser = app.browser();
    for spelling in ["S2401001", "  s2401001", "ｓ２４０１００１"] {
        attempt(&app, &browser, spelling, "Wrong-pass-1", "").await;
    }
    let refused = attempt(&app, &browser, TARO.username, TARO.password, "").await;
    assert!(
        !is_code(&refused),
        "three spellings, one student: {refused:?}"
    );
}
