//! The durable audit spool: its record codec, crash and restart, an auth service that is
//! down then up, and resent events that are not stored twice — against a real auth API.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postern_agent::spool::{self, AuditSink, Decoded, Spool, crc32, decode_record, encode_record};
use postern_auth::api;
use postern_auth::audit::{AuditEvent, AuditLog, AuditQuery, MemoryAuditLog};
use postern_auth::backend::MemoryBackend;
use postern_auth::client::AuthClient;
use postern_auth::limiter::LoginLimits;
use postern_auth::server::{AuthConfig, AuthServer, TokenKind};
use postern_auth::user::PasswordCost;
use postern_pki::{CaKind, PrivateKey, TrustedCa};
use postern_rt::{Blocking, Net, Rng, WallClock};
use proptest::prelude::*;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

fn event(n: usize) -> AuditEvent {
    let mut rng = Rng::from_seed(n as u64);
    AuditEvent::new(
        ("db.session.query", "TDB02I"),
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + n as i64).unwrap(),
        &mut rng,
    )
    .with_field("query", format!("select {n}"))
}

fn events(range: std::ops::Range<usize>) -> Vec<AuditEvent> {
    range.map(event).collect()
}

/// An event of ~48 KiB, as a big statement makes (same id and time as `event(n)`).
fn big_event(n: usize) -> AuditEvent {
    let mut rng = Rng::from_seed(n as u64);
    AuditEvent::new(
        ("db.session.query", "TDB02I"),
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + n as i64).unwrap(),
        &mut rng,
    )
    .with_field(
        "query",
        format!("select '{}' -- {n}", "x".repeat(48 * 1024)),
    )
}

/// Every event the spool hands out, acknowledged as it goes.
fn drain(spool: &Spool) -> Vec<AuditEvent> {
    let mut all = Vec::new();
    loop {
        let (batch, ticket) = spool.next_batch(7).unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
        spool.ack(ticket).unwrap();
    }
}

proptest! {
    // Any sequence of payloads round-trips through the codec, in order, and a cut
    // anywhere inside the last record is "incomplete", never a wrong payload.
    #[test]
    fn codec_round_trips_and_detects_torn_tails(
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 1..8),
        cut in 1usize..10_000,
    ) {
        let mut bytes = Vec::new();
        for p in &payloads {
            encode_record(p, &mut bytes).unwrap();
        }
        let mut at = 0;
        for p in &payloads {
            match decode_record(&bytes[at..]) {
                Decoded::Record { payload, used } => {
                    prop_assert_eq!(payload, p.as_slice());
                    at += used;
                }
                other => prop_assert!(false, "expected a record, got {:?}", other),
            }
        }
        prop_assert_eq!(at, bytes.len());
        let last_len = 8 + payloads.last().unwrap().len();
        let keep = bytes.len() - 1 - (cut % last_len);
        let start = bytes.len() - last_len;
        prop_assert_eq!(decode_record(&bytes[start..keep]), Decoded::Incomplete);
    }

    // A flipped bit in a record's checksum or payload is detected.
    #[test]
    fn codec_detects_corruption(
        payload in proptest::collection::vec(any::<u8>(), 1..300),
        index in any::<usize>(),
        bit in 0u8..8,
    ) {
        let mut bytes = Vec::new();
        encode_record(&payload, &mut bytes).unwrap();
        let index = 4 + index % (bytes.len() - 4);
        bytes[index] ^= 1 << bit;
        prop_assert_eq!(decode_record(&bytes), Decoded::Corrupt);
    }
}

// The checksum is the standard CRC-32.
#[test]
fn crc_is_crc32_ieee() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
}

/// The spool's segment files, oldest first.
fn segment_files(root: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(root.join("audit-spool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// Bytes of whole records at the start of `bytes`.
fn records_len(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Decoded::Record { used, .. } = decode_record(&bytes[at..]) {
        at += used;
    }
    at
}

/// Writes `bytes` at `offset` of the file at `path`, as a crash mid-append leaves them.
fn write_at(path: &Path, offset: usize, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset as u64).unwrap();
}

/// Appends 0..5 and 5..8, hands 3 out without an acknowledgement, and "crashes": the
/// spool's one segment, and the bytes of its records.
fn spool_then_crash(root: &Path) -> (PathBuf, usize) {
    let spool = Spool::open(root, 1 << 20).unwrap();
    spool.append(&events(0..5)).unwrap();
    spool.append(&events(5..8)).unwrap();
    let (batch, _ticket) = spool.next_batch(3).unwrap();
    assert_eq!(batch.len(), 3);
    let [segment] = segment_files(root).try_into().unwrap();
    let bytes = std::fs::read(&segment).unwrap();
    let whole = records_len(&bytes);
    assert_eq!(spool.size(), whole as u64, "the size counts records only");
    assert!(
        bytes.len() > whole && bytes[whole..].iter().all(|&b| b == 0),
        "the segment is zero-filled past its records"
    );
    (segment, whole)
}

/// Reopens the spool after a crash: the segment is cut back to `whole` bytes, and every
/// event appended before the crash and after the restart is handed out once, in order.
fn reopen_and_check(root: &Path, segment: &Path, whole: usize) {
    let spool = Spool::open(root, 1 << 20).unwrap();
    assert_eq!(
        std::fs::metadata(segment).unwrap().len(),
        whole as u64,
        "zero tail and torn bytes cut off"
    );
    assert_eq!(spool.size(), whole as u64);
    spool.append(&events(8..10)).unwrap();
    assert_eq!(segment_files(root).len(), 2, "appends go to a new segment");
    let read = drain(&spool);
    assert_eq!(read, events(0..10));
    assert_eq!(spool.size(), 0, "acknowledged segments are deleted");
    assert!(segment_files(root).is_empty());
    // And a reopened empty spool stays empty.
    drop(spool);
    let spool = Spool::open(root, 1 << 20).unwrap();
    assert!(drain(&spool).is_empty());
}

// Events survive a restart (nothing acknowledged) in a preallocated segment: the zero
// tail ends its records, and appends after the restart are read back after the survivors.
#[test]
fn survives_restart_with_a_zero_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, whole) = spool_then_crash(dir.path());
    reopen_and_check(dir.path(), &segment, whole);
}

// A crash mid-append in a preallocated segment: half a record over the zeros after the
// last whole one is cut off.
#[test]
fn survives_restart_and_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, whole) = spool_then_crash(dir.path());
    let mut torn = Vec::new();
    encode_record(br#"{"id":"torn"}"#, &mut torn).unwrap();
    write_at(&segment, whole, &torn[..torn.len() - 3]);
    reopen_and_check(dir.path(), &segment, whole);
}

// A crash mid-append whose header reached the disk but not its payload (zeros where
// the payload should be): the checksum fails and the record is cut off.
#[test]
fn survives_restart_and_a_header_without_its_payload() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, whole) = spool_then_crash(dir.path());
    let mut torn = Vec::new();
    encode_record(br#"{"id":"torn"}"#, &mut torn).unwrap();
    write_at(&segment, whole, &torn[..8]);
    reopen_and_check(dir.path(), &segment, whole);
}

// A crash mid-append whose second page reached the disk but not its first (a zeroed
// header, then a whole record): nothing after the zeroed header comes back.
#[test]
fn nothing_after_a_zeroed_header_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, whole) = spool_then_crash(dir.path());
    let mut lost = Vec::new();
    encode_record(&serde_json::to_vec(&event(100)).unwrap(), &mut lost).unwrap();
    write_at(&segment, whole + 4096, &lost);
    reopen_and_check(dir.path(), &segment, whole);
}

// A corrupt record (a flipped bit in the last one) is cut off with everything after it;
// the records before it come back.
#[test]
fn a_corrupt_record_ends_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&events(0..8)).unwrap();
        spool.append(&events(100..101)).unwrap();
    }
    let [segment] = segment_files(dir.path()).try_into().unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let whole = records_len(&bytes);
    let mut last = Vec::new();
    encode_record(&serde_json::to_vec(&event(100)).unwrap(), &mut last).unwrap();
    let kept = whole - last.len();
    bytes[kept + 20] ^= 0x10;
    write_at(&segment, 0, &bytes);
    reopen_and_check(dir.path(), &segment, kept);
}

// A batch that was not acknowledged goes out again; a full spool closes the gate until
// events are acknowledged.
#[test]
fn nack_resends_and_full_spool_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 600).unwrap();
    let gate = spool.gate();
    assert!(gate.check().is_ok());
    spool.append(&events(0..4)).unwrap();
    let full = gate.check().unwrap_err();
    assert!(full.to_string().contains("audit spool is full"), "{full}");
    assert_eq!(full.limit, 600);
    // The bound counts record bytes, not the zeros the segment is filled with ahead.
    let [segment] = segment_files(dir.path()).try_into().unwrap();
    let on_disk = std::fs::metadata(&segment).unwrap().len();
    assert_eq!(full.size, spool.size());
    assert!(
        full.size < spool::SEGMENT_FILL_AHEAD_MIN && on_disk > full.size,
        "{full} ({on_disk} on disk)"
    );
    let (first, ticket) = spool.next_batch(2).unwrap();
    spool.nack(ticket);
    let (again, ticket) = spool.next_batch(2).unwrap();
    assert_eq!(first, again);
    spool.ack(ticket).unwrap();
    let rest = drain(&spool);
    assert_eq!(rest, events(2..4));
    assert!(gate.check().is_ok());
}

/// A real auth server (memory backend and audit log) and an agent certificate for it.
struct Auth {
    log: MemoryAuditLog,
    server: Arc<AuthServer<MemoryBackend, MemoryAuditLog>>,
    host_cas: Vec<TrustedCa>,
    agent: (CertificateDer<'static>, PrivateKey),
}

impl Auth {
    async fn new() -> Self {
        let clock = WallClock::system();
        let log = MemoryAuditLog::new();
        let server = AuthServer::new(
            MemoryBackend::new(Arc::new(clock.clone())),
            log.clone(),
            clock,
            Rng::from_seed(3),
            AuthConfig {
                cluster: "spool".into(),
                password_cost: PasswordCost {
                    memory_kib: 64,
                    passes: 1,
                },
                login_limits: LoginLimits::default(),
            },
        )
        .unwrap();
        server.ensure_cas().await.unwrap();
        let token = server
            .create_join_token("root", TokenKind::Db, Duration::from_secs(60))
            .await
            .unwrap();
        let key = PrivateKey::generate().unwrap();
        let joined = server
            .join(&token, TokenKind::Db, "agent-1", vec![], &key.public_key())
            .await
            .unwrap();
        let host_cas = server.ca_status(CaKind::Host).await.unwrap().trusted;
        Self {
            log,
            server: Arc::new(server),
            host_cas,
            agent: (joined.cert.der().clone(), key),
        }
    }

    fn client(&self, addr: &str) -> AuthClient {
        AuthClient::new(
            Net::Tokio,
            addr,
            "auth.spool",
            &self.host_cas,
            Some((self.agent.0.clone(), self.agent.1.to_rustls())),
            Arc::new(WallClock::system()),
        )
        .unwrap()
    }

    async fn serve_on(&self, addr: &str) {
        let listener = Net::Tokio.listen(addr).await.unwrap();
        tokio::spawn(api::serve(
            Arc::clone(&self.server),
            listener,
            vec!["auth.spool".into()],
        ));
    }

    /// Serves the API on a free loopback port; a client for it.
    async fn serve(&self) -> AuthClient {
        let listener = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(api::serve(
            Arc::clone(&self.server),
            listener,
            vec!["auth.spool".into()],
        ));
        self.client(&addr)
    }

    async fn stored(&self) -> Vec<AuditEvent> {
        let mut query = AuditQuery::between(
            OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap(),
        );
        query.event = Some("db.session.query".into());
        self.log.search(&query).await.unwrap()
    }
}

async fn wait_for(mut ready: impl AsyncFnMut() -> bool, what: &str) {
    for _ in 0..200 {
        if ready().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

// Auth is down when events are spooled: nothing is lost, they stay on disk; once auth
// is up, the shipper delivers all of them and the spool empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_down_then_up() {
    let auth = Auth::new().await;
    // A port nobody listens on yet.
    let addr = {
        let probe = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 1 << 20).unwrap());
    let shipper = tokio::spawn(spool::ship_events(
        Arc::clone(&spool),
        auth.client(&addr),
        Blocking::Pool,
    ));
    spool.append(&events(0..20)).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        spool.size() > 0,
        "nothing may be dropped while auth is down"
    );
    assert!(auth.stored().await.is_empty());

    auth.serve_on(&addr).await;
    wait_for(async || spool.size() == 0, "the spool to drain").await;
    let mut stored = auth.stored().await;
    stored.sort_by_key(|a| a.time);
    assert_eq!(stored, events(0..20));
    shipper.abort();
}

// A crash after auth stored a batch but before the spool deleted it makes the agent
// send the batch again after restart; auth stores each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_events_are_stored_once() {
    let auth = Auth::new().await;
    let client = auth.serve().await;
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&events(0..10)).unwrap();
        // Shipped and stored, but the agent dies before acknowledging to its spool.
        let (batch, _ticket) = spool.next_batch(100).unwrap();
        client.ship(&batch).await.unwrap();
    }
    assert_eq!(auth.stored().await.len(), 10);
    let spool = Arc::new(Spool::open(dir.path(), 1 << 20).unwrap());
    spool.append(&events(10..12)).unwrap();
    let shipper = tokio::spawn(spool::ship_events(
        Arc::clone(&spool),
        client,
        Blocking::Pool,
    ));
    wait_for(async || spool.size() == 0, "the spool to drain").await;
    let stored = auth.stored().await;
    assert_eq!(stored.len(), 12, "each event stored exactly once");
    let mut ids: Vec<_> = stored.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 12);
    shipper.abort();
}

// A restart after some batches were acknowledged (their segment deleted) and one was
// stored by auth but not acknowledged to the spool: the preallocated segments still hold
// every event not acknowledged, their zero tails are not counted, and after the restart
// auth ends up with every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_unacknowledged_events_and_delivers_each_once() {
    let auth = Auth::new().await;
    let client = auth.serve().await;
    let dir = tempfile::tempdir().unwrap();
    // 120 events of ~48 KiB: more than one segment.
    let backlog: Vec<AuditEvent> = (0..120).map(big_event).collect();
    {
        let spool = Spool::open(dir.path(), 64 << 20).unwrap();
        for chunk in backlog.chunks(10) {
            spool.append(chunk).unwrap();
        }
        assert_eq!(segment_files(dir.path()).len(), 2);
        // Shipped and acknowledged until the first segment is deleted.
        while segment_files(dir.path()).len() == 2 {
            let (batch, ticket) = spool.next_batch(spool::SHIP_BATCH_EVENTS_MAX).unwrap();
            assert!(!batch.is_empty());
            client.ship(&batch).await.unwrap();
            spool.ack(ticket).unwrap();
        }
        // Stored by auth, but the agent dies before acknowledging to its spool.
        let (batch, _ticket) = spool.next_batch(spool::SHIP_BATCH_EVENTS_MAX).unwrap();
        assert!(!batch.is_empty());
        client.ship(&batch).await.unwrap();
    }
    assert!(auth.stored().await.len() < backlog.len());
    let spool = Arc::new(Spool::open(dir.path(), 64 << 20).unwrap());
    let on_disk: u64 = segment_files(dir.path())
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert_eq!(
        spool.size(),
        on_disk,
        "zero tails cut; the size counts records"
    );
    let more = events(1000..1003);
    spool.append(&more).unwrap();
    let shipper = tokio::spawn(spool::ship_events(
        Arc::clone(&spool),
        client,
        Blocking::Pool,
    ));
    wait_for(async || spool.size() == 0, "the spool to drain").await;
    shipper.abort();
    let mut stored = auth.stored().await;
    stored.sort_by_key(|a| a.time);
    let expected: Vec<AuditEvent> = backlog.into_iter().chain(more).collect();
    assert_eq!(stored, expected, "every event, each exactly once");
}

// A backlog of large events (here 600 of ~48 KiB: 28 MiB, as a long outage of the auth
// service with big statements leaves behind) is delivered in full: batches are bounded
// by bytes, not only by count, so no request goes past what the auth API accepts. Before
// the bound, 500-event batches were refused with 413 and resent forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_backlog_is_delivered_in_batches_auth_accepts() {
    const EVENTS: usize = 600;
    let big = big_event;
    let auth = Auth::new().await;
    let client = auth.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 64 << 20).unwrap());
    let backlog: Vec<AuditEvent> = (0..EVENTS).map(big).collect();
    for chunk in backlog.chunks(50) {
        spool.append(chunk).unwrap();
    }
    let (first, ticket) = spool.next_batch(spool::SHIP_BATCH_EVENTS_MAX).unwrap();
    let first_size: usize = first
        .iter()
        .map(|e| serde_json::to_vec(e).unwrap().len())
        .sum();
    assert!(
        first.len() > 1 && first.len() < 50,
        "{} events in the first batch",
        first.len()
    );
    assert!(
        first_size <= spool::SHIP_BATCH_SIZE_MAX,
        "{first_size} bytes in the first batch"
    );
    spool.nack(ticket);

    let shipper = tokio::spawn(spool::ship_events(
        Arc::clone(&spool),
        client,
        Blocking::Pool,
    ));
    wait_for(async || spool.size() == 0, "the backlog to be delivered").await;
    let mut stored = auth.stored().await;
    stored.sort_by_key(|a| a.time);
    assert_eq!(stored, backlog);
    shipper.abort();
}

// One event larger than the size bound still goes out, alone: the bound never strands an
// event in the spool.
#[test]
fn an_event_over_the_size_bound_is_a_batch_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    spool.append(&events(0..5)).unwrap();
    let one = serde_json::to_vec(&event(0)).unwrap().len();
    for expected in [1, 1, 1, 1, 1] {
        let (batch, ticket) = spool.next_batch_within(100, one - 1).unwrap();
        assert_eq!(batch.len(), expected);
        spool.ack(ticket).unwrap();
    }
    let (rest, _) = spool.next_batch_within(100, 1 << 20).unwrap();
    assert!(rest.is_empty());
    spool.append(&events(5..10)).unwrap();
    let (two, _) = spool.next_batch_within(100, 2 * one + 1).unwrap();
    assert_eq!(two, events(5..7));
}
