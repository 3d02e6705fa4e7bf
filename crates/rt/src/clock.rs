//! Wall-clock time, the only kind of time that certificates care about.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::time_provider::TimeProvider;
use rustls_pki_types::UnixTime;

/// Unix wall-clock time from one of three sources, plus a skew.
///
/// Clones share their skew and, for a manual clock, their time: a simulator or test that
/// keeps a clone can move the clock of the service that holds the other.
#[derive(Clone)]
pub struct WallClock {
    source: Source,
    /// Added to the source's reading, in milliseconds (negative: behind).
    skew_ms: Arc<AtomicI64>,
}

#[derive(Clone)]
enum Source {
    System,
    #[cfg(feature = "sim")]
    Simulated,
    Manual(Arc<AtomicU64>),
}

impl WallClock {
    /// The operating system's clock.
    pub fn system() -> Self {
        Self::with_source(Source::System)
    }

    /// Turmoil's simulated wall clock of the host that reads it (the simulation's epoch
    /// plus elapsed simulated time).
    #[cfg(feature = "sim")]
    pub fn simulated() -> Self {
        Self::with_source(Source::Simulated)
    }

    /// A clock that stands still at `start` until [`WallClock::set`] or
    /// [`WallClock::advance`] moves it.
    pub fn manual(start: UnixTime) -> Self {
        let start_ms = start.as_secs().saturating_mul(1000);
        Self::with_source(Source::Manual(Arc::new(AtomicU64::new(start_ms))))
    }

    fn with_source(source: Source) -> Self {
        Self {
            source,
            skew_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Now, as Unix time. Saturates at the epoch if a negative skew would go before it.
    pub fn now(&self) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_millis(self.now_ms()))
    }

    /// Now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        let source_ms = self.source_ms();
        let skew_ms = self.skew_ms.load(Ordering::Relaxed);
        source_ms.saturating_add_signed(skew_ms)
    }

    fn source_ms(&self) -> u64 {
        let since_epoch = match &self.source {
            Source::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO),
            #[cfg(feature = "sim")]
            Source::Simulated => turmoil::since_epoch()
                // Invariant: simulated clocks are only handed to code running on a
                // turmoil host; reading one elsewhere is a bug in the simulator.
                .expect("simulated wall clock read outside a turmoil host"),
            Source::Manual(ms) => return ms.load(Ordering::Relaxed),
        };
        u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
    }

    /// Sets the skew: the clock reads `skew` ahead of its source (negative: behind).
    pub fn set_skew_ms(&self, skew_ms: i64) {
        self.skew_ms.store(skew_ms, Ordering::Relaxed);
    }

    /// The current skew in milliseconds.
    pub fn skew_ms(&self) -> i64 {
        self.skew_ms.load(Ordering::Relaxed)
    }

    /// Moves the clock forward by `by`: a manual clock's time, any other clock's skew.
    pub fn advance(&self, by: Duration) {
        let by_ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        match &self.source {
            Source::Manual(ms) => {
                ms.fetch_add(by_ms, Ordering::Relaxed);
            }
            _ => {
                let by_ms = i64::try_from(by_ms).unwrap_or(i64::MAX);
                self.skew_ms.fetch_add(by_ms, Ordering::Relaxed);
            }
        }
    }

    /// Sets a manual clock to `to`; on other clocks, sets the skew so that it reads `to`.
    pub fn set(&self, to: UnixTime) {
        let to_ms = to.as_secs().saturating_mul(1000);
        match &self.source {
            Source::Manual(ms) => ms.store(to_ms, Ordering::Relaxed),
            _ => {
                let skew = i128::from(to_ms) - i128::from(self.source_ms());
                let skew =
                    i64::try_from(skew).unwrap_or(if skew < 0 { i64::MIN } else { i64::MAX });
                self.skew_ms.store(skew, Ordering::Relaxed);
            }
        }
    }
}

impl fmt::Debug for WallClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.source {
            Source::System => "system",
            #[cfg(feature = "sim")]
            Source::Simulated => "simulated",
            Source::Manual(_) => "manual",
        };
        f.debug_struct("WallClock")
            .field("source", &source)
            .field("skew_ms", &self.skew_ms())
            .finish()
    }
}

/// rustls asks this for the time when it checks certificate validity, so handshakes
/// follow the injected clock (and its skew).
impl TimeProvider for WallClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(self.now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A manual clock moves only when told to, and its clones move with it.
    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_it() {
        let clock = WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(1_000)));
        let other = clock.clone();
        assert_eq!(clock.now().as_secs(), 1_000);
        other.advance(Duration::from_secs(5));
        assert_eq!(clock.now().as_secs(), 1_005);
        other.set(UnixTime::since_unix_epoch(Duration::from_secs(7)));
        assert_eq!(clock.now().as_secs(), 7);
    }

    // Skew shifts any clock, in both directions, and saturates at the epoch.
    #[test]
    fn skew_shifts_the_reading_and_saturates_at_the_epoch() {
        let clock = WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(100)));
        clock.set_skew_ms(-40_000);
        assert_eq!(clock.now().as_secs(), 60);
        clock.set_skew_ms(-400_000);
        assert_eq!(clock.now_ms(), 0);
        clock.set_skew_ms(3_600_000);
        assert_eq!(clock.now().as_secs(), 3_700);
    }

    // On the system clock, advance and set work through the skew.
    #[test]
    fn system_clock_advances_through_skew() {
        let clock = WallClock::system();
        let before = clock.now().as_secs();
        clock.advance(Duration::from_secs(86_400));
        let after = clock.now().as_secs();
        assert!(after >= before + 86_400, "{before} -> {after}");
        clock.set(UnixTime::since_unix_epoch(Duration::from_secs(1_000_000)));
        let set = clock.now().as_secs();
        assert!((1_000_000..1_000_010).contains(&set), "{set}");
    }

    // rustls sees the same time as the service.
    #[test]
    fn time_provider_reports_the_clock() {
        let clock = WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(42)));
        assert_eq!(clock.current_time().map(|t| t.as_secs()), Some(42));
    }
}
