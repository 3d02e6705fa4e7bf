//! `postern`: the one binary. This part holds the administration commands, which work
//! on the auth state directly (run them on an auth server host, like `tctl`).

mod admin;
mod cli;
mod client_cmd;
mod start;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let cli::Command::User(command) = &cli.command {
        return client_cmd::main(command);
    }
    if let cli::Command::Start(args) = &cli.command {
        return start::main(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(admin::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
