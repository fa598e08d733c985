//! Soft labels from a neighbour baseline (`transitions`, `cooccurrence`),
//! made as they are needed instead of read from a file: at every position
//! of every user's train sequence, the baseline's `k` best items given the
//! items before it, as logits `ln score` with the rest of the catalogue's
//! score mass as the rest bucket. A teacher that learns from them as well
//! as from the hard labels starts from what the counts already know (the
//! items that follow which) and spends its capacity on the rest.

use std::sync::Arc;

use super::distillation::{GroupOrder, LabelInfo, LabelSource, SoftRows};
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::model::neighbors::{Neighbors, TopScratch};

/// Users per group handed to the shuffle buffer.
const GROUP_USERS: usize = 256;

/// The smallest score a logit is taken of (a zero score has no logarithm).
const MIN_SCORE: f64 = 1e-30;

/// A neighbour baseline's soft labels for a dataset's train sequences.
pub struct NeighborLabels {
    info: LabelInfo,
    model: Arc<Neighbors>,
    dataset: Arc<Dataset>,
    /// Users with a train sequence of at least two items.
    users: Vec<usize>,
    popular: Vec<u32>,
    order: GroupOrder,
    scratch: TopScratch,
    top: Vec<(u32, f32)>,
}

impl NeighborLabels {
    /// The soft labels of `model` (named `name`, with artifact SHA-256
    /// `sha256`) over `dataset`: `k` items per position, at temperature `t`.
    pub fn new(
        model: Arc<Neighbors>,
        name: &str,
        sha256: &str,
        dataset: Arc<Dataset>,
        k: usize,
        temperature: f32,
    ) -> Result<NeighborLabels> {
        let n = dataset.n_items();
        if k == 0 || k >= n {
            return Err(Error::config(format!(
                "soft labels of {name}: k = {k} must be at least 1 and below the {n} items"
            )));
        }
        let users: Vec<usize> = (0..dataset.n_users())
            .filter(|&u| dataset.train_items(u).len() >= 2)
            .collect();
        let groups = users.len().div_ceil(GROUP_USERS);
        Ok(NeighborLabels {
            info: LabelInfo {
                k,
                temperature,
                model: name.to_string(),
                model_sha256: sha256.to_string(),
                location: format!("model {name} (labels made per epoch)"),
            },
            popular: model.by_prior(),
            model,
            dataset,
            users,
            order: GroupOrder::new(groups),
            scratch: TopScratch::default(),
            top: Vec::with_capacity(k),
        })
    }

    /// The rows of the users in group `g`: every position after the first
    /// of each train sequence.
    fn group(&mut self, g: usize) -> Result<SoftRows> {
        let k = self.info.k;
        let t = f64::from(self.info.temperature);
        let n = self.dataset.n_items();
        // The items outside the top K, each given an even share of the
        // rest's score mass: `T · ln Σ (score)^(1/T)` over them.
        let others = (n - k) as f64;
        let mut rows = SoftRows::new(k);
        let (mut items, mut logits) = (Vec::with_capacity(k), Vec::with_capacity(k));
        let users = &self.users[g * GROUP_USERS..((g + 1) * GROUP_USERS).min(self.users.len())];
        for &user in users {
            let sequence = self.dataset.train_items(user);
            for position in 1..sequence.len() {
                let total = self.model.top_scores(
                    &sequence[..position],
                    k,
                    &self.popular,
                    &mut self.scratch,
                    &mut self.top,
                );
                items.clear();
                logits.clear();
                let mut kept = 0.0f64;
                for &(item, score) in &self.top {
                    items.push(item);
                    logits.push(f64::from(score).max(MIN_SCORE).ln() as f32);
                    kept += f64::from(score);
                }
                let rest_mass = (total - kept).max(MIN_SCORE);
                let rest = t * others.ln() + (rest_mass / others).ln();
                rows.push(user as u32, position as u32, &items, &logits, rest as f32)
                    .map_err(|rule| Error::internal(format!("{}: {rule}", self.info.location)))?;
            }
        }
        Ok(rows)
    }
}

impl LabelSource for NeighborLabels {
    fn info(&self) -> &LabelInfo {
        &self.info
    }

    fn start_epoch(&mut self, seed: u64) -> Result<()> {
        self.order.start_epoch(seed);
        Ok(())
    }

    fn next_group(&mut self) -> Result<Option<SoftRows>> {
        match self.order.next_group() {
            Some(g) => self.group(g).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::neighbors::NeighborsConfig;

    #[test]
    fn every_position_gets_the_baselines_top_items_and_the_rest_of_its_mass() {
        // Five items; 0 → 1 (4 times), 0 → 2 (1); 1 → 2 (2).
        let model = Arc::new(
            Neighbors::new(
                NeighborsConfig {
                    history: 1,
                    decay: 1.0,
                    backoff: 1.0,
                },
                vec![0.4, 0.3, 0.2, 0.1, 0.0],
                &[(0, 1, 4.0), (0, 2, 1.0), (1, 2, 2.0)],
            )
            .unwrap(),
        );
        let dataset = Arc::new(Dataset::from_train_sequences(5, &[vec![0, 1, 2], vec![3]]));
        let mut labels = NeighborLabels::new(model, "transitions", "ab", dataset, 2, 1.0).unwrap();
        labels.start_epoch(1).unwrap();
        let group = labels.next_group().unwrap().unwrap();
        assert!(labels.next_group().unwrap().is_none());
        // User 1 has one train item: no rows. User 0: positions 1 and 2.
        assert_eq!(group.users(), 1);
        assert_eq!(group.len(), 2);
        // Position 1 (after item 0): item 1 (4 + 0.3), item 2 (1 + 0.2);
        // the rest is items 0, 3, 4: 0.4 + 0.1 + 0 of the total 5 + 1.
        let first = group.target(0);
        assert_eq!(first.items, &[1, 2]);
        assert!((first.logits[0] - 4.3f32.ln()).abs() < 1e-6);
        assert!((first.rest - 0.5f32.ln()).abs() < 1e-5, "{}", first.rest);
        let p = first.probabilities(1.0);
        assert!((p[0] - 4.3 / 6.0).abs() < 1e-6 && (p[2] - 0.5 / 6.0).abs() < 1e-6);
        // Position 2 (after item 1): item 2 (2.2), then item 0 by popularity.
        let second = group.target(1);
        assert_eq!(second.items, &[2, 0]);
        assert!(
            NeighborLabels::new(
                Arc::new(
                    Neighbors::new(
                        NeighborsConfig {
                            history: 1,
                            decay: 1.0,
                            backoff: 1.0
                        },
                        vec![0.5; 2],
                        &[]
                    )
                    .unwrap()
                ),
                "t",
                "",
                Arc::new(Dataset::from_train_sequences(2, &[vec![0, 1]])),
                2,
                1.0
            )
            .is_err()
        );
    }
}
