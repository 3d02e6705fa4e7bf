//! The sections `postern db login` writes for standard clients: `[NAME]` in
//! `~/.pg_service.conf` (libpq: `psql "service=NAME"`) and `[client_NAME]` in
//! `~/.my.cnf` (MySQL/MariaDB clients: `--defaults-group-suffix=_NAME` or
//! `MYSQL_GROUP_SUFFIX=_NAME`). Everything else in those files is left as it was.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::Error;
use crate::files::{PUBLIC_FILE_MODE, mode_or, read_or_empty, write_atomic};
use crate::ini;

/// The database protocols a client file is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Protocol {
    Postgres,
    Mysql,
}

impl Protocol {
    /// From the API's protocol name ("postgres", "mysql").
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "postgres" | "postgresql" => Some(Self::Postgres),
            "mysql" => Some(Self::Mysql),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        }
    }
}

/// Everything a client needs to reach one logged-in database through the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DbConnection {
    pub name: String,
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The `[NAME]` section of `~/.pg_service.conf`.
pub fn pg_service_section(db: &DbConnection) -> String {
    let mut entries = vec![
        ("host", db.host.clone()),
        ("port", db.port.to_string()),
        ("sslmode", "verify-full".to_owned()),
        ("sslrootcert", db.ca.display().to_string()),
        ("sslcert", db.cert.display().to_string()),
        ("sslkey", db.key.display().to_string()),
    ];
    if !db.user.is_empty() {
        entries.push(("user", db.user.clone()));
    }
    if !db.database.is_empty() {
        entries.push(("dbname", db.database.clone()));
    }
    ini::render_section(&db.name, &entries)
}

/// The group name in `~/.my.cnf` for database `name`.
pub fn my_cnf_group(name: &str) -> String {
    format!("client_{name}")
}

/// The `[client_NAME]` group of `~/.my.cnf`.
pub fn my_cnf_section(db: &DbConnection) -> String {
    let mut entries = vec![("host", db.host.clone()), ("port", db.port.to_string())];
    if !db.user.is_empty() {
        entries.push(("user", db.user.clone()));
    }
    if !db.database.is_empty() {
        entries.push(("database", db.database.clone()));
    }
    entries.extend([
        ("ssl-mode", "VERIFY_IDENTITY".to_owned()),
        ("ssl-ca", db.ca.display().to_string()),
        ("ssl-cert", db.cert.display().to_string()),
        ("ssl-key", db.key.display().to_string()),
    ]);
    ini::render_section(&my_cnf_group(&db.name), &entries)
}

/// Where the client files live under `home`.
#[derive(Debug, Clone)]
pub struct ClientFiles {
    pub pg_service: PathBuf,
    pub my_cnf: PathBuf,
}

impl ClientFiles {
    pub fn in_home(home: &Path) -> Self {
        Self {
            pg_service: home.join(".pg_service.conf"),
            my_cnf: home.join(".my.cnf"),
        }
    }

    /// Writes (or rewrites) the section for `db` in the file of its protocol.
    pub fn write(&self, db: &DbConnection) -> Result<(), Error> {
        match db.protocol {
            Protocol::Postgres => upsert(&self.pg_service, &db.name, &pg_service_section(db)),
            Protocol::Mysql => upsert(&self.my_cnf, &my_cnf_group(&db.name), &my_cnf_section(db)),
        }
    }

    /// Removes database `name`'s sections from both files, wherever they are.
    pub fn remove(&self, name: &str) -> Result<(), Error> {
        remove(&self.pg_service, name)?;
        remove(&self.my_cnf, &my_cnf_group(name))
    }
}

fn upsert(path: &Path, section_name: &str, section: &str) -> Result<(), Error> {
    let text = read_or_empty(path)?;
    let updated = ini::upsert_section(&text, section_name, section);
    if updated == text {
        return Ok(());
    }
    // my.cnf is ignored by MySQL clients when it is world-writable; never loosen a mode.
    write_atomic(
        path,
        updated.as_bytes(),
        mode_or(path, PUBLIC_FILE_MODE) & !0o022,
    )
}

fn remove(path: &Path, section_name: &str) -> Result<(), Error> {
    let text = read_or_empty(path)?;
    match ini::remove_section(&text, section_name) {
        Some(updated) => write_atomic(path, updated.as_bytes(), mode_or(path, PUBLIC_FILE_MODE)),
        None => Ok(()),
    }
}
