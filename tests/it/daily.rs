//! Daily runs: a run for date D reads only the `dt=` partitions up to D
//! (within `input.window_days`), records those bounds, and a backfill made
//! after later days landed equals the run made on day D. With warm start,
//! each learned model begins from the earlier run's model of its name.

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
    // Warm start is on: the run on DAY has no earlier run, nor has its
    // backfill, though later runs may exist by then.
    ok(&mut run_on(on_the_day.path(), DAY, &WARM));
    ok(&mut run_on(later.path(), DAY, &WARM));

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

    assert!(
        card(&backfill, "teacher")
            .get("warm_started_from")
            .is_none()
    );

    // The latest day's run sees the later days, and starts from the run on
    // DAY, its fine-tune bounded by warm_start.epochs.
    let mut warm_latest = WARM.to_vec();
    warm_latest.extend(["--set", "warm_start.epochs=2"]);
    ok(&mut run_on(later.path(), "2025-04-05", &warm_latest));
    let latest = manifest(&folder(later.path(), "2025-04-05"));
    warm_started_from(
        &backfill,
        &folder(later.path(), "2025-04-05"),
        &[
            "meanpool",
            "teacher",
            "assistant",
            "student-scratch",
            "student-kd-teacher-kl",
            "student-kd-assistant-kl",
        ],
    );
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

    // The report charts the job's history: both runs' dates.
    let report =
        std::fs::read_to_string(folder(later.path(), "2025-04-05").join("report.html")).unwrap();
    assert!(
        report.contains("<h2>History</h2>") && report.contains(&format!(">{DAY}</text>")),
        "no history chart in the report"
    );

    // The evaluation shows which models began from which run.
    let warm = query(
        "SELECT model, CAST(warm_started_from AS VARCHAR) AS w FROM evaluation \
         WHERE metric = 'ndcg' AND k = 10 ORDER BY model",
    );
    for line in warm.lines().skip(1) {
        let (model, from) = line.split_once(',').unwrap();
        // The counted baselines are built anew from each run's own data.
        let counted = ["popularity", "transitions", "cooccurrence"];
        let expected = if counted.contains(&model) { "" } else { DAY };
        assert_eq!(from, expected, "{model}: {warm}");
    }
    assert!(warm.contains("student-kd-teacher-kl@int8,"), "{warm}");

    // A from date that is not before the run date: exit 2, nothing written.
    let next = "2025-04-06";
    let mut too_late = WARM.to_vec();
    too_late.extend(["--set", "warm_start.from=\"2025-04-06\""]);
    let err = fails(&mut run_on(later.path(), next, &too_late), 2);
    assert!(err.contains("warm_start.from"), "{err}");
    assert!(!folder(later.path(), next).exists());

    // The teacher's shape changed since the earlier run, and the earlier
    // meanpool file is damaged: both start cold, each with a warning
    // naming why; the run succeeds. A one-week window shrinks the
    // catalogue: the other models keep the rows of the items still in it.
    let earlier = folder(later.path(), "2025-04-05");
    let meanpool = earlier.join("models/meanpool/model.safetensors");
    let mut bytes = std::fs::read(&meanpool).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&meanpool, bytes).unwrap();
    let mut changed = WARM.to_vec();
    changed.extend([
        "--set",
        "warm_start.from=\"2025-04-05\"",
        "--set",
        "models.teacher.d_model=16",
        "--set",
        "input.window_days=7",
        "--set",
        "warm_start.epochs=2",
    ]);
    let out = run_on(later.path(), next, &changed).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The warning line that says `why`, naming each of `words`.
    let warned = |why: &str, words: &[&str]| {
        let line = stderr
            .lines()
            .find(|l| l.contains(why))
            .unwrap_or_else(|| panic!("no warning {why:?}: {stderr}"));
        assert!(words.iter().all(|w| line.contains(w)), "{line}");
    };
    warned("changed the model's shape", &["teacher", "d_model"]);
    warned("damaged or unreadable", &["meanpool", "sha256"]);
    let run = folder(later.path(), next);
    assert!(card(&run, "teacher").get("warm_started_from").is_none());
    assert!(card(&run, "meanpool").get("warm_started_from").is_none());
    assert!(item_ids(&run).len() < item_ids(&earlier).len());
    warm_started_from(
        &earlier,
        &run,
        &[
            "assistant",
            "student-scratch",
            "student-kd-teacher-kl",
            "student-kd-assistant-kl",
        ],
    );
}

/// Warm start on, as `jobs/movielens-100k.toml` has it.
const WARM: [&str; 2] = ["--set", "warm_start.enabled=true"];

/// The card stored in a model file of a run folder.
fn card(run: &Path, model: &str) -> serde_json::Value {
    let bytes = std::fs::read(run.join(format!("models/{model}/model.safetensors"))).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let card = &metadata.metadata().as_ref().unwrap()["recdistill.model"];
    serde_json::from_str(card).unwrap()
}

/// The item ids of a run's catalogue, as text.
fn item_ids(run: &Path) -> std::collections::BTreeSet<String> {
    let map = read_all(&run.join("features/item_map.parquet"));
    let ids = arrow::compute::cast(
        map.column_by_name("item_id").unwrap(),
        &arrow::datatypes::DataType::Utf8,
    )
    .unwrap();
    let ids = ids
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .unwrap();
    ids.iter().map(|id| id.unwrap().to_string()).collect()
}

/// Checks that each of `models` in run folder `later` began from the model
/// of the same name in run folder `earlier`: its card names that run, the
/// file's SHA-256 as that run's manifest lists it, and the items kept,
/// added and dropped between the two catalogues; and that popularity,
/// which is not learned, has no such entry.
fn warm_started_from(earlier: &Path, later: &Path, models: &[&str]) {
    let listed = manifest(earlier);
    let (before, after) = (item_ids(earlier), item_ids(later));
    let kept = before.intersection(&after).count() as u64;
    assert!(kept > 0);
    for model in models {
        let card = card(later, model);
        let from = &card["warm_started_from"];
        assert_eq!(from["run_id"], listed["run_id"], "{model}: {card}");
        assert_eq!(from["run_date"], listed["run_date"], "{model}");
        assert_eq!(from["model"], *model);
        let path = format!("models/{model}/model.safetensors");
        let sha = listed["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["path"] == path.as_str())
            .map(|o| o["sha256"].clone());
        assert_eq!(Some(from["sha256"].clone()), sha, "{model}");
        assert_eq!(from["kept"], kept, "{model}");
        assert_eq!(from["added"], after.len() as u64 - kept, "{model}");
        assert_eq!(from["dropped"], before.len() as u64 - kept, "{model}");
        // Bounded by warm_start.epochs = 2 (its own cap is larger).
        let history = read_all(&later.join(format!("training/{model}.parquet")));
        assert!(
            history.num_rows() <= 2,
            "{model}: {} epochs",
            history.num_rows()
        );
    }
    assert!(card(later, "popularity").get("warm_started_from").is_none());
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

/// The publish gate: a committed run's model serves from `_PUBLISHED` when
/// it beats popularity and the published run; a refused one exits 6 and
/// changes nothing; `publish --force` promotes by hand (a rollback); a
/// publish repeated after a kill never publishes twice; `gc` keeps the
/// published run.
#[test]
fn the_publish_gate_promotes_good_runs_only_and_never_twice() {
    let lake = TestLake::with_sample();
    let job = lake.path().join("recdistill/sample");
    let publish_teacher = [
        "--set",
        "publish.model=\"teacher\"",
        "--set",
        "publish.min_ratio=0.5",
        "--set",
        "distill.enabled=false",
    ];
    let pointer = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(job.join("_PUBLISHED")).unwrap()).unwrap()
    };
    let log_len = || std::fs::read_dir(job.join("_publish")).unwrap().count();
    let publish = |date: &str, extra: &[&str]| {
        let mut cmd = recdistill();
        cmd.arg("publish")
            .arg("--job")
            .arg(repo().join("jobs/sample.toml"))
            .arg("--lake")
            .arg(lake.path())
            .args(["--run-date", date])
            .args(QUICK)
            .args(publish_teacher)
            .args(extra);
        cmd
    };

    // The first run publishes: its teacher beats popularity.
    let out = ok(&mut run_on(lake.path(), "2025-03-01", &publish_teacher));
    assert!(
        out.contains("published teacher of run 2025-03-01 (generation 1)"),
        "{out}"
    );
    let first = pointer();
    let run = folder(lake.path(), "2025-03-01");
    let listed = manifest(&run)["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["path"] == "models/teacher/model.safetensors")
        .unwrap()
        .clone();
    assert_eq!(first["sha256"], listed["sha256"]);
    assert_eq!(first["run_id"], manifest(&run)["run_id"]);
    let served = lake.path().join(first["model_path"].as_str().unwrap());
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            std::fs::read(served).unwrap()
        )),
        listed["sha256"].as_str().unwrap()
    );
    assert!(
        first["metrics"]["ndcg@10"].as_f64().unwrap()
            > first["metrics"]["popularity_ndcg@10"].as_f64().unwrap()
    );

    // A gate no model can pass: the run commits, exits 6, and the first
    // run's model still serves.
    let err = fails(
        &mut run_on(
            lake.path(),
            "2025-03-02",
            &[&publish_teacher[..], &["--set", "publish.min_ratio=100"]].concat(),
        ),
        6,
    );
    assert!(
        err.contains("not published") && err.contains("below 100"),
        "{err}"
    );
    assert!(folder(lake.path(), "2025-03-02").join("_SUCCESS").exists());
    assert_eq!(pointer(), first);
    assert_eq!(log_len(), 1);

    // By hand, past the gate; then back to the first run (a rollback needs
    // --force too: an earlier date never replaces a later one by itself).
    let out = ok(&mut publish("2025-03-02", &["--force"]));
    assert!(out.contains("(generation 2)"), "{out}");
    assert_eq!(pointer()["forced"], true);
    let out = ok(&mut publish("2025-03-01", &[]));
    assert!(out.contains("later run 2025-03-02 serves"), "{out}");
    assert_eq!(pointer()["run_date"], "2025-03-02");
    ok(&mut publish("2025-03-01", &["--force"]));
    assert_eq!(pointer()["run_date"], "2025-03-01");
    assert_eq!(pointer()["generation"], 3);

    // A run killed between its commit and its publish (here: committed
    // without publishing) is published by the publish its rerun does, once.
    ok(&mut run_on(
        lake.path(),
        "2025-03-03",
        &["--set", "distill.enabled=false"],
    ));
    assert_eq!(pointer()["run_date"], "2025-03-01");
    let out = ok(&mut publish("2025-03-03", &[]));
    assert!(
        out.contains("published teacher of run 2025-03-03 (generation 4)"),
        "{out}"
    );
    // Killed after the log's record, before the pointer: the repeat
    // repairs the pointer and adds no generation.
    let newest = pointer();
    std::fs::remove_file(job.join("_PUBLISHED")).unwrap();
    let out = ok(&mut publish("2025-03-03", &[]));
    assert!(out.contains("already published (generation 4)"), "{out}");
    assert_eq!(pointer(), newest);
    assert_eq!(log_len(), 4);

    // `runs.published` marks the run that serves.
    let published = ok(recdistill()
        .args([
            "sql",
            "SELECT CAST(run_date AS VARCHAR) AS d, published FROM runs ORDER BY run_date",
            "--format",
            "csv",
            "--lake",
        ])
        .arg(lake.path()));
    assert_eq!(
        published.lines().skip(1).collect::<Vec<_>>(),
        vec!["2025-03-01,false", "2025-03-02,false", "2025-03-03,true"],
        "{published}"
    );

    // A killed rerun of the published date leaves it uncommitted: gc
    // removes other uncommitted runs, never that one.
    for date in ["2025-03-02", "2025-03-03"] {
        std::fs::remove_file(folder(lake.path(), date).join("_SUCCESS")).unwrap();
    }
    let report = ok(recdistill()
        .args(["gc", "--uncommitted", "--lake"])
        .arg(lake.path()));
    assert!(report.contains("kept, it is the published one"), "{report}");
    assert!(
        folder(lake.path(), "2025-03-03")
            .join("models/teacher/model.safetensors")
            .exists()
    );
    assert!(!folder(lake.path(), "2025-03-02").exists(), "{report}");

    // Publishing without a model to publish, or a run that is not
    // committed: exit 2.
    let err = fails(
        recdistill()
            .args(["publish", "--run-date", "2025-03-01", "--lake"])
            .arg(lake.path()),
        2,
    );
    assert!(err.contains("publish.model"), "{err}");
    let err = fails(&mut publish("2025-03-02", &[]), 2);
    assert!(err.contains("not a committed run"), "{err}");
}
