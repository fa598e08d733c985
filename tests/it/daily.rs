//! Daily runs: a run for date D reads only the `dt=` partitions up to D
//! (within `input.window_days`), records those bounds, and a backfill made
//! after later days landed equals the run made on day D.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use crate::crash::QUICK;

/// A run date inside the bundled sample's days (2025-01-01 to 2025-04-05).
const DAY: &str = "2025-03-01";

/// `recdistill run` of the quick sample job on `lake` for `date`.
fn run_on(lake: &Path, date: &str, extra: &[&str]) -> Command {
    let mut cmd = recdistill();
    cmd.arg("run")
        .arg("--job")
        .arg(repo().join("jobs/sample.toml"))
        .arg("--lake")
        .arg(lake)
        .args(["--run-date", date])
        .args(QUICK)
        .args(extra);
    cmd
}

fn folder(lake: &Path, date: &str) -> PathBuf {
    lake.join("recdistill/sample")
        .join(format!("run_date={date}"))
}

fn manifest(folder: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(folder.join("_SUCCESS")).unwrap()).unwrap()
}

/// The `dt` of each file the run read, from its manifest.
fn partitions_read(manifest: &serde_json::Value) -> Vec<String> {
    let mut days: Vec<String> = manifest["input_fingerprint"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| {
            let path = f["path"].as_str().unwrap();
            let dt = path.strip_prefix("interactions/dt=")?;
            Some(dt.split('/').next().unwrap().to_string())
        })
        .collect();
    days.dedup();
    days
}

/// Removes the sample's partitions after `date`, as the lake stood on that day.
fn cut_after(lake: &Path, date: &str) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(lake.join("interactions")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.strip_prefix("dt=").is_some_and(|dt| dt > date) {
            std::fs::remove_dir_all(&path).unwrap();
            removed += 1;
        }
    }
    removed
}

#[test]
fn a_backfill_after_later_days_landed_equals_the_run_made_on_its_day() {
    // The lake as it stood on DAY, and the same lake some weeks later.
    let on_the_day = TestLake::with_sample();
    assert!(cut_after(on_the_day.path(), DAY) > 10);
    let later = TestLake::with_sample();
    // A day still being written, far ahead: a backfill never opens it.
    let unfinished = later.path().join("interactions/dt=2025-12-31");
    std::fs::create_dir_all(&unfinished).unwrap();
    std::fs::write(unfinished.join("part-00000.parquet"), b"half a file").unwrap();
    ok(&mut run_on(on_the_day.path(), DAY, &[]));
    ok(&mut run_on(later.path(), DAY, &[]));

    let made = folder(on_the_day.path(), DAY);
    let backfill = folder(later.path(), DAY);
    let (first, second) = (manifest(&made), manifest(&backfill));
    // The same files (two lakes: entity tags and times differ), the same bounds.
    let read = |m: &serde_json::Value| -> Vec<(String, u64)> {
        m["input_fingerprint"]["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["path"].as_str().unwrap().to_string(),
                    f["size"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(read(&first), read(&second));
    assert_eq!(
        first["input_fingerprint"]["bounds"],
        second["input_fingerprint"]["bounds"]
    );
    assert_eq!(second["input_fingerprint"]["bounds"]["to"], DAY);
    assert_eq!(second["input_fingerprint"]["bounds"]["from"], "");
    let days = partitions_read(&second);
    assert_eq!(days.first().map(String::as_str), Some("2025-01-01"));
    assert_eq!(days.last().map(String::as_str), Some(DAY));

    // Every table, label and recommendation file byte for byte (model
    // cards name their lake's URL, and timings differ), evaluation values
    // equal.
    let files = files_under(&made);
    assert_eq!(files, files_under(&backfill));
    let compared: Vec<&String> = files
        .iter()
        .filter(|f| {
            f.starts_with("features/")
                || f.starts_with("recommendations/")
                || f.as_str() == "soft_labels/teacher.parquet"
        })
        .collect();
    assert!(compared.len() >= 10, "{compared:?}");
    for f in compared {
        assert!(
            std::fs::read(made.join(f)).unwrap() == std::fs::read(backfill.join(f)).unwrap(),
            "{f} differs between the run on {DAY} and its backfill"
        );
    }
    assert_eq!(evaluation_values(&made), evaluation_values(&backfill));

    // The latest day's run sees the later days.
    ok(&mut run_on(later.path(), "2025-04-05", &[]));
    let latest = manifest(&folder(later.path(), "2025-04-05"));
    assert_eq!(
        partitions_read(&latest).last().map(String::as_str),
        Some("2025-04-05")
    );
    assert_ne!(
        latest["input_fingerprint"]["sha256"],
        second["input_fingerprint"]["sha256"]
    );

    // Both runs are the job's history in `recdistill sql`.
    let query = |q: &str| {
        ok(recdistill()
            .args(["sql", q, "--lake"])
            .arg(later.path())
            .args(["--format", "csv"]))
    };
    let runs = query(
        "SELECT CAST(run_date AS VARCHAR) AS d, input_from, input_to, input_files, \
         cardinality(stages) AS stages, seconds > 0 AS timed FROM runs ORDER BY run_date",
    );
    let rows: Vec<&str> = runs.lines().skip(1).collect();
    let files = |m: &serde_json::Value| m["input_fingerprint"]["files"].as_array().unwrap().len();
    let stages = |m: &serde_json::Value| m["stages"].as_array().unwrap().len();
    assert!(stages(&latest) >= 7);
    assert_eq!(
        rows,
        vec![
            format!("{DAY},,{DAY},{},{},true", files(&second), stages(&second)),
            format!(
                "2025-04-05,,2025-04-05,{},{},true",
                files(&latest),
                stages(&latest)
            ),
        ],
        "{runs}"
    );
    let history = query(
        "SELECT CAST(run_date AS VARCHAR) AS d, COUNT(*) AS n FROM evaluation_history \
         WHERE metric = 'ndcg' AND k = 10 GROUP BY run_date ORDER BY run_date",
    );
    let days: Vec<&str> = history
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(days, vec![DAY, "2025-04-05"], "{history}");
    // The latest run's own tables are still the plain names.
    let latest_eval = query("SELECT DISTINCT CAST(run_date AS VARCHAR) AS d FROM evaluation");
    assert_eq!(latest_eval.lines().nth(1), Some("2025-04-05"));
    // The torn input file leaves `interactions` out of the session, named
    // in a warning.
    let out = recdistill()
        .args(["sql", "SELECT COUNT(*) AS n FROM interactions", "--lake"])
        .arg(later.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("input table left out") && stderr.contains("dt=2025-12-31"),
        "{stderr}"
    );

    // An older run whose manifest is damaged drops out of the history with
    // a warning; the rest still answers.
    std::fs::write(backfill.join("_SUCCESS"), b"{ not a manifest").unwrap();
    let out = recdistill()
        .args(["sql", "SELECT COUNT(*) AS n FROM runs", "--lake"])
        .arg(later.path())
        .args(["--format", "csv"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().nth(1),
        Some("1")
    );
    assert!(
        stderr.contains("unreadable") && stderr.contains(DAY),
        "{stderr}"
    );
}

#[test]
fn a_window_keeps_the_last_days_and_an_empty_window_is_a_data_error() {
    let lake = TestLake::with_sample();
    ok(&mut run_on(
        lake.path(),
        DAY,
        &["--set", "input.window_days=30"],
    ));
    let run = folder(lake.path(), DAY);
    let m = manifest(&run);
    assert_eq!(m["input_fingerprint"]["bounds"]["from"], "2025-01-31");
    assert_eq!(m["input_fingerprint"]["bounds"]["to"], DAY);
    let days = partitions_read(&m);
    assert!(!days.is_empty());
    assert!(
        days.iter()
            .all(|d| d.as_str() >= "2025-01-31" && d.as_str() <= DAY),
        "{days:?}"
    );
    // The split holds only events of those days.
    let split = read_all(&run.join("features/split.parquet"));
    let ts = split
        .column_by_name("timestamp")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
        .unwrap();
    let first = chrono::DateTime::from_timestamp_micros(arrow::compute::min(ts).unwrap()).unwrap();
    let last = chrono::DateTime::from_timestamp_micros(arrow::compute::max(ts).unwrap()).unwrap();
    assert!(
        first.format("%F").to_string().as_str() >= "2025-01-31",
        "{first}"
    );
    assert!(last.format("%F").to_string().as_str() <= DAY, "{last}");

    // A run date before the first partition reads nothing: exit 3 naming
    // the folder and the bounds, and no run folder is made.
    let err = fails(&mut run_on(lake.path(), "2024-12-01", &[]), 3);
    assert!(
        err.contains("interactions/") && err.contains("no input files within dt <= 2024-12-01"),
        "{err}"
    );
    assert!(!folder(lake.path(), "2024-12-01").exists());
}
