//! Operations as the IT centre sees them: `/healthz` and `/readyz` (the directory reported in the
//! body, never failing the replica), graceful shutdown, `trusted_proxies`, Prometheus metrics (and
//! `metrics_listen`), JSON logs without secrets and with request ids, the audit trail and its
//! verification, the clean-up under a lease, a refresh for a student the directory lost, and the
//! operator commands tests/cli.rs does not cover.
//!
//! The first part holds helpers that replicas.rs and faults.rs use too: more nidan servers on a
//! test app's files (in this process, or as real `nidan serve` processes), enrollment walked over
//! HTTP with the one-time link read from the file mailbox, and token calls against any base URL.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use nidan::app::{RunningServer, Runtime};
use nidan::auth::passwords::{hash_with, test_params};
use nidan::clock::{random_id, random_token, TestClock};
use nidan::config::Config;
use nidan::store::DynStore;
use reqwest::header::AUTHORIZATION;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::slapd::{
    free_port, SilentListener, Slapd, ADMIN_DN, ADMIN_PASSWORD, PEOPLE, SERVICE_DN,
    SERVICE_PASSWORD,
};
use crate::common::*;
use crate::on_both_backends;

// ---------------------------------------------------------------------------------------------
// Helpers shared with replicas.rs and faults.rs
// ---------------------------------------------------------------------------------------------

/// The configuration `app` runs with, `edits` merged in (as JSON), as TOML text.
pub(crate) fn config_text(app: &TestApp, edits: Value) -> String {
    let text = std::fs::read_to_string(&app.config_path).expect("the app's configuration");
    let value: toml::Value = toml::from_str(&text).expect("the app's configuration is TOML");
    let mut config = serde_json::to_value(value).expect("TOML as JSON");
    merge(&mut config, edits);
    to_toml(&config)
}

/// Writes `config_text(app, edits)` next to the app's files; its path (for `nidan --config`).
pub(crate) fn write_config(app: &TestApp, name: &str, edits: Value) -> PathBuf {
    let path = app.dir.path().join(name);
    std::fs::write(&path, config_text(app, edits)).unwrap();
    path
}

pub(crate) fn parse_config(text: &str) -> Config {
    Config::from_toml(text, &Default::default(), false)
        .unwrap_or_else(|e| panic!("configuration refused:\n{e}\n{text}"))
}

/// A loopback listener on a free port and its `http://` URL.
pub(crate) async fn bind() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

/// Another nidan in this process with the app's files (users, KEK, client secrets, mailbox) and
/// `edits` (set `issuer` and usually `database_url`), on `clock`.
pub(crate) async fn spawn_server(
    app: &TestApp,
    listener: tokio::net::TcpListener,
    edits: Value,
    clock: Arc<TestClock>,
) -> RunningServer {
    let config = parse_config(&config_text(app, edits));
    let runtime = Runtime {
        clock,
        argon2: test_params(),
    };
    nidan::app::spawn(config, runtime, listener)
        .await
        .expect("the server starts")
}

/// Gives `student` a verified email and a second password in `store` (as `TestApp::enroll`).
pub(crate) async fn enroll_in(store: &DynStore, student: &Student, now: i64) -> String {
    let account = store
        .upsert_account(
            student.directory_id,
            student.username,
            "{}",
            &random_id(),
            &random_token(),
            now,
        )
        .await
        .expect("account upsert");
    if let (Some(email), Some(second)) = (student.email, student.second_password) {
        store
            .set_account_email(&account.id, email, now)
            .await
            .unwrap();
        store
            .set_second_password(&account.id, &hash_with(&test_params(), second), now)
            .await
            .unwrap();
    }
    account.id
}

/// The file mailbox of the app's configuration.
pub(crate) fn mail_dir(app: &TestApp) -> PathBuf {
    app.dir.path().join("mail")
}

/// Submits the form with `action` on `page`: its hidden fields (csrf, tx, lang) plus `fields`.
pub(crate) async fn submit(
    browser: &Browser,
    page: &Reply,
    action: &str,
    fields: &[(&str, &str)],
) -> Reply {
    let form = html::forms(&page.body)
        .into_iter()
        .find(|f| f.action == action)
        .unwrap_or_else(|| panic!("no form posting to {action}: {page:?}"));
    let mut values: Vec<(String, String)> = form
        .inputs
        .iter()
        .filter(|(name, _)| !fields.iter().any(|(f, _)| f == name))
        .cloned()
        .collect();
    values.extend(fields.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let values: Vec<(&str, &str)> = values
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    browser.post(action, &values).await
}

/// The first link on `page` whose `href` starts with `prefix`.
pub(crate) fn href(page: &Reply, prefix: &str) -> String {
    html::tags(&page.body, "a")
        .into_iter()
        .filter_map(|tag| html::attribute(tag, "href"))
        .find(|h| h.starts_with(prefix))
        .unwrap_or_else(|| panic!("no link to {prefix}: {page:?}"))
}

fn link_token(text: &str) -> Option<String> {
    let at = text.find("/link/")?;
    let token: String = text[at + 6..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    (!token.is_empty()).then_some(token)
}

/// Waits (at most 20 s) for a mail to `to` with a one-time link not in `seen`; its token.
pub(crate) async fn wait_for_link(dir: &Path, to: &str, seen: &mut HashSet<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        paths.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if !text.contains(to) {
                continue;
            }
            if let Some(token) = link_token(&text) {
                if seen.insert(token.clone()) {
                    return token;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no mail with a new link to {to} in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens `authorize_url` and signs `student` (not enrolled) in with the university password:
/// the email registration page.
pub(crate) async fn start_enrollment(
    browser: &Browser,
    authorize_url: &str,
    student: &Student,
) -> Reply {
    let page = browser.open(authorize_url).await;
    let reply = browser
        .submit_login(&page, student.username, student.password, "")
        .await;
    assert!(
        reply.is_redirect_to("/enroll/email"),
        "first login leads to the email registration: {reply:?}"
    );
    let page = browser.follow(reply).await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    page
}

/// Fills in the email registration page: the "confirmation mail sent" page.
pub(crate) async fn register_email(browser: &Browser, page: &Reply, email: &str) -> Reply {
    let sent = submit(
        browser,
        page,
        "/enroll/email",
        &[("email", email), ("email_confirm", email)],
    )
    .await;
    assert_eq!(sent.status, StatusCode::OK, "mail sent page: {sent:?}");
    sent
}

/// Opens a one-time link (GET shows a button) and confirms it (POST): the page after.
pub(crate) async fn confirm_link(browser: &Browser, token: &str) -> Reply {
    let action = format!("/link/{token}");
    let page = browser.get(&action).await;
    assert_eq!(page.status, StatusCode::OK, "link page: {page:?}");
    let done = submit(browser, &page, &action, &[]).await;
    assert_eq!(done.status, StatusCode::OK, "link confirmed: {done:?}");
    done
}

/// Fills in the second-password setup page: the "has been set" page.
pub(crate) async fn set_second_password(browser: &Browser, page: &Reply, second: &str) -> Reply {
    let done = submit(
        browser,
        page,
        "/enroll/second-password",
        &[
            ("new_second_password", second),
            ("new_second_password_confirm", second),
        ],
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "second password set: {done:?}");
    done
}

/// What a walk through enrollment leaves: the final login's answer and the link used.
pub(crate) struct Enrolled {
    pub reply: Reply,
    pub link: String,
}

/// The whole first-login flow of an unenrolled student, as the seed describes it: login with the
/// university password, email registration, the link from the mail, login again, second-password
/// setup, login with all three. Returns the last login's answer (a 303 to the client).
pub(crate) async fn enroll_over_http(
    browser: &Browser,
    authorize_url: &str,
    mail_dir: &Path,
    student: &Student,
    email: &str,
    second: &str,
) -> Enrolled {
    let page = start_enrollment(browser, authorize_url, student).await;
    register_email(browser, &page, email).await;
    let link = wait_for_link(mail_dir, email, &mut HashSet::new()).await;
    let registered = confirm_link(browser, &link).await;
    let login = browser.get(&href(&registered, "/login")).await;
    let reply = browser
        .submit_login(&login, student.username, student.password, "")
        .await;
    assert!(
        reply.is_redirect_to("/enroll/second-password"),
        "the next step is the second password: {reply:?}"
    );
    let page = browser.follow(reply).await;
    let set = set_second_password(browser, &page, second).await;
    let login = browser.get(&href(&set, "/login")).await;
    let reply = browser
        .submit_login(&login, student.username, student.password, second)
        .await;
    Enrolled { reply, link }
}

/// POSTs to `{base}/token` with `client_secret_basic` for one of the app's confidential clients.
pub(crate) async fn token_at(
    base: &str,
    app: &TestApp,
    client_id: &str,
    form: &[(&str, &str)],
) -> Reply {
    let credentials = format!(
        "{}:{}",
        form_encode(client_id),
        form_encode(app.secret(client_id))
    );
    let response = no_redirect_client()
        .post(format!("{base}/token"))
        .header(
            AUTHORIZATION,
            format!("Basic {}", STANDARD.encode(credentials)),
        )
        .form(form)
        .send()
        .await
        .expect("token request");
    Reply::from(response, None).await
}

pub(crate) async fn exchange_at(base: &str, app: &TestApp, authz: &Authz, code: &str) -> Reply {
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", REDIRECT_URI),
    ];
    if let Some(verifier) = &authz.verifier {
        form.push(("code_verifier", verifier));
    }
    token_at(base, app, authz.client_id(), &form).await
}

pub(crate) async fn refresh_at(base: &str, app: &TestApp, client_id: &str, token: &str) -> Reply {
    token_at(
        base,
        app,
        client_id,
        &[("grant_type", "refresh_token"), ("refresh_token", token)],
    )
    .await
}

pub(crate) async fn userinfo_at(base: &str, access_token: &str) -> Reply {
    let response = no_redirect_client()
        .get(format!("{base}/userinfo"))
        .bearer_auth(access_token)
        .send()
        .await
        .expect("userinfo request");
    Reply::from(response, None).await
}

pub(crate) async fn get_at(url: &str) -> Reply {
    let response = no_redirect_client().get(url).send().await.expect("GET");
    Reply::from(response, None).await
}

/// The `kid`s of a JWKS document.
pub(crate) fn kids(jwks: &Value) -> HashSet<String> {
    jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_string())
        .collect()
}

/// `nidan` with the operator's NIDAN_* environment removed.
pub(crate) fn nidan_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nidan"));
    for (name, _) in std::env::vars() {
        if name.starts_with("NIDAN_") {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "warn");
    command
}

/// Runs `nidan --config CONFIG args…` to completion.
pub(crate) async fn cli(config: &Path, args: &[&str]) -> Output {
    let mut command = nidan_command();
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || command.output().expect("nidan runs"))
        .await
        .unwrap()
}

/// Like `cli`, expecting success; its standard output.
pub(crate) async fn operator(config: &Path, args: &[&str]) -> String {
    let output = cli(config, args).await;
    assert!(
        output.status.success(),
        "nidan {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A configuration for a real `nidan serve` on `port` with its own SQLite file `db`.
pub(crate) fn process_config(
    app: &TestApp,
    name: &str,
    db: &str,
    port: u16,
    edits: Value,
) -> (PathBuf, String) {
    let url = format!("http://127.0.0.1:{port}");
    let mut all = json!({
        "issuer": url,
        "listen": format!("127.0.0.1:{port}"),
        "database_url": format!("sqlite://{}", app.dir.path().join(db).display()),
    });
    merge(&mut all, edits);
    (write_config(app, name, all), url)
}

/// A real `nidan serve` process; killed (SIGKILL) when dropped.
pub(crate) struct Process {
    child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
}

impl Process {
    /// `nidan --config CONFIG serve` with `RUST_LOG`, its output appended to `log`; waits (at most
    /// a minute) for `/healthz`.
    pub(crate) async fn serve(config: &Path, url: &str, log: &Path, rust_log: &str) -> Process {
        let mut command = nidan_command();
        command.arg("--config").arg(config).arg("serve");
        Self::spawn(command, url, log, rust_log).await
    }

    pub(crate) async fn spawn(
        mut command: Command,
        url: &str,
        log: &Path,
        rust_log: &str,
    ) -> Process {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        command
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = command.spawn().expect("nidan serve starts");
        let mut process = Process {
            child: Some(child),
            url: url.to_string(),
            log: log.to_path_buf(),
        };
        process.wait_ready().await;
        process
    }

    async fn wait_ready(&mut self) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "nidan exited ({status}) before it was ready:\n{}",
                    self.log_text()
                );
            }
            if let Ok(reply) = http.get(format!("{}/healthz", self.url)).send().await {
                if reply.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "nidan did not answer /healthz within a minute:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Whether the process still runs.
    pub(crate) fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGKILL, as a crash or the OOM killer would.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (what systemd sends) and wait at most 20 s for a clean exit; its success.
    pub(crate) async fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `[directory]` table for LDAP at `url` (the service password in a file under `dir`).
pub(crate) fn ldap_directory(url: &str, timeout: &str, dir: &Path) -> Value {
    let password_file = dir.join("ldap-service-password");
    std::fs::write(&password_file, format!("{SERVICE_PASSWORD}\n")).unwrap();
    json!({
        "kind": "ldap",
        "url": url,
        "bind_dn": SERVICE_DN,
        "bind_password_file": password_file.display().to_string(),
        "base_dn": PEOPLE,
        "user_filter": "(uid={username})",
        "id_attribute": "entryUUID",
        "timeout": timeout,
        "claims": Slapd::claims(),
    })
}

/// An HTML error page that shows no internals (no Rust, SQL or library error text).
pub(crate) fn assert_clean_error_page(reply: &Reply, what: &str) {
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/html")),
        "{what}: an HTML page: {reply:?}"
    );
    assert_no_internals(&reply.body, what);
}

pub(crate) fn assert_no_internals(body: &str, what: &str) {
    let lower = body.to_lowercase();
    for internal in [
        "sqlx",
        "database error",
        "pooltimedout",
        "pool timed out",
        "connection refused",
        "panicked",
        "stack backtrace",
        "src/",
        ".rs:",
        "io error",
        "readonly database",
        "disk i/o",
        "unavailable(",
    ] {
        assert!(
            !lower.contains(internal),
            "{what}: internal text {internal:?} shown: {body}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Health and readiness
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn healthz_and_readyz_name_the_store_the_keys_and_the_directory() {
    let app = TestApp::sqlite().await;
    let health = app.get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK, "{health:?}");
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
    assert!(
        ready
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{ready:?}"
    );
    let body = ready.json();
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["store"], "ok", "{body}");
    assert_eq!(body["keys"], "ok", "{body}");
    assert_eq!(body["directory"], "ok", "{body}");
    assert_eq!(body["shutting_down"], false, "{body}");
}

/// Without a signing key this replica cannot serve: 503, and the body says why.
#[tokio::test]
async fn readyz_is_503_when_this_replica_has_no_signing_keys() {
    let app = TestApp::sqlite().await;
    app.execute("DELETE FROM signing_keys", &[]).await;
    let state = &app.server.state;
    let keys = nidan::keys::KeySet::load(&state.store, &state.kek, app.now())
        .await
        .unwrap();
    *state.keys.write().unwrap() = Arc::new(keys);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{ready:?}");
    let body = ready.json();
    assert_eq!(body["keys"], "missing", "{body}");
    assert_eq!(body["store"], "ok", "{body}");
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
}

/// Outside the embedded default a missing key-encryption key stops `nidan serve` with a clear
/// message; nothing is generated.
#[tokio::test]
async fn a_missing_key_encryption_key_is_fatal() {
    let app = TestApp::sqlite().await;
    let missing = app.dir.path().join("no-such-kek");
    let (config, _) = process_config(
        &app,
        "no-kek.toml",
        "no-kek.db",
        free_port(),
        json!({ "key_encryption_key_file": missing.display().to_string() }),
    );
    let mut command = nidan_command();
    command
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("nidan runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nidan serve started without its key-encryption key");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("key_encryption_key_file") || stderr.contains("no-such-kek"),
        "the message names the missing key: {stderr}"
    );
    assert!(
        !missing.exists(),
        "no key is generated outside the embedded default"
    );
}

/// The directory is shared by every replica: its failure is reported, never a reason to take
/// this replica out of the load balancer.
#[tokio::test]
async fn readyz_stays_ready_and_names_a_directory_that_is_down_or_silent() {
    let secrets = tempfile::tempdir().unwrap();
    let closed = format!("ldap://127.0.0.1:{}", free_port());
    let silent = SilentListener::start().await;
    for (url, what) in [(closed.as_str(), "down"), (silent.url.as_str(), "silent")] {
        let app = TestApp::builder(Backend::Sqlite)
            .config(json!({ "directory": ldap_directory(url, "1s", secrets.path()) }))
            .build()
            .await;
        let started = Instant::now();
        let ready = app.get("/readyz").await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(2500),
            "{what}: /readyz waits at most about the directory timeout: {took:?}"
        );
        assert_eq!(ready.status, StatusCode::OK, "{what}: {ready:?}");
        let body = ready.json();
        assert_eq!(body["status"], "ready", "{what}: {body}");
        assert_eq!(body["store"], "ok", "{what}: {body}");
        assert_eq!(body["directory"], "unavailable", "{what}: {body}");

        let metrics = app.get("/metrics").await.body;
        assert_eq!(
            metric(&metrics, "nidan_directory_up", &[]),
            Some(0.0),
            "{what}: {metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_finishes_an_in_flight_login() {
    // A directory that never answers keeps the login request busy for its 3-second timeout.
    let silent = SilentListener::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "directory": ldap_directory(&silent.url, "3s", secrets.path()) }))
        .build()
        .await;
    let (listener, url) = bind().await;
    let addr = listener.local_addr().unwrap();
    let server = spawn_server(
        &app,
        listener,
        json!({ "issuer": url, "database_url": format!("sqlite://{}", app.dir.path().join("stop.db").display()) }),
        app.clock.clone(),
    )
    .await;

    let browser = Arc::new(Browser::new(&url));
    let page = browser.open(&Authz::new("rp-basic").url(&url)).await;
    assert!(page.is_login_page(), "{page:?}");
    let in_flight = {
        let browser = browser.clone();
        tokio::spawn(async move {
            browser
                .submit_login(&page, TARO.username, TARO.password, "")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!in_flight.is_finished(), "the login is still waiting");

    let started = Instant::now();
    server.stop().await;
    let stopping = started.elapsed();
    // The answer was written before stop() returned; the client task only has to read it.
    let reply = tokio::time::timeout(Duration::from_secs(1), in_flight)
        .await
        .expect("the in-flight login was answered by the time stop() returned")
        .expect("the connection was not cut");
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the login got its answer (the directory's try-again page): {reply:?}"
    );
    assert!(
        stopping >= Duration::from_millis(800),
        "stop() waited for the request: {stopping:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections after stop()"
    );
}

/// One login attempt from a fresh browser, sent with `X-Forwarded-For: forwarded`.
async fn login_forwarded(app: &TestApp, forwarded: &str, username: &str, password: &str) -> Reply {
    let browser = app.browser();
    let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    assert!(page.is_login_page(), "{page:?}");
    let form = html::forms(&page.body)
        .into_iter()
        .find(|f| f.action == "/login")
        .unwrap();
    let mut fields: Vec<(String, String)> = form
        .inputs
        .iter()
        .filter(|(n, _)| !matches!(n.as_str(), "username" | "password" | "second_password"))
        .cloned()
        .collect();
    fields.push(("username".into(), username.into()));
    fields.push(("password".into(), password.into()));
    fields.push(("second_password".into(), String::new()));
    let request = no_redirect_client()
        .post(app.url("/login"))
        .header("x-forwarded-for", forwarded)
        .form(&fields);
    browser.send(request).await
}

fn is_code(reply: &Reply) -> bool {
    reply.status == StatusCode::SEE_OTHER
        && reply
            .location
            .as_deref()
            .is_some_and(|l| l.starts_with(REDIRECT_URI) && l.contains("code="))
}

async fn audited_addresses(app: &TestApp) -> HashSet<String> {
    app.store()
        .list_audit(None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "login")
        .filter_map(|e| e.address)
        .collect()
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_a_trusted_proxy() {
    let throttle = json!({ "address_failures": 2, "password_failures": 10 });
    // The test client (127.0.0.1) is the trusted reverse proxy.
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "trusted_proxies": ["127.0.0.1/32"], "throttle": throttle.clone() }))
        .build()
        .await;
    for username in ["s9000001", "s9000002"] {
        let reply = login_forwarded(&app, "198.51.100.7", username, "wrong-password").await;
        assert!(reply.is_login_page(), "{reply:?}");
    }
    let blocked = login_forwarded(&app, "198.51.100.7", TARO.username, TARO.password).await;
    assert!(
        !is_code(&blocked),
        "the forwarded address is throttled: {blocked:?}"
    );
    // A client cannot escape by prepending an address of its choice: the proxy appends the real one.
    let spoofed = login_forwarded(
        &app,
        "203.0.113.50, 198.51.100.7",
        TARO.username,
        TARO.password,
    )
    .await;
    assert!(
        !is_code(&spoofed),
        "the nearest untrusted hop counts: {spoofed:?}"
    );
    let other = login_forwarded(&app, "198.51.100.8", TARO.username, TARO.password).await;
    assert!(
        is_code(&other),
        "another forwarded address is not: {other:?}"
    );
    let addresses = audited_addresses(&app).await;
    assert!(addresses.contains("198.51.100.7"), "{addresses:?}");
    assert!(!addresses.contains("127.0.0.1"), "{addresses:?}");

    // Without trusted proxies the header is ignored: every attempt is the peer's.
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "throttle": throttle }))
        .build()
        .await;
    for username in ["s9000001", "s9000002"] {
        login_forwarded(&app, "198.51.100.7", username, "wrong-password").await;
    }
    let other = login_forwarded(&app, "198.51.100.8", TARO.username, TARO.password).await;
    assert!(
        !is_code(&other),
        "an untrusted X-Forwarded-For does not move the client out of the lock: {other:?}"
    );
    let addresses = audited_addresses(&app).await;
    assert_eq!(
        addresses,
        HashSet::from(["127.0.0.1".to_string()]),
        "the peer address is recorded"
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// The sum of the samples of `name` whose labels include `labels` (None when there is none).
pub(crate) fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(rest) = rest.strip_prefix('{') {
            // The closing brace outside quotes (values such as "/link/{token}" hold braces).
            let mut quoted = false;
            let Some(end) = rest.char_indices().find_map(|(i, c)| {
                match c {
                    '"' => quoted = !quoted,
                    '}' if !quoted => return Some(i),
                    _ => {}
                }
                None
            }) else {
                continue;
            };
            (&rest[..end], &rest[end + 1..])
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let pairs: Vec<&str> = label_text.split(',').collect();
        if !labels
            .iter()
            .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()))
        {
            continue;
        }
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        total = Some(total.unwrap_or(0.0) + value);
    }
    total
}

fn at_least(text: &str, name: &str, labels: &[(&str, &str)], minimum: f64) {
    let value = metric(text, name, labels);
    assert!(
        value.is_some_and(|v| v >= minimum),
        "{name}{labels:?} should be at least {minimum}, is {value:?}:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_logins_tokens_directory_and_lockouts() {
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "throttle": { "second_password_failures": 2 } }))
        .build()
        .await;
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let refreshed = app.refresh("rp-basic", tokens.refresh()).await;
    assert_eq!(refreshed.status, StatusCode::OK, "{refreshed:?}");
    app.tokens_for("rp-basic", &JIRO, Level::SecondPassword)
        .await;
    let credentials = app
        .token(
            &app.auth("rp-basic"),
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_eq!(credentials.status, StatusCode::OK, "{credentials:?}");
    let browser = app.browser();
    let wrong = browser
        .sign_in(
            &Authz::new("rp-basic").url(&app.issuer),
            &Student {
                password: "wrong-password",
                ..TARO
            },
            Level::Password,
        )
        .await;
    assert!(wrong.is_login_page(), "{wrong:?}");
    for _ in 0..2 {
        let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
        browser
            .submit_login(&page, TARO.username, TARO.password, "Wrong2ndPass1")
            .await;
    }
    // A one-time link token must never become a label.
    let probe = random_token();
    app.get(&format!("/link/{probe}")).await;

    let reply = app.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "Prometheus text format: {reply:?}"
    );
    let text = reply.body;
    // Requests by route and status, with latency histograms.
    at_least(
        &text,
        "nidan_http_requests_total",
        &[("route", "/token"), ("method", "POST"), ("status", "200")],
        3.0,
    );
    at_least(
        &text,
        "nidan_http_requests_total",
        &[("route", "/login"), ("status", "303")],
        2.0,
    );
    at_least(
        &text,
        "nidan_http_requests_total",
        &[("route", "/link/{token}"), ("status", "404")],
        1.0,
    );
    assert!(!text.contains(&probe), "a link token in the metrics");
    at_least(
        &text,
        "nidan_http_request_duration_seconds_count",
        &[("route", "/token")],
        3.0,
    );
    at_least(
        &text,
        "nidan_http_request_duration_seconds_bucket",
        &[("route", "/token"), ("le", "+Inf")],
        3.0,
    );
    // Logins by outcome and level.
    at_least(
        &text,
        "nidan_logins_total",
        &[("outcome", "success"), ("level", "password")],
        1.0,
    );
    at_least(
        &text,
        "nidan_logins_total",
        &[("outcome", "success"), ("level", "second-password")],
        1.0,
    );
    at_least(
        &text,
        "nidan_logins_total",
        &[("outcome", "wrong_password")],
        1.0,
    );
    at_least(
        &text,
        "nidan_logins_total",
        &[("outcome", "wrong_second_password")],
        2.0,
    );
    // Tokens by grant.
    for (grant, n) in [
        ("authorization_code", 2.0),
        ("refresh_token", 1.0),
        ("client_credentials", 1.0),
    ] {
        at_least(&text, "nidan_tokens_issued_total", &[("grant", grant)], n);
    }
    // Directory latency, argon2 queue, outbox depth, lockouts.
    at_least(&text, "nidan_directory_duration_seconds_count", &[], 5.0);
    at_least(
        &text,
        "nidan_directory_requests_total",
        &[("outcome", "ok")],
        4.0,
    );
    assert!(
        metric(&text, "nidan_argon2_queue_depth", &[]).is_some(),
        "{text}"
    );
    assert!(metric(&text, "nidan_outbox_depth", &[]).is_some(), "{text}");
    at_least(
        &text,
        "nidan_lockouts_total",
        &[("kind", "second_password")],
        1.0,
    );
    assert_eq!(metric(&text, "nidan_store_up", &[]), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, "nidan_directory_up", &[]),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_listen_moves_metrics_off_the_public_listener() {
    let port = free_port();
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "metrics_listen": format!("127.0.0.1:{port}") }))
        .build()
        .await;
    app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let public = app.get("/metrics").await;
    assert_eq!(public.status, StatusCode::NOT_FOUND, "{public:?}");
    let private = get_at(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(private.status, StatusCode::OK, "{private:?}");
    at_least(
        &private.body,
        "nidan_tokens_issued_total",
        &[("grant", "authorization_code")],
        1.0,
    );
    // Only metrics there: no pages, no OIDC endpoints.
    let other = get_at(&format!(
        "http://127.0.0.1:{port}/.well-known/openid-configuration"
    ))
    .await;
    assert_eq!(other.status, StatusCode::NOT_FOUND, "{other:?}");
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_request_ids_and_no_secrets() {
    let app = TestApp::sqlite().await;
    let (config, url) = process_config(
        &app,
        "logs.toml",
        "logs.db",
        free_port(),
        json!({ "log_format": "json" }),
    );
    let log = app.dir.path().join("logs.log");
    let mut server = Process::serve(&config, &url, &log, "debug").await;

    let mut secrets: Vec<(String, &str)> = vec![
        (HANAKO.password.to_string(), "university password"),
        ("Wrong-Pass-9".to_string(), "a rejected password"),
        ("Nidan2402b".to_string(), "second password"),
        ("Wrong2nd999".to_string(), "a rejected second password"),
        (app.secret("rp-basic").to_string(), "client secret"),
    ];
    let mut request_ids = Vec::new();
    let browser = Browser::new(&url);
    let mut keep = |reply: &Reply| {
        if let Some(id) = reply.header("x-request-id") {
            request_ids.push(id.to_string());
        }
    };

    let page = browser.open(&Authz::new("rp-basic").url(&url)).await;
    let wrong = browser
        .submit_login(&page, HANAKO.username, "Wrong-Pass-9", "")
        .await;
    assert!(wrong.is_login_page(), "{wrong:?}");
    keep(&wrong);

    let authz = Authz::new("rp-basic");
    let enrolled = enroll_over_http(
        &browser,
        &authz.url(&url),
        &app.dir.path().join("mail"),
        &HANAKO,
        "hanako@example.ac.jp",
        "Nidan2402b",
    )
    .await;
    keep(&enrolled.reply);
    secrets.push((enrolled.link.clone(), "one-time link token"));
    let code = enrolled.reply.code();
    secrets.push((code.clone(), "authorization code"));
    let exchanged = exchange_at(&url, &app, &authz, &code).await;
    assert_eq!(exchanged.status, StatusCode::OK, "{exchanged:?}");
    keep(&exchanged);
    let tokens = Tokens::from(exchanged.json());
    let refreshed = refresh_at(&url, &app, "rp-basic", tokens.refresh()).await;
    assert_eq!(refreshed.status, StatusCode::OK, "{refreshed:?}");
    keep(&refreshed);
    let fresh = Tokens::from(refreshed.json());
    let info = userinfo_at(&url, &fresh.access_token).await;
    assert_eq!(info.status, StatusCode::OK, "{info:?}");
    keep(&info);
    // A wrong second password in another browser, then the refresh token replayed.
    let other = Browser::new(&url);
    let page = other.open(&Authz::new("rp-basic").url(&url)).await;
    let failed = other
        .submit_login(&page, HANAKO.username, HANAKO.password, "Wrong2nd999")
        .await;
    assert!(failed.is_login_page(), "{failed:?}");
    keep(&failed);
    let replay = refresh_at(&url, &app, "rp-basic", tokens.refresh()).await;
    assert_eq!(replay.status, StatusCode::BAD_REQUEST, "{replay:?}");
    for token in [&tokens, &fresh] {
        secrets.push((token.access_token.clone(), "access token"));
        secrets.push((token.refresh().to_string(), "refresh token"));
    }
    if let Some(cookie) = browser.cookie("nidan_session") {
        secrets.push((cookie, "session cookie"));
    }
    assert!(server.terminate().await, "nidan stops cleanly on SIGTERM");

    let text = server.log_text();
    assert!(!text.contains("panicked"), "{text}");
    for (secret, what) in &secrets {
        assert!(!text.contains(secret.as_str()), "the {what} is in the log");
    }
    let mut per_request = 0;
    let mut seen_ids = HashSet::new();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let entry: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("every log line is JSON ({e}): {line}"));
        let target = entry["target"].as_str().unwrap_or_default();
        let in_request = entry["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(|s| s["name"] == "request"));
        let handler = [
            "tower_http",
            "nidan::auth",
            "nidan::oidc",
            "nidan::enroll",
            "nidan::error",
        ]
        .iter()
        .any(|t| target.starts_with(t));
        if !(in_request || handler) {
            continue;
        }
        per_request += 1;
        let id = entry["span"]["request_id"]
            .as_str()
            .or_else(|| {
                entry["spans"]
                    .as_array()?
                    .iter()
                    .find(|s| s["name"] == "request")?["request_id"]
                    .as_str()
            })
            .unwrap_or_else(|| panic!("a per-request line without the request id: {line}"));
        assert!(id.len() >= 32 && id != "-", "a real request id: {line}");
        seen_ids.insert(id.to_string());
        let path = entry["span"]["path"].as_str().unwrap_or_default();
        assert!(
            !path.contains('?') && (!path.starts_with("/link/") || path == "/link/…"),
            "paths are logged without queries or link tokens: {line}"
        );
    }
    assert!(per_request > 20, "debug shows per-request lines:\n{text}");
    for id in &request_ids {
        assert!(
            seen_ids.contains(id),
            "the X-Request-Id {id} the client got is in the log"
        );
    }
    assert!(
        !text
            .lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with('{')),
        "log_format = json writes only JSON lines:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// The audit trail
// ---------------------------------------------------------------------------------------------

const SABURO: Student = Student {
    username: "s2401004",
    directory_id: "uuid-2401004",
    password: "Daigaku-Pass-4",
    second_password: Some("Nidan2404d"),
    email: Some("saburo@example.ac.jp"),
};

/// The `audit list` lines as (kind, outcome, account).
fn audit_rows(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            (cols.len() >= 7).then(|| {
                (
                    cols[1].to_string(),
                    cols[2].to_string(),
                    cols[3].to_string(),
                )
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_records_security_events_and_verify_finds_tampering() {
    let app = TestApp::builder(Backend::Sqlite)
        .student(SABURO)
        .config(json!({ "throttle": { "second_password_failures": 2 } }))
        .build()
        .await;
    let mail = mail_dir(&app);

    // Login success (both levels) and failure.
    let taro = app.browser();
    let reply = taro
        .sign_in(
            &Authz::new("rp-basic").url(&app.issuer),
            &TARO,
            Level::SecondPassword,
        )
        .await;
    reply.code();
    let wrong = app
        .browser()
        .sign_in(
            &Authz::new("rp-basic").url(&app.issuer),
            &Student {
                password: "wrong-password",
                ..TARO
            },
            Level::Password,
        )
        .await;
    assert!(wrong.is_login_page());

    // Step-up.
    let jiro = app.browser();
    let reply = jiro
        .sign_in(
            &Authz::new("rp-step").url(&app.issuer),
            &JIRO,
            Level::Password,
        )
        .await;
    let page = jiro.follow(reply).await;
    let reply = jiro
        .submit_step_up(&page, JIRO.second_password.unwrap())
        .await;
    reply.code();

    // Lockout.
    let saburo = app.browser();
    for _ in 0..2 {
        let page = saburo.open(&Authz::new("rp-basic").url(&app.issuer)).await;
        saburo
            .submit_login(&page, SABURO.username, SABURO.password, "Wrong2ndPass1")
            .await;
    }

    // Enrollment.
    let hanako = app.browser();
    let enrolled = enroll_over_http(
        &hanako,
        &Authz::new("rp-basic").url(&app.issuer),
        &mail,
        &HANAKO,
        "hanako@example.ac.jp",
        "Nidan2402b",
    )
    .await;
    enrolled.reply.code();

    // Email change and second-password change from the menu.
    let page = taro.get("/account/email").await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    let sent = submit(
        &taro,
        &page,
        "/account/email",
        &[
            ("email", "taro.new@example.ac.jp"),
            ("email_confirm", "taro.new@example.ac.jp"),
            ("current_second_password", TARO.second_password.unwrap()),
        ],
    )
    .await;
    assert_eq!(sent.status, StatusCode::OK, "{sent:?}");
    let link = wait_for_link(&mail, "taro.new@example.ac.jp", &mut HashSet::new()).await;
    confirm_link(&taro, &link).await;
    let page = taro.get("/account/second-password").await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    let changed = submit(
        &taro,
        &page,
        "/account/second-password",
        &[
            ("current_second_password", TARO.second_password.unwrap()),
            ("new_second_password", "Nidan2401z"),
            ("new_second_password_confirm", "Nidan2401z"),
        ],
    )
    .await;
    assert_eq!(changed.status, StatusCode::OK, "{changed:?}");

    // Second-password reset through the forgot page.
    let forgot = app.browser();
    let page = forgot.get("/forgot").await;
    submit(&forgot, &page, "/forgot", &[("email", JIRO.email.unwrap())]).await;
    let link = wait_for_link(&mail, JIRO.email.unwrap(), &mut HashSet::new()).await;
    let action = format!("/link/{link}");
    let page = forgot.get(&action).await;
    let done = submit(
        &forgot,
        &page,
        &action,
        &[
            ("username", JIRO.username),
            ("password", JIRO.password),
            ("new_second_password", "Nidan2403z"),
            ("new_second_password_confirm", "Nidan2403z"),
        ],
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");

    let listed = operator(&app.config_path, &["audit", "list", "--limit", "500"]).await;
    let rows = audit_rows(&listed);
    for (kind, outcome) in [
        ("login", "success"),
        ("login", "failed: university password"),
        ("login", "failed: second password"),
        ("login", "lockout: second password"),
        ("step_up", "success"),
        ("enrollment", "email link sent"),
        ("enrollment", "email verified"),
        ("enrollment", "second password set"),
        ("email_change", "email changed"),
        ("second_password_change", "changed"),
        ("second_password_reset", "reset by email link"),
    ] {
        assert!(
            rows.iter().any(|(k, o, _)| k == kind && o == outcome),
            "audit list shows {kind} / {outcome}:\n{listed}"
        );
    }
    for secret in [
        TARO.password,
        "Nidan2401z",
        "Nidan2403z",
        "wrong-password",
        "Wrong2ndPass1",
        link.as_str(),
        enrolled.link.as_str(),
    ] {
        assert!(!listed.contains(secret), "no secrets in the audit trail");
    }
    let hanako_rows = audit_rows(
        &operator(
            &app.config_path,
            &["audit", "list", "--user", HANAKO.username],
        )
        .await,
    );
    assert!(hanako_rows.len() >= 4, "{hanako_rows:?}");
    let hanako_id = &hanako_rows[0].2;
    assert!(
        hanako_rows
            .iter()
            .all(|(_, _, account)| account == hanako_id),
        "--user lists only that student: {hanako_rows:?}"
    );

    let verified = operator(&app.config_path, &["audit", "verify"]).await;
    assert!(verified.contains("intact"), "{verified}");

    app.execute(
        "UPDATE audit_events SET outcome = 'success' WHERE kind = 'login' AND outcome = 'failed: university password'",
        &[],
    )
    .await;
    let tampered = cli(&app.config_path, &["audit", "verify"]).await;
    assert!(!tampered.status.success(), "verify fails after tampering");
    let stderr = String::from_utf8_lossy(&tampered.stderr);
    assert!(stderr.contains("altered"), "{stderr}");
}

#[tokio::test]
async fn audit_verify_notices_a_removed_record() {
    let app = TestApp::sqlite().await;
    for _ in 0..3 {
        app.tokens_for("rp-basic", &TARO, Level::Password).await;
    }
    operator(&app.config_path, &["audit", "verify"]).await;
    // The second login record of the server's chain goes.
    app.execute(
        "DELETE FROM audit_events WHERE id = (SELECT id FROM audit_events WHERE kind = 'login' \
         ORDER BY seq LIMIT 1 OFFSET 1)",
        &[],
    )
    .await;
    let output = cli(&app.config_path, &["audit", "verify"]).await;
    assert!(!output.status.success(), "a removed record is found");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("missing"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Clean-up
// ---------------------------------------------------------------------------------------------

/// Row counts straight from the database.
enum Tables {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Tables {
    async fn open(app: &TestApp) -> Tables {
        match app.backend {
            Backend::Sqlite => {
                Tables::Sqlite(sqlx::SqlitePool::connect(&app.database_url).await.unwrap())
            }
            Backend::Postgres => {
                Tables::Postgres(sqlx::PgPool::connect(&app.database_url).await.unwrap())
            }
        }
    }

    async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        match self {
            Tables::Sqlite(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap(),
            Tables::Postgres(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap(),
        }
    }
}

const EXPIRING: [&str; 8] = [
    "authorization_codes",
    "login_transactions",
    "access_tokens",
    "refresh_tokens",
    "grants",
    "browser_sessions",
    "one_time_links",
    "throttle_counters",
];

on_both_backends!(cleanup_removes_what_expired_under_one_lease);

async fn cleanup_removes_what_expired_under_one_lease(backend: Backend) {
    let app = TestApp::start(backend).await;
    let tables = Tables::open(&app).await;
    // Something in every table the clean-up looks after.
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let unused = app
        .browser()
        .sign_in(
            &Authz::new("rp-basic").url(&app.issuer),
            &JIRO,
            Level::Password,
        )
        .await
        .code();
    assert!(!unused.is_empty());
    app.browser()
        .open(&Authz::new("rp-basic").url(&app.issuer))
        .await;
    app.browser()
        .sign_in(
            &Authz::new("rp-basic").url(&app.issuer),
            &Student {
                password: "wrong-password",
                ..JIRO
            },
            Level::Password,
        )
        .await;
    let forgot = app.browser();
    let page = forgot.get("/forgot").await;
    submit(&forgot, &page, "/forgot", &[("email", TARO.email.unwrap())]).await;
    wait_for_link(&mail_dir(&app), TARO.email.unwrap(), &mut HashSet::new()).await;
    for table in EXPIRING {
        assert!(tables.count(table).await > 0, "{table} has rows");
    }
    let accounts = tables.count("accounts").await;
    let audit = tables.count("audit_events").await;
    let keys = tables.count("signing_keys").await;

    // The server's own clean-up task took the lease at start; nobody else runs meanwhile.
    let state = &app.server.state;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tables.count("leases").await == 0 {
        assert!(
            Instant::now() < deadline,
            "the server takes the clean-up lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        nidan::app::cleanup_once(state, "operator-test")
            .await
            .unwrap(),
        None,
        "the lease is held by the server's task"
    );

    // Eleven minutes later the lease has lapsed; only what expired goes (access tokens live 10 min).
    app.advance(11 * 60);
    let removed = nidan::app::cleanup_once(state, "replica-a").await.unwrap();
    assert!(removed.is_some_and(|n| n > 0), "{removed:?}");
    assert_eq!(tables.count("access_tokens").await, 0);
    for table in [
        "refresh_tokens",
        "grants",
        "browser_sessions",
        "one_time_links",
    ] {
        assert!(tables.count(table).await > 0, "{table} is not expired yet");
    }
    let refreshed = app.refresh("rp-basic", tokens.refresh()).await;
    assert_eq!(
        refreshed.status,
        StatusCode::OK,
        "live grants survive: {refreshed:?}"
    );

    // A month later everything expired. Two replicas' clean-ups at once: one holds the lease.
    app.advance(33 * 86_400);
    let (a, b) = tokio::join!(
        nidan::app::cleanup_once(state, "replica-a"),
        nidan::app::cleanup_once(state, "replica-b")
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        a.is_some() != b.is_some(),
        "exactly one clean-up ran: {a:?} {b:?}"
    );
    assert!(a.or(b).is_some_and(|n| n > 0));
    for table in EXPIRING {
        assert_eq!(tables.count(table).await, 0, "{table} is cleaned up");
    }
    assert_eq!(
        tables.count("outbox").await,
        0,
        "delivered mail goes after 30 days"
    );
    assert_eq!(tables.count("accounts").await, accounts, "accounts stay");
    assert!(
        tables.count("audit_events").await >= audit,
        "audit records stay"
    );
    assert_eq!(
        tables.count("signing_keys").await,
        keys,
        "current keys stay"
    );
    // The holder renews; the other still waits.
    let holder = if a.is_some() {
        "replica-a"
    } else {
        "replica-b"
    };
    let other = if a.is_some() {
        "replica-b"
    } else {
        "replica-a"
    };
    assert!(nidan::app::cleanup_once(state, holder)
        .await
        .unwrap()
        .is_some());
    assert!(nidan::app::cleanup_once(state, other)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn audit_retention_removes_old_records_and_the_trail_still_verifies() {
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "audit_retention": "1d" }))
        .build()
        .await;
    app.tokens_for("rp-basic", &TARO, Level::Password).await;
    app.tokens_for("rp-basic", &JIRO, Level::Password).await;
    let old = app.store().list_audit(None, 100).await.unwrap();
    assert!(old.len() >= 2, "{old:?}");
    app.advance(2 * 86_400);
    let removed = nidan::app::cleanup_once(&app.server.state, "retention")
        .await
        .unwrap();
    assert!(removed.is_some(), "the server's lease has lapsed");
    assert!(
        app.store().list_audit(None, 100).await.unwrap().is_empty(),
        "records older than audit_retention are gone"
    );
    // The same replica's chain goes on after the removed records and still verifies.
    app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let kept = app.store().list_audit(None, 100).await.unwrap();
    assert!(!kept.is_empty());
    assert!(kept.iter().all(|e| e.seq > old.len() as i64), "{kept:?}");
    let verified = operator(&app.config_path, &["audit", "verify"]).await;
    assert!(verified.contains("intact"), "{verified}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_for_a_student_the_directory_no_longer_has_revokes_the_grant() {
    let slapd = Slapd::start().await;
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "enrollment": "on-demand", "directory": slapd.server_config() }))
        .build()
        .await;
    let student = Student {
        username: "s2401001",
        directory_id: "",
        password: "Daigaku-Pass-1",
        second_password: None,
        email: None,
    };
    let tokens = app.tokens_for("rp-basic", &student, Level::Password).await;
    let refreshed = app.refresh("rp-basic", tokens.refresh()).await;
    assert_eq!(refreshed.status, StatusCode::OK, "{refreshed:?}");
    let current = Tokens::from(refreshed.json());

    let (conn, mut ldap) = ldap3::LdapConnAsync::new(&slapd.url).await.unwrap();
    ldap3::drive!(conn);
    ldap.simple_bind(ADMIN_DN, ADMIN_PASSWORD)
        .await
        .unwrap()
        .success()
        .unwrap();
    ldap.delete(&format!("uid=s2401001,{PEOPLE}"))
        .await
        .unwrap()
        .success()
        .expect("the student leaves the directory");
    let _ = ldap.unbind().await;

    let refused = app.refresh("rp-basic", current.refresh()).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{refused:?}");
    assert_eq!(refused.error(), "invalid_grant");
    let introspection = app.introspect(&current.access_token).await;
    assert_eq!(
        introspection["active"], false,
        "the whole grant is revoked: {introspection}"
    );
    let info = app.userinfo(&current.access_token).await;
    assert_eq!(info.status, StatusCode::UNAUTHORIZED, "{info:?}");
}

// ---------------------------------------------------------------------------------------------
// Operator commands (what tests/cli.rs does not cover)
// ---------------------------------------------------------------------------------------------

/// The value of `name:` in `user show` output.
fn field(show: &str, name: &str) -> String {
    show.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name}: line in {show}"))
        .trim()
        .to_string()
}

#[tokio::test]
async fn user_show_explains_enrollment_and_locks() {
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "throttle": { "second_password_failures": 2 } }))
        .build()
        .await;
    let unknown = operator(&app.config_path, &["user", "show", "s7777777"]).await;
    assert!(unknown.contains("no account for s7777777"), "{unknown}");

    // Hanako signs in once: an account, nothing registered yet.
    let browser = app.browser();
    start_enrollment(&browser, &Authz::new("rp-basic").url(&app.issuer), &HANAKO).await;
    let show = operator(&app.config_path, &["user", "show", HANAKO.username]).await;
    assert_eq!(field(&show, "email"), "not registered", "{show}");
    assert_eq!(field(&show, "second password"), "not set", "{show}");

    // Taro: verified email, a second password, then a second-password lock.
    let browser = app.browser();
    for _ in 0..2 {
        let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
        browser
            .submit_login(&page, TARO.username, TARO.password, "Wrong2ndPass1")
            .await;
    }
    // The user ID is normalised (full-width, upper case) as at login.
    let show = operator(&app.config_path, &["user", "show", " Ｓ2401001 "]).await;
    assert_eq!(field(&show, "user ID"), "s2401001", "{show}");
    assert!(
        show.contains(&format!("{} (verified", TARO.email.unwrap())),
        "{show}"
    );
    assert!(
        field(&show, "second password").starts_with("set "),
        "{show}"
    );
    assert!(
        show.lines()
            .any(|l| l.starts_with("second password") && l.contains("locked until")),
        "{show}"
    );
    for forbidden in ["$argon2", TARO.second_password.unwrap(), TARO.password] {
        assert!(!show.contains(forbidden), "{show}");
    }
    let unlocked = operator(&app.config_path, &["user", "unlock", TARO.username]).await;
    assert!(unlocked.contains("lock counters cleared"), "{unlocked}");
    let show = operator(&app.config_path, &["user", "show", TARO.username]).await;
    assert!(!show.contains("locked until"), "{show}");

    // Operator actions join the audit trail; the trail still verifies.
    operator(
        &app.config_path,
        &["user", "lock", TARO.username, "--duration", "2h"],
    )
    .await;
    operator(
        &app.config_path,
        &["user", "reset-enrollment", JIRO.username],
    )
    .await;
    let trail = operator(&app.config_path, &["audit", "list"]).await;
    for kind in ["lock", "unlock", "enrollment_reset"] {
        assert!(
            audit_rows(&trail).iter().any(|(k, _, _)| k == kind),
            "{kind} in the trail:\n{trail}"
        );
    }
    operator(&app.config_path, &["audit", "verify"]).await;

    for args in [
        ["user", "lock", "s7777777"],
        ["user", "reset-enrollment", "s7777777"],
    ] {
        let output = cli(&app.config_path, &args).await;
        assert!(!output.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("no account for s7777777"),
            "{output:?}"
        );
    }
    let output = cli(&app.config_path, &["audit", "list", "--user", "s7777777"]).await;
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no account"),
        "{output:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_list_and_retry_say_why_a_mail_did_not_arrive() {
    // The mail server is down: mail waits in the outbox with the reason.
    let smtp_port = free_port();
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "mail": { "transport": "smtp", "host": "127.0.0.1", "port": smtp_port, "tls": "none" } }))
        .build()
        .await;
    let empty = operator(&app.config_path, &["outbox", "list"]).await;
    assert!(empty.contains("the outbox is empty"), "{empty}");

    let forgot = app.browser();
    let page = forgot.get("/forgot").await;
    submit(&forgot, &page, "/forgot", &[("email", TARO.email.unwrap())]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let listed = loop {
        let listed = operator(&app.config_path, &["outbox", "list"]).await;
        let tried = |l: &str| {
            let cols: Vec<&str> = l.split('\t').collect();
            cols.len() == 8
                && cols[3].starts_with("waiting")
                && cols[4] != "0"
                && !cols[7].is_empty()
        };
        if listed.lines().any(tried) {
            break listed;
        }
        assert!(Instant::now() < deadline, "the delivery is tried: {listed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let line = listed
        .lines()
        .find(|l| l.contains(TARO.email.unwrap()))
        .unwrap_or_else(|| panic!("{listed}"));
    let cols: Vec<&str> = line.split('\t').collect();
    assert_eq!(cols[1], "mail", "{line}");
    assert!(cols[3].starts_with("waiting (next try"), "{line}");
    assert!(
        cols[6].starts_with('<') && cols[6].ends_with('>'),
        "Message-ID: {line}"
    );
    assert!(!cols[7].is_empty(), "the last SMTP error: {line}");
    assert!(!listed.contains("/link/"), "never bodies: {listed}");
    let id = cols[0].to_string();

    // Given up for good (as after 200 attempts), then queued again by the operator.
    app.execute(
        "UPDATE outbox SET failed_at = next_attempt_at, lease_owner = NULL, lease_until = NULL WHERE id = $1",
        &[id.as_str().into()],
    )
    .await;
    let listed = operator(&app.config_path, &["outbox", "list"]).await;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("\tfailed ")),
        "{listed}"
    );
    let retried = operator(&app.config_path, &["outbox", "retry", &id]).await;
    assert!(retried.contains("1 deliveries queued again"), "{retried}");
    let listed = operator(&app.config_path, &["outbox", "list"]).await;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("waiting")),
        "{listed}"
    );
    let none = operator(&app.config_path, &["outbox", "retry", "no-such-id"]).await;
    assert!(none.contains("0 deliveries queued again"), "{none}");
}

#[tokio::test]
async fn operator_commands_work_against_postgresql() {
    let app = TestApp::postgres().await;
    app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let show = operator(&app.config_path, &["user", "show", TARO.username]).await;
    assert!(show.contains(TARO.email.unwrap()), "{show}");
    let keys = operator(&app.config_path, &["keys", "list"]).await;
    assert!(
        keys.lines().filter(|l| l.contains("\tsigning\t")).count() == 3,
        "{keys}"
    );
    operator(&app.config_path, &["outbox", "list"]).await;
    let trail = operator(&app.config_path, &["audit", "list"]).await;
    assert!(
        audit_rows(&trail)
            .iter()
            .any(|(k, o, _)| k == "login" && o == "success"),
        "{trail}"
    );
    let verified = operator(&app.config_path, &["audit", "verify"]).await;
    assert!(verified.contains("intact"), "{verified}");
    let output = cli(&app.config_path, &["client", "show", "no-such-client"]).await;
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no client no-such-client"),
        "{output:?}"
    );
}

#[tokio::test]
async fn metrics_can_require_an_address_and_a_bearer_token() {
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("metrics-token");
    std::fs::write(&token_file, "scrape-secret\n").unwrap();
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "metrics_token_file": token_file.display().to_string() }))
        .build()
        .await;
    let without = app.get("/metrics").await;
    assert_eq!(without.status, StatusCode::UNAUTHORIZED, "{without:?}");
    let response = no_redirect_client()
        .get(format!("{}/metrics", app.issuer))
        .header(AUTHORIZATION, "Bearer scrape-secret")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.unwrap().contains("nidan_store_up"));

    let elsewhere = TestApp::builder(Backend::Sqlite)
        .config(json!({ "metrics_allow": ["192.0.2.0/24"] }))
        .build()
        .await;
    let refused = elsewhere.get("/metrics").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
}
