//! The audit log contract, run against the JSON-lines files and the PostgreSQL table.

mod support;

use postern_auth::Error;
use postern_auth::audit::{
    AuditEvent, AuditLog, AuditQuery, FileAuditLog, PostgresAuditLog, codes,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use support::PostgresSchema;
use time::OffsetDateTime;
use time::macros::datetime;

const T0: OffsetDateTime = datetime!(2026-11-23 23:59:58 UTC);

fn events(rng: &mut ChaCha20Rng) -> Vec<AuditEvent> {
    let at = |secs: i64| T0 + time::Duration::seconds(secs);
    let mut session =
        AuditEvent::new(("db.session.start", "TDB00I"), at(0), rng).with_user("alice");
    session.session_id = Some("s1".into());
    let mut query = AuditEvent::new(("db.session.query", "TDB02I"), at(3), rng)
        .with_user("alice")
        .with_field("query", "select 1");
    query.session_id = Some("s1".into());
    vec![
        session,
        query,
        AuditEvent::new(codes::LOGIN, at(1), rng).with_user("bob"),
        AuditEvent::new(codes::LOGIN_FAILURE, at(5), rng)
            .with_user("alice")
            .with_error("wrong password"),
    ]
}

fn ids(events: &[AuditEvent]) -> Vec<&str> {
    events.iter().map(|event| event.event.as_str()).collect()
}

// Emitted events come back by time range, event type, user and session; resent ones are stored once.
async fn contract(log: &impl AuditLog) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let batch = events(&mut rng);
    assert_eq!(log.emit(&batch).await.unwrap(), 4);
    // Resending the batch (and a duplicate inside one batch) stores nothing new.
    assert_eq!(log.emit(&batch).await.unwrap(), 0);
    assert_eq!(
        log.emit(&[batch[0].clone(), batch[0].clone()])
            .await
            .unwrap(),
        0
    );

    let all = AuditQuery::between(T0, T0 + time::Duration::hours(1));
    let found = log.search(&all).await.unwrap();
    assert_eq!(
        ids(&found),
        [
            "db.session.start",
            "auth.login",
            "db.session.query",
            "auth.login"
        ]
    );
    assert_eq!(found[2], batch[1], "events round-trip field for field");

    let by_user = AuditQuery {
        user: Some("alice".into()),
        ..all.clone()
    };
    assert_eq!(log.search(&by_user).await.unwrap().len(), 3);
    let by_event = AuditQuery {
        event: Some("auth.login".into()),
        ..all.clone()
    };
    let logins = log.search(&by_event).await.unwrap();
    assert_eq!(
        logins.iter().map(|e| e.code.as_str()).collect::<Vec<_>>(),
        ["TAU00I", "TAU00W"]
    );
    let by_session = AuditQuery {
        session_id: Some("s1".into()),
        ..all.clone()
    };
    assert_eq!(
        ids(&log.search(&by_session).await.unwrap()),
        ["db.session.start", "db.session.query"]
    );
    // The range is [from, to): it crosses midnight UTC here, so two day files for the files log.
    let range = AuditQuery::between(
        T0 + time::Duration::seconds(1),
        T0 + time::Duration::seconds(5),
    );
    assert_eq!(
        ids(&log.search(&range).await.unwrap()),
        ["auth.login", "db.session.query"]
    );
    let limited = AuditQuery {
        limit: 1,
        ..all.clone()
    };
    assert_eq!(log.search(&limited).await.unwrap().len(), 1);
    let empty = AuditQuery::between(T0 - time::Duration::days(3), T0 - time::Duration::days(2));
    assert_eq!(log.search(&empty).await.unwrap(), []);

    // Oversize events and empty ids are refused.
    let mut big = AuditEvent::new(codes::LOGIN, T0, &mut rng);
    big.fields.insert("blob".into(), "x".repeat(70_000).into());
    assert!(matches!(
        log.emit(&[big]).await,
        Err(Error::InvalidInput { .. })
    ));
    let mut no_id = AuditEvent::new(codes::LOGIN, T0, &mut rng);
    no_id.id.clear();
    assert!(matches!(
        log.emit(&[no_id]).await,
        Err(Error::InvalidInput { .. })
    ));
}

#[tokio::test]
async fn memory_contract() {
    contract(&postern_auth::audit::MemoryAuditLog::new()).await;
}

#[tokio::test]
async fn files_contract() {
    let dir = tempfile::tempdir().unwrap();
    let log = FileAuditLog::open(dir.path()).unwrap();
    contract(&log).await;
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["2026-11-23.jsonl", "2026-11-24.jsonl"],
        "one file per UTC day"
    );
}

#[tokio::test]
async fn postgres_contract() {
    let schema = PostgresSchema::unique();
    let log = PostgresAuditLog::connect(support::POSTGRES, &schema.name)
        .await
        .unwrap();
    contract(&log).await;
}

// Files: events written before the process exits are all there after reopening, and still deduplicated.
#[tokio::test]
async fn files_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let batch = events(&mut rng);
    FileAuditLog::open(dir.path())
        .unwrap()
        .emit(&batch)
        .await
        .unwrap();
    let reopened = FileAuditLog::open(dir.path()).unwrap();
    let all = AuditQuery::between(T0, T0 + time::Duration::hours(1));
    assert_eq!(reopened.search(&all).await.unwrap().len(), 4);
    assert_eq!(
        reopened.emit(&batch).await.unwrap(),
        0,
        "ids are reloaded from the files"
    );
}

// PostgreSQL: events written before the process exits are all there after reconnecting.
#[tokio::test]
async fn postgres_survives_restart() {
    let schema = PostgresSchema::unique();
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let batch = events(&mut rng);
    PostgresAuditLog::connect(support::POSTGRES, &schema.name)
        .await
        .unwrap()
        .emit(&batch)
        .await
        .unwrap();
    let reopened = PostgresAuditLog::connect(support::POSTGRES, &schema.name)
        .await
        .unwrap();
    let all = AuditQuery::between(T0, T0 + time::Duration::hours(1));
    assert_eq!(reopened.search(&all).await.unwrap().len(), 4);
    assert_eq!(reopened.emit(&batch).await.unwrap(), 0);
}

// A torn last line (crash mid-append) is cut on the next write; everything before it stays.
#[tokio::test]
async fn files_cut_a_torn_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let first = AuditEvent::new(codes::LOGIN, T0 + time::Duration::seconds(10), &mut rng);
    FileAuditLog::open(dir.path())
        .unwrap()
        .emit(std::slice::from_ref(&first))
        .await
        .unwrap();
    let path = dir.path().join("2026-11-24.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"id\":\"torn");
    std::fs::write(&path, &text).unwrap();

    let log = FileAuditLog::open(dir.path()).unwrap();
    let all = AuditQuery::between(T0, T0 + time::Duration::hours(1));
    assert_eq!(
        log.search(&all).await.unwrap(),
        std::slice::from_ref(&first),
        "search skips the torn line"
    );
    let second = AuditEvent::new(codes::LOGIN, T0 + time::Duration::seconds(11), &mut rng);
    assert_eq!(log.emit(std::slice::from_ref(&second)).await.unwrap(), 1);
    assert_eq!(log.search(&all).await.unwrap(), [first, second]);
    assert!(!std::fs::read_to_string(&path).unwrap().contains("torn"));
}

// PostgreSQL: when the server drops the audit log's session, the call reconnects and retries.
#[tokio::test]
async fn postgres_reconnects_after_its_session_drops() {
    let schema = PostgresSchema::unique();
    let log = PostgresAuditLog::connect(support::POSTGRES, &schema.name)
        .await
        .unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let batch = events(&mut rng);
    assert_eq!(log.emit(&batch[..2]).await.unwrap(), 2);
    let (admin, connection) = tokio_postgres::connect(support::POSTGRES, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let killed = admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("postern audit {}", schema.name)],
        )
        .await
        .unwrap();
    assert_eq!(killed, 1);
    // The emit finds the session gone, reconnects and sends the batch again by itself.
    assert_eq!(log.emit(&batch[2..]).await.unwrap(), 2);
    let all = AuditQuery::between(T0, T0 + time::Duration::hours(1));
    assert_eq!(log.search(&all).await.unwrap().len(), 4);
}
