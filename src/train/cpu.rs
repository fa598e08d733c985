//! The hand-written CPU trainer: forward and backward passes over
//! preallocated buffers, full or sampled softmax (sampled with log-Q
//! correction), soft-label losses, and Adam(W) with row-sparse updates of
//! the item table.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;

use super::distillation::{Distillation, NO_LABEL, SoftRows};
use super::losses::SoftTarget;
use super::sampler::Sampler;
use super::steps::{SlotLabels, Steps, TrainSettings};
use crate::config::Softmax;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::model::kernels::{cross_entropy_row, logit_loss, softmax_cross_entropy};
use crate::model::sasrec::cpu::{self, Workspace};
use crate::model::sasrec::{PAD, SasRec, Weights};

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
    in_batch: bool,
}

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
            Softmax::Sampled if settings.in_batch => {
                settings.negatives + settings.batch_size * c.max_len
            }
            Softmax::Sampled => settings.negatives + 1,
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
            in_batch: settings.in_batch,
        })
    }

    /// A trainer whose loss mixes the hard labels with `distillation`'s soft
    /// labels, over the whole catalogue or, with a sampled softmax, over each
    /// position's soft-label items and target plus the step's shared negatives.
    pub fn distilling(
        model: &SasRec,
        dataset: &Dataset,
        settings: &TrainSettings,
        distillation: Arc<Distillation>,
    ) -> Result<Trainer> {
        let mut trainer = Trainer::new(model, dataset, settings)?;
        trainer.distillation = Some(distillation);
        Ok(trainer)
    }

    /// One optimization step on a batch of windows; returns the mean loss.
    /// `soft` gives the batch's soft labels and each slot's row of them
    /// ([`NO_LABEL`] for none; `None` without distillation).
    pub fn step(
        &mut self,
        model: &mut SasRec,
        inputs: &[u32],
        targets: &[u32],
        soft: SlotLabels<'_>,
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
        soft: SlotLabels<'_>,
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

        // Gather the positions with a target, and their rows of the forward pass.
        let rows: Vec<usize> = (0..n).filter(|&i| targets[i] != PAD).collect();
        if rows.is_empty() {
            return Err(Error::internal("a training batch without targets"));
        }
        let hidden_rows = rows
            .iter()
            .map(|&p| {
                self.ws
                    .row_of(p)
                    .ok_or_else(|| Error::internal("a training target without an input item"))
            })
            .collect::<Result<Vec<usize>>>()?;
        let nv = rows.len();
        self.hv.resize(nv * d, 0.0);
        self.dhv.clear();
        self.dhv.resize(nv * d, 0.0);
        for (k, &r) in hidden_rows.iter().enumerate() {
            self.hv[k * d..(k + 1) * d].copy_from_slice(&self.ws.hf[r * d..(r + 1) * d]);
        }
        let weight = 1.0 / nv as f32;
        let row_targets: Vec<u32> = rows.iter().map(|&r| targets[r]).collect();
        self.touched.clear();
        let no_labels = SoftRows::new(0);
        let loss = match (&self.sampler, &self.distillation) {
            (None, Some(distill)) => {
                self.classes = c.n_items;
                let (labels, slots) = soft.unwrap_or((&no_labels, &[]));
                let row_soft: Vec<u32> = rows
                    .iter()
                    .map(|&r| slots.get(r).copied().unwrap_or(NO_LABEL))
                    .collect();
                let mix = &distill.mix;
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
                        mix.row_loss(row, row_targets[r] as usize, label, weight, None)
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
            (Some(sampler), Some(distill)) => {
                // Each position scores, in its own columns, the K items of its
                // soft label and its target (offset 0: always present), then
                // the step's shared negatives (offset −ln P(drawn)); a
                // negative that is one of the row's own items is masked.
                let (labels, slots) = soft.unwrap_or((&no_labels, &[]));
                let mix = &distill.mix;
                let mut rng = StdRng::seed_from_u64(step_seed ^ 0x5eed);
                let (negatives, column, negative_offsets) = sampler.candidates(&[], &mut rng);
                let kk = labels.k;
                let own = kk + 1;
                let k = own + negatives.len();
                self.classes = k;
                let cand = &mut self.cand;
                cand.clear();
                cand.resize(own * d, 0.0);
                for &i in &negatives {
                    cand.extend_from_slice(&table[i as usize * d..(i as usize + 1) * d]);
                }
                let mut offsets = vec![0.0f32; own];
                offsets.extend_from_slice(&negative_offsets);
                // Row r's own items (PAD for none), their logits (−∞ masked),
                // its hard column and its masked negative columns.
                let mut own_items = vec![PAD; nv * own];
                let mut own_logits = vec![f32::NEG_INFINITY; nv * own];
                let mut hard = vec![kk; nv];
                let mut masked: Vec<Vec<usize>> = vec![Vec::new(); nv];
                let mut row_labels = Vec::with_capacity(nv);
                for (r, &t) in row_targets.iter().enumerate() {
                    let label = slots
                        .get(rows[r])
                        .copied()
                        .filter(|&l| l != NO_LABEL)
                        .map(|l| labels.target(l as usize));
                    let items = &mut own_items[r * own..(r + 1) * own];
                    if let Some(label) = &label {
                        items[..kk].copy_from_slice(label.items);
                    }
                    match items[..kk].iter().position(|&i| i == t) {
                        Some(j) => hard[r] = j,
                        None => items[kk] = t,
                    }
                    let h = &self.hv[r * d..(r + 1) * d];
                    for (j, &i) in items.iter().enumerate().filter(|(_, i)| **i != PAD) {
                        let e = &table[i as usize * d..(i as usize + 1) * d];
                        own_logits[r * own + j] = dot(h, e);
                        if let Some(&c) = column.get(&i) {
                            masked[r].push(own + c as usize);
                        }
                    }
                    row_labels.push(label);
                }
                let local: Vec<u32> = (0..kk as u32).collect();
                let d_own: Vec<AtomicU32> = (0..nv * own).map(|_| AtomicU32::new(0)).collect();
                let d_cand = &mut self.d_cand;
                d_cand.clear();
                d_cand.resize(k * d, 0.0);
                if self.scratch.len() < CE_BLOCK * k {
                    self.scratch.resize(CE_BLOCK * k, 0.0);
                }
                let loss = logit_loss(
                    &self.hv,
                    d,
                    cand,
                    nv,
                    CE_BLOCK,
                    &mut self.scratch,
                    &mut self.dhv,
                    d_cand,
                    |r, row| {
                        row[..own].copy_from_slice(&own_logits[r * own..(r + 1) * own]);
                        for &j in &masked[r] {
                            row[j] = f32::NEG_INFINITY;
                        }
                        let label = row_labels[r].map(|l| SoftTarget {
                            items: &local,
                            logits: l.logits,
                            rest: l.rest,
                        });
                        let loss = mix.row_loss(row, hard[r], label, weight, Some(&offsets));
                        for (j, g) in row[..own].iter_mut().enumerate() {
                            d_own[r * own + j].store(g.to_bits(), Ordering::Relaxed);
                            *g = 0.0;
                        }
                        loss
                    },
                );
                for (r, items) in own_items.chunks_exact(own).enumerate() {
                    for (j, &i) in items.iter().enumerate().filter(|(_, i)| **i != PAD) {
                        let g = f32::from_bits(d_own[r * own + j].load(Ordering::Relaxed));
                        let (h, dh) = (
                            &self.hv[r * d..(r + 1) * d],
                            &mut self.dhv[r * d..(r + 1) * d],
                        );
                        add_row_item_gradient(table, d, i, g, h, dh, &mut self.d_table);
                        mark(&mut self.touched, &mut self.touched_flag, i);
                    }
                }
                add_candidate_gradients(
                    &mut self.d_table,
                    d,
                    &negatives,
                    &d_cand[own * d..],
                    &mut self.touched,
                    &mut self.touched_flag,
                );
                loss / nv as f64
            }
            (Some(sampler), _) if self.in_batch => {
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
                add_candidate_gradients(
                    &mut self.d_table,
                    d,
                    &items,
                    d_cand,
                    &mut self.touched,
                    &mut self.touched_flag,
                );
                loss / nv as f64
            }
            (Some(sampler), _) => {
                // Each position: its own target against the step's shared
                // negatives, a negative equal to the target masked out.
                let mut rng = StdRng::seed_from_u64(step_seed ^ 0x5eed);
                let (negatives, column, negative_offsets) = sampler.candidates(&[], &mut rng);
                let k = negatives.len() + 1;
                self.classes = k;
                // Column 0 holds each row's own target logit: its table row
                // is zero, and the row's logit is written in before the loss.
                let cand = &mut self.cand;
                cand.clear();
                cand.resize(d, 0.0);
                for &i in &negatives {
                    cand.extend_from_slice(&table[i as usize * d..(i as usize + 1) * d]);
                }
                let mut offsets = Vec::with_capacity(k);
                offsets.push(0.0);
                offsets.extend_from_slice(&negative_offsets);
                let target_logits: Vec<f32> = row_targets
                    .iter()
                    .enumerate()
                    .map(|(r, &t)| {
                        let e = &table[t as usize * d..(t as usize + 1) * d];
                        dot(&self.hv[r * d..(r + 1) * d], e) + sampler.offset(t)
                    })
                    .collect();
                let hits: Vec<Option<usize>> = row_targets
                    .iter()
                    .map(|t| column.get(t).map(|&c| c as usize + 1))
                    .collect();
                let d_target: Vec<AtomicU32> = (0..nv).map(|_| AtomicU32::new(0)).collect();
                let d_cand = &mut self.d_cand;
                d_cand.clear();
                d_cand.resize(k * d, 0.0);
                if self.scratch.len() < CE_BLOCK * k {
                    self.scratch.resize(CE_BLOCK * k, 0.0);
                }
                let loss = logit_loss(
                    &self.hv,
                    d,
                    cand,
                    nv,
                    CE_BLOCK,
                    &mut self.scratch,
                    &mut self.dhv,
                    d_cand,
                    |r, row| {
                        row[0] = target_logits[r];
                        if let Some(j) = hits[r] {
                            row[j] = f32::NEG_INFINITY;
                        }
                        let loss = cross_entropy_row(row, 0, Some(&offsets), weight);
                        d_target[r].store(row[0].to_bits(), Ordering::Relaxed);
                        row[0] = 0.0;
                        loss
                    },
                );
                for (r, &t) in row_targets.iter().enumerate() {
                    let g = f32::from_bits(d_target[r].load(Ordering::Relaxed));
                    let (h, dh) = (
                        &self.hv[r * d..(r + 1) * d],
                        &mut self.dhv[r * d..(r + 1) * d],
                    );
                    add_row_item_gradient(table, d, t, g, h, dh, &mut self.d_table);
                    mark(&mut self.touched, &mut self.touched_flag, t);
                }
                add_candidate_gradients(
                    &mut self.d_table,
                    d,
                    &negatives,
                    &d_cand[d..],
                    &mut self.touched,
                    &mut self.touched_flag,
                );
                loss / nv as f64
            }
        };

        let computed = self.ws.rows();
        self.ws.dhf[..computed * d].fill(0.0);
        for (k, &r) in hidden_rows.iter().enumerate() {
            self.ws.dhf[r * d..(r + 1) * d].copy_from_slice(&self.dhv[k * d..(k + 1) * d]);
        }
        cpu::backward(model, &mut self.ws, &mut self.grads, &mut self.d_table);

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

/// Back-propagates `g`, the loss gradient of a hidden state `h`'s logit
/// for `item` (a column scored by a dot product of its own, outside the
/// shared candidate product): into the state's gradient `dh` and the item's
/// row of `d_table`.
fn add_row_item_gradient(
    table: &[f32],
    d: usize,
    item: u32,
    g: f32,
    h: &[f32],
    dh: &mut [f32],
    d_table: &mut [f32],
) {
    let i = item as usize;
    for (a, v) in dh.iter_mut().zip(&table[i * d..(i + 1) * d]) {
        *a += g * v;
    }
    for (a, x) in d_table[i * d..(i + 1) * d].iter_mut().zip(h) {
        *a += g * x;
    }
}

/// Adds candidate `j`'s gradient (row `j` of `d_cand`) to its item's row of
/// `d_table`, marking the item as touched.
fn add_candidate_gradients(
    d_table: &mut [f32],
    d: usize,
    items: &[u32],
    d_cand: &[f32],
    touched: &mut Vec<u32>,
    flags: &mut [bool],
) {
    for (&i, g) in items.iter().zip(d_cand.chunks_exact(d)) {
        for (a, g) in d_table[i as usize * d..(i as usize + 1) * d]
            .iter_mut()
            .zip(g)
        {
            *a += g;
        }
        mark(touched, flags, i);
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn mark(touched: &mut Vec<u32>, flags: &mut [bool], item: u32) {
    if !flags[item as usize] {
        flags[item as usize] = true;
        touched.push(item);
    }
}

impl Steps for Trainer {
    fn step(
        &mut self,
        model: &mut SasRec,
        inputs: &[u32],
        targets: &[u32],
        soft: SlotLabels<'_>,
        batch: usize,
        step_seed: u64,
    ) -> Result<f64> {
        Trainer::step(self, model, inputs, targets, soft, batch, step_seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sampling;
    use crate::dataset::Split;
    use crate::model::Scorer;
    use crate::model::sasrec::SasRecConfig;
    use crate::model::sasrec::candle::gradients;
    use crate::train::candle::CandleSteps;
    use crate::train::distillation::LabelInfo;
    use crate::train::fit::{fill_window, fit, fit_with};
    use arrow::array::Int64Array;
    use rand::Rng;

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
        TrainSettings::for_tests(softmax, negatives, sampling)
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
    fn distillation_with_alpha_one_is_plain_cross_entropy() {
        use crate::train::losses::LossMix;
        let c = config(0);
        let model = SasRec::new(c, Vec::new(), 4).unwrap();
        let (inputs, targets) = batch();
        let data = dataset(c.n_items);
        let s = settings(Softmax::Full, 0, Sampling::Uniform);
        let mut plain = Trainer::new(&model, &data, &s).unwrap();
        let want = plain
            .backprop(&model, &inputs, &targets, None, 3, None)
            .unwrap();
        let mix = LossMix {
            alpha: 1.0,
            temperature: 2.0,
            family: "kl".parse().unwrap(),
            rank_decay: 1.0,
        };
        let labels = SoftRows::new(3);
        let soft = vec![NO_LABEL; inputs.len()];
        let distill = Distillation {
            labels: LabelInfo::default(),
            mix,
        };
        let mut distilled = Trainer::distilling(&model, &data, &s, Arc::new(distill)).unwrap();
        let got = distilled
            .backprop(&model, &inputs, &targets, Some((&labels, &soft)), 3, None)
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
    }

    /// Soft labels of K = 3 for four slots of [`batch`] (one of them whose
    /// list holds the slot's target), and each slot's row.
    fn batch_labels(n_items: usize) -> (SoftRows, Vec<u32>) {
        let (_, targets) = batch();
        let mut labels = SoftRows::new(3);
        let mut soft = vec![NO_LABEL; targets.len()];
        let slots = [3usize, 5, 10, 16];
        for (row, &slot) in slots.iter().enumerate() {
            let t = targets[slot];
            let items: Vec<u32> = if row == 1 {
                vec![(t + 1) % n_items as u32, t, (t + 5) % n_items as u32]
            } else {
                vec![
                    (t + 2) % n_items as u32,
                    (t + 3) % n_items as u32,
                    (t + 7) % n_items as u32,
                ]
            };
            labels
                .push(
                    0,
                    row as u32,
                    &items,
                    &[2.5, 1.0 - row as f32, -0.5],
                    0.3 * row as f32,
                )
                .unwrap();
            soft[slot] = row as u32;
        }
        (labels, soft)
    }

    fn distillation(family: &str) -> Arc<Distillation> {
        use crate::train::losses::LossMix;
        Arc::new(Distillation {
            labels: LabelInfo {
                k: 3,
                temperature: 2.0,
                ..LabelInfo::default()
            },
            mix: LossMix {
                alpha: 0.4,
                temperature: 2.0,
                family: family.parse().unwrap(),
                rank_decay: 2.0,
            },
        })
    }

    #[test]
    fn sampled_distillation_over_every_item_equals_full_distillation() {
        let c = config(0);
        let model = SasRec::new(c, Vec::new(), 6).unwrap();
        let (inputs, targets) = batch();
        let data = dataset(c.n_items);
        let (labels, soft) = batch_labels(c.n_items);
        for family in ["kl", "mse", "rank", "kl+mse+rank"] {
            let distill = distillation(family);
            let full_settings = settings(Softmax::Full, 0, Sampling::Uniform);
            let mut full =
                Trainer::distilling(&model, &data, &full_settings, Arc::clone(&distill)).unwrap();
            let full_loss = full
                .backprop(&model, &inputs, &targets, Some((&labels, &soft)), 3, None)
                .unwrap();
            // 20,000 uniform draws over 11 items: each is drawn with
            // probability ≈ 1, so the log-Q correction vanishes; the draws
            // that repeat a row's own items are masked there.
            let mut s = settings(Softmax::Sampled, 20_000, Sampling::Uniform);
            s.in_batch = false;
            let mut sampled = Trainer::distilling(&model, &data, &s, distill).unwrap();
            let sampled_loss = sampled
                .backprop(&model, &inputs, &targets, Some((&labels, &soft)), 3, None)
                .unwrap();
            assert_eq!(sampled.classes(), 3 + 1 + c.n_items);
            assert!(
                (full_loss - sampled_loss).abs() < 1e-5,
                "{family}: {full_loss} vs {sampled_loss}"
            );
            for ((name, _, g), (_, _, w)) in sampled
                .gradients()
                .named(&c)
                .iter()
                .zip(full.gradients().named(&c))
            {
                assert_close(&format!("{family} {name}"), g, w);
            }
        }
    }

    /// A model of `c` (content vectors of its width, a fixed pattern)
    /// initialised from `init_seed`, every weight then moved by up to
    /// ±`spread` (from `perturb_seed`): non-trivial layer norms and biases,
    /// so that their gradients are exercised.
    fn perturbed_model(c: SasRecConfig, init_seed: u64, perturb_seed: u64, spread: f32) -> SasRec {
        let content: Vec<f32> = (0..c.n_items * c.content_dim)
            .map(|i| ((i * 7) % 5) as f32 * 0.3 - 0.5)
            .collect();
        let mut model = SasRec::new(c, content, init_seed).unwrap();
        let mut rng = StdRng::seed_from_u64(perturb_seed);
        for t in model.weights.tensors_mut() {
            for v in t.iter_mut() {
                *v += rng.random_range(-spread..spread);
            }
        }
        model
    }

    #[test]
    fn cpu_gradients_match_candle_autograd() {
        for content_dim in [0, 3] {
            let c = config(content_dim);
            let model = perturbed_model(c, 3, 9, 0.3);
            let (inputs, targets) = batch();
            let mut trainer = Trainer::new(
                &model,
                &dataset(c.n_items),
                &settings(Softmax::Full, 0, Sampling::Uniform),
            )
            .unwrap();
            let loss = trainer
                .backprop(&model, &inputs, &targets, None, 3, None)
                .unwrap();
            let (want_loss, want) = gradients(&model, &inputs, &targets, 3).unwrap();
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
            .backprop(&model, &inputs, &targets, None, 3, None)
            .unwrap();
        // With 20,000 uniform draws over 11 items every item is drawn with
        // probability ≈ 1, so the log-Q correction vanishes. With shared
        // negatives each target is also drawn: it is masked there and scored
        // once, in its own column.
        for (in_batch, classes) in [(true, c.n_items), (false, c.n_items + 1)] {
            let mut s = settings(Softmax::Sampled, 20_000, Sampling::Uniform);
            s.in_batch = in_batch;
            let mut sampled = Trainer::new(&model, &data, &s).unwrap();
            let sampled_loss = sampled
                .backprop(&model, &inputs, &targets, None, 3, None)
                .unwrap();
            assert_eq!(sampled.classes(), classes);
            assert!(
                (full_loss - sampled_loss).abs() < 1e-5,
                "in_batch {in_batch}: {full_loss} vs {sampled_loss}"
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
    }

    #[test]
    fn shared_negatives_gradients_match_finite_differences() {
        shared_negatives_match_finite_differences(None);
    }

    #[test]
    fn sampled_distillation_gradients_match_finite_differences() {
        let (labels, soft) = batch_labels(300);
        shared_negatives_match_finite_differences(Some((
            distillation("kl+mse+rank"),
            labels,
            soft,
        )));
    }

    /// The shared-negatives step's gradients against central differences of
    /// its loss (the draws fixed by the seed), with or without soft labels.
    fn shared_negatives_match_finite_differences(
        distill: Option<(Arc<Distillation>, SoftRows, Vec<u32>)>,
    ) {
        let mut c = config(0);
        c.n_items = 300;
        let mut model = SasRec::new(c, Vec::new(), 8).unwrap();
        let (inputs, targets) = batch();
        let data = dataset(c.n_items);
        let mut s = settings(Softmax::Sampled, 6, Sampling::Popularity);
        s.in_batch = false;
        let soft = distill
            .as_ref()
            .map(|(_, labels, soft)| (labels, &soft[..]));
        let trainer_for = |model: &SasRec| match &distill {
            Some((d, _, _)) => Trainer::distilling(model, &data, &s, Arc::clone(d)).unwrap(),
            None => Trainer::new(model, &data, &s).unwrap(),
        };
        let loss_of = |model: &SasRec| {
            let mut t = trainer_for(model);
            t.backprop(model, &inputs, &targets, soft, 3, None).unwrap()
        };
        let mut trainer = trainer_for(&model);
        trainer
            .backprop(&model, &inputs, &targets, soft, 3, None)
            .unwrap();
        // A step scores the row's own columns (the target; with soft labels
        // K + 1) and 6 draws (few repeats among 300 items).
        let own = if distill.is_some() { 4 } else { 1 };
        assert!(
            (own + 4..=own + 6).contains(&trainer.classes()),
            "{}",
            trainer.classes()
        );
        let grads = trainer.gradients().clone();
        let mut rng = StdRng::seed_from_u64(3);
        let (mut negatives, _, _) = Sampler::new(&data, &s)
            .unwrap()
            .candidates(&[], &mut StdRng::seed_from_u64(0x5eed));
        negatives.retain(|n| !targets.contains(n));
        // Rows of a target, an input-only item, a drawn negative and a
        // soft-label item; dense weights.
        let d = c.d_model;
        let mut items = vec![7usize, 1, negatives[0] as usize];
        if let Some((_, labels, _)) = &distill {
            items.push(labels.target(0).items[2] as usize);
        }
        let mut checks: Vec<(usize, usize)> = Vec::new();
        for &item in &items {
            for j in [0, 3, d - 1] {
                checks.push((0, item * d + j));
            }
        }
        // Dense weights, but not the feed-forward's first layer (w1, b1:
        // tensors 10 and 11 of each block's 12 after item and pos), whose
        // ReLU kinks make central differences unreliable.
        let tensors = model.weights.tensors_mut().len();
        let item_checks = checks.len();
        while checks.len() < item_checks + 8 {
            let t = rng.random_range(1..tensors);
            if t >= 2 && t < 2 + 12 * c.layers && matches!((t - 2) % 12, 8 | 9) {
                continue;
            }
            let len = model.weights.tensors_mut()[t].len();
            checks.push((t, rng.random_range(0..len)));
        }
        let eps = 2e-3f32;
        for (t, i) in checks {
            let original = model.weights.tensors_mut()[t][i];
            model.weights.tensors_mut()[t][i] = original + eps;
            let up = loss_of(&model);
            model.weights.tensors_mut()[t][i] = original - eps;
            let down = loss_of(&model);
            model.weights.tensors_mut()[t][i] = original;
            let numeric = ((up - down) / (2.0 * f64::from(eps))) as f32;
            let analytic = {
                let mut g = grads.clone();
                g.tensors_mut()[t][i]
            };
            assert!(
                (numeric - analytic).abs() <= 2e-3 + 0.03 * analytic.abs(),
                "tensor {t}[{i}]: finite difference {numeric}, gradient {analytic}"
            );
        }
    }

    #[test]
    fn sampled_steps_touch_only_the_rows_in_the_batch() {
        for in_batch in [true, false] {
            sampled_step_touches_only_the_batch(in_batch);
        }
    }

    #[test]
    fn sampled_distillation_steps_touch_only_the_batch_and_its_labels() {
        let mut c = config(0);
        c.n_items = 5000;
        let mut model = SasRec::new(c, Vec::new(), 5).unwrap();
        let before = model.weights.item.clone();
        let (inputs, targets) = batch();
        let (labels, soft) = batch_labels(c.n_items);
        let mut s = settings(Softmax::Sampled, 16, Sampling::Popularity);
        s.in_batch = false;
        let data = dataset(c.n_items);
        let mut trainer = Trainer::distilling(&model, &data, &s, distillation("kl")).unwrap();
        trainer
            .step(&mut model, &inputs, &targets, Some((&labels, &soft)), 3, 11)
            .unwrap();
        let d = c.d_model;
        let changed: Vec<u32> = (0..c.n_items as u32)
            .filter(|&i| {
                let span = i as usize * d..(i as usize + 1) * d;
                model.weights.item[span.clone()] != before[span]
            })
            .collect();
        let mut own: Vec<u32> = (0..=10).collect();
        for row in 0..labels.len() {
            own.extend_from_slice(labels.target(row).items);
        }
        own.sort_unstable();
        own.dedup();
        for i in &own {
            assert!(changed.contains(i), "item {i} of the batch was not updated");
        }
        // Besides them, at most the 16 draws.
        let others = changed.iter().filter(|i| !own.contains(i)).count();
        assert!(others <= 16, "{others} rows outside the batch changed");
    }

    fn sampled_step_touches_only_the_batch(in_batch: bool) {
        let mut c = config(0);
        c.n_items = 5000;
        let mut model = SasRec::new(c, Vec::new(), 5).unwrap();
        let before = model.weights.item.clone();
        let (inputs, targets) = batch();
        let mut s = settings(Softmax::Sampled, 16, Sampling::Popularity);
        s.in_batch = in_batch;
        let mut trainer = Trainer::new(&model, &dataset(c.n_items), &s).unwrap();
        trainer
            .step(&mut model, &inputs, &targets, None, 3, 11)
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

    /// The candle trainer (the GPU path, here on candle's CPU device) takes
    /// the CPU trainer's loss and gradients in every mode: full softmax,
    /// sampled with in-batch or shared negatives (the same draws from the
    /// same step seed, the same log-Q correction), and distillation with
    /// every soft loss over a full or a sampled softmax.
    #[test]
    fn candle_trainer_matches_the_cpu_trainer_in_every_mode() {
        let mut c = config(3);
        c.n_items = 300;
        let model = perturbed_model(c, 12, 4, 0.2);
        let (inputs, targets) = batch();
        let data = dataset(c.n_items);
        let (labels, soft) = batch_labels(c.n_items);
        let mut cases: Vec<(String, TrainSettings, Option<Arc<Distillation>>)> = Vec::new();
        cases.push((
            "full".into(),
            settings(Softmax::Full, 0, Sampling::Uniform),
            None,
        ));
        for in_batch in [true, false] {
            let mut s = settings(Softmax::Sampled, 16, Sampling::Popularity);
            s.in_batch = in_batch;
            cases.push((format!("sampled in_batch={in_batch}"), s, None));
        }
        for family in ["kl", "mse", "rank", "kl+mse+rank"] {
            let full = settings(Softmax::Full, 0, Sampling::Uniform);
            cases.push((format!("full {family}"), full, Some(distillation(family))));
            let mut sampled = settings(Softmax::Sampled, 16, Sampling::Popularity);
            sampled.in_batch = false;
            cases.push((
                format!("sampled {family}"),
                sampled,
                Some(distillation(family)),
            ));
        }
        let device = candle_core::Device::Cpu;
        for (name, s, distill) in cases {
            let soft = distill.as_ref().map(|_| (&labels, soft.as_slice()));
            let (mut cpu, candle) = match &distill {
                None => (
                    Trainer::new(&model, &data, &s).unwrap(),
                    CandleSteps::new(&model, &data, &s, &device).unwrap(),
                ),
                Some(d) => (
                    Trainer::distilling(&model, &data, &s, Arc::clone(d)).unwrap(),
                    CandleSteps::distilling(&model, &data, &s, &device, Arc::clone(d)).unwrap(),
                ),
            };
            let want = cpu
                .backprop(&model, &inputs, &targets, soft, 3, None)
                .unwrap();
            let (got, grads) = candle.gradients(&inputs, &targets, soft, 3, 0).unwrap();
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{name}: loss cpu {want}, candle {got}"
            );
            for ((tensor, _, g), (_, _, w)) in grads.named(&c).iter().zip(cpu.gradients().named(&c))
            {
                assert_close(&format!("{name} {tensor}"), w, g);
            }
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
        let mut candle = CandleSteps::new(&model, &data, &s, &candle_core::Device::Cpu).unwrap();
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
}
