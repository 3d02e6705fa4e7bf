//! `postern start` split over three processes, as a cluster runs across machines: one
//! auth server, one proxy and one database agent, each with its own config and data
//! folder. The proxy and the agent join the auth server with join tokens, trusting it by
//! the host CA bundle the auth server writes; psql reaches a PostgreSQL that accepts only
//! the cluster's certificates through the remote proxy and the remote agent, and the
//! session's audit events land in the auth server's log.

mod daemon;

use std::net::TcpStream;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use daemon::{
    Daemon, PASSWORD, audit_events, orders_psql, prepare_cluster, psql, sample, scrape, wait_for,
};
use postern_testkit::free_port;

const CLUSTER: &str = "remote-test";

fn postern(data_dir: &Path, home: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    daemon::postern(CLUSTER, data_dir, home, args, stdin)
}

fn ok(data_dir: &Path, home: &Path, args: &[&str], stdin: Option<&str>) -> String {
    daemon::ok(CLUSTER, data_dir, home, args, stdin)
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
    let database = prepare_cluster(CLUSTER, &auth_data, &home, dir.path());
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
    let events = audit_events(CLUSTER, &auth_data, &home);
    assert!(
        events.has("db.session.start", "\"user\":\"alice\""),
        "{events}"
    );
    assert!(
        events.has("db.session.query", "across three processes"),
        "{events}"
    );
    assert!(
        events.has("db.session.end", "\"db_user\":\"alice\""),
        "{events}"
    );
    assert!(events.has("auth.token.used", "proxy-1"), "{events}");
    assert!(events.has("auth.token.used", "db-1"), "{events}");

    // A session still running when the proxy's drain timeout ends is told why it is
    // closed: psql prints the FATAL 57P01 the proxy sends.
    let sleeper = orders_psql(&home)
        .var("VERBOSITY", "verbose")
        .command("select pg_sleep(60)")
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
