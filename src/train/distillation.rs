//! What a distilled model learns from besides the hard labels: the soft
//! labels of the model before it in the chain, held in memory by user and
//! position, and how its loss mixes them with the hard labels. The files
//! they are read from are [`crate::artifacts::soft_labels`].

use std::sync::Arc;

use super::losses::{LossMix, SoftTarget};
use crate::config::LossFamily;

/// A window slot without a soft label.
pub const NO_LABEL: u32 = u32::MAX;

/// The soft labels of one model, held for training: rows grouped by user
/// (dataset order), positions ascending within a user.
#[derive(Debug, Clone, Default)]
pub struct SoftLabels {
    /// Items per row.
    pub k: usize,
    /// Temperature of `rest_logit`.
    pub temperature: f32,
    /// Producing model.
    pub model: String,
    /// SHA-256 of the producing model's artifact.
    pub model_sha256: String,
    /// Where they were read from.
    pub location: String,
    /// Rows of user `u`: `user_rows[u]..user_rows[u + 1]`.
    user_rows: Vec<usize>,
    positions: Vec<u32>,
    items: Vec<u32>,
    logits: Vec<f32>,
    rest: Vec<f32>,
}

impl SoftLabels {
    /// Rows held.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The row of user `user` at `position`, if there is one.
    pub fn row(&self, user: usize, position: usize) -> Option<usize> {
        let (start, end) = (self.user_rows[user], self.user_rows[user + 1]);
        let found = self.positions[start..end].binary_search(&(position as u32));
        found.ok().map(|i| start + i)
    }

    /// The soft label of row `row`.
    pub fn target(&self, row: usize) -> SoftTarget<'_> {
        let span = row * self.k..(row + 1) * self.k;
        SoftTarget {
            items: &self.items[span.clone()],
            logits: &self.logits[span],
            rest: self.rest[row],
        }
    }

    /// Room for `rows` rows of `n_users` users, to be filled by
    /// [`SoftLabels::push`] in (user, position) order and closed by
    /// [`SoftLabels::finish`].
    pub fn with_capacity(
        k: usize,
        temperature: f32,
        model: String,
        model_sha256: String,
        location: String,
        n_users: usize,
        rows: usize,
    ) -> SoftLabels {
        SoftLabels {
            k,
            temperature,
            model,
            model_sha256,
            location,
            user_rows: vec![0; n_users + 1],
            positions: Vec::with_capacity(rows),
            items: Vec::with_capacity(rows * k),
            logits: Vec::with_capacity(rows * k),
            rest: Vec::with_capacity(rows),
        }
    }

    /// Appends the row of `user` at `position` (after every row of earlier
    /// users and earlier positions): `k` items, their logits and the rest logit.
    pub fn push(&mut self, user: u32, position: u32, items: &[u32], logits: &[f32], rest: f32) {
        self.user_rows[user as usize + 1] += 1;
        self.positions.push(position);
        self.items.extend_from_slice(items);
        self.logits.extend_from_slice(logits);
        self.rest.push(rest);
    }

    /// Turns the per-user row counts into row ranges; call once, after the last push.
    pub fn finish(mut self) -> SoftLabels {
        for u in 1..self.user_rows.len() {
            self.user_rows[u] += self.user_rows[u - 1];
        }
        self
    }
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

impl Distillation {
    /// Learning from `labels` with weight `alpha` on the hard label and the
    /// soft losses of `family`, at the temperature the labels were produced at.
    pub fn new(labels: Arc<SoftLabels>, alpha: f32, family: LossFamily, rank_decay: f32) -> Self {
        let mix = LossMix {
            alpha,
            temperature: labels.temperature,
            family,
            rank_decay,
        };
        Distillation { labels, mix }
    }
}
