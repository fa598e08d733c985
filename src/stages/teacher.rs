//! The teacher stage: trains the SASRec teacher — and, when the job feeds it
//! item content, `teacher-content` — on the train split, early-stopped on
//! the valid split. Each is saved as `models/<name>/model.safetensors`
//! (config in the metadata) with its per-epoch history in
//! `training/<name>.parquet`. With `warm_start`, each starts from the
//! earlier run's teacher of the same name.

use std::sync::Arc;

use super::StageOutput;
use crate::artifacts::models::write_trained;
use crate::artifacts::warm::{WarmSource, start_sasrec};
use crate::config::Job;
use crate::dataset::{Dataset, ItemContent};
use crate::error::{Error, Result};
use crate::model::sasrec::SasRecConfig;
use crate::run::RunFolder;
use crate::train::{self, TrainSettings};

/// Model name of the id-only teacher.
pub const TEACHER: &str = "teacher";
/// Model name of the teacher fed item content.
pub const TEACHER_CONTENT: &str = "teacher-content";

/// Trains the enabled teachers and writes their artifacts and histories.
pub async fn train_teachers(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    content: Option<Arc<ItemContent>>,
    warm: Option<&WarmSource>,
) -> Result<StageOutput> {
    let spec = &job.spec.models.teacher;
    let mut out = StageOutput::default();
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
        let config = SasRecConfig::for_teacher(spec, dataset.n_items(), dim);
        config
            .validate()
            .map_err(|e| Error::config(format!("models.teacher in {}: {e}", job.source)))?;
        let mut settings = TrainSettings::for_teacher(spec, job.spec.seed, name);
        settings.valid_users = job.spec.evaluation.valid_users;
        let values = content.map(|c| c.values.clone()).unwrap_or_default();
        let (model, origin) = start_sasrec(warm, name, config, values, settings.seed).await?;
        if let Some(warm) = warm.filter(|_| origin.is_some()) {
            warm.bound(&mut settings.epochs, &mut settings.patience);
        }
        let (device, threads) = (job.spec.device.clone(), job.spec.threads);
        let data = Arc::clone(&dataset);
        let (model, log) = tokio::task::spawn_blocking(move || {
            train::fit_on_device(model, &data, &settings, &device, threads, None)
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
        let mut card = model.card(name, "teacher", "supervised", "ce", None)?;
        card.warm_started_from = origin;
        let artifact = model.artifact(card)?;
        out.written
            .extend(write_trained(run, &artifact, Some(&log)).await?);
        out.models.push(artifact);
    }
    Ok(out)
}
