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
    assert_refusal(lake, err, needles)
}

/// Demands a message holding every one of `needles` and an untouched
/// output prefix.
fn assert_refusal(lake: &TestLake, err: String, needles: &[&str]) -> String {
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

/// Runs the sample job on `lake` in a shell capped at `limit_mb` of address
/// space, and demands exit 3 within `seconds`, a message holding every one
/// of `needles`, and nothing written.
fn refused_within(lake: &TestLake, limit_mb: u64, seconds: u64, needles: &[&str]) -> String {
    let run = lake.run_job("jobs/sample.toml", &[]);
    let mut cmd = std::process::Command::new("bash");
    cmd.arg("-c")
        .arg(format!("ulimit -v {}; exec \"$@\"", limit_mb * 1024))
        .arg("bash")
        .arg(run.get_program())
        .args(run.get_args())
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null());
    let started = std::time::Instant::now();
    let err = fails(&mut cmd, 3);
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(seconds),
        "took {took:?}:\n{err}"
    );
    assert_refusal(lake, err, needles)
}

/// A good interactions file's bytes and its Parquet metadata.
fn good_file() -> (Vec<u8>, parquet::file::metadata::ParquetMetaData) {
    use parquet::file::reader::FileReader;
    let lake = TestLake::new();
    let path = lake.path().join("x.parquet");
    write_parquet(&path, &interactions(40, 8));
    let bytes = std::fs::read(&path).unwrap();
    let reader = parquet::file::serialized_reader::SerializedFileReader::new(bytes::Bytes::from(
        bytes.clone(),
    ))
    .unwrap();
    (bytes, reader.metadata().clone())
}

/// 2 GiB of address space: far below what a forged length would ask for.
const LIMIT_MB: u64 = 2048;

#[test]
fn bit_flipped_pages_are_refused_naming_the_file() {
    let (good, metadata) = good_file();
    let row_group = metadata.row_group(0);
    for (column, name) in ["user_id", "item_id", "timestamp"].iter().enumerate() {
        let chunk = row_group.column(column);
        let page = chunk
            .dictionary_page_offset()
            .unwrap_or(chunk.data_page_offset()) as usize;
        let mut bad = good.clone();
        for byte in &mut bad[page..page + 6] {
            *byte ^= 0xA5;
        }
        let lake = lake_with(
            "interactions/dt=2025-01-02/flipped.parquet",
            None,
            Some(&bad),
        );
        let err = refused_within(
            &lake,
            LIMIT_MB,
            60,
            &[
                "dt=2025-01-02/flipped.parquet",
                "not a readable Parquet file",
            ],
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}

#[test]
fn forged_footers_do_not_allocate_what_they_claim() {
    let (good, _) = good_file();
    let n = good.len();
    // The footer length claims 2 GiB.
    let mut huge_length = good.clone();
    huge_length[n - 8..n - 4].copy_from_slice(&(i32::MAX as u32).to_le_bytes());
    // The footer's thrift is garbage: list and string lengths of any size.
    let footer_len = u32::from_le_bytes(good[n - 8..n - 4].try_into().unwrap()) as usize;
    let mut garbage = good.clone();
    for (i, byte) in garbage[n - 8 - footer_len..n - 8].iter_mut().enumerate() {
        *byte = [0x19, 0xfc, 0xff, 0xff, 0xff, 0x0f][i % 6];
    }
    // Row groups that claim billions of rows and bytes.
    let mut claims = good.clone();
    for window in claims[n - 8 - footer_len..n - 8].chunks_mut(9) {
        if window.len() == 9 && window[0] == 0x16 {
            window[1..9].copy_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        }
    }
    for (case, bytes) in [
        ("length", huge_length),
        ("thrift", garbage),
        ("claims", claims),
    ] {
        let lake = lake_with(
            "interactions/dt=2025-01-02/forged.parquet",
            None,
            Some(&bytes),
        );
        let err = refused_within(&lake, LIMIT_MB, 60, &["dt=2025-01-02/forged.parquet"]);
        assert!(
            err.contains("not a readable Parquet file") || err.contains("invalid input data"),
            "{case}: {err}"
        );
    }
}

#[test]
fn added_and_renamed_columns_between_partitions_are_drift() {
    let ts = || {
        Arc::new(TimestampMicrosecondArray::from(vec![1_735_700_000_000_000]).with_timezone("UTC"))
            as ArrayRef
    };
    let added = batch(vec![
        ("user_id", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
        ("item_id", Arc::new(Int64Array::from(vec![100]))),
        ("timestamp", ts()),
        (
            "rating",
            Arc::new(arrow::array::Float32Array::from(vec![4.0])),
        ),
        ("device", Arc::new(StringArray::from(vec!["tv"]))),
    ]);
    refused(
        &lake_with(
            "interactions/dt=2025-01-02/part-00000.parquet",
            Some(&added),
            None,
        ),
        3,
        &[
            "schema drift",
            "`device`",
            "dt=2025-01-02/part-00000.parquet",
            "dt=2025-01-01/part-00000.parquet",
        ],
    );
    let renamed = batch(vec![
        ("user_id", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
        ("item", Arc::new(Int64Array::from(vec![100]))),
        ("timestamp", ts()),
        (
            "rating",
            Arc::new(arrow::array::Float32Array::from(vec![4.0])),
        ),
    ]);
    refused(
        &lake_with(
            "interactions/dt=2025-01-02/part-00000.parquet",
            Some(&renamed),
            None,
        ),
        3,
        &[
            "dt=2025-01-02/part-00000.parquet",
            "missing required column `item_id`",
        ],
    );
}

#[test]
fn all_null_key_columns_are_refused() {
    let n = 50;
    for name in ["user_id", "item_id"] {
        let column = |which: &str| -> ArrayRef {
            if which == name {
                Arc::new(Int64Array::from(vec![None::<i64>; n]))
            } else {
                Arc::new(Int64Array::from_iter_values(0..n as i64))
            }
        };
        let b = batch(vec![
            ("user_id", column("user_id")),
            ("item_id", column("item_id")),
            (
                "timestamp",
                Arc::new(
                    TimestampMicrosecondArray::from(vec![1_735_700_000_000_000; n])
                        .with_timezone("UTC"),
                ),
            ),
            (
                "rating",
                Arc::new(arrow::array::Float32Array::from(vec![1.0; n])),
            ),
        ]);
        refused(
            &lake_with("interactions/dt=2025-01-02/nulls.parquet", Some(&b), None),
            3,
            &[
                "dt=2025-01-02/nulls.parquet",
                &format!("`{name}` must not be null"),
                &format!("{n} row(s)"),
            ],
        );
    }
}

#[test]
fn traversal_in_names_dates_prefixes_and_urls_is_refused_before_any_io() {
    let lake = TestLake::with_sample();
    let outside = lake.path().join("outside-marker");
    for (args, needle) in [
        (vec!["--set", "name=%2e%2e"], "job name"),
        (vec!["--set", "name=a/b"], "job name"),
        (vec!["--set", "lake.output_prefix=/etc"], "output_prefix"),
        (vec!["--set", "lake.output_prefix=..%2f.."], "output_prefix"),
        (
            vec!["--set", "lake.output_prefix=x/%2E%2E/y"],
            "output_prefix",
        ),
        (
            vec!["--set", "input.interactions=/etc"],
            "input.interactions",
        ),
        (vec!["--set", "input.items=../items"], "input.items"),
    ] {
        let err = fails(&mut lake.run_job("jobs/sample.toml", &args), 2);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    for date in ["2026-11-27%2F..", "../2026-11-27", "/2026-11-27"] {
        let err = fails(
            recdistill()
                .args(["run", "--job"])
                .arg(repo().join("jobs/sample.toml"))
                .arg("--lake")
                .arg(lake.path())
                .args(["--run-date", date]),
            2,
        );
        assert!(err.contains("run date"), "{date}: {err}");
    }
    for url in [
        "s3://bucket/a/../../b",
        "s3://bucket/%2e%2e/b",
        "file:///tmp/x/%2E%2E/y",
        "memory://m/./x",
    ] {
        let err = fails(
            recdistill()
                .args(["run", "--job"])
                .arg(repo().join("jobs/sample.toml"))
                .args(["--lake", url, "--run-date", RUN_DATE]),
            2,
        );
        assert!(err.contains("'..'"), "{url}: {err}");
    }
    assert!(!lake.path().join("recdistill").exists());
    assert!(!outside.exists());
}

#[test]
fn one_user_with_two_million_events_gives_the_right_split_in_bounded_memory() {
    use arrow::array::AsArray;
    let lake = TestLake::with_sample();
    // User 9_999_999 watches items 1..=50 of the sample's catalogue in turn,
    // 2M times, a second apart; the last event is the only test event.
    let n: i64 = 2_000_000;
    let user = Int64Array::from(vec![9_999_999; n as usize]);
    let item: Int64Array = (0..n).map(|k| k % 50 + 1).collect();
    let start = 1_736_000_000_000_000i64;
    let ts = TimestampMicrosecondArray::from_iter_values((0..n).map(|k| start + k * 1_000_000))
        .with_timezone("UTC");
    let heavy = batch(vec![
        ("user_id", Arc::new(user) as ArrayRef),
        ("item_id", Arc::new(item)),
        ("timestamp", Arc::new(ts)),
        (
            "rating",
            Arc::new(arrow::array::Float32Array::from(vec![
                None::<f32>;
                n as usize
            ])),
        ),
    ]);
    let day = lake.path().join("interactions/dt=2025-01-04");
    std::fs::create_dir_all(&day).unwrap();
    write_parquet(&day.join("heavy.parquet"), &heavy);

    let mut child = lake
        .run_job("jobs/sample.toml", &crate::crash::QUICK)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Peak resident memory, sampled until the job ends.
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    while child.try_wait().unwrap().is_none() {
        if let Ok(status) = std::fs::read_to_string(&status_file)
            && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:"))
        {
            let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            peak_kb = peak_kb.max(kb);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peak_mb = peak_kb / 1024;
    eprintln!("peak RSS with a 2M-event user: {peak_mb} MiB");
    assert!(peak_mb < 1500, "peak RSS {peak_mb} MiB");

    // The split: every event kept, the last one the test event, the one
    // before it validation.
    let split = read_all(&lake.run_folder("sample").join("features/split.parquet"));
    let col = |name: &str| split.column(split.schema().index_of(name).unwrap()).clone();
    let users = arrow::compute::cast(&col("user_id"), &arrow::datatypes::DataType::Int64).unwrap();
    let users = users.as_primitive::<arrow::datatypes::Int64Type>();
    let items = arrow::compute::cast(&col("item_id"), &arrow::datatypes::DataType::Int64).unwrap();
    let items = items.as_primitive::<arrow::datatypes::Int64Type>();
    let parts = arrow::compute::cast(&col("split"), &arrow::datatypes::DataType::Utf8).unwrap();
    let parts = parts.as_string::<i32>();
    let times = arrow::compute::cast(&col("timestamp"), &ts_type()).unwrap();
    let times = times.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
    let second = |r: usize| (times.value(r) - start) / 1_000_000;
    let mut count = 0i64;
    let mut test_event = None;
    let mut valid_event = None;
    let mut train_last = -1;
    for r in 0..split.num_rows() {
        if users.value(r) != 9_999_999 {
            continue;
        }
        count += 1;
        match parts.value(r) {
            "test" => test_event = Some((second(r), items.value(r))),
            "valid" => valid_event = Some((second(r), items.value(r))),
            _ => train_last = train_last.max(second(r)),
        }
    }
    assert_eq!(count, n);
    assert_eq!(test_event, Some((n - 1, (n - 1) % 50 + 1)));
    assert_eq!(valid_event, Some((n - 2, (n - 2) % 50 + 1)));
    assert_eq!(train_last, n - 3);
}

#[test]
fn a_split_sql_that_does_not_sort_its_rows_is_refused_before_training() {
    // The split table is read as a sorted stream (its contract's `order`),
    // so a custom split SQL that sorts otherwise must stop the job, not feed
    // the models interleaved users.
    let lake = TestLake::with_sample();
    let sql = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("sql"), sql.path());
    let split = sql.path().join("split_leave_one_out.sql");
    let text = std::fs::read_to_string(&split).unwrap();
    let sorted = "ORDER BY user_index, \"timestamp\", item_index";
    assert!(text.contains(sorted));
    std::fs::write(
        &split,
        text.replace(
            sorted,
            "ORDER BY user_index DESC, \"timestamp\", item_index",
        ),
    )
    .unwrap();
    let dir = format!("features.sql_dir={:?}", sql.path().display().to_string());
    let err = fails(&mut lake.run_job("jobs/sample.toml", &["--set", &dir]), 2);
    for needle in [
        "split table",
        "not sorted by user_index, timestamp, item_index",
        "ORDER BY",
    ] {
        assert!(err.contains(needle), "message lacks {needle:?}:\n{err}");
    }
    assert!(!lake.run_folder("sample").join("_SUCCESS").exists());
    assert!(!lake.run_folder("sample").join("models").exists());
}
