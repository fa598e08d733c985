//! One run's folder in the lake, `<output_prefix>/<job>/run_date=<D>/`:
//! where its outputs are written and read back, and the names of its own
//! bookkeeping (`_SUCCESS`, `_stages/`, `_lease/`).

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use chrono::NaiveDate;
use futures::Stream;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::lake::{Lake, RowGroups, WrittenObject};

/// Name of the commit marker.
pub const SUCCESS: &str = "_SUCCESS";
/// Folder of per-stage records.
pub const STAGES: &str = "_stages";
/// Folder of the run folder's leases (one object per generation).
pub const LEASES: &str = "_lease";

/// One run's folder in the lake.
#[derive(Debug, Clone)]
pub struct RunFolder {
    lake: Lake,
    prefix: String,
    job: String,
    run_date: NaiveDate,
}

impl RunFolder {
    /// The folder of `job`'s run on `run_date`. `output_prefix` and `job` must
    /// have been validated (see [`crate::config::check_segment`]).
    pub fn new(lake: Lake, output_prefix: &str, job: &str, run_date: NaiveDate) -> RunFolder {
        let prefix = format!(
            "{}/{job}/run_date={}",
            output_prefix.trim_matches('/'),
            run_date.format("%Y-%m-%d")
        );
        RunFolder {
            lake,
            prefix,
            job: job.to_string(),
            run_date,
        }
    }

    /// The lake.
    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    /// Job name.
    pub fn job(&self) -> &str {
        &self.job
    }

    /// Run date.
    pub fn run_date(&self) -> NaiveDate {
        self.run_date
    }

    /// The folder, as a path relative to the lake root.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `rel` (relative to the run folder) as a path relative to the lake root.
    pub fn rel(&self, rel: &str) -> String {
        format!("{}/{}", self.prefix, rel.trim_start_matches('/'))
    }

    /// URL of `rel` inside the run folder.
    pub fn url_of(&self, rel: &str) -> String {
        self.lake.url_of(&self.rel(rel))
    }

    /// URL of the run folder, for messages.
    pub fn display(&self) -> String {
        self.lake.url_of(&format!("{}/", self.prefix))
    }

    /// Writes `bytes` to `rel` in the run folder.
    pub async fn put(&self, rel: &str, bytes: Bytes) -> Result<WrittenObject> {
        let mut object = self.lake.put(&self.rel(rel), bytes).await?;
        object.path = rel.to_string();
        Ok(object)
    }

    /// Streams batches to the Parquet file `rel` in the run folder.
    pub async fn write_parquet<S>(
        &self,
        rel: &str,
        schema: SchemaRef,
        batches: S,
        metadata: Vec<(String, String)>,
    ) -> Result<WrittenObject>
    where
        S: Stream<Item = Result<RecordBatch>> + Send,
    {
        let mut object = self
            .lake
            .write_parquet(&self.rel(rel), schema, batches, metadata)
            .await?;
        object.path = rel.to_string();
        Ok(object)
    }

    /// Streams to the Parquet file `rel` the batches `produce` hands to its
    /// sink while it runs on a blocking thread (scoring, training), so they
    /// never pile up in memory. If either side fails, the file is abandoned
    /// and the first cause is returned; otherwise `produce`'s value and the
    /// written file.
    pub async fn write_parquet_from<T, F>(
        &self,
        rel: &str,
        schema: SchemaRef,
        metadata: Vec<(String, String)>,
        groups: RowGroups,
        produce: F,
    ) -> Result<(T, WrittenObject)>
    where
        T: Send + 'static,
        F: FnOnce(&mut (dyn FnMut(RecordBatch) -> Result<()> + Send)) -> Result<T> + Send + 'static,
    {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<RecordBatch>>(4);
        let producer = tokio::task::spawn_blocking(move || {
            let mut writer_stopped = false;
            let mut sink = |batch: RecordBatch| {
                sender.blocking_send(Ok(batch)).map_err(|_| {
                    writer_stopped = true;
                    Error::internal("the Parquet writer stopped")
                })
            };
            let outcome = produce(&mut sink);
            if outcome.is_err() && !writer_stopped {
                // Abandon the half-written file; the producer's error is the one to report.
                let _ = sender.blocking_send(Err(Error::internal("the producer stopped")));
            }
            (outcome, writer_stopped)
        });
        let stream = futures::stream::unfold(receiver, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let written = self
            .lake
            .write_parquet_grouped(&self.rel(rel), schema, stream, metadata, groups)
            .await
            .map(|mut object| {
                object.path = rel.to_string();
                object
            });
        let (outcome, writer_stopped) = producer
            .await
            .map_err(|e| Error::internal(format!("writing {rel} failed: {e}")))?;
        match (outcome, written) {
            (_, Err(e)) if writer_stopped => Err(e),
            (Err(e), _) => Err(e),
            (Ok(value), written) => Ok((value, written?)),
        }
    }

    /// Writes batches to the Parquet file `rel` in the run folder.
    pub async fn write_batches(
        &self,
        rel: &str,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
        metadata: Vec<(String, String)>,
    ) -> Result<WrittenObject> {
        let stream = futures::stream::iter(batches.into_iter().map(Ok));
        self.write_parquet(rel, schema, stream, metadata).await
    }

    /// Reads `rel` from the run folder.
    pub async fn get(&self, rel: &str) -> Result<Bytes> {
        self.lake.get(&self.rel(rel)).await
    }

    /// Reads the file `listed` names and checks it against the size and
    /// SHA-256 listed with it (`recorded`, e.g. "its stage wrote", says
    /// where): anything else is invalid data (exit 3) that names the file
    /// and says what to do (`remedy`).
    pub async fn get_checked(
        &self,
        listed: &WrittenObject,
        recorded: &str,
        remedy: &str,
    ) -> Result<Bytes> {
        let bytes = self.get(&listed.path).await?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if bytes.len() as u64 != listed.size || sha256 != listed.sha256 {
            return Err(Error::data(
                self.url_of(&listed.path),
                format!(
                    "the file has {} bytes and sha256 {sha256}, but {recorded} {} bytes with sha256 {}: it was changed or damaged; {remedy}",
                    bytes.len(),
                    listed.size,
                    listed.sha256
                ),
            ));
        }
        Ok(bytes)
    }
}

/// Whether `rel` (relative to a run folder) is the run's own bookkeeping —
/// `_SUCCESS`, `_stages/`, `_lease/` — rather than one of its outputs.
pub fn is_bookkeeping(rel: &str) -> bool {
    rel == SUCCESS
        || rel.starts_with(&format!("{STAGES}/"))
        || rel.starts_with(&format!("{LEASES}/"))
}

/// Removes the files a killed writer left half-written in the folder `rel`
/// of the run folder (`""` for all of it; local lakes).
pub fn remove_staging_leftovers(run: &RunFolder, rel: &str) {
    for path in run.lake().staging_leftovers(&run.rel(rel)) {
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(file = %path.display(), "removed a half-written leftover"),
            Err(e) => {
                tracing::warn!(file = %path.display(), "cannot remove a half-written leftover: {e}")
            }
        }
    }
}
