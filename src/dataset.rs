//! The training set: every user's time-ordered events as compact arrays
//! (CSR by user, `u32` item indices), read once from the `split` feature
//! table as a sorted stream. Models train and are evaluated on this.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array};
use arrow::compute::{cast, concat};
use arrow::datatypes::{DataType, Int64Type, UInt32Type};
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::lake::engine::{collect_sql, plan_sql};

/// Which part of the data an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Learned from.
    Train,
    /// Early stopping.
    Valid,
    /// Reported.
    Test,
}

impl Split {
    /// Name used in the `split` table.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }

    fn parse(s: &str) -> Option<Split> {
        match s {
            "train" => Some(Split::Train),
            "valid" => Some(Split::Valid),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

/// One prediction to evaluate: user `user`'s event at `position` (of item
/// `item`), predicted from the events before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// User index.
    pub user: u32,
    /// Position of the target in the user's event sequence (≥ 1).
    pub position: usize,
    /// The item to predict.
    pub item: u32,
}

/// Every user's events, time-ordered.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Original user ids, by user index.
    pub user_ids: ArrayRef,
    /// Original item ids, by item index.
    pub item_ids: ArrayRef,
    /// `offsets[u]..offsets[u + 1]` are user `u`'s events.
    pub offsets: Vec<usize>,
    /// Item index of every event.
    pub items: Vec<u32>,
    /// Split of every event.
    pub splits: Vec<Split>,
    /// Train-split events per item.
    pub train_counts: Vec<u64>,
}

impl Dataset {
    /// A dataset whose users' events are `sequences` (item indices below
    /// `n_items`), all in the train split, with ids equal to indices: for
    /// benchmarks and tests.
    pub fn from_train_sequences(n_items: usize, sequences: &[Vec<u32>]) -> Dataset {
        let mut offsets = vec![0];
        let mut items = Vec::new();
        for sequence in sequences {
            items.extend_from_slice(sequence);
            offsets.push(items.len());
        }
        let mut train_counts = vec![0u64; n_items];
        for &i in &items {
            train_counts[i as usize] += 1;
        }
        Dataset {
            user_ids: Arc::new(arrow::array::Int64Array::from_iter_values(
                0..sequences.len() as i64,
            )),
            item_ids: Arc::new(arrow::array::Int64Array::from_iter_values(
                0..n_items as i64,
            )),
            splits: vec![Split::Train; items.len()],
            offsets,
            items,
            train_counts,
        }
    }

    /// Number of users.
    pub fn n_users(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Number of items (the catalogue every model ranks).
    pub fn n_items(&self) -> usize {
        self.item_ids.len()
    }

    /// User `u`'s items, time-ordered.
    pub fn user_items(&self, u: usize) -> &[u32] {
        &self.items[self.offsets[u]..self.offsets[u + 1]]
    }

    /// User `u`'s train-split items, time-ordered.
    pub fn train_items(&self, u: usize) -> Vec<u32> {
        let range = self.offsets[u]..self.offsets[u + 1];
        self.items[range.clone()]
            .iter()
            .zip(&self.splits[range])
            .filter(|(_, s)| **s == Split::Train)
            .map(|(i, _)| *i)
            .collect()
    }

    /// The first `split` event of every user that has one and at least one
    /// event before it, in user order.
    pub fn targets(&self, split: Split) -> Vec<Target> {
        (0..self.n_users())
            .filter_map(|u| {
                let start = self.offsets[u];
                let splits = &self.splits[start..self.offsets[u + 1]];
                let position = splits.iter().position(|s| *s == split)?;
                (position > 0).then(|| Target {
                    user: u as u32,
                    position,
                    item: self.items[start + position],
                })
            })
            .collect()
    }

    /// The items before `target`: what the model sees, and what is excluded
    /// from its ranking.
    pub fn history(&self, target: &Target) -> &[u32] {
        let start = self.offsets[target.user as usize];
        &self.items[start..start + target.position]
    }
}

/// Reads the dataset from the feature tables registered in `ctx`
/// (`split`, `user_map`, `item_map`, `item_popularity`).
pub async fn load_dataset(ctx: &SessionContext) -> Result<Dataset> {
    let user_ids = dense_ids(ctx, "user_map", "user_id", "user_index").await?;
    let item_ids = dense_ids(ctx, "item_map", "item_id", "item_index").await?;
    let n_users = user_ids.len();
    let n_items = item_ids.len();

    // Registered with its contract's order (features::register_run_table),
    // the split streams straight from the file: DataFusion drops this ORDER
    // BY, so no 11 M-row sort is held in memory. The order is trusted there
    // and checked here, row by row.
    let what = "reading the split table";
    let df = plan_sql(
        ctx,
        "SELECT user_index, item_index, split, \"timestamp\" FROM split ORDER BY user_index, \"timestamp\", item_index",
        &[],
        what,
    )
    .await?;
    let mut stream = df
        .execute_stream()
        .await
        .map_err(|e| Error::from_datafusion(what, e))?;
    let mut offsets = vec![0usize; n_users + 1];
    let mut items = Vec::new();
    let mut splits = Vec::new();
    let mut last: Option<(u32, i64, u32)> = None;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| Error::from_datafusion(what, e))?;
        let users = u32_column(&batch, 0, "split.user_index")?;
        let item_col = u32_column(&batch, 1, "split.item_index")?;
        let split_col =
            cast(batch.column(2), &DataType::Utf8).map_err(|e| Error::internal(e.to_string()))?;
        let split_col = split_col.as_string::<i32>();
        let time_col =
            cast(batch.column(3), &DataType::Int64).map_err(|e| Error::internal(e.to_string()))?;
        let time_col = time_col.as_primitive::<Int64Type>();
        for row in 0..batch.num_rows() {
            if users.is_null(row)
                || item_col.is_null(row)
                || split_col.is_null(row)
                || time_col.is_null(row)
            {
                return Err(Error::config(
                    "split table (sql/split_*.sql) has null user_index, item_index, split or timestamp",
                ));
            }
            let (u, i, s) = (users.value(row), item_col.value(row), split_col.value(row));
            if u as usize >= n_users || i as usize >= n_items {
                return Err(Error::config(format!(
                    "split table (sql/split_*.sql) has user_index {u} / item_index {i} outside user_map / item_map"
                )));
            }
            let key = (u, time_col.value(row), i);
            if last.is_some_and(|last| key < last) {
                return Err(Error::config(format!(
                    "split table (sql/split_*.sql) is not sorted by user_index, timestamp, item_index (schemas/split.json `order`): row with user_index {u}, item_index {i} comes after a later one; end the split SQL with ORDER BY user_index, \"timestamp\", item_index"
                )));
            }
            last = Some(key);
            let split = Split::parse(s).ok_or_else(|| {
                Error::config(format!(
                    "split table (sql/split_*.sql) has split {s:?}; expected train, valid or test"
                ))
            })?;
            offsets[u as usize + 1] += 1;
            items.push(i);
            splits.push(split);
        }
    }
    for u in 0..n_users {
        offsets[u + 1] += offsets[u];
    }

    let counts = collect_sql(
        ctx,
        "SELECT train_events FROM item_popularity ORDER BY item_index",
        &[],
        "reading item_popularity",
    )
    .await?;
    let mut train_counts = Vec::with_capacity(n_items);
    for batch in &counts {
        let col =
            cast(batch.column(0), &DataType::Int64).map_err(|e| Error::internal(e.to_string()))?;
        train_counts.extend(
            col.as_primitive::<Int64Type>()
                .iter()
                .map(|v| v.unwrap_or(0).max(0) as u64),
        );
    }
    if train_counts.len() != n_items {
        return Err(Error::config(format!(
            "item_popularity (sql/item_popularity.sql) has {} rows for {n_items} items",
            train_counts.len()
        )));
    }

    Ok(Dataset {
        user_ids,
        item_ids,
        offsets,
        items,
        splits,
        train_counts,
    })
}

/// Item content vectors by item index, from the `item_content` table.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemContent {
    /// Width of every vector.
    pub dim: usize,
    /// `n_items × dim`, row-major; items without a row are zero.
    pub values: Vec<f32>,
    /// Items of the catalogue that have a vector.
    pub covered: usize,
}

/// Widest content vector accepted.
const MAX_CONTENT_DIM: usize = 65_536;

/// Reads the content table `table` registered in `ctx` (`item_content`, or
/// `item_text_embeddings`; named `location` in messages) into vectors by `item_map` index. Every vector must have the
/// same length, no nulls, finite values, one row per item; ids that are not
/// in the catalogue are ignored.
pub async fn load_item_content(
    ctx: &SessionContext,
    n_items: usize,
    table: &str,
    location: &str,
) -> Result<ItemContent> {
    use arrow::datatypes::{Field, Float32Type};
    let what = format!("reading item content {location}");
    let df = plan_sql(
        ctx,
        &format!(
            "SELECT m.item_index, c.item_id, c.embedding \
             FROM {table} c JOIN item_map m ON c.item_id = m.item_id"
        ),
        &[],
        &what,
    )
    .await?;
    let mut stream = df
        .execute_stream()
        .await
        .map_err(|e| Error::from_datafusion(&what, e))?;
    let list_type = DataType::List(Arc::new(Field::new_list_field(DataType::Float32, true)));
    let mut dim: Option<usize> = None;
    let mut values: Vec<f32> = Vec::new();
    let mut seen = vec![false; n_items];
    let mut covered = 0;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| Error::from_datafusion(&what, e))?;
        let indices = u32_column(&batch, 0, "item_map.item_index")?;
        let ids =
            cast(batch.column(1), &DataType::Utf8).map_err(|e| Error::internal(e.to_string()))?;
        let ids = ids.as_string::<i32>();
        let vectors = cast(batch.column(2), &list_type).map_err(|e| {
            Error::data(
                location,
                format!("column `embedding` must be a list of float32: {e}"),
            )
        })?;
        let vectors = vectors.as_list::<i32>();
        for row in 0..batch.num_rows() {
            let id = ids.value(row);
            if vectors.is_null(row) {
                return Err(Error::data(
                    location,
                    format!("column `embedding` is null for item_id {id}"),
                ));
            }
            let vector = vectors.value(row);
            let vector = vector.as_primitive::<Float32Type>();
            let width = *dim.get_or_insert(vector.len());
            if width == 0 || width > MAX_CONTENT_DIM {
                return Err(Error::data(
                    location,
                    format!(
                        "column `embedding` has length {width} for item_id {id}; it must be 1 to {MAX_CONTENT_DIM}"
                    ),
                ));
            }
            if vector.len() != width {
                return Err(Error::data(
                    location,
                    format!(
                        "column `embedding` has length {} for item_id {id} but {width} for an earlier item; every vector must have the same length",
                        vector.len()
                    ),
                ));
            }
            if vector.null_count() > 0 || vector.values().iter().any(|v| !v.is_finite()) {
                return Err(Error::data(
                    location,
                    format!("column `embedding` of item_id {id} has a null, NaN or infinite value"),
                ));
            }
            if values.is_empty() {
                values = vec![0.0; n_items * width];
            }
            let index = indices.value(row) as usize;
            if index >= n_items {
                return Err(Error::internal(format!(
                    "item_map index {index} outside {n_items} items"
                )));
            }
            if std::mem::replace(&mut seen[index], true) {
                return Err(Error::data(
                    location,
                    format!("item_id {id} has more than one row"),
                ));
            }
            covered += 1;
            values[index * width..(index + 1) * width].copy_from_slice(vector.values());
        }
    }
    let dim = dim.ok_or_else(|| {
        Error::data(
            location,
            "no row matches an item of the catalogue (item_map)",
        )
    })?;
    Ok(ItemContent {
        dim,
        values,
        covered,
    })
}

/// The original ids of a dense map table, by index; checks the index is 0..n.
async fn dense_ids(ctx: &SessionContext, table: &str, id: &str, index: &str) -> Result<ArrayRef> {
    let what = format!("reading {table}");
    let batches = collect_sql(
        ctx,
        &format!("SELECT {id}, {index} FROM {table} ORDER BY {index}"),
        &[],
        &what,
    )
    .await?;
    let mut expected = 0u32;
    for batch in &batches {
        let indices = u32_column(batch, 1, &format!("{table}.{index}"))?;
        for v in indices.iter() {
            if v != Some(expected) {
                return Err(Error::config(format!(
                    "{table} (sql/{table}.sql) must number rows 0, 1, 2, ... in {index}; found {v:?} where {expected} was due"
                )));
            }
            expected += 1;
        }
    }
    let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(0).as_ref()).collect();
    if arrays.is_empty() {
        return Err(Error::config(format!("{table} is empty")));
    }
    let ids = concat(&arrays).map_err(|e| Error::internal(e.to_string()))?;
    if ids.null_count() > 0 {
        return Err(Error::config(format!("{table}.{id} has nulls")));
    }
    Ok(Arc::clone(&ids))
}

fn u32_column(batch: &RecordBatch, i: usize, name: &str) -> Result<UInt32Array> {
    let col = cast(batch.column(i), &DataType::UInt32)
        .map_err(|e| Error::config(format!("{name} is not a non-negative integer column: {e}")))?;
    Ok(col.as_primitive::<UInt32Type>().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;

    fn tiny() -> Dataset {
        use Split::*;
        Dataset {
            user_ids: Arc::new(Int64Array::from(vec![10, 20, 30])),
            item_ids: Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
            offsets: vec![0, 4, 6, 9],
            items: vec![0, 1, 2, 3, 1, 2, 3, 0, 2],
            splits: vec![Train, Train, Valid, Test, Train, Train, Train, Train, Test],
            train_counts: vec![1, 2, 1, 1],
        }
    }

    #[test]
    fn targets_and_histories() {
        let d = tiny();
        assert_eq!(d.n_users(), 3);
        let test = d.targets(Split::Test);
        assert_eq!(
            test,
            vec![
                Target {
                    user: 0,
                    position: 3,
                    item: 3
                },
                Target {
                    user: 2,
                    position: 2,
                    item: 2
                }
            ]
        );
        assert_eq!(d.history(&test[0]), &[0, 1, 2]);
        assert_eq!(d.history(&test[1]), &[3, 0]);
        assert_eq!(d.targets(Split::Valid).len(), 1);
        assert_eq!(d.train_items(0), vec![0, 1]);
        assert_eq!(d.train_items(1), vec![1, 2]);
    }
}
