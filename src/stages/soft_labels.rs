//! The soft-labels stage: streams the distillation source teacher's soft
//! labels — its top-K items and logits at the last positions of every
//! user, at the first link's temperature — to
//! `soft_labels/<teacher>.parquet`, where the distill stage reads them back.

use std::sync::Arc;

use super::StageOutput;
use crate::artifacts::soft_labels::{
    SoftLabelSettings, gather_soft_labels, soft_labels_path, write_soft_label_part,
};
use crate::config::Job;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::lake::WrittenObject;
use crate::model::{ModelArtifact, sasrec};
use crate::run::RunFolder;
use crate::run::shard::Shard;

/// Emits the soft labels of `distill.source`, one of the teachers `models`:
/// of every user, or with `part` = (shard, folder) of the shard's users
/// into that folder (see [`crate::run::shard`]).
pub async fn emit_source_labels(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    models: &[ModelArtifact],
    part: Option<(Shard, &str)>,
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
    let rel = soft_labels_path(&source.card.name);
    let (shard, rel) = match part {
        Some((shard, folder)) => (Some(shard), format!("{folder}/{rel}")),
        None => (None, rel),
    };
    let (written, _) = write_soft_label_part(
        run,
        dataset,
        source,
        settings,
        job.spec.threads,
        shard,
        &rel,
    )
    .await?;
    out.written.push(written);
    Ok(out)
}

/// Joins the shards' parts, given as (file, its parts in shard order; see
/// [`crate::run::shard::joined_files`]), into the files the unsharded stage
/// writes.
pub async fn gather_source_labels(
    run: &RunFolder,
    files: &[(String, Vec<String>)],
) -> Result<Vec<WrittenObject>> {
    let mut written = Vec::with_capacity(files.len());
    for (rel, sources) in files {
        written.push(gather_soft_labels(run, sources, rel).await?);
    }
    Ok(written)
}
