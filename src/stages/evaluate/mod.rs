//! The evaluate stage: ranks every test target with every model, writes each
//! model's recommendation lists as they are produced, and one tidy
//! evaluation table with a row per (model, metric, k).

pub mod report;
pub mod results;

use std::sync::Arc;

use results::{ModelResult, OVERLAP_K, evaluation_rows, evaluation_schema, mark_pareto, overlap};

use crate::artifacts::recommendations::{recommendation_batch, recommendations_schema};
use crate::config::Job;
use crate::dataset::{Dataset, Split, Target};
use crate::error::{Error, Result};
use crate::lake::{RowGroups, WrittenObject};
use crate::model::score::{MetricSums, Metrics, Speed, measure_speed, rank_targets};
use crate::model::{ModelArtifact, Scorer};
use crate::run::RunFolder;

/// What the evaluate stage produced.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Per model.
    pub results: Vec<ModelResult>,
    /// Files written (recommendations, evaluation).
    pub written: Vec<WrittenObject>,
}

/// Evaluates every model on the test targets and writes the results.
pub async fn evaluate_models(
    job: &Job,
    run: &RunFolder,
    run_id: &str,
    dataset: Arc<Dataset>,
    models: &[ModelArtifact],
) -> Result<Evaluation> {
    let targets = Arc::new(dataset.targets(Split::Test));
    if targets.is_empty() {
        return Err(Error::data(
            "split table",
            "no user has a test event after an earlier event: nothing to evaluate (too few events per user?)",
        ));
    }
    let mut results = Vec::new();
    let mut written = Vec::new();
    let mut tops = Vec::new();
    for artifact in models {
        let (metrics, top, object, speed) = evaluate_one(
            job,
            run,
            Arc::clone(&dataset),
            Arc::clone(&targets),
            artifact,
        )
        .await?;
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
        results.push(ModelResult {
            name: artifact.card.name.clone(),
            role: artifact.card.role.clone(),
            variant: artifact.card.variant.clone(),
            training: artifact.card.training.clone(),
            loss: artifact.card.loss.clone(),
            params: artifact.params,
            size_bytes: artifact.bytes.len() as u64,
            metrics,
            teacher_overlap_10: None,
            speed,
            pareto: false,
        });
    }
    mark_pareto(&mut results);
    let source = &job.spec.distill.source;
    if job.spec.distill.enabled
        && let Some(s) = results.iter().position(|r| &r.name == source)
    {
        for (r, top) in results.iter_mut().zip(&tops) {
            if &r.name != source {
                r.teacher_overlap_10 = Some(overlap(&tops[s], top));
            }
        }
    }
    let batch = evaluation_rows(job, run, run_id, &results)?;
    written.push(
        run.write_batches(
            "evaluation/evaluation.parquet",
            evaluation_schema(),
            vec![batch],
            vec![],
        )
        .await?,
    );
    let html = report::html(&job.spec.name, run.run_date(), run_id, &results);
    written.push(run.put("report.html", bytes::Bytes::from(html)).await?);
    Ok(Evaluation { results, written })
}

/// Ranks all targets with one model on a blocking thread, streaming its
/// recommendation batches to the lake as they come.
async fn evaluate_one(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    targets: Arc<Vec<Target>>,
    artifact: &ModelArtifact,
) -> Result<(Metrics, Vec<u32>, WrittenObject, Option<Speed>)> {
    let scorer: Arc<dyn Scorer> = Arc::from(artifact.scorer(dataset.n_items())?);
    let timed = Arc::clone(&scorer);
    let name = artifact.card.name.clone();
    let ks = job.spec.evaluation.ks.clone();
    let batch_users = job.spec.evaluation.batch_users;
    let list_len = job.spec.evaluation.list_len();
    let latency_users = job.spec.evaluation.latency_users;
    let schema = recommendations_schema(dataset.user_ids.data_type(), dataset.item_ids.data_type());

    let rel = format!("recommendations/{name}.parquet");
    let producer_schema = Arc::clone(&schema);
    let (timed_data, timed_targets) = (Arc::clone(&dataset), Arc::clone(&targets));
    let ((metrics, tops), written) = run
        .write_parquet_from(&rel, schema, vec![], RowGroups::Bounded, move |sink| {
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
            Ok((sums.finish(), tops))
        })
        .await?;
    // Timed after the evaluation pass, alone, so writing does not count.
    let speed = if latency_users > 0 {
        let s = tokio::task::spawn_blocking(move || {
            measure_speed(
                timed.as_ref(),
                &timed_data,
                &timed_targets,
                batch_users,
                list_len,
                latency_users,
            )
        })
        .await
        .map_err(|e| Error::internal(format!("timing failed: {e}")))??;
        Some(s)
    } else {
        None
    };
    Ok((metrics, tops, written, speed))
}
