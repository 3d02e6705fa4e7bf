//! The client's one error type. Each variant says what happened and what to run next.

use std::path::PathBuf;

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- Local files.
    #[error("cannot use {}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not UTF-8 text; fix or move it, then try again", path.display())]
    NotText { path: PathBuf },
    #[error("{} is damaged ({reason}); run `postern logout` and `postern login` again", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("HOME is not set: postern keeps its profiles under $HOME/.postern")]
    NoHome,

    // --- Profile state: the user has to log in (again).
    #[error("not logged in: run `postern login --proxy HOST:PORT --user NAME`")]
    NotLoggedIn,
    #[error(
        "your login to {proxy} expired at {expired}; run `postern login --proxy {proxy} --user {user}`"
    )]
    LoginExpired {
        proxy: String,
        user: String,
        expired: String,
    },
    #[error("not logged in to database {name:?}; run `postern db login {name}`")]
    DbNotLoggedIn { name: String },
    #[error("{0}")]
    Usage(String),

    // --- The proxy.
    #[error(
        "cannot reach the proxy at {addr}: {reason}. Check the address and port (`--proxy HOST:PORT`) and that the proxy is running"
    )]
    Unreachable { addr: String, reason: String },
    #[error(
        "login failed for user {user:?}: wrong user name, password or second factor. Check them and run `postern login` again"
    )]
    WrongPassword { user: String },
    #[error(
        "unknown database {name:?}; databases you can use: {}",
        if known.is_empty() { "none (ask an administrator for a role that allows one)".to_owned() } else { known.join(", ") }
    )]
    UnknownDatabase { name: String, known: Vec<String> },
    #[error("no access to database {name:?}: {reason}")]
    NoAccess { name: String, reason: String },
    #[error("the proxy refused: {0}")]
    Refused(String),

    // --- Certificates and TLS.
    #[error("certificate problem: {0}")]
    Certificate(#[from] postern_pki::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
}
