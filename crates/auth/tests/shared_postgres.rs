//! Several auth servers sharing one PostgreSQL database: one set of CAs, users, tokens
//! and audit events, whichever server a request reaches.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use postern_auth::Error;
use postern_auth::audit::{AuditLog, AuditQuery, PostgresAuditLog};
use postern_auth::backend::PostgresBackend;
use postern_auth::limiter::LoginLimits;
use postern_auth::server::{AuthConfig, AuthServer, TokenKind};
use postern_auth::user::{PasswordCost, Traits};
use postern_pki::{PrivateKey, Purpose};
use postern_rt::{Rng, WallClock};
use rustls_pki_types::UnixTime;
use support::PostgresSchema;

const PASSWORD: &str = "correct horse battery staple";

async fn auth_server(
    schema: &str,
    clock: &WallClock,
    seed: u64,
) -> AuthServer<PostgresBackend, PostgresAuditLog> {
    let backend = PostgresBackend::connect(support::POSTGRES, schema, Arc::new(clock.clone()))
        .await
        .unwrap();
    let audit = PostgresAuditLog::connect(support::POSTGRES, schema)
        .await
        .unwrap();
    let config = AuthConfig {
        cluster: "ha".into(),
        password_cost: PasswordCost {
            memory_kib: 64,
            passes: 1,
        },
        login_limits: LoginLimits::default(),
    };
    AuthServer::new(backend, audit, clock.clone(), Rng::from_seed(seed), config).unwrap()
}

// Two auth servers on one schema: CAs created once under a race, users, tokens and audit shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_auth_servers_share_one_database() {
    let schema = PostgresSchema::unique();
    let clock = WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(
        1_800_000_000,
    )));
    let a = auth_server(&schema.name, &clock, 1).await;
    let b = auth_server(&schema.name, &clock, 2).await;
    // Both create the CAs at once: one wins, the other adopts them.
    let (created_a, created_b) = tokio::join!(a.ensure_cas(), b.ensure_cas());
    created_a.unwrap();
    created_b.unwrap();
    assert_eq!(
        a.trusted_cas()
            .await
            .unwrap()
            .iter()
            .map(|ca| ca.key_id().to_vec())
            .collect::<Vec<_>>(),
        b.trusted_cas()
            .await
            .unwrap()
            .iter()
            .map(|ca| ca.key_id().to_vec())
            .collect::<Vec<_>>(),
    );

    a.create_user(
        "root",
        "alice",
        vec![],
        Traits::default(),
        Some(PASSWORD),
        false,
    )
    .await
    .unwrap();
    let key = PrivateKey::generate().unwrap();
    let source = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let login = b
        .login("alice", PASSWORD, None, source, &key.public_key(), None)
        .await
        .unwrap();
    a.validator()
        .await
        .unwrap()
        .verify_identity(login.cert.der(), Purpose::UserLogin, clock.now())
        .unwrap();

    let token = a
        .create_join_token("root", TokenKind::Db, Duration::from_secs(60))
        .await
        .unwrap();
    b.consume_join_token(&token, TokenKind::Db, "agent-1")
        .await
        .unwrap();
    assert!(matches!(
        a.consume_join_token(&token, TokenKind::Db, "agent-2").await,
        Err(Error::TokenRefused { .. })
    ));

    let all = AuditQuery::between(
        time::OffsetDateTime::UNIX_EPOCH,
        time::macros::datetime!(2100-01-01 0:00 UTC),
    );
    let from_a = a.audit_log().search(&all).await.unwrap();
    assert_eq!(from_a, b.audit_log().search(&all).await.unwrap());
    let codes: Vec<&str> = from_a.iter().map(|event| event.code.as_str()).collect();
    for code in ["TAU02I", "TAU00I", "TAU01I", "TAU07I", "TAU08I", "TAU08W"] {
        assert!(codes.contains(&code), "{code} missing from {codes:?}");
    }
}
