//! `postern start --config FILE`: runs the roles the config names (auth, proxy, db) in
//! one process, with logs, a metrics endpoint and graceful shutdown on SIGINT/SIGTERM.
//!
//! Order of events:
//! 1. the config is read and checked ([`config`]); errors name file, line and field;
//! 2. logs are set up ([`logging`]);
//! 3. every listener is bound before anything starts, so a busy port fails the start
//!    with the address and the setting that names it;
//! 4. the roles start ([`roles`]): with the auth server in this process, the proxy and
//!    the agent get their host certificates straight from it; otherwise they join with
//!    a token through the auth API;
//! 5. SIGINT or SIGTERM: listeners close, sessions drain (up to the drain timeout), the
//!    agent withdraws its databases, and the process exits 0. A second signal stops at
//!    once.

pub(crate) mod config;
mod host;
mod logging;
mod metrics;
mod roles;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct StartArgs {
    /// The TOML config file (see testdata/examples/postern.toml and docs/OPERATIONS.md).
    #[arg(long, short = 'c', env = "POSTERN_CONFIG")]
    pub(crate) config: PathBuf,
    /// Check the config and exit.
    #[arg(long)]
    pub(crate) check: bool,
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Exit code for a config that does not parse or check.
const EXIT_CONFIG: u8 = 2;

/// Runs `postern start`; the process's exit code.
pub(crate) fn main(args: &StartArgs) -> ExitCode {
    let config = match config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check {
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    if let Err(error) = logging::init(&config.log) {
        eprintln!("error: {error}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("postern")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(roles::run(config, args.config.clone()));
    // Tasks still running (a connection mid-handshake) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!("{error}");
            // Also on standard error in plain words, whatever the log format.
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
