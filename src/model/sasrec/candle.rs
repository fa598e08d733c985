//! SASRec in candle's autograd: the same model as [`super::cpu`], built from
//! generic tensor ops so it runs on any candle device. The candle trainer
//! (`train::candle`) trains it on GPUs (`--features cuda`); here it is also
//! the oracle the CPU gradients are tested against.

use candle_core::{D, Device, IndexOp, Tensor, Var};

use super::cpu::LN_EPS;
use super::{PAD, SasRec, SasRecConfig, Weights};
use crate::error::{Error, Result};

/// The model's weights as candle variables on one device.
pub struct CandleSasRec {
    /// Sizes.
    pub config: SasRecConfig,
    /// One variable per tensor, in the order of [`Weights::named`].
    pub vars: Vec<Var>,
    content: Option<Tensor>,
    device: Device,
}

impl CandleSasRec {
    /// Copies `model`'s weights to `device` as variables.
    pub fn from_model(model: &SasRec, device: &Device) -> Result<CandleSasRec> {
        let vars = model
            .weights
            .named(&model.config)
            .into_iter()
            .map(|(_, shape, data)| Var::from_tensor(&Tensor::from_slice(data, shape, device)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let content = if model.config.content_dim > 0 {
            Some(Tensor::from_slice(
                &model.content,
                (model.config.n_items, model.config.content_dim),
                device,
            )?)
        } else {
            None
        };
        Ok(CandleSasRec {
            config: model.config,
            vars,
            content,
            device: device.clone(),
        })
    }

    /// Reads the variables back into `model`'s weights.
    pub fn store_into(&self, model: &mut SasRec) -> Result<()> {
        for (slot, var) in model.weights.tensors_mut().into_iter().zip(&self.vars) {
            *slot = var
                .as_tensor()
                .flatten_all()?
                .to_device(&Device::Cpu)?
                .to_vec1::<f32>()?;
        }
        Ok(())
    }

    /// The gradients of `loss` (computed from these variables) by
    /// autograd, in the shape of [`Weights`]; zeros where a variable takes
    /// no part in it.
    pub fn gradients_of(&self, loss: &Tensor) -> Result<Weights> {
        let grads = loss.backward()?;
        let mut w = Weights::zeros(&self.config);
        for (slot, var) in w.tensors_mut().into_iter().zip(&self.vars) {
            if let Some(g) = grads.get(var.as_tensor()) {
                *slot = g.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
            }
        }
        Ok(w)
    }

    fn var(&self, i: usize) -> &Tensor {
        self.vars[i].as_tensor()
    }

    /// The item table: id embedding plus projected content.
    pub fn item_table(&self) -> Result<Tensor> {
        let item = self.var(0);
        match &self.content {
            None => Ok(item.clone()),
            Some(content) => {
                let n = self.vars.len();
                let projected = content
                    .matmul(self.var(n - 2))?
                    .broadcast_add(self.var(n - 1))?;
                Ok((item + projected)?)
            }
        }
    }

    /// Final hidden states (`batch × max_len × d`) of `inputs` (`batch ×
    /// max_len`, [`PAD`] for empty slots); dropout when `train`.
    pub fn hidden(
        &self,
        table: &Tensor,
        inputs: &[u32],
        batch: usize,
        train: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (len, d, heads) = (c.max_len, c.d_model, c.heads);
        let dh = d / heads;
        let dev = &self.device;
        let ids: Vec<u32> = inputs
            .iter()
            .map(|&x| if x == PAD { 0 } else { x })
            .collect();
        let valid: Vec<f32> = inputs
            .iter()
            .map(|&x| f32::from(u8::from(x != PAD)))
            .collect();
        let ids = Tensor::from_vec(ids, batch * len, dev)?;
        let valid_t = Tensor::from_vec(valid.clone(), (batch, len, 1), dev)?;
        let pos = self.var(1);
        let mut h = table
            .index_select(&ids, 0)?
            .reshape((batch, len, d))?
            .broadcast_add(pos)?
            .broadcast_mul(&valid_t)?;
        h = self.dropout(&h, train)?;
        // Additive mask: 0 where query i may see key j (j ≤ i, j not padding).
        let mut mask = vec![0f32; batch * len * len];
        for b in 0..batch {
            for i in 0..len {
                for j in 0..len {
                    if j > i || valid[b * len + j] == 0.0 {
                        mask[(b * len + i) * len + j] = -1e9;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (batch, 1, len, len), dev)?;
        let per_layer = 12;
        for l in 0..c.layers {
            let v = |k: usize| self.var(2 + l * per_layer + k);
            let a1 = layer_norm(&h, v(0), v(1))?;
            let qkv = a1.broadcast_matmul(v(2))?.broadcast_add(v(3))?;
            let split = |i: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(D::Minus1, i * d, d)?
                    .reshape((batch, len, heads, dh))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, vv) = (split(0)?, split(1)?, split(2)?);
            let scores = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?.broadcast_add(&mask)?;
            // `softmax_last_dim` has no backward pass; the generic softmax does.
            let probs = self.dropout(&candle_nn::ops::softmax(&scores, D::Minus1)?, train)?;
            let att = probs
                .matmul(&vv)?
                .transpose(1, 2)?
                .reshape((batch, len, d))?;
            let y = att.broadcast_matmul(v(4))?.broadcast_add(v(5))?;
            let hmid = (&h + self.dropout(&y, train)?)?;
            let a2 = layer_norm(&hmid, v(6), v(7))?;
            let f = a2.broadcast_matmul(v(8))?.broadcast_add(v(9))?.relu()?;
            let f = self.dropout(&f, train)?;
            let y2 = f.broadcast_matmul(v(10))?.broadcast_add(v(11))?;
            h = (hmid + self.dropout(&y2, train)?)?;
        }
        let base = 2 + c.layers * per_layer;
        Ok(layer_norm(&h, self.var(base), self.var(base + 1))?)
    }

    fn dropout(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if train && self.config.dropout > 0.0 {
            candle_nn::ops::dropout(x, self.config.dropout)
        } else {
            Ok(x.clone())
        }
    }

    /// Mean full-softmax cross-entropy over the positions whose target is
    /// not [`PAD`].
    pub fn loss(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
        train: bool,
    ) -> Result<Tensor> {
        let d = self.config.d_model;
        let table = self.item_table()?;
        let hidden = self
            .hidden(&table, inputs, batch, train)?
            .reshape((batch * self.config.max_len, d))?;
        let rows: Vec<u32> = (0..targets.len() as u32)
            .filter(|&i| targets[i as usize] != PAD)
            .collect();
        if rows.is_empty() {
            return Err(Error::internal("a training batch without targets"));
        }
        let labels: Vec<u32> = rows.iter().map(|&r| targets[r as usize]).collect();
        let rows = Tensor::from_vec(rows, labels.len(), &self.device)?;
        let labels = Tensor::from_vec(labels, rows.dims1()?, &self.device)?;
        let logits = hidden.index_select(&rows, 0)?.matmul(&table.t()?)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &labels)?)
    }

    /// Scores of every item for each sequence's last position.
    pub fn score_last(&self, inputs: &[u32], batch: usize) -> Result<Tensor> {
        let table = self.item_table()?;
        let hidden = self.hidden(&table, inputs, batch, false)?;
        let last = hidden.i((.., self.config.max_len - 1, ..))?.contiguous()?;
        Ok(last.matmul(&table.t()?)?)
    }

    /// The device the variables live on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + LN_EPS as f64)?.sqrt()?)?;
    normed.broadcast_mul(gamma)?.broadcast_add(beta)
}

/// Gradients of the mean cross-entropy (no dropout) by candle's autograd,
/// in the shape of [`Weights`]; with the loss.
pub fn gradients(
    model: &SasRec,
    inputs: &[u32],
    targets: &[u32],
    batch: usize,
) -> Result<(f32, Weights)> {
    let candle = CandleSasRec::from_model(model, &Device::Cpu)?;
    let loss = candle.loss(inputs, targets, batch, false)?;
    let grads = candle.gradients_of(&loss)?;
    Ok((loss.to_scalar::<f32>()?, grads))
}
