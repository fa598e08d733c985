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

/// Joins the shards' parts, given in shard order as (folder, files written
/// there), into the files the unsharded stage writes.
pub async fn gather_source_labels(
    run: &RunFolder,
    parts: &[(String, Vec<WrittenObject>)],
) -> Result<Vec<WrittenObject>> {
    let Some((first_folder, first)) = parts.first() else {
        return Ok(Vec::new());
    };
    let mut written = Vec::with_capacity(first.len());
    for object in first {
        let rel = object
            .path
            .strip_prefix(&format!("{first_folder}/"))
            .ok_or_else(|| Error::internal(format!("part file {} is misplaced", object.path)))?;
        let mut sources = Vec::with_capacity(parts.len());
        for (folder, files) in parts {
            let path = format!("{folder}/{rel}");
            if !files.iter().any(|f| f.path == path) {
                return Err(Error::data(
                    run.url_of(folder),
                    format!(
                        "this part has no {rel}, which the first part wrote: the parts come from different runs; rerun every shard"
                    ),
                ));
            }
            sources.push(path);
        }
        written.push(gather_soft_labels(run, &sources, rel).await?);
    }
    Ok(written)
}
