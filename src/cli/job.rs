//! What every job-running command shares: the job file, `--set`
//! overrides, the lake and the run date.

use std::path::PathBuf;

use clap::Args;

use crate::config::{Job, LakeSpec, parse_run_date};
use crate::error::Result;
use crate::lake::Lake;

/// The job a command runs.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// Job file (TOML); default: the embedded sample job (jobs/sample.toml).
    #[arg(long)]
    pub job: Option<PathBuf>,
    /// Lake root URL or path; overrides lake.url.
    #[arg(long)]
    pub lake: Option<String>,
    /// Run date (YYYY-MM-DD); default: today (UTC).
    #[arg(long)]
    pub run_date: Option<String>,
    /// Override a job key: --set models.meanpool.epochs=5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Where models train: cpu, cuda or cuda:N; overrides `device`.
    #[arg(long)]
    pub device: Option<String>,
}

/// A lake at `url` with default settings.
pub fn open_lake(url: &str) -> Result<Lake> {
    Lake::open(&LakeSpec {
        url: url.to_string(),
        ..Default::default()
    })
}

/// Loads the job: the file given, or the embedded sample job.
pub fn load_job(args: &JobArgs) -> Result<Job> {
    let mut overrides = args.overrides.clone();
    if let Some(lake) = &args.lake {
        // --lake is a shorthand for --set lake.url=...; quote it as a TOML string.
        overrides.push(format!("lake.url={}", toml::Value::String(lake.clone())));
    }
    if let Some(device) = &args.device {
        overrides.push(format!("device={}", toml::Value::String(device.clone())));
    }
    match &args.job {
        Some(path) => Job::load(path, &overrides),
        None => Job::embedded_sample(&overrides),
    }
}

/// The run date given, or today (UTC).
pub fn run_date(arg: &Option<String>) -> Result<chrono::NaiveDate> {
    match arg {
        Some(d) => parse_run_date(d),
        None => Ok(chrono::Utc::now().date_naive()),
    }
}
