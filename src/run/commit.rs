//! The commit protocol of a run folder.
//!
//! A run writes under `<lake>/<output_prefix>/<job>/run_date=<D>/`:
//! 1. `_SUCCESS` is deleted before the first output is written (after the
//!    input has been validated), so a rerun is never mistaken for the old run;
//! 2. every output is one whole object (see [`crate::lake`]);
//! 3. each stage leaves `_stages/<stage>.json`: its outputs with sizes and
//!    checksums, timing, config hash and (for `features`) the input fingerprint;
//! 4. the commit deletes objects no stage of this run wrote, then writes
//!    `_SUCCESS`, the manifest, last.
//!
//! A run folder without `_SUCCESS` is not committed; with it, exactly the
//! files it lists belong to the run.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::folder::{RunFolder, STAGES, SUCCESS, is_bookkeeping};
use crate::config::Job;
use crate::error::{Error, Result};
use crate::lake::{Lake, WrittenObject};

/// Manifest format written by this version.
pub const MANIFEST_FORMAT: u32 = 1;

/// One input file as it was when the run read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// Path relative to the lake root.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// The store's entity tag, where it has one.
    pub etag: Option<String>,
    /// Last modification, RFC 3339.
    pub last_modified: String,
}

/// What the run read: every input file, and a hash over the list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// SHA-256 over `path, size, etag` of every file, in path order.
    pub sha256: String,
    /// The files.
    pub files: Vec<InputFile>,
    /// The `dt=` partitions of the interactions the run was allowed to read.
    #[serde(default)]
    pub bounds: InputBounds,
}

/// The `dt=` partitions of the interactions a run reads: from `from` to
/// `to`, both inclusive, as `YYYY-MM-DD`. An empty bound is open. A table
/// that is not partitioned by `dt` is read whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputBounds {
    /// First partition read; empty: the first there is.
    pub from: String,
    /// Last partition read (the run date); empty: the last there is.
    pub to: String,
}

impl InputBounds {
    /// A run on `run_date` reads partitions up to that date, and with
    /// `window_days` > 0 only the last `window_days` of them.
    pub fn for_run(run_date: NaiveDate, window_days: u32) -> InputBounds {
        // A window reaching before the calendar's first day is all of history.
        let from = (window_days > 0)
            .then(|| run_date.checked_sub_days(chrono::Days::new(u64::from(window_days) - 1)))
            .flatten()
            .map(|d| d.format("%Y-%m-%d").to_string())
            .unwrap_or_default();
        InputBounds {
            from,
            to: run_date.format("%Y-%m-%d").to_string(),
        }
    }

    /// Every partition (benchmarks and tools that are not a run).
    pub fn everything() -> InputBounds {
        InputBounds::default()
    }

    /// Whether the partition `dt` (YYYY-MM-DD) is read.
    pub fn contains(&self, dt: &str) -> bool {
        (self.from.is_empty() || dt >= self.from.as_str())
            && (self.to.is_empty() || dt <= self.to.as_str())
    }

    /// The bounds in words, for messages: `dt <= 2025-01-31`.
    pub fn describe(&self) -> String {
        match (self.from.is_empty(), self.to.is_empty()) {
            (true, true) => "every dt".to_string(),
            (true, false) => format!("dt <= {}", self.to),
            (false, true) => format!("dt >= {}", self.from),
            (false, false) => format!("{} <= dt <= {}", self.from, self.to),
        }
    }
}

impl Fingerprint {
    /// Fingerprints a list of files.
    pub fn of(mut files: Vec<InputFile>) -> Fingerprint {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let mut hasher = Sha256::new();
        for f in &files {
            hasher.update(f.path.as_bytes());
            hasher.update(b"\t");
            hasher.update(f.size.to_string().as_bytes());
            hasher.update(b"\t");
            hasher.update(f.etag.as_deref().unwrap_or("").as_bytes());
            hasher.update(b"\n");
        }
        Fingerprint {
            sha256: hex::encode(hasher.finalize()),
            files,
            bounds: InputBounds::default(),
        }
    }
}

/// What one stage did, kept in `_stages/<stage>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    /// Stage name.
    pub stage: String,
    /// Run id of the process that ran it.
    pub run_id: String,
    /// Hash of the job config it ran with.
    pub config_hash: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// How long it took.
    pub seconds: f64,
    /// Files it wrote, relative to the run folder.
    pub outputs: Vec<WrittenObject>,
    /// The input it read (the features stage).
    pub input_fingerprint: Option<Fingerprint>,
}

/// Versions of what produced the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolInfo {
    /// `recdistill`.
    pub name: String,
    /// Crate version.
    pub version: String,
    /// SHA-256 of the Cargo.lock the binary was built from.
    pub cargo_lock_sha256: String,
}

impl ToolInfo {
    /// This binary.
    pub fn current() -> ToolInfo {
        ToolInfo {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
            cargo_lock_sha256: hex::encode(Sha256::digest(include_bytes!("../../Cargo.lock"))),
        }
    }
}

/// Timing of one stage in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageTiming {
    /// Stage name.
    pub name: String,
    /// Seconds it took.
    pub seconds: f64,
    /// Run id of the process that ran it.
    pub run_id: String,
}

/// The `_SUCCESS` manifest (schemas/manifest.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format.
    pub format_version: u32,
    /// Id of the committing run.
    pub run_id: String,
    /// Job name.
    pub job: String,
    /// Run date, YYYY-MM-DD.
    pub run_date: String,
    /// The job's seed.
    pub seed: u64,
    /// Hash of the resolved job spec.
    pub config_hash: String,
    /// The resolved job spec.
    pub config: serde_json::Value,
    /// What was read.
    pub input_fingerprint: Fingerprint,
    /// Every file of the run.
    pub outputs: Vec<WrittenObject>,
    /// What produced it.
    pub tool: ToolInfo,
    /// Stage timings, in order.
    pub stages: Vec<StageTiming>,
    /// When the commit happened.
    pub committed_at: String,
}

impl Manifest {
    /// The output at `rel` (relative to the run folder), if the run lists it.
    pub fn listed(&self, rel: &str) -> Option<&WrittenObject> {
        self.outputs.iter().find(|o| o.path == rel)
    }
}

/// Reads the output `rel` of the committed run `run`, checked against the
/// size and SHA-256 its manifest lists; an output the manifest does not
/// list, or that differs, is invalid data (exit 3) naming the file.
pub async fn read_listed(run: &RunFolder, manifest: &Manifest, rel: &str) -> Result<Bytes> {
    let listed = manifest
        .listed(rel)
        .ok_or_else(|| Error::data(run.url_of(rel), "the run's manifest does not list it"))?;
    run.get_checked(
        listed,
        "its run's manifest lists",
        "rerun the job for that run date",
    )
    .await
}

/// Makes a fresh run id: UTC time of the start plus random bits.
pub fn new_run_id() -> String {
    format!(
        "{}-{:08x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        rand::random::<u32>()
    )
}

/// Removes `_SUCCESS`: from now on the folder is an uncommitted run.
pub async fn uncommit(run: &RunFolder) -> Result<()> {
    run.lake().delete(&run.rel(SUCCESS)).await
}

/// Saves a stage's record.
pub async fn record_stage(run: &RunFolder, record: &StageRecord) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| Error::internal(e.to_string()))?;
    run.put(
        &format!("{STAGES}/{}.json", record.stage),
        Bytes::from(bytes),
    )
    .await?;
    Ok(())
}

/// Deletes the records of `stages`, and of their shards' parts: their
/// outputs no longer follow from the stage that just ran, so the run cannot
/// be committed until they run again.
pub async fn forget_stages(run: &RunFolder, stages: &[&str]) -> Result<()> {
    for stage in stages {
        forget_record(run, stage).await?;
        super::shard::forget_parts(run, stage).await?;
    }
    Ok(())
}

/// Deletes `stage`'s record alone (a shard of it is running: its parts stay).
pub async fn forget_record(run: &RunFolder, stage: &str) -> Result<()> {
    run.lake()
        .delete(&run.rel(&format!("{STAGES}/{stage}.json")))
        .await
}

/// Reads a stage's record, `None` when the stage has not run.
pub async fn read_stage(run: &RunFolder, stage: &str) -> Result<Option<StageRecord>> {
    let rel = run.rel(&format!("{STAGES}/{stage}.json"));
    if run.lake().head(&rel).await?.is_none() {
        return Ok(None);
    }
    let bytes = run.lake().get(&rel).await?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::data(
            run.lake().url_of(&rel),
            format!("unreadable stage record: {e}"),
        )
    })
}

/// Commits the run: checks that every stage in `stages` ran with this job's
/// config as part of the same run, removes objects none of them wrote, and
/// writes `_SUCCESS` last.
pub async fn commit(run: &RunFolder, job: &Job, run_id: &str, stages: &[&str]) -> Result<Manifest> {
    let config_hash = job.config_hash();
    let mut outputs: BTreeMap<String, WrittenObject> = BTreeMap::new();
    let mut timings = Vec::new();
    let mut fingerprint = None;
    // Missing stages first: they are what the user has to run next.
    let mut records = Vec::with_capacity(stages.len());
    for stage in stages {
        let record = read_stage(run, stage).await?.ok_or_else(|| {
            Error::config(format!(
                "cannot commit {}: stage {stage} has not run (run `recdistill stage {stage}` or `recdistill run`)",
                run.display()
            ))
        })?;
        records.push(record);
    }
    for record in records {
        let stage = record.stage.clone();
        if record.run_id != run_id {
            return Err(Error::config(format!(
                "cannot commit {}: stage {stage} belongs to run {}, not {run_id}; rerun it",
                run.display(),
                record.run_id
            )));
        }
        if record.config_hash != config_hash {
            return Err(Error::config(format!(
                "cannot commit {}: stage {stage} ran with a different job config (hash {}, now {}); rerun it",
                run.display(),
                &record.config_hash[..12.min(record.config_hash.len())],
                &config_hash[..12]
            )));
        }
        for object in record.outputs {
            outputs.insert(object.path.clone(), object);
        }
        if record.input_fingerprint.is_some() {
            fingerprint = record.input_fingerprint;
        }
        timings.push(StageTiming {
            name: record.stage,
            seconds: record.seconds,
            run_id: record.run_id,
        });
    }
    let input_fingerprint = fingerprint
        .ok_or_else(|| Error::internal("no stage recorded the input fingerprint".to_string()))?;

    // Leftovers of earlier attempts (models no longer trained, files of a
    // killed run) would confuse tools that read the folder directly.
    let folder = run.lake().path(run.prefix());
    for object in run.lake().list(run.prefix()).await? {
        let rel = Lake::relative_to(&folder, &object.location);
        if is_bookkeeping(&rel) || outputs.contains_key(&rel) {
            continue;
        }
        tracing::info!(object = %rel, "removing object no stage of this run wrote");
        run.lake().delete(&run.rel(&rel)).await?;
    }

    let manifest = Manifest {
        format_version: MANIFEST_FORMAT,
        run_id: run_id.to_string(),
        job: run.job().to_string(),
        run_date: run.run_date().format("%Y-%m-%d").to_string(),
        seed: job.spec.seed,
        config_hash,
        config: serde_json::to_value(&job.spec).map_err(|e| Error::internal(e.to_string()))?,
        input_fingerprint,
        outputs: outputs.into_values().collect(),
        tool: ToolInfo::current(),
        stages: timings,
        committed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::internal(e.to_string()))?;
    run.put(SUCCESS, Bytes::from(bytes)).await?;
    Ok(manifest)
}

/// Reads the run's manifest; `None` when the run is not committed.
pub async fn read_manifest(run: &RunFolder) -> Result<Option<Manifest>> {
    let rel = run.rel(SUCCESS);
    if run.lake().head(&rel).await?.is_none() {
        return Ok(None);
    }
    let bytes = run.lake().get(&rel).await?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::data(run.lake().url_of(&rel), format!("unreadable manifest: {e}")))
}

/// The run dates of `job` that have a folder in the lake, in order.
pub async fn run_dates(lake: &Lake, output_prefix: &str, job: &str) -> Result<Vec<NaiveDate>> {
    let folders = lake
        .list_folders(&format!("{}/{job}", output_prefix.trim_matches('/')))
        .await?;
    let mut dates: Vec<NaiveDate> = folders
        .iter()
        .filter_map(|name| name.strip_prefix("run_date="))
        .filter_map(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
        .collect();
    dates.sort();
    Ok(dates)
}

/// Every committed run of `job`, oldest first. A run whose manifest cannot
/// be read is left out with a warning: one damaged day does not hide the
/// others.
pub async fn committed_runs(
    lake: &Lake,
    output_prefix: &str,
    job: &str,
) -> Result<Vec<(RunFolder, Manifest)>> {
    let dates = run_dates(lake, output_prefix, job).await?;
    committed_among(
        lake,
        output_prefix,
        job,
        dates.into_iter().rev(),
        usize::MAX,
    )
    .await
}

/// The latest `limit` committed runs of `job` dated before `before`, oldest
/// first, as [`committed_runs`]; only their manifests are read.
pub async fn committed_runs_before(
    lake: &Lake,
    output_prefix: &str,
    job: &str,
    before: NaiveDate,
    limit: usize,
) -> Result<Vec<(RunFolder, Manifest)>> {
    let dates = run_dates(lake, output_prefix, job).await?;
    let earlier = dates.into_iter().rev().filter(|d| *d < before);
    committed_among(lake, output_prefix, job, earlier, limit).await
}

/// The committed runs among `newest_first` dates, until `limit` are found,
/// oldest first; unreadable manifests are left out with a warning.
async fn committed_among(
    lake: &Lake,
    output_prefix: &str,
    job: &str,
    newest_first: impl Iterator<Item = NaiveDate>,
    limit: usize,
) -> Result<Vec<(RunFolder, Manifest)>> {
    let mut runs = Vec::new();
    for date in newest_first {
        if runs.len() == limit {
            break;
        }
        let run = RunFolder::new(lake.clone(), output_prefix, job, date);
        match read_manifest(&run).await {
            Ok(Some(manifest)) => runs.push((run, manifest)),
            Ok(None) => {}
            Err(err @ Error::Data { .. }) => {
                tracing::warn!(run = %run.display(), %err, "a committed run's manifest is unreadable; left out of the history");
            }
            Err(err) => return Err(err),
        }
    }
    runs.reverse();
    Ok(runs)
}

/// The newest committed run of `job` in the lake, if any.
pub async fn latest_committed(
    lake: &Lake,
    output_prefix: &str,
    job: &str,
) -> Result<Option<(RunFolder, Manifest)>> {
    let dates = run_dates(lake, output_prefix, job).await?;
    for date in dates.into_iter().rev() {
        let run = RunFolder::new(lake.clone(), output_prefix, job, date);
        if let Some(manifest) = read_manifest(&run).await? {
            return Ok(Some((run, manifest)));
        }
    }
    Ok(None)
}

/// Checks that every file a manifest lists is there with the listed size.
pub async fn verify_sizes(run: &RunFolder, manifest: &Manifest) -> Result<()> {
    for object in &manifest.outputs {
        match run.lake().head(&run.rel(&object.path)).await? {
            Some(meta) if meta.size == object.size => {}
            Some(meta) => {
                return Err(Error::data(
                    run.url_of(&object.path),
                    format!(
                        "size {} differs from the manifest's {}",
                        meta.size, object.size
                    ),
                ));
            }
            None => {
                return Err(Error::data(
                    run.url_of(&object.path),
                    "listed in _SUCCESS but missing",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_depends_on_files_not_their_order() {
        let f = |p: &str, s: u64| InputFile {
            path: p.into(),
            size: s,
            etag: Some("e".into()),
            last_modified: String::new(),
        };
        let a = Fingerprint::of(vec![f("a", 1), f("b", 2)]);
        let b = Fingerprint::of(vec![f("b", 2), f("a", 1)]);
        let c = Fingerprint::of(vec![f("a", 1), f("b", 3)]);
        assert_eq!(a.sha256, b.sha256);
        assert_ne!(a.sha256, c.sha256);
    }

    #[test]
    fn input_bounds_end_at_the_run_date_and_span_the_window() {
        let d = NaiveDate::from_ymd_opt(2025, 3, 1).unwrap();
        let all = InputBounds::for_run(d, 0);
        assert_eq!((all.from.as_str(), all.to.as_str()), ("", "2025-03-01"));
        assert!(all.contains("1999-12-31") && all.contains("2025-03-01"));
        assert!(!all.contains("2025-03-02"));
        // Seven days, the run date included, across a month end.
        let week = InputBounds::for_run(d, 7);
        assert_eq!(week.from, "2025-02-23");
        assert!(!week.contains("2025-02-22") && week.contains("2025-02-23"));
        assert!(week.contains("2025-03-01") && !week.contains("2025-03-02"));
        assert_eq!(week.describe(), "2025-02-23 <= dt <= 2025-03-01");
        let one = InputBounds::for_run(d, 1);
        assert_eq!(
            (one.from.as_str(), one.to.as_str()),
            ("2025-03-01", "2025-03-01")
        );
        assert!(InputBounds::everything().contains("2999-01-01"));
        assert_eq!(InputBounds::for_run(d, u32::MAX).from, "");
    }
}
