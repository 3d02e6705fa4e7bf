//! Randomness for jitter, agent choice and ids: seeded in simulation, from the OS in
//! production, and the same type either way.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, RngCore, SeedableRng};

/// A shared handle to a ChaCha20 generator. Clones draw from the same stream; use
/// [`Rng::fork`] to give a subsystem a stream of its own, so that its draws do not shift
/// everyone else's when it draws more or less.
#[derive(Clone)]
pub struct Rng {
    inner: Arc<Mutex<ChaCha20Rng>>,
}

impl Rng {
    /// A generator fully determined by `seed`.
    pub fn from_seed(seed: u64) -> Self {
        Self::new(ChaCha20Rng::seed_from_u64(seed))
    }

    /// A generator seeded from the operating system's entropy.
    pub fn from_os_entropy() -> std::io::Result<Self> {
        ChaCha20Rng::try_from_os_rng()
            .map(Self::new)
            .map_err(|e| std::io::Error::other(format!("no OS entropy: {e}")))
    }

    fn new(rng: ChaCha20Rng) -> Self {
        Self {
            inner: Arc::new(Mutex::new(rng)),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ChaCha20Rng) -> T) -> T {
        // A panic while holding this lock cannot leave the generator in a broken state
        // (its state is always valid), so a poisoned lock is used as is.
        let mut rng = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut rng)
    }

    /// A new, independent generator seeded from this one.
    pub fn fork(&self) -> Self {
        let mut seed = [0u8; 32];
        self.with(|rng| rng.fill_bytes(&mut seed));
        Self::new(ChaCha20Rng::from_seed(seed))
    }

    pub fn u64(&self) -> u64 {
        self.with(|rng| rng.next_u64())
    }

    pub fn fill(&self, dest: &mut [u8]) {
        self.with(|rng| rng.fill_bytes(dest));
    }

    /// A uniform number in `0..bound`, without modulo bias. `bound` 0 gives 0.
    pub fn below(&self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        // Reject the top partial copy of 0..bound so every value is equally likely.
        let zone = u64::MAX - (u64::MAX % bound);
        loop {
            let x = self.u64();
            if x < zone {
                return x % bound;
            }
        }
    }

    /// True with probability `numerator / denominator`.
    pub fn chance(&self, numerator: u64, denominator: u64) -> bool {
        self.below(denominator) < numerator
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// A duration uniform in `[base * (1 - spread), base * (1 + spread)]`, with `spread`
    /// given in per-mille (0..=1000). Used for retry and announce jitter.
    pub fn jitter(&self, base: Duration, spread_permille: u32) -> Duration {
        let spread_permille = u128::from(spread_permille.min(1000));
        let base_us = base.as_micros();
        let width_us = base_us * spread_permille / 1000;
        let low_us = base_us - width_us;
        let span = u64::try_from(2 * width_us + 1).unwrap_or(u64::MAX);
        let us = low_us + u128::from(self.below(span));
        Duration::from_micros(u64::try_from(us).unwrap_or(u64::MAX))
    }
}

impl fmt::Debug for Rng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Rng(ChaCha20)")
    }
}

/// So that libraries that take an `RngCore` (salts, nonces, ids) draw from the seam.
impl RngCore for Rng {
    fn next_u32(&mut self) -> u32 {
        self.with(|rng| rng.next_u32())
    }

    fn next_u64(&mut self) -> u64 {
        self.u64()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.fill(dest);
    }
}

/// ChaCha20 is a cryptographically secure generator; seeded from the OS it is fit for
/// secrets, seeded from a simulation seed it is (deliberately) predictable.
impl CryptoRng for Rng {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop_assert, proptest};

    // The same seed gives the same stream; different seeds differ.
    #[test]
    fn a_seed_determines_the_stream() {
        let a = Rng::from_seed(7);
        let b = Rng::from_seed(7);
        let c = Rng::from_seed(8);
        let xs: Vec<u64> = (0..4).map(|_| a.u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.u64()).collect();
        let zs: Vec<u64> = (0..4).map(|_| c.u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    // A fork's draws do not move the parent's stream beyond the one fork draw.
    #[test]
    fn forks_are_independent_streams() {
        let a = Rng::from_seed(1);
        let b = Rng::from_seed(1);
        let child = a.fork();
        let _ = b.fork();
        for _ in 0..10 {
            child.u64();
        }
        assert_eq!(a.u64(), b.u64());
    }

    // Shuffling keeps the multiset and is seed-determined.
    #[test]
    fn shuffle_is_a_permutation_determined_by_the_seed() {
        let mut v: Vec<u32> = (0..50).collect();
        let mut w = v.clone();
        Rng::from_seed(3).shuffle(&mut v);
        Rng::from_seed(3).shuffle(&mut w);
        assert_eq!(v, w);
        assert_ne!(v, (0..50).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }

    proptest! {
        // below() stays below its bound for any bound and seed.
        #[test]
        fn below_stays_below(seed: u64, bound in 1u64..) {
            let rng = Rng::from_seed(seed);
            for _ in 0..8 {
                prop_assert!(rng.below(bound) < bound);
            }
        }

        // jitter() stays inside [base(1-s), base(1+s)].
        #[test]
        fn jitter_stays_in_its_window(seed: u64, base_ms in 0u64..10_000_000, spread in 0u32..=1000) {
            let rng = Rng::from_seed(seed);
            let base = Duration::from_millis(base_ms);
            let d = rng.jitter(base, spread);
            let width = base.as_micros() * u128::from(spread) / 1000;
            prop_assert!(d.as_micros() >= base.as_micros() - width);
            prop_assert!(d.as_micros() <= base.as_micros() + width);
        }
    }
}
