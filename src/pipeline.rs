//! Wires the stages together. `run` executes all of them in one process,
//! handing each stage's output to the next; `stage NAME` executes one, reading
//! what it needs from the run folder, so a scheduler can run them as separate
//! tasks (even on different machines). Both commit the same way.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use chrono::NaiveDate;
use datafusion::prelude::SessionContext;

use crate::baselines::{self, Baselines};
use crate::commit::{self, Manifest, RunFolder, StageRecord};
use crate::compress;
use crate::dataset::{self, Dataset, ItemContent};
use crate::distill;
use crate::engine;
use crate::error::{Error, Result};
use crate::evaluate::{self, Evaluation};
use crate::features;
use crate::ingest::{self, Ingested};
use crate::job::Job;
use crate::lake::{Lake, WrittenObject};
use crate::lease::Lease;
use crate::model::ModelArtifact;
use crate::teacher;

/// The stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Validate the input; writes nothing.
    Ingest,
    /// Feature SQL → `features/`.
    Features,
    /// Baseline models → `models/`, `training/`.
    Baselines,
    /// The transformer teacher(s) → `models/`, `training/`.
    Teacher,
    /// The distillation source's soft labels → `soft_labels/`.
    SoftLabels,
    /// The assistants and students → `models/`, `training/`, `soft_labels/`.
    Distill,
    /// Compressed variants of the students → `models/`, `training/`.
    Compress,
    /// Every model → `recommendations/`, `evaluation/`.
    Evaluate,
    /// `_SUCCESS`.
    Commit,
}

impl Stage {
    /// All stages, in order.
    pub const ALL: [Stage; 9] = [
        Stage::Ingest,
        Stage::Features,
        Stage::Baselines,
        Stage::Teacher,
        Stage::SoftLabels,
        Stage::Distill,
        Stage::Compress,
        Stage::Evaluate,
        Stage::Commit,
    ];

    /// Stages whose records the commit collects.
    pub const RECORDED: [Stage; 7] = [
        Stage::Features,
        Stage::Baselines,
        Stage::Teacher,
        Stage::SoftLabels,
        Stage::Distill,
        Stage::Compress,
        Stage::Evaluate,
    ];

    /// Stages whose models the evaluate stage evaluates.
    pub const TRAINING: [Stage; 4] = [
        Stage::Baselines,
        Stage::Teacher,
        Stage::Distill,
        Stage::Compress,
    ];

    /// Stage name on the command line and in records.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Ingest => "ingest",
            Stage::Features => "features",
            Stage::Baselines => "baselines",
            Stage::Teacher => "teacher",
            Stage::SoftLabels => "soft-labels",
            Stage::Distill => "distill",
            Stage::Compress => "compress",
            Stage::Evaluate => "evaluate",
            Stage::Commit => "commit",
        }
    }
}

impl FromStr for Stage {
    type Err = Error;

    fn from_str(s: &str) -> Result<Stage> {
        Stage::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
                Error::config(format!(
                    "unknown stage {s:?}; stages are {}",
                    names.join(", ")
                ))
            })
    }
}

/// Everything a stage may need.
pub struct RunContext {
    /// The job.
    pub job: Job,
    /// The run's folder.
    pub run: RunFolder,
    /// This process's run id.
    pub run_id: String,
    /// DataFusion session with the lake registered.
    pub ctx: SessionContext,
}

impl RunContext {
    /// Opens the lake and sets up DataFusion for `job` on `run_date`.
    pub fn new(job: Job, run_date: NaiveDate) -> Result<RunContext> {
        let lake = Lake::open(&job.spec.lake)?;
        let ctx = engine::session(&job.spec.input)?;
        lake.register(&ctx);
        let run = RunFolder::new(lake, &job.spec.lake.output_prefix, &job.spec.name, run_date);
        Ok(RunContext {
            job,
            run,
            run_id: commit::new_run_id(),
            ctx,
        })
    }

    fn lake(&self) -> &Lake {
        self.run.lake()
    }

    /// Takes the run folder's lease and removes what killed writers left
    /// half-written in it.
    async fn take_folder(&self, purpose: &str) -> Result<Lease> {
        let lease =
            Lease::acquire(&self.run, &self.run_id, purpose, self.job.spec.lake.lease_s).await?;
        remove_staging_leftovers(&self.run);
        Ok(lease)
    }

    async fn record(
        &self,
        stage: Stage,
        started: Instant,
        started_at: String,
        outputs: Vec<WrittenObject>,
        input: Option<&Ingested>,
    ) -> Result<()> {
        let record = StageRecord {
            stage: stage.name().into(),
            run_id: self.run_id.clone(),
            config_hash: self.job.config_hash(),
            started_at,
            seconds: started.elapsed().as_secs_f64(),
            outputs,
            input_fingerprint: input.map(|i| i.fingerprint.clone()),
        };
        commit::record_stage(&self.run, &record).await
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Logs a stage's start; returns its start instant and time.
fn begin(stage: Stage) -> (Instant, String) {
    tracing::info!(stage = stage.name(), "stage started");
    (Instant::now(), now())
}

/// The outcome of a whole run.
#[derive(Debug)]
pub struct RunSummary {
    /// What was read.
    pub ingested: Ingested,
    /// The models' results.
    pub evaluation: Evaluation,
    /// The committed manifest.
    pub manifest: Manifest,
    /// URL of the run folder.
    pub folder: String,
}

/// Files a killed writer left half-written in the run folder (local lakes).
fn remove_staging_leftovers(run: &RunFolder) {
    for path in run.lake().staging_leftovers(&run.rel("")) {
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(file = %path.display(), "removed a half-written leftover"),
            Err(e) => {
                tracing::warn!(file = %path.display(), "cannot remove a half-written leftover: {e}")
            }
        }
    }
}

/// Runs every stage and commits.
pub async fn run_all(rc: &RunContext) -> Result<RunSummary> {
    let started = Instant::now();
    let started_at = now();
    let ingested = ingest::ingest(&rc.job, rc.lake(), &rc.ctx).await?;
    tracing::info!(
        files = ingested.files,
        rows = ingested.rows,
        "input validated"
    );
    // Only now, with the input known to be good, does the run touch its
    // folder, and only while it holds the folder's lease.
    let lease = rc.take_folder("run").await?;
    let outcome = run_held(rc, &lease, ingested, started, started_at).await;
    lease.release().await;
    outcome
}

async fn run_held(
    rc: &RunContext,
    lease: &Lease,
    ingested: Ingested,
    started: Instant,
    started_at: String,
) -> Result<RunSummary> {
    commit::uncommit(&rc.run).await?;

    tracing::info!(stage = Stage::Features.name(), "stage started");
    let features = features::build_features(&rc.job, &rc.run, &rc.ctx).await?;
    rc.record(
        Stage::Features,
        started,
        started_at,
        features.written,
        Some(&ingested),
    )
    .await?;

    let dataset = Arc::new(dataset::load_dataset(&rc.ctx).await?);
    log_dataset(&dataset);

    let (started, started_at) = begin(Stage::Baselines);
    let Baselines {
        mut models,
        written,
    } = baselines::train_baselines(&rc.job, &rc.run, Arc::clone(&dataset)).await?;
    rc.record(Stage::Baselines, started, started_at, written, None)
        .await?;

    let (started, started_at) = begin(Stage::Teacher);
    let content = load_content(rc, &dataset).await?;
    let teachers = teacher::train_teachers(&rc.job, &rc.run, Arc::clone(&dataset), content).await?;
    rc.record(Stage::Teacher, started, started_at, teachers.written, None)
        .await?;

    let (started, started_at) = begin(Stage::SoftLabels);
    let labels =
        distill::emit_source_labels(&rc.job, &rc.run, Arc::clone(&dataset), &teachers.models)
            .await?;
    models.extend(teachers.models);
    rc.record(Stage::SoftLabels, started, started_at, labels, None)
        .await?;

    let (started, started_at) = begin(Stage::Distill);
    let distilled = distill::distill_chain(&rc.job, &rc.run, Arc::clone(&dataset)).await?;
    let students = distilled.models.clone();
    models.extend(distilled.models);
    rc.record(Stage::Distill, started, started_at, distilled.written, None)
        .await?;

    let (started, started_at) = begin(Stage::Compress);
    let compressed =
        compress::compress_models(&rc.job, &rc.run, Arc::clone(&dataset), &students).await?;
    models.extend(compressed.models);
    rc.record(
        Stage::Compress,
        started,
        started_at,
        compressed.written,
        None,
    )
    .await?;

    let (started, started_at) = begin(Stage::Evaluate);
    let evaluation =
        evaluate::evaluate_models(&rc.job, &rc.run, &rc.run_id, dataset, &models).await?;
    rc.record(
        Stage::Evaluate,
        started,
        started_at,
        evaluation.written.clone(),
        None,
    )
    .await?;

    let manifest = commit_run(rc, lease).await?;
    Ok(RunSummary {
        ingested,
        evaluation,
        manifest,
        folder: rc.run.display(),
    })
}

/// The item content vectors, when the job has an item content table.
async fn load_content(rc: &RunContext, dataset: &Dataset) -> Result<Option<Arc<ItemContent>>> {
    if !features::has_item_content(&rc.job) {
        return Ok(None);
    }
    let location = rc.run.url_of(&format!(
        "features/{}.parquet",
        features::ITEM_CONTENT_TABLE
    ));
    let content = dataset::load_item_content(&rc.ctx, dataset.n_items(), &location).await?;
    tracing::info!(
        dim = content.dim,
        covered = content.covered,
        items = dataset.n_items(),
        "item content loaded"
    );
    Ok(Some(Arc::new(content)))
}

fn log_dataset(dataset: &Dataset) {
    tracing::info!(
        users = dataset.n_users(),
        items = dataset.n_items(),
        events = dataset.items.len(),
        "training set built"
    );
}

async fn commit_run(rc: &RunContext, lease: &Lease) -> Result<Manifest> {
    tracing::info!(stage = Stage::Commit.name(), "stage started");
    lease.check_held().await?;
    let stages: Vec<&str> = Stage::RECORDED.iter().map(|s| s.name()).collect();
    let manifest = commit::commit(&rc.run, &rc.job, &rc.run_id, &stages).await?;
    tracing::info!(folder = %rc.run.display(), files = manifest.outputs.len(), "run committed");
    Ok(manifest)
}

fn no_features(rc: &RunContext) -> Error {
    Error::config(format!(
        "{} has no features stage yet: run `recdistill stage features` first",
        rc.run.display()
    ))
}

/// The outputs an earlier stage of this run recorded; refused when it has not run.
async fn stage_outputs(rc: &RunContext, stage: Stage) -> Result<Vec<WrittenObject>> {
    let record = commit::read_stage(&rc.run, stage.name())
        .await?
        .ok_or_else(|| {
            Error::config(format!(
                "{} has no {} stage yet: run `recdistill stage {}` first",
                rc.run.display(),
                stage.name(),
                stage.name()
            ))
        })?;
    Ok(record.outputs)
}

/// The models earlier stages of this run trained, each checked against its record.
async fn stage_models(rc: &RunContext, stages: &[Stage]) -> Result<Vec<ModelArtifact>> {
    let mut models = Vec::new();
    for &stage in stages {
        let outputs = stage_outputs(rc, stage).await?;
        models.extend(baselines::load_models(&rc.run, &outputs).await?);
    }
    Ok(models)
}

/// What running one stage did, for the command line.
#[derive(Debug)]
pub enum StageOutcome {
    /// Ingest: the input is valid.
    Validated(Ingested),
    /// A stage wrote these files.
    Wrote(Vec<WrittenObject>),
    /// The run was committed.
    Committed(Box<Manifest>),
}

/// Runs one stage, reading its inputs from the run folder. Running a stage
/// forgets the stages after it: they must run again before a commit.
pub async fn run_stage(rc: &mut RunContext, stage: Stage) -> Result<StageOutcome> {
    if stage == Stage::Ingest {
        return Ok(StageOutcome::Validated(
            ingest::ingest(&rc.job, rc.lake(), &rc.ctx).await?,
        ));
    }
    // Nothing touches the folder before the features stage has validated the
    // input, or (later stages) before it is known that the run has begun.
    let ingested = if stage == Stage::Features {
        Some(ingest::ingest(&rc.job, rc.lake(), &rc.ctx).await?)
    } else {
        if commit::read_stage(&rc.run, Stage::Features.name())
            .await?
            .is_none()
        {
            return Err(no_features(rc));
        }
        None
    };
    let lease = rc.take_folder(&format!("stage {}", stage.name())).await?;
    let outcome = run_stage_held(rc, stage, &lease, ingested).await;
    lease.release().await;
    outcome
}

async fn run_stage_held(
    rc: &mut RunContext,
    stage: Stage,
    lease: &Lease,
    ingested: Option<Ingested>,
) -> Result<StageOutcome> {
    let started = Instant::now();
    let started_at = now();
    let later: Vec<&str> = Stage::RECORDED
        .iter()
        .skip_while(|s| **s != stage)
        .skip(1)
        .map(|s| s.name())
        .collect();
    if let Some(ingested) = ingested {
        commit::uncommit(&rc.run).await?;
        commit::forget_stages(&rc.run, &later).await?;
        let features = features::build_features(&rc.job, &rc.run, &rc.ctx).await?;
        rc.record(
            stage,
            started,
            started_at,
            features.written.clone(),
            Some(&ingested),
        )
        .await?;
        return Ok(StageOutcome::Wrote(features.written));
    }

    // Later stages continue the run the features stage started.
    let features = commit::read_stage(&rc.run, Stage::Features.name())
        .await?
        .ok_or_else(|| no_features(rc))?;
    rc.run_id = features.run_id;
    if stage == Stage::Commit {
        return Ok(StageOutcome::Committed(Box::new(
            commit_run(rc, lease).await?,
        )));
    }
    commit::uncommit(&rc.run).await?;
    commit::forget_stages(&rc.run, &later).await?;
    features::register_features(&rc.ctx, &rc.run, &rc.job).await?;
    let dataset = Arc::new(dataset::load_dataset(&rc.ctx).await?);
    log_dataset(&dataset);
    let written = match stage {
        Stage::Baselines => {
            baselines::train_baselines(&rc.job, &rc.run, dataset)
                .await?
                .written
        }
        Stage::Teacher => {
            let content = load_content(rc, &dataset).await?;
            teacher::train_teachers(&rc.job, &rc.run, dataset, content)
                .await?
                .written
        }
        Stage::SoftLabels => {
            let teachers = stage_models(rc, &[Stage::Teacher]).await?;
            distill::emit_source_labels(&rc.job, &rc.run, dataset, &teachers).await?
        }
        Stage::Distill => {
            stage_outputs(rc, Stage::SoftLabels).await?;
            distill::distill_chain(&rc.job, &rc.run, dataset)
                .await?
                .written
        }
        Stage::Compress => {
            let students = stage_models(rc, &[Stage::Distill]).await?;
            compress::compress_models(&rc.job, &rc.run, dataset, &students)
                .await?
                .written
        }
        Stage::Evaluate => {
            let models = stage_models(rc, &Stage::TRAINING).await?;
            evaluate::evaluate_models(&rc.job, &rc.run, &rc.run_id, dataset, &models)
                .await?
                .written
        }
        Stage::Ingest | Stage::Features | Stage::Commit => unreachable!("handled above"),
    };
    rc.record(stage, started, started_at, written.clone(), None)
        .await?;
    Ok(StageOutcome::Wrote(written))
}
