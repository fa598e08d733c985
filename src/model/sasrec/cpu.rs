//! The CPU forward and backward passes of [`SasRec`], hand-written over a
//! [`Workspace`] of buffers allocated once per batch shape and reused every
//! step (no allocation, no autograd graph, no gradients for constants).

use rayon::prelude::*;

use super::{PAD, SasRec, SasRecConfig, Weights};
use crate::model::kernels::{
    AttentionLayout, DropSite, View, add_bias, add_column_sums, apply_mask, attention,
    attention_backward, bias_dropout_residual, bias_relu_dropout, layer_norm, layer_norm_backward,
    masked_copy, matmul, par_all, relu_dropout_backward, site_factors,
};

/// Layer norm epsilon (as PyTorch's default).
pub const LN_EPS: f32 = 1e-5;

/// Activations of one block kept for the backward pass.
#[derive(Debug, Clone)]
struct LayerCache {
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    a1: Vec<f32>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    pmask: Vec<f32>,
    att: Vec<f32>,
    ymask: Vec<f32>,
    hmid: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
    a2: Vec<f32>,
    z1: Vec<f32>,
    f: Vec<f32>,
    fmask: Vec<f32>,
    y2mask: Vec<f32>,
}

impl LayerCache {
    fn new(n: usize, c: &SasRecConfig, batch: usize) -> LayerCache {
        let (d, f) = (c.d_model, c.ffn);
        let p = batch * c.heads * c.max_len * c.max_len;
        LayerCache {
            xhat1: vec![0.0; n * d],
            rstd1: vec![0.0; n],
            a1: vec![0.0; n * d],
            qkv: vec![0.0; n * 3 * d],
            probs: vec![0.0; p],
            pmask: vec![0.0; p],
            att: vec![0.0; n * d],
            ymask: vec![0.0; n * d],
            hmid: vec![0.0; n * d],
            xhat2: vec![0.0; n * d],
            rstd2: vec![0.0; n],
            a2: vec![0.0; n * d],
            z1: vec![0.0; n * f],
            f: vec![0.0; n * f],
            fmask: vec![0.0; n * f],
            y2mask: vec![0.0; n * d],
        }
    }
}

/// Marks a window position without a row in [`Workspace::row_of`].
const NO_ROW: u32 = u32::MAX;

/// Buffers for batches of up to `batch` sequences. A forward pass computes
/// one row per window position that holds an item, plus each window's last
/// position (so an empty window still has a last hidden state): padding
/// positions are never computed.
#[derive(Debug, Clone)]
pub struct Workspace {
    batch: usize,
    len: usize,
    d: usize,
    /// Each sequence's rows.
    layout: AttentionLayout,
    /// Per row: whether it holds an item, its window position
    /// (`sequence · max_len + t`) and its item.
    valid: Vec<bool>,
    positions: Vec<usize>,
    items: Vec<u32>,
    /// Per window position: its row, or [`NO_ROW`].
    row_of: Vec<u32>,
    /// Hidden states entering each block, and leaving the last one.
    h: Vec<Vec<f32>>,
    in_mask: Vec<f32>,
    layers: Vec<LayerCache>,
    xhatf: Vec<f32>,
    rstdf: Vec<f32>,
    /// Final hidden states, one `d`-wide row per computed position
    /// ([`Workspace::row_of`] finds a position's row).
    pub hf: Vec<f32>,
    // Backward scratch.
    dh: Vec<f32>,
    dtmp: Vec<f32>,
    dqkv: Vec<f32>,
    datt: Vec<f32>,
    df: Vec<f32>,
    /// Gradient of the loss w.r.t. the final hidden states (rows as `hf`).
    pub dhf: Vec<f32>,
}

impl Workspace {
    /// Buffers for up to `batch` sequences of `config.max_len` positions.
    pub fn new(config: &SasRecConfig, batch: usize) -> Workspace {
        let n = batch * config.max_len;
        let d = config.d_model;
        Workspace {
            batch,
            len: config.max_len,
            d,
            layout: AttentionLayout::new(config.heads, d),
            valid: Vec::with_capacity(n),
            positions: Vec::with_capacity(n),
            items: Vec::with_capacity(n),
            row_of: vec![NO_ROW; n],
            h: vec![vec![0.0; n * d]; config.layers + 1],
            in_mask: vec![0.0; n * d],
            layers: (0..config.layers)
                .map(|_| LayerCache::new(n, config, batch))
                .collect(),
            xhatf: vec![0.0; n * d],
            rstdf: vec![0.0; n],
            hf: vec![0.0; n * d],
            dh: vec![0.0; n * d],
            dtmp: vec![0.0; n * d],
            dqkv: vec![0.0; n * 3 * d],
            datt: vec![0.0; n * d],
            df: vec![0.0; n * config.ffn],
            dhf: vec![0.0; n * d],
        }
    }

    /// Sequences the workspace holds at most.
    pub fn capacity(&self) -> usize {
        self.batch
    }

    /// Rows the last forward pass computed.
    pub fn rows(&self) -> usize {
        self.layout.rows()
    }

    /// The row of window position `position` (`sequence · max_len + t`)
    /// in the last forward pass: `None` for a padding position.
    pub fn row_of(&self, position: usize) -> Option<usize> {
        self.row_of
            .get(position)
            .filter(|&&r| r != NO_ROW)
            .map(|&r| r as usize)
    }

    /// The final hidden state of window position `position` in the last
    /// forward pass (`None` for a padding position).
    pub fn hidden(&self, position: usize) -> Option<&[f32]> {
        let d = self.d;
        self.row_of(position).map(|r| &self.hf[r * d..(r + 1) * d])
    }

    /// The final hidden state of sequence `sequence`'s last position in the
    /// last forward pass (every sequence has one).
    pub fn last_hidden(&self, sequence: usize) -> &[f32] {
        let d = self.d;
        let r = self.row_of[sequence * self.len + self.len - 1] as usize;
        &self.hf[r * d..(r + 1) * d]
    }

    /// Lays out the rows of `batch` windows of `inputs`: the positions
    /// holding an item and each window's last position.
    fn lay_out(&mut self, inputs: &[u32], batch: usize) {
        let len = self.len;
        self.layout.clear();
        self.valid.clear();
        self.positions.clear();
        self.items.clear();
        self.row_of.fill(NO_ROW);
        for b in 0..batch {
            let first = self.positions.len();
            for t in 0..len {
                let at = b * len + t;
                let x = inputs[at];
                if x != PAD || t == len - 1 {
                    self.row_of[at] = self.positions.len() as u32;
                    self.positions.push(at);
                    self.items.push(x);
                    self.valid.push(x != PAD);
                }
            }
            self.layout.push(self.positions.len() - first);
        }
    }
}

/// Adds each item's projected content vector (`content · W_c + b_c`) to the
/// rows of `table` (`n_items × d`). Does nothing without content.
pub fn add_content(config: &SasRecConfig, weights: &Weights, content: &[f32], table: &mut [f32]) {
    let (c, d, v) = (config.content_dim, config.d_model, config.n_items);
    if c == 0 {
        return;
    }
    matmul(
        table,
        d,
        View::rm(content, v, c),
        View::rm(&weights.content_w, c, d),
        true,
        1.0,
        par_all(),
    );
    add_bias(table, &weights.content_b);
}

/// Dropout site numbers: each dropout draws from its own stream.
fn site(layer: usize, which: u64) -> u64 {
    1 + layer as u64 * 4 + which
}

/// Runs the model over `batch` sequences of `max_len` item indices
/// (`inputs`, [`PAD`] for empty slots), leaving the final hidden states in
/// `ws.hf` ([`Workspace::hidden`], [`Workspace::last_hidden`]): only the
/// positions holding an item, and each window's last, are computed.
/// `table` is the item table ([`SasRec::item_table`]). With `dropout_seed`,
/// dropout is on (training), drawn reproducibly from it.
pub fn forward(
    model: &SasRec,
    table: &[f32],
    ws: &mut Workspace,
    inputs: &[u32],
    batch: usize,
    dropout_seed: Option<u64>,
) {
    let c = &model.config;
    let w = &model.weights;
    let (len, d, f) = (c.max_len, c.d_model, c.ffn);
    assert!(
        batch <= ws.batch && inputs.len() == batch * len,
        "batch does not fit the workspace"
    );
    let p = if dropout_seed.is_some() {
        c.dropout
    } else {
        0.0
    };
    let seed = dropout_seed.unwrap_or(0);

    ws.lay_out(inputs, batch);
    let n = ws.layout.rows();
    {
        let drop = DropSite::new(p, seed, 0);
        let (items, positions) = (&ws.items, &ws.positions);
        ws.h[0][..n * d]
            .par_chunks_mut(d)
            .zip(ws.in_mask[..n * d].par_chunks_mut(d))
            .enumerate()
            .for_each(|(i, (row, mask))| {
                site_factors(drop, i, 0, mask);
                let x = items[i];
                if x == PAD {
                    row.fill(0.0);
                } else {
                    let t = positions[i] % len;
                    let e = &table[x as usize * d..(x as usize + 1) * d];
                    let pos = &w.pos[t * d..(t + 1) * d];
                    for k in 0..d {
                        row[k] = (e[k] + pos[k]) * mask[k];
                    }
                }
            });
    }

    for (l, lw) in w.layers.iter().enumerate() {
        let (before, after) = ws.h.split_at_mut(l + 1);
        let h_in = &before[l][..n * d];
        let h_out = &mut after[0][..n * d];
        let cache = &mut ws.layers[l];
        let valid = &ws.valid[..n];

        layer_norm(
            h_in,
            &lw.ln1_g,
            &lw.ln1_b,
            LN_EPS,
            &mut cache.a1[..n * d],
            &mut cache.xhat1[..n * d],
            &mut cache.rstd1[..n],
        );
        let qkv = &mut cache.qkv[..n * 3 * d];
        matmul(
            qkv,
            3 * d,
            View::rm(&cache.a1[..n * d], n, d),
            View::rm(&lw.wqkv, d, 3 * d),
            false,
            1.0,
            par_all(),
        );
        add_bias(qkv, &lw.bqkv);
        let pn = ws.layout.prob_values();
        attention(
            &ws.layout,
            &cache.qkv[..n * 3 * d],
            valid,
            &mut cache.probs[..pn],
            &mut cache.pmask[..pn],
            &mut cache.att[..n * d],
            DropSite::new(p, seed, site(l, 0)),
        );
        // hmid = h_in + dropout(att · Wo + bo)
        let hmid = &mut cache.hmid[..n * d];
        matmul(
            hmid,
            d,
            View::rm(&cache.att[..n * d], n, d),
            View::rm(&lw.wo, d, d),
            false,
            1.0,
            par_all(),
        );
        bias_dropout_residual(
            hmid,
            &lw.bo,
            &mut cache.ymask[..n * d],
            h_in,
            DropSite::new(p, seed, site(l, 1)),
        );

        layer_norm(
            hmid,
            &lw.ln2_g,
            &lw.ln2_b,
            LN_EPS,
            &mut cache.a2[..n * d],
            &mut cache.xhat2[..n * d],
            &mut cache.rstd2[..n],
        );
        let z1 = &mut cache.z1[..n * f];
        matmul(
            z1,
            f,
            View::rm(&cache.a2[..n * d], n, d),
            View::rm(&lw.w1, d, f),
            false,
            1.0,
            par_all(),
        );
        bias_relu_dropout(
            z1,
            &lw.b1,
            &mut cache.f[..n * f],
            &mut cache.fmask[..n * f],
            DropSite::new(p, seed, site(l, 2)),
        );
        // h_out = hmid + dropout(f · W2 + b2)
        matmul(
            h_out,
            d,
            View::rm(&cache.f[..n * f], n, f),
            View::rm(&lw.w2, f, d),
            false,
            1.0,
            par_all(),
        );
        bias_dropout_residual(
            h_out,
            &lw.b2,
            &mut cache.y2mask[..n * d],
            &cache.hmid[..n * d],
            DropSite::new(p, seed, site(l, 3)),
        );
    }
    layer_norm(
        &ws.h[c.layers][..n * d],
        &w.lnf_g,
        &w.lnf_b,
        LN_EPS,
        &mut ws.hf[..n * d],
        &mut ws.xhatf[..n * d],
        &mut ws.rstdf[..n],
    );
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(a, x)| {
            for (a, x) in a.iter_mut().zip(x) {
                *a += x;
            }
        });
}

/// Back-propagates `ws.dhf` (∂loss/∂final hidden states, set by the caller
/// for the rows of the last [`forward`]) through that forward pass. Adds the
/// weight gradients to `grads` and the item-table gradient of its inputs to
/// the rows of `d_table` (`n_items × d`) that the inputs name.
pub fn backward(model: &SasRec, ws: &mut Workspace, grads: &mut Weights, d_table: &mut [f32]) {
    let c = &model.config;
    let w = &model.weights;
    let (len, d, f) = (c.max_len, c.d_model, c.ffn);
    let n = ws.layout.rows();

    layer_norm_backward(
        &ws.dhf[..n * d],
        &ws.xhatf[..n * d],
        &ws.rstdf[..n],
        &w.lnf_g,
        &mut ws.dh[..n * d],
        false,
        &mut grads.lnf_g,
        &mut grads.lnf_b,
    );
    for l in (0..c.layers).rev() {
        let lw = &w.layers[l];
        let lg = &mut grads.layers[l];
        let cache = &ws.layers[l];
        // Feed-forward branch: h_out = hmid + mask2 ⊙ (f · W2 + b2).
        let dy2 = &mut ws.dtmp[..n * d];
        masked_copy(dy2, &ws.dh[..n * d], &cache.y2mask[..n * d]);
        matmul(
            &mut lg.w2,
            d,
            View::rm(&cache.f[..n * f], n, f).t(),
            View::rm(dy2, n, d),
            true,
            1.0,
            par_all(),
        );
        add_column_sums(&mut lg.b2, dy2);
        let df = &mut ws.df[..n * f];
        matmul(
            df,
            f,
            View::rm(dy2, n, d),
            View::rm(&lw.w2, f, d).t(),
            false,
            1.0,
            par_all(),
        );
        relu_dropout_backward(df, &cache.fmask[..n * f], &cache.z1[..n * f]);
        matmul(
            &mut lg.w1,
            f,
            View::rm(&cache.a2[..n * d], n, d).t(),
            View::rm(df, n, f),
            true,
            1.0,
            par_all(),
        );
        add_column_sums(&mut lg.b1, df);
        // d a2 = df · W1ᵀ, then through LN2 into dh (which already holds ∂/∂hmid via the residual).
        let da2 = &mut ws.datt[..n * d];
        matmul(
            da2,
            d,
            View::rm(df, n, f),
            View::rm(&lw.w1, d, f).t(),
            false,
            1.0,
            par_all(),
        );
        layer_norm_backward(
            da2,
            &cache.xhat2[..n * d],
            &cache.rstd2[..n],
            &lw.ln2_g,
            &mut ws.dh[..n * d],
            true,
            &mut lg.ln2_g,
            &mut lg.ln2_b,
        );
        // Attention branch: hmid = h_in + mask ⊙ (att · Wo + bo).
        let dy = &mut ws.dtmp[..n * d];
        masked_copy(dy, &ws.dh[..n * d], &cache.ymask[..n * d]);
        matmul(
            &mut lg.wo,
            d,
            View::rm(&cache.att[..n * d], n, d).t(),
            View::rm(dy, n, d),
            true,
            1.0,
            par_all(),
        );
        add_column_sums(&mut lg.bo, dy);
        let datt = &mut ws.datt[..n * d];
        matmul(
            datt,
            d,
            View::rm(dy, n, d),
            View::rm(&lw.wo, d, d).t(),
            false,
            1.0,
            par_all(),
        );
        let pn = ws.layout.prob_values();
        attention_backward(
            &ws.layout,
            &cache.qkv[..n * 3 * d],
            &cache.probs[..pn],
            &cache.pmask[..pn],
            datt,
            &mut ws.dqkv[..n * 3 * d],
        );
        let dqkv = &ws.dqkv[..n * 3 * d];
        matmul(
            &mut lg.wqkv,
            3 * d,
            View::rm(&cache.a1[..n * d], n, d).t(),
            View::rm(dqkv, n, 3 * d),
            true,
            1.0,
            par_all(),
        );
        add_column_sums(&mut lg.bqkv, dqkv);
        let da1 = &mut ws.dtmp[..n * d];
        matmul(
            da1,
            d,
            View::rm(dqkv, n, 3 * d),
            View::rm(&lw.wqkv, d, 3 * d).t(),
            false,
            1.0,
            par_all(),
        );
        layer_norm_backward(
            da1,
            &cache.xhat1[..n * d],
            &cache.rstd1[..n],
            &lw.ln1_g,
            &mut ws.dh[..n * d],
            true,
            &mut lg.ln1_g,
            &mut lg.ln1_b,
        );
    }
    // Input: h0 = dropout(table[x] + pos[t]) for real items, 0 for padding.
    apply_mask(&mut ws.dh[..n * d], &ws.in_mask[..n * d]);
    for (i, &x) in ws.items.iter().enumerate() {
        if x == PAD {
            continue;
        }
        let g = &ws.dh[i * d..(i + 1) * d];
        let t = ws.positions[i] % len;
        for k in 0..d {
            d_table[x as usize * d + k] += g[k];
            grads.pos[t * d + k] += g[k];
        }
    }
}

/// Adds the gradient of the item table (`d_table`, rows `rows` or all rows
/// when `None`) to the id embedding and content projection gradients.
pub fn table_backward(
    config: &SasRecConfig,
    content: &[f32],
    d_table: &[f32],
    rows: Option<&[u32]>,
    grads: &mut Weights,
) {
    let d = config.d_model;
    let cd = config.content_dim;
    match rows {
        None => {
            add_into(&mut grads.item, d_table);
            if cd > 0 {
                matmul(
                    &mut grads.content_w,
                    d,
                    View::rm(content, config.n_items, cd).t(),
                    View::rm(d_table, config.n_items, d),
                    true,
                    1.0,
                    par_all(),
                );
                add_column_sums(&mut grads.content_b, d_table);
            }
        }
        Some(rows) => {
            for &r in rows {
                let r = r as usize;
                let g = &d_table[r * d..(r + 1) * d];
                add_scaled(&mut grads.item[r * d..(r + 1) * d], g, 1.0);
                if cd > 0 {
                    for (ci, &cv) in content[r * cd..(r + 1) * cd].iter().enumerate() {
                        if cv != 0.0 {
                            add_scaled(&mut grads.content_w[ci * d..(ci + 1) * d], g, cv);
                        }
                    }
                    add_scaled(&mut grads.content_b, g, 1.0);
                }
            }
        }
    }
}

/// `acc += scale · x`.
fn add_scaled(acc: &mut [f32], x: &[f32], scale: f32) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += scale * v;
    }
}

/// Right-aligns the last `max_len` items of `history` into `slot`, padding
/// the front with [`PAD`].
pub fn window_into(history: &[u32], slot: &mut [u32]) {
    let len = slot.len();
    let recent = &history[history.len().saturating_sub(len)..];
    let pad = len - recent.len();
    slot[..pad].fill(PAD);
    slot[pad..].copy_from_slice(recent);
}

/// Histories run through the model at once when scoring: bounds the
/// forward pass's buffers whatever batch the caller scores.
const SCORE_CHUNK: usize = 64;

/// Scores every item for each history: the last position's final hidden
/// state · the item table. Writes `histories.len() × n_items` values.
pub fn score(model: &SasRec, table: &[f32], histories: &[&[u32]], out: &mut Vec<f32>) {
    let c = &model.config;
    let (len, d, v) = (c.max_len, c.d_model, c.n_items);
    let b = histories.len();
    out.clear();
    out.resize(b * v, 0.0);
    if b == 0 {
        return;
    }
    let chunk = b.min(SCORE_CHUNK);
    let mut inputs = vec![PAD; chunk * len];
    let mut ws = Workspace::new(c, chunk);
    let mut last = vec![0.0f32; b * d];
    for (n, group) in histories.chunks(chunk).enumerate() {
        let g = group.len();
        for (slot, h) in inputs.chunks_mut(len).zip(group) {
            window_into(h, slot);
        }
        forward(model, table, &mut ws, &inputs[..g * len], g, None);
        for i in 0..g {
            let at = (n * chunk + i) * d;
            last[at..at + d].copy_from_slice(ws.last_hidden(i));
        }
    }
    matmul(
        out,
        v,
        View::rm(&last, b, d),
        View::rm(table, v, d).t(),
        false,
        1.0,
        par_all(),
    );
}
