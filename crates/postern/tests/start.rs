//! `postern start --config FILE` as an operator runs it: the real binary, all three roles
//! in one process on free ports, a throwaway PostgreSQL that accepts only certificates
//! from the cluster's database CA, the real `postern login` / `db login` and `psql`.

mod daemon;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use daemon::{Daemon, PASSWORD, audit_events, prepare_cluster, psql, sample, scrape, wait_for};
use postern_testkit::free_port;

const CLUSTER: &str = "start-test";

fn postern(data_dir: &Path, home: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    daemon::postern(CLUSTER, data_dir, home, args, stdin)
}

fn ok(data_dir: &Path, home: &Path, args: &[&str], stdin: Option<&str>) -> String {
    daemon::ok(CLUSTER, data_dir, home, args, stdin)
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

    let database = prepare_cluster(CLUSTER, &data, &home, dir.path());

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

    let mut daemon = Daemon::start("postern", &config, &dir.path().join("postern.log"));
    // Ready when the agent's tunnel is up at the proxy.
    wait_for(
        "the agent's tunnel at the proxy",
        &mut [&mut daemon],
        || {
            scrape(metrics)
                .is_some_and(|text| sample(&text, "postern_proxy_tunnels_connected") >= 1.0)
        },
    );

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
        Some(&format!("{PASSWORD}\n")),
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

    let psql = psql(
        &home,
        "insert into notes values ('via postern start'); select current_user || ' ' || body from notes",
    );
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
    let events = audit_events(CLUSTER, &data, &home);
    assert!(
        events.has("db.session.start", "\"user\":\"alice\""),
        "{events}"
    );
    assert!(
        events.has("db.session.query", "insert into notes"),
        "{events}"
    );
    assert!(
        events.has("db.session.end", "\"db_user\":\"alice\""),
        "{events}"
    );

    // SIGTERM: drain, exit 0, logs in JSON lines.
    daemon.signal("TERM");
    let status = daemon
        .wait(Duration::from_secs(20))
        .expect("exits within 20 s of SIGTERM");
    let log = daemon.log_text();
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
