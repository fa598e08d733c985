//! `[lake]` and `[input]`: where the lake is, how to reach it, and how its
//! input tables are read and checked.

use serde::{Deserialize, Serialize};

/// `[lake]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LakeSpec {
    /// Lake root: a bare path, `file://`, `s3://`, `gs://`, `az://` or `memory://` URL.
    pub url: String,
    /// Endpoint of an S3-compatible server (MinIO, Ceph, ...); empty for AWS.
    pub endpoint: String,
    /// S3 region; empty to take it from `AWS_REGION` / `AWS_DEFAULT_REGION`.
    pub region: String,
    /// Allow plain-HTTP endpoints (local S3-compatible servers).
    pub allow_http: bool,
    /// Folder under the lake root where job runs are written.
    pub output_prefix: String,
    /// Retries of failed storage requests (5xx, 429, resets): at most this many.
    pub max_retries: usize,
    /// Retries stop after this many seconds from the first attempt.
    pub retry_timeout_s: u64,
    /// First wait before a retry, in milliseconds; it doubles per retry.
    pub retry_backoff_ms: u64,
    /// Longest wait between retries, in milliseconds.
    pub retry_backoff_max_ms: u64,
    /// A request that has not completed after this many seconds fails (and
    /// is retried).
    pub request_timeout_s: u64,
    /// Connecting to the store gives up after this many seconds (and is retried).
    pub connect_timeout_s: u64,
    /// A run holds its run folder's lease for this long, renewing it every
    /// quarter; a killed run's folder is free again this long after its
    /// last renewal.
    pub lease_s: u64,
    /// Where the job's SQL runs: empty for in-process DataFusion, or
    /// `df://HOST:PORT` for an Apache Ballista scheduler (its executors then
    /// read the lake with their own credentials).
    pub engine: String,
}

/// The Ballista scheduler port when `lake.engine` names none.
pub const BALLISTA_DEFAULT_PORT: u16 = 50050;

impl LakeSpec {
    /// The Ballista scheduler `lake.engine` names, as `(host, port)`;
    /// `None` for in-process DataFusion.
    pub fn ballista_scheduler(&self) -> std::result::Result<Option<(String, u16)>, String> {
        let engine = self.engine.trim();
        if engine.is_empty() {
            return Ok(None);
        }
        let bad = || {
            format!(
                "lake.engine = {engine:?}: expected \"\" (in-process DataFusion) or df://HOST[:PORT] (a Ballista scheduler)"
            )
        };
        let rest = engine.strip_prefix("df://").ok_or_else(bad)?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().map_err(|_| bad())?),
            None => (rest, BALLISTA_DEFAULT_PORT),
        };
        if host.is_empty() || host.contains('/') || host.contains('@') {
            return Err(bad());
        }
        Ok(Some((host.to_string(), port)))
    }
}

impl Default for LakeSpec {
    fn default() -> Self {
        LakeSpec {
            url: "lake".into(),
            endpoint: String::new(),
            region: String::new(),
            allow_http: false,
            output_prefix: "recdistill".into(),
            max_retries: 10,
            retry_timeout_s: 180,
            retry_backoff_ms: 100,
            retry_backoff_max_ms: 15_000,
            request_timeout_s: 30,
            connect_timeout_s: 5,
            lease_s: 60,
            engine: String::new(),
        }
    }
}

/// `[input]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputSpec {
    /// Interactions table folder, relative to the lake root.
    pub interactions: String,
    /// Items table folder, relative to the lake root; empty when there is none.
    pub items: String,
    /// Item content table folder (item_id, embedding), relative to the lake
    /// root; empty when there is none.
    pub item_content: String,
    /// The Bayes ceiling table of a synthetic log (`recdistill sample`
    /// writes it), relative to the lake root: each model's accuracy is also
    /// reported as a fraction of it. Absent (every real log): no fraction.
    pub ceiling: String,
    /// Memory DataFusion may use for queries, in MiB.
    pub memory_limit_mb: usize,
    /// DataFusion partitions (parallel streams); 0 means one per core.
    pub target_partitions: usize,
    /// Rows per record batch.
    pub batch_size: usize,
    /// Events before this instant (RFC 3339) are refused as invalid.
    pub min_timestamp: String,
    /// Events at or after this instant (RFC 3339) are refused as invalid.
    pub max_timestamp: String,
    /// Days of `dt=` partitions a run reads, ending with its run date: 7
    /// reads `dt` from D-6 to D. 0 reads all of history up to D. Partitions
    /// after the run date are never read, so a backfill sees what its own
    /// day saw.
    pub window_days: u32,
}

impl Default for InputSpec {
    fn default() -> Self {
        InputSpec {
            interactions: "interactions".into(),
            items: "items".into(),
            item_content: String::new(),
            ceiling: "ceiling".into(),
            memory_limit_mb: 2048,
            target_partitions: 0,
            batch_size: 8192,
            min_timestamp: "1990-01-01T00:00:00Z".into(),
            max_timestamp: "2100-01-01T00:00:00Z".into(),
            window_days: 0,
        }
    }
}
