//! The baselines stage: `popularity` and the learned `meanpool` model, each
//! saved as `models/<name>/model.safetensors`, with the learned model's
//! per-epoch history in `training/<name>.parquet`.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::commit::RunFolder;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::lake::WrittenObject;
use crate::model::ModelArtifact;
use crate::model::meanpool::{EpochLog, MeanPool};
use crate::model::popularity::Popularity;

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

/// Schema of `training/<model>.parquet`.
pub fn training_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("model", DataType::Utf8, false),
        Field::new("epoch", DataType::Int32, false),
        Field::new("seconds", DataType::Float64, false),
        Field::new("loss", DataType::Float64, false),
        Field::new("valid_ndcg_10", DataType::Float64, false),
        Field::new("valid_hr_10", DataType::Float64, false),
    ]))
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
        written.push(
            run.put(&model_path("popularity"), artifact.bytes.clone())
                .await?,
        );
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
        written.push(
            run.put(&model_path("meanpool"), artifact.bytes.clone())
                .await?,
        );
        written.push(
            run.write_batches(
                "training/meanpool.parquet",
                training_schema(),
                vec![training_batch("meanpool", &log)?],
                vec![],
            )
            .await?,
        );
        models.push(artifact);
    }
    Ok(Baselines { models, written })
}

fn training_batch(model: &str, log: &[EpochLog]) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![model; log.len()])),
        Arc::new(Int32Array::from_iter_values(
            log.iter().map(|e| e.epoch as i32),
        )),
        Arc::new(Float64Array::from_iter_values(
            log.iter().map(|e| e.seconds),
        )),
        Arc::new(Float64Array::from_iter_values(log.iter().map(|e| e.loss))),
        Arc::new(Float64Array::from_iter_values(
            log.iter().map(|e| e.valid_ndcg_10),
        )),
        Arc::new(Float64Array::from_iter_values(
            log.iter().map(|e| e.valid_hr_10),
        )),
    ];
    RecordBatch::try_new(training_schema(), columns).map_err(|e| Error::internal(e.to_string()))
}

/// Reads back the artifacts an earlier baselines stage wrote.
pub async fn load_models(run: &RunFolder, written: &[WrittenObject]) -> Result<Vec<ModelArtifact>> {
    let mut models = Vec::new();
    for object in written {
        if object.path.starts_with("models/") && object.path.ends_with("/model.safetensors") {
            let bytes = run.get(&object.path).await?;
            models.push(ModelArtifact::parse(&run.url_of(&object.path), bytes)?);
        }
    }
    Ok(models)
}
