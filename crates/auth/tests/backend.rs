//! One conformance suite, run against every state backend.
//!
//! Each backend gets a fresh, isolated store per test: the in-memory backend, a SQLite
//! file in a temporary folder, and a PostgreSQL schema with a unique name on the
//! server at 127.0.0.1:5432 (dropped again when the test ends). Time is a manual clock
//! that only the test moves.

mod support;

use std::time::Duration;

use postern_auth::Error;
use postern_auth::backend::{Backend, Event, Expect, Item, Revision, Watcher};
use support::ManualClock;

/// How long a test waits for a watch event before failing.
const EVENT_WAIT: Duration = Duration::from_secs(5);

async fn next_event(watcher: &mut Watcher) -> Event {
    match tokio::time::timeout(EVENT_WAIT, watcher.next()).await {
        Ok(Ok(event)) => event,
        Ok(Err(error)) => panic!("watcher failed: {error}"),
        Err(_) => panic!("no watch event within {EVENT_WAIT:?}"),
    }
}

fn keys(items: &[Item]) -> Vec<&str> {
    items.iter().map(|item| item.key.as_str()).collect()
}

// Put then get returns the value; revisions grow with every write.
async fn put_get_and_revisions(backend: &impl Backend, _clock: &ManualClock) {
    assert_eq!(backend.get("/users/alice").await.unwrap(), None);
    let first = backend.put("/users/alice", b"one", None).await.unwrap();
    let second = backend.put("/users/bob", b"two", None).await.unwrap();
    let third = backend.put("/users/alice", b"three", None).await.unwrap();
    assert!(
        first < second && second < third,
        "{first:?} {second:?} {third:?}"
    );
    let alice = backend.get("/users/alice").await.unwrap().unwrap();
    assert_eq!(alice.value, b"three");
    assert_eq!(alice.revision, third);
    assert_eq!(alice.expires, None);
}

// Prefix reads return exactly the keys under the prefix, sorted, and nothing beside it.
async fn prefix_reads(backend: &impl Backend, _clock: &ManualClock) {
    for key in [
        "/roles/b",
        "/roles/a",
        "/roles/a/x",
        "/rolesx",
        "/role",
        "/users/a",
    ] {
        backend.put(key, key.as_bytes(), None).await.unwrap();
    }
    let roles = backend.list("/roles/").await.unwrap();
    assert_eq!(keys(&roles), ["/roles/a", "/roles/a/x", "/roles/b"]);
    assert_eq!(roles[0].value, b"/roles/a");
    assert_eq!(backend.list("/nothing/").await.unwrap(), []);
    assert_eq!(backend.list("").await.unwrap().len(), 6);
    assert_eq!(backend.delete_prefix("/roles/").await.unwrap(), 3);
    assert_eq!(
        keys(&backend.list("").await.unwrap()),
        ["/role", "/rolesx", "/users/a"]
    );
}

// Compare-and-swap succeeds only from the expected state and reports a conflict otherwise.
async fn compare_and_swap(backend: &impl Backend, _clock: &ManualClock) {
    let created = backend
        .compare_and_swap("/k", Expect::Absent, b"v1", None)
        .await
        .unwrap();
    let again = backend
        .compare_and_swap("/k", Expect::Absent, b"v2", None)
        .await;
    assert!(matches!(again, Err(Error::Conflict { .. })), "{again:?}");
    let stale = backend
        .compare_and_swap(
            "/k",
            Expect::Revision(Revision(created.0 + 1000)),
            b"v2",
            None,
        )
        .await;
    assert!(matches!(stale, Err(Error::Conflict { .. })), "{stale:?}");
    let updated = backend
        .compare_and_swap("/k", Expect::Revision(created), b"v2", None)
        .await
        .unwrap();
    assert!(updated > created);
    assert_eq!(backend.get("/k").await.unwrap().unwrap().value, b"v2");
    let missing = backend
        .compare_and_swap("/missing", Expect::Revision(created), b"v", None)
        .await;
    assert!(
        matches!(missing, Err(Error::Conflict { .. })),
        "{missing:?}"
    );
}

// Deletes report whether something was there; compare-and-delete checks the revision.
async fn deletes(backend: &impl Backend, _clock: &ManualClock) {
    let revision = backend.put("/k", b"v", None).await.unwrap();
    let wrong = backend
        .compare_and_delete("/k", Revision(revision.0 + 1))
        .await;
    assert!(matches!(wrong, Err(Error::Conflict { .. })), "{wrong:?}");
    backend.compare_and_delete("/k", revision).await.unwrap();
    assert_eq!(backend.get("/k").await.unwrap(), None);
    assert!(!backend.delete("/k").await.unwrap());
    backend.put("/k", b"v", None).await.unwrap();
    assert!(backend.delete("/k").await.unwrap());
    assert_eq!(backend.get("/k").await.unwrap(), None);
}

// A lease ends at its TTL: the item vanishes from reads at once, and expire() deletes it.
async fn lease_expiry(backend: &impl Backend, clock: &ManualClock) {
    backend
        .put("/db/a", b"a", Some(Duration::from_secs(10)))
        .await
        .unwrap();
    backend.put("/db/forever", b"f", None).await.unwrap();
    let item = backend.get("/db/a").await.unwrap().unwrap();
    assert_eq!(item.expires.unwrap().as_secs(), clock.now_secs() + 10);
    clock.advance(Duration::from_secs(9));
    assert!(backend.get("/db/a").await.unwrap().is_some());
    assert_eq!(backend.expire().await.unwrap(), 0);
    clock.advance(Duration::from_secs(1));
    assert_eq!(backend.get("/db/a").await.unwrap(), None);
    assert_eq!(keys(&backend.list("/db/").await.unwrap()), ["/db/forever"]);
    // An ended lease counts as absent for compare-and-swap, even before expire().
    let recreated = backend
        .compare_and_swap(
            "/db/a",
            Expect::Absent,
            b"again",
            Some(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    clock.advance(Duration::from_secs(5));
    assert_eq!(backend.expire().await.unwrap(), 1);
    assert!(matches!(
        backend
            .keep_alive("/db/a", recreated, Duration::from_secs(5))
            .await,
        Err(Error::Conflict { .. })
    ));
    assert_eq!(keys(&backend.list("").await.unwrap()), ["/db/forever"]);
}

// Keep-alive extends a lease without a new revision, and only for the holder's revision.
async fn keep_alive(backend: &impl Backend, clock: &ManualClock) {
    let revision = backend
        .put("/db/a", b"a", Some(Duration::from_secs(10)))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(8));
    backend
        .keep_alive("/db/a", revision, Duration::from_secs(10))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(8));
    let item = backend
        .get("/db/a")
        .await
        .unwrap()
        .expect("lease was extended");
    assert_eq!(item.revision, revision);
    let stale = backend
        .keep_alive("/db/a", Revision(revision.0 + 1), Duration::from_secs(10))
        .await;
    assert!(matches!(stale, Err(Error::Conflict { .. })), "{stale:?}");
    clock.advance(Duration::from_secs(2));
    assert_eq!(backend.get("/db/a").await.unwrap(), None);
}

// A watcher sees puts, deletes and lease expiry under its prefix, in order, and nothing else.
async fn watch(backend: &impl Backend, clock: &ManualClock) {
    let mut watcher = backend.watch("/db/").await.unwrap();
    let a = backend.put("/db/a", b"a", None).await.unwrap();
    backend.put("/users/x", b"not watched", None).await.unwrap();
    let b = backend
        .put("/db/b", b"b", Some(Duration::from_secs(3)))
        .await
        .unwrap();
    assert!(backend.delete("/db/a").await.unwrap());
    clock.advance(Duration::from_secs(3));
    assert_eq!(backend.expire().await.unwrap(), 1);

    match next_event(&mut watcher).await {
        Event::Put(item) => {
            assert_eq!(
                (item.key.as_str(), item.value.as_slice(), item.revision),
                ("/db/a", &b"a"[..], a)
            );
        }
        other => panic!("expected put of /db/a, got {other:?}"),
    }
    match next_event(&mut watcher).await {
        Event::Put(item) => {
            assert_eq!((item.key.as_str(), item.revision), ("/db/b", b));
            assert!(item.expires.is_some());
        }
        other => panic!("expected put of /db/b, got {other:?}"),
    }
    let deleted_a = match next_event(&mut watcher).await {
        Event::Delete { key, revision } if key == "/db/a" => revision,
        other => panic!("expected delete of /db/a, got {other:?}"),
    };
    assert!(deleted_a > b);
    match next_event(&mut watcher).await {
        Event::Delete { key, revision } => {
            assert_eq!(key, "/db/b");
            assert!(revision > deleted_a);
        }
        other => panic!("expected expiry of /db/b, got {other:?}"),
    }
}

// Keys and values over the limits, and keys with spaces or control bytes, are refused.
async fn limits(backend: &impl Backend, _clock: &ManualClock) {
    let long_key = format!("/{}", "k".repeat(2000));
    for key in ["", "/with space", "/tab\t", long_key.as_str(), "/ünïcode"] {
        let result = backend.put(key, b"v", None).await;
        assert!(
            matches!(result, Err(Error::InvalidInput { .. })),
            "{key:?}: {result:?}"
        );
    }
    let big = vec![0u8; postern_auth::backend::VALUE_SIZE_MAX + 1];
    let result = backend.put("/big", &big, None).await;
    assert!(
        matches!(result, Err(Error::InvalidInput { .. })),
        "{result:?}"
    );
    // Binary values round-trip byte for byte.
    let binary: Vec<u8> = (0..=255).collect();
    backend.put("/binary", &binary, None).await.unwrap();
    assert_eq!(backend.get("/binary").await.unwrap().unwrap().value, binary);
}

// Concurrent compare-and-swap increments from many tasks lose no update.
async fn concurrent_increments(backend: &(impl Backend + Clone), _clock: &ManualClock) {
    backend.put("/counter", b"0", None).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let backend = backend.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                loop {
                    let item = backend.get("/counter").await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&item.value).unwrap().parse().unwrap();
                    let next = (n + 1).to_string();
                    match backend
                        .compare_and_swap(
                            "/counter",
                            Expect::Revision(item.revision),
                            next.as_bytes(),
                            None,
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(Error::Conflict { .. }) => continue,
                        Err(error) => panic!("{error}"),
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(backend.get("/counter").await.unwrap().unwrap().value, b"40");
}

macro_rules! conformance {
    ($module:ident, $open:path) => {
        mod $module {
            conformance!(@test $open, put_get_and_revisions);
            conformance!(@test $open, prefix_reads);
            conformance!(@test $open, compare_and_swap);
            conformance!(@test $open, deletes);
            conformance!(@test $open, lease_expiry);
            conformance!(@test $open, keep_alive);
            conformance!(@test $open, watch);
            conformance!(@test $open, limits);
            conformance!(@test $open, concurrent_increments);
        }
    };
    (@test $open:path, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let clock = super::ManualClock::new(1_800_000_000);
            // The guard removes the store (temporary folder, PostgreSQL schema) on drop.
            let (backend, _guard) = $open(&clock).await;
            super::$name(&backend, &clock).await;
        }
    };
}

conformance!(memory, crate::support::open_memory);
conformance!(sqlite, crate::support::open_sqlite);
conformance!(postgres, crate::support::open_postgres);

/// Writes a few items, one under a lease, and returns the last revision.
async fn write_before_restart(backend: &impl Backend) -> Revision {
    backend.put("/users/alice", b"alice", None).await.unwrap();
    backend.put("/roles/dba", b"dba", None).await.unwrap();
    backend
        .put("/db/main", b"main", Some(Duration::from_secs(60)))
        .await
        .unwrap()
}

/// Checks that everything written before the restart is there, and that revisions go on
/// growing after it.
async fn check_after_restart(backend: &impl Backend, last: Revision) {
    let items = backend.list("").await.unwrap();
    assert_eq!(keys(&items), ["/db/main", "/roles/dba", "/users/alice"]);
    assert_eq!(items[0].value, b"main");
    assert!(items[0].expires.is_some());
    assert_eq!(items[0].revision, last);
    let next = backend.put("/users/bob", b"bob", None).await.unwrap();
    assert!(
        next > last,
        "revision went back after restart: {next:?} <= {last:?}"
    );
}

// SQLite: state written before the backend is dropped is all there after reopening the file.
#[tokio::test]
async fn sqlite_state_survives_restart() {
    let clock = ManualClock::new(1_800_000_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let last = {
        let backend = postern_auth::backend::SqliteBackend::open(&path, clock.provider()).unwrap();
        write_before_restart(&backend).await
    };
    let backend = postern_auth::backend::SqliteBackend::open(&path, clock.provider()).unwrap();
    check_after_restart(&backend, last).await;
}

// PostgreSQL: state written before the backend is dropped is all there after reconnecting.
#[tokio::test]
async fn postgres_state_survives_restart() {
    let clock = ManualClock::new(1_800_000_000);
    let (backend, schema) = support::open_postgres(&clock).await;
    let last = write_before_restart(&backend).await;
    drop(backend);
    let backend = postern_auth::backend::PostgresBackend::connect(
        support::POSTGRES,
        &schema.name,
        clock.provider(),
    )
    .await
    .unwrap();
    check_after_restart(&backend, last).await;
}

// Two PostgreSQL backends on one schema (two auth servers) see each other's writes and events.
#[tokio::test]
async fn postgres_backends_share_state_and_events() {
    let clock = ManualClock::new(1_800_000_000);
    let (first, schema) = support::open_postgres(&clock).await;
    let second = postern_auth::backend::PostgresBackend::connect(
        support::POSTGRES,
        &schema.name,
        clock.provider(),
    )
    .await
    .unwrap();
    let mut watcher = second.watch("/db/").await.unwrap();
    let revision = first.put("/db/a", b"a", None).await.unwrap();
    assert_eq!(
        second.get("/db/a").await.unwrap().unwrap().revision,
        revision
    );
    match next_event(&mut watcher).await {
        Event::Put(item) => assert_eq!((item.key.as_str(), item.revision), ("/db/a", revision)),
        other => panic!("expected put of /db/a, got {other:?}"),
    }
}

// A malicious or mistyped schema name is refused before it reaches SQL.
#[tokio::test]
async fn postgres_schema_names_are_checked() {
    let clock = ManualClock::new(1_800_000_000);
    for schema in ["", "Upper", "1abc", "a;drop table x", "a-b"] {
        let result = postern_auth::backend::PostgresBackend::connect(
            support::POSTGRES,
            schema,
            clock.provider(),
        )
        .await;
        assert!(
            matches!(result, Err(Error::InvalidInput { .. })),
            "{schema:?}"
        );
    }
}

// PostgreSQL: when the server drops the backend's sessions, calls reconnect and watchers
// are told of the gap once, then see changes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reconnects_after_its_sessions_drop() {
    let clock = ManualClock::new(1_800_000_000);
    let (backend, schema) = support::open_postgres(&clock).await;
    let mut watcher = backend.watch("/").await.unwrap();
    backend.put("/a", b"1", None).await.unwrap();
    assert!(matches!(next_event(&mut watcher).await, Event::Put(item) if item.key == "/a"));

    let (admin, connection) = tokio_postgres::connect(support::POSTGRES, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let killed = admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("postern {}", schema.name)],
        )
        .await
        .unwrap();
    assert!(
        killed >= 3,
        "query, listening and fetching sessions: {killed}"
    );

    match tokio::time::timeout(Duration::from_secs(10), watcher.next()).await {
        Ok(Err(Error::WatchGap)) => {}
        other => panic!("expected a watch gap, got {other:?}"),
    }
    // The call that finds the query session gone may fail (a write is not retried: its
    // outcome is unknown); it marks the session, and the next call reconnects.
    let first = backend.put("/b", b"2", None).await;
    let revision = match first {
        Ok(revision) => revision,
        Err(_) => backend.put("/b", b"2", None).await.unwrap(),
    };
    match next_event(&mut watcher).await {
        Event::Put(item) => assert_eq!((item.key.as_str(), item.revision), ("/b", revision)),
        other => panic!("expected put of /b, got {other:?}"),
    }
    assert_eq!(backend.get("/a").await.unwrap().unwrap().value, b"1");
}
