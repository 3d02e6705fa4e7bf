//! What `db ls`, `db config` and `db env` print, as snapshots of fixed inputs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use postern_client::dbfiles::{DbConnection, Protocol};
use postern_client::ops::ListedDatabase;
use postern_client::render;

fn listed() -> Vec<ListedDatabase> {
    vec![
        ListedDatabase {
            name: "billing".to_owned(),
            description: "invoices (read-only replica)".to_owned(),
            protocol: "postgres".to_owned(),
            labels: BTreeMap::from([
                ("env".to_owned(), "prod".to_owned()),
                ("team".to_owned(), "money".to_owned()),
            ]),
            logged_in: false,
        },
        ListedDatabase {
            name: "orders".to_owned(),
            description: "orders database".to_owned(),
            protocol: "postgres".to_owned(),
            labels: BTreeMap::from([("env".to_owned(), "dev".to_owned())]),
            logged_in: true,
        },
    ]
}

fn orders() -> DbConnection {
    DbConnection {
        name: "orders".to_owned(),
        protocol: Protocol::Postgres,
        host: "proxy.example.com".to_owned(),
        port: 3080,
        user: "alice".to_owned(),
        database: "sales".to_owned(),
        ca: PathBuf::from("/home/alice/.postern/keys/proxy.example.com_3080/cas.pem"),
        cert: PathBuf::from("/home/alice/.postern/keys/proxy.example.com_3080/db/orders.crt"),
        key: PathBuf::from("/home/alice/.postern/keys/proxy.example.com_3080/user.key"),
    }
}

// `db ls`: aligned columns, `>` on the logged-in database, labels as k=v.
#[test]
fn db_ls_table() {
    insta::assert_snapshot!(render::db_table(&listed()));
}

// `db ls` with nothing allowed says why the list may be empty.
#[test]
fn db_ls_empty() {
    let out = render::db_table(&[]);
    assert!(out.contains("your roles allow none"), "{out}");
}

// `db ls --format json` keeps every field, including the logged-in mark.
#[test]
fn db_ls_json() {
    insta::assert_snapshot!(render::db_json(&listed()));
}

// `db config` in its three formats.
#[test]
fn db_config_formats() {
    let db = orders();
    insta::assert_snapshot!("config_text", render::db_config_text(&db));
    insta::assert_snapshot!("config_cmd", render::db_config_cmd(&db));
    insta::assert_snapshot!("config_json", render::db_config_json(&db));
}

// `db env` exports libpq's variables; MySQL gets the group suffix of ~/.my.cnf.
#[test]
fn db_env_exports() {
    let db = orders();
    insta::assert_snapshot!("env_postgres", render::db_env(&db));
    let mysql = DbConnection {
        protocol: Protocol::Mysql,
        ..orders()
    };
    assert_eq!(
        render::db_env(&mysql),
        "export MYSQL_GROUP_SUFFIX=_orders\n"
    );
}

// Paths with spaces and quotes survive shell and conninfo quoting.
#[test]
fn quoting() {
    let mut db = orders();
    db.key = PathBuf::from("/home/o'brien/my keys/user.key");
    let cmd = render::db_config_cmd(&db);
    assert!(
        cmd.contains(r"sslkey='\''/home/o\'\''brien/my keys/user.key'\''"),
        "{cmd}"
    );
    assert!(render::db_env(&db).contains("export PGSSLKEY='/home/o'\\''brien/my keys/user.key'"));
}
