//! The baselines stage: `popularity` and the learned `meanpool` model, each
//! saved as `models/<name>/model.safetensors`, with the learned model's
//! per-epoch history in `training/<name>.parquet`. With `warm_start`,
//! `meanpool` starts from the earlier run's.

use std::sync::Arc;

use super::StageOutput;
use crate::artifacts::models::write_trained;
use crate::artifacts::warm::WarmSource;
use crate::config::Job;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::model::popularity::Popularity;
use crate::run::RunFolder;
use crate::train;

/// Model name of the learned baseline.
pub const MEANPOOL: &str = "meanpool";

/// Trains the enabled baselines and writes their artifacts.
pub async fn train_baselines(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    warm: Option<&WarmSource>,
) -> Result<StageOutput> {
    let mut out = StageOutput::default();
    let spec = &job.spec.models;
    if spec.popularity.enabled {
        let artifact = Popularity::fit(&dataset).to_artifact("popularity")?;
        out.written
            .extend(write_trained(run, &artifact, None).await?);
        out.models.push(artifact);
    }
    if spec.meanpool.enabled {
        let (mut meanpool_spec, seed) = (spec.meanpool.clone(), job.spec.seed);
        let mut previous = match warm {
            Some(warm) => warm.meanpool(MEANPOOL).await?.map(|p| (warm, p)),
            None => None,
        };
        if let Some((_, (model, origin))) = &previous
            && let Some(key) = train::meanpool::warm_start_blocker(model, &meanpool_spec)
        {
            tracing::warn!(
                model = MEANPOOL,
                key,
                from = %origin.run_date,
                "warm start: this setting changed the model's shape since the earlier run; it starts cold"
            );
            previous = None;
        }
        let mut origin = None;
        let mut warm_model = None;
        if let Some((warm, (model, from))) = previous {
            warm.bound(&mut meanpool_spec.epochs, &mut meanpool_spec.patience);
            warm_model = Some((model, warm.rows.clone()));
            origin = Some(from);
        }
        let valid_users = job.spec.evaluation.valid_users;
        let data = Arc::clone(&dataset);
        let (model, log) = tokio::task::spawn_blocking(move || {
            let warm = warm_model.as_ref().map(|(m, rows)| (m, rows.as_slice()));
            train::meanpool::fit(&data, &meanpool_spec, seed, valid_users, warm)
        })
        .await
        .map_err(|e| Error::internal(format!("meanpool training failed: {e}")))??;
        let mut card = model.card(MEANPOOL)?;
        card.warm_started_from = origin;
        let artifact = model.artifact(card)?;
        out.written
            .extend(write_trained(run, &artifact, Some(&log)).await?);
        out.models.push(artifact);
    }
    Ok(out)
}
