//! Scoring a SASRec model as stored. [`StoredSasRec`] holds every weight
//! matrix in its stored scheme ([`Matrix`]: dense, `int8`, `int4`, sparse
//! or low-rank) and runs the forward pass on them directly; the fp32 model
//! is the same code with dense matrices, so every variant is timed by one
//! engine and differs only in how its weights are held.
//!
//! Only the last position's output is scored, so the last block computes
//! keys and values for the whole window but queries, the attention output,
//! the feed-forward layer and the final norm for the last position only.

use std::collections::HashMap;

use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::cpu::{LN_EPS, window_into};
use super::{PAD, SasRec, SasRecConfig};
use crate::error::{Error, Result};
use crate::model::kernels::{AttentionShape, add_bias, attention};
use crate::model::stored::{Encoded, Layout, Matrix, read_f32};
use crate::model::{
    CARD_KEY, ItemBlocks, ModelCard, SLICE_BYTES_PACKED, SLICE_BYTES_STREAMED,
    SLICE_USERS_IN_BLOCKS, Scorer,
};

/// Metadata key holding the layout of every stored matrix.
pub const LAYOUT_KEY: &str = "recdistill.layout";
/// Metadata key holding how a compressed model was made.
pub const COMPRESSION_KEY: &str = "recdistill.compression";

/// Histories run through the model at once.
const SCORE_CHUNK: usize = 64;

/// One transformer block as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredLayer {
    /// Pre-attention layer norm.
    pub ln1_g: Vec<f32>,
    /// See `ln1_g`.
    pub ln1_b: Vec<f32>,
    /// Query projection (`d` outputs × `d` inputs).
    pub wq: Matrix,
    /// Key projection.
    pub wk: Matrix,
    /// Value projection.
    pub wv: Matrix,
    /// Query, key and value biases (`3d`).
    pub bqkv: Vec<f32>,
    /// Attention output projection.
    pub wo: Matrix,
    /// Its bias.
    pub bo: Vec<f32>,
    /// Pre-feed-forward layer norm.
    pub ln2_g: Vec<f32>,
    /// See `ln2_g`.
    pub ln2_b: Vec<f32>,
    /// Feed-forward in (`ffn` outputs × `d` inputs).
    pub w1: Matrix,
    /// Its bias.
    pub b1: Vec<f32>,
    /// Feed-forward out (`d` outputs × `ffn` inputs).
    pub w2: Matrix,
    /// Its bias.
    pub b2: Vec<f32>,
}

/// A SASRec model with its weights as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSasRec {
    /// Sizes (`content_dim` is 0: content is folded into the item table).
    pub config: SasRecConfig,
    /// Item table (`n_items × d`): input embedding and output layer.
    pub item: Matrix,
    /// Position embeddings (`max_len × d`).
    pub pos: Matrix,
    /// Blocks.
    pub layers: Vec<StoredLayer>,
    /// Final layer norm.
    pub lnf_g: Vec<f32>,
    /// See `lnf_g`.
    pub lnf_b: Vec<f32>,
}

/// What a compressed artifact records about how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressionInfo {
    /// The variant (`int8`, `lowrank-16+int8`, …).
    pub variant: String,
    /// The model compressed.
    pub source: String,
    /// SHA-256 of its artifact.
    pub source_sha256: String,
    /// Recovery fine-tuning epochs run (0 for none).
    pub recovery_epochs: usize,
    /// Per step, what it did (sparsity reached, rank and energy kept, …).
    pub steps: Vec<String>,
}

/// The input-major `rows × cols` block of columns `from..from + width` of
/// `w`, as an output-major dense matrix.
fn columns(w: &[f32], rows: usize, cols: usize, from: usize, width: usize) -> Matrix {
    let mut block = Vec::with_capacity(rows * width);
    for r in 0..rows {
        block.extend_from_slice(&w[r * cols + from..r * cols + from + width]);
    }
    Matrix::from_input_major(rows, width, &block)
}

impl StoredSasRec {
    /// The dense model, its linear weights transposed to output-major and
    /// item content folded into the item table.
    pub fn from_dense(model: &SasRec) -> StoredSasRec {
        let c = model.config;
        let (d, f) = (c.d_model, c.ffn);
        let w = &model.weights;
        let layers = w
            .layers
            .iter()
            .map(|l| StoredLayer {
                ln1_g: l.ln1_g.clone(),
                ln1_b: l.ln1_b.clone(),
                wq: columns(&l.wqkv, d, 3 * d, 0, d),
                wk: columns(&l.wqkv, d, 3 * d, d, d),
                wv: columns(&l.wqkv, d, 3 * d, 2 * d, d),
                bqkv: l.bqkv.clone(),
                wo: Matrix::from_input_major(d, d, &l.wo),
                bo: l.bo.clone(),
                ln2_g: l.ln2_g.clone(),
                ln2_b: l.ln2_b.clone(),
                w1: Matrix::from_input_major(d, f, &l.w1),
                b1: l.b1.clone(),
                w2: Matrix::from_input_major(f, d, &l.w2),
                b2: l.b2.clone(),
            })
            .collect();
        StoredSasRec {
            config: SasRecConfig {
                content_dim: 0,
                ..c
            },
            item: Matrix::dense(c.n_items, d, model.item_table()),
            pos: Matrix::dense(c.max_len, d, w.pos.clone()),
            layers,
            lnf_g: w.lnf_g.clone(),
            lnf_b: w.lnf_b.clone(),
        }
    }

    /// Every matrix with its tensor name, in a fixed order.
    pub fn matrices(&self) -> Vec<(String, &Matrix)> {
        let mut out = vec![("item".to_string(), &self.item), ("pos".into(), &self.pos)];
        for (i, l) in self.layers.iter().enumerate() {
            for (n, m) in [
                ("wq", &l.wq),
                ("wk", &l.wk),
                ("wv", &l.wv),
                ("wo", &l.wo),
                ("w1", &l.w1),
                ("w2", &l.w2),
            ] {
                out.push((format!("layers.{i}.{n}"), m));
            }
        }
        out
    }

    /// Every matrix, mutable, in the order of [`StoredSasRec::matrices`].
    pub fn matrices_mut(&mut self) -> Vec<&mut Matrix> {
        let mut out = vec![&mut self.item, &mut self.pos];
        for l in &mut self.layers {
            out.extend([
                &mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w1, &mut l.w2,
            ]);
        }
        out
    }

    /// Every vector (norms, biases) with its name and length.
    pub fn vectors(&self) -> Vec<(String, &Vec<f32>)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (n, v) in [
                ("ln1_g", &l.ln1_g),
                ("ln1_b", &l.ln1_b),
                ("bqkv", &l.bqkv),
                ("bo", &l.bo),
                ("ln2_g", &l.ln2_g),
                ("ln2_b", &l.ln2_b),
                ("b1", &l.b1),
                ("b2", &l.b2),
            ] {
                out.push((format!("layers.{i}.{n}"), v));
            }
        }
        out.push(("lnf_g".into(), &self.lnf_g));
        out.push(("lnf_b".into(), &self.lnf_b));
        out
    }

    /// Weights stored (kept values of matrices, every norm and bias).
    pub fn params(&self) -> u64 {
        let m: u64 = self.matrices().iter().map(|(_, m)| m.params()).sum();
        let v: u64 = self.vectors().iter().map(|(_, v)| v.len() as u64).sum();
        m + v
    }

    /// The shapes each matrix must have for `config`.
    fn expected_shapes(config: &SasRecConfig) -> Vec<(usize, usize)> {
        let (d, f) = (config.d_model, config.ffn);
        let mut out = vec![(config.n_items, d), (config.max_len, d)];
        for _ in 0..config.layers {
            out.extend([(d, d), (d, d), (d, d), (d, d), (f, d), (d, f)]);
        }
        out
    }

    /// The safetensors file: tensors, card, layouts and (for a compressed
    /// model) how it was made.
    pub fn serialize(&self, card: &ModelCard, info: Option<&CompressionInfo>) -> Result<Vec<u8>> {
        let mut tensors: Vec<Encoded> = Vec::new();
        let mut layouts = serde_json::Map::new();
        for (name, m) in self.matrices() {
            layouts.insert(
                name.clone(),
                serde_json::to_value(m.layout()).map_err(|e| Error::internal(e.to_string()))?,
            );
            tensors.extend(m.encode(&name));
        }
        for (name, v) in self.vectors() {
            tensors.push((
                name,
                Dtype::F32,
                vec![v.len()],
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        }
        let mut metadata = HashMap::from([
            (
                CARD_KEY.to_string(),
                serde_json::to_string(card).map_err(|e| Error::internal(e.to_string()))?,
            ),
            (
                LAYOUT_KEY.to_string(),
                serde_json::Value::Object(layouts).to_string(),
            ),
        ]);
        if let Some(info) = info {
            metadata.insert(
                COMPRESSION_KEY.to_string(),
                serde_json::to_string(info).map_err(|e| Error::internal(e.to_string()))?,
            );
        }
        let mut views = Vec::with_capacity(tensors.len());
        for (name, dtype, shape, bytes) in &tensors {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map_err(|e| Error::internal(format!("tensor {name}: {e}")))?;
            views.push((name.clone(), view));
        }
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::internal(format!("serializing {}: {e}", card.name)))
    }

    /// Reads a stored model from an artifact's bytes, checking every layout
    /// against the card's config and every tensor against its layout; a
    /// tensor no layout or vector accounts for is refused too.
    pub fn decode(location: &str, card: &ModelCard, bytes: &[u8]) -> Result<StoredSasRec> {
        let bad = |msg: String| Error::data(location, format!("not a valid model artifact: {msg}"));
        let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let layouts_json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(LAYOUT_KEY))
            .ok_or_else(|| bad(format!("no {LAYOUT_KEY} entry in the metadata")))?;
        let mut layouts: HashMap<String, Layout> = serde_json::from_str(layouts_json)
            .map_err(|e| bad(format!("bad {LAYOUT_KEY}: {e}")))?;
        let config: SasRecConfig = serde_json::from_value(card.config.clone())
            .map_err(|e| bad(format!("bad sasrec config: {e}")))?;
        config
            .validate()
            .map_err(|e| bad(format!("bad sasrec config: {e}")))?;
        if config.n_items != card.n_items || config.content_dim != 0 {
            return Err(bad(
                "a stored model's config must match the card's n_items and have content folded in (content_dim 0)".into(),
            ));
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let mut tensors: HashMap<String, (Dtype, Vec<usize>, &[u8])> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data())))
            .collect();
        let names: Vec<String> = {
            let mut n = vec!["item".to_string(), "pos".to_string()];
            for i in 0..config.layers {
                for m in ["wq", "wk", "wv", "wo", "w1", "w2"] {
                    n.push(format!("layers.{i}.{m}"));
                }
            }
            n
        };
        let mut matrices = Vec::with_capacity(names.len());
        for (name, want) in names.iter().zip(StoredSasRec::expected_shapes(&config)) {
            let layout = layouts
                .remove(name)
                .ok_or_else(|| bad(format!("no layout for matrix {name}")))?;
            if layout.shape() != want {
                return Err(bad(format!(
                    "matrix {name} is {:?}, the config needs {want:?}",
                    layout.shape()
                )));
            }
            matrices.push(Matrix::decode(name, &layout, &mut tensors).map_err(bad)?);
        }
        if let Some(extra) = layouts.keys().next() {
            return Err(bad(format!("layout for unknown matrix {extra}")));
        }
        let (d, f) = (config.d_model, config.ffn);
        let mut vector = |name: String, len: usize| -> Result<Vec<f32>> {
            let (dtype, shape, data) = tensors
                .remove(&name)
                .ok_or_else(|| bad(format!("missing tensor {name}")))?;
            if dtype != Dtype::F32 || shape != [len] {
                return Err(bad(format!(
                    "tensor {name} is {dtype:?} {shape:?}, expected F32 [{len}]"
                )));
            }
            let v = read_f32(data);
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("tensor {name} holds a non-finite value")));
            }
            Ok(v)
        };
        let mut matrices = matrices.into_iter();
        let mut next = || matrices.next().expect("one matrix per name");
        let item = next();
        let pos = next();
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = |n: &str| format!("layers.{i}.{n}");
            layers.push(StoredLayer {
                wq: next(),
                wk: next(),
                wv: next(),
                wo: next(),
                w1: next(),
                w2: next(),
                ln1_g: vector(p("ln1_g"), d)?,
                ln1_b: vector(p("ln1_b"), d)?,
                bqkv: vector(p("bqkv"), 3 * d)?,
                bo: vector(p("bo"), d)?,
                ln2_g: vector(p("ln2_g"), d)?,
                ln2_b: vector(p("ln2_b"), d)?,
                b1: vector(p("b1"), f)?,
                b2: vector(p("b2"), d)?,
            });
        }
        let lnf_g = vector("lnf_g".into(), d)?;
        let lnf_b = vector("lnf_b".into(), d)?;
        if let Some(extra) = tensors.keys().next() {
            return Err(bad(format!("tensor {extra} is not part of the model")));
        }
        Ok(StoredSasRec {
            config,
            item,
            pos,
            layers,
            lnf_g,
            lnf_b,
        })
    }

    /// Each history's user vector (its window's last final hidden state,
    /// the row scored against the item table): `histories.len() × d`.
    fn user_vectors(&self, histories: &[&[u32]]) -> Vec<f32> {
        let (len, d) = (self.config.max_len, self.config.d_model);
        let mut vectors = vec![0.0; histories.len() * d];
        let mut inputs = vec![PAD; SCORE_CHUNK.min(histories.len()) * len];
        for (group, out) in histories
            .chunks(SCORE_CHUNK)
            .zip(vectors.chunks_mut(SCORE_CHUNK * d))
        {
            let b = group.len();
            for (slot, h) in inputs.chunks_mut(len).zip(group) {
                window_into(h, slot);
            }
            self.last_hidden(&inputs[..b * len], b, out);
        }
        vectors
    }

    /// Runs the model over `batch` windows (`inputs`, [`PAD`] for empty
    /// slots) and writes each window's last final hidden state into `last`
    /// (`batch × d`).
    fn last_hidden(&self, inputs: &[u32], batch: usize, last: &mut [f32]) {
        let c = &self.config;
        let (len, d) = (c.max_len, c.d_model);
        let n = batch * len;
        let valid: Vec<bool> = inputs.iter().map(|&x| x != PAD).collect();
        let mut h = vec![0.0f32; n * d];
        h.par_chunks_mut(d * len)
            .zip(inputs.par_chunks(len))
            .for_each(|(rows, window)| {
                let mut p = vec![0.0; d];
                for (t, (row, &x)) in rows.chunks_mut(d).zip(window).enumerate() {
                    if x != PAD {
                        self.item.row_into(x as usize, row);
                        self.pos.row_into(t, &mut p);
                        for (r, p) in row.iter_mut().zip(&p) {
                            *r += p;
                        }
                    }
                }
            });
        let shape = AttentionShape {
            batch,
            len,
            heads: c.heads,
            d_model: d,
        };
        let (head, tail) = self.layers.split_at(self.layers.len() - 1);
        for layer in head {
            h = full_block(layer, shape, c.ffn, &h, &valid);
        }
        last_block(&tail[0], shape, c.ffn, &h, &valid, last);
        let mut normed = vec![0.0; batch * d];
        layer_norm_rows(last, &self.lnf_g, &self.lnf_b, &mut normed);
        last.copy_from_slice(&normed);
    }
}

/// `y = LN(x)` row by row.
fn layer_norm_rows(x: &[f32], g: &[f32], b: &[f32], y: &mut [f32]) {
    let d = g.len();
    for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let mean = x.iter().sum::<f32>() / d as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let r = 1.0 / (var + LN_EPS).sqrt();
        for i in 0..d {
            y[i] = (x[i] - mean) * r * g[i] + b[i];
        }
    }
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

/// `h + FFN(LN2(h))` for the rows of `h`, in place.
fn feed_forward(layer: &StoredLayer, ffn: usize, h: &mut [f32], rows: usize) {
    let d = layer.ln2_g.len();
    let mut a = vec![0.0; rows * d];
    layer_norm_rows(h, &layer.ln2_g, &layer.ln2_b, &mut a);
    let mut z = vec![0.0; rows * ffn];
    layer.w1.apply(&a, rows, &mut z, ffn);
    add_bias(&mut z, &layer.b1);
    z.iter_mut().for_each(|v| *v = v.max(0.0));
    let mut y = vec![0.0; rows * d];
    layer.w2.apply(&z, rows, &mut y, d);
    add_bias(&mut y, &layer.b2);
    add_into(h, &y);
}

/// A block over every position.
fn full_block(
    layer: &StoredLayer,
    shape: AttentionShape,
    ffn: usize,
    h: &[f32],
    valid: &[bool],
) -> Vec<f32> {
    let d = shape.d_model;
    let n = shape.batch * shape.len;
    let mut a = vec![0.0; n * d];
    layer_norm_rows(h, &layer.ln1_g, &layer.ln1_b, &mut a);
    let mut qkv = vec![0.0; n * 3 * d];
    layer.wq.apply(&a, n, &mut qkv, 3 * d);
    layer.wk.apply(&a, n, &mut qkv[d..], 3 * d);
    layer.wv.apply(&a, n, &mut qkv[2 * d..], 3 * d);
    add_bias(&mut qkv, &layer.bqkv);
    let probs = shape.batch * shape.heads * shape.len * shape.len;
    let (mut p, mut mask) = (vec![0.0; probs], vec![0.0; probs]);
    let mut att = vec![0.0; n * d];
    attention(
        &shape.layout(),
        &qkv,
        valid,
        &mut p,
        &mut mask,
        &mut att,
        None,
    );
    let mut out = vec![0.0; n * d];
    layer.wo.apply(&att, n, &mut out, d);
    add_bias(&mut out, &layer.bo);
    add_into(&mut out, h);
    feed_forward(layer, ffn, &mut out, n);
    out
}

/// The last block, for each window's last position only: keys and values
/// over the window, one query.
fn last_block(
    layer: &StoredLayer,
    shape: AttentionShape,
    ffn: usize,
    h: &[f32],
    valid: &[bool],
    out: &mut [f32],
) {
    let (batch, len, heads, d) = (shape.batch, shape.len, shape.heads, shape.d_model);
    let n = batch * len;
    let mut a = vec![0.0; n * d];
    layer_norm_rows(h, &layer.ln1_g, &layer.ln1_b, &mut a);
    let mut kv = vec![0.0; n * 2 * d];
    layer.wk.apply(&a, n, &mut kv, 2 * d);
    layer.wv.apply(&a, n, &mut kv[d..], 2 * d);
    add_bias(&mut kv, &layer.bqkv[d..]);
    let mut a_last = vec![0.0; batch * d];
    let mut h_last = vec![0.0; batch * d];
    for b in 0..batch {
        let row = (b * len + len - 1) * d;
        a_last[b * d..(b + 1) * d].copy_from_slice(&a[row..row + d]);
        h_last[b * d..(b + 1) * d].copy_from_slice(&h[row..row + d]);
    }
    let mut q = vec![0.0; batch * d];
    layer.wq.apply(&a_last, batch, &mut q, d);
    add_bias(&mut q, &layer.bqkv[..d]);
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let mut att = vec![0.0; batch * d];
    att.par_chunks_mut(d).enumerate().for_each(|(b, att)| {
        let valid = &valid[b * len..(b + 1) * len];
        let kv = &kv[b * len * 2 * d..(b + 1) * len * 2 * d];
        let q = &q[b * d..(b + 1) * d];
        let mut w = vec![0.0f32; len];
        for hd in 0..heads {
            let span = hd * dh..(hd + 1) * dh;
            let mut max = f32::NEG_INFINITY;
            for (j, wj) in w.iter_mut().enumerate() {
                if valid[j] {
                    let k = &kv[j * 2 * d + hd * dh..j * 2 * d + (hd + 1) * dh];
                    *wj = q[span.clone()]
                        .iter()
                        .zip(k)
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        * scale;
                    max = max.max(*wj);
                }
            }
            if !max.is_finite() {
                continue;
            }
            let mut sum = 0.0;
            for (j, wj) in w.iter_mut().enumerate() {
                let z = *wj - max;
                *wj = if valid[j] && z >= -80.0 { z.exp() } else { 0.0 };
                sum += *wj;
            }
            let o = &mut att[span];
            for (j, &wj) in w.iter().enumerate() {
                if wj > 0.0 {
                    let v = &kv[j * 2 * d + d + hd * dh..j * 2 * d + d + (hd + 1) * dh];
                    for (o, v) in o.iter_mut().zip(v) {
                        *o += wj / sum * v;
                    }
                }
            }
        }
    });
    layer.wo.apply(&att, batch, out, d);
    add_bias(out, &layer.bo);
    add_into(out, &h_last);
    feed_forward(layer, ffn, out, batch);
}

impl Scorer for StoredSasRec {
    fn n_items(&self) -> usize {
        self.config.n_items
    }

    fn score(&self, histories: &[&[u32]], out: &mut Vec<f32>) -> Result<()> {
        let v = self.config.n_items;
        // Every score is overwritten below: only a growing buffer is zeroed.
        out.resize(histories.len() * v, 0.0);
        for (group, scores) in histories
            .chunks(SCORE_CHUNK)
            .zip(out.chunks_mut(SCORE_CHUNK * v))
        {
            let vectors = self.user_vectors(group);
            self.item.apply(&vectors, group.len(), scores, v);
        }
        Ok(())
    }

    fn slice_bytes(&self) -> usize {
        if self.item.streams_in_blocks() {
            SLICE_USERS_IN_BLOCKS * 4 * self.config.n_items
        } else if self.item.streams_as_stored() {
            SLICE_BYTES_STREAMED
        } else {
            SLICE_BYTES_PACKED
        }
    }

    fn item_blocks(&self, histories: &[&[u32]]) -> Result<Option<Box<dyn ItemBlocks + '_>>> {
        if !self.item.streams_in_blocks() {
            return Ok(None);
        }
        let vectors = self.user_vectors(histories);
        Ok(self
            .item
            .row_blocks(&vectors, histories.len())
            .map(|blocks| Box::new(blocks) as Box<dyn ItemBlocks + '_>))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sasrec::tests_support::random_model;

    #[test]
    fn the_stored_engine_scores_like_the_training_forward() {
        for (layers, content_dim) in [(1, 0), (2, 0), (2, 3)] {
            let m = random_model(layers, content_dim);
            let histories: Vec<Vec<u32>> = (0..70)
                .map(|u| (0..u % 9 + 1).map(|t| ((u * 3 + t) % 13) as u32).collect())
                .collect();
            let refs: Vec<&[u32]> = histories.iter().map(|h| h.as_slice()).collect();
            let mut want = Vec::new();
            m.score(&refs, &mut want).unwrap();
            let stored = StoredSasRec::from_dense(&m);
            let mut got = Vec::new();
            stored.score(&refs, &mut got).unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4 * w.abs().max(1.0), "{g} vs {w}");
            }
        }
    }

    /// An integer item table's blocks hold the bits `score` gives, for any
    /// users and any range of items from a granule on; other tables (dense,
    /// `int4` with several scales a row) have no blocks.
    #[test]
    fn item_blocks_score_like_whole_rows() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let n = 300;
        let config = SasRecConfig {
            n_items: n,
            d_model: 8,
            layers: 1,
            heads: 2,
            ffn: 16,
            max_len: 5,
            dropout: 0.1,
            content_dim: 0,
        };
        let dense = StoredSasRec::from_dense(&SasRec::new(config, Vec::new(), 3).unwrap());
        let histories: Vec<&[u32]> = vec![&[1, 2, 3], &[250, 7], &[299], &[4, 5, 6, 7, 8, 9, 10]];
        assert!(dense.item_blocks(&histories).unwrap().is_none());
        let (r, c, d) = (dense.item.rows(), dense.item.cols(), dense.item.to_dense());
        let mut rng = StdRng::seed_from_u64(1);
        for item in [
            Matrix::quantize_int8(r, c, &d),
            Matrix::quantize_int4(r, c, c, &d),
        ] {
            let stored = StoredSasRec {
                item,
                ..dense.clone()
            };
            let mut whole = Vec::new();
            stored.score(&histories, &mut whole).unwrap();
            let blocks = stored
                .item_blocks(&histories)
                .unwrap()
                .expect("an integer table");
            assert_eq!(blocks.users(), histories.len());
            let g = blocks.granule();
            for _ in 0..50 {
                let start = rng.random_range(0..n.div_ceil(g)) * g;
                let end = rng.random_range(start + 1..=n);
                let first = rng.random_range(0..histories.len());
                let users = first..rng.random_range(first + 1..=histories.len());
                let width = end - start;
                let mut out = vec![f32::NAN; users.len() * width];
                blocks.scores(users.clone(), start..end, &mut out);
                for (row, u) in users.enumerate() {
                    for j in start..end {
                        let (got, want) = (out[row * width + j - start], whole[u * n + j]);
                        assert_eq!(got.to_bits(), want.to_bits(), "user {u}, item {j}");
                    }
                }
            }
        }
        let grouped = StoredSasRec {
            item: Matrix::quantize_int4(r, c, c / 2, &d),
            ..dense.clone()
        };
        assert!(grouped.item_blocks(&histories).unwrap().is_none());
    }

    fn compressed_artifact() -> crate::model::ModelArtifact {
        let m = random_model(2, 0);
        let mut stored = StoredSasRec::from_dense(&m);
        let dense = |m: &Matrix| (m.rows(), m.cols(), m.to_dense());
        let (r, c, d) = dense(&stored.item);
        stored.item = Matrix::quantize_int4(r, c, 4, &d);
        let (r, c, d) = dense(&stored.layers[0].wq);
        let sparse: Vec<f32> = d
            .iter()
            .enumerate()
            .map(|(i, v)| if i % 2 == 0 { *v } else { 0.0 })
            .collect();
        stored.layers[0].wq = Matrix::sparsify(r, c, &sparse, true);
        let (r, c, d) = dense(&stored.layers[1].w1);
        stored.layers[1].w1 = Matrix::LowRank {
            u: Box::new(Matrix::quantize_int8(r, 3, &d[..r * 3])),
            v: Box::new(Matrix::dense(3, c, d[..3 * c].to_vec())),
        };
        let (r, c, d) = dense(&stored.layers[1].wo);
        // Product-quantized, rows 1 and 5 kept whole (int4).
        let Matrix::Pq {
            codes, codebook, ..
        } = Matrix::quantize_pq(r, c, 4, &d, 1)
        else {
            unreachable!()
        };
        let kept: Vec<f32> = [1, 5]
            .iter()
            .flat_map(|&j| d[j * c..(j + 1) * c].to_vec())
            .collect();
        stored.layers[1].wo = Matrix::Pq {
            rows: r,
            cols: c,
            subspaces: 4,
            codes,
            codebook,
            head: Some(
                crate::model::stored::PqHead::new(
                    vec![1, 5],
                    Matrix::quantize_int4(2, c, 4, &kept),
                    r,
                )
                .unwrap(),
            ),
        };
        let (r, c, d) = dense(&stored.pos);
        stored.pos = Matrix::quantize_int8(r, c, &d);
        let card = m
            .to_artifact("s@mixed", "student", "kd-teacher", "ce+kl", None)
            .unwrap()
            .card;
        crate::model::ModelArtifact::from_stored(card, &stored, None).unwrap()
    }

    #[test]
    fn compressed_artifacts_round_trip_and_score_as_their_dequantized_selves() {
        let a = compressed_artifact();
        let parsed = crate::model::ModelArtifact::parse("x", a.bytes.clone()).unwrap();
        assert_eq!(parsed.params, a.params);
        let stored = parsed.stored_sasrec().unwrap();
        // The same model with every matrix expanded to f32 scores alike
        // (up to the int8 rounding of activations).
        let mut dense = stored.clone();
        for m in dense.matrices_mut() {
            *m = Matrix::dense(m.rows(), m.cols(), m.to_dense());
        }
        let histories: Vec<&[u32]> = vec![&[1, 2, 3], &[4, 5, 6, 7, 8, 9, 10], &[12]];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        stored.score(&histories, &mut a).unwrap();
        dense.score(&histories, &mut b).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 0.05 * y.abs().max(1.0), "{x} vs {y}");
        }
    }

    /// Random damage to a compressed file: every outcome is a clean refusal
    /// (exit 3) or a model that still scores; never a panic.
    #[test]
    fn damaged_compressed_artifacts_never_panic() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let good = compressed_artifact().bytes.to_vec();
        let header = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let mut rng = StdRng::seed_from_u64(5);
        let (mut refused, mut accepted) = (0, 0);
        for case in 0..3000 {
            let mut bytes = good.clone();
            match case % 4 {
                // Flip bytes in the JSON header (names, dtypes, shapes, offsets, layouts).
                0 | 1 => {
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(8..8 + header);
                        bytes[at] = match rng.random_range(0..3) {
                            0 => rng.random(),
                            1 => b"0123456789"[rng.random_range(0..10)],
                            _ => bytes[at] ^ (1 << rng.random_range(0..8)),
                        };
                    }
                }
                // Flip bytes in the tensor data (scales, indices, nibbles).
                2 => {
                    for _ in 0..rng.random_range(1..8) {
                        let at = rng.random_range(8 + header..bytes.len());
                        bytes[at] = rng.random();
                    }
                }
                // Truncate or extend.
                _ => {
                    let len = rng.random_range(0..bytes.len() + 64);
                    bytes.resize(len, 0xff);
                }
            }
            match crate::model::ModelArtifact::parse("damaged", bytes::Bytes::from(bytes)) {
                Ok(a) => {
                    accepted += 1;
                    let scorer = a.scorer(13).or_else(|_| a.scorer(a.card.n_items));
                    if let Ok(s) = scorer {
                        let mut out = Vec::new();
                        let _ = s.score(&[&[1, 2]], &mut out);
                    }
                }
                Err(e) => {
                    refused += 1;
                    assert_eq!(e.exit_code(), 3, "{e}");
                }
            }
        }
        assert!(
            refused > 1000 && accepted > 100,
            "{refused} refused, {accepted} accepted"
        );
    }
}
