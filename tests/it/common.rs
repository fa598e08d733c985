//! Helpers: a temp lake, running the CLI, reading Parquet back.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, Int64Array, RecordBatch, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

pub const RUN_DATE: &str = "2026-11-27";

/// `--set`s that turn off the item content table and `teacher-content`,
/// for lakes without an `items` table.
pub const NO_CONTENT: [&str; 4] = [
    "--set",
    "features.item_content_sql=\"\"",
    "--set",
    "models.teacher.content=false",
];

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A command running the built binary.
pub fn recdistill() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recdistill"));
    cmd.env_remove("RUST_LOG").stdin(Stdio::null());
    cmd
}

/// Runs and demands success; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("binary runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed with {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs and demands exit code `code`; returns stderr.
pub fn fails(cmd: &mut Command, code: i32) -> String {
    let out: Output = cmd.output().expect("binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{cmd:?}: expected exit {code}\nstdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    stderr
}

/// A temporary lake folder.
pub struct TestLake {
    pub dir: tempfile::TempDir,
}

impl TestLake {
    pub fn new() -> TestLake {
        TestLake {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A lake seeded with the bundled sample (written by `recdistill sample`).
    pub fn with_sample() -> TestLake {
        let lake = TestLake::new();
        ok(recdistill().args(["sample", "--out"]).arg(lake.path()));
        lake
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The run folder of `job` on RUN_DATE.
    pub fn run_folder(&self, job: &str) -> PathBuf {
        self.path()
            .join("recdistill")
            .join(job)
            .join(format!("run_date={RUN_DATE}"))
    }

    /// `recdistill run` of `job_file` (relative to the repo) on this lake.
    pub fn run_job(&self, job_file: &str, extra: &[&str]) -> Command {
        let mut cmd = recdistill();
        cmd.arg("run")
            .arg("--job")
            .arg(repo().join(job_file))
            .arg("--lake")
            .arg(self.path())
            .args(["--run-date", RUN_DATE])
            .args(extra);
        cmd
    }
}

/// Every batch of a Parquet file, read with the parquet crate.
pub fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// One batch holding all rows of a Parquet file.
pub fn read_all(path: &Path) -> RecordBatch {
    let batches = read_parquet(path);
    let schema = batches[0].schema();
    arrow::compute::concat_batches(&schema, &batches).unwrap()
}

/// Writes `batch` as a Parquet file at `path` (parents created).
pub fn write_parquet(path: &Path, batch: &RecordBatch) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(batch).unwrap();
    writer.close().unwrap();
}

/// A valid interactions batch: `users` users with `per_user` events each,
/// timestamps in 2025.
pub fn interactions(users: i64, per_user: i64) -> RecordBatch {
    let mut u = Vec::new();
    let mut i = Vec::new();
    let mut t = Vec::new();
    for user in 0..users {
        for k in 0..per_user {
            u.push(user + 1);
            i.push((user + k) % 17 + 100);
            t.push(1_735_689_600_000_000 + (user * 1000 + k) * 60_000_000);
        }
    }
    let n = u.len();
    batch(vec![
        ("user_id", Arc::new(Int64Array::from(u)) as ArrayRef),
        ("item_id", Arc::new(Int64Array::from(i))),
        (
            "timestamp",
            Arc::new(TimestampMicrosecondArray::from(t).with_timezone("UTC")),
        ),
        ("rating", Arc::new(Float32Array::from(vec![3.0; n]))),
    ])
}

/// A batch from named columns (all nullable).
pub fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap()
}

/// The microsecond UTC timestamp type.
pub fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Copies the folder `from` into `to`, subfolders included.
pub fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::create_dir_all(to).unwrap();
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Relative paths of all files under `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Timing metrics: measured, so they differ from run to run.
pub const TIMINGS: [&str; 3] = ["latency_ms_p50", "latency_ms_p99", "users_per_s"];

/// The evaluation rows as (model, metric, k) → value, timings left out
/// (everything else is repeatable).
pub fn evaluation_values(run: &Path) -> Vec<(String, String, i32, f64)> {
    all_evaluation_values(run)
        .into_iter()
        .filter(|(_, m, _, _)| !TIMINGS.contains(&m.as_str()))
        .collect()
}

/// Every evaluation row as (model, metric, k) → value (k 0 when null).
pub fn all_evaluation_values(run: &Path) -> Vec<(String, String, i32, f64)> {
    use arrow::array::AsArray;
    use arrow::datatypes::{Float64Type, Int32Type};
    let b = read_all(&run.join("evaluation/evaluation.parquet"));
    let col = |name: &str| b.column(b.schema().index_of(name).unwrap()).clone();
    let (model, metric, k, value) = (col("model"), col("metric"), col("k"), col("value"));
    let model = arrow::compute::cast(&model, &DataType::Utf8).unwrap();
    let metric = arrow::compute::cast(&metric, &DataType::Utf8).unwrap();
    (0..b.num_rows())
        .map(|r| {
            (
                model.as_string::<i32>().value(r).to_string(),
                metric.as_string::<i32>().value(r).to_string(),
                if k.is_null(r) {
                    0
                } else {
                    k.as_primitive::<Int32Type>().value(r)
                },
                value.as_primitive::<Float64Type>().value(r),
            )
        })
        .collect()
}

/// The value of (model, metric, k).
pub fn metric(rows: &[(String, String, i32, f64)], model: &str, metric: &str, k: i32) -> f64 {
    rows.iter()
        .find(|(m, n, kk, _)| m == model && n == metric && *kk == k)
        .unwrap_or_else(|| panic!("no {model} {metric}@{k} in {rows:?}"))
        .3
}
