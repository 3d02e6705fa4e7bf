//! The auth server's audited operations: users, roles, login, join tokens, registry.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use postern_auth::Error;
use postern_auth::audit::{AuditLog, AuditQuery, FileAuditLog};
use postern_auth::backend::MemoryBackend;
use postern_auth::database::{Database, Protocol};
use postern_auth::limiter::LoginLimits;
use postern_auth::role::parse_role_file;
use postern_auth::server::{AuthConfig, AuthServer, TokenKind};
use postern_auth::user::{PasswordCost, Traits};
use postern_rt::{Rng, WallClock};
use rustls_pki_types::UnixTime;

const START_SECS: u64 = 1_800_000_000;
const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const PASSWORD: &str = "correct horse battery staple";

struct Fixture {
    server: AuthServer<MemoryBackend, FileAuditLog>,
    clock: WallClock,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let clock = WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(START_SECS)));
    let dir = tempfile::tempdir().unwrap();
    let backend = MemoryBackend::new(std::sync::Arc::new(clock.clone()));
    let audit = FileAuditLog::open(dir.path()).unwrap();
    let config = AuthConfig {
        cluster: "test".into(),
        password_cost: PasswordCost {
            memory_kib: 64,
            passes: 1,
        },
        login_limits: LoginLimits::default(),
    };
    let server = AuthServer::new(backend, audit, clock.clone(), Rng::from_seed(1), config).unwrap();
    Fixture {
        server,
        clock,
        _dir: dir,
    }
}

async fn codes(fixture: &Fixture) -> Vec<String> {
    let now =
        time::OffsetDateTime::from_unix_timestamp(fixture.clock.now().as_secs() as i64).unwrap();
    let query = AuditQuery::between(now - time::Duration::days(2), now + time::Duration::days(1));
    let events = fixture.server.audit_log().search(&query).await.unwrap();
    // The manual clock stands still, so events tie on time (then order by random id):
    // compare them sorted.
    let mut codes: Vec<String> = events
        .into_iter()
        .map(|event| format!("{} {}", event.event, event.code))
        .collect();
    codes.sort();
    codes
}

fn sorted(codes: &[&str]) -> Vec<String> {
    let mut codes: Vec<String> = codes.iter().map(|code| code.to_string()).collect();
    codes.sort();
    codes
}

// A right password logs in; a wrong one or an unknown user fails the same way; all are audited.
#[tokio::test]
async fn login_checks_password_and_is_audited() {
    let f = fixture();
    f.server
        .create_user(
            "admin",
            "alice",
            vec!["dev".into()],
            Traits::default(),
            Some(PASSWORD),
            false,
        )
        .await
        .unwrap();
    let user = f
        .server
        .authenticate("alice", PASSWORD, None, SOURCE)
        .await
        .unwrap();
    assert_eq!(user.roles, ["dev"]);
    let wrong = f
        .server
        .authenticate("alice", "wrong password!!", None, SOURCE)
        .await
        .unwrap_err();
    let unknown = f
        .server
        .authenticate("mallory", PASSWORD, None, SOURCE)
        .await
        .unwrap_err();
    assert!(matches!(wrong, Error::LoginFailed { .. }), "{wrong}");
    assert!(matches!(unknown, Error::LoginFailed { .. }), "{unknown}");
    assert_eq!(
        codes(&f).await,
        sorted(&[
            "auth.user.created TAU02I",
            "auth.login TAU00I",
            "auth.login TAU00W",
            "auth.login TAU00W"
        ])
    );
}

// With TOTP, the code is required, must be right, and is good only once.
#[tokio::test]
async fn login_with_totp() {
    let f = fixture();
    let totp = f
        .server
        .create_user(
            "admin",
            "bob",
            vec![],
            Traits::default(),
            Some(PASSWORD),
            true,
        )
        .await
        .unwrap()
        .expect("a TOTP secret is returned");
    let code = totp.code_at(f.clock.now().as_secs());
    let wrong = if code == "000000" { "000001" } else { "000000" };
    assert!(
        f.server
            .authenticate("bob", PASSWORD, None, SOURCE)
            .await
            .is_err(),
        "code required"
    );
    assert!(
        f.server
            .authenticate("bob", PASSWORD, Some(wrong), SOURCE)
            .await
            .is_err()
    );
    f.server
        .authenticate("bob", PASSWORD, Some(&code), SOURCE)
        .await
        .unwrap();
    assert!(
        f.server
            .authenticate("bob", PASSWORD, Some(&code), SOURCE)
            .await
            .is_err(),
        "replay refused"
    );
    f.clock.advance(Duration::from_secs(30));
    let next = totp.code_at(f.clock.now().as_secs());
    f.server
        .authenticate("bob", PASSWORD, Some(&next), SOURCE)
        .await
        .unwrap();
}

// After five failures a user is locked even with the right password, until the window passes.
#[tokio::test]
async fn failed_logins_are_rate_limited() {
    let f = fixture();
    f.server
        .create_user(
            "admin",
            "carol",
            vec![],
            Traits::default(),
            Some(PASSWORD),
            false,
        )
        .await
        .unwrap();
    for _ in 0..5 {
        assert!(matches!(
            f.server
                .authenticate("carol", "not the password", None, SOURCE)
                .await,
            Err(Error::LoginFailed { .. })
        ));
    }
    let locked = f
        .server
        .authenticate("carol", PASSWORD, None, SOURCE)
        .await
        .unwrap_err();
    assert!(
        matches!(
            locked,
            Error::RateLimited {
                retry_after_secs: 900,
                ..
            }
        ),
        "{locked}"
    );
    f.clock.advance(Duration::from_secs(15 * 60));
    f.server
        .authenticate("carol", PASSWORD, None, SOURCE)
        .await
        .unwrap();
}

// User and role changes are applied and each leaves an audit event naming the actor.
#[tokio::test]
async fn admin_changes_are_audited() {
    let f = fixture();
    f.server
        .create_user(
            "root",
            "dave",
            vec![],
            Traits::default(),
            Some(PASSWORD),
            false,
        )
        .await
        .unwrap();
    f.server
        .reset_password("root", "dave", "another long password", false)
        .await
        .unwrap();
    assert!(
        f.server
            .authenticate("dave", "another long password", None, SOURCE)
            .await
            .is_ok()
    );
    let roles = parse_role_file("r.toml", "[[role]]\nname = \"dev\"\n").unwrap();
    assert_eq!(f.server.apply_roles("root", &roles).await.unwrap(), [false]);
    f.server.delete_role("root", "dev").await.unwrap();
    f.server.delete_user("root", "dave").await.unwrap();
    assert_eq!(
        codes(&f).await,
        sorted(&[
            "auth.login TAU00I",
            "auth.role.deleted TAU06I",
            "auth.role.upserted TAU05I",
            "auth.user.created TAU02I",
            "auth.user.deleted TAU04I",
            "auth.user.updated TAU03I",
        ])
    );
}

// A join token works once, for its kind of host only, and not after it expires.
#[tokio::test]
async fn join_tokens_are_single_use_and_expire() {
    let f = fixture();
    let token = f
        .server
        .create_join_token("root", TokenKind::Db, Duration::from_secs(60))
        .await
        .unwrap();
    let wrong_kind = f
        .server
        .consume_join_token(&token, TokenKind::Proxy, "p1")
        .await
        .unwrap_err();
    assert!(
        wrong_kind.to_string().contains("for a db host"),
        "{wrong_kind}"
    );
    f.server
        .consume_join_token(&token, TokenKind::Db, "agent-1")
        .await
        .unwrap();
    assert!(matches!(
        f.server
            .consume_join_token(&token, TokenKind::Db, "agent-2")
            .await,
        Err(Error::TokenRefused { .. })
    ));
    let late = f
        .server
        .create_join_token("root", TokenKind::Proxy, Duration::from_secs(60))
        .await
        .unwrap();
    f.clock.advance(Duration::from_secs(60));
    assert!(matches!(
        f.server
            .consume_join_token(&late, TokenKind::Proxy, "p1")
            .await,
        Err(Error::TokenRefused { .. })
    ));
    assert!(
        f.server
            .create_join_token("root", TokenKind::Db, Duration::ZERO)
            .await
            .is_err()
    );
    let codes = codes(&f).await;
    assert_eq!(
        codes.iter().filter(|c| c.ends_with("TAU08W")).count(),
        3,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| c.ends_with("TAU08I")).count(),
        1,
        "{codes:?}"
    );
}

fn database(name: &str, env: &str) -> Database {
    Database {
        name: name.into(),
        description: format!("{env} database"),
        protocol: Protocol::Postgres,
        uri: "localhost:5432".into(),
        labels: BTreeMap::from([("env".into(), env.into())]),
    }
}

// Announced databases are listed by role, vanish when their lease ends, and stay with keep-alives.
#[tokio::test]
async fn registry_leases_and_filtering() {
    let f = fixture();
    let roles = parse_role_file(
        "r.toml",
        "[[role]]\nname = \"dev\"\nallow.db_labels = { env = \"dev\" }\n",
    )
    .unwrap();
    f.server.apply_roles("root", &roles).await.unwrap();
    f.server
        .create_user(
            "root",
            "erin",
            vec!["dev".into()],
            Traits::default(),
            Some(PASSWORD),
            false,
        )
        .await
        .unwrap();
    let erin = f.server.state().user("erin").await.unwrap();
    let ttl = Duration::from_secs(600);
    let a1 = f
        .server
        .announce_database("agent-1", &database("dev-pg", "dev"), ttl)
        .await
        .unwrap();
    f.server
        .announce_database("agent-2", &database("dev-pg", "dev"), ttl)
        .await
        .unwrap();
    f.server
        .announce_database("agent-1", &database("prod-pg", "prod"), ttl)
        .await
        .unwrap();

    let all = f.server.list_databases(None).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|d| d.database.name.as_str())
            .collect::<Vec<_>>(),
        ["dev-pg", "prod-pg"]
    );
    assert_eq!(all[0].host_ids, ["agent-1", "agent-2"]);
    let visible = f.server.list_databases(Some(&erin)).await.unwrap();
    assert_eq!(
        visible
            .iter()
            .map(|d| d.database.name.as_str())
            .collect::<Vec<_>>(),
        ["dev-pg"]
    );

    f.clock.advance(Duration::from_secs(500));
    f.server
        .keep_database_alive("agent-1", "dev-pg", a1, ttl)
        .await
        .unwrap();
    f.clock.advance(Duration::from_secs(100));
    assert_eq!(
        f.server.expire().await.unwrap(),
        2,
        "agent-2's and prod-pg's leases ended"
    );
    let servers = f.server.servers_of("dev-pg").await.unwrap();
    assert_eq!(
        servers
            .iter()
            .map(|s| s.host_id.as_str())
            .collect::<Vec<_>>(),
        ["agent-1"]
    );
    assert!(
        f.server
            .withdraw_database("agent-1", "dev-pg")
            .await
            .unwrap()
    );
    assert_eq!(f.server.list_databases(None).await.unwrap(), []);
    assert!(
        f.server
            .announce_database("bad id", &database("x", "dev"), ttl)
            .await
            .is_err()
    );
}

// A login with an impossible or huge user name is refused and audited with a bounded name.
#[tokio::test]
async fn malformed_login_names_are_refused() {
    let f = fixture();
    let huge = "x".repeat(100_000);
    for name in ["", "semi;colon", huge.as_str()] {
        let error = f
            .server
            .authenticate(name, PASSWORD, None, SOURCE)
            .await
            .unwrap_err();
        assert!(matches!(error, Error::LoginFailed { .. }), "{error}");
    }
    assert_eq!(codes(&f).await, sorted(&["auth.login TAU00W"; 3]));
}
