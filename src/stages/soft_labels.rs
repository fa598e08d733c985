//! The soft-labels stage: streams the distillation source teacher's soft
//! labels — its top-K items and logits at the last positions of every
//! user, at the first link's temperature — to
//! `soft_labels/<teacher>.parquet`, where the distill stage reads them back.

use std::sync::Arc;

use super::StageOutput;
use crate::artifacts::soft_labels::{SoftLabelSettings, write_soft_labels};
use crate::config::Job;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::model::{ModelArtifact, sasrec};
use crate::run::RunFolder;

/// Emits the soft labels of `distill.source`, one of the teachers `models`.
pub async fn emit_source_labels(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    models: &[ModelArtifact],
) -> Result<StageOutput> {
    let spec = &job.spec.distill;
    let mut out = StageOutput::default();
    if !spec.enabled {
        return Ok(out);
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
    let settings = SoftLabelSettings::for_source(spec);
    let (written, _) = write_soft_labels(run, dataset, source, settings, job.spec.threads).await?;
    out.written.push(written);
    Ok(out)
}
