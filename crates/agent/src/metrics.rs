//! The agent's Prometheus metrics. Updated per session and per chunk of bytes (atomic
//! adds), never per protocol message; registered with [`AgentMetrics::register`].

use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::session::SessionError;

/// Label set with one `reason` or `direction` label.
pub type Labels = Vec<(String, String)>;

/// Every metric the agent exports. Cheap to clone (handles share their values).
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    /// Session channels being served now (handshake or relay).
    pub active_sessions: Gauge,
    /// Channels whose handshake started (TLS, identity, start-up, access, upstream).
    pub handshakes: Counter,
    /// Handshakes that failed, by reason.
    pub handshake_failures: Family<Labels, Counter>,
    /// Bytes through the agent's client side, by direction (`from_client`, `to_client`).
    pub bytes_relayed: Family<Labels, Counter>,
    /// Proxies with a tunnel up.
    pub tunnels_connected: Gauge,
    /// Bytes of audit events on disk not yet acknowledged by the auth service.
    pub audit_spool_bytes: Gauge,
}

impl AgentMetrics {
    /// Registers every metric under the `postern_agent` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("postern_agent");
        registry.register(
            "active_sessions",
            "Session channels being served now (handshake or relay)",
            self.active_sessions.clone(),
        );
        registry.register(
            "handshakes",
            "Session handshakes started (TLS, identity, start-up, access, upstream)",
            self.handshakes.clone(),
        );
        registry.register(
            "handshake_failures",
            "Session handshakes that failed, by reason",
            self.handshake_failures.clone(),
        );
        registry.register(
            "bytes_relayed",
            "Bytes relayed on the client side of sessions, by direction",
            self.bytes_relayed.clone(),
        );
        registry.register(
            "tunnels_connected",
            "Proxies this agent holds a reverse tunnel to",
            self.tunnels_connected.clone(),
        );
        registry.register(
            "audit_spool_bytes",
            "Bytes of audit events spooled on disk, not yet acknowledged by the auth service",
            self.audit_spool_bytes.clone(),
        );
    }

    /// Counts one failed handshake under its reason.
    pub fn handshake_failed(&self, error: &SessionError) {
        self.handshake_failures
            .get_or_create(&vec![(
                "reason".to_owned(),
                failure_reason(error).to_owned(),
            )])
            .inc();
    }

    fn bytes(&self, direction: &str) -> Counter {
        self.bytes_relayed
            .get_or_create(&vec![("direction".to_owned(), direction.to_owned())])
            .clone()
    }
}

/// A short, stable label for why a session did not open.
pub fn failure_reason(error: &SessionError) -> &'static str {
    match error {
        SessionError::HandshakeTimeout { .. } => "handshake_timeout",
        SessionError::Handshake { .. } => "tls",
        SessionError::Identity(_) => "identity",
        SessionError::StartupTimeout { .. }
        | SessionError::Startup(_)
        | SessionError::NotStartup { .. }
        | SessionError::StartupClosed => "startup",
        SessionError::Io(_) => "io",
        SessionError::WrongDatabase { .. }
        | SessionError::WrongProtocol { .. }
        | SessionError::NotServed { .. } => "route",
        SessionError::Roles(_) => "roles_unavailable",
        SessionError::Denied(_) => "access_denied",
        SessionError::Credential { .. } => "credential",
        SessionError::Upstream(_) => "upstream",
        SessionError::AuditUnavailable => "audit_unavailable",
        SessionError::AuditFull(_) => "audit_spool_full",
    }
}

/// A byte stream that counts what passes through it into two counters.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    read: Counter,
    written: Counter,
}

impl<S> Counted<S> {
    /// Counts bytes read from `inner` as `from_client` and written as `to_client`.
    pub fn client_side(inner: S, metrics: &AgentMetrics) -> Self {
        Self {
            inner,
            read: metrics.bytes("from_client"),
            written: metrics.bytes("to_client"),
        }
    }
}

fn add(counter: &Counter, n: usize) {
    counter.inc_by(n as u64);
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        add(&self.read, n);
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            add(&self.written, *n);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Keeps `active_sessions` right even when a session task is aborted.
#[derive(Debug)]
pub(crate) struct ActiveGuard(pub(crate) Gauge);

impl ActiveGuard {
    pub(crate) fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
