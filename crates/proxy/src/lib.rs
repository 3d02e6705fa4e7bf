//! The proxy service: a stateless gateway that accepts database clients over TLS with
//! client certificates and routes each connection by the identity inside the cert.
//!
//! Start with [`service::ProxyService`], the whole proxy as one runnable service:
//!
//! ```text
//! let mut proxy = ProxyService::new(&runtime, config, signer)?;
//! proxy.register_metrics(&mut registry);
//! proxy.run(shutdown).await?;
//! ```
//!
//! Its parts:
//! - [`route`]: the sans-IO choice of which agent to try for a connection;
//! - [`client_auth`]: the TLS server configuration for database clients, which requires a
//!   client certificate and defers every trust decision to `postern_pki::Validator`;
//! - [`postgres`]: the PostgreSQL front door: start-up negotiation, TLS (or TLS already
//!   terminated by the web port's ALPN routing), identity, and refusals in PostgreSQL's
//!   own protocol;
//! - [`dispatch`]: from a validated session to an agent over its tunnel, with failover,
//!   learning the session's cancel key from the agent's start-up answer;
//! - [`cancel`]: the sans-IO table of running sessions by cancel key, so a CancelRequest
//!   on a new connection reaches the agent of the session it names;
//! - [`service`]: listeners (PostgreSQL, web with TLS routing, tunnel), per-user limits,
//!   metrics, graceful drain;
//! - [`start`]: the service's configuration from the auth server, once the proxy holds
//!   its host certificate (`postern start` and the simulator both start proxies so).

pub mod cancel;
pub mod client_auth;
pub mod dispatch;
pub mod limits;
pub mod postgres;
pub mod route;
pub mod service;
pub mod start;
mod sync;

pub use service::{Listen, LocalAddrs, ProxyError, ProxyLimits, ProxyService, ProxyServiceConfig};
