//! Recommendation lists, `recommendations/<model>.parquet`
//! (schemas/recommendations.json): one row per (user, rank), written by the
//! evaluate stage for every model and by `recdistill recommend`.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, Int32Array, RecordBatch, StringArray, UInt32Array};
use arrow::compute::take;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::model::score::Ranked;

/// Schema of `recommendations/<model>.parquet` (schemas/recommendations.json).
pub fn recommendations_schema(user_id: &DataType, item_id: &DataType) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", user_id.clone(), false),
        Field::new("rank", DataType::Int32, false),
        Field::new("item_id", item_id.clone(), false),
        Field::new("score", DataType::Float32, false),
        Field::new("model", DataType::Utf8, false),
    ]))
}

/// Long-format rows for a batch of ranked targets.
pub fn recommendation_batch(
    schema: &SchemaRef,
    dataset: &Dataset,
    model: &str,
    ranked: &[Ranked],
) -> Result<RecordBatch> {
    let rows: usize = ranked.iter().map(|r| r.top.len()).sum();
    let mut users = Vec::with_capacity(rows);
    let mut ranks = Vec::with_capacity(rows);
    let mut items = Vec::with_capacity(rows);
    let mut scores = Vec::with_capacity(rows);
    for r in ranked {
        for (position, &(item, score)) in r.top.iter().enumerate() {
            users.push(r.target.user);
            ranks.push(position as i32 + 1);
            items.push(item);
            scores.push(score);
        }
    }
    let user_ids = take(&dataset.user_ids, &UInt32Array::from(users), None)
        .map_err(|e| Error::internal(e.to_string()))?;
    let item_ids = take(&dataset.item_ids, &UInt32Array::from(items), None)
        .map_err(|e| Error::internal(e.to_string()))?;
    let columns: Vec<ArrayRef> = vec![
        user_ids,
        Arc::new(Int32Array::from(ranks)),
        item_ids,
        Arc::new(Float32Array::from(scores)),
        Arc::new(StringArray::from(vec![model; rows])),
    ];
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(|e| Error::internal(e.to_string()))
}
