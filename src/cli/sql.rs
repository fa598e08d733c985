//! `recdistill sql`: read-only SQL over the lake and a job's committed run.

use std::path::PathBuf;

use clap::Args;

use crate::config::{Job, JobSpec, parse_run_date};
use crate::error::{Error, Result};
use crate::tools::query::{self, OutputFormat};

/// `recdistill sql`.
#[derive(Debug, Args)]
pub struct SqlArgs {
    /// The query; without it, statements ending in ';' are read from stdin.
    query: Option<String>,
    /// Lake root URL or path (default: the job's lake.url).
    #[arg(long)]
    lake: Option<String>,
    /// Job file or job name whose latest committed run to query.
    #[arg(long)]
    job: Option<String>,
    /// Query this run date's run instead of the latest.
    #[arg(long)]
    run_date: Option<String>,
    /// Where the query runs: `df://HOST:PORT` for a Ballista scheduler,
    /// "" for in-process DataFusion (default: the job's lake.engine).
    #[arg(long)]
    engine: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
    /// Write the result here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs the query given, or the statements on stdin.
pub async fn sql(args: SqlArgs) -> Result<()> {
    // --job may name a job file (its lake and name are used) or just a job name.
    let (mut spec, job_name) = match &args.job {
        Some(j) if std::path::Path::new(j).is_file() => {
            let job = Job::load(std::path::Path::new(j), &[])?;
            let name = job.spec.name.clone();
            (job.spec, Some(name))
        }
        Some(name) => (JobSpec::default(), Some(name.clone())),
        None => (JobSpec::default(), None),
    };
    if let Some(lake) = &args.lake {
        spec.lake.url = lake.clone();
    }
    if let Some(engine) = &args.engine {
        spec.lake.engine = engine.clone();
        spec.lake.ballista_scheduler().map_err(Error::config)?;
    }
    let run_date = args.run_date.as_deref().map(parse_run_date).transpose()?;
    let (ctx, catalog) = query::open(&spec, job_name.as_deref(), run_date).await?;
    match &catalog.run {
        Some(run) => tracing::info!(run = %run, tables = ?catalog.tables, "querying"),
        None if !catalog.jobs.is_empty() => tracing::warn!(
            jobs = ?catalog.jobs,
            "several jobs in the lake; pass --job NAME to query one's latest run"
        ),
        None => {
            tracing::info!(tables = ?catalog.tables, "no committed run found; querying the input tables")
        }
    }
    match &args.query {
        Some(sql) => {
            let batches = query::execute(&ctx, sql).await?;
            match &args.out {
                Some(path) => {
                    let mut file = std::fs::File::create(path).map_err(|e| {
                        Error::config(format!("cannot create {}: {e}", path.display()))
                    })?;
                    query::print(&batches, args.format, &mut file)
                }
                None => query::print(
                    &batches,
                    args.format,
                    &mut std::io::BufWriter::new(std::io::stdout()),
                ),
            }
        }
        None => query::interactive(&ctx, args.format).await,
    }
}
