//! The job spec: a TOML file in `jobs/`, overridden by `--set key.path=value`,
//! turned into one validated, typed config. Every key has a default, so an
//! empty file is a valid job; unknown keys are refused with the file named.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The embedded default job: the bundled sample in a local `lake/` folder.
pub const SAMPLE_JOB_TOML: &str = include_str!("../jobs/sample.toml");

/// A job spec with everything resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSpec {
    /// Job name: the folder its runs are written under.
    pub name: String,
    /// Seed for every random choice (initialization, shuffling, sampling).
    pub seed: u64,
    /// Where models train: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    pub device: String,
    /// Threads the teacher trains with; 0 means one per core. Stages run
    /// one after another, so each gets them all (DataFusion's share is
    /// `input.target_partitions`).
    pub threads: usize,
    /// Where the lake is and how to reach it.
    pub lake: LakeSpec,
    /// Input tables and how they are read and checked.
    pub input: InputSpec,
    /// Feature SQL and its parameters.
    pub features: FeatureSpec,
    /// Train / valid / test split protocol.
    pub split: SplitSpec,
    /// Metrics and recommendation lists.
    pub evaluation: EvaluationSpec,
    /// Models to train.
    pub models: ModelsSpec,
    /// Soft labels and the teacher → assistant → student chain.
    pub distill: DistillSpec,
    /// Compressed variants of the distilled students.
    pub compress: CompressSpec,
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            name: "sample".into(),
            seed: 42,
            device: "cpu".into(),
            threads: 0,
            lake: LakeSpec::default(),
            input: InputSpec::default(),
            features: FeatureSpec::default(),
            split: SplitSpec::default(),
            evaluation: EvaluationSpec::default(),
            models: ModelsSpec::default(),
            distill: DistillSpec::default(),
            compress: CompressSpec::default(),
        }
    }
}

/// `[compress]`: compressed variants of trained SASRec models (the
/// distilled students), each saved as stored (integers, sparse rows or
/// factors) and evaluated and timed like any other model under the name
/// `<model>@<variant>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressSpec {
    /// Make the variants.
    pub enabled: bool,
    /// The models to compress; empty for the student distilled with the
    /// first loss family, from the teacher (or, with `distill.direct = false`,
    /// via the assistants). Nothing is compressed without `[distill]`.
    pub models: Vec<String>,
    /// Variants: `int8`, `int4`, `prune-unstructured-<sparsity>`,
    /// `prune-structured-<fraction>`, `lowrank-<rank>` (or a fraction of
    /// d_model, `lowrank-0.5`, or the spectral energy kept, `lowrank-e0.9`),
    /// or several joined with `+` (`lowrank-0.5+int8`).
    pub variants: Vec<String>,
    /// Unstructured pruning: `layer` (each matrix to the sparsity) or
    /// `global` (one magnitude threshold over all matrices).
    pub prune_scope: String,
    /// Values sharing one scale in `int4`.
    pub int4_group: usize,
    /// Recovery fine-tuning of pruned and low-rank variants against the
    /// distillation source's soft labels: most epochs (0 for none).
    pub recovery_epochs: usize,
    /// Stop recovery after this many epochs without a better valid NDCG@10.
    pub recovery_patience: usize,
    /// Recovery learning rate; 0 for the student's.
    pub recovery_lr: f64,
}

impl Default for CompressSpec {
    fn default() -> Self {
        CompressSpec {
            enabled: true,
            models: Vec::new(),
            variants: [
                "int8",
                "int4",
                "prune-unstructured-0.5",
                "prune-structured-0.5",
                "lowrank-0.5",
                "lowrank-0.5+int8",
                "prune-structured-0.5+int8",
            ]
            .map(String::from)
            .to_vec(),
            prune_scope: "layer".into(),
            int4_group: 32,
            recovery_epochs: 10,
            recovery_patience: 3,
            recovery_lr: 0.0,
        }
    }
}

impl CompressSpec {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.variants.is_empty() {
            return Err("compress.variants must list at least one variant".into());
        }
        let mut seen = Vec::new();
        for v in &self.variants {
            let variant: crate::compress::Variant = v
                .parse()
                .map_err(|e: Error| format!("compress.variants: {e}"))?;
            let name = variant.to_string();
            if seen.contains(&name) {
                return Err(format!("compress.variants lists {name:?} twice"));
            }
            seen.push(name);
        }
        for m in &self.models {
            check_segment("compress.models entry", m).map_err(|e| e.to_string())?;
        }
        if !matches!(self.prune_scope.as_str(), "layer" | "global") {
            return Err(format!(
                "compress.prune_scope {:?}: use layer or global",
                self.prune_scope
            ));
        }
        if self.int4_group == 0 || self.int4_group > 4096 {
            return Err("compress.int4_group must be in 1..=4096".into());
        }
        if !(self.recovery_lr.is_finite() && self.recovery_lr >= 0.0) {
            return Err("compress.recovery_lr must be ≥ 0".into());
        }
        Ok(())
    }
}

/// `[distill]`: the source teacher's soft labels, the chain of assistants
/// that each learn from the previous link's soft labels and emit their own,
/// and the student — trained from scratch, distilled directly from the
/// teacher and via the assistants, once per loss family (the ablation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillSpec {
    /// Emit soft labels and train the chain.
    pub enabled: bool,
    /// The teacher model the chain starts from (`teacher` or `teacher-content`).
    pub source: String,
    /// Items per soft label (the teacher's top K).
    pub k: usize,
    /// Soft labels for the last `positions` positions of each user; 0 for
    /// every position the producing model's `max_len` window holds.
    pub positions: usize,
    /// Weight of the hard-label loss: `alpha · hard + (1 − alpha) · soft`.
    pub alpha: f32,
    /// Temperature of the KL and MSE losses (and of the soft labels' rest bucket).
    pub temperature: f32,
    /// Ranking distillation: the teacher's r-th item weighs `exp(−r / rank_decay)`.
    pub rank_decay: f32,
    /// Loss families the student is distilled with, one student each:
    /// `kl`, `mse`, `rank` or `+`-joined (`kl+rank`). The first is the
    /// assistants' unless they name their own.
    pub losses: Vec<String>,
    /// Also train the student on hard labels only (`<student>-scratch`).
    pub scratch: bool,
    /// Also distil the student directly from the teacher (`<student>-kd-teacher-<loss>`).
    pub direct: bool,
    /// Train the assistants and students once per seed (names end in
    /// `-s<seed>`); empty for once, with the job's seed. The teacher is
    /// trained once.
    pub seeds: Vec<u64>,
    /// The assistants, in chain order (`[[distill.assistants]]`; `[]` for none).
    pub assistants: Vec<LinkSpec>,
    /// The student (`[distill.student]`).
    pub student: LinkSpec,
}

impl Default for DistillSpec {
    fn default() -> Self {
        DistillSpec {
            enabled: true,
            source: "teacher".into(),
            k: 50,
            positions: 0,
            alpha: 0.5,
            temperature: 2.0,
            rank_decay: 5.0,
            losses: vec!["kl".into(), "mse".into(), "rank".into()],
            scratch: true,
            direct: true,
            seeds: Vec::new(),
            assistants: vec![LinkSpec {
                name: "assistant".into(),
                d_model: 64,
                layers: 2,
                heads: 2,
                ffn: 64,
                ..LinkSpec::default()
            }],
            student: LinkSpec::default(),
        }
    }
}

/// One link of the chain: a SASRec model, its training, and how it mixes
/// the previous link's soft labels with the hard labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkSpec {
    /// Model name (students get a suffix per training: `-scratch`, `-kd-teacher-kl`, ...).
    pub name: String,
    /// Width of every hidden state.
    pub d_model: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads (must divide d_model).
    pub heads: usize,
    /// Width of the feed-forward layer.
    pub ffn: usize,
    /// Most recent items the model sees.
    pub max_len: usize,
    /// Dropout probability.
    pub dropout: f32,
    /// Sequences per step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Decoupled weight decay (AdamW); 0 is Adam.
    pub weight_decay: f64,
    /// Most epochs.
    pub epochs: usize,
    /// Stop after this many epochs without a better validation NDCG@10.
    pub patience: usize,
    /// Loss family of an assistant; empty for the first of `distill.losses`.
    pub loss: String,
    /// This link's α; unset for `distill.alpha`.
    pub alpha: Option<f32>,
    /// This link's temperature; unset for `distill.temperature`. The
    /// previous link's soft labels are emitted at it.
    pub temperature: Option<f32>,
}

impl Default for LinkSpec {
    fn default() -> Self {
        LinkSpec {
            name: "student".into(),
            d_model: 32,
            layers: 1,
            heads: 1,
            ffn: 32,
            max_len: 50,
            dropout: 0.2,
            batch_size: 128,
            lr: 0.001,
            beta1: 0.9,
            beta2: 0.98,
            weight_decay: 0.0,
            epochs: 200,
            patience: 20,
            loss: String::new(),
            alpha: None,
            temperature: None,
        }
    }
}

impl DistillSpec {
    /// The chain's links in order: the assistants, then the student.
    pub fn links(&self) -> Vec<&LinkSpec> {
        self.assistants
            .iter()
            .chain(std::iter::once(&self.student))
            .collect()
    }

    /// A link's α.
    pub fn alpha_of(&self, link: &LinkSpec) -> f32 {
        link.alpha.unwrap_or(self.alpha)
    }

    /// A link's temperature.
    pub fn temperature_of(&self, link: &LinkSpec) -> f32 {
        link.temperature.unwrap_or(self.temperature)
    }

    /// Checks the rules serde cannot express.
    fn validate(&self, models: &ModelsSpec) -> std::result::Result<(), String> {
        if !models.teacher.enabled {
            return Err(
                "distill.enabled needs [models.teacher] enabled: the chain starts from a teacher"
                    .into(),
            );
        }
        let t = &models.teacher;
        let teachers: Vec<&str> = [("teacher", t.ids), ("teacher-content", t.content)]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(name, _)| *name)
            .collect();
        if !teachers.contains(&self.source.as_str()) {
            return Err(format!(
                "distill.source {:?} is not a teacher this job trains ({})",
                self.source,
                teachers.join(", ")
            ));
        }
        if self.k == 0 {
            return Err("distill.k must be at least 1".into());
        }
        if self.losses.is_empty() {
            return Err("distill.losses must name at least one loss family".into());
        }
        for family in &self.losses {
            family
                .parse::<crate::loss::LossFamily>()
                .map_err(|e| format!("distill.losses: {e}"))?;
        }
        if !(self.rank_decay.is_finite() && self.rank_decay > 0.0) {
            return Err("distill.rank_decay must be > 0".into());
        }
        let mut names: Vec<&str> = teachers.clone();
        for link in self.links() {
            let at = |msg: String| format!("distill link {:?}: {msg}", link.name);
            check_segment("distill link name", &link.name).map_err(|e| at(e.to_string()))?;
            if names.contains(&link.name.as_str()) {
                return Err(at("the name is taken by another model".into()));
            }
            names.push(&link.name);
            if !link.loss.is_empty() {
                link.loss
                    .parse::<crate::loss::LossFamily>()
                    .map_err(|e| at(e.to_string()))?;
            }
            let alpha = self.alpha_of(link);
            if !(0.0..=1.0).contains(&alpha) {
                return Err(at(format!("alpha {alpha} must be in [0, 1]")));
            }
            let t = self.temperature_of(link);
            if !(t.is_finite() && t > 0.0) {
                return Err(at(format!("temperature {t} must be > 0")));
            }
            check_sasrec(
                &format!("distill link {:?}", link.name),
                [
                    link.d_model,
                    link.layers,
                    link.heads,
                    link.ffn,
                    link.max_len,
                    link.batch_size,
                    link.epochs,
                ],
                (
                    link.lr,
                    link.beta1,
                    link.beta2,
                    link.weight_decay,
                    link.dropout,
                ),
            )?;
        }
        Ok(())
    }
}

/// The size and optimizer rules every SASRec section obeys: `sizes` are
/// d_model, layers, heads, ffn, max_len, batch_size, epochs; `optimizer` is
/// lr, beta1, beta2, weight_decay, dropout.
fn check_sasrec(
    section: &str,
    sizes: [usize; 7],
    optimizer: (f64, f64, f64, f64, f32),
) -> std::result::Result<(), String> {
    if sizes.contains(&0) {
        return Err(format!(
            "{section}: d_model, layers, heads, ffn, max_len, batch_size and epochs must be at least 1"
        ));
    }
    let (d_model, heads) = (sizes[0], sizes[2]);
    if !d_model.is_multiple_of(heads) {
        return Err(format!(
            "{section}: d_model {d_model} must be a multiple of heads {heads}"
        ));
    }
    let (lr, beta1, beta2, weight_decay, dropout) = optimizer;
    let valid = lr.is_finite()
        && lr > 0.0
        && (0.0..1.0).contains(&beta1)
        && (0.0..1.0).contains(&beta2)
        && weight_decay >= 0.0
        && (0.0..1.0).contains(&dropout);
    if !valid {
        return Err(format!(
            "{section}: lr must be > 0, beta1 and beta2 and dropout in [0, 1), weight_decay ≥ 0"
        ));
    }
    Ok(())
}

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
}

impl Default for InputSpec {
    fn default() -> Self {
        InputSpec {
            interactions: "interactions".into(),
            items: "items".into(),
            item_content: String::new(),
            memory_limit_mb: 2048,
            target_partitions: 0,
            batch_size: 8192,
            min_timestamp: "1990-01-01T00:00:00Z".into(),
            max_timestamp: "2100-01-01T00:00:00Z".into(),
        }
    }
}

/// `[features]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureSpec {
    /// Folder of the feature SQL files, relative to the job file; empty for
    /// the copies built into the binary (identical to the repository's `sql/`).
    pub sql_dir: String,
    /// Users with fewer events are dropped before splitting.
    pub min_user_events: u32,
    /// Items with fewer events are dropped before splitting.
    pub min_item_events: u32,
    /// A feature SQL file (in `sql_dir`, or built in) that builds the item
    /// content table from `items`; empty for none.
    pub item_content_sql: String,
}

impl Default for FeatureSpec {
    fn default() -> Self {
        FeatureSpec {
            sql_dir: String::new(),
            min_user_events: 1,
            min_item_events: 1,
            item_content_sql: String::new(),
        }
    }
}

/// The split protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Per user: last event → test, second-to-last → valid, the rest → train.
    #[serde(alias = "leave-one-out", alias = "loo")]
    LeaveOneOut,
    /// Global cut at timestamp quantiles: before → train, then valid, then test.
    Temporal,
}

impl Protocol {
    /// The name used in SQL file names and evaluation rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::LeaveOneOut => "leave_one_out",
            Protocol::Temporal => "temporal",
        }
    }
}

/// `[split]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitSpec {
    /// `leave_one_out` or `temporal`.
    pub protocol: Protocol,
    /// Temporal only: events at or after this quantile of timestamps are `valid`.
    pub valid_quantile: f64,
    /// Temporal only: events at or after this quantile of timestamps are `test`.
    pub test_quantile: f64,
}

impl Default for SplitSpec {
    fn default() -> Self {
        SplitSpec {
            protocol: Protocol::LeaveOneOut,
            valid_quantile: 0.8,
            test_quantile: 0.9,
        }
    }
}

/// `[evaluation]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluationSpec {
    /// Cut-offs for HR/NDCG/MRR@K.
    pub ks: Vec<u32>,
    /// Length of each user's recommendation list; 0 means the largest K.
    pub recommend_k: u32,
    /// Users scored together in one batch.
    pub batch_users: usize,
    /// Users scored one at a time for each model's latency percentiles
    /// (0: no latency or throughput measured).
    pub latency_users: usize,
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        EvaluationSpec {
            ks: vec![5, 10, 20],
            recommend_k: 0,
            batch_users: 256,
            latency_users: 200,
        }
    }
}

impl EvaluationSpec {
    /// Length of the recommendation lists written.
    pub fn list_len(&self) -> usize {
        if self.recommend_k > 0 {
            self.recommend_k as usize
        } else {
            self.ks.iter().copied().max().unwrap_or(10) as usize
        }
    }
}

/// `[models]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsSpec {
    /// `[models.popularity]`
    pub popularity: PopularitySpec,
    /// `[models.meanpool]`
    pub meanpool: MeanPoolSpec,
    /// `[models.teacher]`
    pub teacher: TeacherSpec,
}

/// `[models.teacher]`: the SASRec transformer whose knowledge is distilled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherSpec {
    /// Train and evaluate it.
    pub enabled: bool,
    /// Width of every hidden state.
    pub d_model: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads (must divide d_model).
    pub heads: usize,
    /// Width of the feed-forward layer.
    pub ffn: usize,
    /// Most recent items the model sees.
    pub max_len: usize,
    /// Dropout probability.
    pub dropout: f32,
    /// Sequences per step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Decoupled weight decay (AdamW); 0 is Adam.
    pub weight_decay: f64,
    /// Most epochs.
    pub epochs: usize,
    /// Stop after this many epochs without a better validation NDCG@10.
    pub patience: usize,
    /// `full` softmax over the catalogue, or `sampled` with log-Q correction.
    pub softmax: crate::train::Softmax,
    /// Negatives per step with sampled softmax.
    pub negatives: usize,
    /// How negatives are drawn: `popularity` or `uniform`.
    pub sampling: crate::train::Sampling,
    /// Train `teacher`, on item ids alone.
    pub ids: bool,
    /// Also train `teacher-content`, fed the item content table.
    pub content: bool,
}

impl Default for TeacherSpec {
    fn default() -> Self {
        TeacherSpec {
            enabled: true,
            d_model: 64,
            layers: 2,
            heads: 2,
            ffn: 64,
            max_len: 50,
            dropout: 0.2,
            batch_size: 128,
            lr: 0.001,
            beta1: 0.9,
            beta2: 0.98,
            weight_decay: 0.0,
            epochs: 200,
            patience: 20,
            softmax: crate::train::Softmax::Full,
            negatives: 1024,
            sampling: crate::train::Sampling::Popularity,
            ids: true,
            content: false,
        }
    }
}

/// `[models.popularity]`: items ranked by their train-split event counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PopularitySpec {
    /// Train and evaluate it.
    pub enabled: bool,
}

impl Default for PopularitySpec {
    fn default() -> Self {
        PopularitySpec { enabled: true }
    }
}

/// `[models.meanpool]`: the learned baseline. A user is the mean of the
/// embeddings of their last `window` items; scores are dot products with a
/// second (output) item table; trained with full-softmax cross-entropy on
/// the next item at every position of the train split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeanPoolSpec {
    /// Train and evaluate it.
    pub enabled: bool,
    /// Embedding width.
    pub d_model: usize,
    /// How many recent items make up the user.
    pub window: usize,
    /// Most epochs.
    pub epochs: usize,
    /// Stop after this many epochs without a better validation NDCG@10.
    pub patience: usize,
    /// Training examples per step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for MeanPoolSpec {
    fn default() -> Self {
        MeanPoolSpec {
            enabled: true,
            d_model: 64,
            window: 20,
            epochs: 30,
            patience: 3,
            batch_size: 256,
            lr: 0.003,
            weight_decay: 0.0,
        }
    }
}

/// A job spec with where it came from (to resolve relative paths and to name
/// the file in errors).
#[derive(Debug, Clone)]
pub struct Job {
    /// The resolved spec.
    pub spec: JobSpec,
    /// The job file, or `<embedded sample job>`.
    pub source: String,
    /// Folder of the job file; `None` for the embedded job.
    pub dir: Option<PathBuf>,
}

impl Job {
    /// Loads a job file and applies `--set` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Job> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("cannot read job file {}: {e}", path.display())))?;
        let dir = path.parent().map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        });
        Job::parse(&text, &path.display().to_string(), dir, overrides)
    }

    /// The embedded sample job, with `--set` overrides.
    pub fn embedded_sample(overrides: &[String]) -> Result<Job> {
        Job::parse(SAMPLE_JOB_TOML, "<embedded sample job>", None, overrides)
    }

    /// Parses job TOML text from `source`, applies overrides and validates.
    pub fn parse(
        text: &str,
        source: &str,
        dir: Option<PathBuf>,
        overrides: &[String],
    ) -> Result<Job> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            Error::config(format!("job file {source}: {}", e.to_string().trim_end()))
        })?;
        // Check the file on its own first, so an unknown key is reported
        // against the file (with line and column) rather than the merged result.
        JobSpec::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
            Error::config(format!("job file {source}: {}", e.to_string().trim_end()))
        })?;
        for assignment in overrides {
            apply_override(&mut table, assignment)?;
        }
        let spec = JobSpec::deserialize(toml::Value::Table(table)).map_err(|e| {
            Error::config(format!(
                "job file {source} with --set overrides: {}",
                e.to_string().trim_end()
            ))
        })?;
        spec.validate(source)?;
        Ok(Job {
            spec,
            source: source.to_string(),
            dir,
        })
    }

    /// SHA-256 of the resolved spec: equal specs hash equal, whatever their
    /// file layout or comments.
    pub fn config_hash(&self) -> String {
        let canonical = serde_json::to_vec(&self.spec).expect("job spec serializes");
        hex::encode(Sha256::digest(canonical))
    }
}

/// Applies one `key.path=value` assignment. The value is read as a TOML value
/// (`3`, `0.5`, `true`, `"text"`, `[5, 10]`); anything else is taken as a string.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let malformed = |why: &str| {
        Error::config(format!(
            "malformed --set {assignment:?}: {why} (expected key.path=value, e.g. models.meanpool.epochs=5)"
        ))
    };
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| malformed("no '='"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(malformed("empty key"));
    }
    let parts: Vec<&str> = key.split('.').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(malformed(
            "key parts must be non-empty letters, digits or '_'",
        ));
    }
    let value = parse_override_value(raw.trim());
    let (last, parents) = parts.split_last().expect("at least one part");
    let mut node = table;
    let mut walked = String::new();
    for part in parents {
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(part);
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(malformed(&format!("`{walked}` is a value, not a table"))),
        };
    }
    node.insert(last.to_string(), value);
    Ok(())
}

fn parse_override_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// A name that is safe as one path segment: letters, digits, `_` and `-`,
/// starting with a letter or digit. Rules out `..`, `/`, `%` and friends
/// before any I/O happens.
pub fn check_segment(what: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{what} {value:?} is not allowed: use 1-128 letters, digits, '_' or '-', starting with a letter or digit"
        )))
    }
}

/// A relative path inside the lake: `/`-separated segments of letters,
/// digits, `_`, `-`, `.` and `=`, none of them `.` or `..`.
pub fn check_relative_path(what: &str, value: &str) -> Result<()> {
    let bad = || {
        Error::config(format!(
            "{what} {value:?} is not allowed: use a relative path of letters, digits, '_', '-', '.', '=' (no '..', no leading '/')"
        ))
    };
    if value.is_empty() || value.starts_with('/') {
        return Err(bad());
    }
    for part in value.trim_end_matches('/').split('/') {
        let ok = !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '='));
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// Parses an RFC 3339 instant into microseconds since the epoch.
pub fn parse_instant_micros(what: &str, value: &str) -> Result<i64> {
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| t.timestamp_micros())
        .map_err(|e| Error::config(format!("{what} {value:?} is not an RFC 3339 instant: {e}")))
}

/// Parses a run date (`YYYY-MM-DD`).
pub fn parse_run_date(value: &str) -> Result<chrono::NaiveDate> {
    let ok_shape = value.len() == 10 && value.chars().all(|c| c.is_ascii_digit() || c == '-');
    let date = chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d").ok();
    match date {
        Some(d) if ok_shape => Ok(d),
        _ => Err(Error::config(format!(
            "run date {value:?} is not a date of the form YYYY-MM-DD"
        ))),
    }
}

impl JobSpec {
    /// Checks the rules serde cannot express.
    pub fn validate(&self, source: &str) -> Result<()> {
        let at = |msg: String| Error::config(format!("job file {source}: {msg}"));
        check_segment("job name", &self.name).map_err(|e| at(e.to_string()))?;
        for segment in self.lake.output_prefix.split('/') {
            check_segment("lake.output_prefix segment", segment).map_err(|e| at(e.to_string()))?;
        }
        check_relative_path("input.interactions", &self.input.interactions)
            .map_err(|e| at(e.to_string()))?;
        if !self.input.item_content.is_empty() {
            check_relative_path("input.item_content", &self.input.item_content)
                .map_err(|e| at(e.to_string()))?;
            if !self.features.item_content_sql.is_empty() {
                return Err(at(
                    "set input.item_content or features.item_content_sql, not both: the run has one item content table".into(),
                ));
            }
        }
        if !self.features.item_content_sql.is_empty() {
            check_relative_path("features.item_content_sql", &self.features.item_content_sql)
                .map_err(|e| at(e.to_string()))?;
        }
        if !self.input.items.is_empty() {
            check_relative_path("input.items", &self.input.items).map_err(|e| at(e.to_string()))?;
        }
        for (key, value) in [
            ("lake.lease_s", self.lake.lease_s),
            ("lake.request_timeout_s", self.lake.request_timeout_s),
            ("lake.connect_timeout_s", self.lake.connect_timeout_s),
        ] {
            if value == 0 {
                return Err(at(format!("{key} must be at least 1")));
            }
        }
        if self.lake.retry_backoff_ms > self.lake.retry_backoff_max_ms {
            return Err(at(
                "lake.retry_backoff_ms must not exceed lake.retry_backoff_max_ms".into(),
            ));
        }
        if self.input.batch_size == 0 {
            return Err(at("input.batch_size must be at least 1".into()));
        }
        if self.input.memory_limit_mb < 64 {
            return Err(at("input.memory_limit_mb must be at least 64".into()));
        }
        let min = parse_instant_micros("input.min_timestamp", &self.input.min_timestamp)
            .map_err(|e| at(e.to_string()))?;
        let max = parse_instant_micros("input.max_timestamp", &self.input.max_timestamp)
            .map_err(|e| at(e.to_string()))?;
        if min >= max {
            return Err(at(
                "input.min_timestamp must be before input.max_timestamp".into()
            ));
        }
        let q = (self.split.valid_quantile, self.split.test_quantile);
        if !(0.0 < q.0 && q.0 < q.1 && q.1 < 1.0) {
            return Err(at(format!(
                "split quantiles must satisfy 0 < valid_quantile ({}) < test_quantile ({}) < 1",
                q.0, q.1
            )));
        }
        if self.evaluation.ks.is_empty() || self.evaluation.ks.contains(&0) {
            return Err(at("evaluation.ks must list cut-offs of at least 1".into()));
        }
        if self.evaluation.batch_users == 0 {
            return Err(at("evaluation.batch_users must be at least 1".into()));
        }
        let m = &self.models.meanpool;
        if m.enabled {
            if m.d_model == 0 || m.window == 0 || m.batch_size == 0 || m.epochs == 0 {
                return Err(at(
                    "models.meanpool: d_model, window, batch_size and epochs must be at least 1"
                        .into(),
                ));
            }
            let valid = m.lr.is_finite() && m.lr > 0.0 && m.weight_decay >= 0.0;
            if !valid {
                return Err(at(
                    "models.meanpool: lr must be > 0 and weight_decay ≥ 0".into()
                ));
            }
        }
        let t = &self.models.teacher;
        if t.enabled {
            check_sasrec(
                "models.teacher",
                [
                    t.d_model,
                    t.layers,
                    t.heads,
                    t.ffn,
                    t.max_len,
                    t.batch_size,
                    t.epochs,
                ],
                (t.lr, t.beta1, t.beta2, t.weight_decay, t.dropout),
            )
            .map_err(at)?;
            if t.softmax == crate::train::Softmax::Sampled && t.negatives == 0 {
                return Err(at(
                    "models.teacher: sampled softmax needs negatives ≥ 1".into()
                ));
            }
            if !t.ids && !t.content {
                return Err(at(
                    "models.teacher: ids = false and content = false train no teacher; set enabled = false instead".into(),
                ));
            }
            if t.content
                && self.input.item_content.is_empty()
                && self.features.item_content_sql.is_empty()
            {
                return Err(at(
                    "models.teacher.content = true needs an item content table: set input.item_content or features.item_content_sql".into(),
                ));
            }
        }
        if self.distill.enabled {
            self.distill.validate(&self.models).map_err(at)?;
        }
        if self.compress.enabled && self.distill.enabled {
            self.compress.validate().map_err(at)?;
        }
        if !self.models.popularity.enabled && !m.enabled && !t.enabled {
            return Err(at("no model is enabled under [models]".into()));
        }
        crate::model::sasrec::reference::device_ordinal(&self.device)
            .map_err(|e| at(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default_job() {
        let job = Job::parse("", "t.toml", None, &[]).unwrap();
        assert_eq!(job.spec, JobSpec::default());
    }

    #[test]
    fn distillation_settings_are_checked() {
        let bad = [
            ("distill.source=\"teacher-content\"", "teacher-content"),
            ("distill.losses=[\"kl+ce\"]", "ce"),
            ("distill.losses=[]", "at least one"),
            ("distill.alpha=1.5", "alpha"),
            ("distill.temperature=0", "temperature"),
            ("distill.k=0", "distill.k"),
            ("distill.student.name=\"teacher\"", "taken"),
            ("distill.student.name=\"../x\"", "not allowed"),
            ("distill.student.heads=3", "multiple of heads"),
            ("models.teacher.enabled=false", "needs [models.teacher]"),
        ];
        for (set, want) in bad {
            let err = Job::parse("", "t.toml", None, &[set.to_string()]).unwrap_err();
            assert_eq!(err.exit_code(), crate::error::exit_code::CONFIG, "{set}");
            assert!(err.to_string().contains(want), "{set}: {err}");
        }
        let job = Job::parse(
            "[distill]\nlosses = [\"kl+rank\"]\nassistants = []\n[distill.student]\nalpha = 0.0\n",
            "t.toml",
            None,
            &[],
        )
        .unwrap();
        let d = &job.spec.distill;
        assert_eq!(d.links().len(), 1);
        assert_eq!(d.alpha_of(&d.student), 0.0);
        assert_eq!(d.temperature_of(&d.student), 2.0);
    }

    #[test]
    fn unknown_key_is_refused_naming_key_and_file() {
        let err =
            Job::parse("[models.meanpool]\nepochz = 3\n", "jobs/x.toml", None, &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("jobs/x.toml"), "{msg}");
        assert!(msg.contains("epochz"), "{msg}");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn set_overrides_typed_values_and_nested_keys() {
        let job = Job::parse(
            "name = \"a\"\n",
            "t.toml",
            None,
            &[
                "models.meanpool.epochs=7".into(),
                "evaluation.ks=[1, 3]".into(),
                "lake.url=s3://bucket/lake".into(),
                "split.protocol=temporal".into(),
            ],
        )
        .unwrap();
        assert_eq!(job.spec.models.meanpool.epochs, 7);
        assert_eq!(job.spec.evaluation.ks, vec![1, 3]);
        assert_eq!(job.spec.lake.url, "s3://bucket/lake");
        assert_eq!(job.spec.split.protocol, Protocol::Temporal);
        assert_eq!(job.spec.name, "a");
    }

    #[test]
    fn malformed_set_is_refused() {
        for bad in [
            "noequals",
            "=3",
            "a..b=1",
            "models.meanpool.epochs.x=1",
            "a b=1",
        ] {
            let err = Job::parse("", "t.toml", None, &[bad.into()]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}: {err}");
        }
        let err =
            Job::parse("", "t.toml", None, &["models.meanpool.epochs=many".into()]).unwrap_err();
        assert!(err.to_string().contains("--set"), "{err}");
        let err = Job::parse("", "t.toml", None, &["models.meanpool.nope=1".into()]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn traversal_in_names_and_paths_is_refused() {
        for bad in ["..", "../x", "a/b", "%2e%2e", "", "-a"] {
            assert!(check_segment("job name", bad).is_err(), "{bad}");
        }
        for bad in ["../x", "/abs", "a/../b", "a/./b", "a%2F..", "a//b"] {
            assert!(check_relative_path("input", bad).is_err(), "{bad}");
        }
        assert!(check_relative_path("input", "events/clicks").is_ok());
        let err = Job::parse("name = \"../etc\"", "t.toml", None, &[]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn run_dates_are_strict() {
        assert!(parse_run_date("2026-11-27").is_ok());
        for bad in [
            "2026-11-27/..",
            "2026-13-01",
            "26-11-27",
            "2026-1-7",
            "../2026-11-27",
        ] {
            assert!(parse_run_date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_hash_ignores_formatting_but_not_values() {
        let a = Job::parse("seed = 1\n# comment\n", "a", None, &[]).unwrap();
        let b = Job::parse("seed=1", "b", None, &[]).unwrap();
        let c = Job::parse("seed=2", "c", None, &[]).unwrap();
        assert_eq!(a.config_hash(), b.config_hash());
        assert_ne!(a.config_hash(), c.config_hash());
    }

    #[test]
    fn every_key_is_documented_in_jobs_readme() {
        fn leaves(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
            match value {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let path = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        leaves(&path, v, out);
                    }
                }
                _ => out.push(prefix.to_string()),
            }
        }
        let readme = include_str!("../jobs/README.md");
        let mut keys = Vec::new();
        leaves(
            "",
            &toml::Value::try_from(JobSpec::default()).unwrap(),
            &mut keys,
        );
        assert!(keys.len() > 20);
        for key in keys {
            assert!(
                readme.contains(&format!("| `{key}` |")),
                "jobs/README.md does not document {key}"
            );
        }
    }

    #[test]
    fn shipped_jobs_parse() {
        for file in ["jobs/sample.toml", "jobs/movielens-100k.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            Job::load(&path, &[]).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }
}
