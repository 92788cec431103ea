//! The test harness: a nidan server per test (port 0, its own temp dir, database, test clock and
//! relying parties), a browser with its own cookie jar, and an `openidconnect` relying party.
#![allow(dead_code)]

pub mod backchannel;
pub mod html;
pub mod pgcluster;
pub mod rp;
pub mod slapd;
pub mod smtp;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use josekit::jwk::Jwk;
use nidan::app::{RunningServer, Runtime};
use nidan::auth::passwords::{hash_with, test_params};
use nidan::clock::{random_id, random_token, Clock, TestClock};
use nidan::config::Config;
use nidan::store::DynStore;
use reqwest::header::{HeaderMap, AUTHORIZATION, COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use url::Url;

pub use nidan::config::{ACR_PASSWORD, ACR_SECOND_PASSWORD};

/// Where every test relying party receives its authorization responses (never contacted).
pub const REDIRECT_URI: &str = "http://127.0.0.1:9999/cb";
pub const POST_LOGOUT_URI: &str = "http://127.0.0.1:9999/";
/// A secret with characters that must be form-urlencoded in HTTP Basic (RFC 6749 §2.3.1).
pub const SYMBOL_SECRET: &str = "p@ss w+rd/:%&=?#~";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates `mod NAME { sqlite, postgres }` tests that call `async fn NAME(backend: Backend)`.
/// Attributes before a name (e.g. `#[ignore = "…"]`) apply to both tests.
#[macro_export]
macro_rules! on_both_backends {
    ($($(#[$meta:meta])* $name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                $(#[$meta])*
                async fn sqlite() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                $(#[$meta])*
                async fn postgres() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            }
        )*
    };
}

/// A student in the test directory.
#[derive(Clone, Copy, Debug)]
pub struct Student {
    pub username: &'static str,
    pub directory_id: &'static str,
    pub password: &'static str,
    /// Set (with a verified email) before the test starts: the student is enrolled.
    pub second_password: Option<&'static str>,
    pub email: Option<&'static str>,
}

/// Enrolled: verified email and a second password.
pub const TARO: Student = Student {
    username: "s2401001",
    directory_id: "uuid-2401001",
    password: "Daigaku-Pass-1",
    second_password: Some("Nidan2401a"),
    email: Some("taro@example.ac.jp"),
};

/// Enrolled too, for tests where a second student signs in.
pub const JIRO: Student = Student {
    username: "s2401003",
    directory_id: "uuid-2401003",
    password: "Daigaku-Pass-3",
    second_password: Some("Nidan2403c"),
    email: Some("jiro@example.ac.jp"),
};

/// Not enrolled: no email, no second password.
pub const HANAKO: Student = Student {
    username: "s2401002",
    directory_id: "uuid-2401002",
    password: "Daigaku-Pass-2",
    second_password: None,
    email: None,
};

fn student_claims(student: &Student) -> Value {
    match student.username {
        "s2401001" => json!({
            "name": "Taro Gakusei", "family_name": "Gakusei", "given_name": "Taro",
            "student_id": "S2401001", "affiliation": "student"
        }),
        "s2401003" => json!({
            "name": "Jiro Gakusei", "family_name": "Gakusei", "given_name": "Jiro",
            "student_id": "S2401003", "affiliation": "student"
        }),
        _ => json!({
            "name": "Hanako Daigaku", "family_name": "Daigaku", "given_name": "Hanako",
            "student_id": "S2401002", "affiliation": "student"
        }),
    }
}

/// A registered test client and the secret it authenticates with.
#[derive(Clone, Debug)]
pub struct TestClient {
    pub client_id: &'static str,
    pub secret: Option<&'static str>,
    pub settings: Value,
}

fn all_scopes() -> Value {
    json!(["openid", "profile", "email", "student", "offline_access"])
}

/// Every test server registers these relying parties.
fn default_clients(jwt_public: &Jwk) -> Vec<TestClient> {
    let confidential = |id: &'static str, secret: &'static str, extra: Value| {
        let mut settings = json!({
            "client_id": id,
            "redirect_uris": [REDIRECT_URI],
            "post_logout_redirect_uris": [POST_LOGOUT_URI],
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["authorization_code", "refresh_token"],
            "scopes": all_scopes(),
        });
        merge(&mut settings, extra);
        TestClient {
            client_id: id,
            secret: Some(secret),
            settings,
        }
    };
    vec![
        confidential(
            "rp-basic",
            "basic-secret-0123456789abcdef",
            json!({ "grant_types": ["authorization_code", "refresh_token", "client_credentials"] }),
        ),
        confidential(
            "rp-other",
            "other-secret-0123456789abcdef",
            json!({ "grant_types": ["authorization_code", "refresh_token", "client_credentials"] }),
        ),
        confidential(
            "rp-post",
            "post-secret-0123456789abcdef",
            json!({ "token_endpoint_auth_method": "client_secret_post" }),
        ),
        confidential(
            "rp-symbols",
            SYMBOL_SECRET,
            json!({ "grant_types": ["authorization_code", "client_credentials"] }),
        ),
        confidential(
            "rp-es256",
            "es256-secret-0123456789abcdef",
            json!({ "id_token_signed_response_alg": "ES256" }),
        ),
        confidential(
            "rp-eddsa",
            "eddsa-secret-0123456789abcdef",
            json!({ "id_token_signed_response_alg": "EdDSA" }),
        ),
        confidential(
            "rp-step",
            "step-secret-0123456789abcdef",
            json!({ "min_acr": ACR_SECOND_PASSWORD }),
        ),
        TestClient {
            client_id: "rp-public",
            secret: None,
            settings: json!({
                "client_id": "rp-public",
                "redirect_uris": [REDIRECT_URI],
                "post_logout_redirect_uris": [POST_LOGOUT_URI],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
                "scopes": ["openid", "profile", "email"],
            }),
        },
        TestClient {
            client_id: "rp-jwt",
            secret: None,
            settings: json!({
                "client_id": "rp-jwt",
                "redirect_uris": [REDIRECT_URI],
                "token_endpoint_auth_method": "private_key_jwt",
                "grant_types": ["authorization_code", "refresh_token", "client_credentials"],
                "scopes": all_scopes(),
                "jwks": { "keys": [serde_json::to_value(jwt_public.as_ref()).unwrap()] },
            }),
        },
    ]
}

/// Deep-merges `extra` into `target` (objects merge, everything else replaces).
pub fn merge(target: &mut Value, extra: Value) {
    match (target, extra) {
        (Value::Object(t), Value::Object(e)) => {
            for (k, v) in e {
                merge(t.entry(k).or_insert(Value::Null), v);
            }
        }
        (t, e) => *t = e,
    }
}

type ConfigEdit = Box<dyn FnOnce(&mut Value) + Send>;

pub struct TestAppBuilder {
    backend: Backend,
    students: Vec<Student>,
    extra_clients: Vec<TestClient>,
    edits: Vec<ConfigEdit>,
}

impl TestAppBuilder {
    /// Adds a student to the directory (TARO, JIRO and HANAKO are always there).
    pub fn student(mut self, student: Student) -> Self {
        self.students.push(student);
        self
    }

    /// Registers another client in the configuration file.
    pub fn client(mut self, client: TestClient) -> Self {
        self.extra_clients.push(client);
        self
    }

    /// Merges `extra` into the configuration (as JSON, written out as TOML),
    /// e.g. `json!({"session": {"idle_timeout": "2h"}})`.
    pub fn config(mut self, extra: Value) -> Self {
        self.edits.push(Box::new(move |cfg| merge(cfg, extra)));
        self
    }

    pub async fn build(self) -> TestApp {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_path_buf();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().unwrap();
        let issuer = format!("http://{addr}");

        let (database_url, pg) = match self.backend {
            Backend::Sqlite => (
                format!("sqlite://{}", root.join("nidan.db").display()),
                None,
            ),
            Backend::Postgres => {
                let db = PgDatabase::create().await;
                (db.url.clone(), Some(db))
            }
        };

        let kek_path = root.join("kek");
        std::fs::write(
            &kek_path,
            format!("{}\n", STANDARD.encode(nidan::clock::random_bytes::<32>())),
        )
        .unwrap();

        let mut students = vec![TARO, HANAKO, JIRO];
        students.extend(self.students);
        let users: Vec<Value> = students
            .iter()
            .map(|s| {
                json!({
                    "username": s.username,
                    "id": s.directory_id,
                    "password_hash": hash_with(&test_params(), s.password),
                    "claims": student_claims(s),
                })
            })
            .collect();
        let users_path = root.join("users.toml");
        std::fs::write(&users_path, to_toml(&json!({ "users": users }))).unwrap();

        let jwt_key = josekit::jws::ES256.generate_key_pair().unwrap();
        let mut jwt_private = jwt_key.to_jwk_private_key();
        let mut jwt_public = jwt_key.to_jwk_public_key();
        for jwk in [&mut jwt_private, &mut jwt_public] {
            jwk.set_key_id("rp-jwt-key-1");
            jwk.set_algorithm("ES256");
        }
        let mut clients = default_clients(&jwt_public);
        clients.extend(self.extra_clients);
        let mut client_tables = Vec::new();
        for client in &clients {
            let mut settings = client.settings.clone();
            if let Some(secret) = client.secret {
                // One trailing newline is stripped from *_file secrets.
                let path = root.join(format!("{}.secret", client.client_id));
                std::fs::write(&path, format!("{secret}\n")).unwrap();
                settings["client_secret_file"] = json!(path.display().to_string());
            }
            client_tables.push(settings);
        }

        let mut cfg = json!({
            "issuer": issuer,
            "listen": addr.to_string(),
            "database_url": database_url,
            "key_encryption_key_file": kek_path.display().to_string(),
            "directory": { "kind": "file", "path": users_path.display().to_string() },
            "mail": {
                "transport": "file",
                "from": "noreply@example.ac.jp",
                "path": root.join("mail").display().to_string(),
            },
            "clients": client_tables,
        });
        for edit in self.edits {
            edit(&mut cfg);
        }
        let text = to_toml(&cfg);
        let config_path = root.join("nidan.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::from_toml(&text, &HashMap::new(), false)
            .unwrap_or_else(|e| panic!("test configuration refused:\n{e}\n{text}"));

        let clock = Arc::new(TestClock::starting_now());
        let runtime = Runtime {
            clock: clock.clone(),
            argon2: test_params(),
        };
        let server = nidan::app::spawn(config, runtime, listener)
            .await
            .expect("the server starts");
        let db = Db::connect(&database_url).await;
        let app = TestApp {
            backend: self.backend,
            issuer,
            clock,
            http: no_redirect_client(),
            database_url,
            config_path,
            clients,
            jwt_private,
            db,
            server,
            dir,
            _pg: pg,
        };
        for student in &students {
            app.enroll(student).await;
        }
        app
    }
}

pub fn to_toml(value: &Value) -> String {
    let value = toml::Value::try_from(value).expect("JSON without nulls converts to TOML");
    toml::to_string(&value).expect("TOML serialises")
}

pub fn no_redirect_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A running nidan with everything it needs; each test owns one.
pub struct TestApp {
    pub backend: Backend,
    pub issuer: String,
    pub clock: Arc<TestClock>,
    /// Follows no redirects, keeps no cookies.
    pub http: reqwest::Client,
    pub database_url: String,
    /// The configuration the server runs with, for `nidan --config`.
    pub config_path: PathBuf,
    pub clients: Vec<TestClient>,
    /// The private key of `rp-jwt` (ES256, kid `rp-jwt-key-1`).
    pub jwt_private: Jwk,
    db: Db,
    pub server: RunningServer,
    pub dir: tempfile::TempDir,
    /// Dropped last: drops the PostgreSQL database.
    _pg: Option<PgDatabase>,
}

impl TestApp {
    pub fn builder(backend: Backend) -> TestAppBuilder {
        TestAppBuilder {
            backend,
            students: vec![],
            extra_clients: vec![],
            edits: vec![],
        }
    }

    pub async fn start(backend: Backend) -> TestApp {
        Self::builder(backend).build().await
    }

    pub async fn sqlite() -> TestApp {
        Self::start(Backend::Sqlite).await
    }

    pub async fn postgres() -> TestApp {
        Self::start(Backend::Postgres).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.issuer)
    }

    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// Moves the server's clock forward.
    pub fn advance(&self, seconds: i64) {
        self.clock.advance(seconds);
    }

    pub fn store(&self) -> &DynStore {
        &self.server.state.store
    }

    pub fn browser(&self) -> Browser {
        Browser::new(&self.issuer)
    }

    pub fn secret(&self, client_id: &str) -> &'static str {
        self.clients
            .iter()
            .find(|c| c.client_id == client_id)
            .and_then(|c| c.secret)
            .unwrap_or_else(|| panic!("client {client_id} has no secret"))
    }

    /// Gives the student a verified email and a second password, as enrollment would.
    pub async fn enroll(&self, student: &Student) {
        let Some(second_password) = student.second_password else {
            return;
        };
        let now = self.now();
        let claims = student_claims(student).to_string();
        let account = self
            .store()
            .upsert_account(
                student.directory_id,
                student.username,
                &claims,
                &random_id(),
                &random_token(),
                now,
            )
            .await
            .expect("account upsert");
        let hash = hash_with(&test_params(), second_password);
        self.db
            .execute(
                "UPDATE accounts SET email = $1, email_verified_at = $2, \
                 second_password_hash = $3, second_password_set_at = $2 WHERE id = $4",
                &[
                    student.email.unwrap_or("student@example.ac.jp").into(),
                    now.into(),
                    hash.into(),
                    account.id.into(),
                ],
            )
            .await;
    }

    /// POSTs a form to the token endpoint with the given client authentication.
    pub async fn token(&self, auth: &Auth, form: &[(&str, &str)]) -> Reply {
        let request = auth.apply(self, self.http.post(self.url("/token")), form);
        Reply::from(request.send().await.expect("token request"), None).await
    }

    /// The client authentication each default client is registered with.
    pub fn auth(&self, client_id: &str) -> Auth {
        match client_id {
            "rp-public" => Auth::None(client_id.into()),
            "rp-jwt" => Auth::Jwt(client_id.into()),
            "rp-post" => Auth::Post(client_id.into(), self.secret(client_id).into()),
            _ => Auth::Basic(client_id.into(), self.secret(client_id).into()),
        }
    }

    /// A fresh `private_key_jwt` assertion for `rp-jwt` with the given `jti`.
    pub fn client_assertion(&self, jti: &str) -> String {
        let now = self.now();
        let mut payload = josekit::jwt::JwtPayload::new();
        payload.set_issuer("rp-jwt");
        payload.set_subject("rp-jwt");
        payload.set_audience(vec![self.url("/token")]);
        payload.set_jwt_id(jti);
        payload
            .set_claim("iat", Some(json!(now)))
            .expect("iat claim");
        payload
            .set_claim("exp", Some(json!(now + 120)))
            .expect("exp claim");
        let mut header = josekit::jws::JwsHeader::new();
        header.set_token_type("JWT");
        header.set_key_id("rp-jwt-key-1");
        let signer = josekit::jws::ES256
            .signer_from_jwk(&self.jwt_private)
            .unwrap();
        josekit::jwt::encode_with_signer(&payload, &header, &signer).unwrap()
    }

    /// Signs `student` in through a browser for `client_id` and exchanges the code.
    pub async fn tokens_for(&self, client_id: &str, student: &Student, level: Level) -> Tokens {
        let browser = self.browser();
        self.tokens_with(&browser, Authz::new(client_id), student, level)
            .await
    }

    /// Signs in (or uses the browser's session) for `authz` and exchanges the code.
    pub async fn tokens_with(
        &self,
        browser: &Browser,
        authz: Authz,
        student: &Student,
        level: Level,
    ) -> Tokens {
        let reply = browser
            .sign_in(&authz.url(&self.issuer), student, level)
            .await;
        let code = reply.code();
        self.exchange(&authz, &code).await
    }

    /// Redeems `code` for the client and verifier of `authz`; panics unless it succeeds.
    pub async fn exchange(&self, authz: &Authz, code: &str) -> Tokens {
        let reply = self.redeem(authz, code).await;
        assert_eq!(reply.status, StatusCode::OK, "code exchange: {reply:?}");
        Tokens::from(reply.json())
    }

    /// Redeems `code` and returns whatever the token endpoint says.
    pub async fn redeem(&self, authz: &Authz, code: &str) -> Reply {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            (
                "redirect_uri",
                authz.get("redirect_uri").unwrap_or(REDIRECT_URI),
            ),
        ];
        if let Some(verifier) = &authz.verifier {
            form.push(("code_verifier", verifier));
        }
        self.token(&self.auth(authz.client_id()), &form).await
    }

    pub async fn refresh(&self, client_id: &str, refresh_token: &str) -> Reply {
        self.token(
            &self.auth(client_id),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ],
        )
        .await
    }

    /// Introspects `token` as `rp-basic`.
    pub async fn introspect(&self, token: &str) -> Value {
        let reply = self.introspect_as(&self.auth("rp-basic"), token).await;
        assert_eq!(reply.status, StatusCode::OK, "introspection: {reply:?}");
        reply.json()
    }

    pub async fn introspect_as(&self, auth: &Auth, token: &str) -> Reply {
        let request = auth.apply(
            self,
            self.http.post(self.url("/introspect")),
            &[("token", token)],
        );
        Reply::from(request.send().await.expect("introspection request"), None).await
    }

    pub async fn revoke(&self, auth: &Auth, token: &str) -> Reply {
        let request = auth.apply(
            self,
            self.http.post(self.url("/revoke")),
            &[("token", token)],
        );
        Reply::from(request.send().await.expect("revocation request"), None).await
    }

    /// GET /userinfo with the token in the Authorization header.
    pub async fn userinfo(&self, access_token: &str) -> Reply {
        let response = self
            .http
            .get(self.url("/userinfo"))
            .bearer_auth(access_token)
            .send()
            .await
            .expect("userinfo request");
        Reply::from(response, None).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        Reply::from(response, Some(&self.issuer)).await
    }

    /// Runs `sql` directly against the server's database (for state the Store trait does not expose).
    pub async fn execute(&self, sql: &str, binds: &[Bind]) {
        self.db.execute(sql, binds).await;
    }
}

/// How a request authenticates its client.
#[derive(Clone, Debug)]
pub enum Auth {
    /// `client_secret_basic`, with both parts form-urlencoded before base64 (RFC 6749 §2.3.1).
    Basic(String, String),
    /// `client_secret_post`.
    Post(String, String),
    /// `private_key_jwt` with a fresh assertion (random `jti`) signed by `rp-jwt`'s key.
    Jwt(String),
    /// `private_key_jwt` with the given assertion.
    Assertion(String, String),
    /// Only `client_id` in the body (public clients).
    None(String),
    /// Nothing at all.
    Nothing,
}

pub fn form_encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

impl Auth {
    pub fn apply(
        &self,
        app: &TestApp,
        request: reqwest::RequestBuilder,
        form: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        let mut form: Vec<(String, String)> = form
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut request = request;
        match self {
            Auth::Basic(id, secret) => {
                let credentials = format!("{}:{}", form_encode(id), form_encode(secret));
                request = request.header(
                    AUTHORIZATION,
                    format!("Basic {}", STANDARD.encode(credentials)),
                );
            }
            Auth::Post(id, secret) => {
                form.push(("client_id".into(), id.clone()));
                form.push(("client_secret".into(), secret.clone()));
            }
            Auth::Jwt(id) => {
                form.push(("client_id".into(), id.clone()));
                form.push((
                    "client_assertion_type".into(),
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push((
                    "client_assertion".into(),
                    app.client_assertion(&random_id()),
                ));
            }
            Auth::Assertion(id, assertion) => {
                form.push(("client_id".into(), id.clone()));
                form.push((
                    "client_assertion_type".into(),
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion".into(), assertion.clone()));
            }
            Auth::None(id) => form.push(("client_id".into(), id.clone())),
            Auth::Nothing => {}
        }
        request.form(&form)
    }
}

/// An HTTP answer as a relying party or a browser sees it.
#[derive(Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// `Location`, made absolute against the issuer for relative values.
    pub location: Option<String>,
    pub body: String,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body: String = self.body.chars().take(3000).collect();
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("location", &self.location)
            .field("headers", &self.headers)
            .field("body", &body)
            .finish()
    }
}

impl Reply {
    pub async fn from(response: reqwest::Response, base: Option<&str>) -> Reply {
        let status = response.status();
        let headers = response.headers().clone();
        let location = headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|l| match (l.starts_with('/'), base) {
                (true, Some(base)) => format!("{base}{l}"),
                _ => l.to_string(),
            });
        let body = response.text().await.unwrap_or_default();
        Reply {
            status,
            headers,
            location,
            body,
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `error` member of an RFC 6749 JSON error.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The redirect target parsed as a URL.
    pub fn location_url(&self) -> Url {
        let location = self
            .location
            .as_deref()
            .unwrap_or_else(|| panic!("no Location: {self:?}"));
        Url::parse(location).unwrap_or_else(|e| panic!("bad Location {location}: {e}"))
    }

    /// A 303 to the test relying party's redirect URI; its query parameters.
    pub fn callback(&self) -> HashMap<String, String> {
        assert_eq!(
            self.status,
            StatusCode::SEE_OTHER,
            "expected a 303 to the client: {self:?}"
        );
        let url = self.location_url();
        let without_query = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port().map(|p| format!(":{p}")).unwrap_or_default()
        ) + url.path();
        assert_eq!(
            without_query, REDIRECT_URI,
            "expected a redirect to the client: {self:?}"
        );
        url.query_pairs().into_owned().collect()
    }

    /// The `code` of a successful authorization response.
    pub fn code(&self) -> String {
        let params = self.callback();
        params
            .get("code")
            .cloned()
            .unwrap_or_else(|| panic!("no code in the authorization response: {params:?}"))
    }

    pub fn is_redirect_to(&self, path: &str) -> bool {
        self.status == StatusCode::SEE_OTHER
            && self
                .location
                .as_deref()
                .and_then(|l| Url::parse(l).ok())
                .is_some_and(|u| u.path() == path)
    }

    /// The page is the login form (user ID, password, second password).
    pub fn is_login_page(&self) -> bool {
        self.status == StatusCode::OK
            && html::forms(&self.body).iter().any(|f| {
                f.action == "/login" && f.has("username") && f.has("password") && f.has("csrf")
            })
    }

    /// The page is the step-up form (second password only).
    pub fn is_step_up_page(&self) -> bool {
        self.status == StatusCode::OK
            && html::forms(&self.body).iter().any(|f| {
                f.action == "/login/step-up" && f.has("second_password") && !f.has("password")
            })
    }

    /// An error page: HTML, no redirect.
    pub fn is_error_page(&self, status: StatusCode) -> bool {
        self.status == status
            && self.location.is_none()
            && self
                .header("content-type")
                .is_some_and(|c| c.starts_with("text/html"))
    }
}

/// Access, refresh and ID token of a token response.
#[derive(Clone, Debug)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub id_token: Option<String>,
    pub body: Value,
}

impl From<Value> for Tokens {
    fn from(body: Value) -> Tokens {
        let text = |name: &str| body[name].as_str().map(str::to_string);
        Tokens {
            access_token: text("access_token").expect("access_token in the token response"),
            refresh_token: text("refresh_token"),
            id_token: text("id_token"),
            body,
        }
    }
}

impl Tokens {
    pub fn refresh(&self) -> &str {
        self.refresh_token.as_deref().expect("a refresh token")
    }
    pub fn id(&self) -> &str {
        self.id_token.as_deref().expect("an ID token")
    }
    /// The ID token's payload, not verified (see `rp` for verified tokens).
    pub fn id_claims(&self) -> Value {
        jwt_payload(self.id())
    }
}

pub fn jwt_part(jwt: &str, index: usize) -> Value {
    let part = jwt.split('.').nth(index).expect("a JWT part");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

pub fn jwt_payload(jwt: &str) -> Value {
    jwt_part(jwt, 1)
}

pub fn jwt_header(jwt: &str) -> Value {
    jwt_part(jwt, 0)
}

pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// How much the student types on the login page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// University ID and password; the second password field left empty.
    Password,
    /// All three fields.
    SecondPassword,
}

/// A hand-built authorization request.
#[derive(Clone, Debug)]
pub struct Authz {
    pub params: Vec<(String, String)>,
    pub verifier: Option<String>,
}

impl Authz {
    /// `response_type=code`, the test redirect URI, `openid profile email student`, random
    /// `state` and `nonce`, PKCE S256.
    pub fn new(client_id: &str) -> Authz {
        let verifier = format!("{}{}", random_token(), random_token());
        let scope = if client_id == "rp-public" {
            "openid profile email"
        } else {
            "openid profile email student"
        };
        let params = [
            ("response_type", "code"),
            ("client_id", client_id),
            ("redirect_uri", REDIRECT_URI),
            ("scope", scope),
            ("state", &random_id()),
            ("nonce", &random_id()),
            ("code_challenge", &pkce_challenge(&verifier)),
            ("code_challenge_method", "S256"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Authz {
            params,
            verifier: Some(verifier),
        }
    }

    /// Sets (or replaces) a parameter.
    pub fn set(mut self, name: &str, value: &str) -> Authz {
        self.params.retain(|(k, _)| k != name);
        self.params.push((name.into(), value.into()));
        self
    }

    /// Adds a parameter even if it is already there (for duplicate-parameter tests).
    pub fn add(mut self, name: &str, value: &str) -> Authz {
        self.params.push((name.into(), value.into()));
        self
    }

    pub fn remove(mut self, name: &str) -> Authz {
        self.params.retain(|(k, _)| k != name);
        self
    }

    /// Without PKCE (no challenge sent, no verifier kept).
    pub fn without_pkce(self) -> Authz {
        let mut authz = self
            .remove("code_challenge")
            .remove("code_challenge_method");
        authz.verifier = None;
        authz
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn client_id(&self) -> &str {
        self.get("client_id").unwrap_or_default()
    }

    pub fn state(&self) -> &str {
        self.get("state").unwrap_or_default()
    }

    pub fn query(&self) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&self.params)
            .finish()
    }

    pub fn url(&self, issuer: &str) -> String {
        format!("{issuer}/authorize?{}", self.query())
    }
}

/// A browser: its own cookie jar, follows no redirects by itself.
pub struct Browser {
    issuer: String,
    http: reqwest::Client,
    jar: Mutex<BTreeMap<String, String>>,
}

impl Browser {
    pub fn new(issuer: &str) -> Browser {
        Browser {
            issuer: issuer.to_string(),
            http: no_redirect_client(),
            jar: Mutex::new(BTreeMap::new()),
        }
    }

    fn absolute(&self, url: &str) -> String {
        if url.starts_with('/') {
            format!("{}{url}", self.issuer)
        } else {
            url.to_string()
        }
    }

    pub fn cookie(&self, name: &str) -> Option<String> {
        self.jar.lock().unwrap().get(name).cloned()
    }

    pub fn set_cookie(&self, name: &str, value: &str) {
        self.jar
            .lock()
            .unwrap()
            .insert(name.to_string(), value.to_string());
    }

    pub fn remove_cookie(&self, name: &str) {
        self.jar.lock().unwrap().remove(name);
    }

    pub fn has_session(&self) -> bool {
        self.cookie("nidan_session").is_some()
    }

    /// Sends a request with the jar's cookies and stores the cookies the answer sets.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let cookies = {
            let jar = self.jar.lock().unwrap();
            jar.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let request = if cookies.is_empty() {
            request
        } else {
            request.header(COOKIE, cookies)
        };
        let response = request.send().await.expect("browser request");
        for value in response.headers().get_all(SET_COOKIE) {
            let value = value.to_str().unwrap_or_default();
            let (pair, attributes) = value.split_once(';').unwrap_or((value, ""));
            let Some((name, cookie)) = pair.trim().split_once('=') else {
                continue;
            };
            let expired = attributes
                .split(';')
                .any(|a| a.trim().eq_ignore_ascii_case("max-age=0"));
            let mut jar = self.jar.lock().unwrap();
            if expired || cookie.is_empty() {
                jar.remove(name);
            } else {
                jar.insert(name.to_string(), cookie.to_string());
            }
        }
        Reply::from(response, Some(&self.issuer)).await
    }

    pub async fn get(&self, url: &str) -> Reply {
        self.send(self.http.get(self.absolute(url))).await
    }

    pub async fn post(&self, url: &str, form: &[(&str, &str)]) -> Reply {
        self.send(self.http.post(self.absolute(url)).form(form))
            .await
    }

    /// Follows 303s inside nidan (never to the relying party) until a page or a client redirect.
    pub async fn follow(&self, mut reply: Reply) -> Reply {
        for _ in 0..5 {
            let inside = reply.status.is_redirection()
                && reply
                    .location
                    .as_deref()
                    .is_some_and(|l| l.starts_with(&self.issuer));
            if !inside {
                return reply;
            }
            let location = reply.location.clone().unwrap();
            reply = self.get(&location).await;
        }
        reply
    }

    /// Opens an authorization URL and follows nidan's own redirects (to the login page, say).
    pub async fn open(&self, url: &str) -> Reply {
        let reply = self.get(url).await;
        self.follow(reply).await
    }

    /// Fills in and submits the login form on `page`.
    pub async fn submit_login(
        &self,
        page: &Reply,
        username: &str,
        password: &str,
        second_password: &str,
    ) -> Reply {
        assert!(page.is_login_page(), "expected the login page: {page:?}");
        let form = html::forms(&page.body)
            .into_iter()
            .find(|f| f.action == "/login")
            .unwrap();
        let mut fields: Vec<(String, String)> = form
            .inputs
            .iter()
            .filter(|(name, _)| {
                !matches!(name.as_str(), "username" | "password" | "second_password")
            })
            .cloned()
            .collect();
        fields.push(("username".into(), username.into()));
        fields.push(("password".into(), password.into()));
        fields.push(("second_password".into(), second_password.into()));
        let fields: Vec<(&str, &str)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.post("/login", &fields).await
    }

    /// Fills in and submits the step-up form on `page`.
    pub async fn submit_step_up(&self, page: &Reply, second_password: &str) -> Reply {
        assert!(
            page.is_step_up_page(),
            "expected the step-up page: {page:?}"
        );
        let form = html::forms(&page.body)
            .into_iter()
            .find(|f| f.action == "/login/step-up")
            .unwrap();
        let mut fields: Vec<(String, String)> = form
            .inputs
            .iter()
            .filter(|(name, _)| name != "second_password")
            .cloned()
            .collect();
        fields.push(("second_password".into(), second_password.into()));
        let fields: Vec<(&str, &str)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.post("/login/step-up", &fields).await
    }

    /// Opens `authorize_url`, expects the login page, signs `student` in at `level` and returns
    /// nidan's answer to the login form (a 303 to the client on success).
    pub async fn sign_in(&self, authorize_url: &str, student: &Student, level: Level) -> Reply {
        let page = self.open(authorize_url).await;
        let second = match level {
            Level::Password => "",
            Level::SecondPassword => student.second_password.expect("an enrolled student"),
        };
        self.submit_login(&page, student.username, student.password, second)
            .await
    }
}

/// A raw connection to the server's database.
enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// A value bound to a raw SQL statement.
pub enum Bind {
    Text(String),
    Int(i64),
}

impl From<&str> for Bind {
    fn from(v: &str) -> Bind {
        Bind::Text(v.to_string())
    }
}
impl From<String> for Bind {
    fn from(v: String) -> Bind {
        Bind::Text(v)
    }
}
impl From<i64> for Bind {
    fn from(v: i64) -> Bind {
        Bind::Int(v)
    }
}

impl Db {
    async fn connect(url: &str) -> Db {
        if url.starts_with("sqlite:") {
            Db::Sqlite(sqlx::SqlitePool::connect(url).await.expect("sqlite"))
        } else {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(url)
                .await
                .expect("postgres");
            Db::Postgres(pool)
        }
    }

    async fn execute(&self, sql: &str, binds: &[Bind]) {
        match self {
            Db::Sqlite(pool) => {
                let mut query = sqlx::query(sql);
                for bind in binds {
                    query = match bind {
                        Bind::Text(v) => query.bind(v.clone()),
                        Bind::Int(v) => query.bind(*v),
                    };
                }
                query.execute(pool).await.expect("raw SQL");
            }
            Db::Postgres(pool) => {
                let mut query = sqlx::query(sql);
                for bind in binds {
                    query = match bind {
                        Bind::Text(v) => query.bind(v.clone()),
                        Bind::Int(v) => query.bind(*v),
                    };
                }
                query.execute(pool).await.expect("raw SQL");
            }
        }
    }
}

/// The PostgreSQL server the tests use; override with `NIDAN_TEST_PG_URL`.
pub fn pg_admin_url() -> String {
    std::env::var("NIDAN_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database of its own for one test, dropped (best effort) when the guard goes.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        let admin_url = pg_admin_url();
        let name = format!("nidan_t_{}", random_id());
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL at {admin_url} is needed (set NIDAN_TEST_PG_URL): {e}")
            });
        let mut attempts = 0;
        loop {
            match sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&admin)
                .await
            {
                Ok(_) => break,
                Err(e) if attempts < 5 => {
                    attempts += 1;
                    eprintln!("CREATE DATABASE {name} failed ({e}); retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => panic!("CREATE DATABASE {name}: {e}"),
            }
        }
        admin.close().await;
        let mut url = Url::parse(&admin_url).expect("NIDAN_TEST_PG_URL is a URL");
        url.set_path(&format!("/{name}"));
        PgDatabase {
            name,
            url: url.to_string(),
            admin_url,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime: use a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let admin = sqlx::PgPool::connect(&admin_url).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&admin)
                    .await
                    .ok()?;
                admin.close().await;
                Some(())
            })
        })
        .join();
    }
}

/// A bare store (no server) on `backend`, with the guard that owns its files or database.
pub async fn bare_store(backend: Backend) -> (DynStore, StoreGuard) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("store.db").display());
            let store = nidan::store::connect(&url).await.expect("sqlite store");
            (store, StoreGuard::Dir(dir))
        }
        Backend::Postgres => {
            let db = PgDatabase::create().await;
            let store = nidan::store::connect(&db.url)
                .await
                .expect("postgres store");
            (store, StoreGuard::Pg(db))
        }
    }
}

pub enum StoreGuard {
    Dir(tempfile::TempDir),
    Pg(PgDatabase),
}
