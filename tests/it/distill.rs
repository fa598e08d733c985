//! Distillation on the bundled sample: the teacher's soft labels are
//! written as Arrow list columns with their metadata, the chain trains from
//! them, a distilled student beats the same student trained from scratch,
//! mismatched soft labels are refused, and `recdistill sql` reads them.

use std::collections::HashSet;
use std::fs::File;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, ListArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Int32Type, UInt32Type};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;
use sha2::{Digest, Sha256};

use crate::common::*;

const K: usize = 20;

fn key_value(path: &std::path::Path) -> Vec<(String, String)> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap()
        .iter()
        .filter(|kv| kv.key.starts_with("recdistill."))
        .map(|kv| (kv.key.clone(), kv.value.clone().unwrap()))
        .collect()
}

fn meta<'a>(kv: &'a [(String, String)], key: &str) -> &'a str {
    &kv.iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key} in {kv:?}"))
        .1
}

#[test]
fn soft_labels_train_a_chain_whose_students_beat_scratch() {
    let lake = TestLake::with_sample();
    ok(&mut lake.run_job("jobs/sample.toml", &[]));
    let run = lake.run_folder("sample");

    // The teacher's soft labels: declared schema, K items per list, metadata.
    let path = run.join("soft_labels/teacher.parquet");
    let kv = key_value(&path);
    assert_eq!(meta(&kv, "recdistill.soft_labels.k"), K.to_string());
    assert_eq!(meta(&kv, "recdistill.soft_labels.temperature"), "2");
    assert_eq!(meta(&kv, "recdistill.soft_labels.model"), "teacher");
    assert_eq!(meta(&kv, "recdistill.soft_labels.n_items"), "200");
    let weights = std::fs::read(run.join("models/teacher/model.safetensors")).unwrap();
    assert_eq!(
        meta(&kv, "recdistill.soft_labels.model_sha256"),
        hex::encode(Sha256::digest(&weights))
    );
    let labels = read_all(&path);
    let contract = recdistill::lake::schema::contract("soft_labels").unwrap();
    let problems = contract.output_mismatches(&labels.schema(), &DataType::Int64, &DataType::Int64);
    assert!(problems.is_empty(), "{problems:?}");
    assert!(
        matches!(labels.schema().field_with_name("items").unwrap().data_type(),
            DataType::List(f) if f.data_type() == &DataType::UInt32)
    );
    let users = labels.column_by_name("user_id").unwrap();
    let users = users.as_primitive::<arrow::datatypes::Int64Type>();
    let positions = labels
        .column_by_name("position")
        .unwrap()
        .as_primitive::<Int32Type>();
    let items = labels.column_by_name("items").unwrap().as_list::<i32>();
    let ids = labels.column_by_name("item_ids").unwrap().as_list::<i32>();
    let logits = labels.column_by_name("logits").unwrap().as_list::<i32>();
    let mut keys = HashSet::new();
    for r in 0..labels.num_rows() {
        assert!(keys.insert((users.value(r), positions.value(r))));
        assert!(positions.value(r) >= 1);
        let row_items = items.value(r);
        let row_items = row_items.as_primitive::<UInt32Type>();
        assert_eq!(row_items.len(), K);
        assert_eq!(ids.value(r).len(), K);
        let row_logits = logits.value(r);
        let row_logits = row_logits.as_primitive::<Float32Type>().values().to_vec();
        assert!(
            row_logits.windows(2).all(|w| w[0] >= w[1]),
            "best first: {row_logits:?}"
        );
        let distinct: HashSet<u32> = row_items.values().iter().copied().collect();
        assert_eq!(distinct.len(), K);
    }
    // Every user with train items has a label for its next, unseen item,
    // and the last positions of every window.
    let sample_users: HashSet<i64> = (0..labels.num_rows()).map(|r| users.value(r)).collect();
    assert_eq!(sample_users.len(), 300);
    assert!(labels.num_rows() > 300 * 10, "{} rows", labels.num_rows());
    // The assistant emits its own for the student.
    assert_eq!(
        meta(
            &key_value(&run.join("soft_labels/assistant.parquet")),
            "recdistill.soft_labels.model"
        ),
        "assistant"
    );

    // The ablation's rows: roles, trainings, losses, overlaps.
    let rows = evaluation_values(&run);
    let eval = read_all(&run.join("evaluation/evaluation.parquet"));
    let col = |name: &str| {
        eval.column_by_name(name)
            .unwrap()
            .as_string::<i32>()
            .clone()
    };
    let (models, roles, trainings, losses, metrics) = (
        col("model"),
        col("role"),
        col("training"),
        col("loss"),
        col("metric"),
    );
    let card = |model: &str| {
        let r = (0..eval.num_rows())
            .find(|&r| models.value(r) == model)
            .unwrap_or_else(|| panic!("no rows for {model}"));
        (
            roles.value(r).to_string(),
            trainings.value(r).to_string(),
            losses.value(r).to_string(),
        )
    };
    let expect = |role: &str, training: &str, loss: &str| {
        (role.to_string(), training.to_string(), loss.to_string())
    };
    assert_eq!(
        card("assistant"),
        expect("assistant", "kd-teacher", "ce+kl")
    );
    assert_eq!(card("student-scratch"), expect("student", "scratch", "ce"));
    for family in ["kl", "mse", "rank"] {
        assert_eq!(
            card(&format!("student-kd-teacher-{family}")),
            expect("student", "kd-teacher", &format!("ce+{family}"))
        );
        assert_eq!(
            card(&format!("student-kd-assistant-{family}")),
            expect("student", "kd-assistant", &format!("ce+{family}"))
        );
    }
    let overlaps: Vec<(&str, f64)> = (0..eval.num_rows())
        .filter(|&r| metrics.value(r) == "teacher_overlap")
        .map(|r| {
            let v = eval
                .column_by_name("value")
                .unwrap()
                .as_primitive::<arrow::datatypes::Float64Type>()
                .value(r);
            (models.value(r), v)
        })
        .collect();
    assert!(
        overlaps
            .iter()
            .all(|(m, v)| *m != "teacher" && (0.0..=1.0).contains(v))
    );
    assert!(overlaps.iter().any(|(m, _)| *m == "student-kd-teacher-kl"));

    // A distilled student beats the same student trained from scratch.
    let scratch = metric(&rows, "student-scratch", "ndcg", 10);
    let best = ["kl", "mse", "rank"]
        .iter()
        .flat_map(|f| {
            [
                format!("student-kd-teacher-{f}"),
                format!("student-kd-assistant-{f}"),
            ]
        })
        .map(|m| (metric(&rows, &m, "ndcg", 10), m))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap();
    assert!(
        best.0 > scratch,
        "best distilled {} {} vs scratch {scratch}",
        best.1,
        best.0
    );

    // Students are at most a tenth of the teacher's parameters.
    let params = |model: &str| {
        let r = (0..eval.num_rows())
            .find(|&r| models.value(r) == model)
            .unwrap();
        let p =
            arrow::compute::cast(eval.column_by_name("params").unwrap(), &DataType::Int64).unwrap();
        p.as_primitive::<arrow::datatypes::Int64Type>().value(r)
    };
    assert!(params("student-scratch") * 4 < params("teacher"));

    // `recdistill sql` reads the soft labels as a table.
    let out = ok(recdistill()
        .args([
            "sql",
            "SELECT user_id, items[1] AS top, logits[1] AS logit FROM soft_labels WHERE model = 'teacher' ORDER BY user_id, position LIMIT 3",
            "--lake",
        ])
        .arg(lake.path())
        .args(["--format", "csv"]));
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(out.starts_with("user_id,top,logit"), "{out}");
}

fn stage(lake: &TestLake, name: &str, extra: &[&str]) -> std::process::Command {
    let mut cmd = recdistill();
    cmd.args(["stage", name, "--job"])
        .arg(repo().join("jobs/sample.toml"))
        .arg("--lake")
        .arg(lake.path())
        .args(["--run-date", RUN_DATE])
        .args(extra);
    cmd
}

/// Rewrites a Parquet file with `column` replaced, keeping its metadata.
fn rewrite(path: &std::path::Path, column: &str, replace: impl Fn(&ArrayRef) -> ArrayRef) {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned();
    let batches: Vec<RecordBatch> = builder.build().unwrap().map(|b| b.unwrap()).collect();
    let schema = batches[0].schema();
    let props = WriterProperties::builder()
        .set_key_value_metadata(kv)
        .build();
    let mut writer =
        ArrowWriter::try_new(File::create(path).unwrap(), schema.clone(), Some(props)).unwrap();
    for batch in batches {
        let columns: Vec<ArrayRef> = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(f, c)| {
                if f.name() == column {
                    replace(c)
                } else {
                    Arc::clone(c)
                }
            })
            .collect();
        writer
            .write(&RecordBatch::try_new(schema.clone(), columns).unwrap())
            .unwrap();
    }
    writer.close().unwrap();
}

#[test]
fn mismatched_soft_labels_are_refused() {
    let lake = TestLake::with_sample();
    let quick = [
        "--set",
        "models.meanpool.enabled=false",
        "--set",
        "models.teacher.epochs=2",
        "--set",
        "distill.assistants=[]",
        "--set",
        "distill.losses=[\"kl\"]",
        "--set",
        "distill.student.epochs=1",
    ];
    for name in ["features", "baselines", "teacher", "soft-labels"] {
        ok(&mut stage(&lake, name, &[&quick[..], &NO_CONTENT].concat()));
    }
    let args = [&quick[..], &NO_CONTENT].concat();
    ok(&mut stage(&lake, "distill", &args));
    let run = lake.run_folder("sample");
    let path = run.join("soft_labels/teacher.parquet");

    // Another K, another temperature: exit 3 naming the file and the rule.
    let err = fails(
        &mut stage(
            &lake,
            "distill",
            &[&args[..], &["--set", "distill.k=10"]].concat(),
        ),
        3,
    );
    assert!(
        err.contains("soft_labels/teacher.parquet") && err.contains("top 20"),
        "{err}"
    );
    let err = fails(
        &mut stage(
            &lake,
            "distill",
            &[&args[..], &["--set", "distill.temperature=3.0"]].concat(),
        ),
        3,
    );
    assert!(err.contains("temperature"), "{err}");

    // Item ids that are not this run's ids of the item indices (labels of
    // another catalogue): refused.
    let original = std::fs::read(&path).unwrap();
    rewrite(&path, "item_ids", |c| {
        let list = c.as_list::<i32>();
        let values = list.values();
        let shifted =
            arrow::compute::concat(&[&values.slice(1, values.len() - 1), &values.slice(0, 1)])
                .unwrap();
        Arc::new(
            ListArray::try_new(
                Arc::new(arrow::datatypes::Field::new_list_field(
                    values.data_type().clone(),
                    false,
                )),
                list.offsets().clone(),
                shifted,
                None,
            )
            .unwrap(),
        )
    });
    let err = fails(&mut stage(&lake, "distill", &args), 3);
    assert!(
        err.contains("soft_labels/teacher.parquet") && err.contains("item_ids"),
        "{err}"
    );

    // A list of the wrong length: refused.
    std::fs::write(&path, &original).unwrap();
    rewrite(&path, "logits", |c| {
        let list = c.as_list::<i32>();
        let mut lengths: Vec<usize> = list.offsets().lengths().collect();
        lengths[0] -= 1;
        lengths[1] += 1;
        Arc::new(
            ListArray::try_new(
                Arc::new(arrow::datatypes::Field::new_list_field(
                    DataType::Float32,
                    false,
                )),
                arrow::buffer::OffsetBuffer::from_lengths(lengths),
                list.values().clone(),
                None,
            )
            .unwrap(),
        )
    });
    let err = fails(&mut stage(&lake, "distill", &args), 3);
    assert!(err.contains("logits"), "{err}");

    // The original file is accepted again.
    std::fs::write(&path, &original).unwrap();
    ok(&mut stage(&lake, "distill", &args));
}
