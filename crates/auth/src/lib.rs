//! The auth service: the cluster's certificate authorities and source of truth.
//!
//! Layers, bottom up:
//!
//! - [`backend`]: state behind a key/value [`backend::Backend`] (revisions,
//!   compare-and-swap, TTL leases, prefix reads, watch) with three implementations
//!   (memory, SQLite, PostgreSQL) that pass one conformance suite (`tests/backend.rs`).
//! - [`user`], [`role`], [`totp`], [`state`]: users with argon2id passwords and
//!   RFC 6238 TOTP, traits, roles with templates loaded from TOML files.
//! - [`access`]: the access decision, a pure function whose refusals say which of
//!   labels, db user or database name failed and what the user may use instead.
//! - [`audit`]: the audit log (daily JSON-lines files or PostgreSQL), idempotent by
//!   event id.
//! - [`server`]: the auth server's audited operations: users, roles, login with rate
//!   limits ([`limiter`]), join tokens, the registry of database servers.
//! - [`signing`]: the CAs (with rotation) and every certificate the auth server issues.
//! - [`api`]: all of the above over mutual TLS, on the runtime seam's network.
//! - [`client`]: the API client for proxies, agents and tools.
//!
//! Time and randomness come in from outside: backends read the wall clock they are
//! given, the server takes the seam's [`postern_rt::WallClock`] and
//! [`postern_rt::Rng`], and the pure parts ([`access`], [`limiter`], [`totp`]) take
//! `now` as an argument. CA and certificate keys come from `postern-pki`, which draws
//! them from the OS through ring.

pub mod access;
pub mod api;
pub mod audit;
pub mod backend;
pub mod client;
pub mod database;
pub mod duration;
mod error;
pub mod limiter;
pub mod role;
pub mod server;
pub mod signing;
pub mod state;
pub mod totp;
pub mod user;

pub use error::Error;
