//! The admin commands, run as a user would: the real binary on a fresh data folder.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn postern(data_dir: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .env("POSTERN_DATA_DIR", data_dir)
        .env("USER", "tester")
        .env_remove("POSTERN_POSTGRES")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    Run {
        ok: status.success(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

fn ok(data_dir: &Path, args: &[&str]) -> String {
    let run = postern(data_dir, args, None);
    assert!(run.ok, "postern {args:?} failed: {}", run.stderr);
    run.stdout
}

const ROLES: &str = r#"
[[role]]
name = "dev"
options = { max_session_ttl = "8h" }
allow.db_labels = { env = "dev" }
allow.db_users = ["{{internal.db_users}}"]
allow.db_names = ["*"]
deny.db_users = ["postgres"]
"#;

// Users and roles are created, listed, changed and removed; each change is in the audit log.
#[test]
fn users_roles_and_audit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let roles = data.join("roles.toml");
    std::fs::write(&roles, ROLES).unwrap();

    assert_eq!(
        ok(data, &["admin", "roles", "apply", roles.to_str().unwrap()]),
        "Role \"dev\" created.\n"
    );
    assert_eq!(
        ok(data, &["admin", "roles", "apply", roles.to_str().unwrap()]),
        "Role \"dev\" updated.\n"
    );
    let listed = ok(data, &["admin", "roles", "ls"]);
    assert!(
        listed.contains("labels: env=dev; users: {{internal.db_users}}; names: *"),
        "{listed}"
    );
    assert!(
        listed.contains("users: postgres") && listed.contains("8h"),
        "{listed}"
    );

    let added = ok(
        data,
        &[
            "admin",
            "users",
            "add",
            "alice",
            "--roles",
            "dev",
            "--db-users",
            "alice,app",
            "--trait",
            "team=red",
            "--totp",
        ],
    );
    assert!(added.contains("Password: "), "{added}");
    assert!(
        added.contains("otpauth://totp/Postern:alice?secret="),
        "{added}"
    );
    let run = postern(
        data,
        &[
            "admin",
            "users",
            "add",
            "bob",
            "--roles",
            "dev",
            "--password-stdin",
        ],
        Some("a long enough password\n"),
    );
    assert!(run.ok, "{}", run.stderr);
    assert!(
        !run.stderr.contains("warning"),
        "dev exists: {}",
        run.stderr
    );
    let typo = postern(
        data,
        &["admin", "users", "add", "carl", "--roles", "dve"],
        None,
    );
    assert!(
        typo.ok && typo.stderr.contains("role \"dve\" does not exist"),
        "{}",
        typo.stderr
    );
    ok(data, &["admin", "users", "rm", "carl"]);
    assert!(
        !run.stdout.contains("Password: "),
        "no password printed when given: {}",
        run.stdout
    );
    let duplicate = postern(
        data,
        &["admin", "users", "add", "bob", "--roles", "dev"],
        None,
    );
    assert!(
        !duplicate.ok && duplicate.stderr.contains("already exists"),
        "{}",
        duplicate.stderr
    );

    let users = ok(data, &["admin", "users", "ls"]);
    assert!(
        users.contains("alice  dev    db_users=alice|app,team=red  yes"),
        "{users}"
    );
    let json = ok(data, &["admin", "users", "ls", "--format", "json"]);
    assert_eq!(json.lines().count(), 2);

    let reset = ok(data, &["admin", "users", "reset-password", "bob"]);
    assert!(reset.contains("Password: "), "{reset}");
    ok(data, &["admin", "users", "rm", "bob"]);
    let missing = postern(data, &["admin", "users", "rm", "bob"], None);
    assert!(
        !missing.ok && missing.stderr.contains("not found"),
        "{}",
        missing.stderr
    );
    ok(data, &["admin", "roles", "rm", "dev"]);
    assert_eq!(
        ok(data, &["admin", "roles", "ls"]).lines().count(),
        1,
        "header only"
    );

    let events = ok(data, &["audit", "search"]);
    let codes: Vec<&str> = events
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["user"], "admin:tester");
            if value["event"] == "auth.role.upserted" {
                "role+"
            } else if value["event"] == "auth.role.deleted" {
                "role-"
            } else if value["event"] == "auth.user.created" {
                "user+"
            } else if value["event"] == "auth.user.updated" {
                "user~"
            } else if value["event"] == "auth.user.deleted" {
                "user-"
            } else {
                "other"
            }
        })
        .collect();
    assert_eq!(
        codes,
        [
            "role+", "role+", "user+", "user+", "user+", "user-", "user~", "user-", "role-"
        ]
    );
    let filtered = ok(data, &["audit", "search", "--event", "auth.user.created"]);
    assert_eq!(filtered.lines().count(), 3);
}

// A malformed role file is refused with file, line and field, and nothing is stored.
#[test]
fn bad_role_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let bad = data.join("bad.toml");
    std::fs::write(
        &bad,
        "[[role]]\nname = \"x\"\nallow.db_users = [\"{{internal.logins}}\"]\n",
    )
    .unwrap();
    let run = postern(
        data,
        &["admin", "roles", "apply", bad.to_str().unwrap()],
        None,
    );
    assert!(!run.ok);
    assert!(
        run.stderr
            .contains("bad.toml:3: role \"x\": allow.db_users[0]"),
        "{}",
        run.stderr
    );
    assert_eq!(
        ok(data, &["admin", "roles", "ls"]).lines().count(),
        1,
        "nothing applied"
    );
}

// Tokens, database server certs and CA rotation work from the command line.
#[test]
fn tokens_certs_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let token = ok(
        data,
        &["admin", "tokens", "add", "--type", "proxy", "--ttl", "5m"],
    );
    assert_eq!(token.trim().len(), 64, "{token}");
    let bad_ttl = postern(
        data,
        &["admin", "tokens", "add", "--type", "db", "--ttl", "5"],
        None,
    );
    assert!(
        !bad_ttl.ok && bad_ttl.stderr.contains("--ttl"),
        "{}",
        bad_ttl.stderr
    );

    let out = data.join("server");
    let signed = ok(
        data,
        &[
            "admin",
            "auth",
            "sign",
            "--format",
            "db",
            "--host",
            "db.internal,10.0.0.5",
            "--out",
            out.to_str().unwrap(),
            "--ttl",
            "2190h",
        ],
    );
    assert!(signed.contains("hostssl all all ::/0 cert"), "{signed}");
    let key = data.join("server.key");
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .contains("PRIVATE KEY")
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        std::fs::read_to_string(data.join("server.crt"))
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let again = postern(
        data,
        &[
            "admin",
            "auth",
            "sign",
            "--format",
            "db",
            "--host",
            "db.internal",
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        !again.ok && again.stderr.contains("exists"),
        "never overwrites: {}",
        again.stderr
    );

    let phases: Vec<String> = (0..4)
        .map(|_| {
            ok(data, &["admin", "auth", "rotate", "--type", "user"])
                .trim()
                .to_owned()
        })
        .collect();
    assert_eq!(
        phases,
        [
            "user CA rotation: now in phase init",
            "user CA rotation: now in phase update_clients",
            "user CA rotation: now in phase update_servers",
            "user CA rotation: now in phase standby",
        ]
    );
    assert_eq!(
        ok(data, &["admin", "db", "ls"]).trim(),
        "NAME  PROTOCOL  DESCRIPTION  LABELS  AGENTS"
    );
}

const POSTGRES: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

/// A schema no other run uses, dropped (with its tables) when the test ends.
struct Schema(String);

impl Schema {
    fn unique() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // std's hasher keys are random per process: enough to tell parallel runs apart.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self(format!(
            "postern_cli_{}_{:08x}",
            std::process::id(),
            random as u32
        ))
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dropped = runtime.block_on(async {
            let (client, connection) =
                tokio_postgres::connect(POSTGRES, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client.batch_execute(&sql).await
        });
        if let Err(error) = dropped {
            eprintln!("could not drop schema {}: {error}", self.0);
        }
    }
}

// PostgreSQL: users, roles and audit events written by one process are there for the next.
#[test]
fn postgres_state_and_audit_survive_process_exit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let schema = Schema::unique();
    let pg = |args: &[&str]| {
        let mut all = vec![
            "--postgres",
            POSTGRES,
            "--postgres-schema",
            schema.0.as_str(),
        ];
        all.extend_from_slice(args);
        ok(data, &all)
    };
    let roles = data.join("roles.toml");
    std::fs::write(&roles, ROLES).unwrap();
    pg(&["admin", "roles", "apply", roles.to_str().unwrap()]);
    pg(&["admin", "users", "add", "carol", "--roles", "dev"]);
    assert!(pg(&["admin", "users", "ls"]).contains("carol  dev"));
    assert!(pg(&["admin", "roles", "ls"]).contains("dev"));
    let events = pg(&["audit", "search"]);
    assert_eq!(events.lines().count(), 2, "{events}");
    assert!(!data.join("state.db").exists(), "nothing went to SQLite");
}
