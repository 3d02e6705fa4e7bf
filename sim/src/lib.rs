//! Deterministic simulation of Postern clusters on turmoil.
//!
//! A seed determines a whole run. Real service code runs on turmoil hosts through
//! `postern_rt::Runtime::simulated`; time, the network and faults are simulated, so the
//! same seed replays the same run. What a run did is recorded as a [`Trace`] of
//! meaningful events, and two runs of one seed must give the same [`Trace::hash`].
//!
//! - [`fakedb`]: the only fake part, small PostgreSQL servers that record every
//!   statement they execute and as whom;
//! - [`authhost`]: the real auth server on the `auth` host, and the harness's
//!   administrative handle on it;
//! - [`world`]: the shared record of a run that invariants are checked against.

pub mod authhost;
pub mod client;
pub mod cluster;
pub mod fakedb;
pub mod scenario;
mod trace;
pub mod world;

pub use trace::{Trace, TraceEvent};
