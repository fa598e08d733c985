//! `recdistill gc`: removes what killed runs left behind in run folders.
//!
//! A run already cleans its own folder (half-written files when it takes the
//! lease, objects no stage wrote when it commits); `gc` does the same for
//! folders no run will revisit. Per run folder, holding its lease (a folder
//! in use is skipped):
//! - half-written files of a local lake (`NAME#N`) are deleted;
//! - in a committed folder, objects its `_SUCCESS` does not list (other than
//!   `_stages/`) are deleted;
//! - an uncommitted folder (a killed or failed run) is reported, and deleted
//!   whole with `--uncommitted`;
//! - lease objects of dead runs are deleted, and empty local folders removed.
//!
//! The run that `_PUBLISHED` points at is never deleted, committed or not
//! (a rerun of its date that was killed leaves it uncommitted); when the
//! publication log cannot be read, no uncommitted folder of the job is.

use chrono::NaiveDate;

use super::commit;
use super::folder::{LEASES, RunFolder, is_bookkeeping};
use super::lease::{self, Lease};
use super::publish;
use crate::config::{JobSpec, check_segment};
use crate::error::{Error, Result};
use crate::lake::Lake;

/// What to clean.
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Only this job's folders; `None` for every job under the output prefix.
    pub job: Option<String>,
    /// Only this run date.
    pub run_date: Option<NaiveDate>,
    /// Delete uncommitted run folders whole.
    pub remove_uncommitted: bool,
    /// Report only; delete nothing.
    pub dry_run: bool,
}

/// What `gc` found and did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Run folders looked at.
    pub folders: usize,
    /// Folders skipped because a live run holds them.
    pub busy: Vec<String>,
    /// Half-written files (deleted unless dry run).
    pub half_written: Vec<String>,
    /// Objects in committed folders that `_SUCCESS` does not list.
    pub unlisted: Vec<String>,
    /// Uncommitted run folders.
    pub uncommitted: Vec<String>,
    /// Uncommitted run folders kept because the job's publication names
    /// their date (or cannot be read).
    pub published_kept: Vec<String>,
    /// Whether they were removed (`--uncommitted`) or kept.
    pub uncommitted_removed: bool,
    /// Whether anything was deleted.
    pub deleted: bool,
}

impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.deleted { "removed" } else { "found" };
        writeln!(f, "run folders: {}", self.folders)?;
        for folder in &self.busy {
            writeln!(f, "in use, skipped: {folder}")?;
        }
        for file in &self.half_written {
            writeln!(f, "half-written file {verb}: {file}")?;
        }
        for object in &self.unlisted {
            writeln!(f, "object not in _SUCCESS {verb}: {object}")?;
        }
        let uncommitted = if self.uncommitted_removed {
            "removed"
        } else {
            "kept (pass --uncommitted to remove)"
        };
        for folder in &self.uncommitted {
            writeln!(f, "uncommitted run {uncommitted}: {folder}")?;
        }
        for folder in &self.published_kept {
            writeln!(f, "uncommitted run kept, it is the published one: {folder}")?;
        }
        Ok(())
    }
}

/// Cleans the run folders of `spec`'s lake; see the module docs.
pub async fn gc(spec: &JobSpec, options: &GcOptions) -> Result<GcReport> {
    let lake = Lake::open(&spec.lake)?;
    let prefix = spec.lake.output_prefix.trim_matches('/').to_string();
    let jobs = match &options.job {
        Some(job) => {
            check_segment("job name", job)?;
            vec![job.clone()]
        }
        None => lake
            .list_folders(&prefix)
            .await?
            .into_iter()
            .filter(|j| check_segment("job name", j).is_ok())
            .collect(),
    };
    let mut report = GcReport {
        deleted: !options.dry_run,
        uncommitted_removed: options.remove_uncommitted && !options.dry_run,
        ..GcReport::default()
    };
    for job in jobs {
        let mut dates = commit::run_dates(&lake, &prefix, &job).await?;
        dates.retain(|d| options.run_date.is_none_or(|only| only == *d));
        let serving = match publish::published_run_date(&lake, &prefix, &job).await {
            Ok(date) => Serving::Date(date),
            Err(err @ Error::Data { .. }) => {
                tracing::warn!(%job, %err, "the publication log is unreadable: no uncommitted run folder of the job is removed");
                Serving::Unknown
            }
            Err(err) => return Err(err),
        };
        for date in dates {
            let run = RunFolder::new(lake.clone(), &prefix, &job, date);
            report.folders += 1;
            let protected = match &serving {
                Serving::Date(d) => d.as_deref() == Some(date.to_string().as_str()),
                Serving::Unknown => true,
            };
            clean_folder(&run, spec.lake.lease_s, options, protected, &mut report).await?;
        }
    }
    Ok(report)
}

/// The run date the job's publication names, as far as `gc` can tell.
enum Serving {
    /// The date (`None`: the job never published).
    Date(Option<String>),
    /// The log cannot be read: every date may be the published one.
    Unknown,
}

async fn clean_folder(
    run: &RunFolder,
    lease_s: u64,
    options: &GcOptions,
    published: bool,
    report: &mut GcReport,
) -> Result<()> {
    let lease = if options.dry_run {
        if lease::holder(run).await?.is_some() {
            report.busy.push(run.display());
            return Ok(());
        }
        None
    } else {
        match Lease::acquire(run, &commit::new_run_id(), "gc", lease_s).await {
            Ok(lease) => Some(lease),
            Err(Error::Busy(_)) => {
                report.busy.push(run.display());
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    };
    let outcome = clean_held(run, options, published, report).await;
    if let Some(lease) = lease {
        lease.release().await;
    }
    run.lake().remove_empty_folders(&run.rel(""));
    outcome
}

async fn clean_held(
    run: &RunFolder,
    options: &GcOptions,
    published: bool,
    report: &mut GcReport,
) -> Result<()> {
    let lake = run.lake();
    for path in lake.staging_leftovers(&run.rel("")) {
        if !options.dry_run {
            std::fs::remove_file(&path).map_err(|e| Error::io(path.display(), e))?;
        }
        report.half_written.push(path.display().to_string());
    }
    let folder = lake.path(&run.rel(""));
    let objects: Vec<String> = lake
        .list(&run.rel(""))
        .await?
        .iter()
        .map(|o| Lake::relative_to(&folder, &o.location))
        .filter(|rel| !rel.starts_with(&format!("{LEASES}/")))
        .collect();
    match commit::read_manifest(run).await? {
        Some(manifest) => {
            for rel in objects {
                let listed = is_bookkeeping(&rel) || manifest.listed(&rel).is_some();
                if !listed {
                    if !options.dry_run {
                        lake.delete(&run.rel(&rel)).await?;
                    }
                    report.unlisted.push(run.url_of(&rel));
                }
            }
        }
        None if !objects.is_empty() && published => {
            report
                .published_kept
                .push(format!("{} ({} objects)", run.display(), objects.len()));
        }
        None if !objects.is_empty() => {
            if options.remove_uncommitted && !options.dry_run {
                for rel in &objects {
                    lake.delete(&run.rel(rel)).await?;
                }
            }
            report
                .uncommitted
                .push(format!("{} ({} objects)", run.display(), objects.len()));
        }
        None => {}
    }
    Ok(())
}
