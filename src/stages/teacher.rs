//! The teacher stage: trains the SASRec teacher — and, when the job feeds it
//! item content, `teacher-content`, and the items' text vectors,
//! `teacher-text` (the same content path: a learned projection of the
//! vector added to the id embedding) — on the train split, early-stopped on
//! the valid split. Each is saved as `models/<name>/model.safetensors`
//! (config in the metadata) with its per-epoch history in
//! `training/<name>.parquet`. With `warm_start`, each starts from the
//! earlier run's teacher of the same name. With `models.teacher.baseline`,
//! each learns from that neighbour baseline's soft labels (made per epoch)
//! as well as from the hard labels.

use std::sync::Arc;

use super::StageOutput;
use crate::artifacts::models::write_trained;
use crate::artifacts::warm::{WarmSource, start_sasrec};
use crate::config::{Job, LossFamily};
use crate::dataset::{Dataset, ItemContent};
use crate::error::{Error, Result};
use crate::model::neighbors::Neighbors;
use crate::model::sasrec::SasRecConfig;
use crate::model::{Lineage, ModelArtifact};
use crate::run::RunFolder;
use crate::train::{self, Distillation, LabelSource, NeighborLabels, TrainSettings};

pub use crate::config::models::{TEACHER, TEACHER_CONTENT, TEACHER_TEXT};

/// The vectors the content-fed teachers read.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// The item content table's (`teacher-content`).
    pub content: Option<Arc<ItemContent>>,
    /// The items' text vectors (`teacher-text`).
    pub text: Option<Arc<ItemContent>>,
}

/// The temperature of a baseline's soft labels.
const BASELINE_TEMPERATURE: f32 = 1.0;

/// Trains the enabled teachers and writes their artifacts and histories.
/// `baselines` are the models the baselines stage trained: the one
/// `models.teacher.baseline` names is learned from.
pub async fn train_teachers(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    inputs: Inputs,
    baselines: &[ModelArtifact],
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
        let content = inputs.content.ok_or_else(|| {
            Error::config("models.teacher.content = true, but the run has no item content table")
        })?;
        variants.push((TEACHER_CONTENT, Some(content)));
    }
    if spec.text {
        let text = inputs.text.ok_or_else(|| {
            Error::config("models.teacher.text = true, but the run has no item text vectors")
        })?;
        variants.push((TEACHER_TEXT, Some(text)));
    }
    let baseline = match spec.baseline.as_str() {
        "" => None,
        wanted => {
            let artifact = baselines
                .iter()
                .find(|m| m.card.name == wanted)
                .ok_or_else(|| {
                    Error::config(format!(
                        "models.teacher.baseline = {wanted:?}: the baselines stage of this run built no such model"
                    ))
                })?;
            let family: LossFamily = spec.baseline_loss.parse()?;
            Some((
                Arc::new(Neighbors::from_artifact(artifact)?),
                artifact.sha256(),
                family,
            ))
        }
    };
    for (name, content) in variants {
        let dim = content.as_ref().map_or(0, |c| c.dim);
        let config = SasRecConfig::for_teacher(spec, dataset.n_items(), dim);
        config
            .validate()
            .map_err(|e| Error::config(format!("models.teacher in {}: {e}", job.source)))?;
        let mut settings = TrainSettings::for_teacher(spec, job.spec.seed, name);
        settings.valid_users = job.spec.evaluation.valid_users;
        settings.label_buffer = job.spec.distill.shuffle_buffer;
        let values = content.map(|c| c.values.clone()).unwrap_or_default();
        let (model, origin) = start_sasrec(warm, name, config, values, settings.seed).await?;
        if let Some(warm) = warm.filter(|_| origin.is_some()) {
            warm.bound(&mut settings.epochs, &mut settings.patience);
        }
        let (device, threads) = (job.spec.device.clone(), job.spec.threads);
        let data = Arc::clone(&dataset);
        let mut learn = match &baseline {
            Some((table, sha256, family)) => {
                let labels = NeighborLabels::new(
                    Arc::clone(table),
                    &spec.baseline,
                    sha256,
                    Arc::clone(&dataset),
                    spec.baseline_k
                        .min(dataset.n_items().saturating_sub(1))
                        .max(1),
                    BASELINE_TEMPERATURE,
                )?;
                let distillation = Distillation::new(
                    labels.info().clone(),
                    spec.baseline_alpha,
                    family.clone(),
                    job.spec.distill.rank_decay,
                );
                Some((Arc::new(distillation), labels))
            }
            None => None,
        };
        let lineage = learn.as_ref().map(|(d, _)| Lineage {
            soft_labels: d.labels.location.clone(),
            model: d.labels.model.clone(),
            model_sha256: d.labels.model_sha256.clone(),
            alpha: d.mix.alpha,
            temperature: d.mix.temperature,
        });
        let loss = learn
            .as_ref()
            .map_or_else(|| "ce".to_string(), |(d, _)| d.mix.label());
        let (model, log) = tokio::task::spawn_blocking(move || {
            let source = learn
                .as_mut()
                .map(|(d, labels)| (Arc::clone(d), labels as &mut dyn LabelSource));
            train::fit_on_device(model, &data, &settings, &device, threads, source)
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
        let training = if lineage.is_some() {
            "kd-baseline"
        } else {
            "supervised"
        };
        let mut card = model.card(name, "teacher", training, &loss, lineage)?;
        card.warm_started_from = origin;
        let artifact = model.artifact(card)?;
        out.written
            .extend(write_trained(run, &artifact, Some(&log)).await?);
        out.models.push(artifact);
    }
    Ok(out)
}
