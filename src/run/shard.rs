//! Shards of a stage: `recdistill stage NAME --shard I/N` does part `I`
//! (0-based) of `N` of a stage's work, on its own machine if need be.
//!
//! A shard writes its files under `_parts/<stage>/<I>-of-<N>/` (the same
//! names the unsharded stage writes, below that folder), then its record
//! `_stages/<stage>.parts/<I>-of-<N>.json`, last: a shard killed before
//! that record exists has no visible part, and rerunning it rewrites the
//! same files. The next stage gathers the parts (see
//! [`check_parts`]): it refuses a part that is missing, or parts of two
//! shardings that cover the same work twice, then joins the files into what
//! the unsharded stage would have written and records the stage whole.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;

use super::commit::StageRecord;
use super::folder::{RunFolder, STAGES};
use crate::error::{Error, Result};
use crate::lake::Lake;

/// Folder of the shards' files.
pub const PARTS: &str = "_parts";

/// Part `index` (0-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Shard {
    /// Which part, `0..count`.
    pub index: usize,
    /// How many parts.
    pub count: usize,
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = Error;

    /// `I/N` with `0 <= I < N`.
    fn from_str(s: &str) -> Result<Shard> {
        let bad = || {
            Error::config(format!(
                "--shard {s:?}: expected I/N, the 0-based part I of N parts (0 <= I < N), e.g. 0/4"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count || count > 99_999 {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// Name of the part in paths: `00002-of-00004`.
    pub fn name(&self) -> String {
        format!("{:05}-of-{:05}", self.index, self.count)
    }

    /// Parses [`Shard::name`].
    fn from_name(name: &str) -> Option<Shard> {
        let (i, n) = name.split_once("-of-")?;
        let shard = Shard {
            index: i.parse().ok()?,
            count: n.parse().ok()?,
        };
        (shard.count > 0 && shard.index < shard.count && shard.name() == name).then_some(shard)
    }

    /// This part's share of `units` units of work (batches), as contiguous
    /// and as even as can be; the parts of one `count` cover `0..units`
    /// once, in order.
    pub fn units(&self, units: usize) -> Range<usize> {
        self.index * units / self.count..(self.index + 1) * units / self.count
    }

    /// Where a shard of `stage` writes what the unsharded stage writes at
    /// `rel`, relative to the run folder.
    pub fn part_path(&self, stage: &str, rel: &str) -> String {
        format!("{}/{rel}", self.folder(stage))
    }

    /// The folder of this shard's files, relative to the run folder.
    pub fn folder(&self, stage: &str) -> String {
        format!("{PARTS}/{stage}/{}", self.name())
    }

    /// The scope of this shard's lease, below the run folder's `_lease/`.
    pub fn lease_scope(&self, stage: &str) -> String {
        format!("{stage}.parts/{}", self.name())
    }
}

/// The folder of `stage`'s part records, relative to the run folder.
fn records_folder(stage: &str) -> String {
    format!("{STAGES}/{stage}.parts")
}

/// Saves a shard's record: its part is complete.
pub async fn record_part(run: &RunFolder, shard: Shard, record: &StageRecord) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| Error::internal(e.to_string()))?;
    let rel = format!("{}/{}.json", records_folder(&record.stage), shard.name());
    run.put(&rel, Bytes::from(bytes)).await?;
    Ok(())
}

/// The records of `stage`'s parts, by shard.
pub async fn read_parts(run: &RunFolder, stage: &str) -> Result<BTreeMap<Shard, StageRecord>> {
    let folder = run.rel(&records_folder(stage));
    let base = run.lake().path(&folder);
    let mut parts = BTreeMap::new();
    for object in run.lake().list(&folder).await? {
        let rel = Lake::relative_to(&base, &object.location);
        let Some(shard) = rel.strip_suffix(".json").and_then(Shard::from_name) else {
            continue;
        };
        let path = format!("{folder}/{rel}");
        let bytes = run.lake().get(&path).await?;
        let record: StageRecord = serde_json::from_slice(&bytes).map_err(|e| {
            Error::data(
                run.lake().url_of(&path),
                format!("unreadable part record: {e}"),
            )
        })?;
        parts.insert(shard, record);
    }
    Ok(parts)
}

/// Deletes the records and files of `stage`'s parts.
pub async fn forget_parts(run: &RunFolder, stage: &str) -> Result<()> {
    for folder in [records_folder(stage), format!("{PARTS}/{stage}")] {
        let folder = run.rel(&folder);
        let base = run.lake().path(&folder);
        for object in run.lake().list(&folder).await? {
            let rel = Lake::relative_to(&base, &object.location);
            run.lake().delete(&format!("{folder}/{rel}")).await?;
        }
        run.lake().remove_empty_folders(&folder);
    }
    run.lake().remove_empty_folders(&run.rel(PARTS));
    Ok(())
}

/// Checks that `parts` are the `N` parts of one sharding, each once, made
/// by run `run_id` with config `config_hash`; returns them in order.
/// Refused (exit 2) naming what is missing or doubled.
pub fn check_parts(
    run: &RunFolder,
    stage: &str,
    parts: &BTreeMap<Shard, StageRecord>,
    run_id: &str,
    config_hash: &str,
) -> Result<Vec<(Shard, StageRecord)>> {
    let counts: Vec<usize> = {
        let mut c: Vec<usize> = parts.keys().map(|s| s.count).collect();
        c.dedup();
        c
    };
    let Some(&count) = counts.first() else {
        return Err(Error::config(format!(
            "{} has no {stage} stage yet: run `recdistill stage {stage}` (or its shards, `--shard I/N`) first",
            run.display()
        )));
    };
    if counts.len() > 1 {
        let listed: Vec<String> = parts.keys().map(|s| s.to_string()).collect();
        return Err(Error::config(format!(
            "{}: stage {stage} has parts of {} shardings ({}): some users are in two parts; rerun the stage whole (`recdistill stage {stage}`), or delete the records of the sharding you do not want from {}",
            run.display(),
            counts.len(),
            listed.join(", "),
            run.url_of(&records_folder(stage))
        )));
    }
    let missing: Vec<String> = (0..count)
        .filter(|&index| !parts.contains_key(&Shard { index, count }))
        .map(|index| Shard { index, count }.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(Error::config(format!(
            "{}: stage {stage} is missing part{} {} of {count}: run `recdistill stage {stage} --shard {}`",
            run.display(),
            if missing.len() > 1 { "s" } else { "" },
            missing.join(", "),
            missing[0]
        )));
    }
    for (shard, record) in parts {
        if record.run_id != run_id {
            return Err(Error::config(format!(
                "{}: part {shard} of stage {stage} belongs to run {}, not {run_id}; rerun that shard",
                run.display(),
                record.run_id
            )));
        }
        if record.config_hash != config_hash {
            return Err(Error::config(format!(
                "{}: part {shard} of stage {stage} ran with a different job config; rerun that shard",
                run.display()
            )));
        }
    }
    Ok(parts.iter().map(|(s, r)| (*s, r.clone())).collect())
}

/// The files the checked `parts` (in shard order) wrote, as (the name the
/// unsharded stage writes, the parts' files of that name in shard order),
/// all relative to the run folder. Refused (exit 3) when a part wrote other
/// files than the first: the parts come from different runs.
pub fn joined_files(
    run: &RunFolder,
    stage: &str,
    parts: &[(Shard, StageRecord)],
) -> Result<Vec<(String, Vec<String>)>> {
    let mut files: Vec<(String, Vec<String>)> = Vec::new();
    for (p, (shard, record)) in parts.iter().enumerate() {
        let folder = shard.folder(stage);
        let prefix = format!("{folder}/");
        let mut names = Vec::with_capacity(record.outputs.len());
        for object in &record.outputs {
            let rel = object.path.strip_prefix(&prefix).ok_or_else(|| {
                Error::internal(format!("part file {} is not below {folder}", object.path))
            })?;
            names.push(rel.to_string());
        }
        if p == 0 {
            files = names.into_iter().map(|n| (n, Vec::new())).collect();
        } else if names.len() != files.len() || names.iter().zip(&files).any(|(a, (b, _))| a != b) {
            return Err(Error::data(
                run.url_of(&folder),
                format!(
                    "part {shard} of stage {stage} wrote other files than part {}: the parts come from different runs; rerun every shard",
                    parts[0].0
                ),
            ));
        }
        for (rel, sources) in files.iter_mut() {
            sources.push(format!("{folder}/{rel}"));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_cover_the_work_once_in_order() {
        let s: Shard = "2/5".parse().unwrap();
        assert_eq!(s, Shard { index: 2, count: 5 });
        assert_eq!(s.to_string(), "2/5");
        assert_eq!(Shard::from_name(&s.name()), Some(s));
        for bad in ["5/5", "1", "a/2", "0/0", "-1/3", "1/2/3"] {
            let err = bad.parse::<Shard>().unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
        for units in [0, 1, 3, 7, 100, 3127] {
            for count in [1, 2, 3, 7, 16] {
                let mut next = 0;
                for index in 0..count {
                    let r = Shard { index, count }.units(units);
                    assert_eq!(r.start, next, "contiguous");
                    assert!(r.len() <= units / count + 1, "even");
                    next = r.end;
                }
                assert_eq!(next, units, "covers all {units} units with {count} parts");
            }
        }
    }
}
