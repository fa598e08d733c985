//! The distill stage: walks the chain `teacher → assistant(s) → student`.
//! Each link reads the previous link's soft labels back from the lake (so
//! the soft-labels and distill stages can run on different days or
//! machines), trains on `α · hard + (1 − α) · soft`, and — when a later link
//! learns from it — emits its own soft labels. The student is also trained
//! from scratch, directly from the teacher, and via the assistants, once per
//! loss family: the ablation that shows what each route is worth. With
//! `warm_start`, each model starts from the earlier run's of the same name.

use std::sync::Arc;

use super::StageOutput;
use crate::artifacts::models::write_trained;
use crate::artifacts::soft_labels::{
    SoftLabelFile, SoftLabelSettings, open_soft_labels, open_source_labels, soft_labels_path,
    write_soft_labels,
};
use crate::artifacts::warm::{WarmSource, start_sasrec};
use crate::config::{Job, LinkSpec, LossFamily};
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::lake::WrittenObject;
use crate::model::sasrec::{SasRec, SasRecConfig};
use crate::model::{Lineage, ModelArtifact};
use crate::run::RunFolder;
use crate::train::{self, Distillation, EpochLog, LabelSource, TrainSettings};

/// One model to train: its name, card fields and what it learns from.
struct Plan {
    name: String,
    link: LinkSpec,
    role: &'static str,
    training: &'static str,
    seed: u64,
    /// `None` for hard labels only.
    distillation: Option<(Arc<Distillation>, SoftLabelFile)>,
}

/// Trains, for each seed, the assistants in chain order (each emitting soft
/// labels for the next link), then every student of the ablation. With
/// `distill.seeds`, model names end in `-s<seed>`.
pub async fn distill_chain(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    warm: Option<&WarmSource>,
) -> Result<StageOutput> {
    let spec = &job.spec.distill;
    let mut out = StageOutput::default();
    if !spec.enabled {
        return Ok(out);
    }
    let families: Vec<LossFamily> = spec
        .losses
        .iter()
        .map(|f| f.parse())
        .collect::<Result<_>>()?;
    // How a link learns from `labels`: its α, the soft losses of `family`,
    // at the temperature the labels were emitted with.
    let learn = |labels: &SoftLabelFile, link: &LinkSpec, family: &LossFamily| {
        let distillation = Distillation::new(
            labels.info().clone(),
            spec.alpha_of(link),
            family.clone(),
            spec.rank_decay,
        );
        Some((Arc::new(distillation), labels.clone()))
    };
    let teacher_labels = open_source_labels(spec, run, &dataset).await?;
    let seeds = if spec.seeds.is_empty() {
        vec![job.spec.seed]
    } else {
        spec.seeds.clone()
    };
    for seed in seeds {
        let suffix = if spec.seeds.is_empty() {
            String::new()
        } else {
            format!("-s{seed}")
        };

        // The assistants: each from the previous link's labels, emitting its own.
        let mut labels = teacher_labels.clone();
        for (i, assistant) in spec.assistants.iter().enumerate() {
            let family = if assistant.loss.is_empty() {
                families[0].clone()
            } else {
                assistant.loss.parse()?
            };
            let plan = Plan {
                name: format!("{}{suffix}", assistant.name),
                link: assistant.clone(),
                role: "assistant",
                training: if i == 0 { "kd-teacher" } else { "kd-assistant" },
                seed,
                distillation: learn(&labels, assistant, &family),
            };
            let artifact = train_link(job, run, &dataset, plan, warm, &mut out.written).await?;
            let settings = SoftLabelSettings::for_link(spec, i + 1);
            let (written, _) = write_soft_labels(
                run,
                Arc::clone(&dataset),
                &artifact,
                settings,
                job.spec.threads,
            )
            .await?;
            out.written.push(written);
            let path = soft_labels_path(&artifact.card.name);
            labels = open_soft_labels(run, &path, &dataset, settings.expected()).await?;
            out.models.push(artifact);
        }

        // The students: scratch, from the teacher, via the assistants.
        let student = &spec.student;
        let mut plans = Vec::new();
        if spec.scratch {
            plans.push(Plan {
                name: format!("{}-scratch{suffix}", student.name),
                link: student.clone(),
                role: "student",
                training: "scratch",
                seed,
                distillation: None,
            });
        }
        let mut routes = Vec::new();
        if spec.direct || spec.assistants.is_empty() {
            routes.push(("kd-teacher", teacher_labels.clone()));
        }
        if !spec.assistants.is_empty() {
            routes.push(("kd-assistant", labels));
        }
        for (training, labels) in routes {
            for family in &families {
                plans.push(Plan {
                    name: format!(
                        "{}-{training}-{}{suffix}",
                        student.name,
                        family.to_string().replace('+', "-")
                    ),
                    link: student.clone(),
                    role: "student",
                    training,
                    seed,
                    distillation: learn(&labels, student, family),
                });
            }
        }
        for plan in plans {
            let artifact = train_link(job, run, &dataset, plan, warm, &mut out.written).await?;
            out.models.push(artifact);
        }
    }
    Ok(out)
}

/// Trains one planned model on the job's device and writes its artifact
/// and training history.
async fn train_link(
    job: &Job,
    run: &RunFolder,
    dataset: &Arc<Dataset>,
    plan: Plan,
    warm: Option<&WarmSource>,
    written: &mut Vec<WrittenObject>,
) -> Result<ModelArtifact> {
    let config = SasRecConfig::for_link(&plan.link, dataset.n_items());
    config
        .validate()
        .map_err(|e| Error::config(format!("distill link {:?}: {e}", plan.link.name)))?;
    let mut settings =
        TrainSettings::for_link(&job.spec.distill, &plan.link, plan.seed, &plan.name);
    settings.valid_users = job.spec.evaluation.valid_users;
    let loss = plan
        .distillation
        .as_ref()
        .map_or_else(|| "ce".to_string(), |(d, _)| d.mix.label());
    let (model, origin) = start_sasrec(warm, &plan.name, config, Vec::new(), plan.seed).await?;
    if let Some(warm) = warm.filter(|_| origin.is_some()) {
        warm.bound(&mut settings.epochs, &mut settings.patience);
    }
    let data = Arc::clone(dataset);
    let (device, threads) = (job.spec.device.clone(), job.spec.threads);
    let mut distillation = plan.distillation.clone();
    let (model, log): (SasRec, Vec<EpochLog>) = tokio::task::spawn_blocking(move || {
        let source = distillation
            .as_mut()
            .map(|(d, labels)| (Arc::clone(d), labels as &mut dyn LabelSource));
        train::fit_on_device(model, &data, &settings, &device, threads, source)
    })
    .await
    .map_err(|e| Error::internal(format!("{} training failed: {e}", plan.name)))??;
    if let Some(best) = train::best_epoch(&log) {
        tracing::info!(
            model = %plan.name,
            loss = %loss,
            epochs = log.len(),
            best_epoch = best.epoch,
            valid_ndcg_10 = best.valid_ndcg_10,
            "distilled model trained"
        );
    }
    let lineage = plan.distillation.as_ref().map(|(d, _)| Lineage {
        soft_labels: d.labels.location.clone(),
        model: d.labels.model.clone(),
        model_sha256: d.labels.model_sha256.clone(),
        alpha: d.mix.alpha,
        temperature: d.mix.temperature,
    });
    let mut card = model.card(&plan.name, plan.role, plan.training, &loss, lineage)?;
    card.warm_started_from = origin;
    let artifact = model.artifact(card)?;
    written.extend(write_trained(run, &artifact, Some(&log)).await?);
    Ok(artifact)
}
