//! Training of sequence models: batches of users' train sequences,
//! full or sampled softmax, Adam(W) with row-sparse updates of the item
//! table, early stopping on validation NDCG@10 with the best epoch restored,
//! and the per-epoch history written as `training/<model>.parquet`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, Float64Array, Int32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;
use rand_distr::weighted::WeightedAliasIndex;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Split, Target};
use crate::error::{Error, Result};
use crate::loss::LossMix;
use crate::model::Scorer;
use crate::model::sasrec::cpu::{self, Workspace};
use crate::model::sasrec::kernels::{logit_loss, softmax_cross_entropy};
use crate::model::sasrec::{PAD, SasRec, Weights};
use crate::score;
use crate::soft_labels::SoftLabels;

/// One epoch of training, for the training history.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochLog {
    /// 1-based epoch.
    pub epoch: usize,
    /// Wall time of the epoch's training steps.
    pub seconds: f64,
    /// Mean training loss.
    pub loss: f64,
    /// Validation NDCG@10.
    pub valid_ndcg_10: f64,
    /// Validation HR@10.
    pub valid_hr_10: f64,
}

/// The epoch with the best validation NDCG@10 (the one early stopping keeps).
pub fn best_epoch(log: &[EpochLog]) -> Option<&EpochLog> {
    log.iter()
        .max_by(|a, b| a.valid_ndcg_10.total_cmp(&b.valid_ndcg_10))
}

/// Schema of `training/<model>.parquet`.
pub fn training_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("model", DataType::Utf8, false),
        Field::new("epoch", DataType::Int32, false),
        Field::new("seconds", DataType::Float64, false),
        Field::new("loss", DataType::Float64, false),
        Field::new("valid_ndcg_10", DataType::Float64, false),
        Field::new("valid_hr_10", DataType::Float64, false),
    ]))
}

/// The history of one model as a batch of [`training_schema`].
pub fn training_batch(model: &str, log: &[EpochLog]) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![model; log.len()])),
        Arc::new(Int32Array::from_iter_values(
            log.iter().map(|e| e.epoch as i32),
        )),
        Arc::new(Float64Array::from_iter_values(
            log.iter().map(|e| e.seconds),
        )),
        Arc::new(Float64Array::from_iter_values(log.iter().map(|e| e.loss))),
        Arc::new(Float64Array::from_iter_values(
            log.iter().map(|e| e.valid_ndcg_10),
        )),
        Arc::new(Float64Array::from_iter_values(
            log.iter().map(|e| e.valid_hr_10),
        )),
    ];
    RecordBatch::try_new(training_schema(), columns).map_err(|e| Error::internal(e.to_string()))
}

/// The end of every epoch: validation NDCG@10/HR@10, the log line and
/// history row, and early stopping that keeps the best epoch's state.
pub struct EarlyStopping<T> {
    label: String,
    patience: usize,
    valid: Vec<Target>,
    best: Option<(f64, T)>,
    since_best: usize,
    log: Vec<EpochLog>,
}

impl<T> EarlyStopping<T> {
    /// Validates on `dataset`'s valid split; stops after `patience` epochs
    /// without a better NDCG@10.
    pub fn new(label: &str, patience: usize, dataset: &Dataset) -> EarlyStopping<T> {
        EarlyStopping {
            label: label.to_string(),
            patience,
            valid: dataset.targets(Split::Valid),
            best: None,
            since_best: 0,
            log: Vec::new(),
        }
    }

    /// The last epoch's loss and validation NDCG@10, for progress bars.
    pub fn last_summary(&self) -> String {
        self.log
            .last()
            .map(|e| {
                format!(
                    " (loss {:.3}, valid ndcg@10 {:.4})",
                    e.loss, e.valid_ndcg_10
                )
            })
            .unwrap_or_default()
    }

    /// Records epoch `epoch` (its training `seconds` and mean `loss`) with
    /// `scorer`'s validation metrics; keeps `snapshot()` if it is the best so
    /// far (always, without valid targets). Returns whether to stop.
    pub fn end_epoch(
        &mut self,
        epoch: usize,
        seconds: f64,
        loss: f64,
        scorer: &dyn Scorer,
        dataset: &Dataset,
        snapshot: impl FnOnce() -> T,
    ) -> Result<bool> {
        if !loss.is_finite() {
            return Err(Error::internal(format!(
                "{}: training diverged (loss {loss}) at epoch {epoch}; lower the learning rate",
                self.label
            )));
        }
        let metrics = if self.valid.is_empty() {
            None
        } else {
            Some(score::evaluate(scorer, dataset, &self.valid, &[10], 512)?)
        };
        let valid_ndcg = metrics.as_ref().and_then(|m| m.ndcg_at(10)).unwrap_or(0.0);
        let entry = EpochLog {
            epoch,
            seconds,
            loss,
            valid_ndcg_10: valid_ndcg,
            valid_hr_10: metrics.as_ref().and_then(|m| m.hr_at(10)).unwrap_or(0.0),
        };
        tracing::info!(
            model = %self.label,
            epoch,
            loss = entry.loss,
            valid_ndcg_10 = entry.valid_ndcg_10,
            seconds = entry.seconds,
            "epoch done"
        );
        self.log.push(entry);
        if metrics.is_none() || self.best.as_ref().is_none_or(|(v, _)| valid_ndcg > *v) {
            self.best = Some((valid_ndcg, snapshot()));
            self.since_best = 0;
            Ok(false)
        } else {
            self.since_best += 1;
            Ok(self.since_best >= self.patience)
        }
    }

    /// The best epoch's state (`None` if no epoch ended) and the history.
    pub fn finish(self) -> (Option<T>, Vec<EpochLog>) {
        (self.best.map(|(_, state)| state), self.log)
    }
}

/// Which softmax the loss uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Softmax {
    /// Over the whole catalogue.
    Full,
    /// Over the batch's targets and sampled negatives, with log-Q correction.
    Sampled,
}

/// How negatives are drawn for sampled softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// In proportion to train-split popularity (plus one).
    Popularity,
    /// Uniformly.
    Uniform,
}

/// Optimization settings of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSettings {
    /// Sequences per step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Decoupled weight decay (AdamW); 0 is plain Adam.
    pub weight_decay: f64,
    /// Most epochs.
    pub epochs: usize,
    /// Epochs without a better validation NDCG@10 before stopping.
    pub patience: usize,
    /// Full or sampled softmax.
    pub softmax: Softmax,
    /// Negatives per step with sampled softmax.
    pub negatives: usize,
    /// How negatives are drawn.
    pub sampling: Sampling,
    /// Seed of shuffling, dropout and sampling.
    pub seed: u64,
    /// Progress bar label (the model name).
    pub label: String,
}

/// Adam(W) with one moment pair per weight; the item table can be updated
/// row-sparsely (only the rows a step touched, as lazy Adam does).
pub struct Adam {
    settings: TrainSettings,
    step: i32,
    m: Weights,
    v: Weights,
}

impl Adam {
    /// Zero moments for weights shaped like `like`.
    pub fn new(settings: &TrainSettings, like: &Weights) -> Adam {
        let mut m = like.clone();
        m.zero();
        Adam {
            settings: settings.clone(),
            step: 0,
            v: m.clone(),
            m,
        }
    }

    /// One update of `params` by `grads`. With `item_rows`, only those rows
    /// of the item table (tensor 0) are updated.
    pub fn update(&mut self, params: &mut Weights, grads: &mut Weights, item_rows: Option<&[u32]>) {
        self.step += 1;
        let s = &self.settings;
        let (b1, b2) = (s.beta1 as f32, s.beta2 as f32);
        let lr = s.lr as f32;
        let c1 = 1.0 - b1.powi(self.step);
        let c2 = 1.0 - b2.powi(self.step);
        let decay = (s.lr * s.weight_decay) as f32;
        let update = move |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
            for i in 0..p.len() {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let mh = m[i] / c1;
                let vh = v[i] / c2;
                p[i] -= lr * mh / (vh.sqrt() + 1e-8) + decay * p[i];
            }
        };
        let d = params.lnf_g.len();
        let tensors = params
            .tensors_mut()
            .into_iter()
            .zip(grads.tensors_mut())
            .zip(self.m.tensors_mut())
            .zip(self.v.tensors_mut());
        for (i, (((p, g), m), v)) in tensors.enumerate() {
            match (i, item_rows) {
                (0, Some(rows)) => {
                    for &r in rows {
                        let span = r as usize * d..(r as usize + 1) * d;
                        update(
                            &mut p[span.clone()],
                            &g[span.clone()],
                            &mut m[span.clone()],
                            &mut v[span.clone()],
                        );
                        g[span].fill(0.0);
                    }
                }
                _ => {
                    p.par_chunks_mut(4096)
                        .zip(g.par_chunks(4096))
                        .zip(m.par_chunks_mut(4096))
                        .zip(v.par_chunks_mut(4096))
                        .for_each(|(((p, g), m), v)| update(p, g, m, v));
                    g.fill(0.0);
                }
            }
        }
    }
}

/// A user's train sequence, as the inputs and next-item targets of one
/// window of `len` positions, right-aligned (the most recent last).
pub fn fill_window(sequence: &[u32], inputs: &mut [u32], targets: &mut [u32]) {
    if sequence.is_empty() {
        inputs.fill(PAD);
        targets.fill(PAD);
        return;
    }
    let len = inputs.len();
    let usable = sequence.len().saturating_sub(1).min(len);
    let pad = len - usable;
    inputs[..pad].fill(PAD);
    targets[..pad].fill(PAD);
    let start = sequence.len() - usable - 1;
    inputs[pad..].copy_from_slice(&sequence[start..start + usable]);
    targets[pad..].copy_from_slice(&sequence[start + 1..start + 1 + usable]);
}

/// The position (index in the train sequence) of the target in slot `slot`
/// of [`fill_window`]'s window over a sequence of `len` items: train item
/// `len − max_len + slot`, when the slot holds one.
pub fn target_position(len: usize, max_len: usize, slot: usize) -> Option<usize> {
    let position = (len + slot).checked_sub(max_len)?;
    (position >= 1 && position < len).then_some(position)
}

/// Draws negatives for sampled softmax and corrects for how they were drawn.
struct Sampler {
    alias: WeightedAliasIndex<f64>,
    probability: Vec<f64>,
    negatives: usize,
}

impl Sampler {
    fn new(dataset: &Dataset, settings: &TrainSettings) -> Result<Sampler> {
        let weights: Vec<f64> = match settings.sampling {
            Sampling::Popularity => dataset
                .train_counts
                .iter()
                .map(|&c| c as f64 + 1.0)
                .collect(),
            Sampling::Uniform => vec![1.0; dataset.n_items()],
        };
        let total: f64 = weights.iter().sum();
        let probability = weights.iter().map(|w| w / total).collect();
        let alias = WeightedAliasIndex::new(weights)
            .map_err(|e| Error::internal(format!("sampler: {e}")))?;
        Ok(Sampler {
            alias,
            probability,
            negatives: settings.negatives,
        })
    }

    /// The step's candidate items (the targets first, then new negatives)
    /// and each candidate's logit correction `-ln P(candidate drawn)`.
    fn candidates(
        &self,
        targets: &[u32],
        rng: &mut StdRng,
    ) -> (Vec<u32>, HashMap<u32, u32>, Vec<f32>) {
        let mut items = Vec::new();
        let mut column = HashMap::new();
        for &t in targets.iter().filter(|&&t| t != PAD) {
            column.entry(t).or_insert_with(|| {
                items.push(t);
                (items.len() - 1) as u32
            });
        }
        for _ in 0..self.negatives {
            let item = self.alias.sample(rng) as u32;
            column.entry(item).or_insert_with(|| {
                items.push(item);
                (items.len() - 1) as u32
            });
        }
        let m = self.negatives as f64;
        let offsets = items
            .iter()
            .map(|&i| {
                let q = self.probability[i as usize];
                // Probability that M draws with replacement include the item.
                let drawn = -((m * (-q).ln_1p()).exp_m1());
                -(drawn.max(1e-30).ln()) as f32
            })
            .collect();
        (items, column, offsets)
    }
}

/// Reusable state of the training steps.
pub struct Trainer {
    ws: Workspace,
    grads: Weights,
    d_table: Vec<f32>,
    adam: Adam,
    sampler: Option<Sampler>,
    scratch: Vec<f32>,
    hv: Vec<f32>,
    dhv: Vec<f32>,
    touched: Vec<u32>,
    touched_flag: Vec<bool>,
    classes: usize,
    /// Sampled softmax: the step's candidate vectors and their gradients.
    cand: Vec<f32>,
    d_cand: Vec<f32>,
    distillation: Option<Arc<Distillation>>,
}

/// What a distilled model learns from besides the hard labels: its source's
/// soft labels and how the losses mix.
#[derive(Debug, Clone)]
pub struct Distillation {
    /// The source's soft labels, read back from the lake.
    pub labels: Arc<SoftLabels>,
    /// α, T and the soft-loss family.
    pub mix: LossMix,
}

/// A window slot without a soft label.
pub const NO_LABEL: u32 = u32::MAX;

/// Rows of the output softmax computed at once.
const CE_BLOCK: usize = 512;

impl Trainer {
    /// A trainer for `model` on `dataset`'s catalogue.
    pub fn new(model: &SasRec, dataset: &Dataset, settings: &TrainSettings) -> Result<Trainer> {
        let c = &model.config;
        let sampler = match settings.softmax {
            Softmax::Full => None,
            Softmax::Sampled => Some(Sampler::new(dataset, settings)?),
        };
        let classes = match settings.softmax {
            Softmax::Full => c.n_items,
            Softmax::Sampled => settings.negatives + settings.batch_size * c.max_len,
        };
        let mut grads = model.weights.clone();
        grads.zero();
        Ok(Trainer {
            ws: Workspace::new(c, settings.batch_size),
            adam: Adam::new(settings, &grads),
            d_table: vec![0.0; c.n_items * c.d_model],
            grads,
            sampler,
            scratch: vec![0.0; CE_BLOCK.min(settings.batch_size * c.max_len) * classes],
            hv: Vec::new(),
            dhv: Vec::new(),
            touched: Vec::new(),
            touched_flag: vec![false; c.n_items],
            classes: 0,
            cand: Vec::new(),
            d_cand: Vec::new(),
            distillation: None,
        })
    }

    /// A trainer whose loss mixes the hard labels with `distillation`'s soft
    /// labels (full softmax only: the soft losses need every logit).
    pub fn distilling(
        model: &SasRec,
        dataset: &Dataset,
        settings: &TrainSettings,
        distillation: Arc<Distillation>,
    ) -> Result<Trainer> {
        if settings.softmax != Softmax::Full {
            return Err(Error::config(format!(
                "{}: distillation needs the full softmax (its soft losses cover the whole catalogue)",
                settings.label
            )));
        }
        let mut trainer = Trainer::new(model, dataset, settings)?;
        trainer.distillation = Some(distillation);
        Ok(trainer)
    }

    /// One optimization step on a batch of windows; returns the mean loss.
    /// `soft` gives each slot's soft-label row ([`NO_LABEL`] for none;
    /// empty without distillation).
    pub fn step(
        &mut self,
        model: &mut SasRec,
        inputs: &[u32],
        targets: &[u32],
        soft: &[u32],
        batch: usize,
        step_seed: u64,
    ) -> Result<f64> {
        let loss = self.backprop(model, inputs, targets, soft, batch, Some(step_seed))?;
        if self.sampler.is_some() {
            self.adam
                .update(&mut model.weights, &mut self.grads, Some(&self.touched));
            for &r in &self.touched {
                self.touched_flag[r as usize] = false;
            }
        } else {
            self.adam.update(&mut model.weights, &mut self.grads, None);
        }
        Ok(loss)
    }

    /// Classes the last step's softmax ran over: the catalogue, or the
    /// batch's distinct targets plus the sampled negatives.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The gradients the last [`Trainer::backprop`] accumulated.
    pub fn gradients(&self) -> &Weights {
        &self.grads
    }

    /// Forward and backward passes over a batch: adds the gradients of the
    /// mean loss to [`Trainer::gradients`] and returns the loss. With
    /// `dropout_seed`, dropout is on; `step_seed` also seeds sampling.
    /// `soft` as in [`Trainer::step`].
    pub fn backprop(
        &mut self,
        model: &SasRec,
        inputs: &[u32],
        targets: &[u32],
        soft: &[u32],
        batch: usize,
        dropout_seed: Option<u64>,
    ) -> Result<f64> {
        let step_seed = dropout_seed.unwrap_or(0);
        let c = model.config;
        let d = c.d_model;
        let n = batch * c.max_len;
        let owned_table;
        let table: &[f32] = if c.content_dim > 0 {
            owned_table = model.item_table();
            &owned_table
        } else {
            &model.weights.item
        };
        cpu::forward(model, table, &mut self.ws, inputs, batch, dropout_seed);

        // Gather the positions with a target.
        let rows: Vec<usize> = (0..n).filter(|&i| targets[i] != PAD).collect();
        if rows.is_empty() {
            return Err(Error::internal("a training batch without targets"));
        }
        let nv = rows.len();
        self.hv.resize(nv * d, 0.0);
        self.dhv.clear();
        self.dhv.resize(nv * d, 0.0);
        for (k, &r) in rows.iter().enumerate() {
            self.hv[k * d..(k + 1) * d].copy_from_slice(&self.ws.hf[r * d..(r + 1) * d]);
        }
        let weight = 1.0 / nv as f32;
        let row_targets: Vec<u32> = rows.iter().map(|&r| targets[r]).collect();
        self.touched.clear();
        let loss = match (&self.sampler, &self.distillation) {
            (None, Some(distill)) => {
                self.classes = c.n_items;
                let row_soft: Vec<u32> = rows
                    .iter()
                    .map(|&r| soft.get(r).copied().unwrap_or(NO_LABEL))
                    .collect();
                let (labels, mix) = (&distill.labels, &distill.mix);
                let loss = logit_loss(
                    &self.hv,
                    d,
                    table,
                    nv,
                    CE_BLOCK,
                    &mut self.scratch,
                    &mut self.dhv,
                    &mut self.d_table,
                    |r, row| {
                        let label =
                            (row_soft[r] != NO_LABEL).then(|| labels.target(row_soft[r] as usize));
                        mix.row_loss(row, row_targets[r] as usize, label, weight)
                    },
                );
                loss / nv as f64
            }
            (None, None) => {
                self.classes = c.n_items;
                let loss = softmax_cross_entropy(
                    &self.hv,
                    d,
                    table,
                    &row_targets,
                    None,
                    weight,
                    CE_BLOCK,
                    &mut self.scratch,
                    &mut self.dhv,
                    &mut self.d_table,
                );
                loss / nv as f64
            }
            (Some(sampler), _) => {
                let mut rng = StdRng::seed_from_u64(step_seed ^ 0x5eed);
                let (items, column, offsets) = sampler.candidates(&row_targets, &mut rng);
                let k = items.len();
                self.classes = k;
                let cand = &mut self.cand;
                cand.clear();
                for &i in &items {
                    cand.extend_from_slice(&table[i as usize * d..(i as usize + 1) * d]);
                }
                let d_cand = &mut self.d_cand;
                d_cand.clear();
                d_cand.resize(k * d, 0.0);
                let columns: Vec<u32> = row_targets.iter().map(|t| column[t]).collect();
                if self.scratch.len() < CE_BLOCK * k {
                    self.scratch.resize(CE_BLOCK * k, 0.0);
                }
                let loss = softmax_cross_entropy(
                    &self.hv,
                    d,
                    cand,
                    &columns,
                    Some(&offsets),
                    weight,
                    CE_BLOCK,
                    &mut self.scratch,
                    &mut self.dhv,
                    d_cand,
                );
                for (j, &i) in items.iter().enumerate() {
                    let row = &mut self.d_table[i as usize * d..(i as usize + 1) * d];
                    for (a, g) in row.iter_mut().zip(&d_cand[j * d..(j + 1) * d]) {
                        *a += g;
                    }
                    mark(&mut self.touched, &mut self.touched_flag, i);
                }
                loss / nv as f64
            }
        };

        self.ws.dhf[..n * d].fill(0.0);
        for (k, &r) in rows.iter().enumerate() {
            self.ws.dhf[r * d..(r + 1) * d].copy_from_slice(&self.dhv[k * d..(k + 1) * d]);
        }
        cpu::backward(
            model,
            &mut self.ws,
            inputs,
            batch,
            &mut self.grads,
            &mut self.d_table,
        );

        let sparse = self.sampler.is_some();
        if sparse {
            for &x in inputs.iter().filter(|&&x| x != PAD) {
                mark(&mut self.touched, &mut self.touched_flag, x);
            }
            self.touched.sort_unstable();
            cpu::table_backward(
                &c,
                &model.content,
                &self.d_table,
                Some(&self.touched),
                &mut self.grads,
            );
            for &r in &self.touched {
                self.d_table[r as usize * d..(r as usize + 1) * d].fill(0.0);
            }
        } else {
            cpu::table_backward(&c, &model.content, &self.d_table, None, &mut self.grads);
            self.d_table.fill(0.0);
        }
        Ok(loss)
    }
}

fn mark(touched: &mut Vec<u32>, flags: &mut [bool], item: u32) {
    if !flags[item as usize] {
        flags[item as usize] = true;
        touched.push(item);
    }
}

/// One way of taking optimization steps: the CPU [`Trainer`], or candle's
/// autograd on a device.
pub trait Steps {
    /// One step on `batch` windows; returns the mean loss. `soft` gives
    /// each slot's soft-label row (empty without distillation).
    fn step(
        &mut self,
        model: &mut SasRec,
        inputs: &[u32],
        targets: &[u32],
        soft: &[u32],
        batch: usize,
        step_seed: u64,
    ) -> Result<f64>;

    /// Brings `model.weights` up to date before it is validated.
    fn sync(&mut self, _model: &mut SasRec) -> Result<()> {
        Ok(())
    }
}

impl Steps for Trainer {
    fn step(
        &mut self,
        model: &mut SasRec,
        inputs: &[u32],
        targets: &[u32],
        soft: &[u32],
        batch: usize,
        step_seed: u64,
    ) -> Result<f64> {
        Trainer::step(self, model, inputs, targets, soft, batch, step_seed)
    }
}

/// Trains `model` on `dataset`'s train split on the CPU, early-stopping on
/// its valid split; returns the best epoch's model and the per-epoch log.
pub fn fit(
    model: SasRec,
    dataset: &Dataset,
    settings: &TrainSettings,
) -> Result<(SasRec, Vec<EpochLog>)> {
    let mut trainer = Trainer::new(&model, dataset, settings)?;
    fit_with(model, dataset, settings, &mut trainer, None)
}

/// Trains `model` like [`fit`], its loss mixing the hard labels with
/// `distillation`'s soft labels.
pub fn fit_distilled(
    model: SasRec,
    dataset: &Dataset,
    settings: &TrainSettings,
    distillation: Arc<Distillation>,
) -> Result<(SasRec, Vec<EpochLog>)> {
    let mut trainer = Trainer::distilling(&model, dataset, settings, Arc::clone(&distillation))?;
    fit_with(
        model,
        dataset,
        settings,
        &mut trainer,
        Some(&distillation.labels),
    )
}

/// Users' train sequences with at least one next item to learn, with
/// their user index.
pub fn train_sequences(dataset: &Dataset) -> Result<Vec<(usize, Vec<u32>)>> {
    let sequences: Vec<(usize, Vec<u32>)> = (0..dataset.n_users())
        .map(|u| (u, dataset.train_items(u)))
        .filter(|(_, s)| s.len() >= 2)
        .collect();
    if sequences.is_empty() {
        return Err(Error::data(
            "split table",
            "no user has two train events: nothing to learn a next item from",
        ));
    }
    Ok(sequences)
}

/// The epoch loop: shuffled batches of one window per user (their most
/// recent `max_len` train items), validation NDCG@10 after every epoch,
/// early stopping with patience and the best epoch's weights restored.
/// With `labels`, each target slot gets its soft-label row.
pub fn fit_with(
    mut model: SasRec,
    dataset: &Dataset,
    settings: &TrainSettings,
    steps_by: &mut dyn Steps,
    labels: Option<&SoftLabels>,
) -> Result<(SasRec, Vec<EpochLog>)> {
    let c = model.config;
    let sequences = train_sequences(dataset)?;
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    let b = settings.batch_size;
    let mut inputs = vec![PAD; b * c.max_len];
    let mut targets = vec![PAD; b * c.max_len];
    let mut soft = vec![NO_LABEL; if labels.is_some() { b * c.max_len } else { 0 }];
    let mut stopping = EarlyStopping::new(&settings.label, settings.patience, dataset);
    let steps = sequences.len().div_ceil(b);
    let mut step_count = 0u64;
    for epoch in 1..=settings.epochs {
        order.shuffle(&mut rng);
        let progress = crate::progress::bar(
            steps as u64,
            &format!(
                "{} epoch {epoch}{}",
                settings.label,
                stopping.last_summary()
            ),
        );
        let started = Instant::now();
        let mut loss_sum = 0.0;
        for chunk in order.chunks(b) {
            let n = chunk.len() * c.max_len;
            for (slot, &s) in chunk.iter().enumerate() {
                let (user, sequence) = &sequences[s];
                let span = slot * c.max_len..(slot + 1) * c.max_len;
                fill_window(
                    sequence,
                    &mut inputs[span.clone()],
                    &mut targets[span.clone()],
                );
                if let Some(labels) = labels {
                    for i in 0..c.max_len {
                        let at = slot * c.max_len + i;
                        soft[at] = if targets[at] == PAD {
                            NO_LABEL
                        } else {
                            target_position(sequence.len(), c.max_len, i)
                                .and_then(|p| labels.row(*user, p))
                                .map_or(NO_LABEL, |r| r as u32)
                        };
                    }
                }
            }
            step_count += 1;
            let step_seed = rng.random::<u64>() ^ step_count;
            loss_sum += steps_by.step(
                &mut model,
                &inputs[..n],
                &targets[..n],
                &soft[..soft.len().min(n)],
                chunk.len(),
                step_seed,
            )?;
            progress.inc(1);
        }
        let seconds = started.elapsed().as_secs_f64();
        progress.finish_and_clear();
        steps_by.sync(&mut model)?;
        let loss = loss_sum / steps as f64;
        if stopping.end_epoch(epoch, seconds, loss, &model, dataset, || {
            model.weights.clone()
        })? {
            break;
        }
    }
    let (best, log) = stopping.finish();
    if let Some(weights) = best {
        model.weights = weights;
    }
    Ok((model, log))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sasrec::SasRecConfig;
    use crate::model::sasrec::reference;
    use arrow::array::Int64Array;

    fn config(content_dim: usize) -> SasRecConfig {
        SasRecConfig {
            n_items: 11,
            d_model: 8,
            layers: 2,
            heads: 2,
            ffn: 12,
            max_len: 6,
            dropout: 0.2,
            content_dim,
        }
    }

    fn dataset(n_items: usize) -> Dataset {
        Dataset {
            user_ids: Arc::new(Int64Array::from(vec![1])),
            item_ids: Arc::new(Int64Array::from_iter_values(0..n_items as i64)),
            offsets: vec![0, 1],
            items: vec![0],
            splits: vec![Split::Train],
            train_counts: (0..n_items as u64).collect(),
        }
    }

    fn settings(softmax: Softmax, negatives: usize, sampling: Sampling) -> TrainSettings {
        TrainSettings {
            batch_size: 3,
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.98,
            weight_decay: 0.0,
            epochs: 1,
            patience: 1,
            softmax,
            negatives,
            sampling,
            seed: 7,
            label: "test".into(),
        }
    }

    /// Three windows: one full, two left-padded (one with a padded target).
    fn batch() -> (Vec<u32>, Vec<u32>) {
        let mut inputs = vec![PAD; 18];
        let mut targets = vec![PAD; 18];
        fill_window(
            &[1, 4, 2, 9, 10, 3, 5, 7],
            &mut inputs[0..6],
            &mut targets[0..6],
        );
        fill_window(&[6, 6, 0], &mut inputs[6..12], &mut targets[6..12]);
        fill_window(&[8, 2, 4, 1, 3], &mut inputs[12..18], &mut targets[12..18]);
        (inputs, targets)
    }

    fn assert_close(name: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{name}: lengths");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 2e-3 * scale,
                "{name}[{i}]: cpu {g}, candle {w} (scale {scale})"
            );
        }
    }

    #[test]
    fn fill_window_right_aligns_inputs_and_next_item_targets() {
        let mut inputs = [0u32; 4];
        let mut targets = [0u32; 4];
        fill_window(&[5, 6, 7], &mut inputs, &mut targets);
        assert_eq!(inputs, [PAD, PAD, 5, 6]);
        assert_eq!(targets, [PAD, PAD, 6, 7]);
        fill_window(&[1, 2, 3, 4, 5, 6], &mut inputs, &mut targets);
        assert_eq!(inputs, [2, 3, 4, 5]);
        assert_eq!(targets, [3, 4, 5, 6]);
        fill_window(&[], &mut inputs, &mut targets);
        assert_eq!(inputs, [PAD; 4]);
        assert_eq!(targets, [PAD; 4]);
    }

    #[test]
    fn target_positions_follow_the_window() {
        let mut inputs = [0u32; 4];
        let mut targets = [0u32; 4];
        for (sequence, max_len) in [(vec![5u32, 6, 7], 4), (vec![1, 2, 3, 4, 5, 6], 4)] {
            fill_window(&sequence, &mut inputs[..max_len], &mut targets[..max_len]);
            for (slot, &target) in targets[..max_len].iter().enumerate() {
                match target_position(sequence.len(), max_len, slot) {
                    Some(p) => assert_eq!(target, sequence[p], "{sequence:?} slot {slot}"),
                    None => assert_eq!(target, PAD, "{sequence:?} slot {slot}"),
                }
            }
        }
    }

    #[test]
    fn distillation_with_alpha_one_is_plain_cross_entropy() {
        use crate::loss::LossMix;
        let c = config(0);
        let model = SasRec::new(c, Vec::new(), 4).unwrap();
        let (inputs, targets) = batch();
        let data = dataset(c.n_items);
        let s = settings(Softmax::Full, 0, Sampling::Uniform);
        let mut plain = Trainer::new(&model, &data, &s).unwrap();
        let want = plain
            .backprop(&model, &inputs, &targets, &[], 3, None)
            .unwrap();
        let mut mix = LossMix {
            alpha: 1.0,
            temperature: 2.0,
            family: "kl".parse().unwrap(),
            rank_decay: 1.0,
        };
        let labels = Arc::new(SoftLabels::default());
        let soft = vec![NO_LABEL; inputs.len()];
        let mut distilled = Trainer::distilling(
            &model,
            &data,
            &s,
            Arc::new(Distillation {
                labels: Arc::clone(&labels),
                mix: mix.clone(),
            }),
        )
        .unwrap();
        let got = distilled
            .backprop(&model, &inputs, &targets, &soft, 3, None)
            .unwrap();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        for ((name, _, g), (_, _, w)) in distilled
            .gradients()
            .named(&c)
            .iter()
            .zip(plain.gradients().named(&c))
        {
            assert_close(name, g, w);
        }
        // Sampled softmax cannot distil: the soft losses need every logit.
        mix.alpha = 0.5;
        let sampled = settings(Softmax::Sampled, 4, Sampling::Uniform);
        let refused = Trainer::distilling(
            &model,
            &data,
            &sampled,
            Arc::new(Distillation { labels, mix }),
        );
        assert!(refused.is_err());
    }

    #[test]
    fn cpu_gradients_match_candle_autograd() {
        for content_dim in [0, 3] {
            let c = config(content_dim);
            let content: Vec<f32> = (0..c.n_items * content_dim)
                .map(|i| ((i * 7) % 5) as f32 * 0.3 - 0.5)
                .collect();
            let mut model = SasRec::new(c, content, 3).unwrap();
            // Non-trivial layer norms and biases, so their gradients are exercised.
            let mut rng = StdRng::seed_from_u64(9);
            for t in model.weights.tensors_mut() {
                for v in t.iter_mut() {
                    *v += rng.random_range(-0.3..0.3);
                }
            }
            let (inputs, targets) = batch();
            let mut trainer = Trainer::new(
                &model,
                &dataset(c.n_items),
                &settings(Softmax::Full, 0, Sampling::Uniform),
            )
            .unwrap();
            let loss = trainer
                .backprop(&model, &inputs, &targets, &[], 3, None)
                .unwrap();
            let (want_loss, want) = reference::gradients(&model, &inputs, &targets, 3).unwrap();
            assert!(
                (loss - f64::from(want_loss)).abs() < 1e-4,
                "loss {loss} vs {want_loss}"
            );
            let got = trainer.gradients().named(&c);
            for ((name, _, g), (_, _, w)) in got.iter().zip(want.named(&c)) {
                assert_close(name, g, w);
            }
        }
    }

    #[test]
    fn sampled_softmax_over_every_item_equals_full_softmax() {
        let c = config(0);
        let model = SasRec::new(c, Vec::new(), 5).unwrap();
        let (inputs, targets) = batch();
        let data = dataset(c.n_items);
        let mut full = Trainer::new(
            &model,
            &data,
            &settings(Softmax::Full, 0, Sampling::Uniform),
        )
        .unwrap();
        let full_loss = full
            .backprop(&model, &inputs, &targets, &[], 3, None)
            .unwrap();
        // With 20,000 uniform draws over 11 items every item is drawn with
        // probability ≈ 1, so the log-Q correction vanishes.
        let mut sampled = Trainer::new(
            &model,
            &data,
            &settings(Softmax::Sampled, 20_000, Sampling::Uniform),
        )
        .unwrap();
        let sampled_loss = sampled
            .backprop(&model, &inputs, &targets, &[], 3, None)
            .unwrap();
        assert!(
            (full_loss - sampled_loss).abs() < 1e-5,
            "{full_loss} vs {sampled_loss}"
        );
        for ((name, _, g), (_, _, w)) in sampled
            .gradients()
            .named(&c)
            .iter()
            .zip(full.gradients().named(&c))
        {
            assert_close(name, g, w);
        }
    }

    #[test]
    fn sampled_steps_touch_only_the_rows_in_the_batch() {
        let mut c = config(0);
        c.n_items = 5000;
        let mut model = SasRec::new(c, Vec::new(), 5).unwrap();
        let before = model.weights.item.clone();
        let (inputs, targets) = batch();
        let mut trainer = Trainer::new(
            &model,
            &dataset(c.n_items),
            &settings(Softmax::Sampled, 16, Sampling::Popularity),
        )
        .unwrap();
        trainer
            .step(&mut model, &inputs, &targets, &[], 3, 11)
            .unwrap();
        let changed: Vec<usize> = (0..c.n_items)
            .filter(|&i| {
                model.weights.item[i * c.d_model..(i + 1) * c.d_model]
                    != before[i * c.d_model..(i + 1) * c.d_model]
            })
            .collect();
        assert!(!changed.is_empty());
        // Inputs and targets (items 0..=10) plus at most 16 negatives.
        assert!(changed.len() <= 11 + 16, "{} rows changed", changed.len());
        for i in 0..=10 {
            assert!(
                changed.contains(&i),
                "item {i} of the batch was not updated"
            );
        }
    }

    /// Users walking the catalogue in order: item t is followed by t + 1.
    fn walks(n_items: usize, users: usize) -> Dataset {
        let sequences: Vec<Vec<u32>> = (0..users)
            .map(|u| (0..8).map(|t| ((u + t) % n_items) as u32).collect())
            .collect();
        Dataset::from_train_sequences(n_items, &sequences)
    }

    #[test]
    fn cpu_and_candle_trainers_both_learn_the_walks() {
        let c = config(0);
        let data = walks(c.n_items, 24);
        let mut s = settings(Softmax::Full, 0, Sampling::Uniform);
        s.epochs = 30;
        s.patience = 30;
        s.batch_size = 8;
        // The CPU trainer, and candle's autograd + AdamW (the GPU path) on the CPU device.
        let model = SasRec::new(c, Vec::new(), 1).unwrap();
        let (_, cpu_log) = fit(model.clone(), &data, &s).unwrap();
        let mut candle =
            reference::CandleSteps::new(&model, &s, &candle_core::Device::Cpu).unwrap();
        let (trained, candle_log) = fit_with(model, &data, &s, &mut candle, None).unwrap();
        for log in [&cpu_log, &candle_log] {
            assert_eq!(log.len(), 30);
            let (first, last) = (log[0].loss, log[log.len() - 1].loss);
            assert!(last < 0.5 * first, "loss {first} → {last}");
        }
        // The trained model predicts the walk: after item 4 comes item 5.
        let mut scores = Vec::new();
        trained.score(&[&[2, 3, 4]], &mut scores).unwrap();
        let best = (0..c.n_items)
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap();
        assert_eq!(best, 5, "{scores:?}");
    }

    #[test]
    fn sampled_logit_correction_is_the_log_of_the_draw_probability() {
        let data = dataset(4);
        let sampler =
            Sampler::new(&data, &settings(Softmax::Sampled, 3, Sampling::Uniform)).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let (items, column, offsets) = sampler.candidates(&[2, 2, PAD], &mut rng);
        assert_eq!(items[0], 2, "targets come first");
        assert_eq!(column[&2], 0);
        // Uniform over 4 items, 3 draws: P(drawn) = 1 − (3/4)³.
        let want = -(1.0f64 - 0.75f64.powi(3)).ln() as f32;
        for o in offsets {
            assert!((o - want).abs() < 1e-6);
        }
    }
}
