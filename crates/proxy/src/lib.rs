//! The proxy service: a stateless gateway that accepts database clients over TLS with
//! client certificates and routes each connection by the identity inside the cert.
//!
//! Built so far:
//! - [`route`]: the sans-IO choice of which agent to try for a connection;
//! - [`client_auth`]: the TLS server configuration for database clients, which requires a
//!   client certificate and defers every trust decision to `postern_pki::Validator`;
//! - [`postgres`]: the PostgreSQL front door: start-up negotiation, TLS, identity, and
//!   refusals in PostgreSQL's own protocol.
//!
//! - [`dispatch`]: from a validated session to an agent over its tunnel, with failover.

pub mod client_auth;
pub mod dispatch;
pub mod postgres;
pub mod route;
