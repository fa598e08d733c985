//! Two stages of knowledge distillation.
//!
//! `soft-labels` streams the source teacher's soft labels to
//! `soft_labels/<teacher>.parquet`. `distill` walks the chain
//! `teacher → assistant(s) → student`: each link reads the previous link's
//! soft labels back from the lake (so the two stages can run on different
//! days or machines), trains on `α · hard + (1 − α) · soft`, and — when a
//! later link learns from it — emits its own soft labels. The student is
//! also trained from scratch, directly from the teacher, and via the
//! assistants, once per loss family: the ablation that shows what each
//! route is worth.

use std::sync::Arc;

use crate::baselines::write_trained;
use crate::commit::RunFolder;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::job::{DistillSpec, Job, LinkSpec};
use crate::lake::WrittenObject;
use crate::loss::{LossFamily, LossMix};
use crate::model::sasrec::{self, SasRec, SasRecConfig};
use crate::model::{Lineage, ModelArtifact};
use crate::soft_labels::{self, Expected, SoftLabelSettings, SoftLabels, soft_labels_path};
use crate::train::{self, Distillation, EpochLog, Softmax, TrainSettings};

/// Models trained by the chain and the files written for them.
#[derive(Debug, Clone, Default)]
pub struct Distilled {
    /// One artifact per model.
    pub models: Vec<ModelArtifact>,
    /// Files written (models, training histories, soft labels).
    pub written: Vec<WrittenObject>,
}

/// The temperature `link` (0-based, in [`DistillSpec::links`] order) reads
/// its soft labels at; the source's labels are read by link 0 and by the
/// students distilled directly from the teacher.
fn link_temperature(spec: &DistillSpec, link: usize) -> f32 {
    spec.temperature_of(spec.links()[link])
}

/// The settings the source teacher's soft labels are emitted with.
pub fn label_settings_for(spec: &DistillSpec) -> SoftLabelSettings {
    label_settings(spec, link_temperature(spec, 0))
}

fn label_settings(spec: &DistillSpec, temperature: f32) -> SoftLabelSettings {
    SoftLabelSettings {
        k: spec.k,
        temperature,
        positions: spec.positions,
    }
}

/// The soft-labels stage: streams the source teacher's soft labels (at the
/// first link's temperature) to the run folder.
pub async fn emit_source_labels(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    models: &[ModelArtifact],
) -> Result<Vec<WrittenObject>> {
    let spec = &job.spec.distill;
    if !spec.enabled {
        return Ok(Vec::new());
    }
    let source = models
        .iter()
        .find(|m| m.card.name == spec.source)
        .ok_or_else(|| {
            Error::config(format!(
                "distill.source {:?}: the teacher stage of this run trained no such model",
                spec.source
            ))
        })?;
    if source.card.kind != sasrec::KIND {
        return Err(Error::config(format!(
            "distill.source {:?} is a {} model; soft labels come from a SASRec teacher",
            spec.source, source.card.kind
        )));
    }
    let settings = label_settings_for(spec);
    let (written, _) =
        soft_labels::write_soft_labels(run, dataset, source, settings, job.spec.threads).await?;
    Ok(vec![written])
}

/// The source teacher's soft labels, read back from the run at the
/// temperature they were emitted with (the first link's).
pub async fn read_source_labels(
    spec: &DistillSpec,
    run: &RunFolder,
    dataset: &Dataset,
) -> Result<Arc<SoftLabels>> {
    let expected = Expected {
        k: spec.k,
        temperature: link_temperature(spec, 0),
    };
    let labels =
        soft_labels::read_soft_labels(run, &soft_labels_path(&spec.source), dataset, expected)
            .await?;
    Ok(Arc::new(labels))
}

/// The architecture of a chain link for a catalogue of `n_items`.
pub(crate) fn link_config(link: &LinkSpec, n_items: usize) -> SasRecConfig {
    SasRecConfig {
        n_items,
        d_model: link.d_model,
        layers: link.layers,
        heads: link.heads,
        ffn: link.ffn,
        max_len: link.max_len,
        dropout: link.dropout,
        content_dim: 0,
    }
}

pub(crate) fn link_settings(link: &LinkSpec, seed: u64, label: &str) -> TrainSettings {
    TrainSettings {
        batch_size: link.batch_size,
        lr: link.lr,
        beta1: link.beta1,
        beta2: link.beta2,
        weight_decay: link.weight_decay,
        epochs: link.epochs,
        patience: link.patience,
        softmax: Softmax::Full,
        negatives: 0,
        sampling: train::Sampling::Uniform,
        seed,
        label: label.to_string(),
    }
}

/// One model to train: its name, card fields and what it learns from.
struct Plan {
    name: String,
    link: LinkSpec,
    role: &'static str,
    training: &'static str,
    seed: u64,
    /// `None` for hard labels only.
    distillation: Option<Arc<Distillation>>,
}

/// The distill stage: for each seed, the assistants in chain order (each
/// emitting soft labels for the next link), then every student of the
/// ablation. With `distill.seeds`, model names end in `-s<seed>`.
pub async fn distill_chain(job: &Job, run: &RunFolder, dataset: Arc<Dataset>) -> Result<Distilled> {
    let spec = &job.spec.distill;
    let mut out = Distilled::default();
    if !spec.enabled {
        return Ok(out);
    }
    let families: Vec<LossFamily> = spec
        .losses
        .iter()
        .map(|f| f.parse())
        .collect::<Result<_>>()?;
    let read = |producer: String, temperature: f32| {
        let dataset = Arc::clone(&dataset);
        async move {
            let expected = Expected {
                k: spec.k,
                temperature,
            };
            let labels = soft_labels::read_soft_labels(
                run,
                &soft_labels_path(&producer),
                &dataset,
                expected,
            )
            .await?;
            Ok::<_, Error>(Arc::new(labels))
        }
    };
    let mix = |link: &LinkSpec, family: &LossFamily| LossMix {
        alpha: spec.alpha_of(link),
        temperature: spec.temperature_of(link),
        family: family.clone(),
        rank_decay: spec.rank_decay,
    };
    let teacher_labels = read_source_labels(spec, run, &dataset).await?;
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
        let mut labels = Arc::clone(&teacher_labels);
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
                distillation: Some(Arc::new(Distillation {
                    labels,
                    mix: mix(assistant, &family),
                })),
            };
            let artifact = train_link(job, run, &dataset, plan, &mut out.written).await?;
            let settings = label_settings(spec, link_temperature(spec, i + 1));
            let (written, _) = soft_labels::write_soft_labels(
                run,
                Arc::clone(&dataset),
                &artifact,
                settings,
                job.spec.threads,
            )
            .await?;
            out.written.push(written);
            labels = read(artifact.card.name.clone(), settings.temperature).await?;
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
            routes.push(("kd-teacher", Arc::clone(&teacher_labels)));
        }
        if !spec.assistants.is_empty() {
            routes.push(("kd-assistant", labels));
        }
        for (training, labels) in routes {
            // Distilled directly from the teacher, the student reads the
            // teacher's labels, made at the first link's temperature.
            let mut student_link = student.clone();
            student_link.temperature = Some(labels.temperature);
            for family in &families {
                plans.push(Plan {
                    name: format!(
                        "{}-{training}-{}{suffix}",
                        student.name,
                        family.to_string().replace('+', "-")
                    ),
                    link: student_link.clone(),
                    role: "student",
                    training,
                    seed,
                    distillation: Some(Arc::new(Distillation {
                        labels: Arc::clone(&labels),
                        mix: mix(&student_link, family),
                    })),
                });
            }
        }
        for plan in plans {
            let artifact = train_link(job, run, &dataset, plan, &mut out.written).await?;
            out.models.push(artifact);
        }
    }
    Ok(out)
}

/// Trains one planned model on the CPU trainer and writes its artifact and
/// training history.
async fn train_link(
    job: &Job,
    run: &RunFolder,
    dataset: &Arc<Dataset>,
    plan: Plan,
    written: &mut Vec<WrittenObject>,
) -> Result<ModelArtifact> {
    let config = link_config(&plan.link, dataset.n_items());
    config
        .validate()
        .map_err(|e| Error::config(format!("distill link {:?}: {e}", plan.link.name)))?;
    let settings = link_settings(&plan.link, plan.seed, &plan.name);
    let loss = plan
        .distillation
        .as_ref()
        .map_or_else(|| "ce".to_string(), |d| d.mix.label());
    let data = Arc::clone(dataset);
    let threads = job.spec.threads;
    let distillation = plan.distillation.clone();
    let seed = plan.seed;
    let (model, log): (SasRec, Vec<EpochLog>) = tokio::task::spawn_blocking(move || {
        let model = SasRec::new(config, Vec::new(), seed)?;
        crate::teacher::thread_pool(threads)?.install(|| match distillation {
            Some(d) => train::fit_distilled(model, &data, &settings, d),
            None => train::fit(model, &data, &settings),
        })
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
    let lineage = plan.distillation.as_ref().map(|d| Lineage {
        soft_labels: d.labels.location.clone(),
        model: d.labels.model.clone(),
        model_sha256: d.labels.model_sha256.clone(),
        alpha: d.mix.alpha,
        temperature: d.mix.temperature,
    });
    let artifact = model.to_artifact(&plan.name, plan.role, plan.training, &loss, lineage)?;
    written.extend(write_trained(run, &artifact, Some(&log)).await?);
    Ok(artifact)
}
