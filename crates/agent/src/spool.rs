//! The durable audit spool: every event a session produces is written to disk before it
//! is shipped to the auth service, and deleted only once the auth service acknowledged
//! it. Nothing is lost to an agent crash or an auth outage; nothing is stored twice,
//! because event ids are idempotency keys on the auth side (a resent batch is skipped).
//!
//! ```text
//! sessions ─► mpsc ─► writer: append records, fsync once per batch ─► segment files
//!                                                   shipper: read a batch ─► auth
//!                               delete a segment once every record in it is acknowledged
//! ```
//!
//! Files live under `<storage root>/audit-spool/`, one segment file each
//! (`<20-digit sequence>.spool`). A record is `len: u32 LE | crc32(payload): u32 LE |
//! payload` where the payload is the event's JSON (never empty). On open, a record cut
//! short or with a bad checksum ends its segment: the rest is cut off (a torn write from
//! a crash).
//!
//! A segment file is zero-filled ahead of its records ([`SEGMENT_FILL_AHEAD_MIN`] to
//! [`SEGMENT_FILL_AHEAD_MAX`] at a time, in the same write and `fdatasync` as the
//! records that reach past the filled part): most appends then overwrite blocks that are
//! already allocated and inside the file's size, and their `fdatasync` writes data only,
//! not the file's size or block map (on ext4, an append that grows the file also waits
//! for a journal commit).
//! A zeroed header ([`Decoded::End`]) is where a segment's records end; the spool's
//! size and bound count record bytes, never the zeros.
//!
//! A session's statements wait for their events to be on disk ([`Durable`]): the relay
//! hands a chunk on only after the events it produced are fsync'd. The writer takes every
//! event queued by every session at once and fsyncs them together (group commit), so
//! concurrent sessions share one fsync.
//!
//! The spool is bounded ([`SPOOL_SIZE_MAX_DEFAULT`]): when it holds that many bytes,
//! [`AuditGate::check`] refuses new sessions with [`SpoolFull`], so that no session runs
//! unaudited; events of sessions already open are still written.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use postern_auth::audit::{AuditEvent, BATCH_EVENTS_MAX, BATCH_SIZE_MAX, EVENT_SIZE_MAX};
use postern_auth::client::AuthClient;
use postern_rt::Blocking;
use tokio::sync::{Notify, mpsc, oneshot};

use self::sync::{AtomicBool, AtomicU64, Mutex, MutexGuard, Ordering, Shared};

/// The synchronization the spool's concurrent core (segments, size, durability waiters)
/// uses: std's, or loom's under `--cfg postern_loom`, where `tests/loom_spool.rs` explores the
/// interleavings of append, next_batch, ack and durable notification across threads.
mod sync {
    #[cfg(postern_loom)]
    pub(super) use loom::sync::{
        Arc as Shared, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    #[cfg(not(postern_loom))]
    pub(super) use std::sync::{
        Arc as Shared, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
}

/// Most bytes the spool holds before new sessions are refused.
pub const SPOOL_SIZE_MAX_DEFAULT: u64 = 256 * 1024 * 1024;
/// A segment takes batches while they fit within this many bytes; a batch that does not
/// starts a new segment (a segment holds at least one batch, however large).
pub const SEGMENT_SIZE_MAX: u64 = 4 * 1024 * 1024;
/// How far past its records a segment file is zero-filled when an append reaches past
/// the filled part: as far as the segment's records reach, at least
/// [`SEGMENT_FILL_AHEAD_MIN`] and at most [`SEGMENT_FILL_AHEAD_MAX`]. The `fdatasync`
/// that also writes the file's size then comes once per that many bytes of records; the
/// zeros written with it are few in a new segment (which, under a trickle of statements,
/// may hold a single event before it is acknowledged and deleted) and never enough to
/// stall the statements waiting on that append.
#[cfg(not(postern_loom))]
pub const SEGMENT_FILL_AHEAD_MIN: u64 = 64 * 1024;
/// Under the loom model every explored execution writes and syncs its own segment:
/// a small fill keeps thousands of executions from being thousands of 64 KiB syncs,
/// and still exercises filling ahead.
#[cfg(postern_loom)]
pub const SEGMENT_FILL_AHEAD_MIN: u64 = 4 * 1024;
/// The most a segment is zero-filled ahead at once (see [`SEGMENT_FILL_AHEAD_MIN`]).
pub const SEGMENT_FILL_AHEAD_MAX: u64 = 1024 * 1024;
/// Most events in one batch sent to the auth service.
pub const SHIP_BATCH_EVENTS_MAX: usize = 500;
/// Most bytes of events (as spooled, which is how they are sent) in one batch sent to
/// the auth service; a batch always holds at least one event. Half of what the auth
/// service accepts, so one more event of up to [`RECORD_SIZE_MAX`] never tips it over.
pub const SHIP_BATCH_SIZE_MAX: usize = BATCH_SIZE_MAX / 2;
const _: () = assert!(SHIP_BATCH_SIZE_MAX + RECORD_SIZE_MAX <= BATCH_SIZE_MAX);
/// Most events written between two fsyncs.
pub const WRITE_BATCH_EVENTS_MAX: usize = 256;
/// Largest record payload accepted when reading back (an event, with room to spare).
pub const RECORD_SIZE_MAX: usize = EVENT_SIZE_MAX * 2;
/// After shipping a batch that was not full, how long the shipper lets events gather
/// before it ships again: bounds shipping requests to a few per second under light
/// load, and delays events reaching the auth service by at most this much.
pub const SHIP_LINGER: Duration = Duration::from_millis(200);
/// First and longest wait before resending to an auth service that failed.
pub const RETRY_DELAY_MIN: Duration = Duration::from_millis(200);
pub const RETRY_DELAY_MAX: Duration = Duration::from_secs(10);

const HEADER_LEN: usize = 8;
const SPOOL_DIR: &str = "audit-spool";
const SEGMENT_SUFFIX: &str = ".spool";

// --- Record codec ----------------------------------------------------------------------

/// CRC-32 (IEEE 802.3), a byte at a time from a table: every event is checksummed when
/// it is written and again when it is shipped, on the path every statement waits for
/// (bit by bit it was the agent's largest own cost under select-only load).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc = (crc >> 8) ^ CRC32_TABLE[usize::from((crc as u8) ^ byte)];
    }
    !crc
}

/// The CRC of each byte value, for [`crc32`].
const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = byte as u32;
        let mut bit = 0;
        while bit < 8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
};

/// Appends one framed record holding `payload` (not empty) to `out`.
pub fn encode_record(payload: &[u8], out: &mut Vec<u8>) -> Result<(), SpoolError> {
    if payload.is_empty() {
        return Err(SpoolError::RecordEmpty);
    }
    if payload.len() > RECORD_SIZE_MAX {
        return Err(SpoolError::RecordTooLarge {
            size: payload.len(),
        });
    }
    let len = u32::try_from(payload.len()).map_err(|_| SpoolError::RecordTooLarge {
        size: payload.len(),
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// What [`decode_record`] found at the start of its input.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole, valid record and the bytes it took.
    Record { payload: &'a [u8], used: usize },
    /// The input ends inside a record (a torn write, or more bytes to come).
    Incomplete,
    /// The bytes are not a valid record (bad length or checksum).
    Corrupt,
    /// A zeroed header: no record starts here (the zero-filled part of a segment, past
    /// its last record).
    End,
}

/// Decodes the record at the start of `bytes`.
pub fn decode_record(bytes: &[u8]) -> Decoded<'_> {
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Decoded::Incomplete;
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 && crc == 0 {
        return Decoded::End;
    }
    if len > RECORD_SIZE_MAX {
        return Decoded::Corrupt;
    }
    let Some(payload) = bytes.get(HEADER_LEN..HEADER_LEN + len) else {
        return Decoded::Incomplete;
    };
    if crc32(payload) != crc {
        return Decoded::Corrupt;
    }
    Decoded::Record {
        payload,
        used: HEADER_LEN + len,
    }
}

// --- Errors ------------------------------------------------------------------------------

/// Why the spool could not take or give back events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    #[error(
        "audit spool {path}: {source}; check the folder exists, is writable and has free space"
    )]
    Io { path: PathBuf, source: io::Error },
    #[error("an audit record of {size} bytes is larger than the spool's limit {RECORD_SIZE_MAX}")]
    RecordTooLarge { size: usize },
    /// An empty payload would read back as the zero-filled end of a segment.
    #[error("an audit record cannot be empty")]
    RecordEmpty,
    #[error("cannot encode an audit event: {0}")]
    Encode(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The spool holds as many bytes as it may: new sessions are refused until the auth
/// service acknowledges events again.
#[derive(Debug, thiserror::Error)]
#[error(
    "the agent's audit spool is full ({size} of {limit} bytes): the auth service has not \
     acknowledged audit events, and sessions do not open unaudited; check that the agent \
     reaches the auth service"
)]
pub struct SpoolFull {
    pub size: u64,
    pub limit: u64,
}

// --- The spool ---------------------------------------------------------------------------

#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    /// Bytes of valid records.
    len: u64,
    /// Bytes of records acknowledged (from the start).
    acked: u64,
    /// Bytes handed to the shipper but not yet acknowledged (from `acked`).
    in_flight: u64,
}

#[derive(Debug)]
struct Inner {
    segments: VecDeque<Segment>,
    /// The last segment, open for appends.
    writer: Option<SegmentFile>,
}

/// The file of the segment being written.
#[derive(Debug)]
struct SegmentFile {
    file: File,
    /// The file's size: records, then zeros up to here.
    filled: u64,
}

/// Tells sessions whether the spool takes more, and when their events are on disk;
/// cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditGate {
    size: Shared<AtomicU64>,
    limit: u64,
    closed: Shared<AtomicBool>,
    durable: Durable,
}

impl AuditGate {
    /// Where sessions learn that their events are fsync'd.
    pub fn durable(&self) -> Durable {
        self.durable.clone()
    }

    /// `Ok` while the spool has room for a new session's events.
    pub fn check(&self) -> Result<(), SpoolFull> {
        let size = self.size.load(Ordering::Relaxed);
        if size >= self.limit || self.closed.load(Ordering::Relaxed) {
            return Err(SpoolFull {
                size,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Bytes in the spool now (the `audit spool depth` metric).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
}

/// The on-disk spool. Shared by one writer and one shipper.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    inner: Mutex<Inner>,
    gate: AuditGate,
    written: Notify,
}

impl Spool {
    /// Opens (or creates) the spool under `storage_root`, cutting torn records off the
    /// end of each segment, with room for `size_max` bytes.
    pub fn open(storage_root: &Path, size_max: u64) -> Result<Self, SpoolError> {
        let dir = storage_root.join(SPOOL_DIR);
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let mut seqs = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_error(&dir))? {
            let entry = entry.map_err(io_error(&dir))?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            seqs.push(seq);
        }
        seqs.sort_unstable();
        let mut segments = VecDeque::new();
        let mut total = 0;
        for seq in seqs {
            let path = segment_path(&dir, seq);
            let len = valid_prefix(&path)?;
            total += len;
            segments.push_back(Segment {
                seq,
                path,
                len,
                acked: 0,
                in_flight: 0,
            });
        }
        let spool = Self {
            dir,
            inner: Mutex::new(Inner {
                segments,
                writer: None,
            }),
            gate: AuditGate {
                size: Shared::new(AtomicU64::new(total)),
                limit: size_max,
                closed: Shared::new(AtomicBool::new(false)),
                durable: Durable::default(),
            },
            written: Notify::new(),
        };
        Ok(spool)
    }

    /// The gate sessions check before they open.
    pub fn gate(&self) -> AuditGate {
        self.gate.clone()
    }

    /// Events on disk and not yet acknowledged, in bytes.
    pub fn size(&self) -> u64 {
        self.gate.size()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Only plain bookkeeping happens under the lock; a poisoned lock still holds
        // consistent offsets.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `events` and fsyncs them: when this returns `Ok`, they survive a crash.
    pub fn append(&self, events: &[AuditEvent]) -> Result<(), SpoolError> {
        let mut bytes = Vec::new();
        for event in events {
            let payload =
                serde_json::to_vec(event).map_err(|e| SpoolError::Encode(e.to_string()))?;
            encode_record(&payload, &mut bytes)?;
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let records = bytes.len() as u64;
        let mut inner = self.lock();
        let rotate = match (inner.segments.back(), &inner.writer) {
            (Some(last), Some(_)) => last.len > 0 && last.len + records > SEGMENT_SIZE_MAX,
            _ => true,
        };
        if rotate {
            let seq = inner.segments.back().map_or(0, |s| s.seq + 1);
            let path = segment_path(&self.dir, seq);
            // A file left by a rotation that failed before it was recorded holds nothing
            // acknowledged: start it afresh.
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(io_error(&path))?;
            sync_dir(&self.dir)?;
            inner.segments.push_back(Segment {
                seq,
                path,
                len: 0,
                acked: 0,
                in_flight: 0,
            });
            inner.writer = Some(SegmentFile { file, filled: 0 });
        }
        let Inner { segments, writer } = &mut *inner;
        let (Some(last), Some(out)) = (segments.back_mut(), writer.as_mut()) else {
            // Invariant: rotation above leaves a last segment with an open writer.
            return Err(SpoolError::Io {
                path: self.dir.clone(),
                source: io::Error::other("no open segment"),
            });
        };
        let end = last.len + records;
        let filled = if end > out.filled {
            // Zero-fill ahead in the same write: the appends that follow overwrite
            // allocated blocks inside the file's size.
            let ahead = end.clamp(SEGMENT_FILL_AHEAD_MIN, SEGMENT_FILL_AHEAD_MAX);
            let filled = (end + ahead).min(SEGMENT_SIZE_MAX.max(end));
            bytes.resize(bytes.len() + (filled - end) as usize, 0);
            filled
        } else {
            out.filled
        };
        let written = out
            .file
            .write_all_at(&bytes, last.len)
            .and_then(|()| out.file.sync_data());
        if let Err(source) = written {
            // Whether a failed write or fsync left part of this batch behind is unknown
            // (and after a failed fsync, a second one may report success for pages
            // that were dropped): the retry starts a new segment, so nothing acknowledged
            // ever comes after what this one left. On restart, the tail of this segment
            // reads as torn and is cut off, or as whole records sent again (auth stores
            // an event id once).
            *writer = None;
            return Err(SpoolError::Io {
                path: last.path.clone(),
                source,
            });
        }
        out.filled = filled;
        last.len = end;
        self.gate.size.fetch_add(records, Ordering::Relaxed);
        drop(inner);
        self.written.notify_one();
        Ok(())
    }

    /// [`Spool::append`], then wakes the sessions waiting for these events
    /// ([`Durable`]). The writer's step: one fsync for everything every session queued.
    pub fn commit(&self, events: &[AuditEvent]) -> Result<(), SpoolError> {
        self.append(events)?;
        self.gate.durable.written(events);
        Ok(())
    }

    /// Up to `max` events not yet handed out, oldest first, at most
    /// [`SHIP_BATCH_SIZE_MAX`] bytes of them, and a ticket to acknowledge them with. Empty
    /// when everything is shipped or in flight.
    pub fn next_batch(&self, max: usize) -> Result<(Vec<AuditEvent>, Ticket), SpoolError> {
        self.next_batch_within(max, SHIP_BATCH_SIZE_MAX)
    }

    /// [`Spool::next_batch`] with a size bound: events are taken while their spooled
    /// payloads add up to at most `max_bytes`, but always at least one, so an event
    /// larger than the bound still goes out (alone).
    pub fn next_batch_within(
        &self,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<AuditEvent>, Ticket), SpoolError> {
        let mut inner = self.lock();
        let Some(segment) = inner
            .segments
            .iter_mut()
            .find(|s| s.acked + s.in_flight < s.len)
        else {
            return Ok((Vec::new(), Ticket::default()));
        };
        let start = segment.acked + segment.in_flight;
        let mut file = File::open(&segment.path).map_err(io_error(&segment.path))?;
        file.seek(SeekFrom::Start(start))
            .map_err(io_error(&segment.path))?;
        // Enough for the batch plus one whole record past it, not the whole segment.
        let want = (max_bytes + RECORD_SIZE_MAX + 2 * HEADER_LEN) as u64;
        let mut bytes = Vec::new();
        file.take((segment.len - start).min(want))
            .read_to_end(&mut bytes)
            .map_err(io_error(&segment.path))?;
        let mut events = Vec::new();
        let mut at = 0;
        let mut size = 0;
        while events.len() < max {
            match decode_record(&bytes[at..]) {
                Decoded::Record { payload, used } => {
                    if at > 0 && size + payload.len() > max_bytes {
                        break;
                    }
                    at += used;
                    size += payload.len();
                    match serde_json::from_slice::<AuditEvent>(payload) {
                        Ok(event) => events.push(event),
                        // A record that passed its checksum but is not an event cannot be
                        // sent; it is skipped (and acknowledged with its batch).
                        Err(error) => {
                            tracing::error!(%error, "audit spool: unreadable event skipped")
                        }
                    }
                }
                Decoded::Incomplete | Decoded::Corrupt | Decoded::End => break,
            }
        }
        segment.in_flight += at as u64;
        Ok((
            events,
            Ticket {
                seq: segment.seq,
                bytes: at as u64,
            },
        ))
    }

    /// The batch behind `ticket` was not acknowledged: it goes out again next time.
    pub fn nack(&self, ticket: Ticket) {
        let mut inner = self.lock();
        if let Some(segment) = inner.segments.iter_mut().find(|s| s.seq == ticket.seq) {
            segment.in_flight = segment.in_flight.saturating_sub(ticket.bytes);
        }
    }

    /// The auth service stored the batch behind `ticket`: segments whose records are all
    /// acknowledged are deleted.
    pub fn ack(&self, ticket: Ticket) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        if let Some(segment) = inner.segments.iter_mut().find(|s| s.seq == ticket.seq) {
            segment.in_flight = segment.in_flight.saturating_sub(ticket.bytes);
            segment.acked += ticket.bytes;
        }
        loop {
            let is_last = inner.segments.len() == 1;
            let Some(first) = inner.segments.front() else {
                break;
            };
            if first.acked < first.len || first.len == 0 && is_last {
                break;
            }
            let path = first.path.clone();
            let len = first.len;
            // The last segment is the one being written: close it first.
            if is_last {
                inner.writer = None;
            }
            std::fs::remove_file(&path).map_err(io_error(&path))?;
            inner.segments.pop_front();
            self.gate.size.fetch_sub(len, Ordering::Relaxed);
        }
        drop(inner);
        sync_dir(&self.dir)
    }

    /// Waits until something is appended (or returns at once if something was since the
    /// last wait).
    pub async fn written(&self) {
        self.written.notified().await;
    }
}

/// Sessions waiting for events to be fsync'd, by event id. Only the last event of what a
/// session queued needs a waiter: one session's events reach the writer in order, so when
/// the last is on disk, so are the ones before it.
#[derive(Clone, Debug)]
pub struct Durable {
    state: Shared<Mutex<DurableState>>,
}

#[derive(Debug, Default)]
struct DurableState {
    waiting: HashMap<String, oneshot::Sender<()>>,
    /// The writer stopped: nothing will be written any more.
    closed: bool,
}

/// The spool's writer stopped; events queued now are never written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the audit spool's writer stopped")]
pub struct WriterStopped;

impl Default for Durable {
    fn default() -> Self {
        Durable {
            state: Shared::new(Mutex::new(DurableState::default())),
        }
    }
}

impl Durable {
    fn lock(&self) -> MutexGuard<'_, DurableState> {
        // Plain map updates only; a poisoned lock still holds a consistent map.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A waiter for the event with `id`: register it *before* queueing the event, then
    /// [`DurableWait::wait`].
    pub fn wait_for(&self, id: &str) -> Result<DurableWait, WriterStopped> {
        let (sender, receiver) = oneshot::channel();
        let mut state = self.lock();
        if state.closed {
            return Err(WriterStopped);
        }
        state.waiting.insert(id.to_owned(), sender);
        Ok(DurableWait {
            durable: self.clone(),
            id: id.to_owned(),
            receiver,
            settled: false,
        })
    }

    /// `events` are fsync'd: wakes their waiters.
    fn written(&self, events: &[AuditEvent]) {
        let mut state = self.lock();
        if state.waiting.is_empty() {
            return;
        }
        for event in events {
            if let Some(waiter) = state.waiting.remove(&event.id) {
                // The session may have ended meanwhile; nothing to wake then.
                let _ = waiter.send(());
            }
        }
    }

    /// The writer stopped: every waiter, now and later, learns it.
    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.waiting.clear();
    }
}

/// Resolves once one event is fsync'd. Dropping it unregisters the waiter.
#[derive(Debug)]
pub struct DurableWait {
    durable: Durable,
    id: String,
    receiver: oneshot::Receiver<()>,
    /// Woken or closed: the entry is gone from the map.
    settled: bool,
}

impl DurableWait {
    /// Waits until the event is on disk, or the writer stopped.
    pub async fn wait(mut self) -> Result<(), WriterStopped> {
        let result = (&mut self.receiver).await.map_err(|_| WriterStopped);
        self.settled = true;
        result
    }
}

impl Drop for DurableWait {
    fn drop(&mut self) {
        if !self.settled {
            // Abandoned (the session ended first): forget the entry.
            self.durable.lock().waiting.remove(&self.id);
        }
    }
}

/// Names a batch handed out by [`Spool::next_batch`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    seq: u64,
    bytes: u64,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}{SEGMENT_SUFFIX}"))
}

/// The length of the valid records at the start of the file at `path`. What follows them
/// is cut off: zeros (the zero-filled part of a preallocated segment; the segment takes
/// no more appends, a new one is started after open), or a torn or corrupt record from a
/// crash mid-append.
fn valid_prefix(path: &Path) -> Result<u64, SpoolError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    let mut at = 0;
    while let Decoded::Record { used, .. } = decode_record(&bytes[at..]) {
        at += used;
    }
    if at < bytes.len() {
        if bytes[at..].iter().any(|&b| b != 0) {
            tracing::warn!(
                path = %path.display(),
                cut = bytes.len() - at,
                "audit spool: cutting a torn record off the end of a segment"
            );
        }
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_error(path))?;
        file.set_len(at as u64).map_err(io_error(path))?;
        file.sync_all().map_err(io_error(path))?;
    }
    Ok(at as u64)
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

// --- Writer and shipper tasks --------------------------------------------------------------

/// Where spooled events go: the auth service's `POST /v1/audit/events`.
pub trait AuditSink: Send + Sync {
    /// Stores `events`; `Ok` means every one is stored (now or before).
    fn ship(
        &self,
        events: &[AuditEvent],
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

impl AuditSink for AuthClient {
    async fn ship(&self, events: &[AuditEvent]) -> Result<(), String> {
        self.emit_audit(events)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Writes what arrives on `events` to the spool, fsyncing once per batch, until every
/// sender is gone. A write failure closes the gate (new sessions are refused) and is
/// retried.
pub async fn write_events(
    spool: Arc<Spool>,
    mut events: mpsc::Receiver<AuditEvent>,
    blocking: Blocking,
) {
    // Whatever ends this task, sessions waiting for their events learn it.
    struct CloseOnExit(Durable);
    impl Drop for CloseOnExit {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = CloseOnExit(spool.gate.durable.clone());
    let mut batch = Vec::with_capacity(WRITE_BATCH_EVENTS_MAX);
    loop {
        // Everything queued by every session since the last fsync, in one batch.
        if events.recv_many(&mut batch, WRITE_BATCH_EVENTS_MAX).await == 0 {
            return;
        }
        let mut delay = RETRY_DELAY_MIN;
        loop {
            let writer = Arc::clone(&spool);
            let written = std::mem::take(&mut batch);
            let result = blocking
                .run(move || {
                    let result = writer.commit(&written);
                    (written, result)
                })
                .await;
            match result {
                (written, Ok(())) => {
                    spool.gate.closed.store(false, Ordering::Relaxed);
                    batch = written;
                    batch.clear();
                    break;
                }
                (written, Err(error)) => {
                    tracing::error!(%error, "audit spool: cannot write events; new sessions are refused until it can");
                    spool.gate.closed.store(true, Ordering::Relaxed);
                    batch = written;
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_DELAY_MAX);
        }
    }
}

/// Ships spooled events to `sink` in batches, resending until acknowledged, forever
/// (abort the task to stop). Returns only if the spool cannot be read.
pub async fn ship_events<S: AuditSink>(
    spool: Arc<Spool>,
    sink: S,
    blocking: Blocking,
) -> Result<(), SpoolError> {
    let mut delay = RETRY_DELAY_MIN;
    let max = SHIP_BATCH_EVENTS_MAX.min(BATCH_EVENTS_MAX);
    loop {
        let (events, ticket) = {
            let spool = Arc::clone(&spool);
            blocking.run(move || spool.next_batch(max)).await?
        };
        if ticket.bytes == 0 {
            spool.written().await;
            continue;
        }
        if events.is_empty() {
            spool.ack(ticket)?;
            continue;
        }
        // A batch well short of both bounds: the spool held no more than that.
        let small = events.len() < max && ticket.bytes < (SHIP_BATCH_SIZE_MAX / 2) as u64;
        match sink.ship(&events).await {
            Ok(()) => {
                spool.ack(ticket)?;
                delay = RETRY_DELAY_MIN;
                if small {
                    // Let events gather: a trickle of statements does not cost one request
                    // (one TLS handshake, one write on the auth side) each. They are on
                    // disk already; only their arrival at the auth service waits.
                    tokio::time::sleep(SHIP_LINGER).await;
                }
            }
            Err(error) => {
                spool.nack(ticket);
                tracing::warn!(%error, events = events.len(), "audit events not acknowledged by the auth service; resending");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_DELAY_MAX);
            }
        }
    }
}

/// Waits until the spool holds nothing unacknowledged or `timeout` passes; `true` if
/// empty (for graceful shutdown).
pub async fn wait_empty(spool: &Spool, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while spool.size() > 0 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    // The CRC matches the standard check value.
    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    fn event(n: usize, query_size: usize) -> AuditEvent {
        let mut rng = postern_rt::Rng::from_seed(n as u64);
        AuditEvent::new(
            ("db.session.query", "TDB02I"),
            time::OffsetDateTime::from_unix_timestamp(1_800_000_000 + n as i64)
                .expect("a valid time"),
            &mut rng,
        )
        .with_field(
            "query",
            format!("select '{}' -- {n}", "x".repeat(query_size)),
        )
    }

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).expect("segment file").len()
    }

    // The segment being written is zero-filled a step ahead of its records (its file
    // grows once per step, not per append), the spool's size counts records only, and a
    // batch that does not fit in a segment starts the next one.
    #[test]
    fn segments_are_zero_filled_ahead_and_rotate_when_a_batch_does_not_fit() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let spool = Spool::open(dir.path(), SPOOL_SIZE_MAX_DEFAULT).expect("spool");
        spool.append(&[event(0, 10)]).expect("append");
        let (path, first_len) = {
            let inner = spool.lock();
            let last = inner.segments.back().expect("a segment");
            (last.path.clone(), last.len)
        };
        assert_eq!(spool.size(), first_len);
        assert_eq!(file_len(&path), first_len + SEGMENT_FILL_AHEAD_MIN);
        let bytes = std::fs::read(&path).expect("segment file");
        assert_eq!(decode_record(&bytes[first_len as usize..]), Decoded::End);

        // Appends inside the filled part leave the file's size alone.
        spool.append(&[event(1, 10), event(2, 10)]).expect("append");
        assert_eq!(file_len(&path), first_len + SEGMENT_FILL_AHEAD_MIN);

        // ~40 KiB events, 8 per batch: past the filled part the file grows by as much as
        // it holds (within the bounds), and never past SEGMENT_SIZE_MAX for batches that
        // fit; most appends do not grow it.
        let mut n = 3;
        let mut grown = 0;
        let mut appends = 0;
        while spool.lock().segments.len() == 1 {
            let batch: Vec<_> = (n..n + 8).map(|i| event(i, 40 * 1024)).collect();
            n += 8;
            let before = file_len(&path);
            spool.append(&batch).expect("append");
            appends += 1;
            let inner = spool.lock();
            let first = inner.segments.front().expect("a segment");
            assert!(first.len <= SEGMENT_SIZE_MAX, "{} bytes", first.len);
            let after = file_len(&first.path);
            assert!(after <= SEGMENT_SIZE_MAX, "{after} bytes");
            if inner.segments.len() == 1 {
                if after != before {
                    grown += 1;
                    let ahead = first
                        .len
                        .clamp(SEGMENT_FILL_AHEAD_MIN, SEGMENT_FILL_AHEAD_MAX);
                    assert_eq!(after, (first.len + ahead).min(SEGMENT_SIZE_MAX));
                }
                assert!(after > first.len, "zero-filled ahead");
            }
        }
        assert!(grown * 2 < appends, "grown at {grown} of {appends} appends");
        let inner = spool.lock();
        let records: u64 = inner.segments.iter().map(|s| s.len).sum();
        assert_eq!(spool.size(), records, "the size counts records, not zeros");
        let first = inner.segments.front().expect("a segment");
        assert!(
            first.len + 8 * 40 * 1024 > SEGMENT_SIZE_MAX,
            "rotated early, at {} bytes",
            first.len
        );
        drop(inner);

        // Reopened: every event back, in order; the zero tails are cut off.
        drop(spool);
        let spool = Spool::open(dir.path(), SPOOL_SIZE_MAX_DEFAULT).expect("spool");
        let mut count = 0;
        loop {
            let (batch, ticket) = spool.next_batch(100).expect("batch");
            if batch.is_empty() {
                break;
            }
            for event in &batch {
                assert_eq!(event.time.unix_timestamp(), 1_800_000_000 + count as i64);
                count += 1;
            }
            spool.ack(ticket).expect("ack");
        }
        assert_eq!(count, n);
        assert_eq!(spool.size(), 0);
    }

    // An empty payload is refused: its record would read as a zeroed header, the end of
    // a segment's records.
    #[test]
    fn an_empty_record_is_refused_and_a_zeroed_header_ends_the_records() {
        assert!(matches!(
            encode_record(b"", &mut Vec::new()),
            Err(SpoolError::RecordEmpty)
        ));
        assert_eq!(decode_record(&[0; 64]), Decoded::End);
        assert_eq!(decode_record(&[0; 7]), Decoded::Incomplete);
        // A zero length with a checksum is not the end but a corrupt record.
        assert_eq!(decode_record(&[0, 0, 0, 0, 1, 0, 0, 0]), Decoded::Corrupt);
    }
}
