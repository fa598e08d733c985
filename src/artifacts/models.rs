//! Trained models in a run folder: `models/<name>/model.safetensors` and,
//! for a learned model, its per-epoch history `training/<name>.parquet`;
//! written by the training stages and read back, checked against the stage
//! record, by the stages after them.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::lake::WrittenObject;
use crate::model::ModelArtifact;
use crate::run::RunFolder;
use crate::train::EpochLog;
use crate::train::history::{training_batch, training_schema};

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
