//! The stages, one file each, in the order the data flows:
//!
//! ```text
//! ingest ─► features ─► baselines ─► teacher ─► soft-labels ─► distill ─► compress ─► evaluate ─► commit
//! (check)   (features/)  (models/)    (models/)  (soft_labels/)  (models/,  (models/)   (recommendations/,  (_SUCCESS)
//!                                                                soft_labels/)           evaluation/)
//! ```
//!
//! A stage never imports another stage: what two of them share lives below,
//! in [`crate::artifacts`]. This module holds the one table of stages that
//! both `recdistill run` and `recdistill stage NAME` walk. `run` executes
//! every stage in one process, handing each stage's output to the next;
//! `stage NAME` executes one, reading what it needs from the run folder,
//! so a scheduler can run the stages as separate tasks (even on different
//! machines). Both record and commit the same way.

pub mod baselines;
pub mod compress;
pub mod distill;
pub mod evaluate;
pub mod features;
pub mod ingest;
pub mod soft_labels;
pub mod teacher;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use chrono::NaiveDate;
use datafusion::prelude::SessionContext;

use crate::artifacts::ceiling::{self, Ceiling};
use crate::artifacts::models::load_models;
use crate::artifacts::warm::WarmSource;
use crate::config::Job;
use crate::dataset::{self, Dataset, ItemContent};
use crate::error::{Error, Result};
use crate::lake::{Lake, WrittenObject, engine};
use crate::model::ModelArtifact;
use crate::run::RunFolder;
use crate::run::commit::{self, InputBounds, Manifest, StageRecord};
use crate::run::folder::remove_staging_leftovers;
use crate::run::lease::Lease;
use crate::run::shard::{self, Shard};
use evaluate::Evaluation;
use ingest::Ingested;

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
    /// Every model → `recommendations/`, `evaluation/`, `report.html`.
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

    /// The names of the recorded stages after this one: what running it
    /// makes stale.
    fn later(self) -> Vec<&'static str> {
        Stage::RECORDED
            .iter()
            .skip_while(|s| **s != self)
            .skip(1)
            .map(|s| s.name())
            .collect()
    }

    /// Whether `recdistill stage NAME --shard I/N` splits the stage.
    pub fn shardable(self) -> bool {
        matches!(self, Stage::SoftLabels | Stage::Evaluate)
    }

    /// The stage names, in order, for messages and `--help`.
    pub fn names() -> String {
        let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
        names.join(", ")
    }
}

impl FromStr for Stage {
    type Err = Error;

    fn from_str(s: &str) -> Result<Stage> {
        Stage::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                Error::config(format!(
                    "unknown stage {s:?}; stages are {}",
                    Stage::names()
                ))
            })
    }
}

/// What a stage produced: the models it trained (none for features and
/// soft labels) and every file it wrote, relative to the run folder.
#[derive(Debug, Clone, Default)]
pub struct StageOutput {
    /// One artifact per model, in training order.
    pub models: Vec<ModelArtifact>,
    /// Files written.
    pub written: Vec<WrittenObject>,
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
    /// The `dt` partitions this run reads: up to its run date, within
    /// `input.window_days`.
    pub fn input_bounds(&self) -> InputBounds {
        InputBounds::for_run(self.run.run_date(), self.job.spec.input.window_days)
    }

    /// Opens the lake and sets up DataFusion for `job` on `run_date`.
    pub async fn new(job: Job, run_date: NaiveDate) -> Result<RunContext> {
        let warm = &job.spec.warm_start;
        if warm.enabled
            && let Some(from) = warm.from_date().map_err(Error::config)?
            && from >= run_date
        {
            return Err(Error::config(format!(
                "warm_start.from = {:?} in {}: a run starts only from an earlier run, and this run's date is {run_date}",
                warm.from, job.source
            )));
        }
        let lake = Lake::open(&job.spec.lake)?;
        let ctx = engine::session(&job.spec.input, &job.spec.lake).await?;
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
        remove_staging_leftovers(&self.run, "");
        Ok(lease)
    }

    /// The record of `stage` of this run, as it ran with this job.
    fn stage_record(
        &self,
        stage: Stage,
        started_at: String,
        seconds: f64,
        outputs: Vec<WrittenObject>,
        input: Option<&Ingested>,
    ) -> StageRecord {
        StageRecord {
            stage: stage.name().into(),
            run_id: self.run_id.clone(),
            config_hash: self.job.config_hash(),
            started_at,
            seconds,
            outputs,
            input_fingerprint: input.map(|i| i.fingerprint.clone()),
        }
    }

    async fn record(
        &self,
        stage: Stage,
        (started, started_at): (Instant, String),
        outputs: Vec<WrittenObject>,
        input: Option<&Ingested>,
    ) -> Result<()> {
        let seconds = started.elapsed().as_secs_f64();
        let record = self.stage_record(stage, started_at, seconds, outputs, input);
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

/// What the stages run by this process have produced so far. `run` fills
/// it stage by stage; a stage run alone finds it empty and reads what it
/// needs from the records earlier stages left in the run folder.
#[derive(Default)]
struct Produced {
    dataset: Option<Arc<Dataset>>,
    /// The stages that ran, with the models each trained.
    stages: Vec<(Stage, Vec<ModelArtifact>)>,
    evaluation: Option<Evaluation>,
    /// The earlier run the learned models start from: looked up once,
    /// by the first stage that trains one.
    warm: Option<Option<Arc<WarmSource>>>,
}

impl Produced {
    /// The earlier run this run's learned models start from, if any.
    async fn warm(&mut self, rc: &RunContext) -> Result<Option<Arc<WarmSource>>> {
        if let Some(warm) = &self.warm {
            return Ok(warm.clone());
        }
        let dataset = self.dataset(rc).await?;
        let warm = WarmSource::find(&rc.job, &rc.run, &dataset.item_ids)
            .await?
            .map(Arc::new);
        self.warm = Some(warm.clone());
        Ok(warm)
    }

    /// The models `stage` trained, if it ran in this process.
    fn ran(&self, stage: Stage) -> Option<&[ModelArtifact]> {
        self.stages
            .iter()
            .find(|(s, _)| *s == stage)
            .map(|(_, models)| models.as_slice())
    }

    /// The training set, built once from the feature tables (registered
    /// by the features stage when it ran in this process).
    async fn dataset(&mut self, rc: &RunContext) -> Result<Arc<Dataset>> {
        if let Some(dataset) = &self.dataset {
            return Ok(Arc::clone(dataset));
        }
        if self.ran(Stage::Features).is_none() {
            features::register_features(&rc.ctx, &rc.run, &rc.job).await?;
        }
        let dataset = Arc::new(dataset::load_dataset(&rc.ctx).await?);
        tracing::info!(
            users = dataset.n_users(),
            items = dataset.n_items(),
            events = dataset.items.len(),
            "training set built"
        );
        self.dataset = Some(Arc::clone(&dataset));
        Ok(dataset)
    }

    /// Checks that `stage` ran in this run; refused when it has not.
    async fn require(&self, rc: &RunContext, stage: Stage) -> Result<()> {
        if self.ran(stage).is_none() {
            stage_outputs(rc, stage).await?;
        }
        Ok(())
    }

    /// The models `stages` trained in this run, in stage order: handed on
    /// in this process, or read back and checked against the stage records.
    async fn models_of(&self, rc: &RunContext, stages: &[Stage]) -> Result<Vec<ModelArtifact>> {
        let mut models = Vec::new();
        for &stage in stages {
            match self.ran(stage) {
                Some(trained) => models.extend_from_slice(trained),
                None => {
                    let outputs = stage_outputs(rc, stage).await?;
                    models.extend(load_models(&rc.run, &outputs).await?);
                }
            }
        }
        Ok(models)
    }
}

/// Executes one recorded stage (features … evaluate) with what earlier
/// stages produced, and returns the files it wrote.
async fn execute(
    rc: &RunContext,
    stage: Stage,
    produced: &mut Produced,
) -> Result<Vec<WrittenObject>> {
    let (job, run) = (&rc.job, &rc.run);
    if stage == Stage::Features {
        let output = features::build_features(job, run, &rc.ctx).await?;
        produced.stages.push((stage, output.models));
        return Ok(output.written);
    }
    let dataset = produced.dataset(rc).await?;
    let output = match stage {
        Stage::Baselines => {
            let warm = produced.warm(rc).await?;
            baselines::train_baselines(job, run, &rc.ctx, dataset, warm.as_deref()).await?
        }
        Stage::Teacher => {
            let content = load_content(rc, &dataset).await?;
            let text = load_text_content(rc, &dataset).await?;
            let warm = produced.warm(rc).await?;
            let baselines = if job.spec.models.teacher.baseline.is_empty() {
                Vec::new()
            } else {
                produced.models_of(rc, &[Stage::Baselines]).await?
            };
            teacher::train_teachers(
                job,
                run,
                dataset,
                teacher::Inputs { content, text },
                &baselines,
                warm.as_deref(),
            )
            .await?
        }
        Stage::SoftLabels => {
            let teachers = produced.models_of(rc, &[Stage::Teacher]).await?;
            soft_labels::emit_source_labels(job, run, dataset, &teachers, None).await?
        }
        Stage::Distill => {
            produced.require(rc, Stage::SoftLabels).await?;
            let warm = produced.warm(rc).await?;
            distill::distill_chain(job, run, dataset, warm.as_deref()).await?
        }
        Stage::Compress => {
            let trained = produced
                .models_of(rc, &[Stage::Teacher, Stage::Distill])
                .await?;
            compress::compress_models(job, run, dataset, &trained).await?
        }
        Stage::Evaluate => {
            let models = produced.models_of(rc, &Stage::TRAINING).await?;
            let ceiling = load_ceiling(rc).await?;
            let evaluation =
                evaluate::evaluate_models(job, run, &rc.run_id, dataset, &models, ceiling.as_ref())
                    .await?;
            let output = StageOutput {
                models: Vec::new(),
                written: evaluation.written.clone(),
            };
            produced.evaluation = Some(evaluation);
            output
        }
        Stage::Ingest | Stage::Features | Stage::Commit => {
            return Err(Error::internal(format!(
                "stage {} is not executed with the recorded stages",
                stage.name()
            )));
        }
    };
    produced.stages.push((stage, output.models));
    Ok(output.written)
}

/// The log's Bayes ceiling (`input.ceiling`), when the lake has one.
async fn load_ceiling(rc: &RunContext) -> Result<Option<Ceiling>> {
    let ceiling = ceiling::load_ceiling(
        &rc.ctx,
        rc.lake(),
        &rc.job.spec.input.ceiling,
        &rc.job.spec.evaluation.ks,
    )
    .await?;
    if let Some(c) = &ceiling {
        tracing::info!(table = %c.location, "Bayes ceiling found");
    }
    Ok(ceiling)
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
    let content = dataset::load_item_content(
        &rc.ctx,
        dataset.n_items(),
        features::ITEM_CONTENT_TABLE,
        &location,
    )
    .await?;
    tracing::info!(
        dim = content.dim,
        covered = content.covered,
        items = dataset.n_items(),
        "item content loaded"
    );
    Ok(Some(Arc::new(content)))
}

/// The items' text vectors, when the job trains `teacher-text`.
async fn load_text_content(rc: &RunContext, dataset: &Dataset) -> Result<Option<Arc<ItemContent>>> {
    let teacher = &rc.job.spec.models.teacher;
    if !(teacher.enabled && teacher.text) {
        return Ok(None);
    }
    let table = features::text::ITEM_TEXT_EMBEDDINGS_TABLE;
    let location = rc.run.url_of(&format!("features/{table}.parquet"));
    let content = dataset::load_item_content(&rc.ctx, dataset.n_items(), table, &location).await?;
    tracing::info!(
        dim = content.dim,
        covered = content.covered,
        items = dataset.n_items(),
        "item text vectors loaded"
    );
    Ok(Some(Arc::new(content)))
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

/// Runs every stage and commits.
pub async fn run_all(rc: &RunContext) -> Result<RunSummary> {
    let started = (Instant::now(), now());
    let ingested = ingest::ingest(&rc.job, rc.lake(), &rc.ctx, &rc.input_bounds()).await?;
    tracing::info!(
        files = ingested.files,
        rows = ingested.rows,
        "input validated"
    );
    // Only now, with the input known to be good, does the run touch its
    // folder, and only while it holds the folder's lease.
    let lease = rc.take_folder("run").await?;
    let outcome = run_held(rc, &lease, ingested, started).await;
    lease.release().await;
    outcome
}

async fn run_held(
    rc: &RunContext,
    lease: &Lease,
    ingested: Ingested,
    run_started: (Instant, String),
) -> Result<RunSummary> {
    commit::uncommit(&rc.run).await?;
    let mut produced = Produced::default();
    // The features stage's time counts from the run's start: it includes
    // validating the input.
    let mut first = Some(run_started);
    for stage in Stage::RECORDED {
        let clock = begin(stage);
        let clock = first.take().unwrap_or(clock);
        let written = execute(rc, stage, &mut produced).await?;
        let input = (stage == Stage::Features).then_some(&ingested);
        rc.record(stage, clock, written, input).await?;
    }
    begin(Stage::Commit);
    let manifest = commit_run(rc, lease).await?;
    let evaluation = produced
        .evaluation
        .ok_or_else(|| Error::internal("the run committed without an evaluation"))?;
    Ok(RunSummary {
        ingested,
        evaluation,
        manifest,
        folder: rc.run.display(),
    })
}

async fn commit_run(rc: &RunContext, lease: &Lease) -> Result<Manifest> {
    lease.check_held().await?;
    for stage in Stage::RECORDED {
        if stage.shardable() && commit::read_stage(&rc.run, stage.name()).await?.is_none() {
            gather(rc, stage).await?;
        }
    }
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

/// The outputs an earlier stage of this run recorded; refused when it has
/// not run. A stage that ran as shards is gathered first.
async fn stage_outputs(rc: &RunContext, stage: Stage) -> Result<Vec<WrittenObject>> {
    if let Some(record) = commit::read_stage(&rc.run, stage.name()).await? {
        return Ok(record.outputs);
    }
    if stage.shardable()
        && let Some(written) = gather(rc, stage).await?
    {
        return Ok(written);
    }
    Err(Error::config(format!(
        "{} has no {} stage yet: run `recdistill stage {}` first",
        rc.run.display(),
        stage.name(),
        stage.name()
    )))
}

/// Joins the parts the shards of `stage` wrote into what the unsharded
/// stage writes, records the stage whole, deletes the parts, and returns
/// the joined files; `None` when no shard of it ran. Refused when a part is
/// missing or doubled (see [`shard::check_parts`]).
async fn gather(rc: &RunContext, stage: Stage) -> Result<Option<Vec<WrittenObject>>> {
    let started = Instant::now();
    let run = &rc.run;
    let parts = shard::read_parts(run, stage.name()).await?;
    if parts.is_empty() {
        return Ok(None);
    }
    let parts = shard::check_parts(run, stage.name(), &parts, &rc.run_id, &rc.job.config_hash())?;
    tracing::info!(
        stage = stage.name(),
        parts = parts.len(),
        "gathering the shards' parts"
    );
    let files = shard::joined_files(run, stage.name(), &parts)?;
    let written = match stage {
        Stage::SoftLabels => soft_labels::gather_source_labels(run, &files).await?,
        Stage::Evaluate => {
            evaluate::gather_evaluation(&rc.job, run, &rc.run_id, &files)
                .await?
                .written
        }
        _ => {
            return Err(Error::internal(format!(
                "stage {} has no shards",
                stage.name()
            )));
        }
    };
    let started_at = parts
        .iter()
        .map(|(_, r)| r.started_at.clone())
        .min()
        .unwrap_or_else(now);
    // The work of every shard, then the gather.
    let seconds =
        parts.iter().map(|(_, r)| r.seconds).sum::<f64>() + started.elapsed().as_secs_f64();
    let record = rc.stage_record(stage, started_at, seconds, written.clone(), None);
    commit::record_stage(run, &record).await?;
    shard::forget_parts(run, stage.name()).await?;
    Ok(Some(written))
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
/// forgets the stages after it: they must run again before a commit. With
/// `shard`, runs that part of a shardable stage (see [`crate::run::shard`]).
pub async fn run_stage(
    rc: &mut RunContext,
    stage: Stage,
    shard: Option<Shard>,
) -> Result<StageOutcome> {
    if let Some(shard) = shard {
        return run_shard(rc, stage, shard).await;
    }
    if stage == Stage::Ingest {
        return Ok(StageOutcome::Validated(
            ingest::ingest(&rc.job, rc.lake(), &rc.ctx, &rc.input_bounds()).await?,
        ));
    }
    // Nothing touches the folder before the features stage has validated the
    // input, or (later stages) before it is known that the run has begun.
    let ingested = if stage == Stage::Features {
        Some(ingest::ingest(&rc.job, rc.lake(), &rc.ctx, &rc.input_bounds()).await?)
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
    let clock = begin(stage);
    if stage != Stage::Features {
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
    }
    commit::uncommit(&rc.run).await?;
    commit::forget_stages(&rc.run, &stage.later()).await?;
    // Parts of this stage's shards are superseded.
    shard::forget_parts(&rc.run, stage.name()).await?;
    let written = execute(rc, stage, &mut Produced::default()).await?;
    rc.record(stage, clock, written.clone(), ingested.as_ref())
        .await?;
    Ok(StageOutcome::Wrote(written))
}

/// Runs part `shard` of a shardable stage: it takes its own lease, so the
/// shards of one stage run side by side (on one machine or many), writes
/// only below its part folder, and records its part last.
async fn run_shard(rc: &mut RunContext, stage: Stage, shard: Shard) -> Result<StageOutcome> {
    if !stage.shardable() {
        return Err(Error::config(format!(
            "stage {} takes no --shard: only {} are sharded",
            stage.name(),
            Stage::ALL
                .iter()
                .filter(|s| s.shardable())
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(" and ")
        )));
    }
    let features = commit::read_stage(&rc.run, Stage::Features.name())
        .await?
        .ok_or_else(|| no_features(rc))?;
    rc.run_id = features.run_id;
    let purpose = format!("stage {} --shard {shard}", stage.name());
    let lease = Lease::acquire_shard(
        &rc.run,
        &shard.lease_scope(stage.name()),
        &rc.run_id,
        &purpose,
        rc.job.spec.lake.lease_s,
    )
    .await?;
    let outcome = run_shard_held(rc, stage, shard).await;
    lease.release().await;
    outcome
}

async fn run_shard_held(rc: &RunContext, stage: Stage, shard: Shard) -> Result<StageOutcome> {
    let clock = begin(stage);
    let run = &rc.run;
    let folder = shard.folder(stage.name());
    // What a killed attempt of this shard left half-written; other shards'
    // files are theirs.
    remove_staging_leftovers(run, &folder);
    commit::uncommit(run).await?;
    // The stage is whole again only once its parts are gathered.
    commit::forget_record(run, stage.name()).await?;
    commit::forget_stages(run, &stage.later()).await?;
    let mut produced = Produced::default();
    let dataset = produced.dataset(rc).await?;
    let written = match stage {
        Stage::SoftLabels => {
            let teachers = produced.models_of(rc, &[Stage::Teacher]).await?;
            soft_labels::emit_source_labels(
                &rc.job,
                run,
                dataset,
                &teachers,
                Some((shard, &folder)),
            )
            .await?
            .written
        }
        Stage::Evaluate => {
            let models = produced.models_of(rc, &Stage::TRAINING).await?;
            let ceiling = load_ceiling(rc).await?;
            evaluate::evaluate_shard(
                &rc.job,
                run,
                dataset,
                &models,
                ceiling.as_ref(),
                shard,
                &folder,
            )
            .await?
        }
        _ => {
            return Err(Error::internal(format!(
                "stage {} has no shards",
                stage.name()
            )));
        }
    };
    let (started, started_at) = clock;
    let seconds = started.elapsed().as_secs_f64();
    let record = rc.stage_record(stage, started_at, seconds, written.clone(), None);
    shard::record_part(run, shard, &record).await?;
    Ok(StageOutcome::Wrote(written))
}
