//! The item-to-item baselines a practitioner tries first, `transitions`
//! and `cooccurrence`: a sparse table of each item's neighbours and their
//! weights (built in SQL, `sql/transitions.sql` and `sql/cooccurrence.sql`),
//! scored by full ranking like every model. A user's score of item `j` is
//!
//! ```text
//! Σ_{a < history} decay^a · W[x_{n-1-a}, j]  +  backoff · prior(j)
//! ```
//!
//! over the user's last `history` items (`x_{n-1}` the most recent), where
//! `prior` is each item's share of the train events: items no neighbour
//! row reaches fall back to popularity, and so does a user whose last items
//! have no neighbours at all.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{ModelArtifact, ModelCard, Scorer, TensorData};

/// Model kind in the card.
pub const KIND: &str = "neighbors";

/// How a neighbour table scores, stored in the card.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NeighborsConfig {
    /// The user's most recent items whose neighbour rows are summed.
    pub history: usize,
    /// Weight of each older item's row, relative to the one after it.
    pub decay: f32,
    /// Weight of the popularity prior added to every item's score.
    pub backoff: f32,
}

/// A neighbour table, ready to score.
#[derive(Debug, Clone)]
pub struct Neighbors {
    config: NeighborsConfig,
    /// `offsets[i]..offsets[i + 1]`: item `i`'s neighbours.
    offsets: Vec<u32>,
    neighbors: Vec<u32>,
    weights: Vec<f32>,
    /// Each item's share of the train events.
    prior: Vec<f32>,
    /// Their sum (1, or 0 without train events).
    prior_sum: f64,
}

impl Neighbors {
    /// A table over `prior.len()` items from `rows` (item, neighbour,
    /// weight), sorted by item. Refuses (as an internal error) rows out of
    /// order or past the catalogue: the caller checked its input.
    pub fn new(
        config: NeighborsConfig,
        prior: Vec<f32>,
        rows: &[(u32, u32, f32)],
    ) -> Result<Neighbors> {
        let n = prior.len();
        let mut offsets = vec![0u32; n + 1];
        let mut neighbors = Vec::with_capacity(rows.len());
        let mut weights = Vec::with_capacity(rows.len());
        let mut last = 0u32;
        for &(item, neighbor, weight) in rows {
            if item < last || item as usize >= n || neighbor as usize >= n {
                return Err(Error::internal(format!(
                    "neighbour row ({item}, {neighbor}) out of order or past {n} items"
                )));
            }
            last = item;
            offsets[item as usize + 1] += 1;
            neighbors.push(neighbor);
            weights.push(weight);
        }
        for i in 0..n {
            offsets[i + 1] += offsets[i];
        }
        Ok(Neighbors {
            config,
            offsets,
            neighbors,
            weights,
            prior_sum: prior.iter().map(|&p| f64::from(p)).sum(),
            prior,
        })
    }

    /// Its scoring settings.
    pub fn config(&self) -> NeighborsConfig {
        self.config
    }

    /// Neighbour rows kept, over all items.
    pub fn len(&self) -> usize {
        self.neighbors.len()
    }

    /// Whether no item has a neighbour (every user gets popularity).
    pub fn is_empty(&self) -> bool {
        self.neighbors.is_empty()
    }

    /// Its card, named `name`.
    pub fn card(&self, name: &str) -> Result<ModelCard> {
        Ok(ModelCard {
            name: name.to_string(),
            kind: KIND.into(),
            role: "baseline".into(),
            training: "supervised".into(),
            loss: None,
            n_items: self.prior.len(),
            config: serde_json::to_value(self.config)
                .map_err(|e| Error::internal(e.to_string()))?,
            distilled_from: None,
            variant: crate::model::FP32.into(),
            warm_started_from: None,
        })
    }

    /// Saves it as an artifact named `name`.
    pub fn to_artifact(&self, name: &str) -> Result<ModelArtifact> {
        let n = self.prior.len();
        let nnz = self.neighbors.len();
        ModelArtifact::from_tensors(
            self.card(name)?,
            vec![
                ("offsets", vec![n + 1], TensorData::U32(&self.offsets)),
                ("neighbors", vec![nnz], TensorData::U32(&self.neighbors)),
                ("weights", vec![nnz], TensorData::F32(&self.weights)),
                ("prior", vec![n], TensorData::F32(&self.prior)),
            ],
        )
    }

    /// Loads it from an artifact, checking every tensor against the card
    /// and the others (exit 3 on a mismatch).
    pub fn from_artifact(artifact: &ModelArtifact) -> Result<Neighbors> {
        let bad = |msg: String| Error::data(artifact.location.clone(), msg);
        let config: NeighborsConfig = serde_json::from_value(artifact.card.config.clone())
            .map_err(|e| bad(format!("bad neighbors config: {e}")))?;
        if config.history == 0 || !config.decay.is_finite() || !config.backoff.is_finite() {
            return Err(bad(
                "neighbors config needs a history of at least 1 and finite decay and backoff"
                    .into(),
            ));
        }
        let n = artifact.card.n_items;
        let offsets = artifact.tensor_u32("offsets", &[n + 1])?;
        let nnz = offsets.last().copied().unwrap_or(0) as usize;
        if offsets[0] != 0 || offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(bad("tensor offsets is not ascending from 0".into()));
        }
        let neighbors = artifact.tensor_u32("neighbors", &[nnz])?;
        if let Some(bad_item) = neighbors.iter().find(|&&j| j as usize >= n) {
            return Err(bad(format!(
                "tensor neighbors names item {bad_item}, past the {n} items"
            )));
        }
        let prior = artifact.tensor_f32("prior", &[n])?;
        Ok(Neighbors {
            config,
            offsets,
            neighbors,
            weights: artifact.tensor_f32("weights", &[nnz])?,
            prior_sum: prior.iter().map(|&p| f64::from(p)).sum(),
            prior,
        })
    }
}

/// Scratch space for [`Neighbors::top_scores`]: a dense score per item and
/// the items touched, so summing a few rows costs their length.
#[derive(Debug, Clone, Default)]
pub struct TopScratch {
    dense: Vec<f32>,
    marked: Vec<bool>,
    touched: Vec<u32>,
}

impl TopScratch {
    fn touch(&mut self, j: u32) {
        if !self.marked[j as usize] {
            self.marked[j as usize] = true;
            self.touched.push(j);
        }
    }
}

impl Neighbors {
    /// The `k` best-scored items for a user with `history` (score order,
    /// ties by item), as [`Scorer::score`] scores them, into `out`; returns
    /// the sum of every item's score. `popular` lists items by descending
    /// prior (ties by item): where fewer than `k` items have neighbour
    /// scores, the back-off fills the rest from it.
    pub fn top_scores(
        &self,
        history: &[u32],
        k: usize,
        popular: &[u32],
        scratch: &mut TopScratch,
        out: &mut Vec<(u32, f32)>,
    ) -> f64 {
        let n = self.prior.len();
        if scratch.dense.len() != n {
            scratch.dense = vec![0.0; n];
            scratch.marked = vec![false; n];
        }
        let backoff = self.config.backoff;
        let mut total = f64::from(backoff) * self.prior_sum;
        let mut weight = 1.0f32;
        for &item in history.iter().rev().take(self.config.history) {
            let (from, to) = (
                self.offsets[item as usize] as usize,
                self.offsets[item as usize + 1] as usize,
            );
            for (&j, &w) in self.neighbors[from..to].iter().zip(&self.weights[from..to]) {
                scratch.touch(j);
                scratch.dense[j as usize] += weight * w;
                total += f64::from(weight * w);
            }
            weight *= self.config.decay;
        }
        for &j in popular.iter().take(k) {
            scratch.touch(j);
        }
        out.clear();
        for &j in &scratch.touched {
            out.push((
                j,
                scratch.dense[j as usize] + backoff * self.prior[j as usize],
            ));
            scratch.dense[j as usize] = 0.0;
            scratch.marked[j as usize] = false;
        }
        scratch.touched.clear();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(k);
        total
    }

    /// Every item, by descending prior (ties by item): the order the
    /// back-off ranks items no neighbour row reaches.
    pub fn by_prior(&self) -> Vec<u32> {
        let mut items: Vec<u32> = (0..self.prior.len() as u32).collect();
        items.sort_by(|&a, &b| {
            self.prior[b as usize]
                .total_cmp(&self.prior[a as usize])
                .then(a.cmp(&b))
        });
        items
    }
}

impl Scorer for Neighbors {
    fn n_items(&self) -> usize {
        self.prior.len()
    }

    fn score(&self, histories: &[&[u32]], out: &mut Vec<f32>) -> Result<()> {
        let n = self.prior.len();
        let backoff = self.config.backoff;
        out.clear();
        out.reserve(histories.len() * n);
        for history in histories {
            let start = out.len();
            out.extend(self.prior.iter().map(|p| backoff * p));
            let row = &mut out[start..];
            let mut weight = 1.0f32;
            for &item in history.iter().rev().take(self.config.history) {
                let (from, to) = (
                    self.offsets[item as usize] as usize,
                    self.offsets[item as usize + 1] as usize,
                );
                for (&j, &w) in self.neighbors[from..to].iter().zip(&self.weights[from..to]) {
                    row[j as usize] += weight * w;
                }
                weight *= self.config.decay;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(history: usize, backoff: f32) -> Neighbors {
        // 4 items; 0 → 2 (3), 0 → 1 (1); 1 → 3 (2); items 2, 3 have none.
        Neighbors::new(
            NeighborsConfig {
                history,
                decay: 0.5,
                backoff,
            },
            vec![0.1, 0.2, 0.3, 0.4],
            &[(0, 2, 3.0), (0, 1, 1.0), (1, 3, 2.0)],
        )
        .unwrap()
    }

    #[test]
    fn a_user_scores_the_last_items_rows_then_the_prior() {
        let t = table(2, 1.0);
        let mut out = Vec::new();
        t.score(&[&[1, 0], &[3], &[]], &mut out).unwrap();
        // Last item 0 (weight 1), then 1 (weight 0.5), plus the prior.
        assert_eq!(&out[..4], &[0.1, 0.2 + 1.0, 0.3 + 3.0, 0.4 + 1.0]);
        // An item with no neighbours, and an empty history: the prior alone.
        assert_eq!(&out[4..8], &[0.1, 0.2, 0.3, 0.4]);
        assert_eq!(&out[8..], &[0.1, 0.2, 0.3, 0.4]);
    }

    #[test]
    fn the_top_scores_are_the_scorers_best_items() {
        let t = table(2, 0.5);
        let popular = t.by_prior();
        assert_eq!(popular, vec![3, 2, 1, 0]);
        let mut scratch = TopScratch::default();
        let mut top = Vec::new();
        for history in [&[1u32, 0][..], &[3], &[]] {
            let mut all = Vec::new();
            t.score(&[history], &mut all).unwrap();
            let total = t.top_scores(history, 3, &popular, &mut scratch, &mut top);
            let mut want: Vec<(u32, f32)> = all
                .iter()
                .copied()
                .enumerate()
                .map(|(j, s)| (j as u32, s))
                .collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            want.truncate(3);
            assert_eq!(top, want, "{history:?}");
            let sum: f32 = all.iter().sum();
            assert!(
                (total as f32 - sum).abs() < 1e-5,
                "{history:?}: {total} {sum}"
            );
        }
    }

    #[test]
    fn the_artifact_round_trips_and_a_forged_one_is_refused() {
        let t = table(1, 0.5);
        let artifact = t.to_artifact("transitions").unwrap();
        let parsed = ModelArtifact::parse("mem", artifact.bytes.clone()).unwrap();
        // Weights and prior; the offsets and neighbour indices are not parameters.
        assert_eq!(parsed.params, 3 + 4);
        let back = Neighbors::from_artifact(&parsed).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        t.score(&[&[0, 1]], &mut a).unwrap();
        back.score(&[&[0, 1]], &mut b).unwrap();
        assert_eq!(a, b);
        assert!(parsed.scorer(4).is_ok() && parsed.scorer(5).is_err());
        // A neighbour past the catalogue: exit 3, naming the file.
        let forged = Neighbors {
            neighbors: vec![2, 1, 9],
            ..t.clone()
        }
        .to_artifact("transitions")
        .unwrap();
        let forged = ModelArtifact::parse("forged.safetensors", forged.bytes).unwrap();
        let err = Neighbors::from_artifact(&forged).unwrap_err();
        assert_eq!(err.exit_code(), 3);
        assert!(err.to_string().contains("forged.safetensors"), "{err}");
        // Rows out of order are the caller's bug.
        assert!(Neighbors::new(t.config, vec![0.0; 3], &[(1, 0, 1.0), (0, 1, 1.0)]).is_err());
    }
}
