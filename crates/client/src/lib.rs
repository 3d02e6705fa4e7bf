//! The user's side of Postern (`postern login`, `postern db ...`, `postern proxy db`).
//!
//! - [`ini`]: section-level edits of INI-style files that leave every other byte alone;
//! - [`dbfiles`]: the `~/.pg_service.conf` and `~/.my.cnf` sections `db login` writes;
//! - [`files`]: atomic writes (temporary file, fsync, rename) and key file modes;
//! - [`profile`]: profiles per proxy under `~/.postern/`;
//! - [`tls`]: how the client trusts the proxy and presents its certificates;
//! - [`ops`]: login, listing, database login and logout against the proxy;
//! - [`render`]: what the commands print;
//! - [`local_proxy`]: a local plaintext PostgreSQL listener that adds TLS and the
//!   user's certificate on the way to the proxy.

pub mod dbfiles;
mod error;
pub mod files;
pub mod ini;
pub mod local_proxy;
pub mod ops;
pub mod profile;
pub mod render;
pub mod tls;

pub use error::Error;
