//! The runtime seam: everything that differs between production and simulation.
//!
//! Services reach the outside world only through a [`Runtime`]:
//!
//! - [`Net`]: connect and listen, returning [`Connection`]s (boxed async byte streams);
//!   `tokio::net` in production, `turmoil::net` in simulation.
//! - [`WallClock`]: Unix time for certificates, also a rustls [`TimeProvider`]
//!   (`rustls::time_provider::TimeProvider`) so TLS handshakes check expiry against it.
//!   Monotonic time is `tokio::time`, which turmoil already controls.
//! - [`Rng`]: a seeded random number generator for jitter, agent choice and ids.
//! - a storage root: the folder where durable files live.
//! - [`Blocking`]: where blocking work (file I/O, password hashing) runs: tokio's
//!   blocking pool in production, inline on the simulated host in simulation, because
//!   an OS thread finishing at an unscheduled moment would make a seed unreplayable.
//!
//! No service reads `Instant::now`, `SystemTime::now`, OS randomness or `tokio::net`
//! directly, and no service code is conditional on simulation: the choice is made once,
//! when the `Runtime` is built. That is what makes a failing seed replayable.
//!
//! The turmoil implementations are behind the `sim` cargo feature of this crate only.
//!
//! [`TimeProvider`]: rustls::time_provider::TimeProvider

mod blocking;
mod clock;
mod net;
#[cfg(feature = "planted-bugs")]
pub mod planted;
pub mod read_buffer;
mod rng;

pub use blocking::Blocking;

pub use clock::WallClock;
pub use net::{ByteStream, Connection, Listener, Net};
pub use read_buffer::ReadBuffer;
pub use rng::Rng;

/// Monotonic now, for deadlines handed to sans-IO cores that take a
/// `std::time::Instant`. It is tokio's clock, which turmoil controls in simulation (and
/// which tests can pause), never the OS clock read directly by service code.
pub fn monotonic_now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

use std::path::{Path, PathBuf};

/// Everything a service needs from its environment, cheap to clone.
#[derive(Clone, Debug)]
pub struct Runtime {
    net: Net,
    clock: WallClock,
    rng: Rng,
    storage_root: PathBuf,
    blocking: Blocking,
}

impl Runtime {
    /// The production runtime: real sockets, the system clock, an RNG seeded from the OS.
    pub fn production(storage_root: impl Into<PathBuf>) -> std::io::Result<Self> {
        Ok(Self {
            net: Net::Tokio,
            clock: WallClock::system(),
            rng: Rng::from_os_entropy()?,
            storage_root: storage_root.into(),
            blocking: Blocking::Pool,
        })
    }

    /// A simulated runtime for one turmoil host: turmoil's network and wall clock, and an
    /// RNG determined by `seed`. Must be used from inside a turmoil host.
    #[cfg(feature = "sim")]
    pub fn simulated(seed: u64, storage_root: impl Into<PathBuf>) -> Self {
        Self {
            net: Net::Turmoil,
            clock: WallClock::simulated(),
            rng: Rng::from_seed(seed),
            storage_root: storage_root.into(),
            blocking: Blocking::Inline,
        }
    }

    /// A runtime assembled from parts, for tests that want, say, real sockets with a
    /// manual clock. Blocking work goes to tokio's blocking pool; see
    /// [`Runtime::with_blocking`].
    pub fn from_parts(net: Net, clock: WallClock, rng: Rng, storage_root: PathBuf) -> Self {
        Self {
            net,
            clock,
            rng,
            storage_root,
            blocking: Blocking::Pool,
        }
    }

    /// The same runtime with blocking work run as `blocking` says.
    pub fn with_blocking(mut self, blocking: Blocking) -> Self {
        self.blocking = blocking;
        self
    }

    pub fn net(&self) -> &Net {
        &self.net
    }

    pub fn clock(&self) -> &WallClock {
        &self.clock
    }

    pub fn rng(&self) -> &Rng {
        &self.rng
    }

    pub fn storage_root(&self) -> &Path {
        &self.storage_root
    }

    pub fn blocking(&self) -> Blocking {
        self.blocking
    }
}
