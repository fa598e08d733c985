//! The teacher stage: trains the SASRec teacher — and, when the job feeds it
//! item content, `teacher-content` — on the train split, early-stopped on
//! the valid split. Each is saved as `models/<name>/model.safetensors`
//! (config in the metadata) with its per-epoch history in
//! `training/<name>.parquet`.

use std::sync::Arc;

use crate::baselines::write_trained;
use crate::commit::RunFolder;
use crate::dataset::{Dataset, ItemContent};
use crate::error::{Error, Result};
use crate::job::{Job, TeacherSpec};
use crate::lake::WrittenObject;
use crate::model::ModelArtifact;
use crate::model::sasrec::reference::{self, CandleSteps};
use crate::model::sasrec::{SasRec, SasRecConfig};
use crate::train::{self, EpochLog, TrainSettings};

/// Model name of the id-only teacher.
pub const TEACHER: &str = "teacher";
/// Model name of the teacher fed item content.
pub const TEACHER_CONTENT: &str = "teacher-content";

/// Trained teachers and the files written for them.
#[derive(Debug, Clone, Default)]
pub struct Teachers {
    /// One artifact per model.
    pub models: Vec<ModelArtifact>,
    /// Files written.
    pub written: Vec<WrittenObject>,
}

/// The architecture `spec` asks for over `n_items` items.
pub fn teacher_config(spec: &TeacherSpec, n_items: usize, content_dim: usize) -> SasRecConfig {
    SasRecConfig {
        n_items,
        d_model: spec.d_model,
        layers: spec.layers,
        heads: spec.heads,
        ffn: spec.ffn,
        max_len: spec.max_len,
        dropout: spec.dropout,
        content_dim,
    }
}

/// The optimization settings `spec` asks for.
pub fn train_settings(spec: &TeacherSpec, seed: u64, label: &str) -> TrainSettings {
    TrainSettings {
        batch_size: spec.batch_size,
        lr: spec.lr,
        beta1: spec.beta1,
        beta2: spec.beta2,
        weight_decay: spec.weight_decay,
        epochs: spec.epochs,
        patience: spec.patience,
        softmax: spec.softmax,
        negatives: spec.negatives,
        sampling: spec.sampling,
        seed,
        label: label.to_string(),
    }
}

/// The thread pool training runs in: `threads` threads, 0 for one per core.
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::internal(format!("cannot start {threads} training threads: {e}")))
}

/// Trains one SASRec model on `device` (`cpu`: the hand-written CPU
/// trainer; otherwise candle's autograd on that device).
pub fn fit_model(
    config: SasRecConfig,
    content: Vec<f32>,
    dataset: &Dataset,
    settings: &TrainSettings,
    device: &str,
    threads: usize,
) -> Result<(SasRec, Vec<EpochLog>)> {
    let model = SasRec::new(config, content, settings.seed)?;
    thread_pool(threads)?.install(|| {
        if device == "cpu" {
            train::fit(model, dataset, settings)
        } else {
            let device = reference::device(device)?;
            let mut steps = CandleSteps::new(&model, settings, &device)?;
            train::fit_with(model, dataset, settings, &mut steps, None)
        }
    })
}

/// Trains the enabled teachers and writes their artifacts and histories.
pub async fn train_teachers(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    content: Option<Arc<ItemContent>>,
) -> Result<Teachers> {
    let spec = &job.spec.models.teacher;
    let mut out = Teachers::default();
    if !spec.enabled {
        return Ok(out);
    }
    let mut variants = Vec::new();
    if spec.ids {
        variants.push((TEACHER, None));
    }
    if spec.content {
        let content = content.ok_or_else(|| {
            Error::config("models.teacher.content = true, but the run has no item content table")
        })?;
        variants.push((TEACHER_CONTENT, Some(content)));
    }
    for (name, content) in variants {
        let dim = content.as_ref().map_or(0, |c| c.dim);
        let config = teacher_config(spec, dataset.n_items(), dim);
        config
            .validate()
            .map_err(|e| Error::config(format!("models.teacher in {}: {e}", job.source)))?;
        let settings = train_settings(spec, job.spec.seed, name);
        let (device, threads) = (job.spec.device.clone(), job.spec.threads);
        let data = Arc::clone(&dataset);
        let (model, log) = tokio::task::spawn_blocking(move || {
            let values = content.map(|c| c.values.clone()).unwrap_or_default();
            fit_model(config, values, &data, &settings, &device, threads)
        })
        .await
        .map_err(|e| Error::internal(format!("{name} training failed: {e}")))??;
        if let Some(best) = train::best_epoch(&log) {
            tracing::info!(
                model = name,
                epochs = log.len(),
                best_epoch = best.epoch,
                valid_ndcg_10 = best.valid_ndcg_10,
                "teacher trained"
            );
        }
        let artifact = model.to_artifact(name, "teacher", "supervised", "ce", None)?;
        out.written
            .extend(write_trained(run, &artifact, Some(&log)).await?);
        out.models.push(artifact);
    }
    Ok(out)
}
