//! Warm start from the lake: the earlier committed run whose models this
//! run's learned models begin from, its catalogue matched to this run's by
//! item id, and its model files checked against its manifest.
//!
//! Nothing here fails a run over the earlier run's data: a missing,
//! damaged or unreadable earlier file, or a model whose shape no longer
//! fits, means a cold start for what it concerns, with a warning that says
//! why. Storage trouble (exit 4) still stops the run, as anywhere else.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::{cast, concat};
use arrow::datatypes::{DataType, UInt32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::models::{model_path, read_model};
use crate::config::{Job, WarmStartSpec};
use crate::error::{Error, Result};
use crate::model::ModelArtifact;
use crate::model::meanpool::MeanPool;
use crate::model::sasrec::{SasRec, SasRecConfig};
use crate::model::warm::{ItemsCarried, WarmOrigin, carry_items};
use crate::run::RunFolder;
use crate::run::commit::{self, Manifest, read_listed};

/// The item map a run lists (`features/item_map.parquet`).
const ITEM_MAP: &str = "features/item_map.parquet";

/// The earlier committed run this run's learned models start from.
pub struct WarmSource {
    run: RunFolder,
    manifest: Manifest,
    spec: WarmStartSpec,
    /// For each of this run's items (by index), its row in the earlier
    /// run's models.
    pub rows: Vec<Option<usize>>,
    /// How the catalogue changed between the two runs.
    pub items: ItemsCarried,
}

impl WarmSource {
    /// The run `warm_start.from` names for `run` (the latest committed run
    /// of the job before its date, or the run of the date given), with its
    /// catalogue matched to `item_ids` (this run's, by item index). `None`
    /// when warm start is off, when there is no such run, or when its item
    /// map cannot be used (a warning says why): every model starts cold.
    pub async fn find(job: &Job, run: &RunFolder, item_ids: &ArrayRef) -> Result<Option<Self>> {
        let spec = &job.spec.warm_start;
        if !spec.enabled {
            return Ok(None);
        }
        // A date at or after the run's is refused when the run starts
        // (`RunContext::new`); here it simply matches no earlier run.
        let wanted = spec.from_date().map_err(Error::config)?;
        // The newest committed run before the run date, or before the day
        // after the date named (which must then be that date).
        let before = wanted
            .and_then(|date| date.succ_opt())
            .map_or(run.run_date(), |after| after.min(run.run_date()));
        let prefix = &job.spec.lake.output_prefix;
        let earlier = commit::committed_runs_before(run.lake(), prefix, run.job(), before, 1)
            .await?
            .pop()
            .filter(|(r, _)| wanted.is_none_or(|date| r.run_date() == date));
        let Some((earlier, manifest)) = earlier else {
            tracing::warn!(
                from = %spec.from,
                run_date = %run.run_date(),
                "warm start: no committed run to start from; every model starts cold"
            );
            return Ok(None);
        };
        let old_ids = match item_map(&earlier, &manifest).await {
            Ok(ids) => ids,
            Err(err @ Error::Data { .. }) => {
                tracing::warn!(run = %earlier.display(), %err, "warm start: the earlier run's item map is unusable; every model starts cold");
                return Ok(None);
            }
            Err(err) => return Err(err),
        };
        let (rows, items) = match carry_items(&old_ids, item_ids) {
            Ok(carried) => carried,
            Err(err) => {
                tracing::warn!(run = %earlier.display(), %err, "warm start: the catalogues cannot be matched; every model starts cold");
                return Ok(None);
            }
        };
        tracing::info!(
            from = %earlier.display(),
            kept = items.kept,
            added = items.added,
            dropped = items.dropped,
            "warm start: models begin from an earlier run"
        );
        Ok(Some(WarmSource {
            run: earlier,
            manifest,
            spec: spec.clone(),
            rows,
            items,
        }))
    }

    /// Bounds a warm-started model's fine-tune: `warm_start.epochs` and
    /// `warm_start.patience` where they are set (not 0).
    pub fn bound(&self, epochs: &mut usize, patience: &mut usize) {
        if self.spec.epochs > 0 {
            *epochs = self.spec.epochs;
        }
        if self.spec.patience > 0 {
            *patience = self.spec.patience;
        }
    }

    /// The earlier run's model `name`, read and checked against the size
    /// and SHA-256 its manifest lists and made into a model by `load`, with
    /// the card entry of a model that starts from it. `None` (with a
    /// warning, or a note where the earlier run simply has no such model)
    /// when it cannot be used.
    async fn model<T>(
        &self,
        name: &str,
        load: fn(&ModelArtifact) -> Result<T>,
    ) -> Result<Option<(T, WarmOrigin)>> {
        let Some(listed) = self.manifest.listed(&model_path(name)) else {
            tracing::info!(model = name, run = %self.run.display(), "warm start: the earlier run has no such model; it starts cold");
            return Ok(None);
        };
        let read = read_model(
            &self.run,
            listed,
            name,
            "its run's manifest lists",
            "this model starts cold",
        )
        .await;
        match read.and_then(|artifact| load(&artifact)) {
            Ok(model) => {
                let origin = WarmOrigin {
                    run_id: self.manifest.run_id.clone(),
                    run_date: self.run.run_date().to_string(),
                    model: name.to_string(),
                    sha256: listed.sha256.clone(),
                    items: self.items,
                };
                Ok(Some((model, origin)))
            }
            Err(err @ Error::Data { .. }) => {
                tracing::warn!(model = name, %err, "warm start: the earlier model is damaged or unreadable; it starts cold");
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// The earlier run's mean-pool model `name`, or `None` as [`Self::model`].
    pub async fn meanpool(&self, name: &str) -> Result<Option<(MeanPool, WarmOrigin)>> {
        self.model(name, MeanPool::from_artifact).await
    }
}

/// A SASRec model `name` of `config` to train: started from the earlier
/// run's model of that name where `warm` has a usable one of the same
/// shape (with where it came from), otherwise fresh from `seed`. A changed
/// shape names the setting in a warning and starts cold.
pub async fn start_sasrec(
    warm: Option<&WarmSource>,
    name: &str,
    config: SasRecConfig,
    content: Vec<f32>,
    seed: u64,
) -> Result<(SasRec, Option<WarmOrigin>)> {
    let previous = match warm {
        Some(warm) => warm
            .model(name, SasRec::from_artifact)
            .await?
            .map(|p| (warm, p)),
        None => None,
    };
    let Some((warm, (previous, origin))) = previous else {
        return Ok((SasRec::new(config, content, seed)?, None));
    };
    match SasRec::warm_started(config, content.clone(), seed, &previous, &warm.rows)? {
        Ok(model) => Ok((model, Some(origin))),
        Err(key) => {
            tracing::warn!(
                model = name,
                key,
                from = %origin.run_date,
                "warm start: this setting changed the model's shape since the earlier run; it starts cold"
            );
            Ok((SasRec::new(config, content, seed)?, None))
        }
    }
}

/// The item ids of `run`'s catalogue, by item index, from its item map
/// checked against its manifest.
async fn item_map(run: &RunFolder, manifest: &Manifest) -> Result<ArrayRef> {
    let url = run.url_of(ITEM_MAP);
    let bytes = read_listed(run, manifest, ITEM_MAP).await?;
    let bad = |e: &dyn std::fmt::Display| Error::data(&url, format!("unreadable: {e}"));
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| bad(&e))?;
    let mut ids = Vec::new();
    let mut expected = 0u32;
    for batch in reader {
        let batch = batch.map_err(|e| bad(&e))?;
        let (Some(id), Some(index)) = (
            batch.column_by_name("item_id"),
            batch.column_by_name("item_index"),
        ) else {
            return Err(Error::data(&url, "needs columns item_id and item_index"));
        };
        let index = cast(index, &DataType::UInt32).map_err(|e| bad(&e))?;
        for v in index.as_primitive::<UInt32Type>().iter() {
            if v != Some(expected) {
                return Err(Error::data(
                    &url,
                    format!("column item_index must number rows 0, 1, 2, ...; found {v:?}"),
                ));
            }
            expected += 1;
        }
        ids.push(std::sync::Arc::clone(id));
    }
    let arrays: Vec<&dyn Array> = ids.iter().map(|a| a.as_ref()).collect();
    if arrays.is_empty() {
        return Err(Error::data(&url, "the item map is empty"));
    }
    concat(&arrays).map_err(|e| bad(&e))
}
