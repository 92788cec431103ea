//! The student-facing pages as a browser sees them: the login form's fields, labels and
//! autocomplete hints, both languages, and the language switch that keeps the pending request.
use reqwest::StatusCode;

use crate::common::*;

/// Japanese and other CJK characters (kana, kanji, full-width forms).
fn japanese(text: &str) -> Vec<char> {
    text.chars()
        .filter(|c| {
            matches!(*c as u32,
                0x3000..=0x30ff | 0x3400..=0x4dbf | 0x4e00..=0x9fff | 0xff00..=0xffef)
        })
        .collect()
}

/// The page text with the "日本語" switch link removed.
fn without_language_switch(body: &str) -> String {
    body.replace(">日本語<", "><")
}

fn input_tag<'a>(body: &'a str, name: &str) -> &'a str {
    html::tags(body, "input")
        .into_iter()
        .find(|t| html::attribute(t, "name").as_deref() == Some(name))
        .unwrap_or_else(|| panic!("an input named {name}"))
}

#[tokio::test]
async fn login_page_has_the_manuals_fields_labels_and_hints() {
    let app = TestApp::sqlite().await;
    let page = app
        .browser()
        .open(&Authz::new("rp-basic").url(&app.issuer))
        .await;
    assert!(page.is_login_page());
    assert!(page.body.contains("<html lang=\"ja\""), "Japanese first");
    for (name, label, autocomplete) in [
        ("username", "ユーザID", "username"),
        ("password", "パスワード", "current-password"),
        ("second_password", "第2パスワード", "current-password"),
    ] {
        let tag = input_tag(&page.body, name);
        let id = html::attribute(tag, "id").expect("an id for the label");
        let labels: Vec<&str> = html::tags(&page.body, "label")
            .into_iter()
            .filter(|l| html::attribute(l, "for").as_deref() == Some(id.as_str()))
            .collect();
        assert_eq!(labels.len(), 1, "one <label for={id}>");
        let after = page.body.split(labels[0]).nth(1).unwrap();
        let text = after.split("</label>").next().unwrap();
        assert_eq!(text.trim(), label, "label of {name}");
        assert_eq!(
            html::attribute(tag, "autocomplete").as_deref(),
            Some(autocomplete)
        );
        if name != "username" {
            assert_eq!(html::attribute(tag, "type").as_deref(), Some("password"));
            assert_eq!(
                html::attribute(tag, "value"),
                None,
                "password fields are empty"
            );
        }
    }
    let form = html::forms(&page.body)
        .into_iter()
        .find(|f| f.action == "/login")
        .unwrap();
    assert_eq!(form.method, "post");
    assert!(form.value("csrf").is_some_and(|c| !c.is_empty()));
    assert!(form.value("tx").is_some_and(|t| !t.is_empty()));
    assert!(
        page.body.contains("href=\"/forgot\""),
        "the forgot-the-second-password link"
    );
}

#[tokio::test]
async fn english_pages_carry_no_japanese_but_the_switch() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let authz = Authz::new("rp-basic").set("ui_locales", "en");
    let login = browser.open(&authz.url(&app.issuer)).await;
    assert!(login.is_login_page());
    assert!(login.body.contains("<html lang=\"en\""), "{login:?}");
    assert!(login.body.contains(">日本語<"), "a switch back to Japanese");
    let stray = japanese(&without_language_switch(&login.body));
    assert!(stray.is_empty(), "Japanese on an English page: {stray:?}");

    // Accept-Language works too, and so do the error and logout pages.
    let en = |path: &str| {
        browser.send(
            app.http
                .get(app.url(path))
                .header("accept-language", "en-GB,en;q=0.8"),
        )
    };
    for path in [
        "/login",
        "/logout",
        "/no/such/page",
        "/authorize?client_id=nobody",
    ] {
        let page = en(path).await;
        assert!(page.body.contains("<html lang=\"en\""), "{path}: {page:?}");
        let stray = japanese(&without_language_switch(&page.body));
        assert!(
            stray.is_empty(),
            "{path}: Japanese on an English page: {stray:?}"
        );
    }
}

#[tokio::test]
async fn language_switch_keeps_the_pending_request() {
    let app = TestApp::sqlite().await;
    let browser = app.browser();
    let authz = Authz::new("rp-basic");
    let page = browser.open(&authz.url(&app.issuer)).await;
    let tx = html::forms(&page.body)
        .into_iter()
        .find(|f| f.action == "/login")
        .and_then(|f| f.value("tx").map(str::to_string))
        .unwrap();
    let switch = html::tags(&page.body, "a")
        .into_iter()
        .find(|a| {
            page.body
                .split(a)
                .nth(1)
                .is_some_and(|rest| rest.starts_with("English"))
        })
        .expect("an English link");
    let href = html::attribute(switch, "href").unwrap();
    assert!(href.contains(&format!("tx={tx}")), "{href}");
    let english = browser.get(&href).await;
    assert_eq!(english.status, StatusCode::OK);
    assert!(english.is_login_page() && english.body.contains("<html lang=\"en\""));
    let reply = browser
        .submit_login(&english, TARO.username, TARO.password, "")
        .await;
    app.exchange(&authz, &reply.code()).await;
}
