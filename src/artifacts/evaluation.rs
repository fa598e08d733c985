//! A committed run's evaluation table read back: every model's metrics at
//! 10, for the publish gate and the report's history chart.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{Error, Result};
use crate::run::RunFolder;
use crate::run::commit::{Manifest, read_listed};

/// The evaluation file a committed run lists.
pub const EVALUATION_FILE: &str = "evaluation/evaluation.parquet";

/// Metrics at 10 by model: `ndcg@10`, `hr@10`, `mrr@10`.
pub type ScoresAt10 = BTreeMap<String, BTreeMap<String, f64>>;

/// Every model's metrics at 10 (`ndcg@10`, `hr@10`, `mrr@10`) in the
/// run's evaluation table, checked against its manifest.
pub async fn scores_at_10(run: &RunFolder, manifest: &Manifest) -> Result<ScoresAt10> {
    let url = run.url_of(EVALUATION_FILE);
    let bytes = read_listed(run, manifest, EVALUATION_FILE).await?;
    let bad = |e: &dyn std::fmt::Display| Error::data(&url, format!("unreadable: {e}"));
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| bad(&e))?;
    let mut scores = ScoresAt10::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(&e))?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| Error::data(&url, format!("no column {name}")))
        };
        let (model, metric, k, value) = (
            column("model")?,
            column("metric")?,
            column("k")?,
            column("value")?,
        );
        let (Some(model), Some(metric), Some(k), Some(value)) = (
            model.as_string_opt::<i32>(),
            metric.as_string_opt::<i32>(),
            k.as_primitive_opt::<Int32Type>(),
            value.as_primitive_opt::<Float64Type>(),
        ) else {
            return Err(Error::data(
                &url,
                "columns model, metric (utf8), k (int32), value (float64) of schemas/evaluation.json",
            ));
        };
        for row in 0..batch.num_rows() {
            if k.is_null(row) || k.value(row) != 10 || model.is_null(row) || metric.is_null(row) {
                continue;
            }
            let metric = metric.value(row);
            if matches!(metric, "ndcg" | "hr" | "mrr") {
                scores
                    .entry(model.value(row).to_string())
                    .or_default()
                    .insert(format!("{metric}@10"), value.value(row));
            }
        }
    }
    Ok(scores)
}
