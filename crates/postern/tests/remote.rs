//! `postern start` split over three processes, as a cluster runs across machines: one
//! auth server, one proxy and one database agent, each with its own config and data
//! folder. The proxy and the agent join the auth server with join tokens, trusting it by
//! the host CA bundle the auth server writes; psql reaches a PostgreSQL that accepts only
//! the cluster's certificates through the remote proxy and the remote agent, and the
//! session's audit events land in the auth server's log.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use postern_testkit::{PostgresOptions, PostgresServer, ServerTls, free_port};

const CLUSTER: &str = "remote-test";
const PASSWORD: &str = "correct horse battery staple";

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
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
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

/// `GET /metrics`; the body, or None when not (yet) reachable.
fn scrape(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_owned())
}

fn sample(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(line_start))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One `postern start` process; killed if the test ends early.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(name: &'static str, config: &Path, log: &Path) -> Self {
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

    fn log(&self) -> String {
        format!(
            "--- {} log ---\n{}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "{} exited:\n{}",
            self.name,
            self.log()
        );
    }

    /// SIGTERM, then the exit status within `limit`.
    fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not exit within {limit:?}:\n{}",
            self.name,
            self.log()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `ready` holds, checking that every daemon still runs.
fn wait_for(what: &str, daemons: &mut [&mut Daemon], mut ready: impl FnMut() -> bool) {
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

fn psql(home: &Path, sql: &str) -> Output {
    Command::new("psql")
        .args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "service=orders",
            "-c",
        ])
        .arg(sql)
        .env("HOME", home)
        .env("PGSERVICEFILE", home.join(".pg_service.conf"))
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap()
}

// Three processes: psql reaches PostgreSQL through a proxy and an agent that each joined
// the auth server of another process with a token; the audit events are in the auth
// server's log; a restarted proxy comes back on its saved certificate (its token is
// spent); SIGTERM stops each with exit 0.
#[test]
fn auth_proxy_and_agent_in_three_processes_serve_psql() {
    let dir = tempfile::tempdir().unwrap();
    let auth_data = dir.path().join("auth");
    let proxy_data = dir.path().join("proxy");
    let db_data = dir.path().join("db");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();

    // The cluster's state, prepared with `postern admin` on the auth server's folder.
    let server = dir.path().join("server");
    let server_arg = server.display().to_string();
    ok(
        &auth_data,
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
        &auth_data,
        &home,
        &["admin", "roles", "apply", &roles.display().to_string()],
        None,
    );
    ok(
        &auth_data,
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
        Some(&format!("{PASSWORD}\n")),
    );
    let token = |kind: &str| {
        ok(
            &auth_data,
            &home,
            &["admin", "tokens", "add", "--type", kind, "--ttl", "10m"],
            None,
        )
        .trim()
        .to_owned()
    };
    let (proxy_token, db_token) = (token("proxy"), token("db"));

    // 1. The auth server alone.
    let [auth, pg, web, tunnel, proxy_metrics, db_metrics] = [(); 6].map(|()| free_port().unwrap());
    let auth_config = dir.path().join("auth.toml");
    std::fs::write(
        &auth_config,
        format!(
            r#"
data_dir = "{data}"
[auth]
listen = "127.0.0.1:{auth}"
cluster_name = "{CLUSTER}"
[log]
format = "json"
"#,
            data = auth_data.display(),
        ),
    )
    .unwrap();
    let mut auth_daemon = Daemon::start("auth", &auth_config, &dir.path().join("auth.log"));
    let host_cas = auth_data.join("host-cas.pem");
    wait_for("the auth API", &mut [&mut auth_daemon], || {
        host_cas.exists() && TcpStream::connect(("127.0.0.1", auth)).is_ok()
    });

    // 2. The proxy, joining it.
    let proxy_config = dir.path().join("proxy.toml");
    std::fs::write(
        &proxy_config,
        format!(
            r#"
data_dir = "{data}"
[proxy]
listen_postgres = "127.0.0.1:{pg}"
listen_web = "127.0.0.1:{web}"
listen_tunnel = "127.0.0.1:{tunnel}"
host_id = "proxy-1"
auth_addr = "localhost:{auth}"
join_token = "{proxy_token}"
auth_ca_file = "{cas}"
limits = {{ drain_timeout = "1s" }}
[metrics]
listen = "127.0.0.1:{proxy_metrics}"
"#,
            data = proxy_data.display(),
            cas = host_cas.display(),
        ),
    )
    .unwrap();
    let proxy_log = dir.path().join("proxy.log");
    let mut proxy_daemon = Daemon::start("proxy", &proxy_config, &proxy_log);

    // 3. The agent, joining it and dialling the proxy.
    let db_config = dir.path().join("db.toml");
    std::fs::write(
        &db_config,
        format!(
            r#"
data_dir = "{data}"
[db]
host_id = "db-1"
auth_addr = "localhost:{auth}"
join_token = "{db_token}"
auth_ca_file = "{cas}"
proxies = ["localhost:{tunnel}"]
drain_timeout = "5s"
[[db.databases]]
name = "orders"
protocol = "postgres"
uri = "localhost:{db_port}"
static_labels = {{ env = "dev" }}
[metrics]
listen = "127.0.0.1:{db_metrics}"
"#,
            data = db_data.display(),
            cas = host_cas.display(),
            db_port = database.port(),
        ),
    )
    .unwrap();
    let mut db_daemon = Daemon::start("db", &db_config, &dir.path().join("db.log"));
    wait_for(
        "the agent's tunnel at the proxy",
        &mut [&mut auth_daemon, &mut proxy_daemon, &mut db_daemon],
        || {
            scrape(proxy_metrics)
                .is_some_and(|text| sample(&text, "postern_proxy_tunnels_connected") >= 1.0)
        },
    );

    // Each joined host keeps its certificate and key (owner-only) in its own folder.
    for (folder, host_id) in [
        (proxy_data.join("proxy-host"), "proxy-1"),
        (db_data.join("agent-host"), "db-1"),
    ] {
        let cert = std::fs::read_to_string(folder.join("host.crt")).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
        let mode = std::fs::metadata(folder.join("host.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600, "{host_id}");
    }

    // The user's side, through the remote proxy: login trusting the host CA bundle.
    let login = |daemons: &mut [&mut Daemon]| {
        ok(
            &auth_data,
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
                "--ca-file",
                &host_cas.display().to_string(),
            ],
            Some(&format!("{PASSWORD}\n")),
        );
        wait_for("db login", daemons, || {
            postern(
                &auth_data,
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
            )
            .status
            .success()
        });
    };
    login(&mut [&mut auth_daemon, &mut proxy_daemon, &mut db_daemon]);
    let out = psql(
        &home,
        "insert into notes values ('across three processes'); select current_user || ' ' || body from notes",
    );
    assert!(
        out.status.success(),
        "psql failed: {}\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        auth_daemon.log(),
        proxy_daemon.log(),
        db_daemon.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "alice across three processes"
    );
    assert_eq!(
        database
            .psql("postgres", "select count(*) from notes")
            .unwrap(),
        "1"
    );

    // The audit events, from the agent's spool, are in the auth server's log; so are
    // the two joins.
    let mut events = String::new();
    for _ in 0..100 {
        events = ok(
            &auth_data,
            &home,
            &["audit", "search", "--since", "1h"],
            None,
        );
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
    assert!(
        has("db.session.query", "across three processes"),
        "{events}"
    );
    assert!(has("db.session.end", "\"db_user\":\"alice\""), "{events}");
    assert!(has("auth.token.used", "proxy-1"), "{events}");
    assert!(has("auth.token.used", "db-1"), "{events}");

    // A session still running when the proxy's drain timeout ends is told why it is
    // closed: psql prints the FATAL 57P01 the proxy sends.
    let sleeper = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "VERBOSITY=verbose",
            "service=orders",
            "-c",
        ])
        .arg("select pg_sleep(60)")
        .env("HOME", &home)
        .env("PGSERVICEFILE", home.join(".pg_service.conf"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        "the sleeping session",
        &mut [&mut auth_daemon, &mut proxy_daemon, &mut db_daemon],
        || {
            database
                .psql(
                    "postgres",
                    "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)'",
                )
                .is_ok_and(|count| count == "1")
        },
    );
    let asked_at = Instant::now();
    // The proxy restarts on its saved certificate: its token is spent.
    let status = proxy_daemon.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", proxy_daemon.log());
    let sleeper = sleeper.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&sleeper.stderr);
    assert!(!sleeper.status.success());
    assert!(
        stderr.contains("57P01") && stderr.contains("the Postern proxy is shutting down"),
        "psql said: {stderr}\n{}",
        proxy_daemon.log()
    );
    assert!(
        asked_at.elapsed() < Duration::from_secs(15),
        "closed at the 1 s drain timeout, not at the end of the 60 s query"
    );
    let mut proxy_daemon = Daemon::start("proxy", &proxy_config, &dir.path().join("proxy2.log"));
    wait_for(
        "the agent's tunnel at the restarted proxy",
        &mut [&mut auth_daemon, &mut proxy_daemon, &mut db_daemon],
        || {
            scrape(proxy_metrics)
                .is_some_and(|text| sample(&text, "postern_proxy_tunnels_connected") >= 1.0)
        },
    );
    assert!(
        proxy_daemon
            .log()
            .contains("using the saved host certificate"),
        "{}",
        proxy_daemon.log()
    );
    let mut served = false;
    for _ in 0..50 {
        let out = psql(&home, "select count(*) from notes");
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        served,
        "psql through the restarted proxy:\n{}\n{}",
        proxy_daemon.log(),
        db_daemon.log()
    );

    // SIGTERM: each drains and exits 0 (the agent ships its spool before auth goes).
    for daemon in [&mut db_daemon, &mut proxy_daemon, &mut auth_daemon] {
        let status = daemon.terminate(Duration::from_secs(20));
        assert!(status.success(), "{status:?}\n{}", daemon.log());
    }
}
