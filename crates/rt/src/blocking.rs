//! Where blocking work runs.

/// How a service runs work that blocks the thread (file I/O with fsync, password
/// hashing).
///
/// In production such work goes to tokio's blocking pool so the reactor keeps serving
/// other connections. In simulation it runs inline: turmoil drives each host on one
/// thread in simulated time, and a pool thread that finishes whenever the OS schedules
/// it would make the same seed take different paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocking {
    /// `tokio::task::spawn_blocking`.
    Pool,
    /// Run on the calling task, holding its thread until done.
    Inline,
}

impl Blocking {
    /// Runs `work` as this policy says and returns its result. A panic in `work` is
    /// resumed on the caller, as if the work had run inline.
    pub async fn run<F, T>(self, work: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match self {
            Blocking::Inline => work(),
            Blocking::Pool => match tokio::task::spawn_blocking(work).await {
                Ok(value) => value,
                Err(error) => match error.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    // The runtime is shutting down and dropped the task; nothing is
                    // waiting for the result any more, so park this task with it.
                    Err(_) => std::future::pending().await,
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn both_policies_return_the_work_result() {
        assert_eq!(Blocking::Inline.run(|| 6 * 7).await, 42);
        assert_eq!(Blocking::Pool.run(|| 6 * 7).await, 42);
    }

    #[tokio::test]
    async fn inline_runs_on_the_calling_thread() {
        let caller = std::thread::current().id();
        let ran_on = Blocking::Inline.run(|| std::thread::current().id()).await;
        assert_eq!(ran_on, caller);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_panic_in_pool_work_reaches_the_caller() {
        let outcome = tokio::spawn(Blocking::Pool.run(|| -> u8 { panic!("boom") })).await;
        assert!(outcome.unwrap_err().is_panic());
    }
}
