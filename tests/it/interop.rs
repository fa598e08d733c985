//! Every table a run writes, read by an independent Parquet implementation
//! (polars), checked against the contracts in `schemas/` and against the
//! values the job computed — the metrics are recomputed from the written
//! recommendations and split.

use std::collections::HashMap;
use std::path::Path;

use polars::prelude::*;

use crate::common::*;

fn polars_read(path: &Path) -> DataFrame {
    let file = std::fs::File::open(path).unwrap();
    ParquetReader::new(file)
        .finish()
        .unwrap_or_else(|e| panic!("polars cannot read {}: {e}", path.display()))
}

fn strings(df: &DataFrame, name: &str) -> Vec<String> {
    df.column(name)
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|v| v.expect("no nulls").to_string())
        .collect()
}

fn ints(df: &DataFrame, name: &str) -> Vec<i64> {
    let col = df.column(name).unwrap().cast(&DataType::Int64).unwrap();
    col.i64()
        .unwrap()
        .iter()
        .map(|v| v.expect("no nulls"))
        .collect()
}

/// Nullable integers: the timing metrics have no cut-off.
fn nullable_ints(df: &DataFrame, name: &str) -> Vec<Option<i64>> {
    let col = df.column(name).unwrap().cast(&DataType::Int64).unwrap();
    col.i64().unwrap().iter().collect()
}

fn floats(df: &DataFrame, name: &str) -> Vec<f64> {
    let col = df.column(name).unwrap().cast(&DataType::Float64).unwrap();
    col.f64()
        .unwrap()
        .iter()
        .map(|v| v.expect("no nulls"))
        .collect()
}

#[test]
fn polars_reads_every_output_and_agrees_with_the_job() {
    let lake = TestLake::with_sample();
    ok(&mut lake.run_job("jobs/sample.toml", &[]));
    let run = lake.run_folder("sample");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("_SUCCESS")).unwrap()).unwrap();

    // Every Parquet file of the run: same rows and columns in both readers,
    // schema as its contract says, no nulls where the contract forbids them.
    let id = arrow::datatypes::DataType::Int64;
    let mut checked = 0;
    for output in manifest["outputs"].as_array().unwrap() {
        let rel = output["path"].as_str().unwrap();
        if !rel.ends_with(".parquet") {
            continue;
        }
        let path = run.join(rel);
        let df = polars_read(&path);
        let arrow_batch = read_all(&path);
        assert_eq!(df.height(), arrow_batch.num_rows(), "{rel}");
        let names: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|n| n.to_string())
            .collect();
        let arrow_names: Vec<String> = arrow_batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(names, arrow_names, "{rel}");
        let table = match rel.split_once('/').unwrap() {
            ("features", file) => file.trim_end_matches(".parquet").to_string(),
            (folder, _) => folder.to_string(),
        };
        let contract = recdistill::lake::schema::contract(&table).unwrap();
        let problems = contract.output_mismatches(&arrow_batch.schema(), &id, &id);
        assert!(problems.is_empty(), "{rel}: {problems:?}");
        for column in &contract.columns {
            if !column.nullable {
                assert_eq!(
                    df.column(&column.name).unwrap().null_count(),
                    0,
                    "{rel}.{}",
                    column.name
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 8, "checked {checked} tables");

    // Recompute HR/NDCG/MRR@10 of each model from split + recommendations.
    let split = polars_read(&run.join("features/split.parquet"));
    let (users, items, parts) = (
        ints(&split, "user_id"),
        ints(&split, "item_id"),
        strings(&split, "split"),
    );
    let test_item: HashMap<i64, i64> = users
        .iter()
        .zip(&items)
        .zip(&parts)
        .filter(|(_, s)| *s == "test")
        .map(|((u, i), _)| (*u, *i))
        .collect();
    let evaluation = polars_read(&run.join("evaluation/evaluation.parquet"));
    let (e_model, e_metric, e_k, e_value) = (
        strings(&evaluation, "model"),
        strings(&evaluation, "metric"),
        nullable_ints(&evaluation, "k"),
        floats(&evaluation, "value"),
    );
    let reported = |model: &str, metric: &str| -> f64 {
        (0..e_model.len())
            .find(|&r| e_model[r] == model && e_metric[r] == metric && e_k[r] == Some(10))
            .map(|r| e_value[r])
            .unwrap()
    };
    for model in ["popularity", "meanpool"] {
        let recs = polars_read(&run.join(format!("recommendations/{model}.parquet")));
        let (r_user, r_rank, r_item) = (
            ints(&recs, "user_id"),
            ints(&recs, "rank"),
            ints(&recs, "item_id"),
        );
        assert!(strings(&recs, "model").iter().all(|m| m == model));
        let mut listed_users: Vec<i64> = r_user.clone();
        listed_users.dedup();
        assert_eq!(
            listed_users.len(),
            test_item.len(),
            "one list per user with a test event"
        );
        let (mut hr, mut ndcg, mut mrr) = (0.0, 0.0, 0.0);
        for r in 0..recs.height() {
            if test_item.get(&r_user[r]) == Some(&r_item[r]) && r_rank[r] <= 10 {
                let rank = r_rank[r] as f64;
                hr += 1.0;
                ndcg += 1.0 / (rank + 1.0).log2();
                mrr += 1.0 / rank;
            }
        }
        let n = test_item.len() as f64;
        for (metric, mine) in [("hr", hr / n), ("ndcg", ndcg / n), ("mrr", mrr / n)] {
            let theirs = reported(model, metric);
            assert!(
                (mine - theirs).abs() < 1e-9,
                "{model} {metric}@10: recomputed {mine}, reported {theirs}"
            );
        }
    }
}
