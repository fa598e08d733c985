//! How a model takes its optimization steps: the settings of one model's
//! training, and the [`Steps`] the fit loop drives — the CPU trainer
//! (`cpu::Trainer`), candle's autograd (`candle::CandleSteps`), or a wrapper
//! such as the compress stage's constrained recovery.

use super::distillation::SoftRows;
use crate::config::{DistillSpec, LinkSpec, Sampling, Softmax, TeacherSpec, Windows};
use crate::error::Result;
use crate::model::sasrec::SasRec;

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
    /// Sampled softmax: the batch's other targets are negatives too.
    pub in_batch: bool,
    /// The windows of each train sequence an epoch trains on.
    pub windows: Windows,
    /// Distillation: rows of soft labels the shuffle buffer holds.
    pub label_buffer: usize,
    /// Users early stopping validates on (0: all; `evaluation.valid_users`).
    pub valid_users: usize,
    /// Seed of shuffling, dropout and sampling.
    pub seed: u64,
    /// Progress bar label (the model name).
    pub label: String,
}

impl TrainSettings {
    /// The optimization settings a teacher `spec` asks for.
    pub fn for_teacher(spec: &TeacherSpec, seed: u64, label: &str) -> TrainSettings {
        TrainSettings {
            batch_size: spec.batch_size,
            lr: spec.lr,
            beta1: spec.beta1,
            beta2: spec.beta2,
            weight_decay: spec.weight_decay,
            epochs: spec.epochs,
            patience: spec.patience,
            softmax: spec.softmax,
            negatives: spec.negatives,
            sampling: spec.sampling,
            in_batch: spec.in_batch,
            windows: spec.windows,
            label_buffer: 0,
            valid_users: 0,
            seed,
            label: label.to_string(),
        }
    }

    /// The optimization settings of a distillation chain link `link` of
    /// `distill` (whose softmax and negatives every link shares).
    pub fn for_link(
        distill: &DistillSpec,
        link: &LinkSpec,
        seed: u64,
        label: &str,
    ) -> TrainSettings {
        TrainSettings {
            batch_size: link.batch_size,
            lr: link.lr,
            beta1: link.beta1,
            beta2: link.beta2,
            weight_decay: link.weight_decay,
            epochs: link.epochs,
            patience: link.patience,
            softmax: distill.softmax,
            negatives: distill.negatives,
            sampling: distill.sampling,
            in_batch: false,
            windows: link.windows,
            label_buffer: distill.shuffle_buffer,
            valid_users: 0,
            seed,
            label: label.to_string(),
        }
    }
}

#[cfg(test)]
impl TrainSettings {
    /// Settings for the trainers' tests: batches of 3, lr 0.01, one epoch,
    /// seed 7, with the given softmax, negatives and sampling.
    pub fn for_tests(softmax: Softmax, negatives: usize, sampling: Sampling) -> TrainSettings {
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
            in_batch: true,
            windows: Windows::Last,
            label_buffer: 64,
            valid_users: 0,
            seed: 7,
            label: "test".into(),
        }
    }
}

/// A batch's soft labels and each window slot's row of them.
pub type SlotLabels<'a> = Option<(&'a SoftRows, &'a [u32])>;

/// One way of taking optimization steps: the CPU trainer, or candle's
/// autograd on a device.
pub trait Steps {
    /// One step on `batch` windows; returns the mean loss. `soft` gives
    /// the batch's soft labels and each slot's row of them ([`NO_LABEL`]
    /// for none; `None` without distillation).
    ///
    /// [`NO_LABEL`]: super::NO_LABEL
    fn step(
        &mut self,
        model: &mut SasRec,
        inputs: &[u32],
        targets: &[u32],
        soft: SlotLabels<'_>,
        batch: usize,
        step_seed: u64,
    ) -> Result<f64>;

    /// Brings `model.weights` up to date before it is validated.
    fn sync(&mut self, _model: &mut SasRec) -> Result<()> {
        Ok(())
    }
}
