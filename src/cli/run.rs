//! `recdistill run` and `recdistill stage NAME`, and the results table.

use std::io::Write;

use clap::Args;

use super::job::{JobArgs, load_job, run_date};
use crate::config::Job;
use crate::error::{Error, Result};
use crate::lake::Lake;
use crate::model::score::Speed;
use crate::run::publish::Published;
use crate::run::shard::Shard;
use crate::stages::evaluate::results::ModelResult;
use crate::stages::{self, RunContext, Stage, StageOutcome};
use crate::tools::publish::publish_run;
use crate::tools::sample::{self, SampleSpec};

/// `recdistill stage NAME`.
#[derive(Debug, Args)]
pub struct StageArgs {
    /// Stage name.
    pub name: String,
    /// Run part I (0-based) of N of the stage (soft-labels and evaluate
    /// only), e.g. `--shard 0/4`: each part is written on its own, and the
    /// next stage joins them into what the unsharded stage writes.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// The job and run.
    #[command(flatten)]
    pub job: JobArgs,
}

/// `recdistill publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The job and the committed run (--run-date) whose model to publish.
    #[command(flatten)]
    pub job: JobArgs,
    /// Publish whatever the gate says (a rollback to an older run, or a
    /// model that scores below the published one).
    #[arg(long)]
    pub force: bool,
}

/// `recdistill publish`: offers a committed run's model for publication.
pub async fn publish(args: PublishArgs) -> Result<()> {
    let job = load_job(&args.job)?;
    let date = run_date(&args.job.run_date)?;
    let outcome = publish_run(&job, date, args.force).await?;
    report_publication(&outcome)
}

/// Prints what publishing did; a model the gate refused is exit 6.
fn report_publication(outcome: &Published) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| Error::io("stdout", e);
    let line = match outcome {
        Published::Now(p) => format!(
            "published {} of run {} (generation {}): {}",
            p.model, p.run_date, p.generation, p.reason
        ),
        Published::Already(p) => format!(
            "{} of run {} is already published (generation {})",
            p.model, p.run_date, p.generation
        ),
        Published::LaterRunServes(p) => format!(
            "not published: {} of the later run {} serves (publish --force replaces it)",
            p.model, p.run_date
        ),
        Published::Refused(why) => return Err(Error::NotPublished(why.clone())),
    };
    writeln!(out, "{line}").map_err(io)
}

/// `recdistill run`: the whole job, then a summary and the results table.
pub async fn run(args: JobArgs) -> Result<()> {
    let job = load_job(&args)?;
    let date = run_date(&args.run_date)?;
    if args.job.is_none() {
        seed_sample_lake(&job).await?;
    }
    let rc = RunContext::new(job, date).await?;
    let summary = stages::run_all(&rc).await?;
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| Error::io("stdout", e);
    writeln!(
        out,
        "run {} of job {} committed to {}",
        summary.manifest.run_id, summary.manifest.job, summary.folder
    )
    .map_err(io)?;
    writeln!(
        out,
        "{} events from {} files; {} output files",
        summary.ingested.rows,
        summary.ingested.files,
        summary.manifest.outputs.len()
    )
    .map_err(io)?;
    results_table(
        &mut out,
        &summary.evaluation.results,
        summary.evaluation.ceiling.as_deref(),
    )
    .map_err(io)?;
    drop(out);
    if rc.job.spec.publish.enabled() {
        let outcome = publish_run(&rc.job, date, false).await?;
        report_publication(&outcome)?;
    }
    Ok(())
}

/// One line per model: accuracy at 10 (and its fraction of the log's Bayes
/// ceiling, where the log has one), size, speed, and whether it is on the
/// accuracy-vs-bytes frontier.
fn results_table(
    out: &mut impl Write,
    results: &[ModelResult],
    ceiling: Option<&[Option<[f64; 3]>]>,
) -> std::io::Result<()> {
    let at_10 = |r: &ModelResult| r.metrics.ks.iter().position(|&k| k == 10);
    let bound = results
        .first()
        .and_then(at_10)
        .and_then(|i| ceiling?.get(i).copied().flatten());
    if let Some([hr, ndcg, mrr]) = bound {
        writeln!(
            out,
            "Bayes ceiling of these test targets: ndcg@10 {ndcg:.4}, hr@10 {hr:.4}, mrr@10 {mrr:.4}"
        )?;
    }
    writeln!(
        out,
        "{:<48} {:<10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10} {:>9} {:>9} {:>8}",
        "model",
        "role",
        "ndcg@10",
        "/ceiling",
        "hr@10",
        "mrr@10",
        "params",
        "bytes",
        "p50_ms",
        "users/s",
        "frontier"
    )?;
    for r in results {
        let at = |v: &[f64]| at_10(r).map_or_else(|| "-".into(), |i| format!("{:.4}", v[i]));
        let speed = |f: fn(&Speed) -> f64, digits: usize| {
            r.speed
                .as_ref()
                .map_or("-".to_string(), |s| format!("{:.*}", digits, f(s)))
        };
        let fraction = match (bound, at_10(r)) {
            (Some([_, ndcg, _]), Some(i)) if ndcg > 0.0 => {
                format!("{:.3}", r.metrics.ndcg[i] / ndcg)
            }
            _ => "-".into(),
        };
        writeln!(
            out,
            "{:<48} {:<10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10} {:>9} {:>9} {:>8}",
            r.name,
            r.role,
            at(&r.metrics.ndcg),
            fraction,
            at(&r.metrics.hr),
            at(&r.metrics.mrr),
            r.params,
            r.size_bytes,
            speed(|s| s.latency_ms_p50, 3),
            speed(|s| s.users_per_s, 0),
            if r.pareto { "*" } else { "" }
        )?;
    }
    Ok(())
}

/// The embedded job runs on a local `lake/` folder; fill it with the bundled
/// sample the first time.
async fn seed_sample_lake(job: &Job) -> Result<()> {
    let lake = Lake::open(&job.spec.lake)?;
    if lake.list(&job.spec.input.interactions).await?.is_empty() {
        tracing::info!(lake = %lake.url(), "seeding the lake with the bundled sample");
        sample::write_sample(&lake, &SampleSpec::default()).await?;
    }
    Ok(())
}

/// `recdistill stage NAME`: one stage of a run.
pub async fn stage(args: StageArgs) -> Result<()> {
    let stage: Stage = args.name.parse()?;
    let shard: Option<Shard> = args.shard.as_deref().map(str::parse).transpose()?;
    let job = load_job(&args.job)?;
    let date = run_date(&args.job.run_date)?;
    let mut rc = RunContext::new(job, date).await?;
    match stages::run_stage(&mut rc, stage, shard).await? {
        StageOutcome::Validated(ingested) => println!(
            "input valid: {} events in {} files; fingerprint {}",
            ingested.rows, ingested.files, ingested.fingerprint.sha256
        ),
        StageOutcome::Wrote(written) => {
            for object in written {
                println!("{}\t{} bytes", rc.run.url_of(&object.path), object.size);
            }
        }
        StageOutcome::Committed(manifest) => println!(
            "run {} committed to {} ({} files)",
            manifest.run_id,
            rc.run.display(),
            manifest.outputs.len()
        ),
    }
    Ok(())
}
