//! The compress stage: turns a trained SASRec model (a distilled student)
//! into smaller variants that are stored and scored as they are —
//! `int8`/`int4` integers with scales, sparse rows, low-rank factors,
//! product-quantized item tables, fewer feed-forward units — each its own
//! model `<name>@<variant>`.
//!
//! A variant is made in a fixed order: its shape steps
//! ([`shrink::shrink`]: structured pruning of feed-forward units, low-rank
//! projection of the item table, unstructured magnitude pruning), an
//! optional recovery fine-tune against the teacher's soft labels (pruning
//! masks and the low-rank subspace held fixed after every optimizer step),
//! then encoding ([`shrink::encode`]): factors, sparse rows, and
//! quantization of every matrix.

use std::sync::Arc;

use super::StageOutput;
use crate::artifacts::models::write_trained;
use crate::artifacts::soft_labels::{SoftLabelFile, open_source_labels};
use crate::config::{CompressSpec, DistillSpec, Job, LossFamily, Variant};
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::model::sasrec::infer::{CompressionInfo, StoredSasRec};
use crate::model::sasrec::{self, SasRec, shrink};
use crate::model::{ModelArtifact, ModelCard};
use crate::run::RunFolder;
use crate::train::cpu::Trainer;
use crate::train::{
    Distillation, EpochLog, LabelSource, SlotLabels, Steps, TrainSettings, fit_with, thread_pool,
};

/// The models compressed when `compress.models` is empty: the student
/// distilled with the first loss family, from the teacher or via the
/// assistants.
pub fn default_models(distill: &DistillSpec) -> Vec<String> {
    let route = if distill.direct || distill.assistants.is_empty() {
        "kd-teacher"
    } else {
        "kd-assistant"
    };
    let family = distill
        .losses
        .first()
        .map_or("kl".to_string(), |f| f.replace('+', "-"));
    let suffix: Vec<String> = if distill.seeds.is_empty() {
        vec![String::new()]
    } else {
        distill.seeds.iter().map(|s| format!("-s{s}")).collect()
    };
    suffix
        .iter()
        .map(|s| format!("{}-{route}-{family}{s}", distill.student.name))
        .collect()
}

/// The compress stage: every planned variant of every model named, saved
/// as stored, with its recovery history when it had one.
pub async fn compress_models(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    models: &[ModelArtifact],
) -> Result<StageOutput> {
    let spec = &job.spec.compress;
    let mut out = StageOutput::default();
    if !spec.enabled || !job.spec.distill.enabled {
        return Ok(out);
    }
    let variants: Vec<Variant> = spec
        .variants
        .iter()
        .map(|v| v.parse())
        .collect::<Result<_>>()?;
    let names = if spec.models.is_empty() {
        default_models(&job.spec.distill)
    } else {
        spec.models.clone()
    };
    let labels = if spec.recovery_epochs > 0 && variants.iter().any(Variant::recovers) {
        Some(open_source_labels(&job.spec.distill, run, &dataset).await?)
    } else {
        None
    };
    for name in names {
        let source = models.iter().find(|m| m.card.name == name).ok_or_else(|| {
            let have: Vec<&str> = models.iter().map(|m| m.card.name.as_str()).collect();
            Error::config(format!(
                "compress.models names {name:?}, which this run did not train (models: {})",
                have.join(", ")
            ))
        })?;
        if source.card.kind != sasrec::KIND || source.is_stored() {
            return Err(Error::config(format!(
                "compress.models: {name:?} is not a SASRec model as trained"
            )));
        }
        let dense = shrink::fold_content(&SasRec::from_artifact(source)?);
        for variant in &variants {
            let plan = Plan {
                spec: spec.clone(),
                distill: job.spec.distill.clone(),
                seed: job.spec.seed,
                threads: job.spec.threads,
                valid_users: job.spec.evaluation.valid_users,
                source_loss: source.card.loss.clone(),
            };
            let (data, labels, dense, variant_in) = (
                Arc::clone(&dataset),
                labels.clone(),
                dense.clone(),
                variant.clone(),
            );
            let label = format!("{name}@{variant}");
            let made = tokio::task::spawn_blocking(move || {
                make_variant(&dense, &variant_in, &plan, &data, labels, &label)
            })
            .await
            .map_err(|e| Error::internal(format!("compressing {name}: {e}")))??;
            let variant_name = variant.name(made.rank);
            let model_name = format!("{name}@{variant_name}");
            let card = ModelCard {
                name: model_name.clone(),
                config: serde_json::to_value(made.model.config)
                    .map_err(|e| Error::internal(e.to_string()))?,
                variant: variant_name.clone(),
                ..source.card.clone()
            };
            let info = CompressionInfo {
                variant: variant_name,
                source: name.clone(),
                source_sha256: source.sha256(),
                recovery_epochs: made.log.as_ref().map_or(0, Vec::len),
                steps: made.steps,
            };
            let artifact = ModelArtifact::from_stored(card, &made.model, Some(&info))?;
            tracing::info!(
                model = %model_name,
                bytes = artifact.bytes.len(),
                source_bytes = source.bytes.len(),
                params = artifact.params,
                steps = %info.steps.join("; "),
                "compressed"
            );
            out.written
                .extend(write_trained(run, &artifact, made.log.as_deref()).await?);
            out.models.push(artifact);
        }
    }
    Ok(out)
}

/// What a variant needs besides its model.
struct Plan {
    spec: CompressSpec,
    distill: DistillSpec,
    seed: u64,
    threads: usize,
    valid_users: usize,
    source_loss: Option<String>,
}

/// A made variant.
struct Made {
    model: StoredSasRec,
    rank: Option<usize>,
    steps: Vec<String>,
    log: Option<Vec<EpochLog>>,
}

fn make_variant(
    source: &SasRec,
    variant: &Variant,
    plan: &Plan,
    dataset: &Dataset,
    labels: Option<SoftLabelFile>,
    label: &str,
) -> Result<Made> {
    let shrink::Shrunk {
        mut model,
        rank,
        basis,
        masks,
        pq,
        mut steps,
    } = shrink::shrink(
        source,
        variant,
        &plan.spec.prune_scope,
        Some(&dataset.train_counts),
        plan.spec.pq_weighting,
    )?;
    let mut log = None;
    if variant.recovers()
        && plan.spec.recovery_epochs > 0
        && let Some(mut labels) = labels
    {
        let student = &plan.distill.student;
        let mut settings = TrainSettings::for_link(&plan.distill, student, plan.seed, label);
        settings.valid_users = plan.valid_users;
        settings.epochs = plan.spec.recovery_epochs;
        settings.patience = plan.spec.recovery_patience;
        if plan.spec.recovery_lr > 0.0 {
            settings.lr = plan.spec.recovery_lr;
        }
        let family: LossFamily = plan
            .source_loss
            .as_deref()
            .and_then(|l| l.strip_prefix("ce+"))
            .and_then(|l| l.parse().ok())
            .map_or_else(|| plan.distill.losses[0].parse(), Ok::<LossFamily, Error>)?;
        let distillation = Arc::new(Distillation::new(
            labels.info().clone(),
            plan.distill.alpha_of(student),
            family,
            plan.distill.rank_decay,
        ));
        let mix = &distillation.mix;
        steps.push(format!(
            "recovery: up to {} epochs on {} against {} (α {}, T {})",
            settings.epochs,
            mix.label(),
            labels.info().model,
            mix.alpha,
            mix.temperature
        ));
        let trainer = Trainer::distilling(&model, dataset, &settings, Arc::clone(&distillation))?;
        let mut constrained = Constrained {
            trainer,
            basis: basis.as_deref(),
            masks: masks.as_deref(),
            pq: pq.as_ref(),
        };
        let (recovered, epochs) = thread_pool(plan.threads)?.install(|| {
            fit_with(
                model,
                dataset,
                &settings,
                &mut constrained,
                Some(&mut labels),
            )
        })?;
        model = recovered;
        log = Some(epochs);
    }
    Ok(Made {
        model: shrink::encode(&model, variant, rank, pq.as_ref(), plan.spec.int4_group),
        rank,
        steps,
        log,
    })
}

/// Recovery steps: the trainer's step, then the compression constraints
/// put back (pruned weights to zero, the item table onto its subspace or
/// its product quantization's codes).
struct Constrained<'a> {
    trainer: Trainer,
    basis: Option<&'a [f32]>,
    masks: Option<&'a [Vec<bool>]>,
    pq: Option<&'a shrink::PqCodes>,
}

impl Steps for Constrained<'_> {
    fn step(
        &mut self,
        model: &mut SasRec,
        inputs: &[u32],
        targets: &[u32],
        soft: SlotLabels<'_>,
        batch: usize,
        step_seed: u64,
    ) -> Result<f64> {
        let loss = self
            .trainer
            .step(model, inputs, targets, soft, batch, step_seed)?;
        shrink::constrain(model, self.basis, self.masks, self.pq);
        Ok(loss)
    }
}
