//! The `nidan` binary as an operator runs it: help, hash-password, check-config, migrate,
//! client add/list/show/remove and keys list/rotate, against a test server's configuration.
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use argon2::{PasswordHash, PasswordVerifier};
use reqwest::StatusCode;

use crate::common::*;

fn nidan() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nidan"));
    // The operator's environment must not leak into the tests.
    for (name, _) in std::env::vars() {
        if name.starts_with("NIDAN_") {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "warn");
    command
}

/// Runs `nidan` with `args` (and `stdin`) and returns its output.
async fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = nidan();
    command
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

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `nidan --config <app's config> args…` and expects success.
async fn operator(app: &TestApp, args: &[&str]) -> String {
    let config = app.config_path.display().to_string();
    let mut all = vec!["--config", config.as_str()];
    all.extend_from_slice(args);
    let output = run(&all, None).await;
    assert!(
        output.status.success(),
        "nidan {args:?} failed:\n{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

#[tokio::test]
async fn help_exits_zero() {
    let output = run(&["--help"], None).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    for command in [
        "serve",
        "check-config",
        "migrate",
        "client",
        "keys",
        "hash-password",
    ] {
        assert!(text.contains(command), "--help lists {command}: {text}");
    }
    for sub in [
        &["client", "--help"][..],
        &["keys", "--help"],
        &["serve", "--help"],
    ] {
        let output = run(sub, None).await;
        assert!(output.status.success(), "{sub:?}");
    }
}

#[tokio::test]
async fn hash_password_reads_stdin_and_prints_an_argon2id_phc_string() {
    let output = run(&["hash-password"], Some("Daigaku-Pass-1\n")).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let hash = text.trim();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    let parsed = PasswordHash::new(hash).unwrap();
    assert!(argon2::Argon2::default()
        .verify_password(b"Daigaku-Pass-1", &parsed)
        .is_ok());
    assert!(!text.contains("Daigaku-Pass-1"));

    let empty = run(&["hash-password"], Some("")).await;
    assert!(!empty.status.success(), "an empty password is refused");
}

#[tokio::test]
async fn check_config_accepts_a_good_file() {
    let app = TestApp::sqlite().await;
    let text = operator(&app, &["check-config"]).await;
    assert!(text.contains("OK"), "{text}");
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn check_config_lists_every_problem_on_its_own_line() {
    let dir = tempfile::tempdir().unwrap();
    let users = write(dir.path(), "users.toml", "users = []\n");
    let kek = write(dir.path(), "kek", &format!("{}\n", "A".repeat(43) + "="));
    let config = format!(
        r#"
issuer = "http://idp.example.ac.jp"
database_url = "sqlite://{db}"
key_encryption_key_file = "{kek}"
colour = "blue"

[directory]
kind = "file"
path = "{users}"

[mail]
transport = "file"
from = "noreply@example.ac.jp"

[[clients]]
client_id = "rp-bad"
client_secret_file = "{missing}"
redirect_uris = ["not a url"]
"#,
        db = dir.path().join("nidan.db").display(),
        missing = dir.path().join("no-such.secret").display(),
    );
    let path = write(dir.path(), "nidan.toml", &config);
    let output = run(&["--config", &path, "check-config"], None).await;
    assert!(
        !output.status.success(),
        "a bad file fails: {}",
        stdout(&output)
    );
    let text = stderr(&output) + &stdout(&output);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let find = |needle: &str| {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("a line about {needle:?} in:\n{text}"))
            .to_string()
    };
    let unknown = find("colour");
    let url = find("not a url");
    let secret = find("no-such.secret");
    let issuer = find("idp.example.ac.jp");
    assert!(issuer.contains("https"), "{issuer}");
    let distinct: std::collections::HashSet<_> =
        [unknown, url, secret, issuer].into_iter().collect();
    assert_eq!(distinct.len(), 4, "one line per problem:\n{text}");
}

#[tokio::test]
async fn missing_config_file_is_explained() {
    let output = run(&["--config", "/no/such/nidan.toml", "check-config"], None).await;
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("/no/such/nidan.toml"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn migrate_prepares_both_backends() {
    let app = TestApp::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let fresh = format!("sqlite://{}", dir.path().join("sub/fresh.db").display());
    let config = std::fs::read_to_string(&app.config_path)
        .unwrap()
        .replace(&app.database_url, &fresh);
    let path = write(dir.path(), "migrate.toml", &config);
    let output = run(&["--config", &path, "migrate"], None).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("sqlite"), "{}", stdout(&output));
    assert!(
        dir.path().join("sub/fresh.db").exists(),
        "created with its folder"
    );

    // A relative sqlite:// path resolves against the working directory.
    let config = std::fs::read_to_string(&app.config_path)
        .unwrap()
        .replace(&app.database_url, "sqlite://data/relative.db");
    let path = write(dir.path(), "relative.toml", &config);
    let mut command = nidan();
    command
        .current_dir(dir.path())
        .args(["--config", &path, "migrate"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(dir.path().join("data/relative.db").exists());

    let pg = PgDatabase::create().await;
    let config = std::fs::read_to_string(&app.config_path)
        .unwrap()
        .replace(&app.database_url, &pg.url);
    let path = write(dir.path(), "migrate-pg.toml", &config);
    let output = run(&["--config", &path, "migrate"], None).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("postgres"), "{}", stdout(&output));
}

#[tokio::test]
async fn client_add_list_show_remove() {
    let app = TestApp::sqlite().await;
    let added = operator(
        &app,
        &[
            "client",
            "add",
            "rp-cli",
            "--redirect-uri",
            REDIRECT_URI,
            "--grant-type",
            "authorization_code",
            "--grant-type",
            "client_credentials",
            "--scope",
            "openid",
            "--scope",
            "profile",
        ],
    )
    .await;
    let secret = added
        .lines()
        .find_map(|l| l.strip_prefix("client_secret: "))
        .unwrap_or_else(|| panic!("the secret is printed once: {added}"))
        .trim()
        .to_string();
    assert!(secret.len() >= 32, "{secret}");

    // The running server knows the new client at once.
    let auth = Auth::Basic("rp-cli".into(), secret.clone());
    let reply = app
        .token(&auth, &[("grant_type", "client_credentials")])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");

    let list = operator(&app, &["client", "list"]).await;
    let line = list
        .lines()
        .find(|l| l.starts_with("rp-cli"))
        .unwrap_or_else(|| panic!("rp-cli listed: {list}"));
    assert!(
        line.contains("client_secret_basic") && line.contains("cli"),
        "{line}"
    );
    assert!(
        list.lines().any(|l| l.starts_with("rp-basic")),
        "config clients too: {list}"
    );
    assert!(!list.contains(&secret), "the secret is shown only once");

    let show = operator(&app, &["client", "show", "rp-cli"]).await;
    assert!(show.contains(REDIRECT_URI), "{show}");
    assert!(
        !show.contains(&secret),
        "the secret is shown only once: {show}"
    );

    let again = run(
        &[
            "--config",
            &app.config_path.display().to_string(),
            "client",
            "add",
            "rp-cli",
            "--redirect-uri",
            REDIRECT_URI,
        ],
        None,
    )
    .await;
    assert!(!again.status.success(), "adding an existing client fails");

    operator(&app, &["client", "remove", "rp-cli"]).await;
    let list = operator(&app, &["client", "list"]).await;
    assert!(!list.lines().any(|l| l.starts_with("rp-cli")), "{list}");
    let reply = app
        .token(&auth, &[("grant_type", "client_credentials")])
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{reply:?}");

    let config_client = run(
        &[
            "--config",
            &app.config_path.display().to_string(),
            "client",
            "remove",
            "rp-basic",
        ],
        None,
    )
    .await;
    assert!(
        !config_client.status.success(),
        "clients from the configuration file are removed there"
    );
}

#[tokio::test]
async fn client_add_refuses_bad_settings() {
    let app = TestApp::sqlite().await;
    let config = app.config_path.display().to_string();
    let output = run(
        &[
            "--config",
            &config,
            "client",
            "add",
            "rp-bad",
            "--redirect-uri",
            "not a url",
        ],
        None,
    )
    .await;
    assert!(!output.status.success());
    assert!(stderr(&output).contains("not a url"), "{}", stderr(&output));
    let list = operator(&app, &["client", "list"]).await;
    assert!(!list.contains("rp-bad"));
}

/// `keys list` rows: (kid, alg, state).
fn key_rows(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .skip_while(|l| !l.starts_with("kid"))
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            (
                cols[0].to_string(),
                cols[1].to_string(),
                cols[2].to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn keys_list_and_rotate() {
    let app = TestApp::sqlite().await;
    let rows = key_rows(&operator(&app, &["keys", "list"]).await);
    for alg in ["RS256", "ES256", "EdDSA"] {
        let signing: Vec<_> = rows
            .iter()
            .filter(|r| r.1 == alg && r.2 == "signing")
            .collect();
        assert_eq!(signing.len(), 1, "one signing {alg} key: {rows:?}");
    }
    let old_rs = rows.iter().find(|r| r.1 == "RS256").unwrap().0.clone();

    let rotated = operator(&app, &["keys", "rotate"]).await;
    assert!(rotated.contains("published"), "{rotated}");
    let rows = key_rows(&operator(&app, &["keys", "list"]).await);
    let state = |kid: &str| rows.iter().find(|r| r.0 == kid).unwrap().2.clone();
    let new_rs = rows
        .iter()
        .find(|r| r.1 == "RS256" && r.0 != old_rs)
        .expect("a new RS256 key")
        .0
        .clone();
    assert_eq!(state(&new_rs), "published, not signing yet");
    assert_eq!(state(&old_rs), "published, replaced");
    assert!(rotated.contains(&new_rs));

    let old_es = rows.iter().find(|r| r.1 == "ES256").unwrap().0.clone();
    operator(&app, &["keys", "rotate", "--alg", "ES256", "--now"]).await;
    let rows = key_rows(&operator(&app, &["keys", "list"]).await);
    let es: Vec<_> = rows.iter().filter(|r| r.1 == "ES256").collect();
    assert_eq!(es.len(), 2, "{rows:?}");
    let new_es = es.iter().find(|r| r.0 != old_es).unwrap();
    assert_eq!(new_es.2, "signing");
    let old = es.iter().find(|r| r.0 == old_es).unwrap();
    assert_eq!(
        old.2, "published, replaced",
        "kept in JWKS for tokens it signed"
    );

    let bad = run(
        &[
            "--config",
            &app.config_path.display().to_string(),
            "keys",
            "rotate",
            "--alg",
            "HS256",
        ],
        None,
    )
    .await;
    assert!(!bad.status.success());
}

/// Runs `nidan --config <app's config> args…` with `stdin`; the whole output.
async fn operator_with_input(app: &TestApp, args: &[&str], stdin: &str) -> Output {
    let config = app.config_path.display().to_string();
    let mut all = vec!["--config", config.as_str()];
    all.extend_from_slice(args);
    run(&all, Some(stdin)).await
}

fn is_code(reply: &Reply) -> bool {
    reply.status == StatusCode::SEE_OTHER
        && reply
            .location
            .as_deref()
            .is_some_and(|l| l.starts_with(REDIRECT_URI) && l.contains("code="))
}

#[tokio::test]
async fn user_import_enrolls_students_all_or_nothing() {
    let app = TestApp::sqlite().await;
    let good = r#"{"username": "s2401002", "email": "hanako@example.ac.jp", "second_password": "Hanako2nd9"}"#;
    let bad = r#"{"username": "s2401003", "email": "not-an-email", "second_password": "short"}"#;

    // A bad line: a clear error naming it, and nothing imported.
    let output =
        operator_with_input(&app, &["user", "import", "-"], &format!("{good}\n{bad}\n")).await;
    assert!(!output.status.success(), "{}", stdout(&output));
    let errors = stderr(&output) + &stdout(&output);
    assert!(errors.contains('2'), "the bad line is named: {errors}");
    let page = app
        .browser()
        .open(&Authz::new("rp-basic").url(&app.issuer))
        .await;
    let reply = app
        .browser()
        .submit_login(&page, HANAKO.username, HANAKO.password, "Hanako2nd9")
        .await;
    assert!(!is_code(&reply), "nothing half-imported: {reply:?}");

    // A dry run imports nothing either.
    let output = operator_with_input(
        &app,
        &["user", "import", "--dry-run", "-"],
        &format!("{good}\n"),
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));

    // The good line alone, twice (idempotent).
    for _ in 0..2 {
        let output =
            operator_with_input(&app, &["user", "import", "-"], &format!("{good}\n")).await;
        assert!(
            output.status.success(),
            "{}{}",
            stdout(&output),
            stderr(&output)
        );
    }
    let hanako = Student {
        second_password: Some("Hanako2nd9"),
        ..HANAKO
    };
    let tokens = app
        .tokens_for("rp-basic", &hanako, Level::SecondPassword)
        .await;
    assert_eq!(tokens.id_claims()["acr"], ACR_SECOND_PASSWORD);
    let userinfo = app.userinfo(&tokens.access_token).await.json();
    assert_eq!(userinfo["email"], "hanako@example.ac.jp");
    assert_eq!(
        userinfo["email_verified"], true,
        "imported email counts as verified"
    );
}

#[tokio::test]
async fn user_lock_unlock_show_and_reset_enrollment() {
    let app = TestApp::sqlite().await;
    let second = TARO.second_password.unwrap();
    let login = |second: &'static str| {
        let app = &app;
        async move {
            let browser = app.browser();
            let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
            browser
                .submit_login(&page, TARO.username, TARO.password, second)
                .await
        }
    };
    assert!(is_code(&login(second).await));

    operator(&app, &["user", "lock", TARO.username, "--duration", "1h"]).await;
    let locked = login(second).await;
    assert!(
        !is_code(&locked),
        "the second-password level is blocked: {locked:?}"
    );
    assert!(is_code(&login("").await), "the password level is not");

    let show = operator(&app, &["user", "show", TARO.username]).await;
    assert!(show.contains(TARO.username), "{show}");
    assert!(!show.contains("$argon2"), "no hashes in the output: {show}");

    operator(&app, &["user", "unlock", TARO.username]).await;
    assert!(is_code(&login(second).await), "unlocked");

    operator(&app, &["user", "reset-enrollment", TARO.username]).await;
    let reply = login("").await;
    assert!(!is_code(&reply), "enrollment runs again first: {reply:?}");
    assert!(reply.is_redirect_to("/enroll/email"), "{reply:?}");
}

#[tokio::test]
async fn nidan_config_environment_variable_and_overrides() {
    let app = TestApp::sqlite().await;
    let mut command = nidan();
    command
        .env("NIDAN_CONFIG", &app.config_path)
        .args(["client", "list"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("rp-basic"));

    let mut command = nidan();
    command
        .env("NIDAN_ISSUER", "http://idp.example.ac.jp")
        .args([
            "--config",
            &app.config_path.display().to_string(),
            "check-config",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(
        !output.status.success(),
        "the environment overrides the file"
    );
    let text = stderr(&output);
    assert!(
        text.contains("idp.example.ac.jp") && text.contains("https"),
        "{text}"
    );
}

#[tokio::test]
async fn check_config_names_the_right_line_and_keeps_listing() {
    let dir = tempfile::tempdir().unwrap();
    let users = write(dir.path(), "users.toml", "users = []\n");
    let kek = write(dir.path(), "kek", &format!("{}\n", "A".repeat(43) + "="));
    let config = format!(
        "# nidan\n# comments first\n\nissuer = \"http://idp.example.ac.jp\"\n\
         key_encryption_key_file = \"{kek}\"\n\n[session]\nidle_timeout = \"soon\"\n\n\
         [directory]\nkind = \"file\"\npath = \"{users}\"\n\n\
         [mail]\ntransport = \"file\"\nfrom = \"noreply@example.ac.jp\"\n"
    );
    assert_eq!(config.lines().nth(7), Some("idle_timeout = \"soon\""));
    let path = write(dir.path(), "nidan.toml", &config);
    let output = run(&["--config", &path, "check-config"], None).await;
    assert!(!output.status.success());
    let text = stderr(&output);
    let duration = text
        .lines()
        .find(|l| l.contains("idle_timeout"))
        .unwrap_or_else(|| panic!("a line about idle_timeout: {text}"));
    assert!(
        !duration.contains("line ") || duration.contains("line 8"),
        "the file's line 8: {duration}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("idp.example.ac.jp") && l.contains("https")),
        "every problem at once, the issuer too: {text}"
    );

    // A bad value from the environment names the variable.
    let good = write(
        dir.path(),
        "good.toml",
        &config.replace("\"soon\"", "\"15m\""),
    );
    let mut command = nidan();
    command
        .env("NIDAN_SESSION_IDLE_TIMEOUT", "soon")
        .args(["--config", &good, "check-config"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let text = stderr(&output);
    assert!(text.contains("NIDAN_SESSION_IDLE_TIMEOUT"), "{text}");
}
