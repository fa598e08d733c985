//! The baselines stage: `popularity` and the learned `meanpool` model, each
//! saved as `models/<name>/model.safetensors`, with the learned model's
//! per-epoch history in `training/<name>.parquet`.

use std::sync::Arc;

use super::StageOutput;
use crate::artifacts::models::write_trained;
use crate::config::Job;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::model::popularity::Popularity;
use crate::run::RunFolder;
use crate::train;

/// Trains the enabled baselines and writes their artifacts.
pub async fn train_baselines(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
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
        let (meanpool_spec, seed) = (spec.meanpool.clone(), job.spec.seed);
        let valid_users = job.spec.evaluation.valid_users;
        let data = Arc::clone(&dataset);
        let (model, log) = tokio::task::spawn_blocking(move || {
            train::meanpool::fit(&data, &meanpool_spec, seed, valid_users)
        })
        .await
        .map_err(|e| Error::internal(format!("meanpool training failed: {e}")))??;
        let artifact = model.to_artifact("meanpool")?;
        out.written
            .extend(write_trained(run, &artifact, Some(&log)).await?);
        out.models.push(artifact);
    }
    Ok(out)
}
