//! Throwaway database servers for tests.
//!
//! The machine's own PostgreSQL and MariaDB run with default settings. Tests that need
//! other settings — TLS, client-certificate authentication, a server to kill — start their
//! own instance here: a fresh data folder in a temporary directory, a free port on
//! 127.0.0.1, and a process that is stopped and deleted when the value is dropped.
//!
//! Both servers refuse to run as root, so when the test runs as root the server runs as
//! the `postgres` or `mysql` system user (through `runuser`) in a folder owned by it.
//!
//! [`Psql`] runs the real `psql` against them (or against Postern) the same way in every
//! test.

mod mariadb;
mod postgres;
mod process;
mod psql;

pub use mariadb::{MariaDbOptions, MariaDbServer};
pub use postgres::{PostgresOptions, PostgresServer, TcpAuth};
pub use psql::{PSQL_TIMEOUT_DEFAULT, Psql};

/// Certificate material for a server with TLS: PEM text.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The server's certificate (chain), PEM.
    pub cert_pem: String,
    /// The server's private key, PEM.
    pub key_pem: String,
    /// The CA(s) the server trusts for client certificates, PEM.
    pub client_ca_pem: String,
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
