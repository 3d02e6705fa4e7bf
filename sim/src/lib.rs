//! Deterministic simulation of Postern clusters on turmoil.
//!
//! A seed determines a whole run. Real service code runs on turmoil hosts through
//! `postern_rt::Runtime::simulated`; time, the network and faults are simulated, so the
//! same seed replays the same run. What a run did is recorded as a [`Trace`] of
//! meaningful events, and two runs of one seed must give the same [`Trace::hash`].

mod trace;

pub use trace::{Trace, TraceEvent};
