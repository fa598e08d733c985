//! The baselines stage: `popularity` and the learned `meanpool` model, each
//! saved as `models/<name>/model.safetensors`, with the learned model's
//! per-epoch history in `training/<name>.parquet`.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::commit::RunFolder;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::lake::WrittenObject;
use crate::model::ModelArtifact;
use crate::model::meanpool::MeanPool;
use crate::model::popularity::Popularity;
use crate::train::{EpochLog, training_batch, training_schema};

/// Trained baselines and the files written for them.
#[derive(Debug, Clone)]
pub struct Baselines {
    /// One artifact per model, in training order.
    pub models: Vec<ModelArtifact>,
    /// Files written.
    pub written: Vec<WrittenObject>,
}

/// Where a model's artifact lives in the run folder.
pub fn model_path(name: &str) -> String {
    format!("models/{name}/model.safetensors")
}

/// Writes a trained model's artifact and, for a learned model, its
/// per-epoch history (`training/<name>.parquet`); returns the files.
pub async fn write_trained(
    run: &RunFolder,
    artifact: &ModelArtifact,
    log: Option<&[EpochLog]>,
) -> Result<Vec<WrittenObject>> {
    let name = &artifact.card.name;
    let mut written = vec![run.put(&model_path(name), artifact.bytes.clone()).await?];
    if let Some(log) = log {
        written.push(
            run.write_batches(
                &format!("training/{name}.parquet"),
                training_schema(),
                vec![training_batch(name, log)?],
                vec![],
            )
            .await?,
        );
    }
    Ok(written)
}

/// Trains the enabled baselines and writes their artifacts.
pub async fn train_baselines(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
) -> Result<Baselines> {
    let mut models = Vec::new();
    let mut written = Vec::new();
    let spec = &job.spec.models;
    if spec.popularity.enabled {
        let artifact = Popularity::fit(&dataset).to_artifact("popularity")?;
        written.extend(write_trained(run, &artifact, None).await?);
        models.push(artifact);
    }
    if spec.meanpool.enabled {
        let (meanpool_spec, seed) = (spec.meanpool.clone(), job.spec.seed);
        let data = Arc::clone(&dataset);
        let (model, log) =
            tokio::task::spawn_blocking(move || MeanPool::fit(&data, &meanpool_spec, seed))
                .await
                .map_err(|e| Error::internal(format!("meanpool training failed: {e}")))??;
        let artifact = model.to_artifact("meanpool")?;
        written.extend(write_trained(run, &artifact, Some(&log)).await?);
        models.push(artifact);
    }
    Ok(Baselines { models, written })
}

/// Reads back the model artifacts a training stage wrote (`written`, from its
/// stage record). Refuses (exit 3) a file whose size or checksum is not what
/// the stage recorded, or that holds another model than its folder names.
pub async fn load_models(run: &RunFolder, written: &[WrittenObject]) -> Result<Vec<ModelArtifact>> {
    let mut models = Vec::new();
    for object in written {
        let Some(name) = object
            .path
            .strip_prefix("models/")
            .and_then(|p| p.strip_suffix("/model.safetensors"))
        else {
            continue;
        };
        let url = run.url_of(&object.path);
        let bytes = run.get(&object.path).await?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if bytes.len() as u64 != object.size || sha256 != object.sha256 {
            return Err(Error::data(
                &url,
                format!(
                    "the file has {} bytes and sha256 {sha256}, but its stage wrote {} bytes with sha256 {}: it was changed or damaged; rerun the stage that trains {name}",
                    bytes.len(),
                    object.size,
                    object.sha256
                ),
            ));
        }
        let artifact = ModelArtifact::parse(&url, bytes)?;
        if artifact.card.name != name {
            return Err(Error::data(
                &url,
                format!(
                    "the file holds model {:?}, not {name:?}",
                    artifact.card.name
                ),
            ));
        }
        models.push(artifact);
    }
    Ok(models)
}
