//! The evaluation's results: one model's metrics, size, speed and overlap
//! with the distillation source, the accuracy-vs-bytes Pareto frontier, and
//! the tidy `evaluation/evaluation.parquet` table (schemas/evaluation.json)
//! with a row per (model, metric, k).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::config::Job;
use crate::dataset::Split;
use crate::error::{Error, Result};
use crate::model::score::{Metrics, Speed};
use crate::run::RunFolder;

/// One model's results.
#[derive(Debug, Clone)]
pub struct ModelResult {
    /// The model's card fields used in rows.
    pub name: String,
    /// Role (baseline, teacher, ...).
    pub role: String,
    /// Variant (fp32 until compression).
    pub variant: String,
    /// How it was trained.
    pub training: String,
    /// Loss family.
    pub loss: Option<String>,
    /// For a warm-started model (or a variant of one): the run date,
    /// `YYYY-MM-DD`, of the earlier run its model began from.
    pub warm_started_from: Option<String>,
    /// Parameters.
    pub params: u64,
    /// Artifact bytes.
    pub size_bytes: u64,
    /// Test metrics.
    pub metrics: Metrics,
    /// Mean share of the distillation source's top-10 that this model's
    /// top-10 also holds, over the test targets (`None` without a source).
    pub teacher_overlap_10: Option<f64>,
    /// Latency and throughput (`None` when `evaluation.latency_users` is 0).
    pub speed: Option<Speed>,
    /// On the accuracy-vs-bytes Pareto frontier (NDCG@10, or the first K).
    pub pareto: bool,
}

/// Items compared by the teacher–student overlap.
pub const OVERLAP_K: usize = 10;

/// Schema of `evaluation/evaluation.parquet` (schemas/evaluation.json).
pub fn evaluation_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("run_date", DataType::Date32, false),
        Field::new("job", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("role", DataType::Utf8, false),
        Field::new("variant", DataType::Utf8, false),
        Field::new("training", DataType::Utf8, false),
        Field::new("loss", DataType::Utf8, true),
        Field::new("metric", DataType::Utf8, false),
        Field::new("k", DataType::Int32, true),
        Field::new("value", DataType::Float64, false),
        Field::new("params", DataType::Int64, false),
        Field::new("size_bytes", DataType::Int64, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("protocol", DataType::Utf8, false),
        Field::new("users", DataType::Int64, false),
        Field::new("warm_started_from", DataType::Date32, true),
        Field::new("ceiling", DataType::Float64, true),
        Field::new("ceiling_fraction", DataType::Float64, true),
    ]))
}

/// The NDCG cut-off the frontier and the report use: 10, or the job's first K.
pub fn headline_k(metrics: &Metrics) -> Option<(usize, u32)> {
    metrics
        .ks
        .iter()
        .position(|&k| k == 10)
        .or(if metrics.ks.is_empty() { None } else { Some(0) })
        .map(|i| (i, metrics.ks[i]))
}

/// Marks the models no other model beats on both bytes and NDCG (smaller
/// or equal size with higher NDCG, or smaller size with equal NDCG).
pub fn mark_pareto(results: &mut [ModelResult]) {
    let point =
        |r: &ModelResult| headline_k(&r.metrics).map(|(i, _)| (r.size_bytes, r.metrics.ndcg[i]));
    let points: Vec<Option<(u64, f64)>> = results.iter().map(point).collect();
    for (i, r) in results.iter_mut().enumerate() {
        let Some((size, ndcg)) = points[i] else {
            continue;
        };
        r.pareto = !points.iter().enumerate().any(|(j, p)| {
            j != i && p.is_some_and(|(s, n)| (s <= size && n > ndcg) || (s < size && n >= ndcg))
        });
    }
}

/// How many of `a`'s list items (rows of [`OVERLAP_K`] items) `b`'s lists
/// of the same rows hold, and how many rows: exact counts, so the shares of
/// a sharded evaluation add up to the whole.
pub fn overlap_counts(a: &[u32], b: &[u32]) -> (u64, u64) {
    let rows = a.len() / OVERLAP_K;
    let shared: usize = a
        .chunks(OVERLAP_K)
        .zip(b.chunks(OVERLAP_K))
        .map(|(x, y)| {
            x.iter()
                .filter(|&&i| i != u32::MAX && y.contains(&i))
                .count()
        })
        .sum();
    (shared as u64, rows as u64)
}

/// Mean share of the listed items two models' lists hold in common, from
/// [`overlap_counts`].
pub fn overlap_share((shared, rows): (u64, u64)) -> f64 {
    if rows == 0 {
        return 0.0;
    }
    shared as f64 / (rows * OVERLAP_K as u64) as f64
}

/// The tidy evaluation rows of all models; `ceiling` (per cut-off of the
/// job: the log's Bayes ceiling on the same targets) fills the accuracy
/// rows' `ceiling` and `ceiling_fraction`.
pub fn evaluation_rows(
    job: &Job,
    run: &RunFolder,
    run_id: &str,
    results: &[ModelResult],
    ceiling: Option<&[Option<[f64; 3]>]>,
) -> Result<RecordBatch> {
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch");
    let days = (run.run_date() - epoch).num_days() as i32;
    let protocol = job.spec.split.protocol.as_str();
    // One (model, metric, k, value, ceiling) per row.
    let mut cells: Vec<(&ModelResult, &'static str, u32, f64, Option<f64>)> = Vec::new();
    for r in results {
        let m = &r.metrics;
        for (metric, (name, values)) in [("hr", &m.hr), ("ndcg", &m.ndcg), ("mrr", &m.mrr)]
            .into_iter()
            .enumerate()
        {
            for (i, (&cut, &v)) in m.ks.iter().zip(values.iter()).enumerate() {
                let bound = ceiling
                    .and_then(|c| c.get(i).copied().flatten())
                    .map(|c| c[metric]);
                cells.push((r, name, cut, v, bound));
            }
        }
        if let Some(v) = r.teacher_overlap_10 {
            cells.push((r, "teacher_overlap", OVERLAP_K as u32, v, None));
        }
        if let Some((_, k)) = headline_k(m) {
            cells.push((r, "pareto", k, if r.pareto { 1.0 } else { 0.0 }, None));
        }
        if let Some(s) = r.speed {
            cells.push((r, "latency_ms_p50", 0, s.latency_ms_p50, None));
            cells.push((r, "latency_ms_p99", 0, s.latency_ms_p99, None));
            cells.push((r, "users_per_s", 0, s.users_per_s, None));
        }
    }
    let text =
        |f: fn(&ModelResult) -> &str| -> Vec<&str> { cells.iter().map(|c| f(c.0)).collect() };
    let model = text(|r| &r.name);
    let role = text(|r| &r.role);
    let variant = text(|r| &r.variant);
    let training = text(|r| &r.training);
    let loss: Vec<Option<&str>> = cells.iter().map(|c| c.0.loss.as_deref()).collect();
    let metric: Vec<&str> = cells.iter().map(|c| c.1).collect();
    // Speed metrics have no cut-off: k is null.
    let k: Vec<Option<i32>> = cells
        .iter()
        .map(|c| (c.2 > 0).then_some(c.2 as i32))
        .collect();
    let value: Vec<f64> = cells.iter().map(|c| c.3).collect();
    let params: Vec<i64> = cells.iter().map(|c| c.0.params as i64).collect();
    let size: Vec<i64> = cells.iter().map(|c| c.0.size_bytes as i64).collect();
    let users: Vec<i64> = cells.iter().map(|c| c.0.metrics.users as i64).collect();
    let warm_from: Vec<Option<i32>> = cells
        .iter()
        .map(|c| {
            c.0.warm_started_from
                .as_deref()
                .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
                .map(|d| (d - epoch).num_days() as i32)
        })
        .collect();
    let rows = model.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![run_id; rows])),
        Arc::new(Date32Array::from(vec![days; rows])),
        Arc::new(StringArray::from(vec![job.spec.name.as_str(); rows])),
        Arc::new(StringArray::from(model)),
        Arc::new(StringArray::from(role)),
        Arc::new(StringArray::from(variant)),
        Arc::new(StringArray::from(training)),
        Arc::new(StringArray::from(loss)),
        Arc::new(StringArray::from(metric)),
        Arc::new(Int32Array::from(k)),
        Arc::new(Float64Array::from(value)),
        Arc::new(Int64Array::from(params)),
        Arc::new(Int64Array::from(size)),
        Arc::new(StringArray::from(vec![Split::Test.as_str(); rows])),
        Arc::new(StringArray::from(vec![protocol; rows])),
        Arc::new(Int64Array::from(users)),
        Arc::new(Date32Array::from(warm_from)),
        Arc::new(Float64Array::from(
            cells.iter().map(|c| c.4).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(
            cells
                .iter()
                .map(|c| c.4.filter(|&b| b > 0.0).map(|b| c.3 / b))
                .collect::<Vec<_>>(),
        )),
    ];
    RecordBatch::try_new(evaluation_schema(), columns).map_err(|e| Error::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, size_bytes: u64, ndcg10: f64) -> ModelResult {
        ModelResult {
            name: name.into(),
            role: "student".into(),
            variant: "fp32".into(),
            training: "scratch".into(),
            warm_started_from: None,
            loss: None,
            params: 1,
            size_bytes,
            metrics: Metrics {
                ks: vec![5, 10],
                hr: vec![0.0, 0.0],
                ndcg: vec![ndcg10 / 2.0, ndcg10],
                mrr: vec![0.0, 0.0],
                users: 1,
            },
            teacher_overlap_10: None,
            speed: None,
            pareto: false,
        }
    }

    #[test]
    fn the_frontier_holds_the_models_nothing_beats_on_both_bytes_and_ndcg() {
        let mut results = vec![
            result("big-best", 1000, 0.30),
            result("big-worse", 1000, 0.20),
            result("mid", 500, 0.25),
            result("mid-dominated", 600, 0.24),
            result("small", 100, 0.10),
            result("small-tie-larger", 120, 0.10),
        ];
        mark_pareto(&mut results);
        let front: Vec<&str> = results
            .iter()
            .filter(|r| r.pareto)
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(front, ["big-best", "mid", "small"]);
    }
}
