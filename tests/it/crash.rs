//! Crash safety: the job SIGKILLed at 20 moments across every stage
//! (including while an object's bytes are in flight), against a local lake
//! and the S3 server; after each kill the run folder holds no false commit
//! and no half-written object, and a rerun equals an uninterrupted run.
//! Concurrent runs of one run date: exactly one commits. `gc` cleans up.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::common::*;
use crate::s3server::{FaultPlan, S3Server};

/// A small but complete job: every stage runs and writes, in seconds.
pub const QUICK: [&str; 30] = [
    "--set",
    "models.meanpool.epochs=2",
    "--set",
    "models.teacher.epochs=4",
    "--set",
    "models.teacher.content=false",
    "--set",
    "features.item_content_sql=\"\"",
    "--set",
    "distill.losses=[\"kl\"]",
    "--set",
    "distill.assistants=[{name=\"assistant\", d_model=16, layers=1, heads=2, ffn=16, max_len=20, batch_size=64, lr=0.005, epochs=2, patience=5}]",
    "--set",
    "distill.student.epochs=3",
    "--set",
    "compress.variants=[\"int8\",\"prune-structured-0.5\"]",
    "--set",
    "compress.recovery_epochs=1",
    "--set",
    "evaluation.latency_users=0",
    "--set",
    "lake.lease_s=2",
    "--set",
    "lake.max_retries=3",
    "--set",
    "lake.retry_backoff_ms=20",
    "--set",
    "lake.retry_backoff_max_ms=200",
    "--set",
    "lake.request_timeout_s=5",
];

/// The stages in the order the job logs their start.
const STAGES: [&str; 8] = [
    "features",
    "baselines",
    "teacher",
    "soft-labels",
    "distill",
    "compress",
    "evaluate",
    "commit",
];

/// Where a run goes: a local folder or the S3 server.
pub enum Target {
    Local(TestLake),
    S3(S3Server),
}

impl Target {
    pub fn local() -> Target {
        Target::Local(TestLake::with_sample())
    }

    pub fn s3() -> Target {
        let server = S3Server::start();
        server.seed_sample();
        Target::S3(server)
    }

    /// `recdistill run` of the quick job with `extra` arguments.
    pub fn run(&self, extra: &[&str]) -> Command {
        let (mut cmd, lake) = match self {
            Target::Local(lake) => (recdistill(), lake.path().display().to_string()),
            Target::S3(server) => (server.command(), server.lake_url()),
        };
        cmd.arg("run")
            .arg("--job")
            .arg(repo().join("jobs/sample.toml"))
            .args(["--lake", &lake, "--run-date", RUN_DATE])
            .args(QUICK)
            .args(extra);
        cmd
    }

    /// Any other command against the lake (`gc`, `sql`).
    pub fn command(&self, args: &[&str]) -> Command {
        let (mut cmd, lake) = match self {
            Target::Local(lake) => (recdistill(), lake.path().display().to_string()),
            Target::S3(server) => (server.command(), server.lake_url()),
        };
        cmd.args(args).args(["--lake", &lake]);
        cmd
    }

    /// The lake root on disk.
    pub fn root(&self) -> PathBuf {
        match self {
            Target::Local(lake) => lake.path().to_path_buf(),
            Target::S3(server) => server.lake_dir(),
        }
    }

    /// The run folder on disk.
    pub fn folder(&self) -> PathBuf {
        self.root()
            .join("recdistill/sample")
            .join(format!("run_date={RUN_DATE}"))
    }
}

/// Runs until done; a folder still leased by a killed run (exit 5) is
/// retried once its lease (2 s) has expired.
pub fn rerun(target: &Target) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = target.run(&[]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        match out.status.code() {
            Some(0) => return stderr,
            Some(5) if Instant::now() < deadline => {
                assert!(stderr.contains("is in use by run"), "{stderr}");
                std::thread::sleep(Duration::from_millis(500));
            }
            code => panic!("rerun exited {code:?}:\n{stderr}"),
        }
    }
}

/// What a finished run produced that must not depend on interruptions.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    values: Vec<(String, String, i32, f64)>,
    recommendations: BTreeMap<String, Vec<u8>>,
}

pub fn outcome(folder: &Path) -> Outcome {
    let mut recommendations = BTreeMap::new();
    for name in files_under(&folder.join("recommendations")) {
        let bytes = std::fs::read(folder.join("recommendations").join(&name)).unwrap();
        recommendations.insert(name, bytes);
    }
    assert!(!recommendations.is_empty());
    Outcome {
        values: evaluation_values(folder),
        recommendations,
    }
}

/// The promises that hold whenever the job stops: a `_SUCCESS` only with
/// every listed file present with its size and checksum, and every visible
/// file whole. Returns whether the folder is committed.
pub fn check_folder(folder: &Path) -> bool {
    for name in files_under(folder) {
        let path = folder.join(&name);
        if name.contains('#') {
            // A local writer's staging file: not an object, skipped by
            // every listing, removed by the next run or `gc`.
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        if name.ends_with(".parquet") {
            let reader = parquet::file::serialized_reader::SerializedFileReader::new(
                bytes::Bytes::from(bytes),
            );
            assert!(reader.is_ok(), "{name} is not a whole Parquet file");
        } else if name.ends_with(".json") || name == "_SUCCESS" {
            let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&bytes);
            assert!(parsed.is_ok(), "{name} is not whole JSON");
        } else if name.ends_with(".safetensors") {
            assert!(
                safetensors::SafeTensors::deserialize(&bytes).is_ok(),
                "{name} is not a whole safetensors file"
            );
        }
    }
    let success = folder.join("_SUCCESS");
    let Ok(bytes) = std::fs::read(&success) else {
        return false;
    };
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let outputs = manifest["outputs"].as_array().unwrap();
    assert!(!outputs.is_empty());
    for object in outputs {
        let rel = object["path"].as_str().unwrap();
        let bytes = std::fs::read(folder.join(rel))
            .unwrap_or_else(|e| panic!("_SUCCESS lists {rel}, which is missing: {e}"));
        assert_eq!(
            bytes.len() as u64,
            object["size"].as_u64().unwrap(),
            "{rel}"
        );
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            object["sha256"].as_str().unwrap(),
            "{rel}"
        );
    }
    true
}

/// A deterministic stream of numbers in [0, 1).
struct Moments(u64);

impl Moments {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Starts the job with stderr read line by line on a thread.
fn spawn(target: &Target) -> (Child, mpsc::Receiver<String>) {
    spawn_with(target, &[], &[])
}

/// [`spawn`] with `extra` arguments and `env` variables.
fn spawn_with(
    target: &Target,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Child, mpsc::Receiver<String>) {
    let mut child = target
        .run(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    (child, receive)
}

/// Kills `child` `delay` after `stage` starts. Returns false when the job
/// finished first.
fn kill_in_stage(
    child: &mut Child,
    lines: &mpsc::Receiver<String>,
    stage: &str,
    delay: Duration,
) -> bool {
    let marker = format!("stage=\"{stage}\"");
    loop {
        match lines.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.contains("stage started") && line.contains(&marker) => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().unwrap();
                assert!(status.success(), "the job failed before {stage}");
                return false;
            }
        }
    }
    std::thread::sleep(delay);
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    let _ = child.wait();
    !finished
}

/// Kills `child` while it sends its `n`-th write to the S3 server.
fn kill_mid_write(child: &mut Child, server: &S3Server) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !server.holding() {
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    true
}

/// Stage durations of an uninterrupted run, from its manifest.
fn stage_seconds(folder: &Path) -> BTreeMap<String, f64> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("_SUCCESS")).unwrap()).unwrap();
    manifest["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["seconds"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// 20 kills against `target`; returns how many landed before the job ended.
fn kills_survived(target: &Target, seed: u64) -> usize {
    let reference_stderr = rerun(target);
    assert!(check_folder(&target.folder()), "{reference_stderr}");
    let reference = outcome(&target.folder());
    let seconds = stage_seconds(&target.folder());
    eprintln!("stage seconds of an uninterrupted run: {seconds:?}");
    let writes = match target {
        Target::S3(server) => {
            // Count the writes of one whole run to choose mid-write moments.
            server.set_plan(FaultPlan::default());
            rerun(target);
            server.writes()
        }
        Target::Local(_) => 0,
    };
    let mut moments = Moments(seed);
    let mut killed = 0;
    for i in 0..20 {
        let stage = STAGES[i % STAGES.len()];
        let (mut child, lines);
        let landed = match target {
            Target::S3(server) if i % 2 == 1 => {
                // Hold a write chosen at random and kill the job while it is in flight.
                let n = 1 + (moments.next() * writes as f64) as usize;
                server.set_plan(FaultPlan {
                    hold_write: Some(n),
                    ..FaultPlan::default()
                });
                // Keep reading stderr: a closed pipe would end the job early.
                (child, lines) = spawn(target);
                let landed = kill_mid_write(&mut child, server);
                drop(lines);
                landed
            }
            _ => {
                if let Target::S3(server) = target {
                    server.set_plan(FaultPlan::default());
                }
                let span = seconds.get(stage).copied().unwrap_or(0.05).max(0.05);
                let delay = Duration::from_secs_f64(span * moments.next());
                (child, lines) = spawn(target);
                kill_in_stage(&mut child, &lines, stage, delay)
            }
        };
        if let Target::S3(server) = target {
            server.set_plan(FaultPlan::default());
        }
        if landed {
            killed += 1;
        }
        let moment = match target {
            Target::S3(_) if i % 2 == 1 => "a write in flight".to_string(),
            _ => format!("in {stage}"),
        };
        eprintln!("kill {i} ({moment}): landed before the end: {landed}");
        // Whatever the moment: no false commit, nothing half-written visible.
        check_folder(&target.folder());
        rerun(target);
        assert!(
            check_folder(&target.folder()),
            "kill {i}: rerun did not commit"
        );
        assert_eq!(
            outcome(&target.folder()),
            reference,
            "kill {i} ({moment}): the rerun differs from an uninterrupted run"
        );
        if let Target::Local(lake) = target {
            let leftovers: Vec<String> = files_under(lake.path())
                .into_iter()
                .filter(|f| f.contains('#'))
                .collect();
            assert!(leftovers.is_empty(), "the rerun left {leftovers:?}");
        }
    }
    killed
}

#[test]
fn twenty_kills_on_a_local_lake() {
    let target = Target::local();
    let killed = kills_survived(&target, 0x5eed_0001);
    assert!(
        killed >= 15,
        "only {killed} of 20 kills landed before the job ended"
    );
}

#[test]
fn twenty_kills_on_the_s3_server() {
    let target = Target::s3();
    let killed = kills_survived(&target, 0x5eed_0002);
    assert!(
        killed >= 15,
        "only {killed} of 20 kills landed before the job ended"
    );
}

/// A run killed on this host is taken over by an immediate rerun, without
/// waiting out its lease; one killed on another host (its lease names that
/// host) holds the folder until the lease expires.
#[test]
fn a_killed_run_is_taken_over_at_once_on_its_own_host_only() {
    const LEASE: [&str; 2] = ["--set", "lake.lease_s=60"];
    for host in [None, Some("another-host")] {
        let target = Target::local();
        let env: Vec<(&str, &str)> = host.map(|h| ("HOSTNAME", h)).into_iter().collect();
        let (mut child, lines) = spawn_with(&target, &LEASE, &env);
        assert!(kill_in_stage(&mut child, &lines, "teacher", Duration::ZERO));
        assert_eq!(
            files_under(&target.folder().join("_lease")).len(),
            1,
            "the killed run's lease is left behind"
        );
        let mut again = target.run(&LEASE);
        match host {
            None => {
                ok(&mut again);
                assert!(check_folder(&target.folder()));
                assert!(target.folder().join("_SUCCESS").is_file());
            }
            Some(other) => {
                let err = fails(&mut again, 5);
                assert!(
                    err.contains("is in use by run") && err.contains(other),
                    "{err}"
                );
            }
        }
    }
}

/// Two runs of one job and run date at once: exactly one commits, the other
/// exits 5 having written nothing; the committed run is whole.
fn concurrent_runs(target: &Target) {
    rerun(target);
    let reference = outcome(&target.folder());
    for _ in 0..2 {
        let a = target.run(&[]).stderr(Stdio::piped()).spawn().unwrap();
        let b = target.run(&[]).stderr(Stdio::piped()).spawn().unwrap();
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let codes = [a.status.code(), b.status.code()];
        let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            codes.contains(&Some(0)) && codes.contains(&Some(5)),
            "{codes:?}\n{}\n{}",
            stderr(&a),
            stderr(&b)
        );
        let loser = if a.status.code() == Some(5) { &a } else { &b };
        assert!(
            stderr(loser).contains("is in use by run"),
            "{}",
            stderr(loser)
        );
        assert!(check_folder(&target.folder()));
        assert_eq!(outcome(&target.folder()), reference);
    }
    // A run arriving while another holds the folder leaves the committed run alone.
    let before = std::fs::read(target.folder().join("_SUCCESS")).unwrap();
    let holder = target.run(&[]).stderr(Stdio::null()).spawn().unwrap();
    let lease_dir = target.folder().join("_lease");
    let deadline = Instant::now() + Duration::from_secs(30);
    while files_under(&lease_dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The holder deletes _SUCCESS right after taking the lease: check the
    // newcomer against what is there now.
    let late = fails(&mut target.run(&[]), 5);
    assert!(late.contains("is in use by run"), "{late}");
    let holder = holder.wait_with_output().unwrap();
    assert!(holder.status.success());
    assert!(check_folder(&target.folder()));
    assert_eq!(outcome(&target.folder()), reference);
    assert_ne!(
        before,
        std::fs::read(target.folder().join("_SUCCESS")).unwrap()
    );
}

#[test]
fn concurrent_runs_on_a_local_lake() {
    concurrent_runs(&Target::local());
}

#[test]
fn concurrent_runs_on_the_s3_server() {
    concurrent_runs(&Target::s3());
}

#[test]
fn gc_removes_what_killed_runs_left() {
    let target = Target::local();
    rerun(&target);
    let folder = target.folder();
    let root = target.root();
    // Leftovers: a half-written file, an object the manifest does not list,
    // an uncommitted run of another day, and a folder a live run holds.
    std::fs::write(folder.join("models/meanpool/model.safetensors#1"), b"half").unwrap();
    std::fs::write(folder.join("recommendations/stray.parquet"), b"stray").unwrap();
    let other = root.join("recdistill/sample/run_date=2026-11-20");
    std::fs::create_dir_all(other.join("features")).unwrap();
    std::fs::write(other.join("features/split.parquet"), b"partial").unwrap();
    let busy = root.join("recdistill/sample/run_date=2026-11-21/_lease");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(
        busy.join("00000000000000000001.json"),
        serde_json::json!({
            "generation": 1, "run_id": "live", "host": "h", "pid": 1, "purpose": "run",
            "acquired_at": "2026-11-28T00:00:00Z", "expires_at": "2999-01-01T00:00:00Z"
        })
        .to_string(),
    )
    .unwrap();

    let report = ok(&mut target.command(&["gc", "--dry-run"]));
    assert!(report.contains("half-written file found"), "{report}");
    assert!(report.contains("stray.parquet"), "{report}");
    assert!(report.contains("run_date=2026-11-20"), "{report}");
    assert!(report.contains("in use, skipped"), "{report}");
    assert!(folder.join("recommendations/stray.parquet").exists());

    let report = ok(&mut target.command(&["gc"]));
    assert!(report.contains("half-written file removed"), "{report}");
    assert!(
        report.contains("uncommitted run kept (pass --uncommitted to remove)"),
        "{report}"
    );
    assert!(!folder.join("models/meanpool/model.safetensors#1").exists());
    assert!(!folder.join("recommendations/stray.parquet").exists());
    assert!(
        other.join("features/split.parquet").exists(),
        "kept without --uncommitted"
    );
    assert!(check_folder(&folder));
    assert!(files_under(&folder.join("_lease")).is_empty());

    let report = ok(&mut target.command(&["gc", "--uncommitted"]));
    assert!(report.contains("uncommitted run removed"), "{report}");
    assert!(!other.exists(), "empty folders are removed too");
    assert!(busy.join("00000000000000000001.json").exists());
    assert!(check_folder(&folder));
}
