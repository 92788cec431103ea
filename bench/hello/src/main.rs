//! The smallest axum server: `GET /` answers "Hello, World!". Same runtime setup as nidan
//! (`#[tokio::main]`, multi-threaded, one worker per core).
//!
//!   nidan-bench-hello 127.0.0.1:PORT
use axum::routing::get;
use axum::Router;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8089".to_string());
    let app = Router::new().route("/", get(|| async { "Hello, World!" }));
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .expect("bind the listen address");
    println!("listening on {addr}");
    axum::serve(listener, app).await.expect("serve");
}
