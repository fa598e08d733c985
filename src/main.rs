//! The `recdistill` binary: parses the command line, starts logging and the
//! async runtime, runs the command ([`recdistill::cli`]) and maps errors to
//! exit codes (see the README).

use std::process::ExitCode;

use clap::Parser;
use recdistill::cli::{self, Cli, LogFormat};
use recdistill::error::exit_code;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(&cli);
    let json_logs = matches!(cli.log_format, LogFormat::Json);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit_code::INTERNAL as u8);
        }
    };
    match runtime.block_on(cli::dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One report: a JSON line for schedulers, or plain text for people.
            if json_logs {
                tracing::error!(exit_code = e.exit_code(), "{e}");
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
