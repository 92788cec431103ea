//! A relying party's back-channel logout endpoint: records every POST it receives and answers
//! with the status the test chooses (failing the first few requests, if asked).
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use tokio::sync::{mpsc, Mutex};

/// One request as the relying party saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<String>,
    /// The `logout_token` form field.
    pub logout_token: Option<String>,
}

#[derive(Clone)]
struct Shared {
    tx: mpsc::UnboundedSender<Delivery>,
    fail_first: Arc<AtomicUsize>,
    delay: Duration,
}

pub struct LogoutReceiver {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    rx: Mutex<mpsc::UnboundedReceiver<Delivery>>,
}

async fn receive(
    State(shared): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let logout_token = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "logout_token")
        .map(|(_, v)| v.into_owned());
    let _ = shared.tx.send(Delivery {
        path: uri.path().to_string(),
        query: uri.query().map(str::to_string),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        logout_token,
    });
    tokio::time::sleep(shared.delay).await;
    let failing = shared
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}

impl LogoutReceiver {
    /// Starts listening on a free port; the first `fail_first` requests get a 500.
    pub async fn start(fail_first: usize) -> LogoutReceiver {
        Self::start_with(fail_first, Duration::ZERO).await
    }

    /// Starts a receiver that answers each request only after `delay`.
    pub async fn slow(delay: Duration) -> LogoutReceiver {
        Self::start_with(0, delay).await
    }

    async fn start_with(fail_first: usize, delay: Duration) -> LogoutReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Shared {
            tx,
            fail_first: Arc::new(AtomicUsize::new(fail_first)),
            delay,
        };
        let app = axum::Router::new().fallback(receive).with_state(shared);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        LogoutReceiver {
            base,
            rx: Mutex::new(rx),
        }
    }

    /// A delivery that has already arrived, if any.
    pub async fn received(&self) -> Option<Delivery> {
        self.rx.lock().await.try_recv().ok()
    }

    /// Waits up to `seconds` for the next delivery.
    pub async fn next(&self, seconds: u64) -> Option<Delivery> {
        let mut rx = self.rx.lock().await;
        tokio::time::timeout(Duration::from_secs(seconds), rx.recv())
            .await
            .ok()
            .flatten()
    }
}
