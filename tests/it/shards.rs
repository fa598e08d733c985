//! `recdistill stage soft-labels|evaluate --shard I/N`: the parts, joined by
//! the next stage, equal an unsharded run byte for byte; a missing or
//! doubled part is refused; a shard killed mid-write leaves no part, and
//! its rerun equals a clean one.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::crash::{QUICK, Target};
use crate::s3server::FaultPlan;

/// Settings both runs share: the quick job, 32-user evaluation batches (so
/// the sample's 300 test users make 10 of them) and a timed shard 0.
fn settings() -> Vec<&'static str> {
    let mut args = QUICK.to_vec();
    args.extend([
        "--set",
        "evaluation.batch_users=32",
        "--set",
        "evaluation.latency_users=5",
    ]);
    args
}

/// `recdistill stage NAME [--shard I/N]` of the quick job against `lake`.
fn stage(target: &Target, name: &str, shard: Option<&str>) -> Command {
    let job = repo().join("jobs/sample.toml").display().to_string();
    let mut cmd = target.command(&["stage", name, "--job", &job, "--run-date", RUN_DATE]);
    cmd.args(settings());
    if let Some(shard) = shard {
        cmd.args(["--shard", shard]);
    }
    cmd
}

fn bytes(folder: &Path, rel: &str) -> Vec<u8> {
    std::fs::read(folder.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn sharded_soft_labels_and_evaluate_equal_an_unsharded_run() {
    let whole = Target::local();
    ok(&mut whole.run(&settings()[QUICK.len()..]));
    let sharded = Target::local();
    let run = |name: &str, shard: Option<&str>| ok(&mut stage(&sharded, name, shard));
    let refused = |name: &str, shard: Option<&str>| fails(&mut stage(&sharded, name, shard), 2);

    for name in ["features", "baselines", "teacher"] {
        run(name, None);
    }
    let err = refused("teacher", Some("0/2"));
    assert!(err.contains("takes no --shard"), "{err}");
    let err = refused("soft-labels", Some("2/2"));
    assert!(err.contains("0 <= I < N"), "{err}");

    // Shards in any order; the sample's 300 users are 5 batches of 64.
    run("soft-labels", Some("2/3"));
    run("soft-labels", Some("0/3"));
    let err = refused("distill", None);
    assert!(
        err.contains("missing part 1/3") && err.contains("--shard 1/3"),
        "{err}"
    );
    // A part of another sharding holds users the others hold too.
    run("soft-labels", Some("0/2"));
    run("soft-labels", Some("1/3"));
    let err = refused("distill", None);
    assert!(err.contains("2 shardings"), "{err}");
    let folder = sharded.folder();
    std::fs::remove_file(folder.join("_stages/soft-labels.parts/00000-of-00002.json")).unwrap();

    run("distill", None);
    let left: Vec<String> = files_under(&folder)
        .into_iter()
        .filter(|f| f.starts_with("_parts/") || f.contains(".parts/"))
        .collect();
    assert!(left.is_empty(), "the gather removes the parts: {left:?}");
    run("compress", None);
    // Three evaluation shards of 10 batches; commit gathers them.
    for shard in ["1/3", "2/3"] {
        run("evaluate", Some(shard));
    }
    let err = refused("commit", None);
    assert!(err.contains("missing part 0/3"), "{err}");
    run("evaluate", Some("0/3"));
    run("commit", None);

    let reference = whole.folder();
    assert!(folder.join("_SUCCESS").is_file());
    let files = files_under(&reference);
    let compared: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("soft_labels/") || f.starts_with("recommendations/"))
        .collect();
    // Model cards name their lake's soft-label URL; the files they score
    // and label with are compared instead (the assistant's soft labels
    // come from the assistant trained on the gathered teacher labels).
    assert!(
        compared
            .iter()
            .filter(|f| f.starts_with("soft_labels/"))
            .count()
            >= 2
    );
    assert!(
        compared
            .iter()
            .filter(|f| f.starts_with("recommendations/"))
            .count()
            >= 4
    );
    for f in compared {
        if f == "soft_labels/assistant.parquet" {
            // Its metadata holds the assistant's checksum, which covers
            // its card; its rows must agree.
            assert_eq!(
                read_all(&reference.join(f)),
                read_all(&folder.join(f)),
                "{f}"
            );
        } else {
            assert!(bytes(&reference, f) == bytes(&folder, f), "{f} differs");
        }
    }
    assert_eq!(files_under(&reference), files_under(&folder));
    assert_eq!(evaluation_values(&reference), evaluation_values(&folder));
    // Shard 0 timed every model, as the unsharded stage does.
    let timed = all_evaluation_values(&folder)
        .into_iter()
        .filter(|(_, metric, _, _)| metric == "users_per_s")
        .count();
    let models = files_under(&folder.join("recommendations")).len();
    assert_eq!(timed, models);
}

/// The part a shard leaves is whole or absent: no record, or a record whose
/// file is there with its size and checksum.
fn part_is_whole_or_absent(folder: &Path, shard: &str) -> bool {
    let record = folder.join(format!("_stages/soft-labels.parts/{shard}.json"));
    let Ok(text) = std::fs::read(&record) else {
        return false;
    };
    let record: serde_json::Value = serde_json::from_slice(&text).unwrap();
    for output in record["outputs"].as_array().unwrap() {
        let path = folder.join(output["path"].as_str().unwrap());
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(bytes.len() as u64, output["size"].as_u64().unwrap());
        use sha2::{Digest, Sha256};
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            output["sha256"].as_str().unwrap()
        );
    }
    true
}

/// Runs `cmd` until it succeeds, waiting out the lease (2 s) of a killed run.
fn until_done(mut cmd: impl FnMut() -> Command) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cmd().output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        match out.status.code() {
            Some(0) => return,
            Some(5) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(300)),
            code => panic!("exited {code:?}:\n{stderr}"),
        }
    }
}

#[test]
fn a_shard_killed_mid_write_leaves_no_part_and_its_rerun_equals_a_clean_one() {
    let target = Target::s3();
    let Target::S3(server) = &target else {
        unreachable!()
    };
    for name in ["features", "baselines", "teacher"] {
        ok(&mut stage(&target, name, None));
    }
    ok(&mut stage(&target, "soft-labels", Some("0/2")));
    // A clean run of shard 1/2, counting its writes.
    server.set_plan(FaultPlan::default());
    ok(&mut stage(&target, "soft-labels", Some("1/2")));
    let writes = server.writes();
    let folder = target.folder();
    let part = "_parts/soft-labels/00001-of-00002/soft_labels/teacher.parquet";
    let clean = bytes(&folder, part);
    assert!(part_is_whole_or_absent(&folder, "00001-of-00002"));

    // Killed while each of its writes is in flight.
    let mut killed = 0;
    for n in 1..=writes {
        server.set_plan(FaultPlan {
            hold_write: Some(n),
            ..FaultPlan::default()
        });
        let mut child = stage(&target, "soft-labels", Some("1/2"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server.holding() && child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "write {n} never came");
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        killed += server.holding() as usize;
        server.set_plan(FaultPlan::default());
        // Whatever the moment, the part is whole or absent: a gather now
        // either refuses the missing part or joins whole parts.
        if !part_is_whole_or_absent(&folder, "00001-of-00002") {
            let err = fails(&mut stage(&target, "distill", None), 2);
            assert!(err.contains("missing part 1/2"), "write {n}: {err}");
        }
        until_done(|| stage(&target, "soft-labels", Some("1/2")));
        assert_eq!(
            bytes(&folder, part),
            clean,
            "rerun after a kill at write {n}"
        );
    }
    assert!(killed >= 3, "only {killed} of {writes} writes were held");
    ok(&mut stage(&target, "distill", None));
}
