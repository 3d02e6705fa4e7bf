//! Shared helpers for the integration tests: a manual clock and fresh, isolated stores.
#![allow(dead_code, unreachable_pub)]

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use postern_auth::backend::{MemoryBackend, PostgresBackend, SqliteBackend};
use rustls::time_provider::TimeProvider;
use rustls_pki_types::UnixTime;

/// The PostgreSQL server the tests use (trust auth).
pub const POSTGRES: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

/// A wall clock that moves only when the test says so; clones share the time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    secs: Arc<AtomicU64>,
}

impl ManualClock {
    pub fn new(secs: u64) -> Self {
        Self {
            secs: Arc::new(AtomicU64::new(secs)),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.secs.fetch_add(by.as_secs(), Ordering::SeqCst);
    }

    pub fn now_secs(&self) -> u64 {
        self.secs.load(Ordering::SeqCst)
    }

    pub fn now(&self) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(self.now_secs()))
    }

    pub fn provider(&self) -> Arc<dyn TimeProvider> {
        Arc::new(self.clone())
    }
}

impl TimeProvider for ManualClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(self.now())
    }
}

pub async fn open_memory(clock: &ManualClock) -> (MemoryBackend, ()) {
    (MemoryBackend::new(clock.provider()), ())
}

pub async fn open_sqlite(clock: &ManualClock) -> (SqliteBackend, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::open(&dir.path().join("state.db"), clock.provider()).unwrap();
    (backend, dir)
}

pub async fn open_postgres(clock: &ManualClock) -> (PostgresBackend, PostgresSchema) {
    let schema = PostgresSchema::unique();
    let backend = PostgresBackend::connect(POSTGRES, &schema.name, clock.provider())
        .await
        .unwrap();
    (backend, schema)
}

/// A schema name no other test, process or CI run uses; dropped with everything in it
/// when this value is dropped (also when the test panics).
#[derive(Debug)]
pub struct PostgresSchema {
    pub name: String,
}

impl PostgresSchema {
    pub fn unique() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // std's hasher keys are random per process: enough to tell parallel runs apart.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let name = format!(
            "postern_test_{}_{}_{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            random as u32
        );
        Self { name }
    }
}

impl Drop for PostgresSchema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread
        // with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(POSTGRES, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                client.batch_execute(&sql).await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}: {dropped:?}", self.name);
        }
    }
}
