//! Several replicas on one PostgreSQL database behind a load balancer without sticky sessions:
//! two nidan servers (in this process, each on its own port, same configuration, KEK and issuer)
//! behind a round-robin proxy at the issuer's address that sends every request to the next
//! replica. The whole student flow alternates between them; single-use values are redeemed once
//! across both; lockouts are shared; a rotated key is published by both before either signs with
//! it; mail is worked on by one replica at a time; a replica can go away mid-flow.
//!
//! Key reloads: each replica reloads its keys from the store every 30 s of real time. Most tests
//! do that reload by hand at the test clock's time (as `tests/keys.rs` does) instead of waiting;
//! one test waits for the real periodic reload once.
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nidan::app::{AppState, RunningServer, Runtime};
use nidan::auth::passwords::test_params;
use nidan::clock::{Clock, TestClock};
use nidan::keys::KeySet;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;
use crate::ops::{
    bind, confirm_link, enroll_in, enroll_over_http, exchange_at, get_at, kids, operator,
    parse_config, refresh_at, register_email, start_enrollment, submit, userinfo_at, wait_for_link,
};

// ---------------------------------------------------------------------------------------------
// The load balancer
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Routing {
    /// Connections so far; the next one goes to replica `count % n`.
    count: usize,
    /// Send the next connection to this replica.
    forced: Option<usize>,
    /// Replicas taken out of the rotation.
    out: HashSet<usize>,
    /// (replica, "METHOD /path") of every request, in order.
    log: Vec<(usize, String)>,
}

/// A TCP round-robin proxy: each connection goes to the next replica, and the request head gets
/// `Connection: close` so that every request is a connection of its own (no keep-alive
/// stickiness, whatever the client's connection pool does).
struct Proxy {
    routing: Arc<Mutex<Routing>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    fn start(listener: TcpListener, replicas: Vec<SocketAddr>) -> Proxy {
        let routing = Arc::new(Mutex::new(Routing::default()));
        let shared = routing.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let index = {
                    let mut r = shared.lock().unwrap();
                    match r.forced.take() {
                        Some(i) => i,
                        None => loop {
                            let i = r.count % replicas.len();
                            r.count += 1;
                            if !r.out.contains(&i) {
                                break i;
                            }
                        },
                    }
                };
                tokio::spawn(relay(client, replicas[index], index, shared.clone()));
            }
        });
        Proxy { routing, task }
    }

    /// The next request goes to `replica`.
    fn send_next_to(&self, replica: usize) {
        self.routing.lock().unwrap().forced = Some(replica);
    }

    /// Only `replicas` get requests from now on.
    fn route_only_to(&self, replicas: &[usize]) {
        let mut routing = self.routing.lock().unwrap();
        routing.out = (0..2).filter(|i| !replicas.contains(i)).collect();
    }

    /// The replica that served the last request starting with `prefix` ("POST /login").
    fn last(&self, prefix: &str) -> usize {
        let routing = self.routing.lock().unwrap();
        routing
            .log
            .iter()
            .rev()
            .find(|(_, line)| line.starts_with(prefix))
            .map(|(i, _)| *i)
            .unwrap_or_else(|| panic!("no request {prefix}: {:?}", routing.log))
    }

    /// The replicas that served requests starting with `prefix`.
    fn served(&self, prefix: &str) -> HashSet<usize> {
        self.routing
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|(_, line)| line.starts_with(prefix))
            .map(|(i, _)| *i)
            .collect()
    }

    fn log(&self) -> Vec<(usize, String)> {
        self.routing.lock().unwrap().log.clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut client: TcpStream,
    replica: SocketAddr,
    index: usize,
    routing: Arc<Mutex<Routing>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 8192];
    let end = loop {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if head.len() > 1 << 20 {
            return;
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut rebuilt = format!("{request_line}\r\n");
    for line in lines {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            rebuilt.push_str(line);
            rebuilt.push_str("\r\n");
        }
    }
    rebuilt.push_str("Connection: close\r\n\r\n");
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default();
    let path = parts
        .next()
        .unwrap_or_default()
        .split('?')
        .next()
        .unwrap_or_default();
    routing
        .lock()
        .unwrap()
        .log
        .push((index, format!("{method} {path}")));
    let Ok(mut server) = TcpStream::connect(replica).await else {
        return;
    };
    if server.write_all(rebuilt.as_bytes()).await.is_err()
        || server.write_all(&head[end..]).await.is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

// ---------------------------------------------------------------------------------------------
// Two replicas
// ---------------------------------------------------------------------------------------------

/// Two replicas on one PostgreSQL database behind the proxy at `issuer`. The test app provides
/// the files (users, KEK, client secrets, mailbox); its own server is not used.
struct Cluster {
    app: TestApp,
    config_path: std::path::PathBuf,
    clock: Arc<TestClock>,
    replicas: Vec<Option<RunningServer>>,
    urls: Vec<String>,
    proxy: Proxy,
    issuer: String,
    mail: std::path::PathBuf,
    /// Dropped last.
    _db: PgDatabase,
}

impl Cluster {
    async fn start(edits: Value) -> Cluster {
        Self::start_with(edits, false).await
    }

    /// With `at_once`, both replicas start together on the empty database.
    async fn start_with(edits: Value, at_once: bool) -> Cluster {
        let (proxy_listener, issuer) = bind().await;
        let app = TestApp::builder(Backend::Sqlite).build().await;
        let db = PgDatabase::create().await;
        let mut all = json!({ "issuer": issuer, "database_url": db.url });
        merge(&mut all, edits);
        let config = crate::ops::config_text(&app, all);
        let config_path = app.dir.path().join("replicas.toml");
        std::fs::write(&config_path, &config).unwrap();
        let clock = Arc::new(TestClock::starting_now());
        let spawn = |listener: TcpListener| {
            let runtime = Runtime {
                clock: clock.clone(),
                argon2: test_params(),
            };
            nidan::app::spawn(parse_config(&config), runtime, listener)
        };
        let (a, url_a) = bind().await;
        let (b, url_b) = bind().await;
        let (a, b) = if at_once {
            let (a, b) = tokio::join!(spawn(a), spawn(b));
            (a.expect("replica A starts"), b.expect("replica B starts"))
        } else {
            let a = spawn(a).await.expect("replica A starts");
            (a, spawn(b).await.expect("replica B starts"))
        };
        let now = clock.now();
        for student in [TARO, JIRO] {
            enroll_in(&a.state.store, &student, now).await;
        }
        let proxy = Proxy::start(proxy_listener, vec![a.addr, b.addr]);
        let mail = crate::ops::mail_dir(&app);
        Cluster {
            app,
            config_path,
            clock,
            replicas: vec![Some(a), Some(b)],
            urls: vec![url_a, url_b],
            proxy,
            issuer,
            mail,
            _db: db,
        }
    }

    fn state(&self, replica: usize) -> &AppState {
        &self.replicas[replica]
            .as_ref()
            .expect("a running replica")
            .state
    }

    fn browser(&self) -> Browser {
        Browser::new(&self.issuer)
    }

    fn now(&self) -> i64 {
        self.clock.now()
    }

    /// Loads the keys at the test clock's time on `replica`, as its 30-second reload does.
    async fn reload_keys(&self, replica: usize) {
        let state = self.state(replica);
        let keys = KeySet::load(&state.store, &state.kek, self.now())
            .await
            .expect("keys load");
        *state.keys.write().unwrap() = Arc::new(keys);
    }

    /// TARO's tokens for `rp-basic`, signed in and exchanged through the proxy.
    async fn tokens(&self, level: Level) -> Tokens {
        let authz = Authz::new("rp-basic");
        let reply = self
            .browser()
            .sign_in(&authz.url(&self.issuer), &TARO, level)
            .await;
        let exchanged = exchange_at(&self.issuer, &self.app, &authz, &reply.code()).await;
        assert_eq!(exchanged.status, StatusCode::OK, "{exchanged:?}");
        Tokens::from(exchanged.json())
    }

    /// Stops `replica` (a rolling restart) and takes it out of the proxy's rotation.
    async fn stop(&mut self, replica: usize) {
        self.proxy.route_only_to(&[other(replica)]);
        if let Some(server) = self.replicas[replica].take() {
            server.stop().await;
        }
    }
}

fn other(replica: usize) -> usize {
    1 - replica
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_student_walks_the_whole_flow_alternating_between_replicas() {
    let c = Cluster::start(json!({})).await;
    let browser = c.browser();
    let authz = Authz::new("rp-basic");
    let enrolled = enroll_over_http(
        &browser,
        &authz.url(&c.issuer),
        &c.mail,
        &HANAKO,
        "hanako@example.ac.jp",
        "Nidan2402b",
    )
    .await;
    let code = enrolled.reply.code();
    // Every request went to the other replica than the one before it: the login page and its
    // POST, the registration and its link, each step and the next ran on different replicas.
    let log = c.proxy.log();
    assert!(log.len() >= 13, "{log:?}");
    assert!(
        log.windows(2).all(|pair| pair[0].0 != pair[1].0),
        "strict alternation: {log:?}"
    );

    // The code is exchanged on the replica that did not issue it, once.
    let login = c.proxy.last("POST /login");
    c.proxy.send_next_to(other(login));
    let exchanged = exchange_at(&c.issuer, &c.app, &authz, &code).await;
    assert_eq!(exchanged.status, StatusCode::OK, "{exchanged:?}");
    let tokens = Tokens::from(exchanged.json());
    let claims = tokens.id_claims();
    assert_eq!(claims["acr"], ACR_SECOND_PASSWORD);
    assert_eq!(claims["iss"], c.issuer);

    // The one-time link is used up on both replicas.
    for replica in [0, 1] {
        let page = get_at(&format!("{}/link/{}", c.urls[replica], enrolled.link)).await;
        assert_eq!(page.status, StatusCode::GONE, "replica {replica}: {page:?}");
    }

    // Userinfo on either replica.
    for replica in [0, 1] {
        let info = userinfo_at(&c.urls[replica], &tokens.access_token).await;
        assert_eq!(info.status, StatusCode::OK, "{info:?}");
        assert_eq!(info.json()["email"], "hanako@example.ac.jp");
        assert_eq!(info.json()["sub"], claims["sub"]);
    }

    // Refresh tokens rotate from replica to replica.
    let mut refresh = tokens.refresh().to_string();
    let mut used = Vec::new();
    for round in 0..4 {
        c.proxy.send_next_to(round % 2);
        let reply = refresh_at(&c.issuer, &c.app, "rp-basic", &refresh).await;
        assert_eq!(reply.status, StatusCode::OK, "round {round}: {reply:?}");
        used.push(refresh);
        refresh = Tokens::from(reply.json()).refresh().to_string();
    }
    // A rotated token presented again (on the other replica) is refused and ends the grant.
    c.proxy.send_next_to(1);
    let replay = refresh_at(&c.issuer, &c.app, "rp-basic", &used[2]).await;
    assert_eq!(replay.error(), "invalid_grant", "{replay:?}");
    c.proxy.send_next_to(0);
    let latest = refresh_at(&c.issuer, &c.app, "rp-basic", &refresh).await;
    assert_eq!(
        latest.error(),
        "invalid_grant",
        "reuse detection revoked the grant on both replicas: {latest:?}"
    );
    // The code, presented again on either replica, is refused.
    for replica in [login, other(login)] {
        c.proxy.send_next_to(replica);
        let again = exchange_at(&c.issuer, &c.app, &authz, &code).await;
        assert_eq!(again.status, StatusCode::BAD_REQUEST, "{again:?}");
        assert_eq!(again.error(), "invalid_grant");
    }

    // Each replica keeps its own audit chain, and both verify.
    let chain = c.state(0).store.audit_chain().await.unwrap();
    let problems = nidan::audit::verify(&chain);
    assert!(problems.is_empty(), "{problems:?}");
    let replicas: HashSet<&str> = chain.iter().map(|e| e.replica.as_str()).collect();
    assert!(replicas.len() >= 2, "a chain per replica: {replicas:?}");
    let verified = operator(&c.config_path, &["audit", "verify"]).await;
    assert!(verified.contains("intact"), "{verified}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_use_values_are_redeemed_once_across_both_replicas() {
    let c = Cluster::start(json!({})).await;

    // A code sent to both replicas at once, several times.
    let authz = Authz::new("rp-basic");
    let reply = c
        .browser()
        .sign_in(&authz.url(&c.issuer), &TARO, Level::Password)
        .await;
    let code = reply.code();
    let attempts = (0..6).map(|i| {
        let (base, app, authz, code) = (&c.urls[i % 2], &c.app, &authz, &code);
        async move { exchange_at(base, app, authz, code).await }
    });
    let replies = futures_join_all(attempts).await;
    let ok: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .collect();
    assert_eq!(ok.len(), 1, "one exchange wins: {replies:?}");
    let tokens = Tokens::from(ok[0].json());
    // The losers' replay revoked what the code issued.
    let info = userinfo_at(&c.issuer, &tokens.access_token).await;
    assert_eq!(info.status, StatusCode::UNAUTHORIZED, "{info:?}");

    // A refresh token sent to both replicas at once.
    let tokens = c.tokens(Level::Password).await;
    let refresh = tokens.refresh().to_string();
    let attempts = (0..6).map(|i| {
        let (base, app, refresh) = (&c.urls[i % 2], &c.app, &refresh);
        async move { refresh_at(base, app, "rp-basic", refresh).await }
    });
    let replies = futures_join_all(attempts).await;
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(ok, 1, "one refresh wins: {replies:?}");

    // A private_key_jwt assertion replayed on the other replica at the same moment.
    let assertion = client_assertion(&c, "jti-replayed-across-replicas");
    let attempts = (0..4).map(|i| {
        let (base, assertion) = (&c.urls[i % 2], &assertion);
        async move {
            let response = no_redirect_client()
                .post(format!("{base}/token"))
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", "rp-jwt"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.as_str()),
                ])
                .send()
                .await
                .unwrap();
            Reply::from(response, None).await
        }
    });
    let replies = futures_join_all(attempts).await;
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(ok, 1, "the assertion is used once: {replies:?}");

    // A one-time link confirmed from two tabs on two replicas at once.
    let browser = c.browser();
    let page = start_enrollment(&browser, &Authz::new("rp-basic").url(&c.issuer), &HANAKO).await;
    register_email(&browser, &page, "hanako@example.ac.jp").await;
    let token = wait_for_link(&c.mail, "hanako@example.ac.jp", &mut HashSet::new()).await;
    let action = format!("/link/{token}");
    let page = browser.get(&action).await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    let posts = (0..4).map(|_| submit(&browser, &page, &action, &[]));
    let replies = futures_join_all(posts).await;
    let statuses: Vec<StatusCode> = replies.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        1,
        "the link is consumed once: {statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::GONE),
        "the others see a used link: {statuses:?}"
    );
    assert_eq!(c.proxy.served("POST /link/"), HashSet::from([0, 1]));
}

/// A `private_key_jwt` assertion of `rp-jwt` for the cluster's token endpoint.
fn client_assertion(c: &Cluster, jti: &str) -> String {
    let now = c.now();
    let mut payload = josekit::jwt::JwtPayload::new();
    payload.set_issuer("rp-jwt");
    payload.set_subject("rp-jwt");
    payload.set_audience(vec![format!("{}/token", c.issuer)]);
    payload.set_jwt_id(jti);
    payload.set_claim("iat", Some(json!(now))).unwrap();
    payload.set_claim("exp", Some(json!(now + 120))).unwrap();
    let mut header = josekit::jws::JwsHeader::new();
    header.set_token_type("JWT");
    header.set_key_id("rp-jwt-key-1");
    let signer = josekit::jws::ES256
        .signer_from_jwk(&c.app.jwt_private)
        .unwrap();
    josekit::jwt::encode_with_signer(&payload, &header, &signer).unwrap()
}

/// `join_all` without the futures crate: the futures run concurrently in this task.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<Reply>
where
    F: std::future::Future<Output = Reply>,
{
    let mut pending: Vec<_> = futures.map(|f| Some(Box::pin(f))).collect();
    let mut outputs: Vec<Option<Reply>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (slot, out) in pending.iter_mut().zip(outputs.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(reply) => {
                        *out = Some(reply);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|r| r.expect("every future finished"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockout_counters_are_shared_by_the_replicas() {
    let c = Cluster::start(json!({ "throttle": { "second_password_failures": 3 } })).await;
    for _ in 0..3 {
        let browser = c.browser();
        let page = browser.open(&Authz::new("rp-basic").url(&c.issuer)).await;
        let reply = browser
            .submit_login(&page, TARO.username, TARO.password, "Wrong2ndPass1")
            .await;
        assert!(reply.is_login_page(), "{reply:?}");
    }
    assert_eq!(
        c.proxy.served("POST /login"),
        HashSet::from([0, 1]),
        "the failures were spread over both replicas"
    );
    for replica in [0, 1] {
        let browser = Browser::new(&c.urls[replica]);
        let reply = browser
            .sign_in(
                &Authz::new("rp-basic").url(&c.urls[replica]),
                &TARO,
                Level::SecondPassword,
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::TOO_MANY_REQUESTS,
            "replica {replica} knows the lock: {reply:?}"
        );
        let browser = Browser::new(&c.urls[replica]);
        let reply = browser
            .sign_in(
                &Authz::new("rp-basic").url(&c.urls[replica]),
                &TARO,
                Level::Password,
            )
            .await;
        reply.code();
    }

    // An operator's unlock (against the shared store) reaches both at once.
    operator(&c.config_path, &["user", "unlock", TARO.username]).await;
    for replica in [0, 1] {
        let browser = Browser::new(&c.urls[replica]);
        let reply = browser
            .sign_in(
                &Authz::new("rp-basic").url(&c.urls[replica]),
                &TARO,
                Level::SecondPassword,
            )
            .await;
        reply.code();
    }
}

fn signing_kid(tokens: &Tokens) -> String {
    jwt_header(tokens.id())["kid"]
        .as_str()
        .expect("kid")
        .to_string()
}

async fn jwks(url: &str) -> Value {
    let reply = get_at(&format!("{url}/jwks")).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    reply.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_published_by_both_replicas_before_either_signs_with_it() {
    let c = Cluster::start(json!({})).await;
    let old = signing_kid(&c.tokens(Level::Password).await);

    // Rotated through replica A with a one-hour delay.
    let delay = 3600;
    let state = c.state(0);
    let new = nidan::keys::rotate(&state.store, &state.kek, "RS256", c.now(), delay, 900)
        .await
        .unwrap()
        .kid;
    for replica in [0, 1] {
        c.reload_keys(replica).await;
    }
    for replica in [0, 1] {
        let published = kids(&jwks(&c.urls[replica]).await);
        assert!(
            published.contains(&new) && published.contains(&old),
            "replica {replica} publishes both keys: {published:?}"
        );
    }
    for round in 0..2 {
        let kid = signing_kid(&c.tokens(Level::Password).await);
        assert_eq!(kid, old, "round {round}: nobody signs with the new key yet");
    }

    // After the delay both sign with it, and each one's tokens verify with the other's JWKS.
    c.clock.advance(delay + 1);
    for replica in [0, 1] {
        c.reload_keys(replica).await;
    }
    for replica in [0, 1] {
        c.proxy.send_next_to(replica);
        let authz = Authz::new("rp-basic");
        let reply = Browser::new(&c.urls[replica])
            .sign_in(&authz.url(&c.urls[replica]), &TARO, Level::Password)
            .await;
        let exchanged = exchange_at(&c.urls[replica], &c.app, &authz, &reply.code()).await;
        let tokens = Tokens::from(exchanged.json());
        assert_eq!(signing_kid(&tokens), new, "replica {replica}");
        let elsewhere = jwks(&c.urls[other(replica)]).await;
        let key = elsewhere["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == new.as_str())
            .expect("the other replica publishes the key");
        let jwk = josekit::jwk::Jwk::from_map(key.as_object().unwrap().clone()).unwrap();
        let verifier = josekit::jws::RS256.verifier_from_jwk(&jwk).unwrap();
        josekit::jwt::decode_with_verifier(tokens.id(), &verifier)
            .expect("the ID token verifies with the other replica's JWKS");
        // The old key stays published for the tokens it signed.
        assert!(kids(&elsewhere).contains(&old));
    }
}

/// The real thing once: no manual reload. A rotation through the CLI reaches the replicas by
/// their own 30-second reload (this test waits up to 40 s of real time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_replicas_pick_up_a_cli_rotation_by_their_own_reload() {
    let c = Cluster::start(json!({})).await;
    let old = signing_kid(&c.tokens(Level::Password).await);
    let started = Instant::now();
    let rotated = operator(&c.config_path, &["keys", "rotate", "--delay", "2h"]).await;
    let new = rotated
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("new RS256 key KID published…: {rotated}"))
        .to_string();
    for replica in [0, 1] {
        loop {
            if kids(&jwks(&c.urls[replica]).await).contains(&new) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(40),
                "replica {replica} did not publish {new} within its reload interval"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for _ in 0..2 {
        assert_eq!(signing_kid(&c.tokens(Level::Password).await), old);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_at_once_agree_on_the_signing_keys() {
    let c = Cluster::start_with(json!({}), true).await;
    let a = jwks(&c.urls[0]).await;
    let b = jwks(&c.urls[1]).await;
    assert_eq!(kids(&a), kids(&b), "both publish the same keys");
    let mut signed = HashSet::new();
    for replica in [0, 1, 0, 1] {
        let authz = Authz::new("rp-basic");
        let reply = Browser::new(&c.urls[replica])
            .sign_in(&authz.url(&c.urls[replica]), &TARO, Level::Password)
            .await;
        let exchanged = exchange_at(&c.urls[replica], &c.app, &authz, &reply.code()).await;
        signed.insert(signing_kid(&Tokens::from(exchanged.json())));
    }
    assert_eq!(
        signed.len(),
        1,
        "one RS256 signing key for both: {signed:?}"
    );
    let keys = c.state(0).store.list_signing_keys().await.unwrap();
    let current_rs256 = keys
        .iter()
        .filter(|k| k.alg == "RS256" && k.published_until.is_none())
        .count();
    assert_eq!(
        current_rs256, 1,
        "one current RS256 key in the store: {keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_mail_is_worked_on_by_one_replica() {
    let c = Cluster::start(json!({})).await;
    let count = 40;
    let state = c.state(0);
    for i in 0..count {
        let job = nidan::mail::job(
            state,
            &format!("student{i}@example.ac.jp"),
            "test",
            &format!("mail number {i}"),
            c.now(),
        )
        .unwrap();
        state.store.enqueue(&job).await.unwrap();
    }
    for replica in [0, 1] {
        c.state(replica).outbox_wakeup.notify_one();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let jobs = loop {
        let jobs = state.store.list_jobs(1000).await.unwrap();
        if jobs.iter().filter(|j| j.sent_at.is_some()).count() == count {
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "every mail is delivered: {jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for job in &jobs {
        assert_eq!(
            job.attempts, 1,
            "claimed once, by one replica: {} {:?}",
            job.recipient, job
        );
        assert_eq!(job.payload, "", "the body is blanked after delivery");
    }
    let files: Vec<String> = std::fs::read_dir(&c.mail)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".eml"))
        .collect();
    assert_eq!(files.len(), count, "one file per mail: {files:?}");
    for job in &jobs {
        let id = job
            .message_id
            .trim_matches(['<', '>'])
            .replace(['@', '/'], "_");
        assert_eq!(
            files.iter().filter(|f| f.contains(&id)).count(),
            1,
            "{} delivered once",
            job.message_id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_going_away_mid_flow_loses_nothing() {
    let mut c = Cluster::start(json!({})).await;
    // Hanako registers her email on replica A …
    c.proxy.route_only_to(&[0]);
    let browser = c.browser();
    let authz = Authz::new("rp-basic");
    let page = start_enrollment(&browser, &authz.url(&c.issuer), &HANAKO).await;
    register_email(&browser, &page, "hanako@example.ac.jp").await;
    // … Taro opens the login page on A …
    let taro = c.browser();
    let taro_authz = Authz::new("rp-basic");
    let taro_page = taro.open(&taro_authz.url(&c.issuer)).await;
    assert!(taro_page.is_login_page(), "{taro_page:?}");
    let before: Vec<usize> = c.proxy.log().iter().map(|(i, _)| *i).collect();
    // … and A goes away (a rolling restart). B finishes everything.
    c.stop(0).await;
    let reply = taro
        .submit_login(&taro_page, TARO.username, TARO.password, "")
        .await;
    let exchanged = exchange_at(&c.issuer, &c.app, &taro_authz, &reply.code()).await;
    assert_eq!(exchanged.status, StatusCode::OK, "{exchanged:?}");

    let token = wait_for_link(&c.mail, "hanako@example.ac.jp", &mut HashSet::new()).await;
    let registered = confirm_link(&browser, &token).await;
    let login = browser.get(&crate::ops::href(&registered, "/login")).await;
    let reply = browser
        .submit_login(&login, HANAKO.username, HANAKO.password, "")
        .await;
    assert!(reply.is_redirect_to("/enroll/second-password"), "{reply:?}");
    let page = browser.follow(reply).await;
    let set = crate::ops::set_second_password(&browser, &page, "Nidan2402b").await;
    let login = browser.get(&crate::ops::href(&set, "/login")).await;
    let reply = browser
        .submit_login(&login, HANAKO.username, HANAKO.password, "Nidan2402b")
        .await;
    let exchanged = exchange_at(&c.issuer, &c.app, &authz, &reply.code()).await;
    assert_eq!(exchanged.status, StatusCode::OK, "{exchanged:?}");

    let log = c.proxy.log();
    assert!(before.iter().all(|i| *i == 0), "{log:?}");
    assert!(
        log[before.len()..].iter().all(|(i, _)| *i == 1),
        "B served the rest: {log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_added_with_the_cli_is_known_to_both_replicas_at_once() {
    let c = Cluster::start(json!({})).await;
    let added = operator(
        &c.config_path,
        &[
            "client",
            "add",
            "rp-cli",
            "--redirect-uri",
            REDIRECT_URI,
            "--grant-type",
            "client_credentials",
            "--scope",
            "openid",
        ],
    )
    .await;
    let secret = added
        .lines()
        .find_map(|l| l.strip_prefix("client_secret: "))
        .expect("the secret is printed once")
        .trim()
        .to_string();
    for replica in [0, 1] {
        let response = no_redirect_client()
            .post(format!("{}/token", c.urls[replica]))
            .basic_auth("rp-cli", Some(&secret))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "replica {replica}");
    }
    operator(&c.config_path, &["client", "remove", "rp-cli"]).await;
    for replica in [0, 1] {
        let response = no_redirect_client()
            .post(format!("{}/token", c.urls[replica]))
            .basic_auth("rp-cli", Some(&secret))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "replica {replica} forgot the removed client"
        );
    }
}
