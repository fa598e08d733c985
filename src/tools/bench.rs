//! Benchmarks behind `recdistill bench`: numbers for `docs/benchmarks.md`,
//! never pass/fail tests.
//!
//! - `teacher`: median epoch time of the teacher on a job's data, next to
//!   the PyTorch peer (`sasrec_torch.py`) with the same config (at the
//!   peer's feed-forward width, `d_model`), same machine, same sitting.
//! - `softmax`: time of one training step (the teacher's, or with `--link`
//!   the student's distilled from soft labels) at two catalogue sizes with
//!   the same batch, showing that with sampled softmax the catalogue size
//!   does not slow a step (embedding gradients and Adam touch only the
//!   batch's rows).
//! - `soft-labels`: soft-label generation for a synthetic population of
//!   users, scoring alone and scoring while streaming the Parquet file to a
//!   lake, with the process's peak memory: it must not grow with the users.
//! - `compress`: scoring speed of the job's student and its compressed
//!   variants at several catalogue sizes, timed as the evaluate stage times
//!   models.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use chrono::NaiveDate;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{Job, LakeSpec, LossFamily, Softmax, TeacherSpec};
use crate::dataset::{self, Dataset};
use crate::error::{Error, Result};
use crate::lake::{Lake, engine};
use crate::model::sasrec::{PAD, SasRec, SasRecConfig};
use crate::model::stored::simd::int8_kernel;
use crate::run::RunFolder;
use crate::run::commit::InputBounds;
use crate::stages::{features, ingest};
use crate::train::cpu::Trainer;
use crate::train::{
    Distillation, LabelInfo, NO_LABEL, SoftRows, TrainSettings, fill_window, fit_on_device,
    thread_pool, train_sequences,
};

/// Where to find the PyTorch peer.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Python interpreter with torch installed.
    pub python: PathBuf,
    /// `sasrec_torch.py`.
    pub script: PathBuf,
    /// The RecBole `.inter` file of the same data.
    pub inter: PathBuf,
}

/// Median of `values` (0 for none).
fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Builds `job`'s dataset from its lake, writing the feature tables to a
/// throwaway in-memory lake (the job's lake is only read).
pub async fn load_job_dataset(job: &Job) -> Result<Dataset> {
    let lake = Lake::open(&job.spec.lake)?;
    let ctx = engine::session(&job.spec.input, &job.spec.lake).await?;
    lake.register(&ctx);
    ingest::ingest(job, &lake, &ctx, &InputBounds::everything()).await?;
    let scratch = Lake::open(&LakeSpec {
        url: format!("memory://bench-{}", std::process::id()),
        ..Default::default()
    })?;
    scratch.register(&ctx);
    let date = NaiveDate::from_ymd_opt(2000, 1, 1).ok_or_else(|| Error::internal("date"))?;
    let run = RunFolder::new(scratch, "bench", &job.spec.name, date);
    features::build_features(job, &run, &ctx).await?;
    dataset::load_dataset(&ctx).await
}

/// Median epoch time and last valid NDCG@10 of the id-only teacher `spec`
/// trained for `epochs` epochs on `data`.
async fn teacher_epochs(
    job: &Job,
    spec: &TeacherSpec,
    data: &Arc<Dataset>,
    epochs: usize,
) -> Result<(f64, f64)> {
    let config = SasRecConfig::for_teacher(spec, data.n_items(), 0);
    let mut settings = TrainSettings::for_teacher(spec, job.spec.seed, "bench teacher");
    settings.epochs = epochs;
    settings.patience = epochs;
    let (device, threads) = (job.spec.device.clone(), job.spec.threads);
    let data = Arc::clone(data);
    let log = tokio::task::spawn_blocking(move || {
        SasRec::new(config, Vec::new(), settings.seed)
            .and_then(|model| fit_on_device(model, &data, &settings, &device, threads, None))
            .map(|(_, log)| log)
    })
    .await
    .map_err(|e| Error::internal(format!("bench failed: {e}")))??;
    let mut seconds: Vec<f64> = log.iter().map(|e| e.seconds).collect();
    Ok((
        median(&mut seconds),
        log.last().map_or(0.0, |e| e.valid_ndcg_10),
    ))
}

/// Trains the job's teacher for `epochs` epochs and, with a peer, runs it
/// with the same configuration. The peer's feed-forward width is always
/// its `d_model` (`sasrec_torch.py` has no width option), so where the
/// job's `ffn` differs, the teacher is also timed at `ffn = d_model` and the
/// ratio is taken at that configuration.
pub async fn teacher(job: &Job, epochs: usize, peer: Option<Peer>) -> Result<String> {
    let spec = job.spec.models.teacher.clone();
    let data = Arc::new(load_job_dataset(job).await?);
    let (ours, ndcg) = teacher_epochs(job, &spec, &data, epochs).await?;
    let threads = if job.spec.threads == 0 {
        rayon::current_num_threads()
    } else {
        job.spec.threads
    };
    let mut report = format!(
        "teacher d_model={} layers={} heads={} ffn={} max_len={} batch={} on {} ({threads} threads)\n\
         recdistill: median epoch {ours:.3} s over {epochs} epochs; valid NDCG@10 after the last {ndcg:.4}\n",
        spec.d_model,
        spec.layers,
        spec.heads,
        spec.ffn,
        spec.max_len,
        spec.batch_size,
        job.spec.device,
    );
    let Some(peer) = peer else {
        return Ok(report);
    };
    let matched = if spec.ffn == spec.d_model {
        ours
    } else {
        let same = TeacherSpec {
            ffn: spec.d_model,
            ..spec.clone()
        };
        let (seconds, ndcg) = teacher_epochs(job, &same, &data, epochs).await?;
        report.push_str(&format!(
            "recdistill at the peer's feed-forward width (ffn = d_model = {}): median epoch {seconds:.3} s; \
             valid NDCG@10 after the last {ndcg:.4}\n",
            spec.d_model
        ));
        seconds
    };
    let output = Command::new(&peer.python)
        .arg(&peer.script)
        .arg(&peer.inter)
        .args(["--d", &spec.d_model.to_string()])
        .args(["--layers", &spec.layers.to_string()])
        .args(["--heads", &spec.heads.to_string()])
        .args(["--maxlen", &spec.max_len.to_string()])
        .args(["--batch", &spec.batch_size.to_string()])
        .args(["--lr", &spec.lr.to_string()])
        .args(["--dropout", &spec.dropout.to_string()])
        .args(["--epochs", &epochs.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--seed", &job.spec.seed.to_string()])
        .output()
        .map_err(|e| Error::config(format!("cannot run {}: {e}", peer.python.display())))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    let parsed: Option<serde_json::Value> = line.and_then(|l| serde_json::from_str(l).ok());
    let theirs = parsed
        .as_ref()
        .and_then(|v| v["median_epoch_s"].as_f64())
        .ok_or_else(|| {
            Error::config(format!(
                "the peer printed no JSON line with median_epoch_s (exit {:?}):\n{}\n{}",
                output.status.code(),
                stdout,
                String::from_utf8_lossy(&output.stderr)
            ))
        })?;
    report.push_str(&format!(
        "pytorch peer (ffn = d_model = {}): median epoch {theirs:.3} s over {epochs} epochs\n\
         ratio recdistill / pytorch, same configuration: {:.2}\n",
        spec.d_model,
        matched / theirs
    ));
    if spec.ffn != spec.d_model {
        report.push_str(&format!(
            "ratio recdistill at the job's ffn {} / pytorch at ffn {}: {:.2}\n",
            spec.ffn,
            spec.d_model,
            ours / theirs
        ));
    }
    Ok(report)
}

/// A synthetic training set over a catalogue of `n_items`: `users`
/// sequences of `len` + 1 items drawn from a Zipf-like popularity over the
/// first `draw_from` items (the same sequences whatever `n_items`).
fn synthetic(n_items: usize, draw_from: usize, users: usize, len: usize, seed: u64) -> Dataset {
    let mut rng = StdRng::seed_from_u64(seed);
    let sequences: Vec<Vec<u32>> = (0..users)
        .map(|_| {
            (0..=len)
                .map(|_| {
                    let u: f64 = rng.random();
                    ((draw_from as f64).powf(u) - 1.0) as u32 % draw_from as u32
                })
                .collect()
        })
        .collect();
    Dataset::from_train_sequences(n_items, &sequences)
}

/// Median milliseconds of one training step at each catalogue size, with
/// `softmax` and `job`'s teacher settings or, with `link`, its student
/// distilled from synthetic soft labels (the first of `distill.losses`, K
/// = `distill.k` items per position); the batch is the same at every size
/// (items of the smallest catalogue).
pub fn softmax_steps(
    job: &Job,
    sizes: &[usize],
    softmax: Softmax,
    steps: usize,
    link: bool,
) -> Result<String> {
    let teacher = &job.spec.models.teacher;
    let distill = &job.spec.distill;
    let student = &distill.student;
    let (batch_size, max_len, d_model, layers, negatives) = if link {
        let l = student;
        (
            l.batch_size,
            l.max_len,
            l.d_model,
            l.layers,
            distill.negatives,
        )
    } else {
        let t = teacher;
        (t.batch_size, t.max_len, t.d_model, t.layers, t.negatives)
    };
    let k = distill.k;
    let mut report = format!(
        "one training step of the {}, batch {batch_size} × max_len {max_len}, d_model {d_model}, {layers} layers, softmax {softmax:?}{}{}\n{:>12} {:>14} {:>16} {:>14}\n",
        if link { "student link" } else { "teacher" },
        if softmax == Softmax::Sampled {
            format!(" with {negatives} negatives")
        } else {
            String::new()
        },
        if link {
            format!(", soft labels of {k} items ({})", distill.losses[0])
        } else {
            String::new()
        },
        "items",
        "median ms",
        "softmax classes",
        "item params"
    );
    let pool = thread_pool(job.spec.threads)?;
    for &n_items in sizes {
        let smallest = sizes.iter().copied().min().unwrap_or(n_items);
        let data = synthetic(n_items, smallest, batch_size, max_len, job.spec.seed);
        let (config, mut settings) = if link {
            (
                SasRecConfig::for_link(student, n_items),
                TrainSettings::for_link(distill, student, job.spec.seed, "bench"),
            )
        } else {
            (
                SasRecConfig::for_teacher(teacher, n_items, 0),
                TrainSettings::for_teacher(teacher, job.spec.seed, "bench"),
            )
        };
        settings.softmax = softmax;
        let mut model = SasRec::new(config, Vec::new(), job.spec.seed)?;
        let sequences = train_sequences(&data)?;
        let b = sequences.len().min(batch_size);
        let mut inputs = vec![PAD; b * max_len];
        let mut targets = vec![PAD; b * max_len];
        for (slot, (_, seq)) in sequences.iter().take(b).enumerate() {
            let span = slot * max_len..(slot + 1) * max_len;
            fill_window(seq, &mut inputs[span.clone()], &mut targets[span]);
        }
        // Every target slot's soft label: K distinct items spread over the
        // catalogue, logits falling with rank.
        let kk = k.min(n_items);
        let mut labels = SoftRows::new(kk);
        let mut soft = vec![NO_LABEL; targets.len()];
        for (slot, &t) in targets.iter().enumerate().filter(|(_, t)| **t != PAD) {
            let items: Vec<u32> = (0..kk)
                .map(|j| ((t as usize + j * 7919) % n_items) as u32)
                .collect();
            let logits: Vec<f32> = (0..kk).map(|j| 5.0 - 0.2 * j as f32).collect();
            labels
                .push(slot as u32, 1, &items, &logits, 0.0)
                .map_err(Error::internal)?;
            soft[slot] = (labels.len() - 1) as u32;
        }
        let (mut times, classes) = pool.install(|| -> Result<(Vec<f64>, usize)> {
            let mut trainer = if link {
                let family: LossFamily = distill.losses[0].parse()?;
                let info = LabelInfo {
                    k: kk,
                    temperature: distill.temperature_of(student),
                    ..LabelInfo::default()
                };
                let distillation =
                    Distillation::new(info, distill.alpha_of(student), family, distill.rank_decay);
                Trainer::distilling(&model, &data, &settings, Arc::new(distillation))?
            } else {
                Trainer::new(&model, &data, &settings)?
            };
            let slot_labels = link.then_some((&labels, &soft[..]));
            let mut times = Vec::new();
            for s in 0..steps + 1 {
                let started = Instant::now();
                trainer.step(&mut model, &inputs, &targets, slot_labels, b, s as u64)?;
                // The first step pays for page faults of fresh buffers.
                if s > 0 {
                    times.push(started.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok((times, trainer.classes()))
        })?;
        report.push_str(&format!(
            "{n_items:>12} {:>14.1} {classes:>16} {:>14}\n",
            median(&mut times),
            n_items * d_model
        ));
    }
    Ok(report)
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The fp32 matrix product's rate on these cores, GFLOP/s: `rows × d`
/// hidden states against an `items × d` table, repeated for a second.
fn gemm_gflops(rows: usize, d: usize, items: usize) -> f64 {
    use crate::model::kernels::{View, matmul, par_all};
    let hidden: Vec<f32> = (0..rows * d).map(|i| (i % 7) as f32 * 0.1).collect();
    let table: Vec<f32> = (0..items * d).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut out = vec![0.0f32; rows * items];
    let started = Instant::now();
    let mut products = 0usize;
    while products < 2 || started.elapsed().as_secs_f64() < 1.0 {
        matmul(
            &mut out,
            items,
            View::rm(&hidden, rows, d),
            View::rm(&table, items, d).t(),
            false,
            1.0,
            par_all(),
        );
        products += 1;
    }
    2.0 * (products * rows * items * d) as f64 / started.elapsed().as_secs_f64() / 1e9
}

/// Soft labels of a randomly initialized model of `job`'s teacher size
/// (scoring costs the same as a trained one's) for `users` synthetic users
/// of `len` + 1 items over `n_items`: first scored alone (batches dropped),
/// then scored and streamed to `soft_labels/bench.parquet` under `out`.
pub async fn soft_labels(
    job: &Job,
    users: usize,
    n_items: usize,
    len: usize,
    out: &str,
) -> Result<String> {
    use crate::artifacts::soft_labels::{
        SoftLabelSettings, label_users, soft_labels_schema, write_soft_labels,
    };
    let spec = &job.spec.models.teacher;
    let data = std::sync::Arc::new(synthetic(n_items, n_items, users, len, job.spec.seed));
    let model = SasRec::new(
        SasRecConfig::for_teacher(spec, n_items, 0),
        Vec::new(),
        job.spec.seed,
    )?;
    let settings = SoftLabelSettings::for_source(&job.spec.distill);
    let schema = soft_labels_schema(data.user_ids.data_type(), data.item_ids.data_type());
    let pool = thread_pool(job.spec.threads)?;
    let started = Instant::now();
    let scored = {
        let (model, data) = (model.clone(), std::sync::Arc::clone(&data));
        tokio::task::spawn_blocking(move || {
            pool.install(|| {
                label_users(
                    &model,
                    "bench",
                    &data,
                    0..data.n_users(),
                    &settings,
                    &schema,
                    |_| Ok(()),
                )
            })
        })
        .await
        .map_err(|e| Error::internal(format!("bench failed: {e}")))??
    };
    let score_s = started.elapsed().as_secs_f64();
    let after_scoring = peak_rss_mib().unwrap_or(0.0);

    let lake = Lake::open(&LakeSpec {
        url: out.to_string(),
        ..Default::default()
    })?;
    let run = RunFolder::new(lake, "bench", "soft-labels", NaiveDate::default());
    let artifact = model.to_artifact("bench", "teacher", "supervised", "ce", None)?;
    let started = Instant::now();
    let (written, rows) =
        write_soft_labels(&run, data, &artifact, settings, job.spec.threads).await?;
    let write_s = started.elapsed().as_secs_f64();
    let peak = peak_rss_mib().unwrap_or(0.0);
    // The floor: the same cores' fp32 matrix product on the scoring shape
    // (512 hidden states against the whole catalogue).
    let gemm = {
        let pool = thread_pool(job.spec.threads)?;
        pool.install(|| gemm_gflops(512, spec.d_model, n_items))
    };
    let scoring_flops = 2.0 * scored as f64 * n_items as f64 * spec.d_model as f64;
    let achieved = scoring_flops / score_s / 1e9;
    Ok(format!(
        "soft labels: {users} users × {len} positions, {n_items} items, d_model {}, {} layers, K {}\n\
         scoring only:      {scored} rows in {score_s:.2} s ({:.0} rows/s), peak RSS {after_scoring:.0} MiB\n\
         scoring + writing: {rows} rows in {write_s:.2} s ({:.0} rows/s), {:.1} MiB written, peak RSS {peak:.0} MiB\n\
         scoring product:   {achieved:.1} GFLOP/s counting only the rows × items × d_model product, \
         against {gemm:.1} GFLOP/s for that product alone on these cores ({:.0} %)\n",
        spec.d_model,
        spec.layers,
        settings.k.min(n_items),
        scored as f64 / score_s,
        rows as f64 / write_s,
        written.size as f64 / (1024.0 * 1024.0),
        100.0 * achieved / gemm,
    ))
}

/// Users in one timed item product (about one ranking slice at 200,000 items).
const PRODUCT_USERS: usize = 16;

/// Multiply–adds per second of the item product alone: `users` hidden
/// states against every stored item row, on every thread, for at least
/// half a second (the median of the timed calls).
fn item_product_rate(item: &crate::model::stored::Matrix, users: usize) -> f64 {
    let (rows, cols) = (item.rows(), item.cols());
    let mut rng = StdRng::seed_from_u64(3);
    let x: Vec<f32> = (0..users * cols)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let mut out = vec![0.0f32; users * rows];
    item.apply(&x, users, &mut out, rows);
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 5 || started.elapsed().as_secs_f64() < 0.5 {
        let call = Instant::now();
        item.apply(&x, users, &mut out, rows);
        std::hint::black_box(&out);
        times.push(call.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    (users * rows * cols) as f64 / times[times.len() / 2].max(1e-12) / 1e9
}

/// Scoring speed of the job's student and its compressed variants (random
/// weights: the cost does not depend on them) at each catalogue size:
/// `users` synthetic users with `len` items each, timed like the evaluate
/// stage times models (one user at a time, then batches).
pub fn compressed_scoring(
    job: &Job,
    sizes: &[usize],
    users: usize,
    len: usize,
    variants: &[String],
) -> Result<String> {
    use crate::config::Variant;
    use crate::dataset::Target;
    use crate::model::sasrec::infer::StoredSasRec;
    use crate::model::sasrec::shrink::encode_variant;
    use crate::model::score::measure_speed;
    let link = &job.spec.distill.student;
    let batch = job.spec.evaluation.batch_users;
    let parsed: Vec<Variant> = variants.iter().map(|v| v.parse()).collect::<Result<_>>()?;
    let mut report = format!(
        "scoring as stored: student d_model {}, {} layers, ffn {}, max_len {}; {users} users × {len} items, batches of {batch}, {} threads; int8 kernel {}\n{:>9} {:<28} {:>11} {:>9} {:>9} {:>10} {:>8} {:>15}\n",
        link.d_model,
        link.layers,
        link.ffn,
        link.max_len,
        rayon::current_num_threads(),
        int8_kernel().name(),
        "items",
        "variant",
        "bytes",
        "p50_ms",
        "p99_ms",
        "users/s",
        "speedup",
        "product GMAC/s"
    );
    for &n_items in sizes {
        let data = synthetic(n_items, n_items, users, len, job.spec.seed);
        let targets: Vec<Target> = (0..users)
            .map(|u| Target {
                user: u as u32,
                position: len,
                item: data.user_items(u)[len],
            })
            .collect();
        let config = SasRecConfig::for_link(link, n_items);
        let model = SasRec::new(config, Vec::new(), job.spec.seed)?;
        let mut models = vec![("fp32".to_string(), StoredSasRec::from_dense(&model))];
        for v in &parsed {
            models.push((
                v.to_string(),
                encode_variant(&model, v, &job.spec.compress, Some(&data.train_counts))?,
            ));
        }
        let mut base = None;
        for (name, stored) in &models {
            let card = model
                .to_artifact("bench", "student", "scratch", "ce", None)?
                .card;
            let bytes = crate::model::ModelArtifact::from_stored(card, stored, None)?
                .bytes
                .len();
            let speed = measure_speed(stored, &data, &targets, batch, 10, 500)?;
            let ratio = speed.users_per_s / *base.get_or_insert(speed.users_per_s);
            let product = item_product_rate(&stored.item, PRODUCT_USERS);
            report.push_str(&format!(
                "{n_items:>9} {name:<28} {bytes:>11} {:>9.3} {:>9.3} {:>10.0} {ratio:>7.2}× {product:>15.1}\n",
                speed.latency_ms_p50, speed.latency_ms_p99, speed.users_per_s
            ));
        }
    }
    Ok(report)
}
