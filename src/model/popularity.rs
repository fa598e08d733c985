//! The popularity baseline: every user gets the items with the most
//! train-split events (ties by item index, as everywhere).

use crate::dataset::Dataset;
use crate::error::Result;
use crate::model::{ModelArtifact, ModelCard, Scorer};

/// Model kind in the card.
pub const KIND: &str = "popularity";

/// Item scores = train-split event counts.
#[derive(Debug, Clone)]
pub struct Popularity {
    scores: Vec<f32>,
}

impl Popularity {
    /// Counts from the dataset's train split.
    pub fn fit(dataset: &Dataset) -> Popularity {
        Popularity {
            scores: dataset.train_counts.iter().map(|&c| c as f32).collect(),
        }
    }

    /// Saves it as an artifact named `name`.
    pub fn to_artifact(&self, name: &str) -> Result<ModelArtifact> {
        let card = ModelCard {
            name: name.to_string(),
            kind: KIND.into(),
            role: "baseline".into(),
            training: "supervised".into(),
            loss: None,
            n_items: self.scores.len(),
            config: serde_json::json!({}),
            distilled_from: None,
            variant: crate::model::FP32.into(),
            warm_started_from: None,
        };
        ModelArtifact::from_f32(
            card,
            vec![("scores", vec![self.scores.len()], &self.scores)],
        )
    }

    /// Loads it from an artifact.
    pub fn from_artifact(artifact: &ModelArtifact) -> Result<Popularity> {
        Ok(Popularity {
            scores: artifact.tensor_f32("scores", &[artifact.card.n_items])?,
        })
    }
}

impl Scorer for Popularity {
    fn n_items(&self) -> usize {
        self.scores.len()
    }

    fn score(&self, histories: &[&[u32]], out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        for _ in histories {
            out.extend_from_slice(&self.scores);
        }
        Ok(())
    }
}
