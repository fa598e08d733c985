//! The whole job end to end on the bundled sample: outputs, manifest,
//! determinism, stage-by-stage runs, the embedded default.

use sha2::{Digest, Sha256};

use crate::common::*;
use crate::crash::QUICK;

#[test]
fn run_writes_every_output_and_a_manifest_that_lists_them() {
    let lake = TestLake::with_sample();
    let stdout = ok(&mut lake.run_job("jobs/sample.toml", &[]));
    assert!(stdout.contains("committed"), "{stdout}");
    let run = lake.run_folder("sample");
    for f in [
        "features/split.parquet",
        "features/item_map.parquet",
        "features/user_map.parquet",
        "features/item_popularity.parquet",
        "features/stats.parquet",
        "models/popularity/model.safetensors",
        "models/meanpool/model.safetensors",
        "training/meanpool.parquet",
        "models/teacher/model.safetensors",
        "training/teacher.parquet",
        "models/teacher-content/model.safetensors",
        "training/teacher-content.parquet",
        "features/item_content.parquet",
        "recommendations/teacher.parquet",
        "recommendations/teacher-content.parquet",
        "recommendations/popularity.parquet",
        "recommendations/meanpool.parquet",
        "evaluation/evaluation.parquet",
        "_SUCCESS",
    ] {
        assert!(
            run.join(f).is_file(),
            "missing {f}; have {:?}",
            files_under(&run)
        );
    }

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("_SUCCESS")).unwrap()).unwrap();
    assert_eq!(manifest["job"], "sample");
    assert_eq!(manifest["run_date"], RUN_DATE);
    assert_eq!(manifest["seed"], 42);
    assert_eq!(manifest["config_hash"].as_str().unwrap().len(), 64);
    assert!(manifest["run_id"].as_str().unwrap().len() > 8);
    assert_eq!(manifest["tool"]["name"], "recdistill");
    assert_eq!(
        manifest["tool"]["cargo_lock_sha256"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    let inputs = manifest["input_fingerprint"]["files"].as_array().unwrap();
    assert!(inputs.len() > 10, "one file per day plus items");
    assert!(inputs.iter().all(|f| f["size"].as_u64().unwrap() > 0));
    let stages: Vec<&str> = manifest["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "features",
            "baselines",
            "teacher",
            "soft-labels",
            "distill",
            "compress",
            "evaluate"
        ]
    );

    // Every listed file exists with the listed size and checksum, and every
    // data file of the run is listed.
    let outputs = manifest["outputs"].as_array().unwrap();
    for o in outputs {
        let bytes = std::fs::read(run.join(o["path"].as_str().unwrap())).unwrap();
        assert_eq!(bytes.len() as u64, o["size"].as_u64().unwrap(), "{o}");
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            o["sha256"].as_str().unwrap(),
            "{o}"
        );
    }
    let listed: Vec<&str> = outputs
        .iter()
        .map(|o| o["path"].as_str().unwrap())
        .collect();
    for f in files_under(&run) {
        if f != "_SUCCESS" && !f.starts_with("_stages/") {
            assert!(listed.contains(&f.as_str()), "{f} not in the manifest");
        }
    }

    // The learned model beats popularity on the sample (it has sequential structure).
    let rows = evaluation_values(&run);
    assert_eq!(
        rows.len(),
        21 * (3 * 3 + 1) + 20,
        "14 models and 7 compressed variants × (3 metrics × 3 cut-offs + pareto), and the teacher overlap of all but the teacher"
    );
    let timings = all_evaluation_values(&run).len() - rows.len();
    assert_eq!(
        timings,
        21 * 3,
        "latency p50, p99 and users/s of every model"
    );
    let (learned, popular) = (
        metric(&rows, "meanpool", "ndcg", 10),
        metric(&rows, "popularity", "ndcg", 10),
    );
    assert!(
        learned > popular * 1.5,
        "meanpool {learned} vs popularity {popular}"
    );
}

/// The quick job's short training (`crash::QUICK`), with the item content
/// teacher kept: what these tests check does not depend on how long the
/// models train.
fn quick_with_content() -> Vec<&'static str> {
    QUICK
        .chunks(2)
        .filter(|pair| !pair[1].contains("content"))
        .flatten()
        .copied()
        .collect()
}

#[test]
fn rerun_gives_identical_recommendations_and_values() {
    let lake = TestLake::with_sample();
    let quick = quick_with_content();
    ok(&mut lake.run_job("jobs/sample.toml", &quick));
    let run = lake.run_folder("sample");
    let first_recs = std::fs::read(run.join("recommendations/meanpool.parquet")).unwrap();
    let first_split = std::fs::read(run.join("features/split.parquet")).unwrap();
    let first_values = evaluation_values(&run);
    let first_manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("_SUCCESS")).unwrap()).unwrap();

    ok(&mut lake.run_job("jobs/sample.toml", &quick));
    assert_eq!(
        first_recs,
        std::fs::read(run.join("recommendations/meanpool.parquet")).unwrap()
    );
    assert_eq!(
        first_split,
        std::fs::read(run.join("features/split.parquet")).unwrap()
    );
    assert_eq!(first_values, evaluation_values(&run));
    let second: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("_SUCCESS")).unwrap()).unwrap();
    assert_ne!(
        first_manifest["run_id"], second["run_id"],
        "each run has its own id"
    );
    assert_eq!(
        first_manifest["input_fingerprint"],
        second["input_fingerprint"]
    );

    // A different seed trains a different model.
    ok(lake
        .run_job("jobs/sample.toml", &quick)
        .args(["--set", "seed=7"]));
    assert_ne!(
        first_recs,
        std::fs::read(run.join("recommendations/meanpool.parquet")).unwrap()
    );
}

#[test]
fn stages_one_at_a_time_equal_a_whole_run() {
    let quick = quick_with_content();
    let whole = TestLake::with_sample();
    ok(&mut whole.run_job("jobs/sample.toml", &quick));

    let staged = TestLake::with_sample();
    let stage = |name: &str| {
        let mut cmd = recdistill();
        cmd.args(["stage", name, "--job"])
            .arg(repo().join("jobs/sample.toml"))
            .arg("--lake")
            .arg(staged.path())
            .args(["--run-date", RUN_DATE])
            .args(&quick);
        cmd
    };
    // Later stages refuse to run before the ones they read from.
    let err = fails(&mut stage("evaluate"), 2);
    assert!(err.contains("features"), "{err}");
    let out = ok(&mut stage("ingest"));
    assert!(out.contains("input valid"), "{out}");
    assert!(
        !staged.run_folder("sample").exists(),
        "ingest writes nothing"
    );
    for name in [
        "features",
        "baselines",
        "teacher",
        "soft-labels",
        "distill",
        "compress",
        "evaluate",
    ] {
        ok(&mut stage(name));
        assert!(!staged.run_folder("sample").join("_SUCCESS").exists());
    }
    ok(&mut stage("commit"));
    let (a, b) = (whole.run_folder("sample"), staged.run_folder("sample"));
    assert!(b.join("_SUCCESS").is_file());
    for f in [
        "recommendations/meanpool.parquet",
        "recommendations/popularity.parquet",
        "recommendations/teacher.parquet",
        "recommendations/teacher-content.parquet",
        "features/split.parquet",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(evaluation_values(&a), evaluation_values(&b));

    // A stage run with another config cannot be committed with this one.
    ok(stage("baselines").args(["--set", "models.meanpool.epochs=1"]));
    let err = fails(&mut stage("commit"), 2);
    assert!(
        err.contains("stage teacher has not run"),
        "rerunning baselines forgets teacher and evaluate: {err}"
    );
    let err = fails(
        stage("evaluate").args(["--set", "models.meanpool.epochs=1"]),
        2,
    );
    assert!(err.contains("stage teacher"), "{err}");
    for name in ["teacher", "soft-labels", "distill", "compress", "evaluate"] {
        ok(stage(name).args(["--set", "models.meanpool.epochs=1"]));
    }
    let err = fails(&mut stage("commit"), 2);
    assert!(err.contains("different job config"), "{err}");

    // Rerunning features forgets every later stage.
    ok(&mut stage("features"));
    let err = fails(&mut stage("commit"), 2);
    assert!(err.contains("stage baselines has not run"), "{err}");
}

#[test]
fn the_default_run_seeds_a_local_lake_with_the_shipped_sample() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = ok(recdistill()
        .current_dir(dir.path())
        .args(["run", "--run-date", RUN_DATE]));
    assert!(stdout.contains("meanpool"), "{stdout}");
    let lake = dir.path().join("lake");
    assert!(
        lake.join("recdistill/sample")
            .join(format!("run_date={RUN_DATE}/_SUCCESS"))
            .is_file()
    );

    // What it seeded is what data-samples/sample ships, file for file and row for row.
    let shipped = repo().join("data-samples/sample");
    let shipped_files = files_under(&shipped);
    let seeded: Vec<String> = files_under(&lake)
        .into_iter()
        .filter(|f| !f.starts_with("recdistill"))
        .collect();
    assert_eq!(shipped_files, seeded);
    for f in &shipped_files {
        assert_eq!(
            read_parquet(&shipped.join(f)),
            read_parquet(&lake.join(f)),
            "{f}"
        );
    }
}

#[test]
fn temporal_protocol_runs_and_splits_by_time() {
    let lake = TestLake::with_sample();
    ok(&mut lake.run_job(
        "jobs/sample.toml",
        &[
            "--set",
            "split.protocol=temporal",
            "--set",
            "models.meanpool.epochs=2",
        ],
    ));
    let split = read_all(&lake.run_folder("sample").join("features/split.parquet"));
    use arrow::array::AsArray;
    let s = arrow::compute::cast(split.column(3), &arrow::datatypes::DataType::Utf8).unwrap();
    let ts = split
        .column(2)
        .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
    let (mut last_train, mut first_test) = (i64::MIN, i64::MAX);
    let mut counts = [0usize; 3];
    for r in 0..split.num_rows() {
        match s.as_string::<i32>().value(r) {
            "train" => {
                last_train = last_train.max(ts.value(r));
                counts[0] += 1;
            }
            "valid" => counts[1] += 1,
            "test" => {
                first_test = first_test.min(ts.value(r));
                counts[2] += 1;
            }
            other => panic!("split {other}"),
        }
    }
    assert!(last_train < first_test, "train before test");
    let n = split.num_rows() as f64;
    assert!(
        (counts[2] as f64 / n - 0.1).abs() < 0.02,
        "about 10% test: {counts:?}"
    );
    assert!(
        (counts[1] as f64 / n - 0.1).abs() < 0.02,
        "about 10% valid: {counts:?}"
    );
}

#[test]
fn string_ids_keep_their_type_from_input_to_recommendations() {
    use arrow::array::{ArrayRef, AsArray, StringArray, TimestampMicrosecondArray};
    use std::sync::Arc;
    let lake = TestLake::new();
    let (mut users, mut items, mut times) = (Vec::new(), Vec::new(), Vec::new());
    for u in 0..30 {
        for k in 0..8 {
            users.push(format!("user-{u:02}"));
            items.push(format!("item-{}", (u + k) % 11));
            times.push(1_735_689_600_000_000i64 + (u * 100 + k) * 1_000_000);
        }
    }
    let b = batch(vec![
        ("user_id", Arc::new(StringArray::from(users)) as ArrayRef),
        ("item_id", Arc::new(StringArray::from(items))),
        (
            "timestamp",
            Arc::new(TimestampMicrosecondArray::from(times).with_timezone("UTC")),
        ),
    ]);
    write_parquet(
        &lake
            .path()
            .join("interactions/dt=2025-01-01/part-00000.parquet"),
        &b,
    );
    ok(&mut lake.run_job(
        "jobs/sample.toml",
        &[&["--set", "models.meanpool.epochs=2"][..], &NO_CONTENT].concat(),
    ));
    let run = lake.run_folder("sample");

    let item_map = read_all(&run.join("features/item_map.parquet"));
    let ids = arrow::compute::cast(item_map.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
    let ids: Vec<&str> = ids.as_string::<i32>().iter().map(|v| v.unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "indices follow the ids' order");
    assert_eq!(ids.len(), 11);

    let recs = read_all(&run.join("recommendations/meanpool.parquet"));
    // 11 items, 7 of them in each user's history: 4 left to rank.
    assert_eq!(recs.num_rows(), 30 * 4);
    let user = arrow::compute::cast(recs.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
    let item = arrow::compute::cast(recs.column(2), &arrow::datatypes::DataType::Utf8).unwrap();
    assert!(
        user.as_string::<i32>()
            .iter()
            .all(|v| v.unwrap().starts_with("user-"))
    );
    assert!(
        item.as_string::<i32>()
            .iter()
            .all(|v| v.unwrap().starts_with("item-"))
    );
    let contract = recdistill::lake::schema::contract("recommendations").unwrap();
    let utf8 = arrow::datatypes::DataType::Utf8;
    assert!(
        contract
            .output_mismatches(&recs.schema(), &utf8, &utf8)
            .is_empty()
    );
}
