//! The learned baseline: a user is the mean of the input embeddings of
//! their last `window` items; an item's score is the dot product of that
//! mean with the item's output embedding plus a bias. It is trained in
//! `train::meanpool`.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{ModelArtifact, ModelCard, Scorer};

/// Model kind in the card.
pub const KIND: &str = "meanpool";

/// Architecture settings, stored in the card.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanPoolConfig {
    /// Embedding width.
    pub d_model: usize,
    /// Recent items averaged.
    pub window: usize,
}

/// A trained mean-pool model, ready to score.
#[derive(Debug, Clone)]
pub struct MeanPool {
    config: MeanPoolConfig,
    n_items: usize,
    /// `n_items × d` input embeddings, row-major.
    item_in: Vec<f32>,
    /// `n_items × d` output embeddings (on the scoring device).
    item_out: Tensor,
    /// `n_items` output biases.
    bias: Tensor,
}

impl MeanPool {
    /// A model from its parts: `item_in` is `n_items × d` row-major,
    /// `item_out` `n_items × d` and `bias` `n_items` on the scoring device.
    pub fn new(
        config: MeanPoolConfig,
        n_items: usize,
        item_in: Vec<f32>,
        item_out: Tensor,
        bias: Tensor,
    ) -> MeanPool {
        MeanPool {
            config,
            n_items,
            item_in,
            item_out,
            bias,
        }
    }

    /// Saves it as an artifact named `name`.
    pub fn to_artifact(&self, name: &str) -> Result<ModelArtifact> {
        self.artifact(self.card(name)?)
    }

    /// Its architecture settings.
    pub fn config(&self) -> MeanPoolConfig {
        self.config
    }

    /// Its tensors as values: input embeddings (`n_items × d`), output
    /// embeddings (`n_items × d`) and biases (`n_items`).
    pub fn tensors(&self) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        Ok((
            self.item_in.clone(),
            self.item_out.flatten_all()?.to_vec1::<f32>()?,
            self.bias.to_vec1::<f32>()?,
        ))
    }

    /// Its card, named `name`.
    pub fn card(&self, name: &str) -> Result<ModelCard> {
        Ok(ModelCard {
            name: name.to_string(),
            kind: KIND.into(),
            role: "baseline".into(),
            training: "supervised".into(),
            loss: Some("ce".into()),
            n_items: self.n_items,
            config: serde_json::to_value(self.config)
                .map_err(|e| Error::internal(e.to_string()))?,
            distilled_from: None,
            variant: crate::model::FP32.into(),
            warm_started_from: None,
        })
    }

    /// Saves it as an artifact with `card` (from [`MeanPool::card`]).
    pub fn artifact(&self, card: ModelCard) -> Result<ModelArtifact> {
        let d = self.config.d_model;
        let item_out = self.item_out.flatten_all()?.to_vec1::<f32>()?;
        let bias = self.bias.to_vec1::<f32>()?;
        ModelArtifact::from_f32(
            card,
            vec![
                ("item_in", vec![self.n_items, d], &self.item_in),
                ("item_out", vec![self.n_items, d], &item_out),
                ("bias", vec![self.n_items], &bias),
            ],
        )
    }

    /// Loads it from an artifact, checking every tensor against the card.
    pub fn from_artifact(artifact: &ModelArtifact) -> Result<MeanPool> {
        let config: MeanPoolConfig =
            serde_json::from_value(artifact.card.config.clone()).map_err(|e| {
                Error::data(
                    artifact.location.clone(),
                    format!("bad meanpool config: {e}"),
                )
            })?;
        if config.d_model == 0 || config.window == 0 {
            return Err(Error::data(
                artifact.location.clone(),
                "meanpool config needs d_model and window of at least 1",
            ));
        }
        let n = artifact.card.n_items;
        let d = config.d_model;
        let device = Device::Cpu;
        let item_in = artifact.tensor_f32("item_in", &[n, d])?;
        let item_out =
            Tensor::from_vec(artifact.tensor_f32("item_out", &[n, d])?, (n, d), &device)?;
        let bias = Tensor::from_vec(artifact.tensor_f32("bias", &[n])?, n, &device)?;
        Ok(MeanPool {
            config,
            n_items: n,
            item_in,
            item_out,
            bias,
        })
    }
}

impl Scorer for MeanPool {
    fn n_items(&self) -> usize {
        self.n_items
    }

    fn score(&self, histories: &[&[u32]], out: &mut Vec<f32>) -> Result<()> {
        let d = self.config.d_model;
        let mut users = vec![0f32; histories.len() * d];
        for (row, history) in histories.iter().enumerate() {
            let recent = &history[history.len().saturating_sub(self.config.window)..];
            let user = &mut users[row * d..(row + 1) * d];
            for &item in recent {
                let e = &self.item_in[item as usize * d..(item as usize + 1) * d];
                for (u, v) in user.iter_mut().zip(e) {
                    *u += v;
                }
            }
            let count = recent.len().max(1) as f32;
            user.iter_mut().for_each(|u| *u /= count);
        }
        let device = self.item_out.device();
        let users = Tensor::from_vec(users, (histories.len(), d), device)?;
        let scores = users
            .matmul(&self.item_out.t()?)?
            .broadcast_add(&self.bias)?;
        *out = scores.flatten_all()?.to_vec1::<f32>()?;
        Ok(())
    }
}
