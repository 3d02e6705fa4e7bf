//! What the process-level tests share: running the real `postern` binary (one-shot
//! commands and `postern start` daemons), scraping `/metrics`, reading the audit log, and
//! preparing a cluster's state and a PostgreSQL that accepts only its certificates.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use postern_testkit::{PostgresOptions, PostgresServer, Psql, ServerTls};

pub const PASSWORD: &str = "correct horse battery staple";

pub const ROLES: &str = r#"
[[role]]
name = "dev"
allow.db_labels = { env = "dev" }
allow.db_users = ["{{internal.db_users}}"]
allow.db_names = ["*"]
"#;

/// `postern ARGS` for the cluster `cluster`, with `data_dir` and `home` as its folders.
pub fn postern(
    cluster: &str,
    data_dir: &Path,
    home: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .env("POSTERN_DATA_DIR", data_dir)
        .env("POSTERN_CLUSTER", cluster)
        .env("HOME", home)
        .env("USER", "tester")
        .env_remove("POSTERN_POSTGRES")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// [`postern`] that must succeed; its standard output.
pub fn ok(
    cluster: &str,
    data_dir: &Path,
    home: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> String {
    let out = postern(cluster, data_dir, home, args, stdin);
    assert!(
        out.status.success(),
        "postern {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET /metrics` with a bare HTTP/1.0 request; the body, or None when not (yet)
/// reachable.
pub fn scrape(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then_some(())?;
    head.contains(" 200 ").then(|| body.to_owned())
}

/// The sum of the sample lines (`name{labels} value`) starting with `line_start`, or 0.
pub fn sample(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(line_start))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One `postern start` process, its standard error in a log file; killed if the test
/// ends early.
pub struct Daemon {
    pub name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    pub fn start(name: &'static str, config: &Path, log: &Path) -> Self {
        let log_file = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["start", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        Self {
            name,
            child,
            log: log.to_owned(),
        }
    }

    /// The log so far, under a header naming the daemon.
    pub fn log(&self) -> String {
        format!("--- {} log ---\n{}", self.name, self.log_text())
    }

    /// The log so far, as written.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "{} exited:\n{}",
            self.name,
            self.log()
        );
    }

    /// Sends the signal `name` (`TERM`, `INT`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit; its exit status.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM, then the exit status within `limit`.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.signal("TERM");
        match self.wait(limit) {
            Some(status) => status,
            None => panic!(
                "{} did not exit within {limit:?}:\n{}",
                self.name,
                self.log()
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to 60 s until `ready` holds, checking that every daemon still runs.
pub fn wait_for(what: &str, daemons: &mut [&mut Daemon], mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if ready() {
            return;
        }
        for daemon in daemons.iter_mut() {
            daemon.assert_running();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
    panic!("{what}: not within 60 s\n{}", logs.join("\n"));
}

/// The audit log as `postern audit search` prints it (JSON lines), once it holds a
/// `db.session.end` (or after 10 s).
pub fn audit_events(cluster: &str, data_dir: &Path, home: &Path) -> AuditLines {
    let mut events = String::new();
    for _ in 0..100 {
        events = ok(
            cluster,
            data_dir,
            home,
            &["audit", "search", "--since", "1h"],
            None,
        );
        if events.contains("db.session.end") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    AuditLines(events)
}

/// Audit events, one JSON object a line.
#[derive(Debug)]
pub struct AuditLines(pub String);

impl AuditLines {
    /// Whether an `event` line contains `text`.
    pub fn has(&self, event: &str, text: &str) -> bool {
        self.0
            .lines()
            .any(|line| line.contains(&format!("\"event\":\"{event}\"")) && line.contains(text))
    }
}

impl std::fmt::Display for AuditLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The state a cluster needs before it serves anyone, made with `postern admin` in the
/// auth server's `data_dir`: the `dev` role, the user alice (password [`PASSWORD`], db
/// user alice); and a throwaway PostgreSQL with a server certificate from the cluster's
/// database CA that accepts only client certificates from it, with a role alice and a
/// table `notes` she may write.
pub fn prepare_cluster(
    cluster: &str,
    data_dir: &Path,
    home: &Path,
    scratch: &Path,
) -> PostgresServer {
    let server = scratch.join("server");
    let server_arg = server.display().to_string();
    ok(
        cluster,
        data_dir,
        home,
        &[
            "admin",
            "auth",
            "sign",
            "--format",
            "db",
            "--host",
            "localhost",
            "--out",
            &server_arg,
            "--ttl",
            "24h",
        ],
        None,
    );
    let read = |ext: &str| std::fs::read_to_string(format!("{server_arg}.{ext}")).unwrap();
    let database = PostgresServer::start(PostgresOptions {
        tls: Some(ServerTls {
            cert_pem: read("crt"),
            key_pem: read("key"),
            client_ca_pem: read("cas"),
        }),
        ..Default::default()
    })
    .unwrap();
    database
        .psql(
            "postgres",
            "create role alice login; create table notes (body text); grant all on notes to alice",
        )
        .unwrap();
    let roles = scratch.join("roles.toml");
    std::fs::write(&roles, ROLES).unwrap();
    ok(
        cluster,
        data_dir,
        home,
        &["admin", "roles", "apply", &roles.display().to_string()],
        None,
    );
    ok(
        cluster,
        data_dir,
        home,
        &[
            "admin",
            "users",
            "add",
            "alice",
            "--roles",
            "dev",
            "--db-users",
            "alice",
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    );
    database
}

/// `psql` on the `orders` service entry `postern db login` wrote, unaligned, tuples only.
pub fn psql(home: &Path, sql: &str) -> Output {
    orders_psql(home).run(sql)
}

/// psql on the `orders` service entry `postern db login` wrote in `home`.
pub fn orders_psql(home: &Path) -> Psql {
    Psql::new()
        .service("orders", &home.join(".pg_service.conf"))
        .env("HOME", home)
        .env("PGCONNECT_TIMEOUT", "10")
}
