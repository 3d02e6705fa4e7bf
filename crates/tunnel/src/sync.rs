//! The locks shared between tasks. Under `--cfg postern_loom` they are loom's, so the models in
//! `tests/loom_*.rs` explore every interleaving of the real code; otherwise std's.

use std::sync::PoisonError;

#[cfg(postern_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(not(postern_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`. The structures behind our locks do not panic midway through an update,
/// so a panic elsewhere while one was held leaves them consistent: use them as they are.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
