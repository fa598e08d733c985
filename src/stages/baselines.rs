//! The baselines stage: `popularity`, the neighbour tables `transitions`
//! and `cooccurrence` (built by the features stage's SQL, read back and
//! checked against the run's item map), and the learned `meanpool` model,
//! each saved as `models/<name>/model.safetensors`, with the learned
//! model's per-epoch history in `training/<name>.parquet`. With
//! `warm_start`, `meanpool` starts from the earlier run's.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Float64Type, UInt32Type};
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use super::StageOutput;
use crate::artifacts::models::write_trained;
use crate::artifacts::warm::WarmSource;
use crate::config::Job;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::lake::engine::plan_sql;
use crate::model::neighbors::{Neighbors, NeighborsConfig};
use crate::model::popularity::Popularity;
use crate::run::RunFolder;
use crate::train;

/// Model name of the learned baseline.
pub const MEANPOOL: &str = "meanpool";

/// The weight of `cooccurrence`'s popularity prior: far below any
/// similarity, so it only orders the items no neighbour row reaches.
const COOCCURRENCE_BACKOFF: f32 = 1e-6;

/// Trains the enabled baselines and writes their artifacts. `ctx` has the
/// feature tables registered, the neighbour tables among them.
pub async fn train_baselines(
    job: &Job,
    run: &RunFolder,
    ctx: &SessionContext,
    dataset: Arc<Dataset>,
    warm: Option<&WarmSource>,
) -> Result<StageOutput> {
    let mut out = StageOutput::default();
    let spec = &job.spec.models;
    if spec.popularity.enabled {
        let artifact = Popularity::fit(&dataset).to_artifact("popularity")?;
        out.written
            .extend(write_trained(run, &artifact, None).await?);
        out.models.push(artifact);
    }
    let neighbor_models = [
        (
            spec.transitions.enabled,
            "transitions",
            NeighborsConfig {
                history: 1,
                decay: 1.0,
                backoff: spec.transitions.backoff as f32,
            },
        ),
        (
            spec.cooccurrence.enabled,
            "cooccurrence",
            NeighborsConfig {
                history: spec.cooccurrence.history,
                decay: spec.cooccurrence.decay as f32,
                backoff: COOCCURRENCE_BACKOFF,
            },
        ),
    ];
    for (enabled, name, config) in neighbor_models {
        if !enabled {
            continue;
        }
        let rel = format!("features/{name}.parquet");
        let table = read_neighbor_table(ctx, name, &run.url_of(&rel), &dataset).await?;
        let model = Neighbors::new(config, popularity_prior(&dataset), &table)?;
        tracing::info!(model = name, rows = model.len(), "neighbour table loaded");
        let artifact = model.to_artifact(name)?;
        out.written
            .extend(write_trained(run, &artifact, None).await?);
        out.models.push(artifact);
    }
    if spec.meanpool.enabled {
        let (mut meanpool_spec, seed) = (spec.meanpool.clone(), job.spec.seed);
        let mut previous = match warm {
            Some(warm) => warm.meanpool(MEANPOOL).await?.map(|p| (warm, p)),
            None => None,
        };
        if let Some((_, (model, origin))) = &previous
            && let Some(key) = train::meanpool::warm_start_blocker(model, &meanpool_spec)
        {
            tracing::warn!(
                model = MEANPOOL,
                key,
                from = %origin.run_date,
                "warm start: this setting changed the model's shape since the earlier run; it starts cold"
            );
            previous = None;
        }
        let mut origin = None;
        let mut warm_model = None;
        if let Some((warm, (model, from))) = previous {
            warm.bound(&mut meanpool_spec.epochs, &mut meanpool_spec.patience);
            warm_model = Some((model, warm.rows.clone()));
            origin = Some(from);
        }
        let valid_users = job.spec.evaluation.valid_users;
        let data = Arc::clone(&dataset);
        let (model, log) = tokio::task::spawn_blocking(move || {
            let warm = warm_model.as_ref().map(|(m, rows)| (m, rows.as_slice()));
            train::meanpool::fit(&data, &meanpool_spec, seed, valid_users, warm)
        })
        .await
        .map_err(|e| Error::internal(format!("meanpool training failed: {e}")))??;
        let mut card = model.card(MEANPOOL)?;
        card.warm_started_from = origin;
        let artifact = model.artifact(card)?;
        out.written
            .extend(write_trained(run, &artifact, Some(&log)).await?);
        out.models.push(artifact);
    }
    Ok(out)
}

/// Each item's share of the train events (all zero when there are none).
fn popularity_prior(dataset: &Dataset) -> Vec<f32> {
    let total = dataset.train_counts.iter().sum::<u64>().max(1) as f64;
    dataset
        .train_counts
        .iter()
        .map(|&c| (c as f64 / total) as f32)
        .collect()
}

/// The rows (item, neighbour, score) of the neighbour table `table`
/// (registered in `ctx`, read from `location`), sorted by item. Every row
/// must agree with the run's item map: indices inside the catalogue, each
/// index's id the one the item map gives it, a finite score. Anything else
/// is refused (exit 3) naming the file, the column and the first bad row:
/// the table was built from another run's items, or edited SQL broke it.
async fn read_neighbor_table(
    ctx: &SessionContext,
    table: &str,
    location: &str,
    dataset: &Dataset,
) -> Result<Vec<(u32, u32, f32)>> {
    let what = format!("reading the neighbour table {location}");
    let sql =
        format!("SELECT item_index, item_id, neighbor_index, neighbor_id, score FROM {table}");
    let mut stream = plan_sql(ctx, &sql, &[], &what)
        .await?
        .execute_stream()
        .await
        .map_err(|e| Error::from_datafusion(&what, e))?;
    let mut rows = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| Error::from_datafusion(&what, e))?;
        check_against_item_map(&batch, location, dataset)?;
        let column = |i: usize, to: &DataType| {
            cast(batch.column(i), to).map_err(|e| Error::data(location, e))
        };
        let items = column(0, &DataType::UInt32)?;
        let neighbors = column(2, &DataType::UInt32)?;
        let scores = column(4, &DataType::Float64)?;
        let (items, neighbors, scores) = (
            items.as_primitive::<UInt32Type>(),
            neighbors.as_primitive::<UInt32Type>(),
            scores.as_primitive::<Float64Type>(),
        );
        for r in 0..batch.num_rows() {
            let score = scores.value(r);
            if scores.is_null(r) || !score.is_finite() {
                return Err(Error::data(
                    location,
                    format!(
                        "column score: row {r} of a batch (item_index {}) is not a finite number",
                        items.value(r)
                    ),
                ));
            }
            rows.push((items.value(r), neighbors.value(r), score as f32));
        }
    }
    rows.sort_by_key(|&(item, _, _)| item);
    Ok(rows)
}

/// Refuses (exit 3, naming `location`) a batch of a neighbour table whose
/// `item_index`/`item_id` or `neighbor_index`/`neighbor_id` pairs are not
/// the run's item map: an index past the catalogue, a null, or an id that
/// is not the one the item map gives that index.
fn check_against_item_map(batch: &RecordBatch, location: &str, dataset: &Dataset) -> Result<()> {
    let n = dataset.n_items();
    for (index_col, id_col) in [(0, 1), (2, 3)] {
        let (index_name, id_name) = (
            batch.schema().field(index_col).name().clone(),
            batch.schema().field(id_col).name().clone(),
        );
        let indices = cast(batch.column(index_col), &DataType::UInt32)
            .map_err(|e| Error::data(location, format!("column {index_name}: {e}")))?;
        let indices = indices.as_primitive::<UInt32Type>();
        if let Some(r) =
            (0..indices.len()).find(|&r| indices.is_null(r) || indices.value(r) as usize >= n)
        {
            return Err(Error::data(
                location,
                format!(
                    "column {index_name}: row {r} of a batch holds {}, not an item index of this run's item_map ({n} items); rerun the features stage",
                    if indices.is_null(r) {
                        "null".to_string()
                    } else {
                        indices.value(r).to_string()
                    }
                ),
            ));
        }
        let mapped =
            take(&dataset.item_ids, indices, None).map_err(|e| Error::internal(e.to_string()))?;
        let ids = cast(batch.column(id_col), mapped.data_type()).map_err(|e| {
            Error::data(
                location,
                format!("column {id_name} is not of the item_map's id type: {e}"),
            )
        })?;
        let same = arrow::compute::kernels::cmp::eq(&mapped, &ids)
            .map_err(|e| Error::internal(e.to_string()))?;
        if let Some(r) = (0..same.len()).find(|&r| !same.is_valid(r) || !same.value(r)) {
            let text = |a: &dyn Array| {
                arrow::util::display::array_value_to_string(a, r).unwrap_or_default()
            };
            return Err(Error::data(
                location,
                format!(
                    "column {id_name}: row {r} of a batch says {index_name} {} is item {}, but this run's item_map has {} there: the table was not built from this run's items; rerun the features stage",
                    indices.value(r),
                    text(ids.as_ref()),
                    text(mapped.as_ref())
                ),
            ));
        }
    }
    Ok(())
}
