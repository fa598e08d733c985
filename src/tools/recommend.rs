//! `recdistill recommend` and `recdistill inspect`: a saved model — as
//! trained or compressed — put to use outside a run, through the same
//! scoring engine the evaluation uses.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use arrow::array::Array;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use bytes::Bytes;
use safetensors::SafeTensors;

use crate::artifacts::recommendations::{recommendation_batch, recommendations_schema};
use crate::dataset::{Dataset, Target};
use crate::error::{Error, Result};
use crate::model::ModelArtifact;
use crate::model::sasrec::infer::COMPRESSION_KEY;
use crate::model::score::rank_targets;

/// Reads and checks a model artifact from a local file (exit 3 when it is
/// not a valid artifact).
pub fn read_artifact(path: &Path) -> Result<ModelArtifact> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::config(format!("cannot read model {}: {e}", path.display())))?;
    ModelArtifact::parse(&path.display().to_string(), Bytes::from(bytes))
}

/// The users to recommend for: every user, or the ids listed in `file`
/// (one per line; blank lines and `#` comments skipped). An id the run
/// does not know is refused with the file and line.
pub fn select_users(dataset: &Dataset, file: Option<&Path>) -> Result<Vec<u32>> {
    let Some(file) = file else {
        return Ok((0..dataset.n_users() as u32).collect());
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::config(format!("cannot read --users {}: {e}", file.display())))?;
    let formatter = ArrayFormatter::try_new(dataset.user_ids.as_ref(), &FormatOptions::default())
        .map_err(|e| Error::internal(e.to_string()))?;
    let index: std::collections::HashMap<String, u32> = (0..dataset.user_ids.len())
        .map(|u| (formatter.value(u).to_string(), u as u32))
        .collect();
    let mut users = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let id = line.split('#').next().unwrap_or("").trim();
        if id.is_empty() {
            continue;
        }
        let u = index.get(id).ok_or_else(|| {
            Error::data(
                file.display(),
                format!("line {}: user {id:?} is not in this run's user_map", n + 1),
            )
        })?;
        users.push(*u);
    }
    Ok(users)
}

/// Scores `users` with `artifact` on their whole history and writes their
/// top `k` unseen items to `out` (the evaluation's recommendations format)
/// through a temporary file renamed into place. Returns the rows written.
pub fn recommend(
    artifact: &ModelArtifact,
    dataset: &Dataset,
    users: &[u32],
    k: usize,
    batch: usize,
    out: &Path,
) -> Result<usize> {
    let scorer = artifact.scorer(dataset.n_items())?;
    let schema = recommendations_schema(dataset.user_ids.data_type(), dataset.item_ids.data_type());
    let tmp = out.with_extension("parquet.partial");
    let file = std::fs::File::create(&tmp)
        .map_err(|e| Error::config(format!("cannot create {}: {e}", tmp.display())))?;
    // The same Parquet settings as the lake's files.
    let props = crate::lake::writer_properties(Vec::new());
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, Arc::clone(&schema), Some(props))
        .map_err(|e| Error::internal(e.to_string()))?;
    let result = (|| -> Result<usize> {
        // Each user's target is past their history and outside the
        // catalogue: nothing is excluded but the history, no rank is kept.
        let targets: Vec<Target> = users
            .iter()
            .map(|&user| Target {
                user,
                position: dataset.user_items(user as usize).len(),
                item: u32::MAX,
            })
            .collect();
        let mut rows = 0;
        rank_targets(scorer.as_ref(), dataset, &targets, batch, k, |ranked| {
            let batch = recommendation_batch(&schema, dataset, &artifact.card.name, ranked)?;
            rows += batch.num_rows();
            writer
                .write(&batch)
                .map_err(|e| Error::internal(e.to_string()))
        })?;
        writer.close().map_err(|e| Error::internal(e.to_string()))?;
        Ok(rows)
    })();
    match result {
        Ok(rows) => {
            std::fs::rename(&tmp, out)
                .map_err(|e| Error::config(format!("cannot write {}: {e}", out.display())))?;
            Ok(rows)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// What `inspect` prints: the card, how the model was compressed, and
/// every matrix's scheme, shape and bytes.
pub fn inspect(artifact: &ModelArtifact) -> Result<String> {
    let c = &artifact.card;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: {} {} ({}, loss {}), variant {}, {} items, {} parameters, {} bytes",
        c.name,
        c.role,
        c.kind,
        c.training,
        c.loss.as_deref().unwrap_or("-"),
        c.variant,
        c.n_items,
        artifact.params,
        artifact.bytes.len()
    );
    let _ = writeln!(s, "config: {}", c.config);
    if let Some(d) = &c.distilled_from {
        let _ = writeln!(
            s,
            "distilled from {} ({}), α {}, T {}",
            d.model, d.soft_labels, d.alpha, d.temperature
        );
    }
    let (_, metadata) = SafeTensors::read_metadata(&artifact.bytes)
        .map_err(|e| Error::data(&artifact.location, e))?;
    if let Some(info) = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(COMPRESSION_KEY))
    {
        let _ = writeln!(s, "compression: {info}");
    }
    let _ = writeln!(
        s,
        "{:<22} {:<34} {:>14} {:>10}",
        "tensor", "scheme", "shape", "bytes"
    );
    let mut data_bytes = 0u64;
    if artifact.card.kind == crate::model::sasrec::KIND && artifact.is_stored() {
        let model = artifact.stored_sasrec()?;
        for (name, m) in model.matrices() {
            let bytes = m.stored_bytes();
            data_bytes += bytes;
            let _ = writeln!(
                s,
                "{:<22} {:<34} {:>14} {:>10}",
                name,
                m.layout().scheme(),
                format!("{}×{}", m.rows(), m.cols()),
                bytes
            );
        }
        for (name, v) in model.vectors() {
            data_bytes += 4 * v.len() as u64;
            let _ = writeln!(
                s,
                "{:<22} {:<34} {:>14} {:>10}",
                name,
                "f32",
                v.len(),
                4 * v.len()
            );
        }
    } else {
        let tensors = SafeTensors::deserialize(&artifact.bytes)
            .map_err(|e| Error::data(&artifact.location, e))?;
        let mut list = tensors.tensors();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in list {
            data_bytes += view.data().len() as u64;
            let shape: Vec<String> = view.shape().iter().map(|d| d.to_string()).collect();
            let _ = writeln!(
                s,
                "{:<22} {:<34} {:>14} {:>10}",
                name,
                format!("{:?}", view.dtype()).to_lowercase(),
                shape.join("×"),
                view.data().len()
            );
        }
    }
    let _ = writeln!(
        s,
        "tensor data {data_bytes} bytes, header and metadata {} bytes",
        artifact.bytes.len() as u64 - data_bytes.min(artifact.bytes.len() as u64)
    );
    Ok(s)
}
