//! The lake: an `object_store` root reached by URL, registered with DataFusion,
//! and the only code that writes objects. Every object is written whole — a
//! single put, or a multipart upload that becomes visible only on completion —
//! so a reader never sees half an object.
//!
//! Below it: [`engine`], the DataFusion session every query runs in, and
//! [`schema`], the table contracts of `schemas/`. The lake knows the job's
//! config and nothing of models or runs.

pub mod concat;
pub mod engine;
pub mod reader;
pub mod schema;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use datafusion::prelude::SessionContext;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::buffered::BufWriter;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientConfigKey, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig,
};
use parquet::arrow::AsyncArrowWriter;
use parquet::arrow::async_writer::AsyncFileWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;

use crate::config::LakeSpec;
use crate::error::{Error, Result};

/// An open lake.
#[derive(Debug, Clone)]
pub struct Lake {
    /// Root URL, always ending in `/` (e.g. `file:///data/lake/`, `s3://bucket/lake/`).
    url: Url,
    /// `scheme://authority`, the key DataFusion finds the store under.
    store_url: Url,
    store: Arc<dyn ObjectStore>,
    /// The root as a path inside the store.
    root: Path,
}

/// An object the job wrote: where, how big, and its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenObject {
    /// Path relative to the folder it was written for (a run folder or the lake root).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
}

/// What a conditional create did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The object was created.
    Created,
    /// An object was there already; nothing was written.
    AlreadyExists,
    /// The store has no conditional puts; nothing was written.
    Unsupported,
}

/// Schemes the lake accepts.
pub const SUPPORTED_SCHEMES: &str = "a bare path, file://, s3://, gs://, az:// or memory://";

impl Lake {
    /// Opens the lake described by `spec` (URL plus S3 and retry settings).
    /// Builds clients only; touches no object.
    pub fn open(spec: &LakeSpec) -> Result<Lake> {
        let url = parse_lake_url(&spec.url)?;
        let retry = RetryConfig {
            max_retries: spec.max_retries,
            retry_timeout: Duration::from_secs(spec.retry_timeout_s),
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(spec.retry_backoff_ms),
                max_backoff: Duration::from_millis(spec.retry_backoff_max_ms),
                base: 2.0,
            },
        };
        // Set key by key, so settings taken from the environment (such as
        // AWS_ALLOW_HTTP) survive.
        let client = [
            (
                ClientConfigKey::Timeout,
                format!("{}s", spec.request_timeout_s),
            ),
            (
                ClientConfigKey::ConnectTimeout,
                format!("{}s", spec.connect_timeout_s),
            ),
        ];
        let bucket = url.host_str().unwrap_or_default().to_string();
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "file" => Arc::new(object_store::local::LocalFileSystem::new()),
            "memory" => memory_store(&bucket),
            "s3" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&bucket)
                    .with_retry(retry);
                for (key, value) in client {
                    b = b.with_config(object_store::aws::AmazonS3ConfigKey::Client(key), value);
                }
                if spec.allow_http {
                    b = b.with_allow_http(true);
                }
                if !spec.endpoint.is_empty() {
                    b = b.with_endpoint(&spec.endpoint);
                }
                if !spec.region.is_empty() {
                    b = b.with_region(&spec.region);
                }
                Arc::new(b.build().map_err(|e| store_build_error(&url, e))?)
            }
            "gs" => {
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&bucket)
                    .with_retry(retry);
                for (key, value) in client {
                    b = b.with_config(object_store::gcp::GoogleConfigKey::Client(key), value);
                }
                Arc::new(b.build().map_err(|e| store_build_error(&url, e))?)
            }
            "az" => {
                let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(&bucket)
                    .with_retry(retry);
                for (key, value) in client {
                    b = b.with_config(object_store::azure::AzureConfigKey::Client(key), value);
                }
                Arc::new(b.build().map_err(|e| store_build_error(&url, e))?)
            }
            other => return Err(unsupported_scheme(other)),
        };
        let root = Path::from_url_path(url.path())
            .map_err(|e| Error::config(format!("lake URL {url}: bad path: {e}")))?;
        let store_url = Url::parse(&format!("{}://{}", url.scheme(), bucket))
            .map_err(|e| Error::config(format!("lake URL {url}: {e}")))?;
        Ok(Lake {
            url,
            store_url,
            store,
            root,
        })
    }

    /// The lake root URL (ends in `/`).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The underlying store.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
    }

    /// Makes the lake's store reachable from DataFusion queries.
    pub fn register(&self, ctx: &SessionContext) {
        ctx.register_object_store(&self.store_url, self.store());
    }

    /// The store path of `rel` (a `/`-separated path below the root).
    pub fn path(&self, rel: &str) -> Path {
        let mut path = self.root.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }

    /// The URL of `rel`, for DataFusion table registration. A trailing `/`
    /// in `rel` marks a folder.
    pub fn url_of(&self, rel: &str) -> String {
        let mut url = self.url.to_string();
        url.push_str(rel.trim_start_matches('/'));
        url
    }

    /// The path of `location` relative to `base` (a path from [`Lake::path`]).
    pub fn relative_to(base: &Path, location: &Path) -> String {
        match location.prefix_match(base) {
            Some(parts) => parts
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/"),
            None => location.to_string(),
        }
    }

    /// Writes `bytes` to `rel` with one put.
    pub async fn put(&self, rel: &str, bytes: Bytes) -> Result<WrittenObject> {
        let path = self.path(rel);
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let size = bytes.len() as u64;
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| Error::from_store(self.display(&path), e))?;
        Ok(WrittenObject {
            path: rel.to_string(),
            size,
            sha256,
        })
    }

    /// Writes `bytes` to `rel` only if no object is there (a conditional
    /// put: `If-None-Match: *` on S3, a hard link on a local disk).
    pub async fn put_create(&self, rel: &str, bytes: Bytes) -> Result<CreateOutcome> {
        let path = self.path(rel);
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => Ok(CreateOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(CreateOutcome::AlreadyExists),
            Err(object_store::Error::NotImplemented { .. }) => Ok(CreateOutcome::Unsupported),
            Err(e) => Err(Error::from_store(self.display(&path), e)),
        }
    }

    /// Local lakes only: files under the folder `rel` that a killed writer
    /// left half-written. The local store writes `NAME#N` and renames it to
    /// `NAME` when complete; listings skip such files, so they are found on
    /// disk. Other stores never show an incomplete object (an unfinished S3
    /// multipart upload is invisible; a bucket lifecycle rule aborts it).
    pub fn staging_leftovers(&self, rel: &str) -> Vec<std::path::PathBuf> {
        let Some(dir) = self.local_dir(rel) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                match entry.file_type() {
                    Ok(t) if t.is_dir() => stack.push(path),
                    Ok(t) if t.is_file() && entry.file_name().to_string_lossy().contains('#') => {
                        found.push(path)
                    }
                    _ => {}
                }
            }
        }
        found.sort();
        found
    }

    /// Local lakes only: removes empty folders below the folder `rel` (and
    /// `rel` itself when it ends up empty), as deleting objects leaves them.
    pub fn remove_empty_folders(&self, rel: &str) {
        fn prune(dir: &std::path::Path) -> bool {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return false;
            };
            let mut empty = true;
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) && prune(&path) {
                    let _ = std::fs::remove_dir(&path);
                } else {
                    empty = false;
                }
            }
            empty
        }
        if let Some(dir) = self.local_dir(rel)
            && prune(&dir)
        {
            let _ = std::fs::remove_dir(&dir);
        }
    }

    /// The local folder of `rel` on a `file://` lake.
    fn local_dir(&self, rel: &str) -> Option<std::path::PathBuf> {
        if self.url.scheme() != "file" {
            return None;
        }
        let root = self.url.to_file_path().ok()?;
        Some(
            rel.split('/')
                .filter(|p| !p.is_empty())
                .fold(root, |dir, part| dir.join(part)),
        )
    }

    /// Reads the whole object at `rel`.
    pub async fn get(&self, rel: &str) -> Result<Bytes> {
        let path = self.path(rel);
        let get = self
            .store
            .get(&path)
            .await
            .map_err(|e| Error::from_store(self.display(&path), e))?;
        get.bytes()
            .await
            .map_err(|e| Error::from_store(self.display(&path), e))
    }

    /// Metadata of `rel`, `None` when it does not exist.
    pub async fn head(&self, rel: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(rel);
        match self.store.head(&path).await {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::from_store(self.display(&path), e)),
        }
    }

    /// Deletes `rel`; a missing object is not an error.
    pub async fn delete(&self, rel: &str) -> Result<()> {
        let path = self.path(rel);
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::from_store(self.display(&path), e)),
        }
    }

    /// Every object below the folder `rel`, sorted by path.
    pub async fn list(&self, rel: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = self.path(rel);
        let mut objects: Vec<ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| Error::from_store(self.display(&prefix), e))?;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    /// The immediate sub-folders of the folder `rel` (their names only).
    pub async fn list_folders(&self, rel: &str) -> Result<Vec<String>> {
        let prefix = self.path(rel);
        let listing = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| Error::from_store(self.display(&prefix), e))?;
        let mut names: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Starts a Parquet object at `rel`: nothing is visible there until
    /// [`ParquetUpload::finish`] succeeds.
    pub fn start_parquet(
        &self,
        rel: &str,
        schema: SchemaRef,
        metadata: Vec<(String, String)>,
    ) -> Result<ParquetUpload> {
        self.start_parquet_grouped(rel, schema, metadata, RowGroups::Bounded)
    }

    /// [`Lake::start_parquet`], its row groups cut as `groups` says.
    pub fn start_parquet_grouped(
        &self,
        rel: &str,
        schema: SchemaRef,
        metadata: Vec<(String, String)>,
        groups: RowGroups,
    ) -> Result<ParquetUpload> {
        let path = self.path(rel);
        let location = self.display(&path);
        let sink = HashingWriter {
            inner: BufWriter::new(self.store(), path),
            hasher: Sha256::new(),
            size: 0,
        };
        let mut props = writer_properties(metadata);
        if let RowGroups::BetweenBatches { .. } = groups {
            props = props
                .into_builder()
                .set_max_row_group_row_count(None)
                .set_max_row_group_bytes(None)
                .build();
        }
        let writer = AsyncArrowWriter::try_new(sink, schema, Some(props)).map_err(|e| {
            Error::internal(format!("{location}: cannot start Parquet writer: {e}"))
        })?;
        Ok(ParquetUpload {
            writer,
            rel: rel.to_string(),
            location,
            groups,
        })
    }

    /// Streams record batches into one Parquet object at `rel`, hashing the
    /// bytes on their way out. On an error the upload is abandoned, so nothing
    /// is left at `rel`.
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
        self.write_parquet_grouped(rel, schema, batches, metadata, RowGroups::Bounded)
            .await
    }

    /// [`Lake::write_parquet`], its row groups cut as `groups` says.
    pub async fn write_parquet_grouped<S>(
        &self,
        rel: &str,
        schema: SchemaRef,
        batches: S,
        metadata: Vec<(String, String)>,
        groups: RowGroups,
    ) -> Result<WrittenObject>
    where
        S: Stream<Item = Result<RecordBatch>> + Send,
    {
        let mut upload = self.start_parquet_grouped(rel, schema, metadata, groups)?;
        let mut batches = std::pin::pin!(batches);
        while let Some(batch) = batches.next().await {
            let written = match batch {
                Ok(batch) => upload.write(&batch).await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                upload.abort().await;
                return Err(e);
            }
        }
        upload.finish().await
    }

    /// Writes a stream sorted by the string column `partition` as Hive
    /// partitions: `folder/<partition>=<value>/part-00000.parquet`, one file
    /// per value, the partition column left out of the files. File names are
    /// fixed, so writing the same data again replaces rather than duplicates.
    pub async fn write_hive_partitions<S>(
        &self,
        folder: &str,
        partition: &str,
        batches: S,
    ) -> Result<Vec<WrittenObject>>
    where
        S: Stream<Item = Result<RecordBatch>> + Send,
    {
        let mut written = Vec::new();
        let mut current: Option<(String, ParquetUpload)> = None;
        let mut batches = std::pin::pin!(batches);
        let outcome: Result<()> = async {
            while let Some(batch) = batches.next().await {
                let batch = batch?;
                let index = batch
                    .schema()
                    .index_of(partition)
                    .map_err(|_| Error::internal(format!("no partition column {partition}")))?;
                let values =
                    arrow::compute::cast(batch.column(index), &arrow::datatypes::DataType::Utf8)
                        .map_err(|e| Error::internal(e.to_string()))?;
                let values = values.as_string::<i32>();
                let keep: Vec<usize> = (0..batch.num_columns()).filter(|&i| i != index).collect();
                let data = batch
                    .project(&keep)
                    .map_err(|e| Error::internal(e.to_string()))?;
                let mut start = 0;
                while start < batch.num_rows() {
                    let value = values.value(start);
                    let mut end = start + 1;
                    while end < batch.num_rows() && values.value(end) == value {
                        end += 1;
                    }
                    if current.as_ref().is_none_or(|(v, _)| v != value) {
                        let safe = !value.is_empty()
                            && value
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                        if !safe {
                            return Err(Error::internal(format!(
                                "unsafe partition value {value:?}"
                            )));
                        }
                        if let Some((_, upload)) = current.take() {
                            written.push(upload.finish().await?);
                        }
                        let rel = format!("{folder}/{partition}={value}/part-00000.parquet");
                        current = Some((
                            value.to_string(),
                            self.start_parquet(&rel, data.schema(), vec![])?,
                        ));
                    }
                    if let Some((_, upload)) = current.as_mut() {
                        upload.write(&data.slice(start, end - start)).await?;
                    }
                    start = end;
                }
            }
            Ok(())
        }
        .await;
        match (outcome, current) {
            (Ok(()), Some((_, upload))) => written.push(upload.finish().await?),
            (Ok(()), None) => {}
            (Err(e), current) => {
                if let Some((_, upload)) = current {
                    upload.abort().await;
                }
                return Err(e);
            }
        }
        Ok(written)
    }

    /// Deletes every object under the folder `rel` that is not in `keep`
    /// (paths relative to the lake root).
    pub async fn delete_others(&self, rel: &str, keep: &[WrittenObject]) -> Result<usize> {
        let root = self.path("");
        let mut deleted = 0;
        for object in self.list(rel).await? {
            let path = Lake::relative_to(&root, &object.location);
            if !keep.iter().any(|k| k.path == path) {
                self.delete(&path).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Writes a list of batches (all of `schema`) as one Parquet object.
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

    /// `url` of the object at `path`, for messages.
    pub fn display(&self, path: &Path) -> String {
        format!(
            "{}://{}/{}",
            self.store_url.scheme(),
            self.store_url.host_str().unwrap_or(""),
            path
        )
    }
}

/// Largest row group a writer buffers, in bytes.
pub const ROW_GROUP_BYTES: usize = 32 * 1024 * 1024;

impl RowGroups {
    /// One row group per batch: a shard's part, whose batches a join
    /// hands on unchanged (see [`concat`]).
    pub const PER_BATCH: RowGroups = RowGroups::BetweenBatches { rows: 1 };
}

/// Where a Parquet writer ends its row groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowGroups {
    /// At [`ROW_GROUP_BYTES`] or the default row count, wherever a batch is.
    Bounded,
    /// Only between batches: a group ends after the batch that brings it to
    /// `rows` rows or a quarter of [`ROW_GROUP_BYTES`], so the rows of one
    /// batch are never split between two groups (a reader can then take
    /// each group on its own, such as a user's soft labels).
    BetweenBatches {
        /// Rows after which the group ends.
        rows: usize,
    },
}

/// The Parquet settings of every file the job writes: Snappy (read by every
/// BI tool), statistics on, row groups of at most [`ROW_GROUP_BYTES`], and
/// our key-value metadata.
pub fn writer_properties(metadata: Vec<(String, String)>) -> WriterProperties {
    let kv: Vec<KeyValue> = metadata
        .into_iter()
        .map(|(k, v)| KeyValue::new(k, v))
        .collect();
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        // A row group is buffered until it is flushed: bound it by bytes as
        // well as rows, so wide rows (soft-label lists) keep memory flat.
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
        .set_key_value_metadata(if kv.is_empty() { None } else { Some(kv) })
        .build()
}

/// A Parquet sink that counts and hashes the bytes it passes on.
struct HashingWriter {
    inner: BufWriter,
    hasher: Sha256,
    size: u64,
}

impl AsyncFileWriter for HashingWriter {
    fn write(&mut self, bs: Bytes) -> futures::future::BoxFuture<'_, parquet::errors::Result<()>> {
        self.hasher.update(&bs);
        self.size += bs.len() as u64;
        AsyncFileWriter::write(&mut self.inner, bs)
    }

    fn complete(&mut self) -> futures::future::BoxFuture<'_, parquet::errors::Result<()>> {
        AsyncFileWriter::complete(&mut self.inner)
    }
}

/// A Parquet object being written; see [`Lake::start_parquet`].
pub struct ParquetUpload {
    writer: AsyncArrowWriter<HashingWriter>,
    rel: String,
    location: String,
    groups: RowGroups,
}

impl ParquetUpload {
    /// Appends a batch.
    pub async fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let fail = |e: parquet::errors::ParquetError| {
            Error::io(&self.location, format!("writing Parquet: {e}"))
        };
        self.writer.write(batch).await.map_err(fail)?;
        if let RowGroups::BetweenBatches { rows } = self.groups
            && (self.writer.in_progress_rows() >= rows
                || self.writer.in_progress_size() >= ROW_GROUP_BYTES / 4)
        {
            self.writer.flush().await.map_err(fail)?;
        }
        Ok(())
    }

    /// Completes the object and makes it visible.
    pub async fn finish(mut self) -> Result<WrittenObject> {
        // A failed finish needs no abort: a single put that failed left
        // nothing, and a multipart upload that did not complete stays
        // invisible (the writer is shut down and cannot be aborted).
        if let Err(e) = self.writer.finish().await {
            return Err(Error::io(&self.location, format!("finishing Parquet: {e}")));
        }
        let sink = self.writer.into_inner();
        Ok(WrittenObject {
            path: self.rel,
            size: sink.size,
            sha256: hex::encode(sink.hasher.finalize()),
        })
    }

    /// Abandons the object before [`ParquetUpload::finish`]: a multipart
    /// upload is aborted, a buffered put never happens.
    pub async fn abort(self) {
        let mut upload = self.writer.into_inner().inner;
        let _ = upload.abort().await;
    }
}

/// Parses a lake URL or bare path into a root URL ending in `/`.
pub fn parse_lake_url(raw: &str) -> Result<Url> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(Error::config("lake URL is empty"));
    }
    // URL parsing would quietly resolve `a/../b`; refuse traversal as written,
    // also when percent-encoded.
    let decoded_raw = percent_decode(raw);
    if decoded_raw
        .split(['/', '\\'])
        .any(|p| p == ".." || p == ".")
    {
        return Err(Error::config(format!(
            "lake URL {raw:?} contains '.' or '..' segments"
        )));
    }
    let looks_like_url = raw.contains("://");
    let mut url = if looks_like_url {
        let url = Url::parse(raw)
            .map_err(|e| Error::config(format!("lake URL {raw:?} is not a URL: {e}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            // Do not echo the URL: it holds a secret.
            return Err(Error::config(
                "lake URL carries credentials; pass them in the environment (AWS_*, GOOGLE_*, AZURE_*) instead",
            ));
        }
        match url.scheme() {
            "file" | "memory" | "s3" | "gs" | "az" => {}
            other => return Err(unsupported_scheme(other)),
        }
        if url.scheme() != "file" && url.host_str().unwrap_or_default().is_empty() {
            return Err(Error::config(format!(
                "lake URL {raw:?} names no bucket (expected {}://BUCKET/path)",
                url.scheme()
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(Error::config(format!(
                "lake URL {raw:?} must not have a query or fragment"
            )));
        }
        url
    } else {
        let path = std::path::Path::new(raw);
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::config(format!("cannot resolve lake path {raw:?}: {e}")))?
                .join(path)
        };
        Url::from_directory_path(&absolute)
            .map_err(|_| Error::config(format!("lake path {raw:?} cannot be turned into a URL")))?
    };
    // Refuse traversal in the path part, also URL-encoded.
    let decoded = percent_decode(url.path());
    if decoded.split('/').any(|p| p == ".." || p == ".") || decoded.contains('\\') {
        return Err(Error::config(format!(
            "lake URL {raw:?} contains '.' or '..' segments"
        )));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn unsupported_scheme(scheme: &str) -> Error {
    Error::config(format!(
        "lake URL scheme {scheme:?} is not supported; use {SUPPORTED_SCHEMES}"
    ))
}

fn store_build_error(url: &Url, err: object_store::Error) -> Error {
    Error::config(format!("cannot set up the store for {url}: {err}"))
}

/// `memory://NAME` stores live for the whole process, so two opens of the same
/// URL see the same objects (as two opens of a bucket would).
fn memory_store(name: &str) -> Arc<dyn ObjectStore> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    let mut stores = stores.lock().unwrap_or_else(|p| p.into_inner());
    let store = stores
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(InMemory::new()));
    Arc::clone(store) as Arc<dyn ObjectStore>
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lake_urls() {
        assert_eq!(
            parse_lake_url("s3://b/lake").unwrap().as_str(),
            "s3://b/lake/"
        );
        assert_eq!(
            parse_lake_url("memory://t").unwrap().as_str(),
            "memory://t/"
        );
        assert!(
            parse_lake_url("/tmp/x")
                .unwrap()
                .as_str()
                .starts_with("file:///tmp/x/")
        );
        let rel = parse_lake_url("lake").unwrap();
        assert!(rel.as_str().ends_with("/lake/"), "{rel}");
        for bad in [
            "ftp://x/y",
            "hdfs://n/p",
            "s3://",
            "s3://b/a/../c",
            "s3://b/%2e%2e/c",
            "s3://k:secret@b/x",
        ] {
            let err = parse_lake_url(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[tokio::test]
    async fn put_get_list_delete_on_memory_lake() {
        let lake = Lake::open(&LakeSpec {
            url: "memory://lake-unit".into(),
            ..LakeSpec::default()
        })
        .unwrap();
        let written = lake
            .put("a/b.txt", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        assert_eq!(written.size, 5);
        assert_eq!(
            written.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(lake.get("a/b.txt").await.unwrap().as_ref(), b"hello");
        assert_eq!(lake.list("a").await.unwrap().len(), 1);
        lake.delete("a/b.txt").await.unwrap();
        lake.delete("a/b.txt").await.unwrap();
        assert!(lake.head("a/b.txt").await.unwrap().is_none());
    }
}
