//! What the user commands print, as plain functions of their data (snapshot-tested).

use std::fmt::Write as _;

use serde::Serialize;

use crate::dbfiles::{DbConnection, Protocol, my_cnf_group};
use crate::ops::ListedDatabase;

/// `db ls`: a table of name, description and labels; `>` marks logged-in databases.
pub fn db_table(databases: &[ListedDatabase]) -> String {
    let rows: Vec<[String; 3]> = databases
        .iter()
        .map(|db| {
            let marker = if db.logged_in { "> " } else { "  " };
            let labels: Vec<String> = db.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            [
                format!("{marker}{}", db.name),
                db.description.clone(),
                labels.join(","),
            ]
        })
        .collect();
    let header = [
        "  Name".to_owned(),
        "Description".to_owned(),
        "Labels".to_owned(),
    ];
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String; 3]| {
        let text = format!(
            "{:<w0$} {:<w1$} {}",
            cells[0],
            cells[1],
            cells[2],
            w0 = widths[0],
            w1 = widths[1]
        );
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut out, &header);
    let rule = [
        format!("  {}", "-".repeat(widths[0] - 2)),
        "-".repeat(widths[1]),
        "-".repeat(widths[2]),
    ];
    line(&mut out, &rule);
    for row in &rows {
        line(&mut out, row);
    }
    if databases.is_empty() {
        out.push_str("(no databases: your roles allow none, or no agent serves one)\n");
    }
    out
}

/// `db ls --format json`.
pub fn db_json(databases: &[ListedDatabase]) -> String {
    serde_json::to_string_pretty(databases).unwrap_or_default() + "\n"
}

/// A PostgreSQL connection string (keyword/value form) for `db`.
pub fn pg_conninfo(db: &DbConnection) -> String {
    let mut parts = vec![
        format!("host={}", db.host),
        format!("port={}", db.port),
        "sslmode=verify-full".to_owned(),
        format!(
            "sslrootcert={}",
            quote_conninfo(&db.ca.display().to_string())
        ),
        format!("sslcert={}", quote_conninfo(&db.cert.display().to_string())),
        format!("sslkey={}", quote_conninfo(&db.key.display().to_string())),
    ];
    if !db.user.is_empty() {
        parts.push(format!("user={}", quote_conninfo(&db.user)));
    }
    if !db.database.is_empty() {
        parts.push(format!("dbname={}", quote_conninfo(&db.database)));
    }
    parts.join(" ")
}

fn quote_conninfo(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\']) {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A value quoted for a POSIX shell.
pub fn shell_quote(value: &str) -> String {
    let plain = !value.is_empty()
        && value.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | ':' | '=' | ',')
        });
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', "'\\''"))
    }
}

/// `db env`: `export` lines for `eval $(postern db env)`.
pub fn db_env(db: &DbConnection) -> String {
    let mut vars: Vec<(&str, String)> = Vec::new();
    match db.protocol {
        Protocol::Postgres => {
            vars.extend([
                ("PGHOST", db.host.clone()),
                ("PGPORT", db.port.to_string()),
                ("PGSSLMODE", "verify-full".to_owned()),
                ("PGSSLROOTCERT", db.ca.display().to_string()),
                ("PGSSLCERT", db.cert.display().to_string()),
                ("PGSSLKEY", db.key.display().to_string()),
            ]);
            if !db.user.is_empty() {
                vars.push(("PGUSER", db.user.clone()));
            }
            if !db.database.is_empty() {
                vars.push(("PGDATABASE", db.database.clone()));
            }
        }
        Protocol::Mysql => {
            let suffix = my_cnf_group(&db.name);
            let suffix = suffix.trim_start_matches("client");
            vars.push(("MYSQL_GROUP_SUFFIX", suffix.to_owned()));
        }
    }
    let mut out = String::new();
    for (name, value) in vars {
        let _ = writeln!(out, "export {name}={}", shell_quote(&value));
    }
    out
}

/// `db config` in text: what a GUI client asks for, one field a line.
pub fn db_config_text(db: &DbConnection) -> String {
    let rows = [
        ("Name", db.name.clone()),
        ("Protocol", db.protocol.as_str().to_owned()),
        ("Host", db.host.clone()),
        ("Port", db.port.to_string()),
        ("User", db.user.clone()),
        ("Database", db.database.clone()),
        ("CA", db.ca.display().to_string()),
        ("Cert", db.cert.display().to_string()),
        ("Key", db.key.display().to_string()),
    ];
    let mut out = String::new();
    for (name, value) in rows {
        let _ = writeln!(out, "{:<10}{value}", format!("{name}:"));
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Command:  {}", db_config_cmd(db).trim_end());
    out
}

/// `db config --format cmd`: a ready command line.
pub fn db_config_cmd(db: &DbConnection) -> String {
    match db.protocol {
        Protocol::Postgres => format!("psql {}\n", shell_quote(&pg_conninfo(db))),
        Protocol::Mysql => {
            let mut parts = vec![
                "mysql".to_owned(),
                format!("--host={}", shell_quote(&db.host)),
                format!("--port={}", db.port),
                "--ssl-mode=VERIFY_IDENTITY".to_owned(),
                format!("--ssl-ca={}", shell_quote(&db.ca.display().to_string())),
                format!("--ssl-cert={}", shell_quote(&db.cert.display().to_string())),
                format!("--ssl-key={}", shell_quote(&db.key.display().to_string())),
            ];
            if !db.user.is_empty() {
                parts.push(format!("--user={}", shell_quote(&db.user)));
            }
            if !db.database.is_empty() {
                parts.push(shell_quote(&db.database));
            }
            parts.join(" ") + "\n"
        }
    }
}

#[derive(Serialize)]
struct ConfigJson<'a> {
    name: &'a str,
    protocol: &'a str,
    host: &'a str,
    port: u16,
    user: &'a str,
    database: &'a str,
    ca: String,
    cert: String,
    key: String,
}

/// `db config --format json`.
pub fn db_config_json(db: &DbConnection) -> String {
    let json = ConfigJson {
        name: &db.name,
        protocol: db.protocol.as_str(),
        host: &db.host,
        port: db.port,
        user: &db.user,
        database: &db.database,
        ca: db.ca.display().to_string(),
        cert: db.cert.display().to_string(),
        key: db.key.display().to_string(),
    };
    serde_json::to_string_pretty(&json).unwrap_or_default() + "\n"
}
