//! The `/metrics` endpoint: plain HTTP, Prometheus text format, over the registry that
//! the proxy and the agent register into. Served with axum on a listener from the
//! runtime seam.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// The content type Prometheus scrapes expect for the text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A listener from the runtime seam, for axum.
#[derive(Debug)]
struct SeamListener(postern_rt::Listener);

impl axum::serve::Listener for SeamListener {
    type Io = postern_rt::Connection;
    type Addr = Option<std::net::SocketAddr>;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(connection) => {
                    let addr = connection.peer_addr();
                    return (connection, addr);
                }
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(%error, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr().map(Some)
    }
}

async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode the metrics: {error}\n"),
        ),
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub(crate) async fn serve(
    listener: postern_rt::Listener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(registry);
    axum::serve(SeamListener(listener), app)
        .with_graceful_shutdown(shutdown)
        .await
}
