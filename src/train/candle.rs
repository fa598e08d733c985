//! Training steps by candle's autograd and AdamW on any candle device: how
//! the teacher and the distillation links train on GPUs (`--features
//! cuda`). The losses are the CPU trainer's: full or sampled softmax (the
//! same negatives drawn from the same step seed, the same log-Q
//! correction), hard labels alone or mixed with soft labels (CE, T²·KL, MSE,
//! ranking). On candle's CPU device the same code is tested against the CPU
//! trainer's losses and gradients.
//!
//! One difference stays: with a sampled softmax the CPU trainer's Adam
//! updates only the item rows a step touched (lazy Adam); candle's AdamW
//! updates every row, as it does for the full softmax.

use std::sync::Arc;

use candle_core::{D, Device, Tensor};
use candle_nn::optim::Optimizer;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::distillation::{Distillation, NO_LABEL, SoftRows};
use super::losses::{LossMix, SoftTarget, rank_weights};
use super::sampler::Sampler;
use super::steps::{SlotLabels, Steps, TrainSettings};
use crate::config::{SoftLoss, Softmax, device_ordinal};
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::model::sasrec::candle::CandleSasRec;
use crate::model::sasrec::{PAD, SasRec, Weights};

/// The logit of a class that takes no part in a row's softmax (the CPU
/// trainer's −∞): finite, so no gradient meets an infinity, and `exp` of it
/// is 0 in f32 all the same.
const MASKED: f32 = -1e30;

/// The candle device a job's `device` names ([`device_ordinal`]).
pub fn device(name: &str) -> Result<Device> {
    match device_ordinal(name)? {
        None => Ok(Device::Cpu),
        Some(ordinal) => Device::new_cuda(ordinal)
            .map_err(|e| Error::config(format!("cannot open device {name:?}: {e}"))),
    }
}

/// Training steps by candle's autograd and AdamW on any device: how models
/// train on GPUs.
pub struct CandleSteps {
    candle: CandleSasRec,
    optimizer: candle_nn::optim::AdamW,
    sampler: Option<Sampler>,
    in_batch: bool,
    distillation: Option<Arc<Distillation>>,
}

impl CandleSteps {
    /// Copies `model` to `device` and sets up AdamW with `settings`; with a
    /// sampled softmax, negatives are drawn from `dataset`'s catalogue.
    pub fn new(
        model: &SasRec,
        dataset: &Dataset,
        settings: &TrainSettings,
        device: &Device,
    ) -> Result<CandleSteps> {
        if !device.is_cpu() {
            // Dropout masks on the GPU come from its seeded generator.
            device.set_seed(settings.seed)?;
        }
        let candle = CandleSasRec::from_model(model, device)?;
        let optimizer = candle_nn::optim::AdamW::new(
            candle.vars.clone(),
            candle_nn::optim::ParamsAdamW {
                lr: settings.lr,
                beta1: settings.beta1,
                beta2: settings.beta2,
                eps: 1e-8,
                weight_decay: settings.weight_decay,
            },
        )?;
        let sampler = match settings.softmax {
            Softmax::Full => None,
            Softmax::Sampled => Some(Sampler::new(dataset, settings)?),
        };
        Ok(CandleSteps {
            candle,
            optimizer,
            sampler,
            in_batch: settings.in_batch,
            distillation: None,
        })
    }

    /// Steps whose loss mixes the hard labels with `distillation`'s soft
    /// labels, as [`super::cpu::Trainer::distilling`]'s does.
    pub fn distilling(
        model: &SasRec,
        dataset: &Dataset,
        settings: &TrainSettings,
        device: &Device,
        distillation: Arc<Distillation>,
    ) -> Result<CandleSteps> {
        let mut steps = CandleSteps::new(model, dataset, settings, device)?;
        steps.distillation = Some(distillation);
        Ok(steps)
    }

    /// The mean loss of one batch, as a scalar tensor on the device: the
    /// CPU trainer's loss for the same batch, soft labels and step seed
    /// (which draws the sampled softmax's negatives). Dropout when `train`.
    pub fn loss(
        &self,
        inputs: &[u32],
        targets: &[u32],
        soft: SlotLabels<'_>,
        batch: usize,
        step_seed: u64,
        train: bool,
    ) -> Result<Tensor> {
        if self.sampler.is_none() && self.distillation.is_none() {
            return self.candle.loss(inputs, targets, batch, train);
        }
        let d = self.candle.config.d_model;
        let dev = self.candle.device();
        let table = self.candle.item_table()?;
        let rows: Vec<u32> = (0..targets.len() as u32)
            .filter(|&i| targets[i as usize] != PAD)
            .collect();
        if rows.is_empty() {
            return Err(Error::internal("a training batch without targets"));
        }
        let nv = rows.len();
        let row_targets: Vec<u32> = rows.iter().map(|&r| targets[r as usize]).collect();
        let h = self
            .candle
            .hidden(&table, inputs, batch, train)?
            .reshape((targets.len(), d))?
            .index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
        let no_labels = SoftRows::new(0);
        let (labels, slots) = soft.unwrap_or((&no_labels, &[]));
        let row_labels: Vec<Option<SoftTarget<'_>>> = rows
            .iter()
            .map(|&r| {
                slots
                    .get(r as usize)
                    .copied()
                    .filter(|&l| l != NO_LABEL && self.distillation.is_some())
                    .map(|l| labels.target(l as usize))
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(step_seed ^ 0x5eed);
        match (&self.sampler, &self.distillation) {
            (None, None) => self.candle.loss(inputs, targets, batch, train),
            (None, Some(distill)) => {
                let logits = h.matmul(&table.t()?)?;
                let top = |label: &SoftTarget<'_>| label.items.to_vec();
                mix_loss(&distill.mix, &logits, None, &row_targets, &row_labels, top)
            }
            (Some(sampler), Some(distill)) => {
                // Each row scores, in its own columns, the K items of its soft
                // label and its target, then the step's shared negatives (a
                // negative that is one of the row's own items masked).
                let (negatives, column, negative_offsets) = sampler.candidates(&[], &mut rng);
                let kk = labels.k;
                let own = kk + 1;
                let width = own + negatives.len();
                let mut own_items = vec![PAD; nv * own];
                let mut hard = vec![kk as u32; nv];
                let mut mask = vec![0f32; nv * width];
                for (r, &t) in row_targets.iter().enumerate() {
                    let items = &mut own_items[r * own..(r + 1) * own];
                    if let Some(label) = &row_labels[r] {
                        items[..kk].copy_from_slice(label.items);
                    }
                    match items[..kk].iter().position(|&i| i == t) {
                        Some(j) => hard[r] = j as u32,
                        None => items[kk] = t,
                    }
                    for (j, &i) in items.iter().enumerate() {
                        if i == PAD {
                            mask[r * width + j] = MASKED;
                        } else if let Some(&c) = column.get(&i) {
                            mask[r * width + own + c as usize] = MASKED;
                        }
                    }
                }
                let gathered: Vec<u32> = own_items
                    .iter()
                    .map(|&i| if i == PAD { 0 } else { i })
                    .collect();
                let own_logits = table
                    .index_select(&Tensor::from_vec(gathered, nv * own, dev)?, 0)?
                    .reshape((nv, own, d))?
                    .matmul(&h.unsqueeze(2)?)?
                    .squeeze(2)?;
                let negative_logits = self.shared_logits(&h, &table, &negatives)?;
                let logits = (Tensor::cat(&[own_logits, negative_logits], 1)?
                    + Tensor::from_vec(mask, (nv, width), dev)?)?;
                let mut offsets = vec![0f32; own];
                offsets.extend_from_slice(&negative_offsets);
                let offsets = Tensor::from_vec(offsets, (1, width), dev)?;
                let local: Vec<u32> = (0..kk as u32).collect();
                let top = |_: &SoftTarget<'_>| local.clone();
                mix_loss(
                    &distill.mix,
                    &logits,
                    Some(&offsets),
                    &hard,
                    &row_labels,
                    top,
                )
            }
            (Some(sampler), None) if self.in_batch => {
                // The batch's distinct targets and the negatives, one softmax.
                let (items, column, offsets) = sampler.candidates(&row_targets, &mut rng);
                let k = items.len();
                let logits = self
                    .shared_logits(&h, &table, &items)?
                    .broadcast_add(&Tensor::from_vec(offsets, (1, k), dev)?)?;
                let columns: Vec<u32> = row_targets.iter().map(|t| column[t]).collect();
                let columns = Tensor::from_vec(columns, nv, dev)?;
                Ok(candle_nn::loss::cross_entropy(&logits, &columns)?)
            }
            (Some(sampler), None) => {
                // Column 0: each row's own target (its correction added);
                // then the shared negatives, one equal to the target masked.
                let (negatives, column, negative_offsets) = sampler.candidates(&[], &mut rng);
                let m = negatives.len();
                let target_vectors =
                    table.index_select(&Tensor::new(row_targets.as_slice(), dev)?, 0)?;
                let target_offsets: Vec<f32> =
                    row_targets.iter().map(|&t| sampler.offset(t)).collect();
                let target_logits = (&h * target_vectors)?
                    .sum_keepdim(1)?
                    .add(&Tensor::from_vec(target_offsets, (nv, 1), dev)?)?;
                let mut mask = vec![0f32; nv * m];
                for (r, t) in row_targets.iter().enumerate() {
                    if let Some(&c) = column.get(t) {
                        mask[r * m + c as usize] = MASKED;
                    }
                }
                let negative_logits = self
                    .shared_logits(&h, &table, &negatives)?
                    .broadcast_add(&Tensor::from_vec(negative_offsets, (1, m), dev)?)?
                    .add(&Tensor::from_vec(mask, (nv, m), dev)?)?;
                let logits = Tensor::cat(&[target_logits, negative_logits], 1)?;
                let columns = Tensor::zeros(nv, candle_core::DType::U32, dev)?;
                Ok(candle_nn::loss::cross_entropy(&logits, &columns)?)
            }
        }
    }

    /// Logits of hidden states `h` (`rows × d`) against `items`' rows of
    /// `table`: one matrix product.
    fn shared_logits(&self, h: &Tensor, table: &Tensor, items: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(items, self.candle.device())?;
        Ok(h.matmul(&table.index_select(&ids, 0)?.t()?)?)
    }

    /// The loss of one batch without dropout and its gradients, in the
    /// shape of [`Weights`]: what the CPU trainer's
    /// [`super::cpu::Trainer::backprop`] computes.
    pub fn gradients(
        &self,
        inputs: &[u32],
        targets: &[u32],
        soft: SlotLabels<'_>,
        batch: usize,
        step_seed: u64,
    ) -> Result<(f64, Weights)> {
        let loss = self.loss(inputs, targets, soft, batch, step_seed, false)?;
        let grads = self.candle.gradients_of(&loss)?;
        Ok((f64::from(loss.to_scalar::<f32>()?), grads))
    }
}

/// The distillation loss of rows of logits (`rows × classes`), as the CPU
/// trainer's [`LossMix::row_loss`] computes it row by row, averaged over
/// the rows: `α · CE + (1 − α) · Σ soft losses` for a row with a soft label,
/// CE alone for a row without. `offsets` (`1 × classes`) are the sampled
/// softmax's log-Q corrections, scaled by each softmax's temperature; `hard`
/// is each row's target column; `top` maps a row's soft label to the
/// columns of its K items.
fn mix_loss<F>(
    mix: &LossMix,
    logits: &Tensor,
    offsets: Option<&Tensor>,
    hard: &[u32],
    labels: &[Option<SoftTarget<'_>>],
    top: F,
) -> Result<Tensor>
where
    F: Fn(&SoftTarget<'_>) -> Vec<u32>,
{
    let dev = logits.device();
    let rows = hard.len();
    let shifted = match offsets {
        Some(o) => logits.broadcast_add(o)?,
        None => logits.clone(),
    };
    let log_probs = candle_nn::ops::log_softmax(&shifted, D::Minus1)?;
    let hard_t = Tensor::from_vec(hard.to_vec(), (rows, 1), dev)?;
    let ce = log_probs.gather(&hard_t, 1)?.squeeze(1)?.neg()?;
    let ce_weights: Vec<f32> = labels
        .iter()
        .map(|l| if l.is_some() { mix.alpha } else { 1.0 })
        .collect();
    let mut total = (ce * Tensor::from_vec(ce_weights, rows, dev)?)?.sum_all()?;
    let labeled: Vec<u32> = (0..rows as u32)
        .filter(|&r| labels[r as usize].is_some())
        .collect();
    let soft_weight = 1.0 - f64::from(mix.alpha);
    if !labeled.is_empty() && soft_weight > 0.0 {
        let n = labeled.len();
        let of_labeled: Vec<&SoftTarget<'_>> = labeled
            .iter()
            .filter_map(|&r| labels[r as usize].as_ref())
            .collect();
        let k = of_labeled[0].items.len();
        let columns: Vec<u32> = of_labeled.iter().flat_map(|l| top(l)).collect();
        let columns = Tensor::from_vec(columns, (n, k), dev)?;
        let labeled = Tensor::from_vec(labeled, n, dev)?;
        let t = mix.temperature;
        let tt = f64::from(t * t);
        // The teacher's probabilities at T: the K items, then the rest bucket.
        let p: Vec<Vec<f64>> = of_labeled.iter().map(|l| l.probabilities(t)).collect();
        let p_top: Vec<f32> = p
            .iter()
            .flat_map(|p| p[..k].iter().map(|&v| v as f32))
            .collect();
        let p_top = Tensor::from_vec(p_top, (n, k), dev)?;
        // log q at temperature T at the K items of each labeled row: made
        // by the first of KL and MSE that asks, shared with the other.
        let mut log_q_top: Option<Tensor> = None;
        let mut at_t = || -> Result<Tensor> {
            if let Some(done) = &log_q_top {
                return Ok(done.clone());
            }
            let mut z = (logits.index_select(&labeled, 0)? / f64::from(t))?;
            if let Some(o) = offsets {
                z = z.broadcast_add(o)?;
            }
            let top = candle_nn::ops::log_softmax(&z, D::Minus1)?.gather(&columns, 1)?;
            Ok(log_q_top.insert(top).clone())
        };
        for &part in &mix.family.0 {
            let loss = match part {
                SoftLoss::Kl => {
                    let log_q_top = at_t()?;
                    let q_rest = log_q_top
                        .exp()?
                        .sum(1)?
                        .neg()?
                        .affine(1.0, 1.0)?
                        .maximum(1e-30)?;
                    let p_rest: Vec<f32> = p.iter().map(|p| p[k] as f32).collect();
                    let p_rest = Tensor::from_vec(p_rest, n, dev)?;
                    let cross = ((&p_top * &log_q_top)?.sum_all()?
                        + (p_rest * q_rest.log()?)?.sum_all()?)?;
                    let entropy: f64 = p
                        .iter()
                        .flatten()
                        .filter(|&&v| v > 0.0)
                        .map(|&v| v * v.ln())
                        .sum();
                    ((cross.neg()? + entropy)? * tt)?
                }
                SoftLoss::Mse => {
                    let log_q_top = at_t()?;
                    let diff = (log_q_top.exp()? - &p_top)?;
                    (diff.sqr()?.sum_all()? * (tt * k as f64))?
                }
                SoftLoss::Rank => {
                    let weights: Vec<f32> = rank_weights(k, mix.rank_decay)
                        .into_iter()
                        .map(|w| w as f32)
                        .collect();
                    let weights = Tensor::from_vec(weights, (1, k), dev)?;
                    let picked = log_probs.index_select(&labeled, 0)?.gather(&columns, 1)?;
                    picked.broadcast_mul(&weights)?.sum_all()?.neg()?
                }
            };
            total = (total + (loss * soft_weight)?)?;
        }
    }
    Ok((total / rows as f64)?)
}

impl Steps for CandleSteps {
    fn step(
        &mut self,
        _model: &mut SasRec,
        inputs: &[u32],
        targets: &[u32],
        soft: SlotLabels<'_>,
        batch: usize,
        step_seed: u64,
    ) -> Result<f64> {
        let loss = self.loss(inputs, targets, soft, batch, step_seed, true)?;
        self.optimizer.backward_step(&loss)?;
        Ok(f64::from(loss.to_scalar::<f32>()?))
    }

    fn sync(&mut self, model: &mut SasRec) -> Result<()> {
        self.candle.store_into(model)
    }
}
