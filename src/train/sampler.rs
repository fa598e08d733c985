//! Negatives for a sampled softmax: drawn from the catalogue uniformly or
//! by popularity (alias method), and each candidate's log-Q correction, so
//! a loss over the drawn items estimates the one over every item. The CPU
//! trainer and the candle trainer draw the same negatives from the same
//! step seed.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand_distr::Distribution;
use rand_distr::weighted::WeightedAliasIndex;

use super::steps::TrainSettings;
use crate::config::Sampling;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::model::sasrec::PAD;

/// Draws negatives for sampled softmax and corrects for how they were drawn.
pub struct Sampler {
    alias: WeightedAliasIndex<f64>,
    probability: Vec<f64>,
    negatives: usize,
}

impl Sampler {
    pub fn new(dataset: &Dataset, settings: &TrainSettings) -> Result<Sampler> {
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
    pub fn candidates(
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
        let offsets = items.iter().map(|&i| self.offset(i)).collect();
        (items, column, offsets)
    }

    /// The log-Q correction of `item`'s logit: `-ln P(item among the draws)`.
    pub fn offset(&self, item: u32) -> f32 {
        let m = self.negatives as f64;
        let q = self.probability[item as usize];
        // Probability that M draws with replacement include the item.
        let drawn = -((m * (-q).ln_1p()).exp_m1());
        -(drawn.max(1e-30).ln()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Softmax;
    use rand::SeedableRng;

    #[test]
    fn sampled_logit_correction_is_the_log_of_the_draw_probability() {
        let data = Dataset::from_train_sequences(4, &[vec![0, 1, 2, 3]]);
        let sampler = Sampler::new(
            &data,
            &TrainSettings::for_tests(Softmax::Sampled, 3, Sampling::Uniform),
        )
        .unwrap();
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
