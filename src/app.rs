//! Application state, the router and its middleware, and starting the server.
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use minijinja::{context, Value as Ctx};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::auth::csrf::Browser;
use crate::auth::passwords::PasswordHasher;
use crate::clock::{Clock, Timestamp};
use crate::config::{ClientSettings, Config};
use crate::directory::UserDirectory;
use crate::error::PageError;
use crate::keys::{Kek, KeySet, SharedKeys};
use crate::oidc;
use crate::store::{ClientRow, DynStore};
use crate::ui::{Branding, Locale, Ui};

/// Secrets derived from the key-encryption key, identical on every replica.
pub struct Secrets {
    pub csrf: Vec<u8>,
    pub client_secret: Vec<u8>,
    pub pairwise: Vec<u8>,
    /// Tags clients' own (client_credentials) access tokens.
    pub client_token: Vec<u8>,
}

pub struct Inner {
    pub config: Config,
    pub store: DynStore,
    pub clock: Arc<dyn Clock>,
    pub keys: SharedKeys,
    pub kek: Kek,
    pub secrets: Secrets,
    pub ui: Ui,
    pub directory: Arc<dyn UserDirectory>,
    pub hasher: Arc<PasswordHasher>,
    /// Pre-rendered discovery document.
    pub discovery: bytes::Bytes,
    /// scheme://host[:port] of the issuer, for `Origin` checks.
    pub origin: String,
    pub default_locale: Locale,
    /// Outgoing HTTP (client JWKS, back-channel logout, the demo relying party).
    pub http: reqwest::Client,
    pub demo: Option<crate::demo::DemoClient>,
    pub shutting_down: AtomicBool,
    /// Wakes this replica's outbox worker when a job is queued.
    pub outbox_wakeup: tokio::sync::Notify,
    pub audit: crate::audit::AuditLog,
    /// Client registrations, each kept for a second.
    pub clients: oidc::clients::ClientCache,
}

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn current_keys(&self) -> Arc<KeySet> {
        self.keys.read().expect("key lock poisoned").clone()
    }

    /// The page language: explicit `lang`, then `ui_locales`, then Accept-Language, then the default.
    pub fn locale_for(
        &self,
        headers: &HeaderMap,
        lang: Option<&str>,
        ui_locales: Option<&str>,
    ) -> Locale {
        let accept = headers
            .get(header::ACCEPT_LANGUAGE)
            .and_then(|v| v.to_str().ok());
        Locale::negotiate(lang, ui_locales, accept, self.default_locale)
    }

    /// Renders a page with the browser cookie set when new.
    pub fn page(
        &self,
        locale: Locale,
        template: &str,
        ctx: Ctx,
        browser: &Browser,
        headers: &HeaderMap,
    ) -> Result<Response, PageError> {
        self.page_with_status(StatusCode::OK, locale, template, ctx, browser, headers)
    }

    pub fn page_with_status(
        &self,
        status: StatusCode,
        locale: Locale,
        template: &str,
        ctx: Ctx,
        browser: &Browser,
        headers: &HeaderMap,
    ) -> Result<Response, PageError> {
        let base = context! {
            lang_switch_url => lang_switch_url(headers, locale),
            csrf => browser.csrf_token(self),
            menu => false,
        };
        let html = self
            .ui
            .render(template, locale, context! { ..ctx, ..base })
            .map_err(|e| PageError::internal(format!("template {template}: {e:#}")))?;
        let mut response = (status, axum::response::Html(html)).into_response();
        browser.set_cookie_if_new(self, response.headers_mut());
        Ok(response)
    }

    /// The client's address: the peer, or the nearest untrusted X-Forwarded-For hop when the
    /// peer is a trusted proxy.
    pub fn client_ip(&self, headers: &HeaderMap, peer: SocketAddr) -> std::net::IpAddr {
        let trusted =
            |ip: &std::net::IpAddr| self.config.trusted_proxies.iter().any(|n| n.contains(ip));
        let mut ip = peer.ip();
        if !trusted(&ip) {
            return ip;
        }
        let hops: Vec<std::net::IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|h| h.trim().parse().ok())
            .collect();
        for hop in hops.into_iter().rev() {
            ip = hop;
            if !trusted(&hop) {
                break;
            }
        }
        ip
    }

    /// A time as the students read it (Japan time, HH:MM).
    pub fn local_time(&self, t: Timestamp) -> String {
        let offset = time::UtcOffset::from_hms(9, 0, 0).expect("valid offset");
        time::OffsetDateTime::from_unix_timestamp(t)
            .map(|d| d.to_offset(offset))
            .ok()
            .and_then(|d| {
                d.format(time::macros::format_description!("[hour]:[minute]"))
                    .ok()
            })
            .unwrap_or_default()
    }

    /// Date and time as the students read it, for mails (Japan time).
    pub fn local_datetime(&self, t: Timestamp) -> String {
        let offset = time::UtcOffset::from_hms(9, 0, 0).expect("valid offset");
        time::OffsetDateTime::from_unix_timestamp(t)
            .map(|d| d.to_offset(offset))
            .ok()
            .and_then(|d| {
                d.format(time::macros::format_description!(
                    "[year]-[month]-[day] [hour]:[minute] JST"
                ))
                .ok()
            })
            .unwrap_or_default()
    }

    /// Records a security event; a failure is logged and does not fail the request.
    pub async fn audit(&self, event: crate::audit::Event<'_>) {
        let kind = event.kind.to_string();
        if let Err(e) = self
            .audit
            .record(&self.store, self.clock.now(), event)
            .await
        {
            tracing::error!(error = %e, kind = %kind, "cannot write the audit trail");
        }
    }

    /// Whether `/metrics` is served on the public listener (loopback issuer, no metrics_listen).
    pub fn public_metrics(&self) -> bool {
        self.config.metrics_listen.is_empty() && self.config.issuer_is_loopback()
    }

    pub fn replica_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Relaxed)
    }
}

/// The current path with `lang` switched to the other language, keeping the other parameters.
fn lang_switch_url(headers: &HeaderMap, locale: Locale) -> String {
    let uri = headers
        .get(ORIGINAL_URI)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("/login");
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let mut pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k != "lang")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    pairs.push(("lang".into(), locale.other().as_str().into()));
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("{path}?{query}")
}

/// A 303 See Other: after a POST the browser must switch to GET (never 307/308).
pub fn see_other(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

pub fn router(state: AppState) -> Router {
    let mut app = Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(oidc::discovery::discovery),
        )
        .route("/jwks", get(oidc::discovery::jwks))
        .route(
            "/authorize",
            get(oidc::authorize::authorize).post(oidc::authorize::authorize),
        )
        .route("/token", post(oidc::token::token))
        .route(
            "/userinfo",
            get(oidc::userinfo::userinfo).post(oidc::userinfo::userinfo),
        )
        .route("/introspect", post(oidc::introspect::introspect))
        .route("/revoke", post(oidc::introspect::revoke))
        .route(
            "/logout",
            get(oidc::logout::logout).post(oidc::logout::logout),
        )
        .route(
            "/login",
            get(crate::auth::login::login_page).post(crate::auth::login::login_submit),
        )
        .route(
            "/login/step-up",
            get(crate::auth::login::step_up_page).post(crate::auth::login::step_up_submit),
        )
        .route("/account", get(crate::auth::login::account_page))
        .route(
            "/account/email",
            get(crate::enroll::account::email_page).post(crate::enroll::account::email_submit),
        )
        .route(
            "/account/second-password",
            get(crate::enroll::account::second_password_page)
                .post(crate::enroll::account::second_password_submit),
        )
        .route(
            "/enroll/email",
            get(crate::enroll::email::page).post(crate::enroll::email::submit),
        )
        .route(
            "/enroll/second-password",
            get(crate::enroll::second_password::page).post(crate::enroll::second_password::submit),
        )
        .route(
            "/forgot",
            get(crate::enroll::account::forgot_page).post(crate::enroll::account::forgot_submit),
        )
        .route(
            "/link/{token}",
            get(crate::enroll::links::link_page).post(crate::enroll::links::link_submit),
        )
        .route("/manual", get(crate::enroll::account::manual))
        .route("/static/nidan.css", get(stylesheet))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if state.public_metrics() {
        app = app.route("/metrics", get(crate::metrics::render));
    }
    if state.demo.is_some() {
        app = app
            .route("/dev/mail", get(crate::enroll::account::dev_mail))
            .route("/demo", get(crate::demo::demo_page))
            .route("/demo/start", get(crate::demo::demo_start))
            .route("/demo/callback", get(crate::demo::demo_callback));
    }
    // One composed stack, applied to each route once (every `Router::layer` call would box each
    // route again). Outermost first. The body limit sits inside the page and header layer, so a
    // refused body still gets a page; metrics see the matched route ("unmatched" for 404s).
    let stack = tower::ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(crate::clock::RequestIds))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            pages_and_security_headers,
        ))
        .layer(middleware::from_fn(crate::metrics::track_requests))
        .layer(RequestBodyLimitLayer::new(64 * 1024));
    app.fallback(not_found).layer(stack).with_state(state)
}

/// The span every log line of a request carries: request id, method and a path that never
/// holds a secret (one-time link tokens are cut off, queries are left out).
fn request_span(request: &Request) -> tracing::Span {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let method = request.method();
    let path = request.uri().path();
    // An INFO span, formatted as it is created, would be a tenth of these answers' cost; at DEBUG
    // they get one.
    if answered_from_memory(path) {
        return tracing::debug_span!("request", request_id = %id, method = %method, path = %path);
    }
    let path = if path.starts_with("/link/") {
        "/link/…"
    } else {
        path
    };
    tracing::info_span!("request", request_id = %id, method = %method, path = %path)
}

async fn not_found() -> PageError {
    PageError::not_found()
}

async fn stylesheet(State(state): State<AppState>) -> Response {
    let css = state.ui.stylesheet().to_string();
    let mut response = css.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    response
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    let store_ok = state.store.ping().await.is_ok();
    let keys_ok = state.current_keys().has_signer("RS256");
    let directory_ok = state.directory.check().await.is_ok();
    let ready = store_ok && keys_ok && state.replica_ready();
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not ready" },
        "store": if store_ok { "ok" } else { "unavailable" },
        "keys": if keys_ok { "ok" } else { "missing" },
        "directory": if directory_ok { "ok" } else { "unavailable" },
        "shutting_down": !state.replica_ready(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// Discovery, JWKS and the health check: answered from memory, nothing logged at INFO.
fn answered_from_memory(path: &str) -> bool {
    path == "/jwks" || path == "/healthz" || path.starts_with("/.well-known/")
}

/// Paths that answer JSON or plain text and never render a page with a language switch.
fn is_api_path(path: &str) -> bool {
    answered_from_memory(path)
        || matches!(
            path,
            "/token"
                | "/userinfo"
                | "/introspect"
                | "/revoke"
                | "/readyz"
                | "/metrics"
                | "/static/nidan.css"
        )
}

/// The request headers an error page needs, copied before the request is handed on (a full copy
/// of every request's headers would cost every request for the rare error page).
fn page_headers(request: &Request) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for name in [header::ACCEPT_LANGUAGE, header::COOKIE, ORIGINAL_URI] {
        for value in request.headers().get_all(&name) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// Every response gets the security headers (HTML pages and redirects also CSP and no-store),
/// and a `PageError` left in a response becomes the localized error page.
async fn pages_and_security_headers(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    if is_api_path(request.uri().path()) {
        request.headers_mut().remove(ORIGINAL_URI);
    } else if let Ok(value) = HeaderValue::from_str(&request.uri().to_string()) {
        // Pages link to themselves in the other language.
        request.headers_mut().insert(ORIGINAL_URI, value);
    }
    let headers = page_headers(&request);
    let query_lang = request
        .uri()
        .query()
        .filter(|q| q.contains("lang"))
        .and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "lang"))
        .map(|(_, v)| v.into_owned());
    let is_get = request.method() == Method::GET;
    let response = next.run(request).await;
    let mut response = render_page_error(&state, response, &headers, query_lang, is_get);
    let out = response.headers_mut();
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    out.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    let is_html = out
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if is_html || response.status().is_redirection() {
        let out = response.headers_mut();
        out.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'self'; img-src 'self' https: data:; base-uri 'none'; frame-ancestors 'none'",
            ),
        );
        out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if state.config.is_https() {
        response.headers_mut().insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000; includeSubDomains"),
        );
    }
    response
}

/// The request URI as the client sent it, for the language switch of pages.
const ORIGINAL_URI: HeaderName = HeaderName::from_static("x-nidan-original-uri");

/// Turns a `PageError` left in a response into the localized error page.
fn render_page_error(
    state: &AppState,
    response: Response,
    headers: &HeaderMap,
    query_lang: Option<String>,
    is_get: bool,
) -> Response {
    let status = response.status();
    let error = match response.extensions().get::<PageError>() {
        Some(error) => error.clone(),
        // Bodies refused by the size limit or axum's extractors: a page, never internals.
        None if status == StatusCode::PAYLOAD_TOO_LARGE
            || status == StatusCode::METHOD_NOT_ALLOWED =>
        {
            PageError::bad_request(
                "error_invalid_request",
                if is_get { "" } else { "request refused" },
            )
        }
        None => return response,
    };
    let locale = error
        .locale
        .unwrap_or_else(|| state.locale_for(headers, query_lang.as_deref(), None));
    let browser = Browser::from_headers(state, headers);
    let ctx = context! {
        title_key => error.title_key,
        message_key => error.message_key,
        detail => error.detail.clone().filter(|d| !d.is_empty()),
        back_url => error.back_url.clone(),
    };
    match state.page_with_status(error.status, locale, "error.html", ctx, &browser, headers) {
        Ok(page) => page,
        Err(_) => (error.status, "error").into_response(),
    }
}

/// Options that tests change: the clock and the argon2 parameters.
pub struct Runtime {
    pub clock: Arc<dyn Clock>,
    pub argon2: argon2::Params,
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            clock: Arc::new(crate::clock::SystemClock),
            argon2: crate::auth::passwords::production_params(),
        }
    }
}

/// Loads (or, for the embedded default only, generates) the key-encryption key.
pub fn load_kek(config: &Config) -> anyhow::Result<Kek> {
    match &config.key_encryption_key {
        Some(secret) => Kek::parse(secret.expose()),
        None if config.embedded => {
            let kek = Kek::generate_file(&config.key_encryption_key_file)?;
            tracing::info!(path = %config.key_encryption_key_file.display(), "generated a development key-encryption key");
            Ok(kek)
        }
        None => bail!(
            "key_encryption_key_file {} is missing; it is generated only for the embedded default",
            config.key_encryption_key_file.display()
        ),
    }
}

pub fn derive_secrets(kek: &Kek) -> Secrets {
    Secrets {
        csrf: kek.derive("nidan csrf v1"),
        client_secret: kek.derive("nidan client secret v1"),
        pairwise: kek.derive("nidan pairwise subject v1"),
        client_token: kek.derive("nidan client access token v1"),
    }
}

/// Writes the configuration file's clients into the store and removes ones it no longer lists.
pub async fn sync_config_clients(
    store: &DynStore,
    config: &Config,
    secrets: &Secrets,
    now: Timestamp,
) -> anyhow::Result<()> {
    let existing = store.list_clients().await?;
    for client in &config.clients {
        let digest = match (&client.client_secret, &client.client_secret_hash) {
            (Some(secret), _) => Some(oidc::clients::secret_digest(
                &secrets.client_secret,
                secret.expose(),
            )),
            (None, Some(hash)) => Some(hash.clone()),
            (None, None) => None,
        };
        let mut settings = client.clone();
        settings.client_secret_hash = None;
        let created_at = existing
            .iter()
            .find(|c| c.client_id == client.client_id)
            .map_or(now, |c| c.created_at);
        store
            .put_client(&ClientRow {
                client_id: client.client_id.clone(),
                settings: serde_json::to_string(&settings)?,
                secret_digest: digest,
                source: "config".into(),
                created_at,
                updated_at: now,
            })
            .await?;
    }
    for row in existing.iter().filter(|r| r.source == "config") {
        if !config.clients.iter().any(|c| c.client_id == row.client_id) {
            store.delete_client(&row.client_id).await?;
        }
    }
    Ok(())
}

pub async fn build_state(config: Config, runtime: Runtime) -> anyhow::Result<AppState> {
    let clock = runtime.clock;
    crate::metrics::handle();
    crate::metrics::spawn_upkeep();
    let kek = load_kek(&config)?;
    let secrets = derive_secrets(&kek);
    let store = crate::store::connect(&config.database_url)
        .await
        .with_context(|| {
            format!(
                "cannot open the store at {}",
                redact_url(&config.database_url)
            )
        })?;
    let now = clock.now();
    sync_config_clients(&store, &config, &secrets, now).await?;
    crate::keys::ensure_keys(&store, &kek, now).await?;
    let keys: SharedKeys = Arc::new(std::sync::RwLock::new(Arc::new(
        KeySet::load(&store, &kek, now).await?,
    )));
    let hasher = PasswordHasher::new(runtime.argon2);
    let directory = crate::directory::build(&config.directory, hasher.clone()).await?;
    let demo = if config.development_pages() {
        Some(crate::demo::register(&store, &config, &secrets, now).await?)
    } else {
        None
    };
    let ui = Ui::new(Branding {
        university_name: config.university_name.clone(),
        accent_color: config.accent_color.clone(),
        logo_url: config.logo_url.clone(),
        support_contact: config.support_contact.clone(),
    })?;
    let discovery = serde_json::to_vec(&oidc::discovery::document(&config))?.into();
    let issuer = config.issuer_url();
    let origin = issuer.origin().ascii_serialization();
    let default_locale = Locale::parse(&config.default_locale).unwrap_or(Locale::Ja);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()?;
    Ok(AppState(Arc::new(Inner {
        config,
        store,
        clock,
        keys,
        kek,
        secrets,
        ui,
        directory,
        hasher,
        discovery,
        origin,
        default_locale,
        http,
        demo,
        shutting_down: AtomicBool::new(false),
        outbox_wakeup: tokio::sync::Notify::new(),
        audit: crate::audit::AuditLog::new(),
        clients: Default::default(),
    })))
}

fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Reloads keys every 30 seconds so a rotation through any replica reaches this one in time.
fn spawn_key_refresh(state: AppState) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = state.clock.now();
            match KeySet::load(&state.store, &state.kek, now).await {
                Ok(keys) => *state.keys.write().expect("key lock poisoned") = Arc::new(keys),
                Err(e) => tracing::warn!(error = %e, "cannot reload signing keys"),
            }
        }
    });
}

/// Every 5 minutes one replica (holding the lease) removes what has expired.
fn spawn_cleanup(state: AppState) {
    let owner = crate::clock::random_id();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(300));
        loop {
            tick.tick().await;
            if let Err(e) = cleanup_once(&state, &owner).await {
                tracing::warn!(error = %e, "clean-up failed");
            }
        }
    });
}

pub async fn cleanup_once(state: &AppState, owner: &str) -> anyhow::Result<Option<u64>> {
    let now = state.clock.now();
    if !state
        .store
        .try_lease("cleanup", owner, now + 600, now)
        .await?
    {
        return Ok(None);
    }
    let retention = state.config.audit_retention.as_secs() as i64;
    let report = state.store.cleanup(now, now - retention).await?;
    tracing::debug!(rows = report.rows, "clean-up done");
    Ok(Some(report.rows))
}

pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    /// Stops accepting connections and waits for in-flight requests.
    pub async fn stop(mut self) {
        self.state.shutting_down.store(true, Ordering::Relaxed);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

/// Serves on an already bound listener (tests bind port 0 first to learn the issuer).
pub async fn spawn(
    config: Config,
    runtime: Runtime,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<RunningServer> {
    let state = build_state(config, runtime).await?;
    let addr = listener.local_addr()?;
    spawn_key_refresh(state.clone());
    spawn_cleanup(state.clone());
    if !state.config.metrics_listen.is_empty() {
        let metrics_listener = tokio::net::TcpListener::bind(&state.config.metrics_listen)
            .await
            .with_context(|| format!("cannot listen on {}", state.config.metrics_listen))?;
        let metrics_app = Router::new()
            .route("/metrics", get(crate::metrics::render))
            .with_state(state.clone());
        tokio::spawn(async move {
            let service = metrics_app.into_make_service_with_connect_info::<SocketAddr>();
            let _ = axum::serve(metrics_listener, service).await;
        });
    }
    let transport = crate::mail::transport::Transport::from_config(&state.config.mail)?;
    crate::mail::worker::spawn(state.clone(), transport);
    let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "server stopped");
        }
    });
    Ok(RunningServer {
        addr,
        state,
        shutdown: Some(tx),
        task,
    })
}

/// `nidan serve`: binds `listen`, serves until SIGTERM or Ctrl-C, then finishes in-flight requests.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let embedded = config.embedded;
    let issuer = config.issuer.clone();
    let server = spawn(config, Runtime::default(), listener).await?;
    tracing::info!(issuer = %issuer, addr = %server.addr, "nidan is ready");
    if embedded {
        crate::demo::print_banner(&server.state);
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Settings for a client registered from the command line.
pub fn client_row(
    settings: &ClientSettings,
    secret_digest: Option<String>,
    source: &str,
    now: Timestamp,
) -> anyhow::Result<ClientRow> {
    Ok(ClientRow {
        client_id: settings.client_id.clone(),
        settings: serde_json::to_string(settings)?,
        secret_digest,
        source: source.into(),
        created_at: now,
        updated_at: now,
    })
}
