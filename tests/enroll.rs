//! Enrollment and recovery end to end, as a student sees them in a browser and in the mail that a
//! real SMTP server (the in-process sink) receives: first login → email registration → one-time
//! link → second-password setup → login with all three; the links' rules (GET consumes nothing,
//! single use, 30 minutes, tamper-proof, superseded); the menu (step-up within 5 minutes, change
//! email, change second password); the forgotten second password; `nidan user import`; the
//! email domain policy.
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::html;
use crate::common::smtp::SmtpSink;
use crate::common::*;
use crate::on_both_backends;

on_both_backends!(
    first_login_registers_the_email_and_second_password_and_the_client_gets_its_code,
    change_email_mails_the_new_address_and_tells_the_old_one,
    forgotten_second_password_is_reset_through_the_mailed_link,
);

// ───────────────────────────── students of these tests ─────────────────────────────

/// Not enrolled. The university password obeys the second-password rules, so "same as the
/// university password" is the only rule it breaks.
pub const SHIRO: Student = Student {
    username: "s2401004",
    directory_id: "uuid-2401004",
    password: "Daigaku2401d",
    second_password: None,
    email: None,
};

/// Enrolled, with a university password that would pass the second-password rules.
pub const GORO: Student = Student {
    username: "s2401005",
    directory_id: "uuid-2401005",
    password: "Daigaku2401e",
    second_password: Some("Nidan2405e"),
    email: Some("goro@example.ac.jp"),
};

/// Siblings who registered one family address.
pub const ICHIKA: Student = Student {
    username: "s2401006",
    directory_id: "uuid-2401006",
    password: "Daigaku-Pass-6",
    second_password: Some("Nidan2406f"),
    email: Some("family@example.net"),
};
pub const NIKA: Student = Student {
    username: "s2401007",
    directory_id: "uuid-2401007",
    password: "Daigaku-Pass-7",
    second_password: Some("Nidan2407g"),
    email: Some("family@example.net"),
};

// ───────────────────────────── helpers (also used by outbox.rs) ─────────────────────────────

/// A test server whose mail goes over SMTP to a fresh sink; `extra` is merged into the config.
pub async fn app_with_sink(
    backend: Backend,
    extra: Value,
    students: &[Student],
) -> (TestApp, SmtpSink) {
    let sink = SmtpSink::start().await;
    let mut builder = TestApp::builder(backend).config(sink.mail_config());
    for student in students {
        builder = builder.student(*student);
    }
    let app = builder.config(extra).build().await;
    (app, sink)
}

/// The catalog text of `key` in `lang` (templates/locales/<lang>.toml), placeholders unfilled.
pub fn t(lang: &str, key: &str) -> String {
    let text = match lang {
        "ja" => include_str!("../templates/locales/ja.toml"),
        _ => include_str!("../templates/locales/en.toml"),
    };
    let table: toml::Table = toml::from_str(text).expect("the catalog is TOML");
    table
        .get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("no catalog key {key} in {lang}"))
        .to_string()
}

/// Tags removed, entities decoded, whitespace collapsed.
pub fn plain(fragment: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in fragment.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' if in_tag => in_tag = false,
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    html::unescape(&out)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The visible text of the page's <main> (the whole body when there is none).
pub fn page_text(body: &str) -> String {
    let main = body
        .split_once("<main")
        .and_then(|(_, rest)| rest.split_once("</main>"))
        .map(|(main, _)| main)
        .unwrap_or(body);
    plain(main)
}

/// The elements with `role="<role>"`: the markup from the attribute to the closing `</div>`.
fn role_blocks<'a>(body: &'a str, role: &str) -> Vec<&'a str> {
    let marker = format!("role=\"{role}\"");
    body.match_indices(&marker)
        .map(|(at, _)| {
            let rest = &body[at..];
            let end = rest.find("</div>").unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

/// One entry per message line (`<p>`) of the page's role="alert" boxes.
pub fn alert_lines(body: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for block in role_blocks(body, "alert") {
        for chunk in block.split("<p").skip(1) {
            let inner = chunk
                .split_once('>')
                .map(|(_, rest)| rest)
                .unwrap_or("")
                .split("</p>")
                .next()
                .unwrap_or("");
            lines.push(plain(inner));
        }
    }
    lines
}

/// The text of the page's role="status" boxes.
pub fn status_text(body: &str) -> String {
    role_blocks(body, "status")
        .iter()
        .map(|b| plain(b.split_once('>').map(|(_, r)| r).unwrap_or("")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every `<a href>` of the page with its text.
pub fn anchors(body: &str) -> Vec<(String, String)> {
    body.split("<a ")
        .skip(1)
        .filter_map(|chunk| {
            let tag = format!("<a {}", chunk.split('>').next().unwrap_or(""));
            let href = html::attribute(&tag, "href")?;
            let text = chunk
                .split_once('>')
                .map(|(_, r)| r.split("</a>").next().unwrap_or(""))
                .unwrap_or("");
            Some((href, plain(text)))
        })
        .collect()
}

/// The href of the link whose text is `text`.
pub fn href_of(page: &Reply, text: &str) -> String {
    anchors(&page.body)
        .into_iter()
        .find(|(_, t)| t == text)
        .map(|(href, _)| href)
        .unwrap_or_else(|| panic!("no link {text:?} on the page: {page:?}"))
}

/// The form of the page that posts to `action`.
pub fn form(page: &Reply, action: &str) -> html::Form {
    html::forms(&page.body)
        .into_iter()
        .find(|f| f.action == action)
        .unwrap_or_else(|| panic!("no form posting to {action}: {page:?}"))
}

/// Posts the form of `page` that goes to `action`, with its hidden fields (csrf, tx, lang) and
/// `fields` filled in.
pub async fn submit(
    browser: &Browser,
    page: &Reply,
    action: &str,
    fields: &[(&str, &str)],
) -> Reply {
    let form = form(page, action);
    let mut all: Vec<(String, String)> = form
        .inputs
        .iter()
        .filter(|(name, _)| !fields.iter().any(|(k, _)| k == name))
        .cloned()
        .collect();
    all.extend(fields.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let all: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    browser.post(action, &all).await
}

/// The path of a one-time link (`/link/<token>`).
pub fn link_path(link: &str) -> String {
    let url = url::Url::parse(link).unwrap_or_else(|e| panic!("a URL in the mail ({e}): {link}"));
    url.path().to_string()
}

/// The Japanese characters (kana, kanji, full-width forms) of `text`.
pub fn japanese(text: &str) -> String {
    text.chars()
        .filter(|c| ('\u{3000}'..='\u{9fff}').contains(c) || ('\u{ff00}'..='\u{ffef}').contains(c))
        .collect()
}

/// Every password field of every form on the page is rendered empty.
pub fn password_fields_are_empty(page: &Reply) -> bool {
    html::tags(&page.body, "input")
        .into_iter()
        .filter(|tag| html::attribute(tag, "type").as_deref() == Some("password"))
        .all(|tag| html::attribute(tag, "value").unwrap_or_default().is_empty())
}

/// Signs `student` in without a pending request (a bookmark of /login) and opens the menu.
pub async fn sign_in_to_menu(browser: &Browser, student: &Student, second: &str) -> Reply {
    let page = browser.get("/login").await;
    let reply = browser
        .submit_login(&page, student.username, student.password, second)
        .await;
    let target = if second.is_empty() {
        None
    } else {
        Some("/account")
    };
    if let Some(target) = target {
        assert!(reply.is_redirect_to(target), "login to the menu: {reply:?}");
    }
    browser.follow(reply).await
}

/// Opens the one-time link in `browser` (GET shows the confirmation) and presses its button.
pub async fn confirm_link(browser: &Browser, link: &str) -> Reply {
    let page = browser.get(link).await;
    assert_eq!(page.status, StatusCode::OK, "the link's page: {page:?}");
    submit(browser, &page, &link_path(link), &[]).await
}

/// The first login of a student without enrollment, up to the email registration page.
pub async fn first_login_to_email_page(
    app: &TestApp,
    browser: &Browser,
    authz: &Authz,
    student: &Student,
) -> Reply {
    let login = browser.open(&authz.url(&app.issuer)).await;
    let reply = browser
        .submit_login(&login, student.username, student.password, "")
        .await;
    assert!(
        reply.is_redirect_to("/enroll/email"),
        "first login leads to the email registration: {reply:?}"
    );
    let page = browser.follow(reply).await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    page
}

/// Registers `address` on the email page; returns the "sent" page.
pub async fn register_email(browser: &Browser, page: &Reply, address: &str) -> Reply {
    submit(
        browser,
        page,
        "/enroll/email",
        &[("email", address), ("email_confirm", address)],
    )
    .await
}

/// Runs `nidan --config <app's config> args…` with `stdin`.
pub async fn nidan_cli(app: &TestApp, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nidan"));
    for (name, _) in std::env::vars() {
        if name.starts_with("NIDAN_") {
            command.env_remove(name);
        }
    }
    command
        .env("RUST_LOG", "warn")
        .arg("--config")
        .arg(&app.config_path)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let input = stdin.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = command.spawn().expect("nidan runs");
        if let Some(input) = input {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Signs in with all three through `authz` and expects a code for the client.
async fn code_with_all_three(
    app: &TestApp,
    browser: &Browser,
    student: &Student,
    second: &str,
) -> Tokens {
    let authz = Authz::new("rp-step");
    let page = browser.open(&authz.url(&app.issuer)).await;
    let reply = browser
        .submit_login(&page, student.username, student.password, second)
        .await;
    let tokens = app.exchange(&authz, &reply.code()).await;
    assert_eq!(tokens.id_claims()["acr"], ACR_SECOND_PASSWORD);
    tokens
}

/// Whether a login with all three yields a code (in a fresh browser).
async fn all_three_work(app: &TestApp, student: &Student, second: &str) -> bool {
    let browser = app.browser();
    let authz = Authz::new("rp-step");
    let page = browser.open(&authz.url(&app.issuer)).await;
    let reply = browser
        .submit_login(&page, student.username, student.password, second)
        .await;
    reply.status == StatusCode::SEE_OTHER
        && reply
            .location
            .as_deref()
            .is_some_and(|l| l.starts_with(REDIRECT_URI) && l.contains("code="))
}

const RULE_CASES: &[(&str, &str, &[&str])] = &[
    ("Ab1cdef", "Ab1cdef", &["rule_too_short"]),
    ("abcdefg1", "abcdefg1", &["rule_no_uppercase"]),
    ("ABCDEFG1", "ABCDEFG1", &["rule_no_lowercase"]),
    ("Abcdefgh", "Abcdefgh", &["rule_no_digit"]),
    // Full-width letters and digits, and symbols, are not half-width alphanumerics.
    ("Abcdefg1Ａ", "Abcdefg1Ａ", &["rule_half_width"]),
    ("Abcdefg1９", "Abcdefg1９", &["rule_half_width"]),
    ("Abcdefg1!", "Abcdefg1!", &["rule_half_width"]),
    ("Abcdefg1", "Abcdefg2", &["rule_confirmation_mismatch"]),
    (
        "ab!",
        "ab?",
        &[
            "rule_too_short",
            "rule_no_uppercase",
            "rule_no_digit",
            "rule_half_width",
            "rule_confirmation_mismatch",
        ],
    ),
];

/// Posts each broken second password on `page`'s form and checks that every broken rule gets
/// its own message line and that no password comes back.
async fn each_rule_is_named(
    browser: &Browser,
    page: &Reply,
    action: &str,
    extra: &[(&str, &str)],
    cases: &[(&str, &str, &[&str])],
) {
    for (new, confirmation, keys) in cases {
        let mut fields = vec![
            ("new_second_password", *new),
            ("new_second_password_confirm", *confirmation),
        ];
        fields.extend_from_slice(extra);
        let reply = submit(browser, page, action, &fields).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{new:?}: {reply:?}"
        );
        let expected: Vec<String> = keys.iter().map(|k| t("ja", k)).collect();
        assert_eq!(
            alert_lines(&reply.body),
            expected,
            "{new:?} / {confirmation:?}"
        );
        assert!(
            password_fields_are_empty(&reply),
            "password fields are rendered empty: {reply:?}"
        );
        assert!(
            !reply.body.contains(new) && !reply.body.contains(confirmation),
            "a rejected value never appears in the page ({new})"
        );
        form(&reply, action);
    }
}

// ───────────────────────────── flows 2, 3, 4: first login ─────────────────────────────

async fn first_login_registers_the_email_and_second_password_and_the_client_gets_its_code(
    backend: Backend,
) {
    let (app, sink) = app_with_sink(backend, json!({}), &[SHIRO]).await;
    let address = "shiro@example.ac.jp";
    let browser = app.browser();
    // The client needs the second-password level: the request must survive the whole detour.
    let authz = Authz::new("rp-step");

    let page = first_login_to_email_page(&app, &browser, &authz, &SHIRO).await;
    let email_form = form(&page, "/enroll/email");
    for field in ["email", "email_confirm", "csrf"] {
        assert!(email_form.has(field), "{field} on the registration page");
    }
    assert!(
        !email_form.has("username") && !email_form.has("password"),
        "only the login and reset pages ask for the university password"
    );
    let tx = email_form
        .value("tx")
        .expect("the pending request travels with the registration page")
        .to_string();
    let text = page_text(&page.body);
    assert!(
        text.contains("noreply@example.ac.jp"),
        "the sender for the allow list: {text}"
    );
    assert!(text.contains(&t("ja", "email_note_free_mail")), "{text}");

    // "Confirm" → the "sent" page.
    let sent = register_email(&browser, &page, address).await;
    assert_eq!(sent.status, StatusCode::OK, "{sent:?}");
    assert!(
        status_text(&sent.body).contains("確認メールを送信しました"),
        "{sent:?}"
    );

    // The mail: the seed's subject and text, the one-time URL and its 30 minutes.
    let mail = sink.mail_to(address).await;
    assert_eq!(mail.subject(), "メールアドレスの登録");
    assert_eq!(mail.mail_from, "noreply@example.ac.jp");
    assert!(mail
        .header("From")
        .unwrap()
        .contains("noreply@example.ac.jp"));
    assert!(mail.to_header().contains(address), "{}", mail.raw);
    assert!(
        mail.message_id().starts_with('<') && mail.message_id().ends_with('>'),
        "a Message-ID: {}",
        mail.raw
    );
    let body = mail.text();
    assert!(body.contains("メールアドレスの登録を行います。"), "{body}");
    assert!(body.contains("URL 期限：30 分"), "{body}");
    let link = mail.expect_link();
    assert!(link.starts_with(&format!("{}/link/", app.issuer)), "{link}");
    let token = link.rsplit('/').next().unwrap();
    assert!(token.len() >= 22, "at least 128 random bits: {token}");
    assert!(!body.contains(SHIRO.password), "no password in the mail");

    // GET shows a page with a button and consumes nothing (mail scanners follow links).
    for _ in 0..2 {
        let confirm = browser.get(&link).await;
        assert_eq!(confirm.status, StatusCode::OK, "{confirm:?}");
        let confirm_form = form(&confirm, &link_path(&link));
        assert_eq!(confirm_form.method, "post");
        assert!(confirm.body.contains("<button"), "{confirm:?}");
        assert!(page_text(&confirm.body).contains(address));
    }
    // Still not registered: a login now still goes to the email page.
    let other = app.browser();
    let again = other.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    let reply = other
        .submit_login(&again, SHIRO.username, SHIRO.password, "")
        .await;
    assert!(reply.is_redirect_to("/enroll/email"), "{reply:?}");

    // POST consumes: the completion page with a "go to the login page" button.
    let done = confirm_link(&browser, &link).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert!(
        status_text(&done.body).contains("メールアドレスを設定しました。"),
        "{done:?}"
    );
    let to_login = href_of(&done, "ログインページへ移動");
    assert_eq!(
        to_login,
        format!("/login?tx={tx}"),
        "back to the pending request"
    );

    // Login again → the second-password setup page.
    let login = browser.get(&to_login).await;
    assert!(login.is_login_page(), "{login:?}");
    let reply = browser
        .submit_login(&login, SHIRO.username, SHIRO.password, "")
        .await;
    assert!(reply.is_redirect_to("/enroll/second-password"), "{reply:?}");
    assert!(
        reply.location.as_deref().unwrap().contains(&tx),
        "{reply:?}"
    );
    let setup = browser.follow(reply).await;
    assert_eq!(setup.status, StatusCode::OK, "{setup:?}");
    let setup_form = form(&setup, "/enroll/second-password");
    assert!(setup_form.has("new_second_password") && setup_form.has("new_second_password_confirm"));
    assert!(!setup_form.has("username") && !setup_form.has("password"));
    assert_eq!(setup_form.value("tx"), Some(tx.as_str()));

    // Every broken rule is named on its own line; the university password is refused too.
    let mut cases = RULE_CASES.to_vec();
    cases.push((
        SHIRO.password,
        SHIRO.password,
        &["rule_same_as_university_password"],
    ));
    each_rule_is_named(&browser, &setup, "/enroll/second-password", &[], &cases).await;

    // A good one: "第2パスワードが設定されました" → OK → the login page of the pending request.
    let second = "Shiro2ndPass9";
    let set = submit(
        &browser,
        &setup,
        "/enroll/second-password",
        &[
            ("new_second_password", second),
            ("new_second_password_confirm", second),
        ],
    )
    .await;
    assert_eq!(set.status, StatusCode::OK, "{set:?}");
    assert!(
        status_text(&set.body).contains("第2パスワードが設定されました"),
        "{set:?}"
    );
    let ok = href_of(&set, "OK");
    assert_eq!(ok, format!("/login?tx={tx}"));

    // Login with all three: the relying party gets its code at the second-password level.
    let login = browser.get(&ok).await;
    assert!(login.is_login_page(), "{login:?}");
    let reply = browser
        .submit_login(&login, SHIRO.username, SHIRO.password, second)
        .await;
    let params = reply.callback();
    assert_eq!(params["state"], authz.state(), "the original request");
    let tokens = app.exchange(&authz, &params["code"]).await;
    let claims = tokens.id_claims();
    assert_eq!(claims["acr"], ACR_SECOND_PASSWORD);
    assert_eq!(claims["nonce"], authz.get("nonce").unwrap());
    let userinfo = app.userinfo(&tokens.access_token).await.json();
    assert_eq!(userinfo["email"], address);
    assert_eq!(userinfo["email_verified"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_gets_a_code_before_enrollment_is_finished() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let browser = app.browser();
    // Even a client that is fine with the password level (enrollment = "always").
    let authz = Authz::new("rp-basic");
    let page = first_login_to_email_page(&app, &browser, &authz, &HANAKO).await;
    // Leaving the detour and coming back through the client does not skip it.
    let reply = browser.get(&authz.url(&app.issuer)).await;
    let reply = browser.follow(reply).await;
    assert!(
        reply.status != StatusCode::SEE_OTHER
            || !reply
                .location
                .as_deref()
                .unwrap_or("")
                .starts_with(REDIRECT_URI),
        "no code before enrollment: {reply:?}"
    );
    // After the email, the login resumes at the missing step: the second password.
    register_email(&browser, &page, "hanako@example.ac.jp").await;
    let link = sink.mail_to("hanako@example.ac.jp").await.expect_link();
    confirm_link(&browser, &link).await;
    // The browser's session goes straight to the missing step; still no code.
    let reply = browser.get(&Authz::new("rp-basic").url(&app.issuer)).await;
    assert!(reply.is_redirect_to("/enroll/second-password"), "{reply:?}");
    let fresh = app.browser();
    let login = fresh.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    let reply = fresh
        .submit_login(&login, HANAKO.username, HANAKO.password, "")
        .await;
    assert!(reply.is_redirect_to("/enroll/second-password"), "{reply:?}");
    // Typing anything in the second-password field changes nothing before the setup.
    let fresh = app.browser();
    let login = fresh.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    let reply = fresh
        .submit_login(&login, HANAKO.username, HANAKO.password, "Anything123")
        .await;
    assert!(reply.is_redirect_to("/enroll/second-password"), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_works_in_another_browser_and_the_first_one_resumes_its_request() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let address = "hanako.phone@example.ac.jp";
    let desktop = app.browser();
    let authz = Authz::new("rp-step");
    let page = first_login_to_email_page(&app, &desktop, &authz, &HANAKO).await;
    let tx = form(&page, "/enroll/email")
        .value("tx")
        .unwrap()
        .to_string();
    register_email(&desktop, &page, address).await;
    let link = sink.mail_to(address).await.expect_link();

    // The phone: a fresh cookie jar, no session.
    let phone = app.browser();
    let done = confirm_link(&phone, &link).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert!(status_text(&done.body).contains("メールアドレスを設定しました。"));
    let to_login = href_of(&done, "ログインページへ移動");
    assert!(
        to_login.starts_with("/login"),
        "the phone goes to the login page: {to_login}"
    );
    assert!(!phone.has_session(), "the link signs no one in");

    // The desktop resumes its pending request.
    let login = desktop.get(&format!("/login?tx={tx}")).await;
    assert!(login.is_login_page(), "{login:?}");
    let reply = desktop
        .submit_login(&login, HANAKO.username, HANAKO.password, "")
        .await;
    assert!(reply.is_redirect_to("/enroll/second-password"), "{reply:?}");
    let setup = desktop.follow(reply).await;
    let second = "Hanako2ndPw4";
    let set = submit(
        &desktop,
        &setup,
        "/enroll/second-password",
        &[
            ("new_second_password", second),
            ("new_second_password_confirm", second),
        ],
    )
    .await;
    let login = desktop.get(&href_of(&set, "OK")).await;
    let reply = desktop
        .submit_login(&login, HANAKO.username, HANAKO.password, second)
        .await;
    let params = reply.callback();
    assert_eq!(params["state"], authz.state());
    let tokens = app.exchange(&authz, &params["code"]).await;
    assert_eq!(tokens.id_claims()["acr"], ACR_SECOND_PASSWORD);

    // The phone's "go to the login page" signs in to the menu (no pending request there).
    let login = phone.get(&to_login).await;
    let reply = phone
        .submit_login(&login, HANAKO.username, HANAKO.password, second)
        .await;
    assert!(reply.is_redirect_to("/account"), "{reply:?}");

    // Registering the first address is no "email change": a reset works at once.
    let forgot_page = phone.get("/forgot").await;
    submit(&phone, &forgot_page, "/forgot", &[("email", address)]).await;
    let reset_mail = sink
        .mail_with_subject(address, "第2パスワードのリセット")
        .await;
    reset_mail.expect_link();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_request_lives_through_a_slow_enrollment() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let address = "hanako@example.ac.jp";
    let browser = app.browser();
    let authz = Authz::new("rp-step");
    let page = first_login_to_email_page(&app, &browser, &authz, &HANAKO).await;
    let tx = form(&page, "/enroll/email")
        .value("tx")
        .unwrap()
        .to_string();
    register_email(&browser, &page, address).await;
    let link = sink.mail_to(address).await.expect_link();
    // The mail took its time; the student's session idled out meanwhile.
    app.advance(25 * 60);
    let done = confirm_link(&browser, &link).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    app.advance(20 * 60);
    let login = browser.get(&href_of(&done, "ログインページへ移動")).await;
    assert!(login.is_login_page(), "{login:?}");
    assert_eq!(form(&login, "/login").value("tx"), Some(tx.as_str()));
    let reply = browser
        .submit_login(&login, HANAKO.username, HANAKO.password, "")
        .await;
    let setup = browser.follow(reply).await;
    let second = "Hanako2ndPw4";
    let set = submit(
        &browser,
        &setup,
        "/enroll/second-password",
        &[
            ("new_second_password", second),
            ("new_second_password_confirm", second),
        ],
    )
    .await;
    app.advance(10 * 60);
    // 55 minutes after the client sent the student here.
    let login = browser.get(&href_of(&set, "OK")).await;
    let reply = browser
        .submit_login(&login, HANAKO.username, HANAKO.password, second)
        .await;
    let params = reply.callback();
    assert_eq!(params["state"], authz.state());
    let tokens = app.exchange(&authz, &params["code"]).await;
    assert_eq!(tokens.id_claims()["acr"], ACR_SECOND_PASSWORD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn english_pages_send_an_english_mail() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let address = "hanako.en@example.ac.jp";
    let browser = app.browser();
    let authz = Authz::new("rp-basic");
    first_login_to_email_page(&app, &browser, &authz, &HANAKO).await;
    let page = browser.get("/enroll/email?lang=en").await;
    assert!(page.body.contains("<html lang=\"en\""), "{page:?}");
    let sent = register_email(&browser, &page, address).await;
    assert!(sent.body.contains("<html lang=\"en\""), "{sent:?}");
    assert!(status_text(&sent.body).contains(&t("en", "email_sent_message")));
    let mail = sink.mail_to(address).await;
    assert_eq!(mail.subject(), t("en", "mail_subject_verify_email"));
    let body = mail.text();
    assert!(body.contains("valid for 30 minutes"), "{body}");
    assert_eq!(
        japanese(&body),
        "",
        "no Japanese in the English mail: {body}"
    );
    // The link's pages follow the language of the mail.
    let confirm = browser.get(&mail.expect_link()).await;
    assert!(confirm.body.contains("<html lang=\"en\""), "{confirm:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_language_carries_over_to_the_enrollment_pages() {
    let (app, _sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let browser = app.browser();
    let authz = Authz::new("rp-basic").set("ui_locales", "en");
    let login = browser.open(&authz.url(&app.issuer)).await;
    assert!(login.body.contains("<html lang=\"en\""), "{login:?}");
    let reply = browser
        .submit_login(&login, HANAKO.username, HANAKO.password, "")
        .await;
    assert!(reply.is_redirect_to("/enroll/email"), "{reply:?}");
    let page = browser.follow(reply).await;
    assert!(
        page.body.contains("<html lang=\"en\""),
        "the student chose English: {page:?}"
    );
}

// ───────────────────────────── one-time links ─────────────────────────────

/// HANAKO's first login up to the mail; returns the browser and the link.
async fn registration_link(app: &TestApp, sink: &SmtpSink, address: &str) -> (Browser, String) {
    let browser = app.browser();
    let page = first_login_to_email_page(app, &browser, &Authz::new("rp-basic"), &HANAKO).await;
    register_email(&browser, &page, address).await;
    let link = sink.mail_to(address).await.expect_link();
    (browser, link)
}

fn assert_link_page(reply: &Reply, status: StatusCode, reason_key: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert!(
        alert_lines(&reply.body).contains(&t("ja", reason_key)),
        "{reason_key}: {reply:?}"
    );
    assert!(
        html::forms(&reply.body)
            .iter()
            .all(|f| !f.action.starts_with("/link/")),
        "nothing left to press: {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_link_shows_the_used_page() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let (browser, link) = registration_link(&app, &sink, "hanako@example.ac.jp").await;
    let confirm = browser.get(&link).await;
    let first = submit(&browser, &confirm, &link_path(&link), &[]).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    // The same form posted again (a double click, a second tab).
    let second = submit(&browser, &confirm, &link_path(&link), &[]).await;
    assert_link_page(&second, StatusCode::GONE, "link_reason_used");
    assert!(page_text(&second.body).contains(&t("ja", "link_used_done")));
    let again = browser.get(&link).await;
    assert_link_page(&again, StatusCode::GONE, "link_reason_used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_expires_after_30_minutes() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let (browser, link) = registration_link(&app, &sink, "hanako@example.ac.jp").await;
    app.advance(29 * 60);
    let confirm = browser.get(&link).await;
    assert_eq!(confirm.status, StatusCode::OK, "still valid at 29 minutes");
    app.advance(2 * 60);
    let expired = browser.get(&link).await;
    assert_link_page(&expired, StatusCode::GONE, "link_reason_expired");
    // The page opened before the expiry cannot be used after it either.
    let late = submit(&browser, &confirm, &link_path(&link), &[]).await;
    assert_link_page(&late, StatusCode::GONE, "link_reason_expired");
    // And the email was not registered.
    let login = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    let reply = browser
        .submit_login(&login, HANAKO.username, HANAKO.password, "")
        .await;
    assert!(reply.is_redirect_to("/enroll/email"), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_link_is_invalid() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let (browser, link) = registration_link(&app, &sink, "hanako@example.ac.jp").await;
    let confirm = browser.get(&link).await;
    let (base, token) = link.rsplit_once('/').unwrap();
    let flipped: String = token
        .chars()
        .enumerate()
        .map(|(i, c)| match (i, c) {
            (5, 'A') => 'B',
            (5, _) => 'A',
            _ => c,
        })
        .collect();
    let tampered = [
        format!("{base}/{flipped}"),
        format!("{base}/{}", &token[..token.len() - 3]),
        format!("{base}/{token}x"),
        format!("{base}/{}", token.to_uppercase()),
        format!("{base}/%27%20OR%201%3D1"),
    ];
    for bad in &tampered {
        if bad == &link {
            continue;
        }
        let page = browser.get(bad).await;
        assert_link_page(&page, StatusCode::NOT_FOUND, "link_reason_invalid");
        let csrf = form(&confirm, &link_path(&link))
            .value("csrf")
            .unwrap()
            .to_string();
        let posted = browser
            .post(&link_path(bad), &[("csrf", csrf.as_str())])
            .await;
        assert_link_page(&posted, StatusCode::NOT_FOUND, "link_reason_invalid");
    }
    // The real link without the page's CSRF token: refused, and nothing consumed.
    for csrf in ["", "forged-token"] {
        let forged = browser.post(&link_path(&link), &[("csrf", csrf)]).await;
        assert_eq!(forged.status, StatusCode::FORBIDDEN, "{forged:?}");
    }
    let stranger = app.browser();
    let page = stranger.get(&link).await;
    let stolen = form(&page, &link_path(&link))
        .value("csrf")
        .unwrap()
        .to_string();
    let cross = browser
        .post(&link_path(&link), &[("csrf", stolen.as_str())])
        .await;
    assert_eq!(
        cross.status,
        StatusCode::FORBIDDEN,
        "another browser's token: {cross:?}"
    );
    // The real link still works.
    let done = submit(&browser, &confirm, &link_path(&link), &[]).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_link_invalidates_the_older_one() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let browser = app.browser();
    let page = first_login_to_email_page(&app, &browser, &Authz::new("rp-basic"), &HANAKO).await;
    register_email(&browser, &page, "first@example.ac.jp").await;
    let older = sink.mail_to("first@example.ac.jp").await.expect_link();
    app.advance(60);
    // The student typed the address wrong and registers again.
    register_email(&browser, &page, "second@example.ac.jp").await;
    let newer = sink.mail_to("second@example.ac.jp").await.expect_link();
    assert_ne!(older, newer);

    let stale = browser.get(&older).await;
    assert_link_page(&stale, StatusCode::GONE, "link_reason_expired");
    let done = confirm_link(&browser, &newer).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let tokens = {
        let authz = Authz::new("rp-basic");
        // The email is the newer one; set the second password to get tokens.
        let browser = app.browser();
        let login = browser.open(&authz.url(&app.issuer)).await;
        let reply = browser
            .submit_login(&login, HANAKO.username, HANAKO.password, "")
            .await;
        let setup = browser.follow(reply).await;
        let set = submit(
            &browser,
            &setup,
            "/enroll/second-password",
            &[
                ("new_second_password", "Hanako2ndPw4"),
                ("new_second_password_confirm", "Hanako2ndPw4"),
            ],
        )
        .await;
        let login = browser.get(&href_of(&set, "OK")).await;
        let reply = browser
            .submit_login(&login, HANAKO.username, HANAKO.password, "Hanako2ndPw4")
            .await;
        app.exchange(&authz, &reply.code()).await
    };
    let userinfo = app.userinfo(&tokens.access_token).await.json();
    assert_eq!(userinfo["email"], "second@example.ac.jp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_registration_errors_are_each_named() {
    let (app, _sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let browser = app.browser();
    let page = first_login_to_email_page(&app, &browser, &Authz::new("rp-basic"), &HANAKO).await;
    let cases: &[(&str, &str, &[&str])] = &[
        ("", "", &["email_required"]),
        ("hanako@", "hanako@", &["email_invalid"]),
        (
            "hanako@example.ac.jp",
            "hanako@example.ac.j",
            &["email_mismatch"],
        ),
        ("hanako example", "x", &["email_invalid", "email_mismatch"]),
    ];
    for (email, confirmation, keys) in cases {
        let reply = submit(
            &browser,
            &page,
            "/enroll/email",
            &[("email", email), ("email_confirm", confirmation)],
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{reply:?}");
        let expected: Vec<String> = keys.iter().map(|k| t("ja", k)).collect();
        assert_eq!(alert_lines(&reply.body), expected, "{email:?}");
        assert_eq!(
            form(&reply, "/enroll/email").value("email_confirm"),
            Some(""),
            "the confirmation is never prefilled"
        );
    }
    // Full-width characters and spaces around the address are normalised (NFKC + trim).
    let reply = submit(
        &browser,
        &page,
        "/enroll/email",
        &[
            ("email", " ｈａｎａｋｏ@example.ac.jp "),
            ("email_confirm", "hanako@example.ac.jp"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(status_text(&reply.body).contains("確認メールを送信しました"));
}

// ───────────────────────────── email domain policy ─────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_email_domain_policy_is_explained_on_the_page() {
    let (app, sink) = app_with_sink(
        Backend::Sqlite,
        json!({ "mail": {
            "allow_domains": ["example.ac.jp", "example.net"],
            "deny_domains": ["sso.example.ac.jp"],
        }}),
        &[],
    )
    .await;
    let browser = app.browser();
    let page = first_login_to_email_page(&app, &browser, &Authz::new("rp-basic"), &HANAKO).await;
    for refused in [
        "hanako@gmail.com",
        "hanako@sso.example.ac.jp",
        "hanako@mail.sso.example.ac.jp",
        "hanako@example.ac.jp.evil.com",
    ] {
        let reply = register_email(&browser, &page, refused).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{refused}: {reply:?}"
        );
        assert_eq!(
            alert_lines(&reply.body),
            vec![t("ja", "email_domain_not_allowed")],
            "{refused}"
        );
    }
    // The English page says it in English.
    let en = browser.get("/enroll/email?lang=en").await;
    let reply = register_email(&browser, &en, "hanako@gmail.com").await;
    assert_eq!(
        alert_lines(&reply.body),
        vec![t("en", "email_domain_not_allowed")]
    );
    // Allowed domains and their subdomains.
    let reply = register_email(&browser, &page, "hanako@mail.example.ac.jp").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    sink.mail_to("hanako@mail.example.ac.jp").await;

    // The menu's change of address follows the same policy.
    let taro = app.browser();
    let menu = sign_in_to_menu(&taro, &TARO, TARO.second_password.unwrap()).await;
    assert_eq!(menu.status, StatusCode::OK);
    let change = taro.get("/account/email").await;
    let reply = submit(
        &taro,
        &change,
        "/account/email",
        &[
            ("email", "taro@gmail.com"),
            ("email_confirm", "taro@gmail.com"),
            ("current_second_password", TARO.second_password.unwrap()),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{reply:?}");
    assert_eq!(
        alert_lines(&reply.body),
        vec![t("ja", "email_domain_not_allowed")]
    );
}

// ───────────────────────────── the menu ─────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_menu_needs_the_second_password_within_five_minutes() {
    let (app, _sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let second = TARO.second_password.unwrap();
    let browser = app.browser();
    let menu = sign_in_to_menu(&browser, &TARO, second).await;
    assert_eq!(menu.status, StatusCode::OK, "{menu:?}");
    let links: Vec<(String, String)> = anchors(&menu.body);
    for (href, text) in [
        ("/account/email", "メールアドレス変更"),
        ("/account/second-password", "第2パスワード変更"),
        ("/manual", "マニュアル"),
    ] {
        assert!(
            links.iter().any(|(h, t)| h == href && t == text),
            "menu item {text}: {links:?}"
        );
    }
    assert!(menu.body.contains("メニュー"), "the gear is named");
    assert!(
        html::forms(&menu.body)
            .iter()
            .any(|f| f.action == "/logout" && f.method == "post" && f.has("csrf")),
        "logout is a POST with csrf"
    );
    assert!(page_text(&menu.body).contains(TARO.email.unwrap()));

    app.advance(4 * 60);
    assert_eq!(browser.get("/account").await.status, StatusCode::OK);
    app.advance(6 * 60);
    for path in ["/account", "/account/email", "/account/second-password"] {
        let reply = browser.get(path).await;
        assert!(
            reply.is_redirect_to("/login/step-up"),
            "{path} after 6 minutes: {reply:?}"
        );
    }
    // A POST is refused the same way.
    let stale = browser
        .post(
            "/account/email",
            &[
                ("csrf", form(&menu, "/logout").value("csrf").unwrap()),
                ("email", "new@example.ac.jp"),
                ("email_confirm", "new@example.ac.jp"),
                ("current_second_password", second),
            ],
        )
        .await;
    assert!(stale.is_redirect_to("/login/step-up"), "{stale:?}");
    let step_up = browser.follow(browser.get("/account").await).await;
    assert!(step_up.is_step_up_page(), "{step_up:?}");
    let reply = browser.submit_step_up(&step_up, second).await;
    assert!(reply.is_redirect_to("/account"), "{reply:?}");
    assert_eq!(browser.get("/account").await.status, StatusCode::OK);

    // A password-level session (second password left empty) meets the step-up first.
    let other = app.browser();
    let page = other.get("/login").await;
    let reply = other
        .submit_login(&page, TARO.username, TARO.password, "")
        .await;
    let reply = other.follow(reply).await;
    assert!(reply.is_step_up_page(), "{reply:?}");
    // Without a session, the menu sends to the login page.
    let anonymous = app.browser().get("/account").await;
    assert!(anonymous.is_redirect_to("/login"), "{anonymous:?}");
}

async fn change_email_mails_the_new_address_and_tells_the_old_one(backend: Backend) {
    let (app, sink) = app_with_sink(backend, json!({}), &[]).await;
    let old = TARO.email.unwrap();
    let new = "taro.new@example.net";
    let second = TARO.second_password.unwrap();
    let browser = app.browser();
    sign_in_to_menu(&browser, &TARO, second).await;
    let page = browser.get("/account/email").await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    let change_form = form(&page, "/account/email");
    for field in ["email", "email_confirm", "current_second_password", "csrf"] {
        assert!(change_form.has(field), "{field}");
    }
    let sent = submit(
        &browser,
        &page,
        "/account/email",
        &[
            ("email", new),
            ("email_confirm", new),
            ("current_second_password", second),
        ],
    )
    .await;
    assert_eq!(sent.status, StatusCode::OK, "{sent:?}");
    assert!(
        status_text(&sent.body).contains(&t("ja", "email_change_sent_message")),
        "{sent:?}"
    );
    let mail = sink.mail_to(new).await;
    assert_eq!(mail.subject(), "メールアドレスの変更");
    assert!(mail.text().contains("メールアドレスの変更を行います。"));
    assert!(mail.text().contains("URL 期限：30 分"), "{}", mail.text());
    let link = mail.expect_link();
    // Until the link is confirmed, the old address stays registered.
    let menu = browser.get("/account").await;
    assert!(page_text(&menu.body).contains(old), "{menu:?}");

    let confirm = browser.get(&link).await;
    assert!(page_text(&confirm.body).contains(new), "{confirm:?}");
    let done = submit(&browser, &confirm, &link_path(&link), &[]).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert!(
        status_text(&done.body).contains(&t("ja", "email_changed_message")),
        "{done:?}"
    );

    // The old address is told, without the new address in full.
    let notice = sink
        .mail_with_subject(old, "メールアドレス変更のお知らせ")
        .await;
    let text = notice.text();
    assert!(text.contains("t****@example.net"), "{text}");
    assert!(!text.contains(new), "{text}");
    assert!(notice.link().is_none(), "a notice carries no link: {text}");
    assert_eq!(sink.messages_to(old).len(), 1, "only the notice");

    let menu = browser.get("/account").await;
    assert!(page_text(&menu.body).contains(new), "{menu:?}");
    let tokens = code_with_all_three(&app, &app.browser(), &TARO, second).await;
    let userinfo = app.userinfo(&tokens.access_token).await.json();
    assert_eq!(userinfo["email"], new);
    assert_eq!(userinfo["email_verified"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_current_second_password_counts_toward_the_lockout() {
    let (app, sink) = app_with_sink(
        Backend::Sqlite,
        json!({ "throttle": { "second_password_failures": 3 } }),
        &[],
    )
    .await;
    let second = TARO.second_password.unwrap();
    let new = "taro.new@example.net";
    let browser = app.browser();
    sign_in_to_menu(&browser, &TARO, second).await;
    let page = browser.get("/account/email").await;
    for _ in 0..3 {
        let reply = submit(
            &browser,
            &page,
            "/account/email",
            &[
                ("email", new),
                ("email_confirm", new),
                ("current_second_password", "Wrong2ndPass1"),
            ],
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{reply:?}");
        assert_eq!(
            alert_lines(&reply.body),
            vec![t("ja", "rule_current_wrong")]
        );
        assert!(password_fields_are_empty(&reply));
        assert!(!reply.body.contains("Wrong2ndPass1"));
    }
    // Locked now: even the right second password is refused, here and at the login.
    let reply = submit(
        &browser,
        &page,
        "/account/email",
        &[
            ("email", new),
            ("email_confirm", new),
            ("current_second_password", second),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{reply:?}");
    assert!(
        alert_lines(&reply.body).contains(&t("ja", "locked_no_time")),
        "{reply:?}"
    );
    assert!(!all_three_work(&app, &TARO, second).await, "locked");
    // The password level stays open.
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    assert_eq!(tokens.id_claims()["acr"], ACR_PASSWORD);
    assert!(sink.messages_to(new).is_empty(), "no link was sent");
}

async fn change_second_password(
    browser: &Browser,
    current: &str,
    new: &str,
    confirmation: &str,
) -> Reply {
    let page = browser.get("/account/second-password").await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    submit(
        browser,
        &page,
        "/account/second-password",
        &[
            ("current_second_password", current),
            ("new_second_password", new),
            ("new_second_password_confirm", confirmation),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_second_password_checks_the_rules_and_sends_a_notice() {
    let (app, sink) = app_with_sink(
        Backend::Sqlite,
        json!({ "session": { "idle_timeout": "2h" } }),
        &[GORO],
    )
    .await;
    let current = GORO.second_password.unwrap();
    let browser = app.browser();
    sign_in_to_menu(&browser, &GORO, current).await;
    let page = browser.get("/account/second-password").await;
    let change_form = form(&page, "/account/second-password");
    for field in [
        "current_second_password",
        "new_second_password",
        "new_second_password_confirm",
        "csrf",
    ] {
        assert!(change_form.has(field), "{field}");
    }
    assert!(!change_form.has("username") && !change_form.has("password"));

    let mut cases = RULE_CASES.to_vec();
    cases.push((
        GORO.password,
        GORO.password,
        &["rule_same_as_university_password"],
    ));
    each_rule_is_named(
        &browser,
        &page,
        "/account/second-password",
        &[("current_second_password", current)],
        &cases,
    )
    .await;
    let wrong =
        change_second_password(&browser, "Wrong2ndPass1", "Goro2ndNew7", "Goro2ndNew7").await;
    assert_eq!(
        alert_lines(&wrong.body),
        vec![t("ja", "rule_current_wrong")]
    );

    let done = change_second_password(&browser, current, "Goro2ndNew7", "Goro2ndNew7").await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert!(
        status_text(&done.body).contains("第2パスワードは変更されました"),
        "{done:?}"
    );
    assert_eq!(href_of(&done, "OK"), "/account");
    let notice = sink
        .mail_with_subject(GORO.email.unwrap(), "第2パスワード変更のお知らせ")
        .await;
    assert!(!notice.text().contains("Goro2ndNew7"), "{}", notice.text());

    assert!(all_three_work(&app, &GORO, "Goro2ndNew7").await);
    assert!(
        !all_three_work(&app, &GORO, current).await,
        "the old one is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_second_password_needs_a_full_login_within_15_minutes() {
    let (app, _sink) = app_with_sink(
        Backend::Sqlite,
        json!({ "session": { "idle_timeout": "2h" } }),
        &[GORO],
    )
    .await;
    let current = GORO.second_password.unwrap();
    let browser = app.browser();
    sign_in_to_menu(&browser, &GORO, current).await;

    // 16 minutes later: the menu asks for the step-up; the hash of the university password is gone.
    app.advance(16 * 60);
    let step_up = browser
        .follow(browser.get("/account/second-password").await)
        .await;
    assert!(step_up.is_step_up_page(), "{step_up:?}");
    let reply = browser.submit_step_up(&step_up, current).await;
    assert!(reply.is_redirect_to("/account"), "{reply:?}");
    let refused = change_second_password(&browser, current, "Goro2ndNew7", "Goro2ndNew7").await;
    assert_eq!(
        refused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{refused:?}"
    );
    let lines = alert_lines(&refused.body);
    assert!(lines.contains(&t("ja", "full_login_required")), "{lines:?}");
    assert!(
        anchors(&refused.body)
            .iter()
            .any(|(href, _)| href.starts_with("/login")),
        "a way to the login page"
    );
    assert!(all_three_work(&app, &GORO, current).await, "unchanged");

    // A full login, 14 minutes: still fine (after a step-up for the menu).
    let browser = app.browser();
    sign_in_to_menu(&browser, &GORO, current).await;
    app.advance(14 * 60);
    let step_up = browser
        .follow(browser.get("/account/second-password").await)
        .await;
    browser.submit_step_up(&step_up, current).await;
    let done = change_second_password(&browser, current, "Goro2ndNew7", "Goro2ndNew7").await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");

    // The hash is deleted on use: another change needs another full login.
    let again = change_second_password(&browser, "Goro2ndNew7", "Goro3rdNew8", "Goro3rdNew8").await;
    assert!(
        alert_lines(&again.body).contains(&t("ja", "full_login_required")),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manual_in_japanese_and_english() {
    let (app, _sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let browser = app.browser();
    let ja = browser.get("/manual").await;
    assert_eq!(ja.status, StatusCode::OK, "{ja:?}");
    assert!(ja.body.contains("<html lang=\"ja\""));
    let text = page_text(&ja.body);
    assert!(text.contains("第2パスワードを忘れた場合"), "{text}");
    assert!(text.contains("URL"), "{text}");

    for en in [
        browser.get("/manual?lang=en").await,
        browser
            .send(
                no_redirect_client()
                    .get(app.url("/manual"))
                    .header("accept-language", "en-US,en;q=0.9"),
            )
            .await,
    ] {
        assert_eq!(en.status, StatusCode::OK, "{en:?}");
        assert!(en.body.contains("<html lang=\"en\""), "{en:?}");
        let text = page_text(&en.body);
        assert!(text.contains("second password"), "{text}");
        let found = japanese(&text.replace("日本語", ""));
        assert!(found.is_empty(), "Japanese on the English manual: {found}");
    }

    // Signed in, the manual keeps the menu.
    sign_in_to_menu(&browser, &TARO, TARO.second_password.unwrap()).await;
    let manual = browser.get("/manual").await;
    assert!(
        manual.body.contains("/account/email"),
        "the menu on the manual"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_manual_url_is_a_redirect() {
    let pdf = "https://www.example.ac.jp/docs/student-login-manual.pdf";
    let (app, _sink) = app_with_sink(Backend::Sqlite, json!({ "manual_url": pdf }), &[]).await;
    let reply = app.browser().get("/manual").await;
    assert!(reply.status.is_redirection(), "{reply:?}");
    assert_ne!(reply.status, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(reply.location.as_deref(), Some(pdf));
}

// ───────────────────────────── the forgotten second password ─────────────────────────────

/// The "sent" page with the CSRF token blanked, for comparing two answers.
fn without_csrf(body: &str) -> String {
    let mut out = String::new();
    for (i, piece) in body.split("name=\"csrf\" value=\"").enumerate() {
        if i == 0 {
            out.push_str(piece);
        } else {
            out.push_str("name=\"csrf\" value=\"");
            out.push_str(piece.split_once('"').map(|(_, rest)| rest).unwrap_or(""));
            out.push('"');
        }
    }
    out
}

async fn forgot(app: &TestApp, address: &str) -> Reply {
    let browser = app.browser();
    let page = browser.get("/forgot").await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    submit(&browser, &page, "/forgot", &[("email", address)]).await
}

/// Fills in the reset form of `link`.
async fn reset(
    browser: &Browser,
    link: &str,
    username: &str,
    password: &str,
    new: &str,
    confirmation: &str,
) -> Reply {
    let page = browser.get(link).await;
    assert_eq!(page.status, StatusCode::OK, "the reset form: {page:?}");
    submit(
        browser,
        &page,
        &link_path(link),
        &[
            ("username", username),
            ("password", password),
            ("new_second_password", new),
            ("new_second_password_confirm", confirmation),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgot_answers_the_same_for_registered_and_unknown_addresses() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let login = app.browser().get("/login").await;
    assert!(
        anchors(&login.body)
            .iter()
            .any(|(href, text)| href.starts_with("/forgot") && text == "第2パスワードを忘れた場合"),
        "the login page links to /forgot"
    );
    let page = app.browser().get("/forgot").await;
    let forgot_form = form(&page, "/forgot");
    assert!(forgot_form.has("email") && forgot_form.has("csrf"));
    assert!(!forgot_form.has("password"));

    let registered = forgot(&app, TARO.email.unwrap()).await;
    let unknown = forgot(&app, "nobody@example.ac.jp").await;
    assert_eq!(registered.status, StatusCode::OK, "{registered:?}");
    assert_eq!(registered.status, unknown.status);
    assert_eq!(
        without_csrf(&registered.body),
        without_csrf(&unknown.body),
        "the same page whether or not the address is registered"
    );
    assert!(status_text(&registered.body).contains(&t("ja", "reset_sent_message")));

    let mail = sink.mail_to(TARO.email.unwrap()).await;
    assert_eq!(mail.subject(), "第2パスワードのリセット");
    assert!(mail.text().contains("URL 期限：30 分"), "{}", mail.text());
    mail.expect_link();
    let jobs = app.store().list_jobs(100).await.unwrap();
    assert!(
        jobs.iter().all(|j| j.recipient != "nobody@example.ac.jp"),
        "nothing is sent to an unknown address"
    );

    // A malformed address is the only thing the page tells.
    let bad = forgot(&app, "taro@").await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
    assert_eq!(alert_lines(&bad.body), vec![t("ja", "email_invalid")]);
}

async fn forgotten_second_password_is_reset_through_the_mailed_link(backend: Backend) {
    let (app, sink) = app_with_sink(backend, json!({}), &[GORO]).await;
    let address = GORO.email.unwrap();
    let sent = forgot(&app, address).await;
    assert_eq!(sent.status, StatusCode::OK, "{sent:?}");
    let link = sink.mail_to(address).await.expect_link();

    // The link's page is the form (GET twice: nothing consumed).
    let browser = app.browser();
    for _ in 0..2 {
        let page = browser.get(&link).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        let reset_form = form(&page, &link_path(&link));
        for field in [
            "username",
            "password",
            "new_second_password",
            "new_second_password_confirm",
            "csrf",
        ] {
            assert!(reset_form.has(field), "{field} on the reset page");
        }
        assert!(password_fields_are_empty(&page));
    }

    // Another valid student's ID and password: the generic error, the link not consumed.
    let new = "Goro2ndNew7";
    let other = reset(&browser, &link, TARO.username, TARO.password, new, new).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{other:?}");
    assert_eq!(
        alert_lines(&other.body),
        vec![t("ja", "reset_wrong_account_or_password")]
    );
    assert!(!other.body.contains(TARO.password) && !other.body.contains(new));
    // The wrong university password: the same error.
    let wrong = reset(&browser, &link, GORO.username, "Wrong-Univ-9", new, new).await;
    assert_eq!(
        alert_lines(&wrong.body),
        vec![t("ja", "reset_wrong_account_or_password")]
    );
    // The rules, each on its line; the university password is refused as well.
    let page = browser.get(&link).await;
    let mut cases = RULE_CASES.to_vec();
    cases.push((
        GORO.password,
        GORO.password,
        &["rule_same_as_university_password"],
    ));
    each_rule_is_named(
        &browser,
        &page,
        &link_path(&link),
        &[("username", GORO.username), ("password", GORO.password)],
        &cases,
    )
    .await;

    // Everything right: done, and only now is the link used.
    let done = reset(&browser, &link, GORO.username, GORO.password, new, new).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert!(
        status_text(&done.body).contains("第2パスワードが設定されました"),
        "{done:?}"
    );
    assert_eq!(href_of(&done, "OK"), "/login");
    let used = browser.get(&link).await;
    assert_link_page(&used, StatusCode::GONE, "link_reason_used");

    sink.mail_with_subject(address, "第2パスワード変更のお知らせ")
        .await;
    assert!(all_three_work(&app, &GORO, new).await);
    assert!(!all_three_work(&app, &GORO, GORO.second_password.unwrap()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_id_typed_differently_still_matches_the_links_account() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[GORO]).await;
    forgot(&app, GORO.email.unwrap()).await;
    let link = sink.mail_to(GORO.email.unwrap()).await.expect_link();
    let browser = app.browser();
    // Upper case and full-width digits normalise (NFKC, trim, lowercase) to the same user ID.
    let typed = " S２４０１００５ ";
    let done = reset(
        &browser,
        &link,
        typed,
        GORO.password,
        "Goro2ndNew7",
        "Goro2ndNew7",
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_university_passwords_at_the_reset_count_toward_throttling() {
    let (app, sink) = app_with_sink(
        Backend::Sqlite,
        json!({ "throttle": { "password_failures": 3 } }),
        &[],
    )
    .await;
    forgot(&app, TARO.email.unwrap()).await;
    let link = sink.mail_to(TARO.email.unwrap()).await.expect_link();
    let browser = app.browser();
    let new = "Taro2ndNew5";
    for _ in 0..3 {
        let reply = reset(&browser, &link, TARO.username, "Wrong-Univ-9", new, new).await;
        assert_eq!(
            alert_lines(&reply.body),
            vec![t("ja", "reset_wrong_account_or_password")]
        );
    }
    // Throttled now: the right password is refused too, at the reset and at the login.
    let refused = reset(&browser, &link, TARO.username, TARO.password, new, new).await;
    assert_eq!(
        alert_lines(&refused.body),
        vec![t("ja", "reset_wrong_account_or_password")],
        "{refused:?}"
    );
    let login = app.browser();
    let page = login.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    let reply = login
        .submit_login(&page, TARO.username, TARO.password, "")
        .await;
    assert!(reply.is_login_page(), "throttled: {reply:?}");
    assert!(alert_lines(&reply.body).contains(&t("ja", "login_failed")));

    // After the window, the same (unused) link works.
    app.advance(16 * 60);
    let done = reset(&browser, &link, TARO.username, TARO.password, new, new).await;
    assert_eq!(
        done.status,
        StatusCode::OK,
        "the link was not consumed: {done:?}"
    );
    assert!(all_three_work(&app, &TARO, new).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_lifts_the_second_password_lockout() {
    let (app, sink) = app_with_sink(
        Backend::Sqlite,
        json!({ "throttle": { "second_password_failures": 3 } }),
        &[],
    )
    .await;
    // The student forgot the second password and guessed until the lock.
    for _ in 0..3 {
        assert!(!all_three_work(&app, &TARO, "Guess2ndPw1").await);
    }
    assert!(
        !all_three_work(&app, &TARO, TARO.second_password.unwrap()).await,
        "locked"
    );
    // The seed's way out: "forgot the second password" → mail → new one → login.
    forgot(&app, TARO.email.unwrap()).await;
    let link = sink.mail_to(TARO.email.unwrap()).await.expect_link();
    let new = "Taro2ndNew5";
    let done = reset(
        &app.browser(),
        &link,
        TARO.username,
        TARO.password,
        new,
        new,
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let browser = app.browser();
    let authz = Authz::new("rp-step");
    let page = browser.open(&authz.url(&app.issuer)).await;
    let reply = browser
        .submit_login(&page, TARO.username, TARO.password, new)
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SEE_OTHER,
        "after a reset (university password + mailbox) the new second password works: {:?} {:?}",
        reply.status,
        alert_lines(&reply.body)
    );
    reply.code();
}

/// Changes TARO's email through the menu to `new` (the link confirmed), in a browser of its own.
async fn change_email_through_the_menu(
    app: &TestApp,
    sink: &SmtpSink,
    student: &Student,
    new: &str,
) {
    let browser = app.browser();
    sign_in_to_menu(&browser, student, student.second_password.unwrap()).await;
    let page = browser.get("/account/email").await;
    let sent = submit(
        &browser,
        &page,
        "/account/email",
        &[
            ("email", new),
            ("email_confirm", new),
            ("current_second_password", student.second_password.unwrap()),
        ],
    )
    .await;
    assert_eq!(sent.status, StatusCode::OK, "{sent:?}");
    let link = sink.mail_to(new).await.expect_link();
    let done = confirm_link(&browser, &link).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
}

fn reset_jobs_to(jobs: &[nidan::store::OutboxJob], address: &str) -> usize {
    jobs.iter()
        .filter(|j| j.recipient == address && j.subject == "第2パスワードのリセット")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_is_refused_for_72_hours_after_an_email_change() {
    let (app, sink) = app_with_sink(
        Backend::Sqlite,
        json!({ "session": { "idle_timeout": "2h" } }),
        &[],
    )
    .await;
    let old = TARO.email.unwrap();
    let new = "taro.new@example.net";
    // A reset link mailed to the old address before the change…
    forgot(&app, old).await;
    let early_link = sink.mail_to(old).await.expect_link();
    change_email_through_the_menu(&app, &sink, &TARO, new).await;
    sink.mail_with_subject(old, "メールアドレス変更のお知らせ")
        .await;

    // …is refused after it, even with the right user ID and password.
    let browser = app.browser();
    let second = "Taro2ndNew5";
    let refused = reset(
        &browser,
        &early_link,
        TARO.username,
        TARO.password,
        second,
        second,
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{refused:?}"
    );
    assert!(
        alert_lines(&refused.body).contains(&t("ja", "reset_refused_recent_email_change")),
        "{refused:?}"
    );
    // The forgot page sends no link to the new address within 72 hours (the same page, though).
    let sent = forgot(&app, new).await;
    assert_eq!(sent.status, StatusCode::OK);
    let jobs = app.store().list_jobs(100).await.unwrap();
    assert_eq!(
        reset_jobs_to(&jobs, new),
        0,
        "no reset mail within 72 hours"
    );
    app.advance(71 * 3600);
    forgot(&app, new).await;
    let jobs = app.store().list_jobs(100).await.unwrap();
    assert_eq!(reset_jobs_to(&jobs, new), 0, "no reset mail at 71 hours");

    // After 72 hours it works, and both addresses hear of it.
    app.advance(3600 + 60);
    forgot(&app, new).await;
    let link = sink
        .mail_with_subject(new, "第2パスワードのリセット")
        .await
        .expect_link();
    let done = reset(
        &app.browser(),
        &link,
        TARO.username,
        TARO.password,
        second,
        second,
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    sink.mail_with_subject(new, "第2パスワード変更のお知らせ")
        .await;
    sink.mail_with_subject(old, "第2パスワード変更のお知らせ")
        .await;
    assert!(all_three_work(&app, &TARO, second).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_password_change_is_also_told_to_the_previous_address() {
    let (app, sink) = app_with_sink(
        Backend::Sqlite,
        json!({ "session": { "idle_timeout": "2h" } }),
        &[GORO],
    )
    .await;
    let old = GORO.email.unwrap();
    let new = "goro.new@example.net";
    change_email_through_the_menu(&app, &sink, &GORO, new).await;
    let browser = app.browser();
    sign_in_to_menu(&browser, &GORO, GORO.second_password.unwrap()).await;
    let done = change_second_password(
        &browser,
        GORO.second_password.unwrap(),
        "Goro2ndNew7",
        "Goro2ndNew7",
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    sink.mail_with_subject(new, "第2パスワード変更のお知らせ")
        .await;
    sink.mail_with_subject(old, "第2パスワード変更のお知らせ")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn students_sharing_an_email_each_get_their_own_reset_link() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[ICHIKA, NIKA]).await;
    let family = ICHIKA.email.unwrap();
    forgot(&app, family).await;
    let mails = sink
        .wait_for_n(2, Duration::from_secs(10), |m| m.is_to(family))
        .await;
    let links: Vec<String> = mails.iter().map(|m| m.expect_link()).collect();
    assert_ne!(links[0], links[1], "one link per student");

    // Each link belongs to one of them: ICHIKA's credentials work on exactly one.
    let browser = app.browser();
    let mut ichika_link = None;
    for link in &links {
        let reply = reset(
            &browser,
            link,
            ICHIKA.username,
            ICHIKA.password,
            "Ichika2nd8",
            "Ichika2nd8",
        )
        .await;
        if reply.status == StatusCode::OK {
            assert!(
                ichika_link.is_none(),
                "ICHIKA's credentials fit one link only"
            );
            ichika_link = Some(link.clone());
        } else {
            assert_eq!(
                alert_lines(&reply.body),
                vec![t("ja", "reset_wrong_account_or_password")]
            );
        }
    }
    let ichika_link = ichika_link.expect("one link is ICHIKA's");
    let nika_link = links.iter().find(|l| **l != ichika_link).unwrap();
    let done = reset(
        &browser,
        nika_link,
        NIKA.username,
        NIKA.password,
        "Nika2ndPw9",
        "Nika2ndPw9",
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert!(all_three_work(&app, &ICHIKA, "Ichika2nd8").await);
    assert!(all_three_work(&app, &NIKA, "Nika2ndPw9").await);
}

// ───────────────────────────── nidan user import ─────────────────────────────

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_takes_plain_and_phc_second_passwords_while_the_server_runs() {
    let (app, _sink) = app_with_sink(Backend::Sqlite, json!({}), &[SHIRO]).await;
    let phc =
        nidan::auth::passwords::hash_with(&nidan::auth::passwords::test_params(), "Shiro2ndPass9");
    let lines = format!(
        "# moved from the old system\n\
         {{\"username\": \"s2401002\", \"email\": \"hanako@example.ac.jp\", \"second_password\": \"Hanako2ndPw4\"}}\n\
         \n\
         {{\"username\": \"S2401004\", \"email\": \"shiro@example.ac.jp\", \"second_password_hash\": \"{phc}\"}}\n"
    );
    let file = write_file(app.dir.path(), "students.jsonl", &lines);

    let output = nidan_cli(&app, &["user", "import", &file], None).await;
    assert!(
        output.status.success(),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    assert!(
        stdout(&output).contains("2 students imported, 0 already up to date"),
        "{}",
        stdout(&output)
    );
    // Idempotent.
    let output = nidan_cli(&app, &["user", "import", &file], None).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("0 students imported, 2 already up to date"),
        "{}",
        stdout(&output)
    );
    // The same through standard input.
    let output = nidan_cli(&app, &["user", "import", "-"], Some(&lines)).await;
    assert!(
        stdout(&output).contains("2 already up to date"),
        "{}",
        stdout(&output)
    );

    // The running server: both sign in with all three; the email counts as verified.
    for (student, second, address) in [
        (HANAKO, "Hanako2ndPw4", "hanako@example.ac.jp"),
        (SHIRO, "Shiro2ndPass9", "shiro@example.ac.jp"),
    ] {
        let tokens = code_with_all_three(&app, &app.browser(), &student, second).await;
        let userinfo = app.userinfo(&tokens.access_token).await.json();
        assert_eq!(userinfo["email"], address);
        assert_eq!(userinfo["email_verified"], true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_dry_run_imports_nothing() {
    let (app, _sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let line = r#"{"username": "s2401002", "email": "hanako@example.ac.jp", "second_password": "Hanako2ndPw4"}"#;
    let output = nidan_cli(&app, &["user", "import", "--dry-run", "-"], Some(line)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("dry run"), "{}", stdout(&output));
    assert!(!all_three_work(&app, &HANAKO, "Hanako2ndPw4").await);
    let browser = app.browser();
    let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    let reply = browser
        .submit_login(&page, HANAKO.username, HANAKO.password, "")
        .await;
    assert!(
        reply.is_redirect_to("/enroll/email"),
        "still not enrolled: {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_names_every_bad_line_and_imports_nothing() {
    let (app, _sink) = app_with_sink(Backend::Sqlite, json!({}), &[SHIRO]).await;
    let lines = [
        r#"{"username": "s2401002", "email": "hanako@example.ac.jp", "second_password": "Hanako2ndPw4"}"#,
        r#"{"username": "s2401004", "email": "not-an-email", "second_password": "Shiro2ndPass9"}"#,
        r#"{"username": "s2401004", "email": "shiro@example.ac.jp", "second_password": "short"}"#,
        r#"{"username": "s9999999", "email": "ghost@example.ac.jp", "second_password": "Ghost2ndPw1"}"#,
        r#"{"username": "s2401004", "email": "shiro@example.ac.jp"}"#,
        r#"{"username": "s2401004", "email": "shiro@example.ac.jp", "second_password": "Shiro2ndPass9", "second_password_hash": "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"}"#,
        r#"{"username": "s2401004", "email": "shiro@example.ac.jp", "second_password_hash": "plain-text"}"#,
        r#"this is not JSON"#,
        r#"{"username": "s2401004", "email": "shiro@example.ac.jp", "second_password": "Shiro2ndPass9", "role": "admin"}"#,
    ];
    let output = nidan_cli(&app, &["user", "import", "-"], Some(&lines.join("\n"))).await;
    assert!(!output.status.success(), "{}", stdout(&output));
    let errors = stderr(&output);
    for number in 2..=lines.len() {
        let named = errors
            .lines()
            .filter(|l| l.starts_with(&format!("line {number}:")))
            .count();
        assert_eq!(named, 1, "one clear error for line {number}:\n{errors}");
    }
    assert!(
        !errors.lines().any(|l| l.starts_with("line 1:")),
        "the good line is fine: {errors}"
    );
    assert!(
        !errors.contains("Hanako2ndPw4") && !errors.contains("Shiro2ndPass9"),
        "no passwords echoed: {errors}"
    );
    assert!(
        !stdout(&output).contains("imported,"),
        "{}",
        stdout(&output)
    );
    // Nothing half-imported: not even the good line.
    assert!(!all_three_work(&app, &HANAKO, "Hanako2ndPw4").await);
}

// ───────────────────────────── against a real LDAP directory ─────────────────────────────

fn ldap_student(student: &crate::common::slapd::LdapStudent) -> Student {
    Student {
        username: student.username,
        directory_id: "",
        password: student.password,
        second_password: None,
        email: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_reset_and_import_against_a_real_ldap_directory() {
    use crate::common::slapd::{self, Slapd};
    let ldap = Slapd::start().await;
    let (app, sink) = app_with_sink(
        Backend::Sqlite,
        json!({ "directory": ldap.server_config() }),
        &[],
    )
    .await;
    let taro = ldap_student(&slapd::TARO);
    let alex = ldap_student(&slapd::ALEX);
    let address = "taro.ldap@example.ac.jp";

    // First login against LDAP: email, link, second password, code.
    let browser = app.browser();
    let authz = Authz::new("rp-step");
    let page = first_login_to_email_page(&app, &browser, &authz, &taro).await;
    register_email(&browser, &page, address).await;
    let done = confirm_link(&browser, &sink.mail_to(address).await.expect_link()).await;
    let login = browser.get(&href_of(&done, "ログインページへ移動")).await;
    let reply = browser
        .submit_login(&login, taro.username, taro.password, "")
        .await;
    let setup = browser.follow(reply).await;
    let second = "Taro2ndLdap1";
    let set = submit(
        &browser,
        &setup,
        "/enroll/second-password",
        &[
            ("new_second_password", second),
            ("new_second_password_confirm", second),
        ],
    )
    .await;
    let login = browser.get(&href_of(&set, "OK")).await;
    let reply = browser
        .submit_login(&login, taro.username, taro.password, second)
        .await;
    let tokens = app.exchange(&authz, &reply.code()).await;
    assert_eq!(tokens.id_claims()["acr"], ACR_SECOND_PASSWORD);

    // The reset link is bound to the directory entry: another student's bind is refused.
    forgot(&app, address).await;
    let link = sink
        .mail_with_subject(address, "第2パスワードのリセット")
        .await
        .expect_link();
    let new = "Taro2ndLdap2";
    let other = reset(
        &app.browser(),
        &link,
        alex.username,
        alex.password,
        new,
        new,
    )
    .await;
    assert_eq!(
        alert_lines(&other.body),
        vec![t("ja", "reset_wrong_account_or_password")],
        "{other:?}"
    );
    let done = reset(
        &app.browser(),
        &link,
        taro.username,
        taro.password,
        new,
        new,
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert!(all_three_work(&app, &taro, new).await);

    // Import looks students up in LDAP.
    let hanako = ldap_student(&slapd::HANAKO);
    let line = r#"{"username": "s2401002", "email": "hanako.ldap@example.ac.jp", "second_password": "Hanako2ndLdap3"}"#;
    let output = nidan_cli(&app, &["user", "import", "-"], Some(line)).await;
    assert!(
        output.status.success(),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    assert!(all_three_work(&app, &hanako, "Hanako2ndLdap3").await);
    let ghost = r#"{"username": "s9999999", "email": "ghost@example.ac.jp", "second_password": "Ghost2ndPw1"}"#;
    let output = nidan_cli(&app, &["user", "import", "-"], Some(ghost)).await;
    assert!(!output.status.success());
    assert!(stderr(&output).contains("line 1:"), "{}", stderr(&output));
}
