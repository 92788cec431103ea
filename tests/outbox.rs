//! The mail outbox against a real SMTP server (the in-process sink): mail waits while the server
//! is down and arrives when it is back, temporary and permanent SMTP failures, `nidan outbox
//! list/retry`, replicas that never send one mail at the same time, a crash between delivery and
//! record, and bodies that are encrypted at rest and blanked after delivery.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nidan::mail::transport::{Delivery, Transport};
use nidan::mail::MailBody;
use nidan::store::OutboxJob;
use reqwest::StatusCode;
use serde_json::json;

use crate::common::smtp::{decode_quoted_printable, decode_words, SmtpSink};
use crate::common::*;
use crate::enroll::{
    app_with_sink, confirm_link, first_login_to_email_page, link_path, nidan_cli, register_email,
    status_text, stderr, stdout, submit,
};
use crate::on_both_backends;

on_both_backends!(
    mail_waits_while_smtp_is_down_and_arrives_when_it_is_back,
    two_workers_never_send_the_same_mail,
    a_crash_between_delivery_and_record_sends_at_most_one_duplicate,
    mail_bodies_are_encrypted_at_rest_and_blanked_after_delivery,
);

const WAIT: Duration = Duration::from_secs(15);

/// Polls the outbox until a job satisfies `predicate` (bounded: 15 s).
async fn wait_for_job(
    app: &TestApp,
    what: &str,
    predicate: impl Fn(&OutboxJob) -> bool,
) -> OutboxJob {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let jobs = app.store().list_jobs(1000).await.expect("list_jobs");
        if let Some(job) = jobs.iter().find(|j| predicate(j)) {
            return job.clone();
        }
        if tokio::time::Instant::now() > deadline {
            panic!("waited {WAIT:?} for {what}; the outbox: {jobs:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks for a reset link for `address` through /forgot.
async fn forgot(app: &TestApp, address: &str) {
    let browser = app.browser();
    let page = browser.get("/forgot").await;
    let sent = submit(&browser, &page, "/forgot", &[("email", address)]).await;
    assert_eq!(sent.status, StatusCode::OK, "{sent:?}");
}

/// The raw `outbox.payload` column, by job id, read with SQL of our own.
async fn raw_payloads(app: &TestApp) -> BTreeMap<String, String> {
    let sql = "SELECT id, payload FROM outbox";
    let rows: Vec<(String, String)> = match app.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&app.database_url).await.unwrap();
            let rows = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
            pool.close().await;
            rows
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
            let rows = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
            pool.close().await;
            rows
        }
    };
    rows.into_iter().collect()
}

/// A mail job for `to` due at `due`, built as the server builds them (body encrypted).
fn queued_mail(app: &TestApp, to: &str, n: usize, due: i64) -> OutboxJob {
    nidan::mail::job(
        &app.server.state,
        to,
        &format!("Test mail {n}"),
        &format!("Mail number {n}.\nhttp://127.0.0.1/link/not-a-real-token-{n}\n"),
        due,
    )
    .expect("a job")
}

async fn mail_waits_while_smtp_is_down_and_arrives_when_it_is_back(backend: Backend) {
    let (app, sink) = app_with_sink(backend, json!({}), &[]).await;
    let address = "hanako@example.ac.jp";
    sink.stop().await;

    // The student registers while the mail server is down: the page still says "sent".
    let browser = app.browser();
    let page = first_login_to_email_page(&app, &browser, &Authz::new("rp-basic"), &HANAKO).await;
    let sent = register_email(&browser, &page, address).await;
    assert_eq!(sent.status, StatusCode::OK, "{sent:?}");
    assert!(status_text(&sent.body).contains("確認メールを送信しました"));

    // The job waits, with the reason; retries back off to at most a minute.
    let mut attempts = 0;
    for round in 0..9 {
        let job = wait_for_job(&app, "a failed attempt", |j| {
            j.recipient == address && j.attempts > attempts && j.lease_owner.is_none()
        })
        .await;
        attempts = job.attempts;
        assert!(job.sent_at.is_none() && job.failed_at.is_none(), "{job:?}");
        assert!(
            job.last_error.as_deref().is_some_and(|e| !e.is_empty()),
            "{job:?}"
        );
        let wait = job.next_attempt_at - app.now();
        assert!(
            (0..=60).contains(&wait),
            "round {round}: the next try is {wait} s away (at most a minute): {job:?}"
        );
        app.advance(60);
    }
    assert!(attempts >= 9, "the worker kept trying: {attempts}");
    assert_eq!(app.store().pending_jobs().await.unwrap(), 1);
    let list = nidan_cli(&app, &["outbox", "list"], None).await;
    assert!(list.status.success(), "{}", stderr(&list));
    let text = stdout(&list);
    let line = text
        .lines()
        .find(|l| l.contains(address))
        .unwrap_or_else(|| panic!("the waiting mail is listed: {text}"));
    assert!(line.contains("waiting"), "{line}");
    assert!(!text.contains("/link/"), "no bodies in the listing: {text}");
    assert_eq!(sink.count(), 0);

    // Back: delivered once, and the link works.
    sink.restart().await;
    app.advance(60);
    let mail = sink.mail_to(address).await;
    let job = wait_for_job(&app, "the delivery recorded", |j| {
        j.recipient == address && j.sent_at.is_some()
    })
    .await;
    assert_eq!(
        mail.message_id(),
        job.message_id,
        "the job keeps its Message-ID"
    );
    assert!(
        job.last_error
            .as_deref()
            .is_some_and(|r| r.starts_with("250")),
        "the SMTP reply is kept: {job:?}"
    );
    assert_eq!(sink.messages_to(address).len(), 1, "exactly once");
    assert_eq!(app.store().pending_jobs().await.unwrap(), 0, "nothing lost");
    let done = confirm_link(&browser, &mail.expect_link()).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");

    let list = stdout(&nidan_cli(&app, &["outbox", "list"], None).await);
    let line = list.lines().find(|l| l.contains(address)).unwrap();
    assert!(
        line.contains("sent") && line.contains(&job.message_id),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_smtp_failures_421_and_451_are_retried() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let address = TARO.email.unwrap();
    sink.fail_temporarily(451);
    forgot(&app, address).await;
    let job = wait_for_job(&app, "a 451", |j| {
        j.recipient == address && j.last_error.as_deref().is_some_and(|e| e.contains("451"))
    })
    .await;
    assert!(job.failed_at.is_none(), "451 is temporary: {job:?}");

    sink.refuse_greeting();
    app.advance(60);
    let job = wait_for_job(&app, "a 421", |j| {
        j.recipient == address && j.last_error.as_deref().is_some_and(|e| e.contains("421"))
    })
    .await;
    assert!(job.failed_at.is_none(), "421 is temporary: {job:?}");
    assert!(sink.refused() >= 2);
    assert_eq!(sink.count(), 0);

    sink.accept();
    app.advance(60);
    let mail = sink.mail_to(address).await;
    assert_eq!(mail.subject(), "第2パスワードのリセット");
    wait_for_job(&app, "the delivery", |j| {
        j.recipient == address && j.sent_at.is_some()
    })
    .await;
    assert_eq!(sink.messages_to(address).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_keeps_the_reply_and_outbox_retry_requeues_it() {
    let (app, sink) = app_with_sink(Backend::Sqlite, json!({}), &[]).await;
    let address = TARO.email.unwrap();
    sink.fail_permanently();
    forgot(&app, address).await;
    let job = wait_for_job(&app, "the permanent failure", |j| {
        j.recipient == address && j.failed_at.is_some()
    })
    .await;
    let reply = job.last_error.clone().unwrap_or_default();
    assert!(
        reply.contains("550") && reply.contains("Mailbox unavailable"),
        "the SMTP reply is kept: {reply}"
    );
    assert_eq!(job.attempts, 1, "a 550 is not retried: {job:?}");
    app.advance(120);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(sink.refused(), 1, "not retried by itself");

    let list = nidan_cli(&app, &["outbox", "list"], None).await;
    assert!(list.status.success(), "{}", stderr(&list));
    let text = stdout(&list);
    let line = text
        .lines()
        .find(|l| l.contains(&job.id))
        .unwrap_or_else(|| panic!("the job is listed: {text}"));
    for part in [
        address,
        "failed",
        "550",
        "Mailbox unavailable",
        job.message_id.as_str(),
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    for secret in ["/link/", "URL", "リセット"] {
        assert!(
            !text.contains(secret),
            "no body in the listing ({secret}): {text}"
        );
    }

    // The operator fixes the address book and requeues.
    sink.accept();
    let retry = nidan_cli(&app, &["outbox", "retry"], None).await;
    assert!(retry.status.success(), "{}", stderr(&retry));
    assert!(
        stdout(&retry).contains("1 deliveries queued again"),
        "{}",
        stdout(&retry)
    );
    // `retry` uses the wall clock; move the server's clock past it.
    app.advance(120);
    let mail = sink.mail_to(address).await;
    assert_eq!(mail.message_id(), job.message_id, "the same Message-ID");
    let page = app.browser().get(&mail.expect_link()).await;
    assert_eq!(
        page.status,
        StatusCode::OK,
        "the link still works: {page:?}"
    );
    wait_for_job(&app, "the delivery", |j| {
        j.id == job.id && j.sent_at.is_some()
    })
    .await;
}

/// Runs `run_once` as `owner` until the outbox has nothing due.
async fn drain(app: &TestApp, transport: Arc<Transport>, owner: &'static str) -> usize {
    let state = app.server.state.clone();
    let mut worked = 0;
    loop {
        match nidan::mail::worker::run_once(&state, &transport, owner).await {
            Ok(true) => worked += 1,
            Ok(false) => {
                if state.store.pending_jobs().await.unwrap() == 0 {
                    return worked;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{owner}: {e}"),
        }
    }
}

fn per_message_id(sink: &SmtpSink) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for mail in sink.messages() {
        *counts.entry(mail.message_id()).or_insert(0) += 1;
    }
    counts
}

async fn two_workers_never_send_the_same_mail(backend: Backend) {
    let (app, sink) = app_with_sink(backend, json!({}), &[]).await;
    // Slow answers make the workers overlap.
    sink.set_delay(Duration::from_millis(20));
    let count = 40;
    let now = app.now();
    let mut ids = Vec::new();
    for n in 0..count {
        let job = queued_mail(&app, &format!("student{n}@example.ac.jp"), n, now);
        ids.push(job.message_id.clone());
        app.store().enqueue(&job).await.unwrap();
    }
    let transport =
        Arc::new(Transport::from_config(&app.server.state.config.mail).expect("SMTP transport"));
    // Two more workers next to the server's own, on the same store.
    let (a, b) = tokio::join!(
        drain(&app, transport.clone(), "worker-a"),
        drain(&app, transport.clone(), "worker-b"),
    );
    sink.wait_for_n(count, WAIT, |_| true).await;
    for id in &ids {
        wait_for_job(&app, "every job sent", |j| {
            &j.message_id == id && j.sent_at.is_some()
        })
        .await;
    }
    let counts = per_message_id(&sink);
    assert_eq!(counts.len(), count, "every mail arrived: {counts:?}");
    for id in &ids {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id} delivered exactly once: {counts:?}"
        );
    }
    assert!(a + b <= count, "{a} + {b}");
}

/// A second replica of `first`: the same configuration (database, key-encryption key, issuer,
/// mail), its own listener, clock and outbox worker. Returns it and its own base URL.
async fn second_replica(first: &TestApp) -> (nidan::app::RunningServer, String) {
    let text = std::fs::read_to_string(&first.config_path).unwrap();
    let mut config: toml::Table = toml::from_str(&text).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    config.insert("listen".into(), toml::Value::String(addr.to_string()));
    let text = toml::to_string(&config).unwrap();
    let config = nidan::config::Config::from_toml(&text, &std::collections::HashMap::new(), false)
        .expect("the replica's configuration");
    let runtime = nidan::app::Runtime {
        clock: Arc::new(nidan::clock::TestClock::starting_now()),
        argon2: nidan::auth::passwords::test_params(),
    };
    let server = nidan::app::spawn(config, runtime, listener)
        .await
        .expect("the second replica starts");
    (server, format!("http://{addr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgres_database_send_each_mail_once() {
    let (first, sink) = app_with_sink(Backend::Postgres, json!({}), &[]).await;
    sink.set_delay(Duration::from_millis(20));
    let (second, second_url) = second_replica(&first).await;
    let count = 30;
    let now = first.now().min(second.state.clock.now());
    let mut ids = Vec::new();
    for n in 0..count {
        let job = queued_mail(&first, &format!("replica{n}@example.ac.jp"), n, now);
        ids.push(job.message_id.clone());
        first.store().enqueue(&job).await.unwrap();
    }
    // Both replicas' workers poll the shared outbox.
    sink.wait_for_n(count, Duration::from_secs(60), |_| true)
        .await;
    for id in &ids {
        wait_for_job(&first, "every job sent", |j| {
            &j.message_id == id && j.sent_at.is_some()
        })
        .await;
    }
    let counts = per_message_id(&sink);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id} exactly once: {counts:?}");
    }

    // A registration through the second replica reaches the sink too…
    let browser = Browser::new(&second_url);
    let login = browser
        .open(&format!(
            "{second_url}/authorize?{}",
            Authz::new("rp-basic").query()
        ))
        .await;
    let reply = browser
        .submit_login(&login, HANAKO.username, HANAKO.password, "")
        .await;
    assert!(reply.is_redirect_to("/enroll/email"), "{reply:?}");
    let page = browser.get("/enroll/email").await;
    let sent = register_email(&browser, &page, "hanako@example.ac.jp").await;
    assert_eq!(sent.status, StatusCode::OK, "{sent:?}");
    let mail = sink.mail_to("hanako@example.ac.jp").await;
    // …and its link (under the shared issuer) works on either replica.
    let link = mail.expect_link();
    assert!(link.starts_with(&first.issuer), "{link}");
    let page = Browser::new(&second_url).get(&link_path(&link)).await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    let done = confirm_link(&first.browser(), &link).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    second.stop().await;
}

async fn a_crash_between_delivery_and_record_sends_at_most_one_duplicate(backend: Backend) {
    let (app, sink) = app_with_sink(backend, json!({}), &[]).await;
    let state = app.server.state.clone();
    let due = app.now() + 10;
    let job = queued_mail(&app, "taro@example.ac.jp", 1, due);
    app.store().enqueue(&job).await.unwrap();

    // A replica leases the job, delivers it and dies before recording the delivery.
    let claimed = app
        .store()
        .claim_job("crashed-replica", due, due + 60)
        .await
        .unwrap()
        .expect("the due job");
    assert_eq!(claimed.id, job.id);
    let body: MailBody =
        serde_json::from_slice(&state.kek.decrypt(&claimed.payload).unwrap()).unwrap();
    let transport = Transport::from_config(&state.config.mail).unwrap();
    let delivery = transport
        .deliver(&state.config.mail.from, &body, &claimed.message_id, due)
        .await;
    assert!(matches!(delivery, Delivery::Sent(_)), "{delivery:?}");
    assert_eq!(sink.count(), 1);

    // While the lease lasts nobody else touches the job.
    app.advance(30);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(sink.count(), 1, "leased: not sent again");

    // After the 60 s lease, another worker sends it again with the same Message-ID, once.
    app.advance(60);
    let mails = sink.wait_for_n(2, WAIT, |_| true).await;
    let recorded = wait_for_job(&app, "the delivery recorded", |j| {
        j.id == job.id && j.sent_at.is_some()
    })
    .await;
    assert_eq!(mails[0].message_id(), job.message_id);
    assert_eq!(
        mails[1].message_id(),
        job.message_id,
        "the duplicate is recognisable"
    );
    assert_eq!(recorded.attempts, 2);
    // The dead replica's late record changes nothing, and nothing more goes out.
    app.store()
        .job_sent(&job.id, "crashed-replica", app.now(), "250 late")
        .await
        .unwrap();
    let after = wait_for_job(&app, "the job", |j| j.id == job.id).await;
    assert_eq!(after.sent_at, recorded.sent_at);
    assert_eq!(after.last_error, recorded.last_error);
    app.advance(600);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(sink.count(), 2, "at most one duplicate");
}

async fn mail_bodies_are_encrypted_at_rest_and_blanked_after_delivery(backend: Backend) {
    let (app, sink) = app_with_sink(backend, json!({}), &[]).await;
    let address = TARO.email.unwrap();
    sink.stop().await;
    forgot(&app, address).await;
    let job = wait_for_job(&app, "the waiting job", |j| {
        j.recipient == address && j.attempts >= 1 && j.lease_owner.is_none()
    })
    .await;
    let payloads = raw_payloads(&app).await;
    let payload = &payloads[&job.id];
    assert!(!payload.is_empty());
    for plain in [
        "/link/",
        app.issuer.as_str(),
        "URL",
        "期限",
        address,
        "第2パスワード",
    ] {
        assert!(
            !payload.contains(plain),
            "the stored body is encrypted ({plain}): {payload}"
        );
    }

    sink.restart().await;
    app.advance(60);
    let mail = sink.mail_to(address).await;
    let link = mail.expect_link();
    let token = link.rsplit('/').next().unwrap().to_string();
    wait_for_job(&app, "the delivery", |j| {
        j.id == job.id && j.sent_at.is_some()
    })
    .await;
    let payloads = raw_payloads(&app).await;
    assert_eq!(payloads[&job.id], "", "blanked after delivery");
    for job in app.store().list_jobs(1000).await.unwrap() {
        for field in [&job.subject, &job.payload, &job.message_id, &job.recipient] {
            assert!(
                !field.contains(&token),
                "the link's token is not in the outbox"
            );
        }
    }
    if backend == Backend::Sqlite {
        // Not in the database files at all (the link is stored as a digest).
        for suffix in ["", "-wal"] {
            let path = app.dir.path().join(format!("nidan.db{suffix}"));
            if let Ok(bytes) = std::fs::read(&path) {
                let text = String::from_utf8_lossy(&bytes);
                assert!(!text.contains(&token), "the token is in {}", path.display());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nidans_smtp_transport_reaches_the_sink_in_every_encoding() {
    let sink = SmtpSink::start().await;
    let config: nidan::config::MailConfig = serde_json::from_value(json!({
        "transport": "smtp",
        "from": "noreply@example.ac.jp",
        "host": "127.0.0.1",
        "port": sink.port(),
        "tls": "none",
    }))
    .expect("a mail config");
    let transport = Transport::from_config(&config).unwrap();
    let long_japanese = "メールアドレスの登録を行います。".repeat(20);
    let texts = [
        "Plain ASCII.\n.A line that starts with a dot\n..two dots\n.\nend".to_string(),
        format!("{long_japanese}\nURL 期限：30 分\nhttp://127.0.0.1:1/link/abc_DEF-123"),
        format!("café {}", "x".repeat(200)),
    ];
    for (n, text) in texts.iter().enumerate() {
        let body = MailBody {
            to: "student@example.ac.jp".into(),
            subject: format!("件名 {n} メールアドレスの登録"),
            text: text.clone(),
        };
        let id = format!("<sink-test-{n}@127.0.0.1>");
        let delivery = transport
            .deliver("noreply@example.ac.jp", &body, &id, 0)
            .await;
        assert!(
            matches!(delivery, Delivery::Sent(ref r) if r.starts_with("250")),
            "{delivery:?}"
        );
        let mail = sink.nth_mail_to("student@example.ac.jp", n + 1).await;
        assert_eq!(mail.message_id(), id);
        assert_eq!(mail.subject(), body.subject);
        assert_eq!(
            mail.text().trim_end(),
            text.replace("\r\n", "\n"),
            "{}",
            mail.raw
        );
    }
    assert_eq!(
        sink.messages()[1].link().as_deref(),
        Some("http://127.0.0.1:1/link/abc_DEF-123")
    );
    // The decoders on their own.
    assert_eq!(
        decode_quoted_printable("caf=C3=A9 =\r\nau lait=3D"),
        "café au lait=".as_bytes()
    );
    assert_eq!(
        decode_words("=?utf-8?b?44Oh44O844Or?= =?utf-8?b?44Ki44OJ44Os44K5?="),
        "メールアドレス"
    );
    // Down and back on the same port.
    sink.stop().await;
    let body = MailBody {
        to: "student@example.ac.jp".into(),
        subject: "down".into(),
        text: "down".into(),
    };
    let delivery = transport
        .deliver("noreply@example.ac.jp", &body, "<down@x>", 0)
        .await;
    assert!(matches!(delivery, Delivery::Retry(_)), "{delivery:?}");
    sink.restart().await;
    let delivery = transport
        .deliver("noreply@example.ac.jp", &body, "<up@x>", 0)
        .await;
    assert!(matches!(delivery, Delivery::Sent(_)), "{delivery:?}");
    sink.fail_permanently();
    let delivery = transport
        .deliver("noreply@example.ac.jp", &body, "<perm@x>", 0)
        .await;
    assert!(
        matches!(delivery, Delivery::Permanent(ref e) if e.contains("550")),
        "{delivery:?}"
    );
}
