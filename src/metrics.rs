//! Prometheus metrics: requests by route and status with latency histograms, logins by outcome
//! and level, step-ups, tokens by grant, directory latency and errors, argon2 queue depth,
//! outbox depth and failures, lockouts.
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::app::AppState;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("duration_seconds".into()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            )
            .expect("valid buckets")
            .install_recorder()
            .expect("one metrics recorder per process")
    })
}

/// Histograms keep their samples until upkeep folds them in; without it memory grows with traffic.
pub fn spawn_upkeep() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        tokio::spawn(async {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tick.tick().await;
                handle().run_upkeep();
            }
        });
    });
}

/// The request counter and latency histogram of one route, registered once: building label sets
/// and looking them up in the recorder on every request would cost more than serving JWKS.
struct RouteMetrics {
    route: String,
    duration: metrics::Histogram,
    counts: RwLock<HashMap<(Method, u16), metrics::Counter>>,
}

/// `map[key]`, made by `make` under the write lock the first time (the read lock otherwise).
fn get_or_insert<K, Q, V>(map: &RwLock<HashMap<K, V>>, key: &Q, make: impl FnOnce() -> (K, V)) -> V
where
    K: Borrow<Q> + Hash + Eq,
    Q: Hash + Eq + ?Sized,
    V: Clone,
{
    if let Some(found) = map.read().unwrap_or_else(|e| e.into_inner()).get(key) {
        return found.clone();
    }
    let mut map = map.write().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = map.get(key) {
        return found.clone();
    }
    let (key, value) = make();
    map.insert(key, value.clone());
    value
}

fn route_metrics(route: &str) -> Arc<RouteMetrics> {
    static ROUTES: OnceLock<RwLock<HashMap<String, Arc<RouteMetrics>>>> = OnceLock::new();
    get_or_insert(ROUTES.get_or_init(Default::default), route, || {
        let metrics = RouteMetrics {
            route: route.to_string(),
            duration: metrics::histogram!(
                "nidan_http_request_duration_seconds",
                "route" => route.to_string()
            ),
            counts: Default::default(),
        };
        (route.to_string(), Arc::new(metrics))
    })
}

impl RouteMetrics {
    fn count(&self, method: &Method, status: StatusCode) {
        let key = (method.clone(), status.as_u16());
        get_or_insert(&self.counts, &key, || {
            let counter = metrics::counter!(
                "nidan_http_requests_total",
                "route" => self.route.clone(),
                "method" => method.to_string(),
                "status" => status.as_u16().to_string()
            );
            (key.clone(), counter)
        })
        .increment(1);
    }
}

pub async fn track_requests(request: Request, next: Next) -> Response {
    let route = match request.extensions().get::<MatchedPath>() {
        Some(path) => route_metrics(path.as_str()),
        None => route_metrics("unmatched"),
    };
    let method = request.method().clone();
    let start = Instant::now();
    let response = next.run(request).await;
    route.duration.record(start.elapsed().as_secs_f64());
    route.count(&method, response.status());
    response
}

pub fn login(outcome: &'static str, level: &'static str) {
    metrics::counter!("nidan_logins_total", "outcome" => outcome, "level" => level).increment(1);
}

pub fn step_up(outcome: &'static str) {
    metrics::counter!("nidan_step_ups_total", "outcome" => outcome).increment(1);
}

pub fn token_issued(grant: &'static str) {
    metrics::counter!("nidan_tokens_issued_total", "grant" => grant).increment(1);
}

pub fn lockout(kind: &'static str) {
    metrics::counter!("nidan_lockouts_total", "kind" => kind).increment(1);
}

pub fn directory(outcome: &'static str, seconds: f64) {
    metrics::counter!("nidan_directory_requests_total", "outcome" => outcome).increment(1);
    metrics::histogram!("nidan_directory_duration_seconds").record(seconds);
}

pub fn delivery(kind: &str, outcome: &'static str) {
    metrics::counter!("nidan_outbox_deliveries_total", "kind" => kind.to_string(), "outcome" => outcome).increment(1);
}

/// `/metrics`: gauges sampled at scrape time, then the recorder's text. Optionally limited to
/// `metrics_allow` addresses and a bearer token from `metrics_token_file`.
pub async fn render(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
) -> Response {
    let allowed = &state.config.metrics_allow;
    if !allowed.is_empty() && !allowed.iter().any(|net| net.contains(&peer.ip())) {
        return axum::http::StatusCode::FORBIDDEN.into_response();
    }
    if let Some(token) = &state.config.metrics_token {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !crate::crypto::constant_time_eq(presented.as_bytes(), token.expose().as_bytes()) {
            let mut response = axum::http::StatusCode::UNAUTHORIZED.into_response();
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"nidan metrics\""),
            );
            return response;
        }
    }
    metrics::gauge!("nidan_argon2_queue_depth").set(state.hasher.queue_depth() as f64);
    if let Ok(depth) = state.store.pending_jobs().await {
        metrics::gauge!("nidan_outbox_depth").set(depth as f64);
    }
    metrics::gauge!("nidan_store_up").set(if state.store.ping().await.is_ok() {
        1.0
    } else {
        0.0
    });
    let directory_up = state.directory.check().await.is_ok();
    metrics::gauge!("nidan_directory_up").set(if directory_up { 1.0 } else { 0.0 });
    let mut response = handle().render().into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
