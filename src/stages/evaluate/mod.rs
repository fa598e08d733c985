//! The evaluate stage: ranks every test target with every model, writes each
//! model's recommendation lists as they are produced, and one tidy
//! evaluation table with a row per (model, metric, k).

pub mod report;
pub mod results;

use std::sync::Arc;

use results::{
    ModelResult, OVERLAP_K, evaluation_rows, evaluation_schema, mark_pareto, overlap_counts,
    overlap_share,
};
use serde::{Deserialize, Serialize};

use crate::artifacts::ceiling::{Ceiling, CeilingMeans, CeilingSums};
use crate::artifacts::evaluation::scores_at_10;
use crate::artifacts::recommendations::{recommendation_batch, recommendations_schema};
use crate::config::Job;
use crate::dataset::{Dataset, Split, Target};
use crate::error::{Error, Result};
use crate::lake::{RowGroups, WrittenObject};
use crate::model::score::{MetricSums, Speed, measure_speed, rank_targets};
use crate::model::{ModelArtifact, Scorer};
use crate::run::RunFolder;
use crate::run::shard::Shard;
use crate::run::{commit, publish};

/// What the evaluate stage produced.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Per model.
    pub results: Vec<ModelResult>,
    /// The log's Bayes ceiling on the same targets, per cut-off of the job
    /// (expected HR, NDCG, MRR), when the log has one for every target.
    pub ceiling: Option<CeilingMeans>,
    /// Files written (recommendations, evaluation).
    pub written: Vec<WrittenObject>,
}

/// What one share of an evaluation (the whole, or one shard) counted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EvaluationShare {
    /// Per model, in evaluation order.
    models: Vec<ModelShare>,
    /// The ceiling of the share's targets, when the log has a ceiling table.
    ceiling: Option<CeilingSums>,
}

/// One model's share of an evaluation: exact counts, so the shares of a
/// sharded evaluation add up to the unsharded one bit for bit.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ModelShare {
    name: String,
    role: String,
    variant: String,
    training: String,
    loss: Option<String>,
    /// Run date of the earlier run a warm-started model began from.
    #[serde(default)]
    warm_started_from: Option<String>,
    params: u64,
    size_bytes: u64,
    sums: MetricSums,
    /// Items of the distillation source's top-10 this model's top-10 also
    /// holds, and the lists compared (`None` without a source).
    overlap: Option<(u64, u64)>,
    /// Timed by the unsharded stage, or by shard 0 over every test user.
    speed: Option<Speed>,
}

/// What a shard of the evaluate stage leaves for the gather, beside its
/// recommendation files.
const SHARE_PATH: &str = "evaluation/share.json";

/// Evaluates every model on the test targets and writes the results, with
/// the log's `ceiling` beside them where it has one.
pub async fn evaluate_models(
    job: &Job,
    run: &RunFolder,
    run_id: &str,
    dataset: Arc<Dataset>,
    models: &[ModelArtifact],
    ceiling: Option<&Ceiling>,
) -> Result<Evaluation> {
    let (share, written) =
        evaluate_share(job, run, dataset, models, ceiling, None, &|rel| rel.into()).await?;
    finish(job, run, run_id, vec![share], written).await
}

/// Evaluates every model on the test targets of `shard` and writes its
/// recommendations and its counts below `folder`; the gather
/// ([`gather_evaluation`]) joins the shards' parts.
pub async fn evaluate_shard(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    models: &[ModelArtifact],
    ceiling: Option<&Ceiling>,
    shard: Shard,
    folder: &str,
) -> Result<Vec<WrittenObject>> {
    let place = |rel: &str| format!("{folder}/{rel}");
    let (share, mut written) =
        evaluate_share(job, run, dataset, models, ceiling, Some(shard), &place).await?;
    let bytes = serde_json::to_vec_pretty(&share).map_err(|e| Error::internal(e.to_string()))?;
    written.push(
        run.put(&place(SHARE_PATH), bytes::Bytes::from(bytes))
            .await?,
    );
    Ok(written)
}

/// Joins the parts of the evaluate stage's shards, given as (file, its
/// parts in shard order; see [`crate::run::shard::joined_files`]): each
/// model's recommendation parts into the file the unsharded stage writes,
/// their counts into one evaluation table and report.
pub async fn gather_evaluation(
    job: &Job,
    run: &RunFolder,
    run_id: &str,
    files: &[(String, Vec<String>)],
) -> Result<Evaluation> {
    let mut shares = Vec::new();
    let mut written = Vec::with_capacity(files.len() + 1);
    for (rel, sources) in files {
        if rel == SHARE_PATH {
            for source in sources {
                let bytes = run.get(source).await?;
                let share: EvaluationShare = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::data(
                        run.url_of(source),
                        format!("unreadable evaluation share: {e}"),
                    )
                })?;
                shares.push(share);
            }
            continue;
        }
        let sources: Vec<String> = sources.iter().map(|p| run.rel(p)).collect();
        let mut object = run
            .lake()
            .concat_parquet(&sources, &run.rel(rel), &[], RowGroups::Bounded)
            .await?;
        object.path = rel.clone();
        written.push(object);
    }
    if shares.is_empty() {
        return Err(Error::data(
            run.display(),
            format!("the evaluate stage's parts have no {SHARE_PATH}; rerun every shard"),
        ));
    }
    finish(job, run, run_id, shares, written).await
}

/// Ranks the targets of `shard` (all without one) with every model,
/// writing each model's recommendation lists to `place(rel)`, and sums the
/// ceiling of those targets.
async fn evaluate_share(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    models: &[ModelArtifact],
    ceiling: Option<&Ceiling>,
    shard: Option<Shard>,
    place: &(dyn Fn(&str) -> String + Sync),
) -> Result<(EvaluationShare, Vec<WrittenObject>)> {
    let targets = dataset.targets(Split::Test);
    if targets.is_empty() {
        return Err(Error::data(
            "split table",
            "no user has a test event after an earlier event: nothing to evaluate (too few events per user?)",
        ));
    }
    let spec = &job.spec.evaluation;
    // Throughput is timed over the first `throughput_users` test users,
    // by the unsharded stage or by shard 0.
    let timed = match spec.throughput_users {
        0 => targets.len(),
        n => n.min(targets.len()),
    };
    let timed_targets = (spec.latency_users > 0 && shard.is_none_or(|s| s.index == 0))
        .then(|| Arc::new(targets[..timed].to_vec()));
    let mine = match shard {
        None => targets,
        Some(shard) => {
            let batch = spec.batch_users.max(1);
            let batches = shard.units(targets.len().div_ceil(batch));
            let end = (batches.end * batch).min(targets.len());
            targets[(batches.start * batch).min(end)..end].to_vec()
        }
    };
    let ceiling = ceiling.map(|c| c.sums(&dataset, &mine));
    let mine = Arc::new(mine);
    let groups = if shard.is_some() {
        RowGroups::PER_BATCH
    } else {
        RowGroups::Bounded
    };
    let mut shares = Vec::new();
    let mut written = Vec::new();
    let mut tops = Vec::new();
    for artifact in models {
        let rel = place(&format!("recommendations/{}.parquet", artifact.card.name));
        let (sums, top, object) = rank_one(
            job,
            run,
            Arc::clone(&dataset),
            Arc::clone(&mine),
            artifact,
            &rel,
            groups,
        )
        .await?;
        let speed = match &timed_targets {
            Some(timed) => {
                Some(time_one(job, Arc::clone(&dataset), Arc::clone(timed), artifact).await?)
            }
            None => None,
        };
        let metrics = sums.finish();
        tracing::info!(
            model = %artifact.card.name,
            ndcg_10 = metrics.ndcg_at(10),
            hr_10 = metrics.hr_at(10),
            users = metrics.users,
            bytes = artifact.bytes.len(),
            latency_ms_p50 = speed.map(|s| s.latency_ms_p50),
            users_per_s = speed.map(|s| s.users_per_s),
            "evaluated"
        );
        written.push(object);
        tops.push(top);
        shares.push(ModelShare {
            name: artifact.card.name.clone(),
            role: artifact.card.role.clone(),
            variant: artifact.card.variant.clone(),
            training: artifact.card.training.clone(),
            loss: artifact.card.loss.clone(),
            warm_started_from: artifact
                .card
                .warm_started_from
                .as_ref()
                .map(|w| w.run_date.clone()),
            params: artifact.params,
            size_bytes: artifact.bytes.len() as u64,
            sums,
            overlap: None,
            speed,
        });
    }
    let source = &job.spec.distill.source;
    if job.spec.distill.enabled
        && let Some(s) = shares.iter().position(|r| &r.name == source)
    {
        for (share, top) in shares.iter_mut().zip(&tops) {
            if &share.name != source {
                share.overlap = Some(overlap_counts(&tops[s], top));
            }
        }
    }
    Ok((
        EvaluationShare {
            models: shares,
            ceiling,
        },
        written,
    ))
}

/// Adds up the shares (one per shard, in order), then writes the
/// evaluation table and the report.
async fn finish(
    job: &Job,
    run: &RunFolder,
    run_id: &str,
    shares: Vec<EvaluationShare>,
    mut written: Vec<WrittenObject>,
) -> Result<Evaluation> {
    let mut shares = shares.into_iter();
    let first = shares
        .next()
        .ok_or_else(|| Error::internal("an evaluation of no shares"))?;
    let (mut total, mut ceiling) = (first.models, first.ceiling);
    for share in shares {
        ceiling = match (ceiling, share.ceiling) {
            (Some(mut a), Some(b)) => {
                a.merge(&b)?;
                Some(a)
            }
            _ => None,
        };
        let share = share.models;
        let names = |s: &[ModelShare]| s.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
        if names(&share) != names(&total) {
            return Err(Error::data(
                run.display(),
                format!(
                    "the evaluate stage's parts evaluated different models ({:?} and {:?}); rerun every shard",
                    names(&total),
                    names(&share)
                ),
            ));
        }
        for (t, s) in total.iter_mut().zip(share) {
            t.sums.merge(&s.sums)?;
            t.overlap = match (t.overlap, s.overlap) {
                (Some((a, b)), Some((c, d))) => Some((a + c, b + d)),
                _ => None,
            };
            t.speed = t.speed.or(s.speed);
        }
    }
    let mut results: Vec<ModelResult> = total
        .into_iter()
        .map(|m| ModelResult {
            name: m.name,
            role: m.role,
            variant: m.variant,
            training: m.training,
            loss: m.loss,
            warm_started_from: m.warm_started_from,
            params: m.params,
            size_bytes: m.size_bytes,
            metrics: m.sums.finish(),
            teacher_overlap_10: m.overlap.map(overlap_share),
            speed: m.speed,
            pareto: false,
        })
        .collect();
    mark_pareto(&mut results);
    let ceiling = ceiling.and_then(|sums| {
        let means = sums.means();
        if means.is_none() {
            tracing::warn!(
                matched = sums.matched,
                targets = sums.targets,
                "the ceiling table does not describe every test target of this run (another run date, filter or protocol): no fraction of the ceiling"
            );
        }
        means
    });
    let batch = evaluation_rows(job, run, run_id, &results, ceiling.as_deref())?;
    written.push(
        run.write_batches(
            "evaluation/evaluation.parquet",
            evaluation_schema(),
            vec![batch],
            vec![],
        )
        .await?,
    );
    let history = report_history(job, run).await?;
    let html = report::html(
        &job.spec.name,
        run.run_date(),
        run_id,
        &results,
        ceiling.as_deref(),
        &history,
    );
    written.push(run.put("report.html", bytes::Bytes::from(html)).await?);
    Ok(Evaluation {
        results,
        ceiling,
        written,
    })
}

/// Runs of the history chart, at most this many (the latest).
const HISTORY_RUNS: usize = 90;

/// The job's committed runs before this one (the latest
/// [`HISTORY_RUNS`]), each model's metrics at 10, and what is published. A
/// run whose evaluation cannot be read is left out with a warning; so is
/// the publication when its log cannot be read.
async fn report_history(job: &Job, run: &RunFolder) -> Result<report::History> {
    let prefix = &job.spec.lake.output_prefix;
    let earlier =
        commit::committed_runs_before(run.lake(), prefix, run.job(), run.run_date(), HISTORY_RUNS)
            .await?;
    let mut runs = Vec::new();
    for (folder, manifest) in earlier {
        match scores_at_10(&folder, &manifest).await {
            Ok(scores) => runs.push((folder.run_date(), scores)),
            Err(err @ Error::Data { .. }) => {
                tracing::warn!(run = %folder.display(), %err, "left out of the report's history");
            }
            Err(err) => return Err(err),
        }
    }
    let published_date = match publish::published_run_date(run.lake(), prefix, run.job()).await {
        Ok(date) => date,
        Err(err @ Error::Data { .. }) => {
            tracing::warn!(%err, "the publication log is unreadable: the report marks no published run");
            None
        }
        Err(err) => return Err(err),
    };
    Ok(report::History {
        runs,
        published_model: job.spec.publish.model.clone(),
        published_date,
    })
}

/// Ranks `targets` with one model on a blocking thread, streaming its
/// recommendation batches to `rel` as they come.
async fn rank_one(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    targets: Arc<Vec<Target>>,
    artifact: &ModelArtifact,
    rel: &str,
    groups: RowGroups,
) -> Result<(MetricSums, Vec<u32>, WrittenObject)> {
    let scorer: Arc<dyn Scorer> = Arc::from(artifact.scorer(dataset.n_items())?);
    let name = artifact.card.name.clone();
    let ks = job.spec.evaluation.ks.clone();
    let batch_users = job.spec.evaluation.batch_users;
    let list_len = job.spec.evaluation.list_len();
    let schema = recommendations_schema(dataset.user_ids.data_type(), dataset.item_ids.data_type());
    let producer_schema = Arc::clone(&schema);
    let ((sums, tops), written) = run
        .write_parquet_from(rel, schema, vec![], groups, move |sink| {
            let mut sums = MetricSums::new(&ks);
            let mut tops = Vec::with_capacity(targets.len() * OVERLAP_K);
            rank_targets(
                scorer.as_ref(),
                &dataset,
                &targets,
                batch_users,
                list_len,
                |ranked| {
                    for r in ranked {
                        sums.add(r.rank);
                        let top = r.top.iter().take(OVERLAP_K).map(|(i, _)| *i);
                        tops.extend(top.chain(std::iter::repeat(u32::MAX)).take(OVERLAP_K));
                    }
                    sink(recommendation_batch(
                        &producer_schema,
                        &dataset,
                        &name,
                        ranked,
                    )?)
                },
            )?;
            Ok((sums, tops))
        })
        .await?;
    Ok((sums, tops, written))
}

/// Times one model, alone, after its evaluation pass, so writing does not
/// count.
async fn time_one(
    job: &Job,
    dataset: Arc<Dataset>,
    targets: Arc<Vec<Target>>,
    artifact: &ModelArtifact,
) -> Result<Speed> {
    let scorer: Arc<dyn Scorer> = Arc::from(artifact.scorer(dataset.n_items())?);
    let spec = job.spec.evaluation.clone();
    tokio::task::spawn_blocking(move || {
        measure_speed(
            scorer.as_ref(),
            &dataset,
            &targets,
            spec.batch_users,
            spec.list_len(),
            spec.latency_users,
        )
    })
    .await
    .map_err(|e| Error::internal(format!("timing failed: {e}")))?
}
