//! The record of a simulated run: meaningful events in order, and a hash of them.

use std::fmt;
use std::time::Duration;

/// One meaningful event: when (simulated time since the run started), where (host), what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    pub at: Duration,
    pub host: String,
    pub what: String,
}

impl fmt::Display for TraceEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.at.as_millis();
        write!(
            f,
            "{:>6}.{:03}s {:<10} {}",
            ms / 1000,
            ms % 1000,
            self.host,
            self.what
        )
    }
}

/// The events of one run, and a running 64-bit FNV-1a hash of them.
///
/// FNV-1a is not cryptographic; it needs only to change when any event changes, and to be
/// the same on every machine (no per-process seed, unlike std's `DefaultHasher`).
#[derive(Clone, Debug)]
pub struct Trace {
    events: Vec<TraceEvent>,
    /// Events beyond this many are hashed but not kept, to bound memory on long runs.
    events_kept_max: usize,
    events_dropped: u64,
    hash: u64,
}

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Trace {
    /// Default for [`Trace::with_limit`]: enough for a failing seed's story.
    pub const EVENTS_KEPT_MAX_DEFAULT: usize = 100_000;

    pub fn new() -> Self {
        Self::with_limit(Self::EVENTS_KEPT_MAX_DEFAULT)
    }

    pub fn with_limit(events_kept_max: usize) -> Self {
        Self {
            events: Vec::new(),
            events_kept_max,
            events_dropped: 0,
            hash: FNV_OFFSET_BASIS,
        }
    }

    pub fn record(&mut self, at: Duration, host: &str, what: impl Into<String>) {
        let event = TraceEvent {
            at,
            host: host.to_owned(),
            what: what.into(),
        };
        self.mix(&event.at.as_nanos().to_le_bytes());
        self.mix(event.host.as_bytes());
        // A separator that cannot occur inside the fields keeps ("ab","c") != ("a","bc").
        self.mix(&[0xff]);
        self.mix(event.what.as_bytes());
        self.mix(&[0xff]);
        if self.events.len() < self.events_kept_max {
            self.events.push(event);
        } else {
            self.events_dropped += 1;
        }
    }

    fn mix(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(FNV_PRIME);
        }
    }

    /// The hash of every event recorded, kept or not.
    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn events(&self) -> &[TraceEvent] {
        &self.events
    }

    /// How many events were hashed but not kept, beyond the limit.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped
    }
}

impl Default for Trace {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace_of(events: &[(u64, &str, &str)]) -> Trace {
        let mut trace = Trace::new();
        for &(ms, host, what) in events {
            trace.record(Duration::from_millis(ms), host, what);
        }
        trace
    }

    // Equal event sequences hash equal; any change in time, host, text or order differs.
    #[test]
    fn hash_follows_every_field_and_the_order() {
        let base = trace_of(&[(1, "proxy1", "listen"), (2, "agent1", "tunnel up")]);
        let same = trace_of(&[(1, "proxy1", "listen"), (2, "agent1", "tunnel up")]);
        assert_eq!(base.hash(), same.hash());
        let variants = [
            trace_of(&[(1, "proxy1", "listen"), (3, "agent1", "tunnel up")]),
            trace_of(&[(1, "proxy2", "listen"), (2, "agent1", "tunnel up")]),
            trace_of(&[(1, "proxy1", "listen"), (2, "agent1", "tunnel down")]),
            trace_of(&[(2, "agent1", "tunnel up"), (1, "proxy1", "listen")]),
            trace_of(&[(1, "proxy1l", "isten"), (2, "agent1", "tunnel up")]),
        ];
        for v in &variants {
            assert_ne!(base.hash(), v.hash(), "{:?}", v.events());
        }
    }

    // Past the limit events still change the hash but are not kept.
    #[test]
    fn limit_bounds_memory_but_not_the_hash() {
        let mut a = Trace::with_limit(1);
        let mut b = Trace::with_limit(1);
        a.record(Duration::ZERO, "h", "one");
        b.record(Duration::ZERO, "h", "one");
        a.record(Duration::ZERO, "h", "two");
        b.record(Duration::ZERO, "h", "three");
        assert_eq!(a.events().len(), 1);
        assert_eq!(a.events_dropped(), 1);
        assert_ne!(a.hash(), b.hash());
    }

    // The printed form is what replay shows: time, host, event.
    #[test]
    fn display_shows_time_host_and_event() {
        let trace = trace_of(&[(12_345, "agent1", "tunnel up to proxy1")]);
        assert_eq!(
            trace.events()[0].to_string(),
            "    12.345s agent1     tunnel up to proxy1"
        );
    }
}
