//! Publishing a committed run's model (`publish.model`): after `recdistill
//! run` commits, and by hand with `recdistill publish --run-date D
//! [--force]`, which is also how to roll back. The gate and the log are in
//! [`crate::run::publish`]; this reads what they judge from the run's
//! manifest and evaluation table.

use chrono::NaiveDate;

use crate::artifacts::evaluation::scores_at_10;
use crate::artifacts::models::model_path;
use crate::config::Job;
use crate::error::{Error, Result};
use crate::lake::Lake;
use crate::run::RunFolder;
use crate::run::commit;
use crate::run::publish::{
    self, Candidate, NDCG_10, POPULARITY_NDCG_10, PUBLICATION_FORMAT, Publication, Published,
};

/// The popularity baseline's model name.
const POPULARITY: &str = "popularity";

/// Offers `job`'s `publish.model` of its committed run of `run_date` for
/// publication; `force` publishes it past the gate.
pub async fn publish_run(job: &Job, run_date: NaiveDate, force: bool) -> Result<Published> {
    let spec = &job.spec.publish;
    if !spec.enabled() {
        return Err(Error::config(format!(
            "publish.model is not set in {}: name the model to serve, e.g. --set publish.model='\"student-kd-teacher-rank@int8\"'",
            job.source
        )));
    }
    let lake = Lake::open(&job.spec.lake)?;
    let prefix = &job.spec.lake.output_prefix;
    let run = RunFolder::new(lake.clone(), prefix, &job.spec.name, run_date);
    let manifest = commit::read_manifest(&run).await?.ok_or_else(|| {
        Error::config(format!(
            "{} is not a committed run (no _SUCCESS): run the job for {run_date} first",
            run.display()
        ))
    })?;
    let scores = scores_at_10(&run, &manifest).await?;
    let model = &spec.model;
    let Some(metrics) = scores.get(model) else {
        return Err(Error::config(format!(
            "publish.model = {model:?} is not a model of {}; its models are {}",
            run.display(),
            scores.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    };
    let popularity = scores
        .get(POPULARITY)
        .and_then(|m| m.get(NDCG_10).copied())
        .ok_or_else(|| {
            Error::config(format!(
                "{} has no popularity NDCG@10 to compare with: publishing needs models.popularity.enabled",
                run.display()
            ))
        })?;
    let path = model_path(model);
    let file = manifest.listed(&path).ok_or_else(|| {
        Error::data(
            run.url_of(&path),
            "the run's manifest does not list the model file",
        )
    })?;
    let mut metrics = metrics.clone();
    metrics.insert(POPULARITY_NDCG_10.into(), popularity);
    let candidate = Candidate {
        record: Publication {
            format_version: PUBLICATION_FORMAT,
            generation: 0,
            job: job.spec.name.clone(),
            run_id: manifest.run_id.clone(),
            run_date: manifest.run_date.clone(),
            model: model.clone(),
            model_path: run.rel(&path),
            model_url: run.url_of(&path),
            sha256: file.sha256.clone(),
            size: file.size,
            metrics,
            forced: false,
            reason: String::new(),
            published_at: String::new(),
        },
        popularity_ndcg_10: popularity,
    };
    let outcome = publish::publish(&lake, prefix, &candidate, spec.min_ratio, force).await?;
    match &outcome {
        Published::Now(p) => tracing::info!(
            model = %p.model,
            run_date = %p.run_date,
            generation = p.generation,
            reason = %p.reason,
            "published"
        ),
        Published::Already(p) => tracing::info!(
            model = %p.model,
            run_date = %p.run_date,
            generation = p.generation,
            "already published"
        ),
        Published::LaterRunServes(p) => tracing::info!(
            serving = %p.run_date,
            run_date = %run_date,
            "a later run's model is published; this run does not replace it (publish --force does)"
        ),
        Published::Refused(why) => tracing::warn!(%why, "not published"),
    }
    Ok(outcome)
}
