//! One writer per run folder at a time.
//!
//! A run (or a single `stage`, or `gc`) that is about to write into
//! `<prefix>/<job>/run_date=<D>/` first takes the folder's lease: the object
//! `_lease/<generation>.json`, created with a conditional put
//! (`PutMode::Create`: `If-None-Match: *` on S3, a hard link on a local
//! disk), so of two runs racing for the same generation exactly one wins.
//! The holder renews the lease's expiry every quarter of `lake.lease_s` and
//! deletes it when it is done, whatever the outcome.
//!
//! A lease that is past its expiry belongs to a run that died (SIGKILL, lost
//! machine): the next run takes the next generation and deletes the older
//! ones. A live lease makes the newcomer exit with code 5 before it writes
//! anything. Before committing, the holder checks that no newer generation
//! appeared (its lease expired while it was stalled); if one did it does not
//! commit.
//!
//! A lease whose holder ran on this host and is gone (its process no longer
//! exists, or its pid now belongs to a process started at another time) is
//! taken over at once, without waiting for the expiry: the record names the
//! host, the kernel's boot id, the pid namespace, the pid and the process's
//! start time. Holders on other hosts are waited out.
//!
//! Stores without conditional puts (`NotImplemented`) get a lease written
//! with a plain put: runs are still told apart, but two runs starting in the
//! same instant are not excluded (see docs/reliability.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::folder::{LEASES, RunFolder};
use crate::error::{Error, Result};
use crate::lake::{CreateOutcome, Lake};

/// What a lease object holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Generation: one more than the lease it replaced.
    pub generation: u64,
    /// Run id of the holder.
    pub run_id: String,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// What the holder is doing (`run`, `stage features`, `gc`).
    pub purpose: String,
    /// When it was taken (RFC 3339).
    pub acquired_at: String,
    /// The lease is void after this instant unless renewed (RFC 3339).
    pub expires_at: String,
    /// The holder's process on its host (empty from older versions).
    #[serde(default)]
    pub process: ProcessIdentity,
}

/// What tells a process apart on one host, beyond its pid: pids are reused,
/// so the process's start time; containers share a kernel, so the boot id
/// and the pid namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// The pid namespace (`/proc/self/ns/pid`).
    pub pid_namespace: String,
    /// Start time of the process, in clock ticks after boot (`/proc/PID/stat`).
    pub started: u64,
}

impl ProcessIdentity {
    /// This process's identity; empty where `/proc` does not tell.
    fn current() -> ProcessIdentity {
        ProcessIdentity {
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|id| id.trim().to_string())
                .unwrap_or_default(),
            pid_namespace: std::fs::read_link("/proc/self/ns/pid")
                .map(|ns| ns.display().to_string())
                .unwrap_or_default(),
            started: process_started(std::process::id()).unwrap_or(0),
        }
    }
}

/// Start time of process `pid` in clock ticks after boot (field 22 of
/// `/proc/PID/stat`); `None` when there is no such process.
fn process_started(pid: u32) -> Option<u64> {
    start_time_in_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Field 22 (`starttime`) of a `/proc/PID/stat` line.
fn start_time_in_stat(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold anything,
    // spaces and parentheses included; fields from the third on follow the
    // last ')'.
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    after_name.split_whitespace().nth(19)?.parse().ok()
}

impl LeaseRecord {
    fn expires(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.expires_at)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// Whether the lease still holds at `now`: not expired, and not held by
    /// a process of this host that is gone.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.expires().is_some_and(|t| t > now) && !self.holder_is_gone()
    }

    /// Whether the holder ran on this host, in this boot and pid namespace,
    /// and its process is gone (or its pid names a later process). Unknown
    /// identities are never judged gone.
    fn holder_is_gone(&self) -> bool {
        let ours = &self.process;
        if self.host != host_name() || ours.boot_id.is_empty() {
            return false;
        }
        let here = ProcessIdentity::current();
        if ours.pid_namespace.is_empty()
            || ours.started == 0
            || ours.boot_id != here.boot_id
            || ours.pid_namespace != here.pid_namespace
        {
            return false;
        }
        process_started(self.pid) != Some(ours.started)
    }
}

/// A held lease; see the module docs. Release it with [`Lease::release`].
pub struct Lease {
    lake: Lake,
    /// Lease object, relative to the lake root.
    rel: String,
    /// The lease folder, relative to the lake root.
    folder: String,
    generation: u64,
    run_id: String,
    /// Set by the renewer when a newer generation took over.
    lost: Arc<AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

fn lease_name(generation: u64) -> String {
    format!("{generation:020}.json")
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The lease generations in `folder` (relative to the lake root), oldest first.
async fn generations(lake: &Lake, folder: &str) -> Result<Vec<u64>> {
    let base = lake.path(folder);
    let mut found: Vec<u64> = lake
        .list(folder)
        .await?
        .iter()
        .filter_map(|o| {
            Lake::relative_to(&base, &o.location)
                .strip_suffix(".json")
                .and_then(|n| n.parse().ok())
        })
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// Reads a lease object; `None` when it vanished (released: the store's
/// not-found is a data error) or cannot be read.
async fn read_record(lake: &Lake, rel: &str) -> Result<Option<LeaseRecord>> {
    match lake.get(rel).await {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(record) => Ok(Some(record)),
            Err(e) => {
                tracing::warn!(
                    lease = rel,
                    "unreadable lease object, treated as expired: {e}"
                );
                Ok(None)
            }
        },
        Err(Error::Data { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The live holder of `run`'s folder, if any.
pub async fn holder(run: &RunFolder) -> Result<Option<LeaseRecord>> {
    let folder = run.rel(LEASES);
    let Some(&newest) = generations(run.lake(), &folder).await?.last() else {
        return Ok(None);
    };
    let rel = format!("{folder}/{}", lease_name(newest));
    Ok(read_record(run.lake(), &rel)
        .await?
        .filter(|r| r.is_live(Utc::now())))
}

fn busy(run: &RunFolder, holder: &LeaseRecord) -> Error {
    Error::busy(format!(
        "{} is in use by run {} ({} on {}, pid {}) until {}; wait for it to finish, or rerun after that time if it was killed",
        run.display(),
        holder.run_id,
        holder.purpose,
        holder.host,
        holder.pid,
        holder.expires_at
    ))
}

impl Lease {
    /// Takes `run`'s lease for `lease_s` seconds, renewed until released.
    /// Exit code 5 when another live run holds it.
    pub async fn acquire(
        run: &RunFolder,
        run_id: &str,
        purpose: &str,
        lease_s: u64,
    ) -> Result<Lease> {
        Lease::acquire_in(run, run.rel(LEASES), run_id, purpose, lease_s).await
    }

    /// Takes the lease of one shard of a stage (`_lease/<stage>.parts/<part>/`):
    /// shards of one stage run side by side, each writing only its own part,
    /// but one shard runs once at a time. Refused (exit 5) while another
    /// run holds the whole folder.
    pub async fn acquire_shard(
        run: &RunFolder,
        scope: &str,
        run_id: &str,
        purpose: &str,
        lease_s: u64,
    ) -> Result<Lease> {
        if let Some(record) = holder(run).await? {
            return Err(busy(run, &record));
        }
        let folder = run.rel(&format!("{LEASES}/{scope}"));
        Lease::acquire_in(run, folder, run_id, purpose, lease_s).await
    }

    async fn acquire_in(
        run: &RunFolder,
        folder: String,
        run_id: &str,
        purpose: &str,
        lease_s: u64,
    ) -> Result<Lease> {
        let lake = run.lake().clone();
        let existing = generations(&lake, &folder).await?;
        if let Some(&newest) = existing.last() {
            let rel = format!("{folder}/{}", lease_name(newest));
            if let Some(record) = read_record(&lake, &rel).await?
                && record.is_live(Utc::now())
            {
                return Err(busy(run, &record));
            }
        }
        let generation = existing.last().map_or(1, |g| g + 1);
        let now = Utc::now();
        let lease_time = chrono::Duration::milliseconds((lease_s.max(1) * 1000) as i64);
        let record = LeaseRecord {
            generation,
            run_id: run_id.to_string(),
            host: host_name(),
            pid: std::process::id(),
            purpose: purpose.to_string(),
            acquired_at: rfc3339(now),
            expires_at: rfc3339(now + lease_time),
            process: ProcessIdentity::current(),
        };
        let rel = format!("{folder}/{}", lease_name(generation));
        match lake.put_create(&rel, to_bytes(&record)?).await? {
            CreateOutcome::Created => {}
            CreateOutcome::Unsupported => {
                tracing::warn!(
                    store = %lake.url(),
                    "the store has no conditional puts: concurrent runs of one run date are not excluded"
                );
                lake.put(&rel, to_bytes(&record)?).await?;
            }
            CreateOutcome::AlreadyExists => {
                // Another run took this generation an instant before us.
                let winner = read_record(&lake, &rel).await?.unwrap_or(record);
                return Err(busy(run, &winner));
            }
        }
        // Read back: a store whose conditional put is not atomic shows the
        // winner here.
        if let Some(found) = read_record(&lake, &rel).await?
            && found.run_id != record.run_id
        {
            return Err(busy(run, &found));
        }
        // Expired leases of killed runs are of no further use.
        for old in existing {
            lake.delete(&format!("{folder}/{}", lease_name(old)))
                .await?;
        }
        tracing::debug!(lease = %rel, "lease taken");

        let lost = Arc::new(AtomicBool::new(false));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let renewer = {
            let (lake, folder, rel, lost) =
                (lake.clone(), folder.clone(), rel.clone(), lost.clone());
            let mut record = record.clone();
            let period = Duration::from_millis((lease_s.max(1) * 250).max(50));
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = tokio::time::sleep(period) => {}
                    }
                    match still_ours(&lake, &folder, &rel, generation, &record.run_id).await {
                        Ok(false) => {
                            lost.store(true, Ordering::SeqCst);
                            tracing::error!(lease = %rel, "lease taken over by another run");
                            return;
                        }
                        Ok(true) => {}
                        Err(e) => tracing::warn!(lease = %rel, "cannot check the lease: {e}"),
                    }
                    record.expires_at = rfc3339(Utc::now() + lease_time);
                    let renewed = match to_bytes(&record) {
                        Ok(bytes) => lake.put(&rel, bytes).await.map(|_| ()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = renewed {
                        tracing::warn!(lease = %rel, "cannot renew the lease: {e}");
                    }
                }
            })
        };
        Ok(Lease {
            lake,
            rel,
            folder,
            generation,
            run_id: run_id.to_string(),
            lost,
            stop: Some(stop),
            renewer: Some(renewer),
        })
    }

    /// Fails (exit 5) when a newer run took the lease over: the holder must
    /// not commit.
    pub async fn check_held(&self) -> Result<()> {
        let ours = still_ours(
            &self.lake,
            &self.folder,
            &self.rel,
            self.generation,
            &self.run_id,
        )
        .await?;
        if self.lost.load(Ordering::SeqCst) || !ours {
            return Err(Error::busy(format!(
                "lost the lease {} to a newer run (this run stalled past lake.lease_s); not committing",
                self.lake.url_of(&self.rel)
            )));
        }
        Ok(())
    }

    /// Stops renewing and deletes the lease object.
    pub async fn release(mut self) {
        self.stop_renewing().await;
        if !self.lost.load(Ordering::SeqCst) {
            match self.lake.delete(&self.rel).await {
                // A local lake keeps the emptied folder otherwise.
                Ok(()) => self.lake.remove_empty_folders(&self.folder),
                Err(e) => tracing::warn!(
                    lease = %self.rel,
                    "cannot release the lease (it expires by itself): {e}"
                ),
            }
        }
    }

    async fn stop_renewing(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(renewer) = self.renewer.take() {
            let _ = renewer.await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
    }
}

/// Whether the lease `rel` (generation `generation`) is still the newest and
/// still names `run_id`.
async fn still_ours(
    lake: &Lake,
    folder: &str,
    rel: &str,
    generation: u64,
    run_id: &str,
) -> Result<bool> {
    let newest = generations(lake, folder).await?;
    if newest.last() != Some(&generation) {
        return Ok(false);
    }
    Ok(read_record(lake, rel)
        .await?
        .is_some_and(|r| r.run_id == run_id))
}

fn to_bytes(record: &LeaseRecord) -> Result<Bytes> {
    serde_json::to_vec_pretty(record)
        .map(Bytes::from)
        .map_err(|e| Error::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LakeSpec;

    fn run_folder(name: &str) -> RunFolder {
        let lake = Lake::open(&LakeSpec {
            url: format!("memory://{name}"),
            ..LakeSpec::default()
        })
        .unwrap();
        RunFolder::new(
            lake,
            "recdistill",
            "job",
            chrono::NaiveDate::from_ymd_opt(2026, 1, 2).unwrap(),
        )
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_expired_leases_are_taken_over() {
        let run = run_folder("lease-unit");
        let first = Lease::acquire(&run, "a", "run", 60).await.unwrap();
        let err = Lease::acquire(&run, "b", "run", 60).await.err().unwrap();
        assert_eq!(err.exit_code(), 5);
        assert!(err.to_string().contains("in use by run a"), "{err}");
        first.check_held().await.unwrap();
        first.release().await;
        assert!(holder(&run).await.unwrap().is_none());

        // A killed holder leaves its lease object behind; it expires.
        let dead = LeaseRecord {
            generation: 2,
            run_id: "c".into(),
            host: "h".into(),
            pid: 1,
            purpose: "run".into(),
            acquired_at: rfc3339(Utc::now()),
            expires_at: rfc3339(Utc::now() - chrono::Duration::seconds(1)),
            process: ProcessIdentity::default(),
        };
        let dead_rel = run.rel(&format!("{LEASES}/{}", lease_name(2)));
        run.lake()
            .put(&dead_rel, to_bytes(&dead).unwrap())
            .await
            .unwrap();
        assert!(holder(&run).await.unwrap().is_none());
        let next = Lease::acquire(&run, "d", "run", 60).await.unwrap();
        assert_eq!(next.generation, 3);
        let left = generations(run.lake(), &run.rel(LEASES)).await.unwrap();
        assert_eq!(left, vec![3], "older generations are deleted");
        assert_eq!(holder(&run).await.unwrap().unwrap().run_id, "d");
        next.release().await;
    }

    /// Puts a lease of generation 1, valid for an hour, held by `pid` on
    /// `host` with `process`.
    async fn lease_held_by(run: &RunFolder, host: &str, pid: u32, process: ProcessIdentity) {
        let record = LeaseRecord {
            generation: 1,
            run_id: "holder".into(),
            host: host.into(),
            pid,
            purpose: "run".into(),
            acquired_at: rfc3339(Utc::now()),
            expires_at: rfc3339(Utc::now() + chrono::Duration::hours(1)),
            process,
        };
        let rel = run.rel(&format!("{LEASES}/{}", lease_name(1)));
        run.lake()
            .put(&rel, to_bytes(&record).unwrap())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_gone_holder_on_this_host_is_taken_over_at_once_and_others_are_waited_out() {
        let here = ProcessIdentity::current();
        assert!(here.started > 0 && !here.boot_id.is_empty(), "{here:?}");
        // A process that has exited: its lease is taken over before expiry.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let child_pid = child.id();
        let started = process_started(child_pid).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let dead = ProcessIdentity {
            started,
            ..here.clone()
        };
        let run = run_folder("lease-gone");
        lease_held_by(&run, &host_name(), child_pid, dead.clone()).await;
        assert!(holder(&run).await.unwrap().is_none());
        let taken = Lease::acquire(&run, "next", "run", 60).await.unwrap();
        assert_eq!(taken.generation, 2);
        taken.release().await;

        // A reused pid: this process's pid, recorded with another start time.
        let run = run_folder("lease-reused-pid");
        let reused = ProcessIdentity {
            started: here.started + 1,
            ..here.clone()
        };
        lease_held_by(&run, &host_name(), std::process::id(), reused).await;
        Lease::acquire(&run, "next", "run", 60)
            .await
            .unwrap()
            .release()
            .await;

        // Live holders are waited out: a live process of this host, the
        // same dead process recorded on another host, in another boot, or
        // by an older version that recorded no identity.
        let other_boot = ProcessIdentity {
            boot_id: "another-boot".into(),
            ..dead.clone()
        };
        for (i, (host, pid, process)) in [
            (host_name(), std::process::id(), here.clone()),
            ("another-host".to_string(), child_pid, dead.clone()),
            (host_name(), child_pid, other_boot),
            (host_name(), child_pid, ProcessIdentity::default()),
        ]
        .into_iter()
        .enumerate()
        {
            let run = run_folder(&format!("lease-live-{i}"));
            lease_held_by(&run, &host, pid, process).await;
            let err = Lease::acquire(&run, "next", "run", 60).await.err().unwrap();
            assert_eq!(err.exit_code(), 5, "case {i}");
        }
    }

    #[test]
    fn process_start_times_are_read_past_odd_command_names() {
        let fields = |name: &str| {
            let mut line = format!("4242 ({name}) S");
            for field in 4..=21 {
                line.push_str(&format!(" {field}"));
            }
            line + " 987654 23 24"
        };
        assert_eq!(start_time_in_stat(&fields("recdistill")), Some(987654));
        assert_eq!(start_time_in_stat(&fields("a) b (c) 9 9")), Some(987654));
        assert_eq!(start_time_in_stat("4242 (cut"), None);
        assert!(process_started(std::process::id()).is_some());
        assert_eq!(process_started(u32::MAX), None);
    }

    #[tokio::test]
    async fn a_holder_whose_lease_was_taken_over_may_not_commit() {
        let run = run_folder("lease-lost");
        let stalled = Lease::acquire(&run, "a", "run", 60).await.unwrap();
        // A newer generation appears, as after this holder's lease expired.
        let newer = run.rel(&format!("{LEASES}/{}", lease_name(2)));
        run.lake()
            .put(&newer, Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let err = stalled.check_held().await.unwrap_err();
        assert_eq!(err.exit_code(), 5);
        assert!(err.to_string().contains("lost the lease"), "{err}");
    }
}
