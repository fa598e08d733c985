//! The whole job against a real S3-compatible server: inputs read from and
//! every output written to `s3://`, `recdistill sql` over it, transient
//! faults retried, a store that keeps failing (exit 4, nothing committed),
//! the lineage in `_SUCCESS`, and credentials that never leak.

use std::path::Path;
use std::process::Output;

use sha2::{Digest, Sha256};

use crate::common::*;
use crate::crash::{QUICK, Target, check_folder, outcome, rerun};
use crate::s3server::{ACCESS_KEY, Fault, FaultPlan, ROOT, S3Server, SECRET_KEY};

/// Fails when a sentinel credential appears in `text`.
fn assert_no_secrets(what: &str, text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    for secret in [ACCESS_KEY, SECRET_KEY] {
        assert!(!text.contains(secret), "{what} holds a credential:\n{text}");
    }
}

/// Every object the server holds, checked for the credentials.
fn assert_lake_has_no_secrets(server: &S3Server) {
    for key in server.keys() {
        let bytes = std::fs::read(server.bucket_dir().join(&key)).unwrap();
        assert_no_secrets(&key, &bytes);
    }
}

fn output_of(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_job_reads_and_writes_s3_and_sql_queries_it() {
    let target = Target::s3();
    let Target::S3(server) = &target else {
        unreachable!()
    };
    let out = target
        .run(&["--log-format", "json"])
        .output()
        .expect("binary runs");
    assert!(out.status.success(), "{}", output_of(&out));
    assert_no_secrets("stdout", &out.stdout);
    assert_no_secrets("json logs", &out.stderr);
    assert!(check_folder(&target.folder()));

    // Every key lies under the lake root.
    let keys = server.keys();
    assert!(keys.len() > 30, "{keys:?}");
    for key in &keys {
        assert!(
            key.starts_with(&format!("{ROOT}/")),
            "{key} is outside the root"
        );
    }
    assert_lake_has_no_secrets(server);

    // The same job on a local lake gives the same results.
    let local = Target::local();
    ok(&mut local.run(&[]));
    let s3_values = evaluation_values(&target.folder());
    assert_eq!(s3_values, evaluation_values(&local.folder()));
    for name in files_under(&local.folder().join("recommendations")) {
        assert_eq!(
            read_all(&local.folder().join("recommendations").join(&name)),
            read_all(&target.folder().join("recommendations").join(&name)),
            "{name}"
        );
    }

    // Lineage: what is needed to reproduce the run.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.folder().join("_SUCCESS")).unwrap()).unwrap();
    assert_eq!(manifest["seed"], 42);
    assert_eq!(manifest["config_hash"].as_str().unwrap().len(), 64);
    assert_eq!(manifest["config"]["seed"], 42);
    assert_eq!(manifest["tool"]["version"], env!("CARGO_PKG_VERSION"));
    let lock = std::fs::read(repo().join("Cargo.lock")).unwrap();
    assert_eq!(
        manifest["tool"]["cargo_lock_sha256"],
        hex::encode(Sha256::digest(&lock))
    );
    let inputs = manifest["input_fingerprint"]["files"].as_array().unwrap();
    let on_disk = files_under(&server.lake_dir().join("interactions")).len()
        + files_under(&server.lake_dir().join("items")).len();
    assert_eq!(inputs.len(), on_disk);
    for file in inputs {
        let path = file["path"].as_str().unwrap();
        let size = std::fs::metadata(server.lake_dir().join(path))
            .unwrap()
            .len();
        assert_eq!(file["size"].as_u64(), Some(size), "{path}");
        assert!(
            file["etag"].as_str().is_some_and(|e| !e.is_empty()),
            "{path} has no etag"
        );
    }

    // Ad hoc SQL over the S3 lake.
    let out = ok(&mut target.command(&[
        "sql",
        "SELECT COUNT(DISTINCT model) AS models FROM evaluation",
        "--format",
        "csv",
    ]));
    let models: usize = out.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(models >= 8, "{out}");
}

#[test]
fn transient_faults_are_retried_and_change_nothing() {
    let target = Target::s3();
    let Target::S3(server) = &target else {
        unreachable!()
    };
    rerun(&target);
    let reference = outcome(&target.folder());

    // Every 4th request fails: 503, 429, a dropped connection, or an
    // answer slower than the request timeout.
    server.set_plan(FaultPlan {
        every: 4,
        cycle: vec![
            Fault::Unavailable,
            Fault::TooMany,
            Fault::Reset,
            Fault::Slow,
        ],
        slow_ms: 2_500,
        ..FaultPlan::default()
    });
    let before = server.injected();
    let out = target
        .run(&[
            "--set",
            "lake.max_retries=6",
            "--set",
            "lake.request_timeout_s=1",
            "--log-format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_of(&out));
    let injected = server.injected() - before;
    assert!(injected >= 20, "only {injected} faults injected");
    assert_no_secrets("json logs", &out.stderr);
    assert!(check_folder(&target.folder()));
    assert_eq!(outcome(&target.folder()), reference);
    eprintln!("faults injected and survived: {injected}");
}

#[test]
fn a_store_that_keeps_failing_exits_4_with_nothing_committed() {
    let target = Target::s3();
    let Target::S3(server) = &target else {
        unreachable!()
    };
    // Writes fail for good after the first few (the lease, the first outputs).
    server.set_plan(FaultPlan {
        writes_fail_after: Some(6),
        ..FaultPlan::default()
    });
    for format in ["text", "json"] {
        let out = target
            .run(&["--set", "lake.max_retries=2", "--log-format", format])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(4), "{}", output_of(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("storage I/O failed"), "{stderr}");
        assert!(stderr.contains("s3://"), "names the object: {stderr}");
        assert_no_secrets("stderr", &out.stderr);
        assert!(!target.folder().join("_SUCCESS").exists());
        check_folder(&target.folder());
        // The failed run could not release its lease; let it expire.
        std::thread::sleep(std::time::Duration::from_millis(2_100));
        server.set_plan(FaultPlan {
            writes_fail_after: Some(0),
            ..FaultPlan::default()
        });
    }
    assert_lake_has_no_secrets(server);
}

#[test]
fn refused_credentials_and_timeouts_never_show_the_secrets() {
    let server = S3Server::start();
    server.seed_sample();
    let job = repo().join("jobs/sample.toml");
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let mut cmd = server.command();
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.arg("run")
            .arg("--job")
            .arg(&job)
            .args(["--lake", &server.lake_url(), "--run-date", RUN_DATE])
            .args(QUICK)
            .args(extra)
            .output()
            .unwrap()
    };
    // A wrong secret: the server answers 403.
    for format in ["text", "json"] {
        let out = run(
            &["--log-format", format],
            &[("AWS_SECRET_ACCESS_KEY", "SENTINEL-wrong-secret-00000000")],
        );
        assert_eq!(out.status.code(), Some(2), "{}", output_of(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("access refused"), "{stderr}");
        assert_no_secrets("stderr", &out.stderr);
        assert!(!stderr.contains("SENTINEL-wrong-secret"), "{stderr}");
    }
    // Every answer slower than the request timeout.
    server.set_plan(FaultPlan {
        every: 1,
        cycle: vec![Fault::Slow],
        slow_ms: 3_000,
        ..FaultPlan::default()
    });
    for format in ["text", "json"] {
        let out = run(
            &[
                "--set",
                "lake.request_timeout_s=1",
                "--set",
                "lake.max_retries=1",
                "--log-format",
                format,
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(4), "{}", output_of(&out));
        assert_no_secrets("stderr", &out.stderr);
        assert_no_secrets("stdout", &out.stdout);
    }
    assert!(!Path::new(&server.lake_dir().join("recdistill")).exists());
}
