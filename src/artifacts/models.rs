//! Trained models in a run folder: `models/<name>/model.safetensors` and,
//! for a learned model, its per-epoch history `training/<name>.parquet`;
//! written by the training stages and read back, checked against the stage
//! record, by the stages after them.

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
        let remedy = format!("rerun the stage that trains {name}");
        models.push(read_model(run, object, name, "its stage wrote", &remedy).await?);
    }
    Ok(models)
}

/// Reads model `name`'s file, `listed` with its size and SHA-256 by
/// `recorded` (as [`RunFolder::get_checked`]), and parses it. Refuses
/// (exit 3) a file that differs from the listing, is malformed, or holds
/// another model.
pub async fn read_model(
    run: &RunFolder,
    listed: &WrittenObject,
    name: &str,
    recorded: &str,
    remedy: &str,
) -> Result<ModelArtifact> {
    let url = run.url_of(&listed.path);
    let bytes = run.get_checked(listed, recorded, remedy).await?;
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
    Ok(artifact)
}
