//! The command line: argument structs, one function per command, and the
//! results table. `main` only parses, starts logging and the runtime,
//! dispatches here and turns the outcome into an exit code.

mod bench;
mod data;
mod gc;
mod job;
mod recommend;
mod run;
mod sql;

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::error::Result;
use bench::BenchWhat;
use data::{ImportSource, SampleArgs};
use gc::GcArgs;
use job::JobArgs;
use recommend::RecommendArgs;
use run::{PublishArgs, StageArgs};
use sql::SqlArgs;

#[derive(Debug, Parser)]
#[command(
    name = "recdistill",
    version,
    about = "Recommendation logs in a data lake → a small, fast recommender, with the evidence of how good it is."
)]
pub struct Cli {
    /// Log format on stderr: `text` for people, `json` for schedulers.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written to stderr: text for people, one JSON object per
/// line for schedulers. (The variants carry no doc comments: clap would
/// print them as per-value help.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole job and commit it. Without --job: the bundled sample in ./lake.
    Run(JobArgs),
    /// Run one stage of a run: ingest, features, baselines, teacher,
    /// soft-labels, distill, compress, evaluate or commit.
    Stage(StageArgs),
    /// Publish the `publish.model` of a committed run (--run-date) when it
    /// passes the gate: NDCG@10 at least publish.min_ratio x the published
    /// run's and above popularity's. --force publishes it regardless (how to
    /// roll back). `run` does this after its commit.
    Publish(PublishArgs),
    /// Convert a public dataset into lake tables.
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// Read-only SQL over the lake's tables and the latest committed run.
    Sql(SqlArgs),
    /// Write the deterministic synthetic sample (as shipped in data-samples/sample).
    Sample(SampleArgs),
    /// Top-K recommendations from a saved model (as trained or compressed)
    /// for users of a run, on their whole history.
    Recommend(RecommendArgs),
    /// Print a saved model's card and each tensor's scheme, shape and bytes.
    Inspect {
        /// The model file (model.safetensors).
        artifact: PathBuf,
    },
    /// Remove what killed runs left in run folders: half-written files,
    /// objects a committed run does not list, and (with --uncommitted)
    /// uncommitted run folders. Folders in use by a live run are skipped.
    Gc(GcArgs),
    /// Benchmarks for docs/benchmarks.md (they print numbers; they never fail on them).
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

/// Runs one command.
pub async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run(args) => run::run(args).await,
        Command::Stage(args) => run::stage(args).await,
        Command::Publish(args) => run::publish(args).await,
        Command::Import { source } => data::import(source).await,
        Command::Sql(args) => sql::sql(args).await,
        Command::Sample(args) => data::sample(args).await,
        Command::Recommend(args) => recommend::recommend(args).await,
        Command::Inspect { artifact } => recommend::inspect(&artifact),
        Command::Gc(args) => gc::gc(args).await,
        Command::Bench { what } => bench::bench(what).await,
    }
}

/// Logs to stderr: text for people, JSON lines for schedulers (progress
/// bars off); our own logs at the `-v`/`-q` level, the engines' warnings.
pub fn init_logging(cli: &Cli) {
    let level = if cli.quiet {
        "warn"
    } else {
        match cli.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    // Our own logs at `level`; the engines' only when asked for.
    let default = format!("warn,recdistill={level}");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => builder.with_target(false).init(),
        LogFormat::Json => {
            crate::progress::disable();
            builder.json().init()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::stages::Stage;

    #[test]
    fn stage_help_names_every_stage() {
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("stage")
            .expect("a stage command")
            .render_help()
            .to_string();
        for stage in Stage::ALL {
            assert!(
                help.contains(stage.name()),
                "{} missing in:\n{help}",
                stage.name()
            );
        }
    }
}
