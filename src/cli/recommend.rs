//! `recdistill recommend` and `recdistill inspect`: a saved model, used and looked into.

use std::path::{Path, PathBuf};

use clap::Args;

use super::job::{JobArgs, load_job, run_date};
use crate::dataset;
use crate::error::{Error, Result};
use crate::stages::{RunContext, features};
use crate::tools::recommend as tool;

/// `recdistill recommend`.
#[derive(Debug, Args)]
pub struct RecommendArgs {
    /// The model file (model.safetensors) to score with.
    #[arg(long)]
    model: PathBuf,
    /// Users to recommend for: a file with one user id per line.
    #[arg(long, conflicts_with = "all", required_unless_present = "all")]
    users: Option<PathBuf>,
    /// Recommend for every user of the run.
    #[arg(long)]
    all: bool,
    /// Items per user.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Parquet file to write (replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// The run whose users, histories and catalogue to use.
    #[command(flatten)]
    job: JobArgs,
}

/// Writes the top-K lists of the chosen users.
pub async fn recommend(args: RecommendArgs) -> Result<()> {
    if args.k == 0 {
        return Err(Error::config("--k must be at least 1"));
    }
    let artifact = tool::read_artifact(&args.model)?;
    let job = load_job(&args.job)?;
    let date = run_date(&args.job.run_date)?;
    let rc = RunContext::new(job, date).await?;
    features::register_features(&rc.ctx, &rc.run, &rc.job).await?;
    let dataset = dataset::load_dataset(&rc.ctx).await?;
    let users = tool::select_users(&dataset, args.users.as_deref())?;
    let batch = rc.job.spec.evaluation.batch_users;
    let (k, out) = (args.k, args.out.clone());
    let rows = tokio::task::spawn_blocking(move || {
        tool::recommend(&artifact, &dataset, &users, k, batch, &out)
    })
    .await
    .map_err(|e| Error::internal(format!("recommend failed: {e}")))??;
    println!("{rows} recommendations written to {}", args.out.display());
    Ok(())
}

/// Prints a model file's card and layout.
pub fn inspect(artifact: &Path) -> Result<()> {
    let artifact = tool::read_artifact(artifact)?;
    print!("{}", tool::inspect(&artifact)?);
    Ok(())
}
