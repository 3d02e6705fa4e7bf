//! Reconnect delays: exponential backoff with seeded, subtractive jitter.

use std::time::Duration;

use postern_rt::Rng;

use crate::error::Error;

/// How long to wait before the next connection attempt to a proxy.
///
/// After `failures` consecutive failed attempts the base delay is
/// `initial * multiplier^failures`, capped at `max`. The delay actually used is drawn
/// uniformly from `[base - base * jitter_permille / 1000, base]`: jitter only ever
/// shortens a delay, so `max` is a hard ceiling and agents that lost the same proxy at
/// the same moment do not come back in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Base delay before the first retry.
    pub initial: Duration,
    /// Ceiling of any delay.
    pub max: Duration,
    /// Growth factor per consecutive failure (at least 1).
    pub multiplier: u32,
    /// Share of the base delay that jitter may take off, in per-mille (0..=1000).
    pub jitter_permille: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            multiplier: 2,
            jitter_permille: 250,
        }
    }
}

impl Backoff {
    /// Refuses settings under which the delays would not make sense.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: &str| {
            Err(Error::InvalidConfig {
                field: "backoff",
                reason: reason.to_owned(),
            })
        };
        if self.initial.is_zero() {
            return invalid(
                "initial must be greater than zero (a zero delay retries in a hot loop)",
            );
        }
        if self.max < self.initial {
            return invalid("max must be at least initial");
        }
        if self.multiplier == 0 {
            return invalid("multiplier must be at least 1");
        }
        if self.jitter_permille > 1000 {
            return invalid("jitter_permille must be at most 1000");
        }
        Ok(())
    }

    /// The base delay (before jitter) after `failures` consecutive failures.
    pub fn base(&self, failures: u32) -> Duration {
        let mut base = self.initial;
        for _ in 0..failures {
            if base >= self.max {
                break;
            }
            base = base.saturating_mul(self.multiplier);
        }
        base.min(self.max)
    }

    /// The window `[low, high]` that the jittered delay after `failures` failures is drawn from.
    pub fn window(&self, failures: u32) -> (Duration, Duration) {
        let base = self.base(failures);
        (base - self.jitter_width(base), base)
    }

    /// The delay after `failures` consecutive failures, drawn from [`Backoff::window`].
    pub fn delay(&self, failures: u32, rng: &Rng) -> Duration {
        let base = self.base(failures);
        let width = self.jitter_width(base);
        let width_us = u64::try_from(width.as_micros()).unwrap_or(u64::MAX);
        let cut_us = rng.below(width_us.saturating_add(1));
        base - Duration::from_micros(cut_us).min(width)
    }

    fn jitter_width(&self, base: Duration) -> Duration {
        let permille = u128::from(self.jitter_permille.min(1000));
        let width_us = base.as_micros() * permille / 1000;
        Duration::from_micros(u64::try_from(width_us).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_rt::Rng;
    use proptest::prelude::*;

    // Base delays double from initial and stop at max.
    #[test]
    fn base_grows_geometrically_and_caps_at_max() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1_000),
            multiplier: 2,
            jitter_permille: 0,
        };
        let bases: Vec<u128> = (0..6).map(|n| backoff.base(n).as_millis()).collect();
        assert_eq!(bases, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(backoff.base(u32::MAX), Duration::from_millis(1_000));
    }

    // Nonsense settings are refused with the field named.
    #[test]
    fn invalid_settings_are_refused() {
        let ok = Backoff::default();
        assert!(ok.validate().is_ok());
        for bad in [
            Backoff {
                initial: Duration::ZERO,
                ..ok
            },
            Backoff {
                max: Duration::from_millis(1),
                ..ok
            },
            Backoff {
                multiplier: 0,
                ..ok
            },
            Backoff {
                jitter_permille: 1001,
                ..ok
            },
        ] {
            assert!(matches!(
                bad.validate(),
                Err(Error::InvalidConfig {
                    field: "backoff",
                    ..
                })
            ));
        }
    }

    fn backoffs() -> impl Strategy<Value = Backoff> {
        (1u64..10_000, 0u64..1_000_000, 1u32..10, 0u32..=1000).prop_map(
            |(initial_ms, extra_ms, multiplier, jitter_permille)| Backoff {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(initial_ms + extra_ms),
                multiplier,
                jitter_permille,
            },
        )
    }

    proptest! {
        // A delay never exceeds max, and stays inside its jitter window.
        #[test]
        fn delay_stays_in_window_and_below_max(backoff in backoffs(), failures in 0u32..100, seed: u64) {
            let rng = Rng::from_seed(seed);
            let (low, high) = backoff.window(failures);
            let delay = backoff.delay(failures, &rng);
            prop_assert!(delay <= backoff.max);
            prop_assert!(low <= delay && delay <= high, "{low:?} <= {delay:?} <= {high:?}");
            let width = high - low;
            prop_assert!(width.as_micros() <= high.as_micros() * u128::from(backoff.jitter_permille) / 1000);
        }

        // More failures never mean a shorter base delay.
        #[test]
        fn base_is_monotonic(backoff in backoffs(), failures in 0u32..100) {
            prop_assert!(backoff.base(failures) <= backoff.base(failures + 1));
        }
    }
}
