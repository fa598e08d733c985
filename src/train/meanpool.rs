//! Training of the learned `meanpool` baseline with candle's autograd and
//! AdamW: full-softmax cross-entropy on the next item at every position of
//! every user's train sequence, early-stopped on the validation NDCG@10.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Normal};

use super::stopping::{EarlyStopping, EpochLog};
use crate::config::MeanPoolSpec;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::model::meanpool::{MeanPool, MeanPoolConfig};
use crate::model::warm::copy_rows;

/// Standard deviation of the initial embeddings.
const INIT_STD: f32 = 0.02;

/// The trainable parameters.
struct Params {
    item_in: Var,
    item_out: Var,
    bias: Var,
}

/// An earlier run's mean-pool model a new one starts from, with, for each
/// of this run's items, its row in the earlier model (see
/// [`crate::model::warm::carry_items`]).
pub type WarmMeanPool<'a> = (&'a MeanPool, &'a [Option<usize>]);

/// The first setting of `spec` whose change from `previous` alters a
/// tensor's shape, so that the model cannot start from it.
pub fn warm_start_blocker(previous: &MeanPool, spec: &MeanPoolSpec) -> Option<&'static str> {
    (previous.config().d_model != spec.d_model).then_some("d_model")
}

/// Trains a mean-pool model on `dataset`'s train split, early-stopping on
/// its valid split (`valid_users` of it, as [`EarlyStopping::new`]).
/// With `warm`, it starts from an earlier model: the rows of items it
/// knew are copied, new items start as in a cold start. Returns the best
/// epoch's model and the per-epoch log.
pub fn fit(
    dataset: &Dataset,
    spec: &MeanPoolSpec,
    seed: u64,
    valid_users: usize,
    warm: Option<WarmMeanPool>,
) -> Result<(MeanPool, Vec<EpochLog>)> {
    let device = Device::Cpu;
    let n = dataset.n_items();
    let d = spec.d_model;
    let config = MeanPoolConfig {
        d_model: d,
        window: spec.window,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let params = init_params(n, d, &mut rng, &device, warm)?;
    let mut optimizer = AdamW::new(
        vec![
            params.item_in.clone(),
            params.item_out.clone(),
            params.bias.clone(),
        ],
        ParamsAdamW {
            lr: spec.lr,
            weight_decay: spec.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;

    let sequences: Vec<Vec<u32>> = (0..dataset.n_users())
        .map(|u| dataset.train_items(u))
        .collect();
    let mut examples: Vec<(u32, u32)> = sequences
        .iter()
        .enumerate()
        .flat_map(|(u, s)| (1..s.len() as u32).map(move |t| (u as u32, t)))
        .collect();
    if examples.is_empty() {
        return Err(Error::data(
            "split table",
            "no user has two train events: nothing to learn a next item from",
        ));
    }
    let mut stopping = EarlyStopping::new("meanpool", spec.patience, dataset, valid_users);
    let steps = examples.len().div_ceil(spec.batch_size);
    for epoch in 1..=spec.epochs {
        let started = Instant::now();
        examples.shuffle(&mut rng);
        let progress = crate::progress::bar(
            steps as u64,
            &format!("meanpool epoch {epoch}{}", stopping.last_summary()),
        );
        let mut loss_sum = 0.0;
        for batch in examples.chunks(spec.batch_size) {
            let loss = train_step(&params, &sequences, batch, config, n, &device)?;
            optimizer.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
            progress.inc(1);
        }
        progress.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        let model = from_params(&params, config, n)?;
        let loss = loss_sum / examples.len() as f64;
        if stopping.end_epoch(epoch, seconds, loss, &model, dataset, || model.clone())? {
            break;
        }
    }
    let (best, log) = stopping.finish();
    let model = best.ok_or_else(|| Error::internal("no epoch ran"))?;
    Ok((model, log))
}

fn from_params(params: &Params, config: MeanPoolConfig, n: usize) -> Result<MeanPool> {
    let item_in = params
        .item_in
        .as_tensor()
        .narrow(0, 0, n)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(MeanPool::new(
        config,
        n,
        item_in,
        params.item_out.as_tensor().copy()?,
        params.bias.as_tensor().copy()?,
    ))
}

fn init_params(
    n: usize,
    d: usize,
    rng: &mut StdRng,
    device: &Device,
    warm: Option<WarmMeanPool>,
) -> Result<Params> {
    let normal = Normal::new(0.0f32, INIT_STD).map_err(|e| Error::internal(e.to_string()))?;
    let mut sample =
        |rows: usize| -> Vec<f32> { (0..rows * d).map(|_| normal.sample(rng)).collect() };
    // One extra input row: the padding of short contexts (masked out).
    let mut item_in = sample(n + 1);
    let mut item_out = sample(n);
    let mut bias = vec![0f32; n];
    if let Some((previous, rows)) = warm {
        if rows.len() != n || previous.config().d_model != d {
            return Err(Error::internal(format!(
                "meanpool warm start: {} carried rows of width {} for {n} items of width {d}",
                rows.len(),
                previous.config().d_model
            )));
        }
        let (old_in, old_out, old_bias) = previous.tensors()?;
        copy_rows(&mut item_in[..n * d], &old_in, d, rows);
        copy_rows(&mut item_out, &old_out, d, rows);
        copy_rows(&mut bias, &old_bias, 1, rows);
    }
    Ok(Params {
        item_in: Var::from_tensor(&Tensor::from_vec(item_in, (n + 1, d), device)?)?,
        item_out: Var::from_tensor(&Tensor::from_vec(item_out, (n, d), device)?)?,
        bias: Var::from_tensor(&Tensor::from_vec(bias, n, device)?)?,
    })
}

/// The loss of one batch of `(user, position)` examples.
fn train_step(
    params: &Params,
    sequences: &[Vec<u32>],
    batch: &[(u32, u32)],
    config: MeanPoolConfig,
    n: usize,
    device: &Device,
) -> Result<Tensor> {
    let (b, w, d) = (batch.len(), config.window, config.d_model);
    let mut context = vec![n as u32; b * w];
    let mut mask = vec![0f32; b * w];
    let mut counts = vec![0f32; b];
    let mut targets = Vec::with_capacity(b);
    for (row, &(u, t)) in batch.iter().enumerate() {
        let seq = &sequences[u as usize];
        let t = t as usize;
        let start = t.saturating_sub(w);
        for (slot, &item) in seq[start..t].iter().enumerate() {
            context[row * w + slot] = item;
            mask[row * w + slot] = 1.0;
        }
        counts[row] = (t - start) as f32;
        targets.push(seq[t]);
    }
    let context = Tensor::from_vec(context, b * w, device)?;
    let mask = Tensor::from_vec(mask, (b, w, 1), device)?;
    let counts = Tensor::from_vec(counts, (b, 1), device)?;
    let targets = Tensor::from_vec(targets, b, device)?;
    let embedded = params
        .item_in
        .as_tensor()
        .index_select(&context, 0)?
        .reshape((b, w, d))?;
    let user = embedded
        .broadcast_mul(&mask)?
        .sum(1)?
        .broadcast_div(&counts)?;
    let logits = user
        .matmul(&params.item_out.as_tensor().t()?)?
        .broadcast_add(params.bias.as_tensor())?;
    Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Split::*;
    use crate::model::score;
    use crate::model::{ModelArtifact, Scorer};
    use arrow::array::Int64Array;
    use std::sync::Arc;

    /// Users walk the items in a cycle 0 → 1 → 2 → ... → 0: the next item
    /// is fully determined by the last one.
    fn cyclic(n_users: usize, n_items: usize, len: usize) -> Dataset {
        let mut items = Vec::new();
        let mut splits = Vec::new();
        let mut offsets = vec![0];
        for u in 0..n_users {
            for t in 0..len {
                items.push(((u + t) % n_items) as u32);
                splits.push(if t + 1 == len {
                    Test
                } else if t + 2 == len {
                    Valid
                } else {
                    Train
                });
            }
            offsets.push(items.len());
        }
        let mut train_counts = vec![0u64; n_items];
        for (i, s) in items.iter().zip(&splits) {
            if *s == Train {
                train_counts[*i as usize] += 1;
            }
        }
        Dataset {
            user_ids: Arc::new(Int64Array::from((0..n_users as i64).collect::<Vec<_>>())),
            item_ids: Arc::new(Int64Array::from((0..n_items as i64).collect::<Vec<_>>())),
            offsets,
            items,
            splits,
            train_counts,
        }
    }

    /// Settings that learn [`cyclic`]'s walks: the last item is the whole
    /// context.
    fn learns_the_cycle() -> MeanPoolSpec {
        MeanPoolSpec {
            window: 1,
            d_model: 16,
            epochs: 40,
            patience: 40,
            lr: 0.02,
            ..MeanPoolSpec::default()
        }
    }

    #[test]
    fn learns_a_sequential_pattern_and_round_trips() {
        let data = cyclic(40, 30, 12);
        let spec = learns_the_cycle();
        let (model, log) = fit(&data, &spec, 7, 0, None).unwrap();
        assert!(
            log.last().unwrap().loss < log[0].loss,
            "loss must fall: {log:?}"
        );
        let test = data.targets(Test);
        let m = score::evaluate(&model, &data, &test, &[1], 64).unwrap();
        assert!(m.hr[0] > 0.9, "HR@1 {}", m.hr[0]);

        let artifact = model.to_artifact("meanpool").unwrap();
        let loaded = ModelArtifact::parse("mem", artifact.bytes.clone()).unwrap();
        let again = loaded.scorer(30).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let histories: Vec<&[u32]> = test.iter().map(|t| data.history(t)).collect();
        model.score(&histories, &mut a).unwrap();
        again.score(&histories, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn a_warm_start_keeps_what_was_learned_when_the_item_indices_move() {
        let yesterday = cyclic(40, 30, 12);
        let spec = learns_the_cycle();
        let (previous, _) = fit(&yesterday, &spec, 7, 0, None).unwrap();
        // Today the same walks, but item i of yesterday has index
        // (7 i + 3) mod 30: the maps differ, the items do not.
        let moved = |i: u32| (7 * i + 3) % 30;
        let mut today = yesterday.clone();
        today.items.iter_mut().for_each(|i| *i = moved(*i));
        let mut rows = vec![None; 30];
        for old in 0..30u32 {
            rows[moved(old) as usize] = Some(old as usize);
        }
        let one_epoch = MeanPoolSpec {
            epochs: 1,
            lr: 0.001,
            ..spec
        };
        let test = today.targets(Test);
        let hr1 = |warm: Option<WarmMeanPool>| {
            let (model, _) = fit(&today, &one_epoch, 7, 0, warm).unwrap();
            score::evaluate(&model, &today, &test, &[1], 64).unwrap().hr[0]
        };
        let (warm, cold) = (hr1(Some((&previous, &rows))), hr1(None));
        assert!(warm > 0.9, "warm-started HR@1 {warm}");
        assert!(cold < 0.5, "cold HR@1 after one epoch {cold}");
        // Rows matched by index instead of id lose it.
        let by_index: Vec<Option<usize>> = (0..30).map(Some).collect();
        let wrong = hr1(Some((&previous, &by_index)));
        assert!(wrong < 0.5, "rows carried by index: HR@1 {wrong}");
        // Another width cannot start from it.
        let wider = MeanPoolSpec {
            d_model: 32,
            ..spec
        };
        assert_eq!(warm_start_blocker(&previous, &wider), Some("d_model"));
        assert_eq!(warm_start_blocker(&previous, &spec), None);
    }

    #[test]
    fn same_seed_same_model() {
        let data = cyclic(10, 12, 8);
        let spec = MeanPoolSpec {
            d_model: 8,
            epochs: 2,
            ..MeanPoolSpec::default()
        };
        let (a, _) = fit(&data, &spec, 3, 0, None).unwrap();
        let (b, _) = fit(&data, &spec, 3, 0, None).unwrap();
        assert_eq!(
            a.to_artifact("m").unwrap().bytes,
            b.to_artifact("m").unwrap().bytes
        );
    }
}
