//! Bad input: each case exits with its documented code, names the file,
//! column and rule, and writes nothing under the run's prefix. A committed
//! earlier run survives a bad rerun untouched.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};

use crate::common::*;

/// A lake whose one good partition is joined by `bad` at `bad_path`.
fn lake_with(
    bad_path: &str,
    bad: Option<&arrow::array::RecordBatch>,
    raw: Option<&[u8]>,
) -> TestLake {
    let lake = TestLake::new();
    write_parquet(
        &lake
            .path()
            .join("interactions/dt=2025-01-01/part-00000.parquet"),
        &interactions(20, 6),
    );
    let path = lake.path().join(bad_path);
    if let Some(batch) = bad {
        write_parquet(&path, batch);
    }
    if let Some(bytes) = raw {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    lake
}

/// Runs the sample job on `lake` and demands exit `code`, a message holding
/// every one of `needles`, and an untouched output prefix.
fn refused(lake: &TestLake, code: i32, needles: &[&str]) -> String {
    let err = fails(&mut lake.run_job("jobs/sample.toml", &[]), code);
    for n in needles {
        assert!(err.contains(n), "message lacks {n:?}:\n{err}");
    }
    assert!(
        !lake.path().join("recdistill").exists(),
        "something was written:\n{err}"
    );
    err
}

#[test]
fn missing_column() {
    let b = batch(vec![
        (
            "user_id",
            Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef,
        ),
        ("item_id", Arc::new(Int64Array::from(vec![1, 2]))),
    ]);
    refused(
        &lake_with(
            "interactions/dt=2025-01-02/part-00000.parquet",
            Some(&b),
            None,
        ),
        3,
        &[
            "dt=2025-01-02/part-00000.parquet",
            "missing required column `timestamp`",
        ],
    );
}

#[test]
fn wrong_type() {
    let b = batch(vec![
        ("user_id", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
        ("item_id", Arc::new(Int64Array::from(vec![1]))),
        (
            "timestamp",
            Arc::new(StringArray::from(vec!["2025-01-01 00:00:00"])),
        ),
    ]);
    refused(
        &lake_with(
            "interactions/dt=2025-01-02/part-00000.parquet",
            Some(&b),
            None,
        ),
        3,
        &[
            "dt=2025-01-02/part-00000.parquet",
            "`timestamp`",
            "utf8",
            "schemas/interactions.json",
        ],
    );
}

fn one_bad_row(user: Option<i64>, item: Option<i64>, ts: Option<i64>) -> arrow::array::RecordBatch {
    let good = 1_735_700_000_000_000;
    batch(vec![
        (
            "user_id",
            Arc::new(Int64Array::from(vec![Some(1), user, Some(3)])) as ArrayRef,
        ),
        (
            "item_id",
            Arc::new(Int64Array::from(vec![Some(100), item, Some(101)])),
        ),
        (
            "timestamp",
            Arc::new(
                TimestampMicrosecondArray::from(vec![Some(good), ts, Some(good)])
                    .with_timezone("UTC"),
            ),
        ),
    ])
}

#[test]
fn null_keys() {
    let good = Some(1_735_700_000_000_000);
    for (name, b) in [
        ("user_id", one_bad_row(None, Some(7), good)),
        ("item_id", one_bad_row(Some(7), None, good)),
        ("timestamp", one_bad_row(Some(7), Some(7), None)),
    ] {
        let lake = lake_with("interactions/dt=2025-01-03/bad.parquet", Some(&b), None);
        refused(
            &lake,
            3,
            &[
                "dt=2025-01-03/bad.parquet",
                &format!("`{name}` must not be null"),
                "1 row(s)",
            ],
        );
    }
}

#[test]
fn timestamp_out_of_range_shows_offending_rows() {
    // 1970-01-01T00:00:07Z: before input.min_timestamp.
    let b = one_bad_row(Some(77), Some(777), Some(7_000_000));
    let err = refused(
        &lake_with("interactions/dt=1970-01-01/old.parquet", Some(&b), None),
        3,
        &[
            "dt=1970-01-01/old.parquet",
            "`timestamp` must lie in",
            "input.min_timestamp",
            "777",
        ],
    );
    assert!(err.contains("1970-01-01T00:00:07"), "{err}");
}

#[test]
fn empty_inputs() {
    let lake = TestLake::new();
    refused(&lake, 3, &["no input files", "interactions"]);

    let lake = TestLake::new();
    let empty = interactions(0, 0);
    write_parquet(
        &lake
            .path()
            .join("interactions/dt=2025-01-01/part-00000.parquet"),
        &empty,
    );
    refused(&lake, 3, &["no rows"]);
}

#[test]
fn broken_files() {
    let good = {
        let lake = TestLake::new();
        let path = lake.path().join("x.parquet");
        write_parquet(&path, &interactions(3, 3));
        std::fs::read(path).unwrap()
    };
    let truncated = &good[..good.len() / 2];
    for (path, bytes, needle) in [
        (
            "interactions/dt=2025-01-02/cut.parquet",
            truncated,
            "not a readable Parquet file",
        ),
        (
            "interactions/dt=2025-01-02/empty.parquet",
            &b""[..],
            "zero-byte",
        ),
        (
            "interactions/dt=2025-01-02/notes.txt",
            &b"hello"[..],
            "not a Parquet file name",
        ),
        (
            "interactions/dt=2025-01-02/text.parquet",
            &b"this is not parquet at all"[..],
            "not a readable Parquet file",
        ),
    ] {
        let lake = lake_with(path, None, Some(bytes));
        refused(&lake, 3, &[path, needle]);
    }
    // Hidden files are not data.
    let lake = lake_with("interactions/_SUCCESS", None, Some(b"not data"));
    ok(&mut lake.run_job(
        "jobs/sample.toml",
        &[&["--set", "models.meanpool.enabled=false"][..], &NO_CONTENT].concat(),
    ));
}

#[test]
fn schema_drift_between_partitions() {
    let b = batch(vec![
        ("user_id", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
        ("item_id", Arc::new(StringArray::from(vec!["a"]))),
        (
            "timestamp",
            Arc::new(
                TimestampMicrosecondArray::from(vec![1_735_700_000_000_000]).with_timezone("UTC"),
            ),
        ),
    ]);
    refused(
        &lake_with(
            "interactions/dt=2025-01-02/part-00000.parquet",
            Some(&b),
            None,
        ),
        3,
        &[
            "schema drift",
            "`item_id`",
            "dt=2025-01-01/part-00000.parquet",
            "dt=2025-01-02/part-00000.parquet",
        ],
    );
}

#[test]
fn config_errors_exit_2_before_any_io() {
    let lake = TestLake::with_sample();
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("bad.toml");
    std::fs::write(&job, "name = \"x\"\n[models.meanpool]\nepochz = 3\n").unwrap();
    let err = fails(
        recdistill()
            .args(["run", "--job"])
            .arg(&job)
            .arg("--lake")
            .arg(lake.path()),
        2,
    );
    assert!(err.contains("bad.toml") && err.contains("epochz"), "{err}");

    for (args, needle) in [
        (vec!["--set", "models.meanpool.epochs"], "malformed --set"),
        (vec!["--set", "models.meanpool.epochs=lots"], "--set"),
        (vec!["--set", "name=../../etc"], "job name"),
        (vec!["--set", "lake.output_prefix=a/../b"], "output_prefix"),
        (
            vec!["--set", "input.interactions=%2e%2e/x"],
            "input.interactions",
        ),
    ] {
        let err = fails(&mut lake.run_job("jobs/sample.toml", &args), 2);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let err = fails(
        recdistill()
            .args(["run", "--job"])
            .arg(repo().join("jobs/sample.toml"))
            .arg("--lake")
            .arg(lake.path())
            .args(["--run-date", "2026-11-27/../x"]),
        2,
    );
    assert!(err.contains("run date"), "{err}");
    let err = fails(
        recdistill()
            .args(["run", "--job"])
            .arg(repo().join("jobs/sample.toml"))
            .args(["--lake", "ftp://example.com/lake"]),
        2,
    );
    assert!(err.contains("\"ftp\" is not supported"), "{err}");
    assert!(!lake.path().join("recdistill").exists());
}

#[test]
fn a_bad_rerun_leaves_the_committed_run_alone() {
    let lake = TestLake::with_sample();
    ok(&mut lake.run_job("jobs/sample.toml", &["--set", "models.meanpool.epochs=1"]));
    let success = lake.run_folder("sample").join("_SUCCESS");
    let before = std::fs::read(&success).unwrap();
    let bad = one_bad_row(None, Some(1), Some(1_735_700_000_000_000));
    write_parquet(
        &lake
            .path()
            .join("interactions/dt=2025-01-01/zz-bad.parquet"),
        &bad,
    );
    fails(
        &mut lake.run_job("jobs/sample.toml", &["--set", "models.meanpool.epochs=1"]),
        3,
    );
    assert_eq!(before, std::fs::read(&success).unwrap());
}
