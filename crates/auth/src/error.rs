//! The one error type of this crate, grouped by category.

use std::path::PathBuf;

use crate::access::Denial;

/// Everything that can go wrong in the auth service.
///
/// Variants are grouped by who has to act: the operator (storage), the caller (input,
/// conflicts, missing objects), or the user (authentication, access).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- Storage: the operator has to look at the backend or the disk.
    /// The state or audit backend failed.
    #[error("{backend} backend failed: {source}")]
    Storage {
        backend: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Stored data does not parse: the backend holds something we did not write.
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt { what: String, detail: String },

    // --- Network: talking to another Postern service failed.
    /// The auth API could not be reached, or the connection failed midway.
    #[error("auth service at {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    /// The auth API answered with an error.
    #[error("auth service refused ({status}): {message}")]
    Remote { status: u16, message: String },

    // --- Concurrency: the caller should re-read and retry.
    /// A compare-and-swap found another revision than expected.
    #[error("{key:?} was changed concurrently (compare-and-swap lost)")]
    Conflict { key: String },
    /// A watcher fell behind and missed events; re-read the prefix and watch again.
    #[error("watcher fell behind and missed {missed} events; re-read and watch again")]
    WatchLagged { missed: u64 },
    /// The backend's change feed was interrupted (its database session dropped and was
    /// re-established); re-read and keep watching.
    #[error("watch interrupted: changes may have been missed; re-read and watch again")]
    WatchGap,
    /// The backend that fed a watcher has gone away.
    #[error("watch closed: the backend is gone")]
    WatchClosed,

    // --- Objects: the caller named something that is or is not there.
    /// The named object does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    /// The named object exists already.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },

    // --- Input: the caller sent something we refuse; the message names the field.
    /// A value is malformed or over a limit.
    #[error("invalid {field}: {reason}")]
    InvalidInput { field: String, reason: String },
    /// A role file does not parse or does not validate.
    #[error("{}", role_file_message(file, *line, field, message))]
    RoleFile {
        file: String,
        line: Option<usize>,
        field: Option<String>,
        message: String,
    },

    // --- Authentication: the user has to log in again or wait.
    /// Wrong user name, password or second factor. Deliberately does not say which.
    #[error("login failed for user {user:?}: wrong user name, password or second factor")]
    LoginFailed { user: String },
    /// Too many failed logins; try again later.
    #[error("too many failed logins for {subject}; try again in {retry_after_secs} s")]
    RateLimited {
        subject: String,
        retry_after_secs: u64,
    },
    /// A join token is unknown, used, expired or for another role.
    #[error("join token refused: {reason}")]
    TokenRefused { reason: String },

    // --- Certificates: issuing or validating failed; the message says what to do.
    /// A certificate could not be issued or was refused.
    #[error(transparent)]
    Certificate(#[from] postern_pki::Error),
    /// A CA rotation was asked for in a phase that does not allow it.
    #[error("CA rotation: {0}")]
    Rotation(String),

    // --- Access: the user's roles do not allow what was asked.
    /// The access decision refused; the denial says which part failed and what to do.
    #[error("{0}")]
    AccessDenied(Box<Denial>),
}

fn role_file_message(
    file: &str,
    line: Option<usize>,
    field: &Option<String>,
    message: &str,
) -> String {
    let mut out = String::from(file);
    if let Some(line) = line {
        out.push_str(&format!(":{line}"));
    }
    if let Some(field) = field {
        out.push_str(&format!(": {field}"));
    }
    out.push_str(": ");
    out.push_str(message);
    out
}

impl Error {
    pub(crate) fn storage(
        backend: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Storage {
            backend,
            source: Box::new(source),
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
