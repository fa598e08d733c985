//! The training history: one row per epoch of every learned model, written
//! as `training/<model>.parquet` (schemas/training.json).

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::stopping::EpochLog;
use crate::error::{Error, Result};

/// Schema of `training/<model>.parquet`.
pub fn training_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("model", DataType::Utf8, false),
        Field::new("epoch", DataType::Int32, false),
        Field::new("seconds", DataType::Float64, false),
        Field::new("loss", DataType::Float64, false),
        Field::new("valid_ndcg_10", DataType::Float64, false),
        Field::new("valid_hr_10", DataType::Float64, false),
    ]))
}

/// The history of one model as a batch of [`training_schema`].
pub fn training_batch(model: &str, log: &[EpochLog]) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![model; log.len()])),
        Arc::new(Int32Array::from_iter_values(
            log.iter().map(|e| e.epoch as i32),
        )),
        Arc::new(Float64Array::from_iter_values(
            log.iter().map(|e| e.seconds),
        )),
        Arc::new(Float64Array::from_iter_values(log.iter().map(|e| e.loss))),
        Arc::new(Float64Array::from_iter_values(
            log.iter().map(|e| e.valid_ndcg_10),
        )),
        Arc::new(Float64Array::from_iter_values(
            log.iter().map(|e| e.valid_hr_10),
        )),
    ];
    RecordBatch::try_new(training_schema(), columns).map_err(|e| Error::internal(e.to_string()))
}
