//! The user's commands end to end: the real `postern` binary with a temporary HOME
//! against an in-process cluster (auth API, proxy service, agent, real PostgreSQL),
//! then real `psql` and a driver using only what the commands wrote or printed.

mod support;

use std::sync::Arc;
use std::time::Duration;

use postern_pki::TrustedCa;
use postern_rt::{Net, WallClock};
use postern_testkit::Psql;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use support::{PASSWORD, TestCluster, UserHome, fails, ok};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// `postern login` with the password on stdin, trusting the administrator's CA file.
fn login(user: &UserHome, cluster: &TestCluster, extra: &[&str]) -> std::process::Output {
    let ca = cluster.host_ca_file.display().to_string();
    let mut args = vec![
        "login",
        "--proxy",
        &cluster.web_addr,
        "--user",
        "alice",
        "--password-stdin",
        "--ca-file",
        &ca,
        "--postgres-addr",
        &cluster.postgres_addr,
    ];
    args.extend_from_slice(extra);
    user.run(&args, &format!("{PASSWORD}\n"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Real psql with `conninfo` running `sql` in the user's HOME: (ok, stdout, stderr).
fn psql(user: &UserHome, conninfo: &str, sql: &str) -> (bool, String, String) {
    let out = Psql::new()
        .conninfo_text(conninfo)
        .run_in(user.command("psql"), sql);
    Psql::summary(&out)
}

const FOREIGN_SERVICES: &str = "# my own services\n[prod]\nhost=db.internal\nport=5432\n\n; keep this comment\n[staging]\n  host = staging.internal\n";

// login, db ls, db login; then psql "service=orders" and `eval $(postern db env)` +
// psql work with only the written files; db logout removes exactly its section.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_ls_db_login_then_psql_uses_only_written_files() {
    let cluster = Arc::new(TestCluster::start().await);
    let user = Arc::new(UserHome::new());
    std::fs::write(user.path().join(".pg_service.conf"), FOREIGN_SERVICES).unwrap();

    let (c, u) = (cluster.clone(), user.clone());
    blocking(move || {
        let out = ok(&login(&u, &c, &[]));
        assert!(out.contains("Logged in as: alice"), "{out}");
        let status = ok(&u.run(&["status"], ""));
        assert!(status.contains("Roles:        dev"), "{status}");

        let listed = ok(&u.run(&["db", "ls"], ""));
        insta::assert_snapshot!("db_ls_before_login", listed);

        let out = ok(&u.run(&["db", "login", "orders", "--db-name", "postgres"], ""));
        assert!(out.contains("service=orders"), "{out}");
        let listed = ok(&u.run(&["db", "ls"], ""));
        assert!(listed.contains("> orders"), "{listed}");
        let json: serde_json::Value =
            serde_json::from_str(&ok(&u.run(&["db", "ls", "--format", "json"], ""))).unwrap();
        assert_eq!(json[0]["name"], "orders");
        assert_eq!(json[0]["logged_in"], true);

        // The key file is private; the foreign sections are still first, unchanged.
        use std::os::unix::fs::PermissionsExt;
        let services = std::fs::read_to_string(u.path().join(".pg_service.conf")).unwrap();
        assert!(services.starts_with(FOREIGN_SERVICES), "{services}");
        let home = u.path().display().to_string();
        let key_line = services
            .lines()
            .find_map(|l| l.strip_prefix("sslkey="))
            .unwrap();
        let mode = std::fs::metadata(key_line).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let proxy_folder = c.web_addr.replace(':', "_");
        let section = services[FOREIGN_SERVICES.len()..]
            .replace(&home, "$HOME")
            .replace(&proxy_folder, "PROXY")
            .replace(&c.postgres_addr.replace("localhost:", "port="), "port=PORT");
        insta::assert_snapshot!("pg_service_section", section);

        // psql with nothing but the service name.
        let (ok_, out, err) = psql(&u, "service=orders", "select current_user");
        assert!(ok_, "{err}");
        assert_eq!(out, "alice");

        // eval $(postern db env), then psql with no arguments at all.
        let script = format!(
            "eval \"$({} db env)\" && psql -X -q -t -A -c 'select body from notes'",
            env!("CARGO_BIN_EXE_postern")
        );
        let out = u.command("sh").args(["-c", &script]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello");

        // db config in its formats.
        let text = ok(&u.run(&["db", "config"], ""));
        let redacted = text
            .replace(&home, "$HOME")
            .replace(&proxy_folder, "PROXY")
            .replace(&c.postgres_addr.replace("localhost:", ""), "PORT");
        insta::assert_snapshot!("db_config_text", redacted);
        let cmd = ok(&u.run(&["db", "config", "--format", "cmd"], ""));
        let out = u
            .command("sh")
            .args(["-c", &format!("{} -X -t -A -c 'select 42'", cmd.trim())])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "42",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // db connect runs psql, and logs in again when the database is not logged in.
        let out = ok(&u.run(
            &[
                "db",
                "connect",
                "orders",
                "--db-name",
                "postgres",
                "--",
                "-X",
                "-t",
                "-A",
                "-c",
                "select 7",
            ],
            "",
        ));
        assert_eq!(out.trim(), "7");

        // db logout: exactly our section goes.
        ok(&u.run(&["db", "logout", "orders"], ""));
        let services = std::fs::read_to_string(u.path().join(".pg_service.conf")).unwrap();
        assert_eq!(services, FOREIGN_SERVICES);
        let listed = ok(&u.run(&["db", "ls"], ""));
        assert!(!listed.contains("> orders"), "{listed}");

        // db connect logs in again by itself.
        let out = u.run(
            &[
                "db",
                "connect",
                "orders",
                "--db-name",
                "postgres",
                "--",
                "-X",
                "-t",
                "-A",
                "-c",
                "select 8",
            ],
            "",
        );
        assert_eq!(ok(&out).trim(), "8");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Logging in to database"));

        // logout removes the profile, the keys and the sections.
        ok(&u.run(&["logout"], ""));
        assert_eq!(
            std::fs::read_to_string(u.path().join(".pg_service.conf")).unwrap(),
            FOREIGN_SERVICES
        );
        let err = fails(&u.run(&["db", "ls"], ""));
        assert!(err.contains("not logged in: run `postern login"), "{err}");
    })
    .await;
}

/// SSLRequest, TLS with the files `db config --format json` names, then the driver.
async fn driver_with_config(config: &serde_json::Value) -> tokio_postgres::Client {
    let host = config["host"].as_str().unwrap().to_owned();
    let port = config["port"].as_u64().unwrap();
    let cas = TrustedCa::from_pem_bundle(
        &std::fs::read_to_string(config["ca"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let cert = CertificateDer::from_pem_file(config["cert"].as_str().unwrap()).unwrap();
    let key = postern_pki::PrivateKey::from_pem(
        &std::fs::read_to_string(config["key"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let tls = postern_pki::tls::mtls_client_config(
        vec![cert],
        key.to_rustls(),
        &cas,
        postern_pki::tls::ring_provider(),
        Arc::new(WallClock::system()),
    )
    .unwrap();
    let mut tcp = Net::Tokio.connect(&format!("{host}:{port}")).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'S');
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from(host).unwrap(), tcp)
        .await
        .unwrap();
    let (client, connection) = tokio_postgres::Config::new()
        .user(config["user"].as_str().unwrap())
        .dbname(config["database"].as_str().unwrap())
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

// GUI path: a driver with only host, port and certificate paths from
// `db config --format json`; then the same through `postern proxy db` with no TLS on
// the client side, where a cancel request also reaches the running query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_with_db_config_and_through_local_proxy() {
    let cluster = Arc::new(TestCluster::start().await);
    let user = Arc::new(UserHome::new());
    let (c, u) = (cluster.clone(), user.clone());
    let config = blocking(move || {
        ok(&login(&u, &c, &[]));
        ok(&u.run(&["db", "login", "orders", "--db-name", "postgres"], ""));
        let json = ok(&u.run(&["db", "config", "--format", "json"], ""));
        serde_json::from_str::<serde_json::Value>(&json).unwrap()
    })
    .await;
    let client = driver_with_config(&config).await;
    let rows = client
        .query("select current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "alice");

    // The local proxy: plaintext on 127.0.0.1, TLS with the user's cert to the proxy.
    let mut child = tokio::process::Command::from(user.postern())
        .args(["proxy", "db", "orders", "--port", "0"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("postern proxy db printed nothing")
    .unwrap();
    let port: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|port| port.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("alice")
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let rows = client.query("select body from notes", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "hello");

    // psql with sslmode=prefer: the local proxy answers its SSLRequest with N.
    let u = user.clone();
    let (ok_, out, err) = blocking(move || {
        psql(
            &u,
            &format!("host=127.0.0.1 port={port} user=alice dbname=postgres sslmode=prefer"),
            "select 'plain'",
        )
    })
    .await;
    assert!(ok_, "{err}");
    assert_eq!(out, "plain");

    // Ctrl+C: a cancel request through the local proxy stops a running query.
    let cancel = client.cancel_token();
    let running = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the cancel did not stop the query")
        .unwrap();
    let error = result.expect_err("the query should have been cancelled");
    assert_eq!(
        error.as_db_error().map(|e| e.code().code()),
        Some("57014"),
        "{error}"
    );
    child.kill().await.unwrap();
}

// Every error a person can act on says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_to_do() {
    let cluster = Arc::new(TestCluster::start().await);
    let user = Arc::new(UserHome::new());
    let (c, u) = (cluster.clone(), user.clone());
    blocking(move || {
        // Proxy unreachable: a port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("localhost:{}", closed.local_addr().unwrap().port());
        drop(closed);
        let ca = c.host_ca_file.display().to_string();
        let err = fails(&u.run(
            &[
                "login",
                "--proxy",
                &addr,
                "--user",
                "alice",
                "--password-stdin",
                "--ca-file",
                &ca,
            ],
            "x\n",
        ));
        assert!(
            err.contains(&format!("cannot reach the proxy at {addr}")),
            "{err}"
        );
        assert!(err.contains("Check the address and port"), "{err}");

        // Wrong password.
        let err = fails(&u.run(
            &[
                "login",
                "--proxy",
                &c.web_addr,
                "--user",
                "alice",
                "--password-stdin",
                "--ca-file",
                &ca,
            ],
            "wrong\n",
        ));
        assert!(err.contains("login failed for user \"alice\""), "{err}");

        // No CA to trust yet.
        let err = fails(&u.run(
            &[
                "login",
                "--proxy",
                &c.web_addr,
                "--user",
                "alice",
                "--password-stdin",
            ],
            &format!("{PASSWORD}\n"),
        ));
        assert!(err.contains("--ca-file"), "{err}");

        // Unknown database: the message lists the ones that exist.
        ok(&login(&u, &c, &[]));
        let err = fails(&u.run(&["db", "login", "nosuch"], ""));
        assert!(
            err.contains("unknown database \"nosuch\"; databases you can use: orders"),
            "{err}"
        );
        // A database the roles do not match is unknown to this user too.
        let err = fails(&u.run(&["db", "login", "billing"], ""));
        assert!(
            err.contains("unknown database \"billing\"; databases you can use: orders"),
            "{err}"
        );

        // No access: the roles' refusal, naming what failed.
        let err = fails(&u.run(&["db", "login", "orders", "--db-user", "postgres"], ""));
        assert!(err.contains("no access to database \"orders\""), "{err}");
        assert!(err.contains("postgres"), "{err}");

        // Expired login: a 1-second login, then a command after it ended.
        ok(&login(&u, &c, &["--ttl", "1s"]));
        std::thread::sleep(Duration::from_millis(2100));
        let err = fails(&u.run(&["db", "ls"], ""));
        assert!(err.contains("expired"), "{err}");
        assert!(err.contains("run `postern login --proxy"), "{err}");
        let status = ok(&u.run(&["status"], ""));
        assert!(status.contains("EXPIRED"), "{status}");
    })
    .await;
}

// A user with a second factor: refused with the password alone, logged in with the
// TOTP code on the second line of stdin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_second_factor_from_stdin() {
    let cluster = Arc::new(TestCluster::start().await);
    let user = Arc::new(UserHome::new());
    let (c, u) = (cluster.clone(), user.clone());
    blocking(move || {
        let ca = c.host_ca_file.display().to_string();
        let args = [
            "login",
            "--proxy",
            &c.web_addr,
            "--user",
            "bob",
            "--password-stdin",
            "--ca-file",
            &ca,
        ];
        let err = fails(&u.run(&args, &format!("{PASSWORD}\n")));
        assert!(err.contains("login failed for user \"bob\""), "{err}");
        let code = c.bob_totp.code_at(WallClock::system().now().as_secs());
        let out = ok(&u.run(&args, &format!("{PASSWORD}\n{code}\n")));
        assert!(out.contains("Logged in as: bob"), "{out}");
    })
    .await;
}
