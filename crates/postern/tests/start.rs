//! `postern start --config FILE` as an operator runs it: the real binary, all three roles
//! in one process on free ports, a throwaway PostgreSQL that accepts only certificates
//! from the cluster's database CA, the real `postern login` / `db login` and `psql`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use postern_testkit::{PostgresOptions, PostgresServer, ServerTls, free_port};

const CLUSTER: &str = "start-test";

const ROLES: &str = r#"
[[role]]
name = "dev"
allow.db_labels = { env = "dev" }
allow.db_users = ["{{internal.db_users}}"]
allow.db_names = ["*"]
"#;

fn postern(data_dir: &Path, home: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .env("POSTERN_DATA_DIR", data_dir)
        .env("POSTERN_CLUSTER", CLUSTER)
        .env("HOME", home)
        .env("USER", "tester")
        .env_remove("POSTERN_POSTGRES")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = stdin.unwrap_or("");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ok(data_dir: &Path, home: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = postern(data_dir, home, args, stdin);
    assert!(
        out.status.success(),
        "postern {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET /metrics` with a bare HTTP/1.0 request; the body, or None when not reachable.
fn scrape(port: u16) -> Option<String> {
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

/// The value of one sample line (`name{labels} value`), or 0.
fn sample(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(line_start))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit; its exit status.
    fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config: &Path, log: &Path) -> Daemon {
    let log_file = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["start", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    Daemon {
        child,
        log: log.to_owned(),
    }
}

// The whole product in one process: psql reaches PostgreSQL through `postern start`'s
// proxy, tunnel and agent with a certificate from `postern db login`; /metrics counts the
// session; the audit log holds its db.session events; SIGTERM drains and exits 0.
#[test]
fn all_in_one_serves_psql_metrics_audit_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();

    // A database set up the Postern way, from the cluster's database CA.
    let server = dir.path().join("server");
    let server_arg = server.display().to_string();
    ok(
        &data,
        &home,
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

    let roles = dir.path().join("roles.toml");
    std::fs::write(&roles, ROLES).unwrap();
    ok(
        &data,
        &home,
        &["admin", "roles", "apply", &roles.display().to_string()],
        None,
    );
    ok(
        &data,
        &home,
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
        Some("correct horse battery staple\n"),
    );

    let [auth, pg, web, tunnel, metrics] = [(); 5].map(|()| free_port().unwrap());
    let config = dir.path().join("postern.toml");
    std::fs::write(
        &config,
        format!(
            r#"
data_dir = "{data}"
[auth]
listen = "127.0.0.1:{auth}"
cluster_name = "{CLUSTER}"
[proxy]
listen_postgres = "127.0.0.1:{pg}"
listen_web = "127.0.0.1:{web}"
listen_tunnel = "127.0.0.1:{tunnel}"
limits = {{ drain_timeout = "5s" }}
[db]
host_id = "db-test"
drain_timeout = "5s"
[[db.databases]]
name = "orders"
protocol = "postgres"
uri = "localhost:{db_port}"
static_labels = {{ env = "dev" }}
[log]
format = "json"
[metrics]
listen = "127.0.0.1:{metrics}"
"#,
            data = data.display(),
            db_port = database.port(),
        ),
    )
    .unwrap();
    let check = postern(
        &data,
        &home,
        &[
            "start",
            "--config",
            &config.display().to_string(),
            "--check",
        ],
        None,
    );
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let mut daemon = start(&config, &dir.path().join("postern.log"));
    // Ready when the agent's tunnel is up at the proxy.
    let mut ready = false;
    for _ in 0..300 {
        if let Some(text) = scrape(metrics)
            && sample(&text, "postern_proxy_tunnels_connected") >= 1.0
        {
            ready = true;
            break;
        }
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "postern start exited:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ready, "no tunnel within 30 s:\n{}", daemon.log());

    // The user's side: password login through the proxy's web port, then db login.
    ok(
        &data,
        &home,
        &[
            "login",
            "--proxy",
            &format!("localhost:{web}"),
            "--user",
            "alice",
            "--password-stdin",
            "--postgres-addr",
            &format!("localhost:{pg}"),
            "--danger-insecure-skip-verify",
        ],
        Some("correct horse battery staple\n"),
    );
    let mut logged_in = false;
    for _ in 0..50 {
        // The agent's announcement may trail its tunnel by a moment.
        let out = postern(
            &data,
            &home,
            &[
                "db",
                "login",
                "orders",
                "--db-user",
                "alice",
                "--db-name",
                "postgres",
            ],
            None,
        );
        if out.status.success() {
            logged_in = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(logged_in, "db login never succeeded:\n{}", daemon.log());

    let psql = Command::new("psql")
        .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "service=orders", "-c"])
        .arg("insert into notes values ('via postern start'); select current_user || ' ' || body from notes")
        .env("HOME", &home)
        .env("PGSERVICEFILE", home.join(".pg_service.conf"))
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    assert!(
        psql.status.success(),
        "psql failed: {}\n{}",
        String::from_utf8_lossy(&psql.stderr),
        daemon.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&psql.stdout).trim(),
        "alice via postern start"
    );
    assert_eq!(
        database
            .psql("postgres", "select count(*) from notes")
            .unwrap(),
        "1"
    );

    // The session is counted at the proxy and at the agent.
    let text = scrape(metrics).expect("/metrics answers");
    assert!(sample(&text, "postern_proxy_handshakes") >= 1.0, "{text}");
    assert!(sample(&text, "postern_agent_handshakes") >= 1.0, "{text}");
    assert!(sample(&text, "postern_proxy_bytes_relayed") > 0.0, "{text}");

    // The audit log (shipped from the agent's spool to auth) has the session.
    let mut events = String::new();
    for _ in 0..100 {
        events = ok(&data, &home, &["audit", "search", "--since", "1h"], None);
        if events.contains("db.session.end") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let has = |event: &str, text: &str| {
        events
            .lines()
            .any(|line| line.contains(&format!("\"event\":\"{event}\"")) && line.contains(text))
    };
    assert!(has("db.session.start", "\"user\":\"alice\""), "{events}");
    assert!(has("db.session.query", "insert into notes"), "{events}");
    assert!(has("db.session.end", "\"db_user\":\"alice\""), "{events}");

    // SIGTERM: drain, exit 0, logs in JSON lines.
    daemon.signal("TERM");
    let status = daemon
        .wait(Duration::from_secs(20))
        .expect("exits within 20 s of SIGTERM");
    let log = daemon.log();
    assert!(status.success(), "exit {status:?}:\n{log}");
    assert!(log.contains("shutting down"), "{log}");
    assert!(
        log.lines()
            .filter(|l| !l.trim().is_empty())
            .all(|l| l.starts_with('{')),
        "every log line is a JSON object:\n{log}"
    );
}

// Errors an operator meets first: a bad config names file, line and field (exit 2); a
// busy port names the address and the setting (exit 1).
#[test]
fn config_errors_and_busy_ports_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[auth]\n\n[proxy]\nlisten_postgres = \"x\"\n").unwrap();
    let out = postern(
        dir.path(),
        &home,
        &["start", "--config", &config.display().to_string()],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:4:19: proxy.listen_postgres: invalid socket address \"x\"",
            config.display()
        )),
        "{stderr}"
    );

    let missing = dir.path().join("missing.toml");
    let out = postern(
        dir.path(),
        &home,
        &["start", "--config", &missing.display().to_string()],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&missing.display().to_string()) && stderr.contains("cannot read"),
        "{stderr}"
    );

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[auth]\nlisten = \"127.0.0.1:{port}\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = postern(
        dir.path(),
        &home,
        &["start", "--config", &config.display().to_string()],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port} (auth.listen)")),
        "{stderr}"
    );
}
