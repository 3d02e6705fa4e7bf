//! The database service ("agent"): it sits next to the databases, dials out to every
//! proxy, authorizes each connection against roles, authenticates to the database with
//! a client certificate (self-hosted) or an IAM token (RDS/Aurora), relays the traffic
//! and turns it into audit events.
//!
//! Built so far:
//! - [`upstream`], the connection to the database itself: TLS always (verify-full by
//!   default), then PostgreSQL's start-up with a client certificate or a cleartext
//!   password (an RDS IAM token) over TLS;
//! - [`relay`], the loop that moves bytes both ways through `postern_pg::Relay` and
//!   hands its audit events on;
//! - [`session`], one tunnel channel from a proxy end to end: mutual TLS, the
//!   proxy→agent identity, the client's StartupMessage, route and access checks
//!   against live roles, a credential for the db user, the upstream connection, the
//!   relay, and audit events with the session's fields (`db.session.start` to
//!   `db.session.end`).

pub mod cancel;
pub mod metrics;
pub mod rds;
pub mod relay;
pub mod service;
pub mod session;
pub mod spool;
pub mod upstream;

pub use service::{
    AgentError, AgentService, AgentServiceConfig, AgentTimers, DatabaseConfig, DatabaseTls,
    DynamicLabel, HostMaterial,
};
