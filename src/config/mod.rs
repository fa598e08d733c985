//! The job spec: a TOML file in `jobs/`, overridden by `--set key.path=value`,
//! turned into one validated, typed config. Every key has a default, so an
//! empty file is a valid job; unknown keys are refused with the file named.
//!
//! A leaf: it imports nothing of the crate but [`crate::error`]. Each section
//! (`[lake]`, `[models]`, `[distill]`, ...) lives in a file of its own with
//! the rules serde cannot express; this file holds the whole job, its
//! parsing, `--set` overrides, the checks that span sections, and the
//! config hash.

pub mod compress;
pub mod distill;
pub mod evaluation;
pub mod features;
pub mod lake;
pub mod models;
pub mod publish;
pub mod text;
pub mod warm_start;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use compress::{CompressSpec, Quantization, RankChoice, Variant};
pub use distill::{DistillSpec, LinkSpec, LossFamily, SoftLoss};
pub use evaluation::EvaluationSpec;
pub use features::{FeatureSpec, Protocol, SplitSpec};
pub use lake::{InputSpec, LakeSpec};
pub use models::{
    CooccurrenceSpec, MeanPoolSpec, ModelsSpec, PopularitySpec, Sampling, Softmax, TeacherSpec,
    TransitionsSpec, Windows,
};
pub use publish::PublishSpec;
pub use text::TextSpec;
pub use warm_start::WarmStartSpec;

use crate::error::{Error, Result};

/// The embedded default job: the bundled sample in a local `lake/` folder.
pub const SAMPLE_JOB_TOML: &str = include_str!("../../jobs/sample.toml");

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
    /// Learned models begin from an earlier run's.
    pub warm_start: WarmStartSpec,
    /// Item text through a language model (features stage).
    pub text: TextSpec,
    /// The model a committed run offers to serve, and its gate.
    pub publish: PublishSpec,
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
            warm_start: WarmStartSpec::default(),
            text: TextSpec::default(),
            publish: PublishSpec::default(),
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
        self.lake.ballista_scheduler().map_err(at)?;
        self.warm_start.from_date().map_err(at)?;
        self.publish
            .check(self.models.popularity.enabled)
            .map_err(at)?;
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
        self.models
            .validate(&self.input, &self.features)
            .map_err(at)?;
        if self.distill.enabled {
            self.distill.validate(&self.models).map_err(at)?;
        }
        if self.compress.enabled && self.distill.enabled {
            self.compress.validate().map_err(at)?;
            let mut trained = self.distill.trained_models();
            // The teachers can be compressed too, to put their own int8 and
            // int4 variants on the frontier beside the students.
            let t = &self.models.teacher;
            if t.enabled {
                trained.extend(t.names().iter().map(|n| n.to_string()));
            }
            if let Some(missing) = self.compress.models.iter().find(|m| !trained.contains(m)) {
                return Err(at(format!(
                    "compress.models names {missing:?}, which neither the teachers nor the distill chain train (they train {})",
                    trained.join(", ")
                )));
            }
        }
        self.text.validate().map_err(at)?;
        if self.models.teacher.enabled && self.models.teacher.text && !self.text.enabled {
            return Err(at(
                "models.teacher.text = true trains teacher-text on the items' text vectors: set [text] enabled = true".into(),
            ));
        }
        if !self.models.any_enabled() {
            return Err(at("no model is enabled under [models]".into()));
        }
        device_ordinal(&self.device).map_err(|e| at(e.to_string()))?;
        Ok(())
    }
}

/// Checks a job's `device`: `cpu` (`None`), `cuda` (GPU 0) or `cuda:N`
/// (`Some(N)`); CUDA needs a binary built with `--features cuda`.
pub fn device_ordinal(name: &str) -> Result<Option<usize>> {
    let ordinal = match name {
        "cpu" => return Ok(None),
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::config(format!("device {other:?} is not cpu, cuda or cuda:N")))?,
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::config(format!(
            "device {name:?} needs a recdistill built with `cargo build --release --features cuda`; this one is CPU-only"
        )));
    }
    Ok(Some(ordinal))
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
            ("distill.shuffle_buffer=0", "shuffle_buffer"),
            (
                "compress.models=[\"student-kd-teacher-ce\"]",
                "which neither the teachers nor the distill chain train",
            ),
            (
                "compress.models=[\"teacher-content\"]",
                "which neither the teachers nor the distill chain train",
            ),
        ];
        let sampled_without_negatives = [
            "distill.softmax=\"sampled\"".to_string(),
            "distill.negatives=0".to_string(),
        ];
        let err = Job::parse("", "t.toml", None, &sampled_without_negatives).unwrap_err();
        assert!(err.to_string().contains("negatives"), "{err}");
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
        assert_eq!(
            d.trained_models(),
            ["student-scratch", "student-kd-teacher-kl-rank"]
        );
        assert_eq!(d.links().len(), 1);
        assert_eq!(d.alpha_of(&d.student), 0.0);
        assert_eq!(d.temperature_of(&d.student), 2.0);
        // The teacher may be compressed beside the students.
        let teacher = ["compress.models=[\"teacher\", \"student-scratch\"]".to_string()];
        Job::parse("", "t.toml", None, &teacher).unwrap();
    }

    #[test]
    fn the_chain_names_its_models_and_every_shipped_job_is_valid() {
        let d = DistillSpec::default();
        assert_eq!(
            d.trained_models(),
            [
                "assistant",
                "student-scratch",
                "student-kd-teacher-kl",
                "student-kd-teacher-mse",
                "student-kd-teacher-rank",
                "student-kd-assistant-kl",
                "student-kd-assistant-mse",
                "student-kd-assistant-rank",
            ]
        );
        let jobs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
        let mut checked = 0;
        for entry in std::fs::read_dir(&jobs).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Job::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                checked += 1;
            }
        }
        assert!(checked >= 4, "{checked} job files");
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
        let readme = include_str!("../../jobs/README.md");
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
