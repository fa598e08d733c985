//! `recdistill gc`: cleans what killed runs left in run folders.

use clap::Args;

use super::job::{JobArgs, load_job};
use crate::config::parse_run_date;
use crate::error::Result;
use crate::run::gc::{self, GcOptions};

/// `recdistill gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// The job (and, with --run-date, the one run) to clean.
    #[command(flatten)]
    pub job: JobArgs,
    /// Every job under the lake's output prefix, not only the job file's.
    #[arg(long)]
    pub all_jobs: bool,
    /// Delete uncommitted run folders (killed or failed runs) whole.
    #[arg(long)]
    pub uncommitted: bool,
    /// Report what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Cleans the run folders and prints what was (or would be) removed.
pub async fn gc(args: GcArgs) -> Result<()> {
    let spec = load_job(&args.job)?.spec;
    let options = GcOptions {
        job: (!args.all_jobs).then(|| spec.name.clone()),
        run_date: args
            .job
            .run_date
            .as_deref()
            .map(parse_run_date)
            .transpose()?,
        remove_uncommitted: args.uncommitted,
        dry_run: args.dry_run,
    };
    let report = gc::gc(&spec, &options).await?;
    print!("{report}");
    Ok(())
}
