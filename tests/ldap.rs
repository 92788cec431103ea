//! The LDAP directory against a real OpenLDAP slapd: search-then-bind and DN templates, claims
//! (Japanese, language-tagged, multi-valued), injection attempts, a directory that is down or slow,
//! `lookup` and `check`; and one login over HTTP with `kind = "ldap"`.
use std::time::{Duration, Instant};

use nidan::config::{DirectoryConfig, Secret};
use nidan::directory::ldap::LdapDirectory;
use nidan::directory::{DirectoryError, DirectoryUser, UserDirectory};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::slapd::{
    free_port, search_config, SilentListener, Slapd, ALEX, HANAKO, SERVICE_DN, TARO,
};
use crate::common::{Authz, Backend, Level, Student, TestApp};

/// User IDs that must never find Taro (or anyone), each tried with Taro's password.
const INJECTIONS: &[&str] = &[
    "*",
    "*)(uid=*",
    "s2401001)(|(uid=*",
    "s2401001*",
    "*)(uid=s2401001",
    "s240100*",
    "s2401001\0",
    "s2401001\0)(uid=*",
    "s2401001)(objectClass=*",
    "uid=s2401001,ou=people,dc=example,dc=ac,dc=jp",
    "s2401001,ou=people,dc=example,dc=ac,dc=jp",
    "s2401001+cn=x",
    "\\73\\32401001",
];

fn directory(config: &DirectoryConfig) -> LdapDirectory {
    LdapDirectory::new(config).expect("a valid [directory] configuration")
}

fn taro_claims() -> Value {
    json!({
        "name": "学生 太郎",
        "family_name": "学生",
        "given_name": "太郎",
        "family_name#ja-Kana-JP": "ガクセイ",
        "given_name#ja-Kana-JP": "タロウ",
        "family_name#en": "Gakusei",
        "given_name#en": "Taro",
        "student_id": "S2401001",
        "department": ["工学部", "情報工学科"],
    })
}

fn assert_taro(slapd: &Slapd, user: &DirectoryUser) {
    assert_eq!(user.id, slapd.uuid(TARO.username));
    assert_eq!(user.username, TARO.username);
    assert_eq!(Value::Object(user.claims.clone()), taro_claims());
}

fn assert_invalid(result: Result<DirectoryUser, DirectoryError>, what: &str) {
    match result {
        Err(DirectoryError::InvalidCredentials) => {}
        other => panic!("{what}: expected InvalidCredentials, got {other:?}"),
    }
}

fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, DirectoryError>, what: &str) {
    match result {
        Err(DirectoryError::Unavailable(_)) => {}
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn search_then_bind_maps_claims() {
    let slapd = Slapd::start().await;
    let ldap = directory(&slapd.search_config());

    let taro = ldap
        .authenticate(TARO.username, TARO.password)
        .await
        .expect("Taro signs in");
    assert_taro(&slapd, &taro);

    let hanako = ldap
        .authenticate(HANAKO.username, HANAKO.password)
        .await
        .expect("Hanako signs in");
    assert_eq!(hanako.id, slapd.uuid(HANAKO.username));
    assert_eq!(
        Value::Object(hanako.claims),
        json!({
            "name": "大学 花子",
            "family_name": "大学",
            "given_name": "花子",
            "family_name#ja-Kana-JP": "ダイガク",
            "given_name#ja-Kana-JP": "ハナコ",
            "student_id": "S2401002",
            "department": "文学部",
        })
    );

    // Attributes the entry lacks give no claim at all.
    let alex = ldap
        .authenticate(ALEX.username, ALEX.password)
        .await
        .expect("Alex signs in");
    assert_eq!(
        Value::Object(alex.claims),
        json!({ "name": "Alex Smith", "family_name": "Smith", "given_name": "Alex", "student_id": "S2401003" })
    );
    // Three different immutable ids, all entryUUIDs.
    assert_ne!(taro.id, hanako.id);
    assert_eq!(taro.id.len(), 36, "entryUUID as text: {}", taro.id);
}

#[tokio::test]
async fn dn_template_binds_directly_and_reads_the_entry_as_the_student() {
    let slapd = Slapd::start().await;
    let ldap = directory(&slapd.template_config());
    let taro = ldap
        .authenticate(TARO.username, TARO.password)
        .await
        .expect("Taro signs in");
    assert_taro(&slapd, &taro);
    assert_invalid(
        ldap.authenticate(TARO.username, HANAKO.password).await,
        "wrong password",
    );
    assert_invalid(
        ldap.authenticate("s9999999", TARO.password).await,
        "unknown user",
    );
}

#[tokio::test]
async fn wrong_password_unknown_user_and_empty_password_are_invalid_credentials() {
    let slapd = Slapd::start().await;
    for config in [slapd.search_config(), slapd.template_config()] {
        let ldap = directory(&config);
        assert_invalid(
            ldap.authenticate(TARO.username, "wrong-password").await,
            "wrong password",
        );
        assert_invalid(
            ldap.authenticate(TARO.username, HANAKO.password).await,
            "another's password",
        );
        assert_invalid(
            ldap.authenticate("s9999999", TARO.password).await,
            "unknown user",
        );
        assert_invalid(
            ldap.authenticate("nidan", "service-secret").await,
            "the service account",
        );
        // An empty password would be an unauthenticated bind: refused before asking.
        assert_invalid(ldap.authenticate(TARO.username, "").await, "empty password");
        assert_invalid(ldap.authenticate("", TARO.password).await, "empty user ID");
        // The directory is still fine afterwards.
        ldap.authenticate(TARO.username, TARO.password)
            .await
            .expect("Taro signs in");
    }
}

#[tokio::test]
async fn injection_attempts_fail_plainly_and_never_match_another_entry() {
    let slapd = Slapd::start().await;
    for config in [slapd.search_config(), slapd.template_config()] {
        let ldap = directory(&config);
        for username in INJECTIONS {
            assert_invalid(
                ldap.authenticate(username, TARO.password).await,
                &format!("user ID {username:?} with {:?}", config.dn_template),
            );
        }
    }
    let ldap = directory(&slapd.search_config());
    for username in INJECTIONS {
        let found = ldap.lookup(username).await.expect("lookup answers");
        assert!(found.is_none(), "lookup({username:?}) found {found:?}");
    }
}

#[tokio::test]
async fn lookup_finds_students_with_the_service_account() {
    let slapd = Slapd::start().await;
    let ldap = directory(&slapd.search_config());
    let taro = ldap
        .lookup(TARO.username)
        .await
        .unwrap()
        .expect("Taro is there");
    assert_taro(&slapd, &taro);
    assert!(ldap.lookup("s9999999").await.unwrap().is_none());

    // A DN template with a service account looks up by reading the DN.
    let config = DirectoryConfig {
        bind_dn: SERVICE_DN.into(),
        bind_password: Secret::new(crate::common::slapd::SERVICE_PASSWORD),
        ..slapd.template_config()
    };
    let ldap = directory(&config);
    assert_taro(
        &slapd,
        &ldap
            .lookup(TARO.username)
            .await
            .unwrap()
            .expect("Taro is there"),
    );
    assert!(ldap.lookup("s9999999").await.unwrap().is_none());
    ldap.check().await.expect("the directory is ready");

    // Without a service account a DN template cannot tell a student who is gone from an entry
    // hidden from anonymous reads: it says so instead of answering "not there".
    let anonymous = directory(&slapd.template_config());
    assert_unavailable(anonymous.lookup(TARO.username).await, "anonymous lookup");
}

#[tokio::test]
async fn check_answers_when_the_directory_does() {
    let mut slapd = Slapd::start().await;
    let ldap = directory(&slapd.search_config());
    ldap.check().await.expect("ready");
    ldap.check()
        .await
        .expect("ready again, on the kept connection");
    directory(&slapd.template_config())
        .check()
        .await
        .expect("anonymous root DSE read");
    slapd.stop();
    assert_unavailable(ldap.check().await, "check after slapd stopped");
}

#[tokio::test]
async fn a_refused_service_account_makes_the_directory_unavailable() {
    let slapd = Slapd::start().await;
    let config = DirectoryConfig {
        bind_password: Secret::new("not-the-service-password"),
        ..slapd.search_config()
    };
    let ldap = directory(&config);
    assert_unavailable(
        ldap.authenticate(TARO.username, TARO.password).await,
        "authenticate",
    );
    assert_unavailable(ldap.lookup(TARO.username).await, "lookup");
    assert_unavailable(ldap.check().await, "check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_logins_share_the_service_connections() {
    let slapd = Slapd::start().await;
    let ldap = std::sync::Arc::new(directory(&slapd.search_config()));
    let mut tasks = Vec::new();
    for i in 0..24 {
        let ldap = ldap.clone();
        let student = [TARO, HANAKO, ALEX][i % 3];
        tasks.push(tokio::spawn(async move {
            let ok = ldap
                .authenticate(student.username, student.password)
                .await
                .map(|u| u.username);
            let wrong = ldap.authenticate(student.username, "wrong").await;
            (student.username, ok, wrong)
        }));
    }
    for task in tasks {
        let (username, ok, wrong) = task.await.unwrap();
        assert_eq!(ok.expect("signs in"), username);
        assert_invalid(wrong, "wrong password");
    }
}

#[tokio::test]
async fn a_certificate_nobody_trusts_is_refused_over_ldaps_and_starttls() {
    let slapd = Slapd::start_tls().await;
    let ldaps = DirectoryConfig {
        url: slapd.ldaps_url.clone().unwrap(),
        ..slapd.search_config()
    };
    let starttls = DirectoryConfig {
        url: slapd.localhost_url(),
        starttls: true,
        ..slapd.search_config()
    };
    for config in [ldaps, starttls] {
        let ldap = directory(&config);
        for result in [
            ldap.authenticate(TARO.username, TARO.password)
                .await
                .map(|_| ()),
            ldap.check().await,
        ] {
            match result {
                Err(DirectoryError::Unavailable(why)) => assert!(
                    why.to_lowercase().contains("certificate") || why.contains("UnknownIssuer"),
                    "{}: {why}",
                    config.url
                ),
                other => panic!("{}: expected Unavailable, got {other:?}", config.url),
            }
        }
    }
    // The same server without TLS answers, so the refusal above was the certificate's.
    directory(&slapd.search_config())
        .authenticate(TARO.username, TARO.password)
        .await
        .expect("Taro signs in over ldap://");
}

#[tokio::test]
async fn a_directory_that_is_down_is_unavailable_at_once() {
    let config = search_config(&format!("ldap://127.0.0.1:{}", free_port()));
    let ldap = directory(&config);
    let started = Instant::now();
    assert_unavailable(
        ldap.authenticate(TARO.username, TARO.password).await,
        "authenticate",
    );
    assert_unavailable(ldap.lookup(TARO.username).await, "lookup");
    assert_unavailable(ldap.check().await, "check");
    assert!(
        started.elapsed() < config.timeout,
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_directory_killed_after_use_is_unavailable_within_the_timeout() {
    let mut slapd = Slapd::start().await;
    for config in [slapd.search_config(), slapd.template_config()] {
        // Kept connections exist before slapd goes away.
        directory(&config).check().await.unwrap();
    }
    let ldap = directory(&slapd.search_config());
    ldap.authenticate(TARO.username, TARO.password)
        .await
        .expect("Taro signs in");
    let template = directory(&slapd.template_config());
    template
        .authenticate(TARO.username, TARO.password)
        .await
        .expect("Taro signs in");
    slapd.stop();
    let started = Instant::now();
    assert_unavailable(
        ldap.authenticate(TARO.username, TARO.password).await,
        "authenticate",
    );
    assert_unavailable(
        ldap.authenticate("s9999999", TARO.password).await,
        "authenticate unknown",
    );
    assert_unavailable(ldap.lookup(TARO.username).await, "lookup");
    assert_unavailable(ldap.check().await, "check");
    assert_unavailable(
        template.authenticate(TARO.username, TARO.password).await,
        "template authenticate",
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_directory_that_never_answers_is_unavailable_within_the_timeout() {
    let silent = SilentListener::start().await;
    let timeout = Duration::from_millis(800);
    let search = DirectoryConfig {
        timeout,
        ..search_config(&silent.url)
    };
    let template = DirectoryConfig {
        dn_template: "uid={username},ou=people,dc=example,dc=ac,dc=jp".into(),
        ..search.clone()
    };
    let starttls = DirectoryConfig {
        starttls: true,
        ..search.clone()
    };
    for config in [search, template, starttls] {
        let ldap = directory(&config);
        let what = format!(
            "dn_template {:?}, starttls {}",
            config.dn_template, config.starttls
        );
        // Each call gives up after the timeout (plus a margin for a busy machine).
        let within_timeout = |started: Instant, call: &str| {
            let elapsed = started.elapsed();
            assert!(
                elapsed >= timeout,
                "{what} {call}: gave up early, {elapsed:?}"
            );
            assert!(
                elapsed < timeout + Duration::from_millis(1500),
                "{what} {call}: took {elapsed:?}"
            );
        };
        let started = Instant::now();
        assert_unavailable(ldap.authenticate(TARO.username, TARO.password).await, &what);
        within_timeout(started, "authenticate");
        let started = Instant::now();
        assert_unavailable(ldap.lookup(TARO.username).await, &what);
        within_timeout(started, "lookup");
        let started = Instant::now();
        assert_unavailable(ldap.check().await, &what);
        within_timeout(started, "check");
    }
}

#[test]
fn configurations_that_cannot_work_are_refused() {
    let base = DirectoryConfig {
        kind: "ldap".into(),
        url: "ldap://127.0.0.1:389".into(),
        bind_dn: SERVICE_DN.into(),
        bind_password: Secret::new("x"),
        base_dn: "ou=people,dc=example,dc=ac,dc=jp".into(),
        ..DirectoryConfig::default()
    };
    assert!(LdapDirectory::new(&base).is_ok());
    let refused = |config: DirectoryConfig, what: &str| {
        assert!(LdapDirectory::new(&config).is_err(), "{what} was accepted");
    };
    refused(
        DirectoryConfig {
            bind_password: Secret::default(),
            ..base.clone()
        },
        "a bind DN without a password",
    );
    refused(
        DirectoryConfig {
            url: "http://x".into(),
            ..base.clone()
        },
        "an http URL",
    );
    refused(
        DirectoryConfig {
            url: "ldaps://x".into(),
            starttls: true,
            ..base.clone()
        },
        "StartTLS on ldaps",
    );
    refused(
        DirectoryConfig {
            user_filter: "(uid=fixed)".into(),
            ..base.clone()
        },
        "a filter without {username}",
    );
    refused(
        DirectoryConfig {
            user_filter: "(uid={username}".into(),
            ..base.clone()
        },
        "a broken filter",
    );
    refused(
        DirectoryConfig {
            base_dn: String::new(),
            ..base.clone()
        },
        "no base DN",
    );
    refused(
        DirectoryConfig {
            dn_template: "uid=x,dc=y".into(),
            ..base.clone()
        },
        "a template without {username}",
    );
    refused(
        DirectoryConfig {
            timeout: Duration::ZERO,
            ..base.clone()
        },
        "a zero timeout",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_student_signs_in_over_http_with_claims_from_ldap() {
    let slapd = Slapd::start().await;
    let app = TestApp::builder(Backend::Sqlite)
        .config(json!({ "enrollment": "on-demand", "directory": slapd.server_config() }))
        .build()
        .await;
    let student = Student {
        username: TARO.username,
        directory_id: "",
        password: TARO.password,
        second_password: None,
        email: None,
    };

    // A wrong university password shows the login page again.
    let browser = app.browser();
    let page = browser.open(&Authz::new("rp-basic").url(&app.issuer)).await;
    let wrong = browser
        .submit_login(&page, TARO.username, "wrong-password", "")
        .await;
    assert!(wrong.is_login_page(), "{wrong:?}");

    let tokens = app.tokens_for("rp-basic", &student, Level::Password).await;
    let userinfo = app.userinfo(&tokens.access_token).await;
    assert_eq!(userinfo.status, StatusCode::OK, "{userinfo:?}");
    let claims = userinfo.json();
    for (name, value) in taro_claims().as_object().unwrap() {
        assert_eq!(&claims[name], value, "userinfo {name}: {claims}");
    }
    assert_eq!(claims["preferred_username"], TARO.username);

    // A refresh looks the student up again in the directory.
    let refreshed = app.refresh("rp-basic", tokens.refresh()).await;
    assert_eq!(refreshed.status, StatusCode::OK, "{refreshed:?}");
}

#[tokio::test]
async fn ldaps_and_starttls_trust_the_tls_ca_file() {
    let slapd = Slapd::start_tls().await;
    let ca = slapd.ca_file.as_ref().unwrap().display().to_string();
    let ldaps = DirectoryConfig {
        url: slapd.ldaps_url.clone().unwrap(),
        tls_ca_file: ca.clone(),
        ..slapd.search_config()
    };
    let starttls = DirectoryConfig {
        url: slapd.localhost_url(),
        starttls: true,
        tls_ca_file: ca.clone(),
        ..slapd.search_config()
    };
    let template = DirectoryConfig {
        url: slapd.ldaps_url.clone().unwrap(),
        tls_ca_file: ca.clone(),
        ..slapd.template_config()
    };
    for config in [ldaps.clone(), starttls.clone(), template] {
        let ldap = directory(&config);
        let what = format!("{} starttls {}", config.url, config.starttls);
        let taro = ldap.authenticate(TARO.username, TARO.password).await;
        assert_taro(&slapd, &taro.unwrap_or_else(|e| panic!("{what}: {e:?}")));
        assert_invalid(ldap.authenticate(TARO.username, "wrong").await, &what);
        ldap.check()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    }
    assert_taro(
        &slapd,
        &directory(&ldaps)
            .lookup(TARO.username)
            .await
            .unwrap()
            .unwrap(),
    );

    // The certificate names `localhost`, not 127.0.0.1: the name is checked too.
    for config in [
        DirectoryConfig {
            url: ldaps.url.replace("localhost", "127.0.0.1"),
            ..ldaps.clone()
        },
        DirectoryConfig {
            url: slapd.url.clone(),
            ..starttls.clone()
        },
    ] {
        assert_unavailable(
            directory(&config)
                .authenticate(TARO.username, TARO.password)
                .await,
            &config.url,
        );
    }
}

#[test]
fn a_tls_ca_file_that_is_missing_or_not_pem_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    for file in [dir.path().join("missing.pem"), not_pem] {
        let config = DirectoryConfig {
            kind: "ldap".into(),
            url: "ldaps://localhost:636".into(),
            base_dn: "ou=people,dc=example,dc=ac,dc=jp".into(),
            tls_ca_file: file.display().to_string(),
            ..DirectoryConfig::default()
        };
        assert!(
            LdapDirectory::new(&config).is_err(),
            "{file:?} was accepted"
        );
    }
}
