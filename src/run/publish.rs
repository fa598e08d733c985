//! Which committed run of a job serves: the publication log and the
//! `_PUBLISHED` pointer.
//!
//! `<prefix>/<job>/_publish/<generation>.json` holds one record per
//! publication. Each is created with a conditional put (`PutMode::Create`:
//! `If-None-Match: *` on S3, preconditions on GCS and Azure, a hard link on
//! a local disk), so two runs that read the same current generation and
//! race for the next cannot both win: the loser reads the winner and judges
//! again. The highest generation is the one that serves.
//!
//! `<prefix>/<job>/_PUBLISHED` is a copy of it for servers to read: one
//! small JSON object naming the run, the model file and its SHA-256. It is
//! rewritten after every publication from the log (never from a record
//! that lost a race), and repaired by the next publish when a run was
//! killed between the two writes.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lake::{CreateOutcome, Lake};

/// Format of a publication record written by this version.
pub const PUBLICATION_FORMAT: u32 = 1;

/// The pointer servers read, in the job's folder.
pub const PUBLISHED: &str = "_PUBLISHED";

/// The publication log's folder, in the job's folder.
const LOG: &str = "_publish";

/// How many times a publish that lost a race reads the winner and tries
/// again.
const RACES: usize = 8;

/// One publication: the run and model that serve from it on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publication {
    /// Record format.
    pub format_version: u32,
    /// Its place in the log: 1 for the job's first publication.
    pub generation: u64,
    /// Job name.
    pub job: String,
    /// Id of the run that committed the model.
    pub run_id: String,
    /// That run's date, `YYYY-MM-DD`.
    pub run_date: String,
    /// Model name, e.g. `student-kd-teacher-rank@int8`.
    pub model: String,
    /// The model file, relative to the lake root.
    pub model_path: String,
    /// The model file's URL.
    pub model_url: String,
    /// SHA-256 of the model file, as its run's manifest lists it.
    pub sha256: String,
    /// Bytes of the model file.
    pub size: u64,
    /// The model's test metrics at 10 (`ndcg@10`, `hr@10`, `mrr@10`) and
    /// popularity's NDCG@10 in the same run (`popularity_ndcg@10`).
    pub metrics: BTreeMap<String, f64>,
    /// Published by hand with `--force`, past the gate.
    pub forced: bool,
    /// Why it was published.
    pub reason: String,
    /// When, RFC 3339.
    pub published_at: String,
}

/// Key of the gate's metric in [`Publication::metrics`].
pub const NDCG_10: &str = "ndcg@10";
/// Key of popularity's NDCG@10 in [`Publication::metrics`].
pub const POPULARITY_NDCG_10: &str = "popularity_ndcg@10";

impl Publication {
    /// Its NDCG@10 (0 when a damaged record has none).
    pub fn ndcg_10(&self) -> f64 {
        self.metrics.get(NDCG_10).copied().unwrap_or(0.0)
    }
}

/// A committed run's model, offered for publication.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its record, with `generation` still to be set.
    pub record: Publication,
    /// Popularity's NDCG@10 in the same run.
    pub popularity_ndcg_10: f64,
}

/// The gate's verdict on a candidate.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Publish it; says why.
    Publish(String),
    /// The same run's same model file already serves: nothing to do.
    AlreadyPublished,
    /// A run of a later date serves; a backfill does not replace it.
    LaterRunServes,
    /// It fails the gate; says why.
    Refused(String),
}

/// Judges `candidate` against what serves now (`current`): published when
/// its NDCG@10 beats popularity's and is at least `min_ratio` × the
/// current one's. A run of an earlier date than the one serving is not
/// published (a backfill is not a promotion); the run that serves, rerun
/// with the same model file, is already published. `force` publishes
/// whatever the numbers and dates say (the way to roll back).
pub fn judge(
    candidate: &Candidate,
    current: Option<&Publication>,
    min_ratio: f64,
    force: bool,
) -> Verdict {
    let record = &candidate.record;
    let ndcg = record.ndcg_10();
    if let Some(current) = current
        && current.run_date == record.run_date
        && current.model == record.model
        && current.sha256 == record.sha256
    {
        return Verdict::AlreadyPublished;
    }
    if force {
        return Verdict::Publish("published by hand (--force)".into());
    }
    if let Some(current) = current
        && current.run_date > record.run_date
    {
        return Verdict::LaterRunServes;
    }
    if ndcg.is_nan() || ndcg <= candidate.popularity_ndcg_10 {
        return Verdict::Refused(format!(
            "{} has NDCG@10 {ndcg:.4}, not above popularity's {:.4}",
            record.model, candidate.popularity_ndcg_10
        ));
    }
    match current {
        None => Verdict::Publish(format!(
            "the job's first publication: NDCG@10 {ndcg:.4} beats popularity's {:.4}",
            candidate.popularity_ndcg_10
        )),
        Some(current) => {
            let floor = min_ratio * current.ndcg_10();
            if ndcg >= floor {
                Verdict::Publish(format!(
                    "NDCG@10 {ndcg:.4} >= {min_ratio} x {:.4} of the run of {} ({floor:.4}), and beats popularity's {:.4}",
                    current.ndcg_10(),
                    current.run_date,
                    candidate.popularity_ndcg_10
                ))
            } else {
                Verdict::Refused(format!(
                    "{} has NDCG@10 {ndcg:.4}, below {min_ratio} x {:.4} of the published run of {} ({floor:.4})",
                    record.model,
                    current.ndcg_10(),
                    current.run_date
                ))
            }
        }
    }
}

/// The job's folder, relative to the lake root.
fn job_folder(output_prefix: &str, job: &str) -> String {
    format!("{}/{job}", output_prefix.trim_matches('/'))
}

/// The publication that serves now: the log's highest generation. `None`
/// when the job has never published. A record that cannot be read is
/// invalid data (exit 3) naming the file: the gate cannot judge without it.
pub async fn current(lake: &Lake, output_prefix: &str, job: &str) -> Result<Option<Publication>> {
    let folder = format!("{}/{LOG}", job_folder(output_prefix, job));
    let base = lake.path(&folder);
    let newest = lake
        .list(&folder)
        .await?
        .iter()
        .filter_map(|o| {
            let name = Lake::relative_to(&base, &o.location);
            let generation: u64 = name.strip_suffix(".json")?.parse().ok()?;
            Some(generation)
        })
        .max();
    let Some(generation) = newest else {
        return Ok(None);
    };
    let rel = format!("{folder}/{}", record_name(generation));
    let bytes = lake.get(&rel).await?;
    let record: Publication = serde_json::from_slice(&bytes).map_err(|e| {
        Error::data(
            lake.url_of(&rel),
            format!("not a publication record ({e}); restore it or publish again with --force"),
        )
    })?;
    if record.generation != generation {
        return Err(Error::data(
            lake.url_of(&rel),
            format!(
                "the record says generation {}, its name {generation}",
                record.generation
            ),
        ));
    }
    Ok(Some(record))
}

fn record_name(generation: u64) -> String {
    format!("{generation:010}.json")
}

fn to_bytes(record: &Publication) -> Result<Bytes> {
    serde_json::to_vec_pretty(record)
        .map(Bytes::from)
        .map_err(|e| Error::internal(format!("publication record: {e}")))
}

/// What [`publish`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Published {
    /// The candidate serves now, at this generation.
    Now(Publication),
    /// It served already (the pointer was checked and repaired if needed).
    Already(Publication),
    /// A later run's model serves; nothing changed.
    LaterRunServes(Publication),
    /// The gate refused it; says why. Nothing changed.
    Refused(String),
}

/// Judges `candidate` against what serves and, if it passes, makes it the
/// next generation of the log, then points `_PUBLISHED` at the log's
/// newest record. A publish that loses the race for a generation reads
/// the winner and judges again against it.
pub async fn publish(
    lake: &Lake,
    output_prefix: &str,
    candidate: &Candidate,
    min_ratio: f64,
    force: bool,
) -> Result<Published> {
    let job = &candidate.record.job;
    for _ in 0..RACES {
        let current = current(lake, output_prefix, job).await?;
        match attempt(lake, output_prefix, candidate, current, min_ratio, force).await? {
            Some(outcome) => return Ok(outcome),
            None => tracing::info!("another run published first; judging again against it"),
        }
    }
    Err(Error::io(
        lake.url_of(&job_folder(output_prefix, job)),
        format!("lost the race to publish {RACES} times in a row; retry"),
    ))
}

/// One try of [`publish`], judging against `current` as read before:
/// `None` when another run created the next generation in between (the
/// race is lost; nothing was written).
async fn attempt(
    lake: &Lake,
    output_prefix: &str,
    candidate: &Candidate,
    current: Option<Publication>,
    min_ratio: f64,
    force: bool,
) -> Result<Option<Published>> {
    let job = &candidate.record.job;
    let reason = match judge(candidate, current.as_ref(), min_ratio, force) {
        Verdict::Publish(reason) => reason,
        Verdict::AlreadyPublished => {
            let current = current.ok_or_else(|| Error::internal("published without a record"))?;
            point_at_newest(lake, output_prefix, job).await?;
            return Ok(Some(Published::Already(current)));
        }
        Verdict::LaterRunServes => {
            let current = current.ok_or_else(|| Error::internal("a later run without a record"))?;
            return Ok(Some(Published::LaterRunServes(current)));
        }
        Verdict::Refused(why) => return Ok(Some(Published::Refused(why))),
    };
    let mut record = candidate.record.clone();
    record.generation = current.map_or(1, |c| c.generation + 1);
    record.reason = reason;
    record.forced = force;
    record.published_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let rel = format!(
        "{}/{LOG}/{}",
        job_folder(output_prefix, job),
        record_name(record.generation)
    );
    match lake.put_create(&rel, to_bytes(&record)?).await? {
        CreateOutcome::Created => {
            point_at_newest(lake, output_prefix, job).await?;
            Ok(Some(Published::Now(record)))
        }
        CreateOutcome::AlreadyExists => Ok(None),
        CreateOutcome::Unsupported => Err(Error::config(format!(
            "{}: the store has no conditional puts, so two runs could both publish; publishing needs a store that has them",
            lake.url()
        ))),
    }
}

/// Makes `_PUBLISHED` a copy of the log's newest record (again, until the
/// newest stops changing under it).
async fn point_at_newest(lake: &Lake, output_prefix: &str, job: &str) -> Result<()> {
    let pointer = format!("{}/{PUBLISHED}", job_folder(output_prefix, job));
    for _ in 0..RACES {
        let Some(newest) = current(lake, output_prefix, job).await? else {
            return Ok(());
        };
        let bytes = to_bytes(&newest)?;
        let same = match lake.head(&pointer).await? {
            Some(_) => lake.get(&pointer).await? == bytes,
            None => false,
        };
        if !same {
            lake.put(&pointer, bytes).await?;
        }
        let after = current(lake, output_prefix, job).await?;
        if after.as_ref().map(|a| a.generation) == Some(newest.generation) {
            return Ok(());
        }
    }
    Ok(())
}

/// The run date that serves now, if any (for `gc` and `recdistill sql`).
pub async fn published_run_date(
    lake: &Lake,
    output_prefix: &str,
    job: &str,
) -> Result<Option<String>> {
    Ok(current(lake, output_prefix, job).await?.map(|p| p.run_date))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(run_date: &str, ndcg: f64, popularity: f64, sha: &str) -> Candidate {
        Candidate {
            record: Publication {
                format_version: PUBLICATION_FORMAT,
                generation: 0,
                job: "j".into(),
                run_id: format!("run-{run_date}"),
                run_date: run_date.into(),
                model: "student@int8".into(),
                model_path: format!(
                    "recdistill/j/run_date={run_date}/models/student@int8/model.safetensors"
                ),
                model_url: String::new(),
                sha256: sha.into(),
                size: 10,
                metrics: BTreeMap::from([(NDCG_10.to_string(), ndcg)]),
                forced: false,
                reason: String::new(),
                published_at: String::new(),
            },
            popularity_ndcg_10: popularity,
        }
    }

    fn served(c: &Candidate, generation: u64) -> Publication {
        Publication {
            generation,
            ..c.record.clone()
        }
    }

    #[test]
    fn the_gate_compares_with_popularity_and_the_published_run() {
        let first = candidate("2025-01-01", 0.30, 0.10, "a");
        assert!(matches!(
            judge(&first, None, 0.97, false),
            Verdict::Publish(_)
        ));
        // Not above popularity: refused, even as the first.
        let weak = candidate("2025-01-01", 0.10, 0.10, "a");
        let Verdict::Refused(why) = judge(&weak, None, 0.97, false) else {
            panic!()
        };
        assert!(why.contains("popularity"), "{why}");
        let current = served(&first, 1);
        // 0.97 x 0.30 = 0.291: 0.291 passes, 0.29 does not.
        let equal_floor = candidate("2025-01-02", 0.30 * 0.97, 0.10, "b");
        assert!(matches!(
            judge(&equal_floor, Some(&current), 0.97, false),
            Verdict::Publish(_)
        ));
        let regressed = candidate("2025-01-02", 0.29, 0.10, "b");
        let Verdict::Refused(why) = judge(&regressed, Some(&current), 0.97, false) else {
            panic!()
        };
        assert!(
            why.contains("0.2900") && why.contains("2025-01-01"),
            "{why}"
        );
        // --force publishes a regression (a rollback).
        assert!(matches!(
            judge(&regressed, Some(&current), 0.97, true),
            Verdict::Publish(_)
        ));
        // A backfill of an earlier date does not replace a later run.
        let backfill = candidate("2024-12-31", 0.50, 0.10, "c");
        assert_eq!(
            judge(&backfill, Some(&current), 0.97, false),
            Verdict::LaterRunServes
        );
        // The serving run again, same file: already published, also by force.
        let again = candidate("2025-01-01", 0.30, 0.10, "a");
        assert_eq!(
            judge(&again, Some(&current), 0.97, false),
            Verdict::AlreadyPublished
        );
        assert_eq!(
            judge(&again, Some(&current), 0.97, true),
            Verdict::AlreadyPublished
        );
        // The same date with another file is judged like any other run.
        let rerun = candidate("2025-01-01", 0.31, 0.10, "z");
        assert!(matches!(
            judge(&rerun, Some(&current), 0.97, false),
            Verdict::Publish(_)
        ));
    }

    fn memory_lake() -> Lake {
        Lake::open(&crate::config::LakeSpec {
            url: "memory://test/lake".into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn generations_are_claimed_once_and_the_pointer_follows_the_log() {
        let lake = memory_lake();
        let first = candidate("2025-01-01", 0.30, 0.10, "a");
        let Published::Now(one) = publish(&lake, "recdistill", &first, 0.97, false)
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(one.generation, 1);
        let pointer: Publication =
            serde_json::from_slice(&lake.get("recdistill/j/_PUBLISHED").await.unwrap()).unwrap();
        assert_eq!(pointer, one);
        // Published again: nothing new in the log.
        assert!(matches!(
            publish(&lake, "recdistill", &first, 0.97, false)
                .await
                .unwrap(),
            Published::Already(_)
        ));
        assert_eq!(lake.list("recdistill/j/_publish").await.unwrap().len(), 1);

        // Two runs of the next day race: both read generation 1 and pass
        // the gate against it. The first creates generation 2; the second's
        // create of generation 2 fails, so it writes nothing...
        let a = candidate("2025-01-02", 0.40, 0.10, "b");
        let b = candidate("2025-01-02", 0.35, 0.10, "c");
        let read_by_both = current(&lake, "recdistill", "j").await.unwrap();
        let won = attempt(&lake, "recdistill", &a, read_by_both.clone(), 0.97, false)
            .await
            .unwrap();
        assert!(matches!(won, Some(Published::Now(ref p)) if p.generation == 2));
        let lost = attempt(&lake, "recdistill", &b, read_by_both, 0.97, false)
            .await
            .unwrap();
        assert_eq!(lost, None);
        let newest = current(&lake, "recdistill", "j").await.unwrap().unwrap();
        assert_eq!((newest.generation, newest.sha256.as_str()), (2, "b"));
        // ... and judged again, against the winner, it is refused:
        // 0.35 < 0.97 x 0.40.
        let again = publish(&lake, "recdistill", &b, 0.97, false).await.unwrap();
        assert!(
            matches!(again, Published::Refused(ref why) if why.contains("0.4000")),
            "{again:?}"
        );
        assert_eq!(lake.list("recdistill/j/_publish").await.unwrap().len(), 2);
        let pointer: Publication =
            serde_json::from_slice(&lake.get("recdistill/j/_PUBLISHED").await.unwrap()).unwrap();
        assert_eq!(pointer, newest);

        // A pointer left behind (killed between the log and the pointer)
        // is repaired by the next publish of the same run.
        lake.put("recdistill/j/_PUBLISHED", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let same = Candidate {
            record: Publication {
                generation: 0,
                ..newest.clone()
            },
            popularity_ndcg_10: 0.10,
        };
        assert!(matches!(
            publish(&lake, "recdistill", &same, 0.97, false)
                .await
                .unwrap(),
            Published::Already(_)
        ));
        let pointer: Publication =
            serde_json::from_slice(&lake.get("recdistill/j/_PUBLISHED").await.unwrap()).unwrap();
        assert_eq!(pointer, newest);

        // A damaged newest record is named, not guessed around.
        let rel = format!("recdistill/j/_publish/{}", record_name(newest.generation));
        lake.put(&rel, Bytes::from_static(b"garbage"))
            .await
            .unwrap();
        let err = current(&lake, "recdistill", "j").await.unwrap_err();
        assert_eq!(err.exit_code(), crate::error::exit_code::DATA);
        assert!(
            err.to_string().contains(&record_name(newest.generation)),
            "{err}"
        );
    }
}
