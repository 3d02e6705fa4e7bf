//! Monotonic time for the cores, as the drivers read it.

use std::time::Duration;

use tokio::time::Instant;

/// tokio's monotonic clock (which turmoil and paused-time tests control, see
/// ARCHITECTURE.md §3), as a [`Duration`] since the driver started: the `now` the
/// sans-IO cores take.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Monotonic {
    start: Instant,
}

impl Monotonic {
    /// Starts the clock. Call inside the runtime whose clock should be used.
    pub(crate) fn start() -> Self {
        // tokio's clock, not the OS's: under turmoil this is simulated time.
        Self {
            start: Instant::now(),
        }
    }

    pub(crate) fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The tokio instant of core time `at`, for `sleep_until`.
    pub(crate) fn instant(&self, at: Duration) -> Instant {
        self.start + at
    }
}

/// Sleeps until `deadline`, or forever without one.
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
