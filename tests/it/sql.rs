//! `recdistill sql`: ad hoc, read-only queries over inputs and the latest run.

use std::io::Write;
use std::process::Stdio;

use crate::common::*;

fn sql(lake: &TestLake, query: &str, format: &str) -> std::process::Command {
    let mut cmd = recdistill();
    cmd.args(["sql", query, "--lake"])
        .arg(lake.path())
        .args(["--format", format]);
    cmd
}

#[test]
fn queries_inputs_features_and_results_and_refuses_writes() {
    let lake = TestLake::with_sample();
    // Before any run: the input tables.
    let out = ok(&mut sql(
        &lake,
        "SELECT COUNT(*) AS n FROM interactions",
        "csv",
    ));
    let events: usize = out.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(events > 1000, "{out}");

    ok(&mut lake.run_job("jobs/sample.toml", &[]));
    let out = ok(&mut sql(&lake, "SELECT COUNT(*) AS n FROM split", "csv"));
    assert_eq!(
        out.lines().nth(1).unwrap().trim(),
        events.to_string(),
        "every event is in split"
    );

    let out = ok(&mut sql(
        &lake,
        "SELECT model, value FROM evaluation WHERE metric = 'ndcg' AND k = 10 ORDER BY model",
        "json",
    ));
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Four baselines, teachers, the assistant, 7 students and 7 compressed variants.
    assert_eq!(rows.len(), 21);
    assert_eq!(rows[0]["model"], "assistant");
    assert_eq!(rows[1]["model"], "cooccurrence");
    assert_eq!(rows[2]["model"], "meanpool");
    assert_eq!(rows[19]["model"], "teacher-content");
    assert_eq!(rows[20]["model"], "transitions");

    let out = ok(&mut sql(
        &lake,
        "SELECT model, COUNT(DISTINCT user_id) AS users FROM recommendations GROUP BY model ORDER BY model",
        "table",
    ));
    assert!(
        out.contains("meanpool") && out.contains("popularity"),
        "{out}"
    );

    // Same answer as a Parquet file.
    let file = lake.path().join("answer.parquet");
    ok(sql(&lake, "SELECT * FROM stats", "parquet")
        .arg("--out")
        .arg(&file));
    assert_eq!(read_all(&file).num_rows(), 10);

    for statement in [
        "CREATE TABLE t AS SELECT 1",
        "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/etc/'",
        "INSERT INTO split SELECT * FROM split",
        "DROP TABLE split",
        "COPY (SELECT 1) TO '/tmp/recdistill-copy-test.parquet'",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let err = fails(&mut sql(&lake, statement, "table"), 2);
        assert!(err.contains("read-only"), "{statement}: {err}");
    }
    assert!(!std::path::Path::new("/tmp/recdistill-copy-test.parquet").exists());

    // Table functions and paths that would read local files are not tables here.
    let secret = lake.path().join("secret.csv");
    std::fs::write(&secret, "user,password\nroot,SENTINEL-file-content\n").unwrap();
    let secret = secret.display().to_string();
    for statement in [
        format!("SELECT * FROM read_csv('{secret}')"),
        format!("SELECT * FROM read_parquet('{secret}')"),
        format!("SELECT * FROM read_json('{secret}')"),
        format!("SELECT * FROM '{secret}'"),
        format!("SELECT * FROM 'file://{secret}'"),
        format!("CREATE EXTERNAL TABLE s STORED AS CSV LOCATION '{secret}'"),
    ] {
        let err = fails(&mut sql(&lake, &statement, "csv"), 2);
        assert!(!err.contains("SENTINEL-file-content"), "{statement}: {err}");
    }
}

#[test]
fn interactive_mode_reads_statements_from_stdin() {
    let lake = TestLake::with_sample();
    let mut child = recdistill()
        .args(["sql", "--format", "csv", "--lake"])
        .arg(lake.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SELECT 41 + 1 AS answer;\nDROP TABLE interactions;\nSELECT\n  COUNT(DISTINCT user_id) AS users\nFROM interactions;\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("answer\n42"), "{stdout}");
    assert!(stdout.contains("users\n300"), "{stdout}");
    assert!(stderr.contains("read-only"), "{stderr}");
}
