//! Numeric kernels of the CPU transformer, each with its backward: matrix
//! products (the `gemm` crate, which candle's CPU backend also uses), layer
//! norm, causal multi-head attention, dropout masks and the blocked
//! softmax–cross-entropy over the item table. They work on preallocated
//! row-major `f32` buffers and never allocate per call in the hot paths.

use gemm::Parallelism;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// A read-only matrix view: `rows × cols` with element `(r, c)` at
/// `data[r * rs + c * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl<'a> View<'a> {
    /// A row-major `rows × cols` matrix in `data`.
    pub fn rm(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View::strided(data, rows, cols, cols)
    }

    /// Row-major with a row stride of `ld` (a column block of a wider matrix).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> View<'a> {
        let v = View {
            data,
            rows,
            cols,
            rs: ld as isize,
            cs: 1,
        };
        v.check();
        v
    }

    /// The transpose (no copy).
    pub fn t(self) -> View<'a> {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows as isize - 1) * self.rs + (self.cols as isize - 1) * self.cs;
            assert!(
                last >= 0 && (last as usize) < self.data.len(),
                "matrix view out of bounds"
            );
        }
    }
}

/// `c = beta * a · b` (or `c += beta * a · b` with `accumulate`), `c` row-major
/// with row stride `ldc`.
pub fn matmul(
    c: &mut [f32],
    ldc: usize,
    a: View,
    b: View,
    accumulate: bool,
    beta: f32,
    par: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * ldc + n <= c.len(), "output out of bounds");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every view was bounds-checked on construction and the output
    // extent just above; the buffers do not alias (`c` is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs,
            a.rs,
            b.data.as_ptr(),
            b.cs,
            b.rs,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// The parallelism for large products: every core.
pub fn par_all() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads().max(1))
}

/// Adds `bias` to every row of the row-major `rows × bias.len()` matrix `y`.
pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    y.par_chunks_mut(bias.len() * 64).for_each(|block| {
        for row in block.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

/// `acc += column sums of dy` (`dy` row-major with `acc.len()` columns),
/// summed in a fixed order so results do not depend on thread timing.
pub fn add_column_sums(acc: &mut [f32], dy: &[f32]) {
    let width = acc.len();
    let rows = dy.len() / width;
    let chunk = rows.div_ceil(8).max(1);
    let partial: Vec<Vec<f32>> = dy
        .par_chunks(chunk * width)
        .map(|block| {
            let mut s = vec![0.0f32; width];
            for row in block.chunks_exact(width) {
                for (a, v) in s.iter_mut().zip(row) {
                    *a += v;
                }
            }
            s
        })
        .collect();
    for p in partial {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
}

/// Layer norm over rows of width `gamma.len()`: writes `y`, the normalized
/// `xhat` and each row's `rstd` (kept for the backward pass).
pub fn layer_norm(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [f32],
    xhat: &mut [f32],
    rstd: &mut [f32],
) {
    let d = gamma.len();
    y.par_chunks_mut(d)
        .zip(xhat.par_chunks_mut(d))
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(d))
        .for_each(|(((y, xh), rs), x)| {
            let mean = x.iter().sum::<f32>() / d as f32;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let r = 1.0 / (var + eps).sqrt();
            *rs = r;
            for i in 0..d {
                let n = (x[i] - mean) * r;
                xh[i] = n;
                y[i] = n * gamma[i] + beta[i];
            }
        });
}

/// Backward of [`layer_norm`]: writes `dx` (or adds to it with `accumulate`)
/// and adds to `dgamma`, `dbeta`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    dx: &mut [f32],
    accumulate: bool,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let d = gamma.len();
    dx.par_chunks_mut(d)
        .zip(dy.par_chunks(d))
        .zip(xhat.par_chunks(d))
        .zip(rstd.par_iter())
        .for_each(|(((dx, dy), xh), r)| {
            let mut mean_g = 0.0f32;
            let mut mean_gx = 0.0f32;
            for i in 0..d {
                let g = dy[i] * gamma[i];
                mean_g += g;
                mean_gx += g * xh[i];
            }
            mean_g /= d as f32;
            mean_gx /= d as f32;
            for i in 0..d {
                let g = dy[i] * gamma[i];
                let v = r * (g - mean_g - xh[i] * mean_gx);
                if accumulate {
                    dx[i] += v;
                } else {
                    dx[i] = v;
                }
            }
        });
    let rows = dy.len() / d;
    let chunk = rows.div_ceil(8).max(1);
    let partial: Vec<(Vec<f32>, Vec<f32>)> = dy
        .par_chunks(chunk * d)
        .zip(xhat.par_chunks(chunk * d))
        .map(|(dy, xh)| {
            let (mut g, mut b) = (vec![0.0f32; d], vec![0.0f32; d]);
            for (dy, xh) in dy.chunks_exact(d).zip(xh.chunks_exact(d)) {
                for i in 0..d {
                    g[i] += dy[i] * xh[i];
                    b[i] += dy[i];
                }
            }
            (g, b)
        })
        .collect();
    for (g, b) in partial {
        for i in 0..d {
            dgamma[i] += g[i];
            dbeta[i] += b[i];
        }
    }
}

/// A reproducible random stream for one (seed, site, row): dropout masks do
/// not depend on how rows are spread over threads.
pub fn row_rng(seed: u64, site: u64, row: u64) -> SmallRng {
    let mut z =
        seed ^ site.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ row.wrapping_mul(0xD1B5_4A32_D192_ED03);
    // splitmix64 finalizer
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    SmallRng::seed_from_u64(z ^ (z >> 31))
}

/// Inverted dropout in place: each element is kept with probability `1 - p`
/// and scaled by `1 / (1 - p)`; `mask` records the factor (0 or the scale).
/// Rows are `width` wide; `p = 0` keeps everything.
pub fn dropout(x: &mut [f32], mask: &mut [f32], width: usize, p: f32, seed: u64, site: u64) {
    if p <= 0.0 {
        mask.fill(1.0);
        return;
    }
    let scale = 1.0 / (1.0 - p);
    x.par_chunks_mut(width)
        .zip(mask.par_chunks_mut(width))
        .enumerate()
        .for_each(|(row, (x, m))| {
            let mut rng = row_rng(seed, site, row as u64);
            for (v, m) in x.iter_mut().zip(m.iter_mut()) {
                let keep = rng.random::<f32>() >= p;
                *m = if keep { scale } else { 0.0 };
                *v *= *m;
            }
        });
}

/// Multiplies `dx` element-wise by `mask` (dropout's backward).
pub fn apply_mask(dx: &mut [f32], mask: &[f32]) {
    dx.par_chunks_mut(4096)
        .zip(mask.par_chunks(4096))
        .for_each(|(d, m)| {
            for (d, m) in d.iter_mut().zip(m) {
                *d *= m;
            }
        });
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub len: usize,
    /// Heads.
    pub heads: usize,
    /// Model width (heads × head width).
    pub d_model: usize,
}

impl AttentionShape {
    fn head_dim(&self) -> usize {
        self.d_model / self.heads
    }
}

/// Causal multi-head self-attention. `qkv` is `(batch·len) × 3·d_model`
/// (queries, keys, values side by side); `valid[b·len + t]` says whether
/// position `t` of sequence `b` holds an item (padding keys are masked).
/// Writes the softmax probabilities `probs` (`batch·heads·len·len`), the
/// dropout factors `drop_mask` (same size) and the per-head outputs side by
/// side into `out` (`(batch·len) × d_model`).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    shape: AttentionShape,
    qkv: &[f32],
    valid: &[bool],
    probs: &mut [f32],
    drop_mask: &mut [f32],
    out: &mut [f32],
    dropout_p: f32,
    seed: u64,
    site: u64,
) {
    let AttentionShape {
        len,
        heads,
        d_model,
        ..
    } = shape;
    let dh = shape.head_dim();
    let scale = 1.0 / (dh as f32).sqrt();
    let ld = 3 * d_model;
    let keep_scale = if dropout_p > 0.0 {
        1.0 / (1.0 - dropout_p)
    } else {
        1.0
    };
    // One task per sequence: its heads' probabilities and its rows of `out`.
    probs
        .par_chunks_mut(heads * len * len)
        .zip(drop_mask.par_chunks_mut(heads * len * len))
        .zip(out.par_chunks_mut(len * d_model))
        .enumerate()
        .for_each(|(b, ((probs, mask), out))| {
            let rows = &qkv[b * len * ld..(b + 1) * len * ld];
            let valid = &valid[b * len..(b + 1) * len];
            let mut dropped = vec![0.0f32; len * len];
            for h in 0..heads {
                let p = &mut probs[h * len * len..(h + 1) * len * len];
                let q = View::strided(&rows[h * dh..], len, dh, ld);
                let k = View::strided(&rows[d_model + h * dh..], len, dh, ld);
                let v = View::strided(&rows[2 * d_model + h * dh..], len, dh, ld);
                matmul(p, len, q, k.t(), false, scale, Parallelism::None);
                let m = &mut mask[h * len * len..(h + 1) * len * len];
                let mut rng = row_rng(seed, site, (b * heads + h) as u64);
                for i in 0..len {
                    let row = &mut p[i * len..(i + 1) * len];
                    let mut max = f32::NEG_INFINITY;
                    for j in 0..=i {
                        if valid[j] {
                            max = max.max(row[j]);
                        }
                    }
                    let mut sum = 0.0f32;
                    for j in 0..len {
                        let e = if j <= i && valid[j] && max.is_finite() {
                            // Clamp far-below-max scores to exact zero (no denormals).
                            let z = row[j] - max;
                            if z < -80.0 { 0.0 } else { z.exp() }
                        } else {
                            0.0
                        };
                        row[j] = e;
                        sum += e;
                    }
                    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                    let mrow = &mut m[i * len..(i + 1) * len];
                    let drow = &mut dropped[i * len..(i + 1) * len];
                    for j in 0..len {
                        row[j] *= inv;
                        let factor = if dropout_p > 0.0 {
                            if rng.random::<f32>() >= dropout_p {
                                keep_scale
                            } else {
                                0.0
                            }
                        } else {
                            1.0
                        };
                        mrow[j] = factor;
                        drow[j] = row[j] * factor;
                    }
                }
                let o = &mut out[h * dh..];
                matmul(
                    o,
                    d_model,
                    View::rm(&dropped, len, len),
                    v,
                    false,
                    1.0,
                    Parallelism::None,
                );
            }
        });
}

/// Backward of [`attention`]: from `d_out` (`(batch·len) × d_model`) writes
/// `d_qkv` (`(batch·len) × 3·d_model`).
pub fn attention_backward(
    shape: AttentionShape,
    qkv: &[f32],
    probs: &[f32],
    drop_mask: &[f32],
    d_out: &[f32],
    d_qkv: &mut [f32],
) {
    let AttentionShape {
        len,
        heads,
        d_model,
        ..
    } = shape;
    let dh = shape.head_dim();
    let scale = 1.0 / (dh as f32).sqrt();
    let ld = 3 * d_model;
    d_qkv
        .par_chunks_mut(len * ld)
        .enumerate()
        .for_each(|(b, dq_rows)| {
            let rows = &qkv[b * len * ld..(b + 1) * len * ld];
            let d_out = &d_out[b * len * d_model..(b + 1) * len * d_model];
            let mut dropped = vec![0.0f32; len * len];
            let mut dp = vec![0.0f32; len * len];
            for h in 0..heads {
                let p = &probs[(b * heads + h) * len * len..(b * heads + h + 1) * len * len];
                let m = &drop_mask[(b * heads + h) * len * len..(b * heads + h + 1) * len * len];
                for ((d, p), m) in dropped.iter_mut().zip(p).zip(m) {
                    *d = p * m;
                }
                let q = View::strided(&rows[h * dh..], len, dh, ld);
                let k = View::strided(&rows[d_model + h * dh..], len, dh, ld);
                let v = View::strided(&rows[2 * d_model + h * dh..], len, dh, ld);
                let d_o = View::strided(&d_out[h * dh..], len, dh, d_model);
                // dV = dropped(P)ᵀ · dO
                matmul(
                    &mut dq_rows[2 * d_model + h * dh..],
                    ld,
                    View::rm(&dropped, len, len).t(),
                    d_o,
                    false,
                    1.0,
                    Parallelism::None,
                );
                // dP = (dO · Vᵀ) ⊙ mask, then the softmax backward, then the score scale.
                matmul(&mut dp, len, d_o, v.t(), false, 1.0, Parallelism::None);
                for i in 0..len {
                    let prow = &p[i * len..(i + 1) * len];
                    let drow = &mut dp[i * len..(i + 1) * len];
                    let mrow = &m[i * len..(i + 1) * len];
                    let mut dot = 0.0f32;
                    for j in 0..len {
                        drow[j] *= mrow[j];
                        dot += drow[j] * prow[j];
                    }
                    for j in 0..len {
                        drow[j] = prow[j] * (drow[j] - dot) * scale;
                    }
                }
                // dQ = dS · K ; dK = dSᵀ · Q
                matmul(
                    &mut dq_rows[h * dh..],
                    ld,
                    View::rm(&dp, len, len),
                    k,
                    false,
                    1.0,
                    Parallelism::None,
                );
                matmul(
                    &mut dq_rows[d_model + h * dh..],
                    ld,
                    View::rm(&dp, len, len).t(),
                    q,
                    false,
                    1.0,
                    Parallelism::None,
                );
            }
        });
}

/// `exp(x)` to within a few ulp for `x ≤ 88`, branch-free so loops over it
/// vectorize (Cephes' polynomial); exactly 0 below −80, so the softmax
/// never produces denormals.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer, left in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = xc - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    let exponent = (t.to_bits() as i32 - SHIFT.to_bits() as i32 + 127) << 23;
    let v = e * f32::from_bits(exponent as u32);
    if x < -80.0 { 0.0 } else { v }
}

/// Replaces `row` (plus `offset`, when given) by `exp(row − max(row))` and
/// returns the sum of the new values.
#[inline(always)]
fn exp_normalize_body(row: &mut [f32], offset: Option<&[f32]>) -> f32 {
    if let Some(off) = offset {
        for (v, o) in row.iter_mut().zip(off) {
            *v += o;
        }
    }
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            lanes[k] = lanes[k].max(c[k]);
        }
    }
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    for l in lanes {
        max = max.max(l);
    }
    for v in row.iter_mut() {
        *v = fast_exp(*v - max);
    }
    let mut sums = [0.0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            sums[k] += c[k];
        }
    }
    chunks.remainder().iter().sum::<f32>() + sums.iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_normalize_avx2(row: &mut [f32], offset: Option<&[f32]>) -> f32 {
    exp_normalize_body(row, offset)
}

/// [`exp_normalize_body`], with AVX2 and FMA where the CPU has them.
pub fn exp_normalize(row: &mut [f32], offset: Option<&[f32]>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { exp_normalize_avx2(row, offset) };
    }
    exp_normalize_body(row, offset)
}

/// `Σ exp((v − shift) · scale)` over `row`, with [`fast_exp`] in eight
/// lanes (entries of −∞ add nothing). For `scale > 0` and `shift ≥` every
/// value, as a softmax's normaliser is computed.
#[inline(always)]
fn exp_sum_body(row: &[f32], shift: f32, scale: f32) -> f32 {
    let mut sums = [0.0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            sums[k] += fast_exp((c[k] - shift) * scale);
        }
    }
    chunks
        .remainder()
        .iter()
        .map(|&v| fast_exp((v - shift) * scale))
        .sum::<f32>()
        + sums.iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_sum_avx2(row: &[f32], shift: f32, scale: f32) -> f32 {
    exp_sum_body(row, shift, scale)
}

/// [`exp_sum_body`], with AVX2 and FMA where the CPU has them.
pub fn exp_sum(row: &[f32], shift: f32, scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { exp_sum_avx2(row, shift, scale) };
    }
    exp_sum_body(row, shift, scale)
}

/// A loss over the logits of `rows` hidden states against a table of class
/// vectors, in blocks of `block` rows so the logits never exist all at once.
/// `row_loss(r, logits)` gets row `r`'s logits (one per row of `table`),
/// overwrites them with `∂loss_r/∂logits` and returns `loss_r`. Returns the
/// summed loss, adds `∂loss/∂hidden` to `d_hidden` and `∂loss/∂table` to
/// `d_table`. `scratch` must hold `block × classes` values.
#[allow(clippy::too_many_arguments)]
pub fn logit_loss(
    hidden: &[f32],
    d: usize,
    table: &[f32],
    rows: usize,
    block: usize,
    scratch: &mut [f32],
    d_hidden: &mut [f32],
    d_table: &mut [f32],
    row_loss: impl Fn(usize, &mut [f32]) -> f64 + Sync,
) -> f64 {
    let classes = table.len() / d;
    let mut loss = 0.0f64;
    let mut start = 0;
    while start < rows {
        let n = block.min(rows - start);
        let logits = &mut scratch[..n * classes];
        let h = View::rm(&hidden[start * d..(start + n) * d], n, d);
        matmul(
            logits,
            classes,
            h,
            View::rm(table, classes, d).t(),
            false,
            1.0,
            par_all(),
        );
        let block_loss: f64 = logits
            .par_chunks_mut(classes)
            .enumerate()
            .map(|(i, row)| row_loss(start + i, row))
            .sum();
        loss += block_loss;
        let g = View::rm(logits, n, classes);
        // d_hidden[block] += G · table ; d_table += Gᵀ · h
        matmul(
            &mut d_hidden[start * d..(start + n) * d],
            d,
            g,
            View::rm(table, classes, d),
            true,
            1.0,
            par_all(),
        );
        matmul(d_table, d, g.t(), h, true, 1.0, par_all());
        start += n;
    }
    loss
}

/// Softmax cross-entropy of one row of logits against class `target`,
/// `logit_offset` (the log-Q correction of sampled softmax) added to the
/// logits first: overwrites `row` with `weight · ∂loss/∂logits` and returns
/// the loss.
pub fn cross_entropy_row(
    row: &mut [f32],
    target: usize,
    logit_offset: Option<&[f32]>,
    weight: f32,
) -> f64 {
    // Far-below-max logits become exact zeros: no denormals downstream.
    let sum = exp_normalize(row, logit_offset);
    let target_p = row[target] / sum;
    let inv = weight / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
    row[target] -= weight;
    -(target_p.max(f32::MIN_POSITIVE) as f64).ln()
}

/// Softmax cross-entropy of each hidden state against its class
/// (`targets[r]`, a row of `table`) through [`logit_loss`]; gradients are
/// scaled by `weight`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_cross_entropy(
    hidden: &[f32],
    d: usize,
    table: &[f32],
    targets: &[u32],
    logit_offset: Option<&[f32]>,
    weight: f32,
    block: usize,
    scratch: &mut [f32],
    d_hidden: &mut [f32],
    d_table: &mut [f32],
) -> f64 {
    logit_loss(
        hidden,
        d,
        table,
        targets.len(),
        block,
        scratch,
        d_hidden,
        d_table,
        |r, row| cross_entropy_row(row, targets[r] as usize, logit_offset, weight),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * n + j] += a[i * k + p] * b[p * n + j];
                }
            }
        }
        c
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SmallRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() - 0.5).collect()
    }

    #[test]
    fn fast_exp_matches_the_standard_library() {
        for i in -8000..=880 {
            let x = i as f32 * 0.01 + 0.003;
            let (want, got) = (x.exp(), fast_exp(x));
            if x < -80.0 {
                assert_eq!(got, 0.0);
            } else {
                assert!(
                    ((got - want) / want).abs() < 4e-7,
                    "exp({x}) = {want}, got {got}"
                );
            }
        }
        let mut row: Vec<f32> = (0..37).map(|i| i as f32 * 0.3 - 5.0).collect();
        let max = row.iter().cloned().fold(f32::MIN, f32::max);
        let want: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
        let sum = exp_normalize(&mut row, None);
        assert!((sum - want.iter().sum::<f32>()).abs() < 1e-5);
        for (g, w) in row.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6);
        }
    }

    #[test]
    fn exp_sum_matches_a_double_precision_sum() {
        let mut row: Vec<f32> = data(50_003, 4).iter().map(|v| v * 40.0).collect();
        row[17] = f32::NEG_INFINITY;
        let max = row.iter().cloned().fold(f32::MIN, f32::max);
        for t in [0.5f32, 1.0, 2.0] {
            let want: f64 = row
                .iter()
                .map(|&v| ((f64::from(v) - f64::from(max)) / f64::from(t)).exp())
                .sum();
            let got = f64::from(exp_sum(&row, max, 1.0 / t));
            assert!((got - want).abs() < 1e-5 * want, "T={t}: {got} vs {want}");
            assert_eq!(exp_sum_body(&row[..5], max, 1.0 / t), {
                row[..5]
                    .iter()
                    .map(|&v| fast_exp((v - max) / t))
                    .sum::<f32>()
            });
        }
    }

    #[test]
    fn matmul_matches_naive_with_transposes_and_accumulation() {
        let (m, k, n) = (7, 5, 9);
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![0.0; m * n];
        matmul(
            &mut c,
            n,
            View::rm(&a, m, k),
            View::rm(&b, k, n),
            false,
            1.0,
            Parallelism::None,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        // (bᵀ)ᵀ via a transposed copy.
        let mut bt = vec![0.0; k * n];
        for i in 0..k {
            for j in 0..n {
                bt[j * k + i] = b[i * n + j];
            }
        }
        matmul(
            &mut c,
            n,
            View::rm(&a, m, k),
            View::rm(&bt, n, k).t(),
            true,
            2.0,
            par_all(),
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - 3.0 * y).abs() < 1e-4);
        }
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let d = 6;
        let rows = 3;
        let x = data(rows * d, 3);
        let gamma = data(d, 4);
        let beta = data(d, 5);
        let dy = data(rows * d, 6);
        let loss = |x: &[f32]| -> f64 {
            let (mut y, mut xh, mut rs) =
                (vec![0.0; rows * d], vec![0.0; rows * d], vec![0.0; rows]);
            layer_norm(x, &gamma, &beta, 1e-5, &mut y, &mut xh, &mut rs);
            y.iter()
                .zip(&dy)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum()
        };
        let (mut y, mut xh, mut rs) = (vec![0.0; rows * d], vec![0.0; rows * d], vec![0.0; rows]);
        layer_norm(&x, &gamma, &beta, 1e-5, &mut y, &mut xh, &mut rs);
        let (mut dx, mut dg, mut db) = (vec![0.0; rows * d], vec![0.0; d], vec![0.0; d]);
        layer_norm_backward(&dy, &xh, &rs, &gamma, &mut dx, false, &mut dg, &mut db);
        for i in 0..x.len() {
            let mut xp = x.clone();
            xp[i] += 1e-3;
            let mut xm = x.clone();
            xm[i] -= 1e-3;
            let numeric = (loss(&xp) - loss(&xm)) / 2e-3;
            assert!(
                (numeric - dx[i] as f64).abs() < 2e-2,
                "dx[{i}]: {numeric} vs {}",
                dx[i]
            );
        }
        let want_db: Vec<f32> = (0..d)
            .map(|i| (0..rows).map(|r| dy[r * d + i]).sum())
            .collect();
        for i in 0..d {
            assert!((db[i] - want_db[i]).abs() < 1e-5);
        }
    }

    #[test]
    fn attention_is_causal_and_skips_padding() {
        let shape = AttentionShape {
            batch: 1,
            len: 3,
            heads: 1,
            d_model: 2,
        };
        // Values are one-hot-ish so outputs show which keys were used.
        let qkv = vec![
            0.0, 0.0, 0.0, 0.0, 100.0, 0.0, // t0 (padding)
            0.0, 0.0, 0.0, 0.0, 1.0, 0.0, // t1
            0.0, 0.0, 0.0, 0.0, 0.0, 1.0, // t2
        ];
        let valid = [false, true, true];
        let (mut probs, mut mask, mut out) = (vec![0.0; 9], vec![0.0; 9], vec![0.0; 6]);
        attention(
            shape, &qkv, &valid, &mut probs, &mut mask, &mut out, 0.0, 1, 1,
        );
        assert_eq!(&probs[3..6], &[0.0, 1.0, 0.0], "t1 sees only itself");
        assert_eq!(
            &probs[6..9],
            &[0.0, 0.5, 0.5],
            "t2 sees t1 and t2, not padding"
        );
        assert_eq!(&out[2..4], &[1.0, 0.0]);
        assert_eq!(&out[4..6], &[0.5, 0.5]);
        assert_eq!(
            &probs[0..3],
            &[0.0, 0.0, 0.0],
            "an all-padding row attends nowhere"
        );
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let shape = AttentionShape {
            batch: 2,
            len: 4,
            heads: 2,
            d_model: 4,
        };
        let n = shape.batch * shape.len;
        let qkv = data(n * 12, 3);
        let weights = data(n * 4, 4);
        let valid = [false, true, true, true, true, true, true, true];
        let pn = shape.batch * shape.heads * shape.len * shape.len;
        let loss = |qkv: &[f32]| -> f64 {
            let (mut probs, mut mask, mut out) = (vec![0.0; pn], vec![0.0; pn], vec![0.0; n * 4]);
            attention(
                shape, qkv, &valid, &mut probs, &mut mask, &mut out, 0.0, 1, 1,
            );
            out.iter()
                .zip(&weights)
                .map(|(o, w)| f64::from(o * w))
                .sum()
        };
        let (mut probs, mut mask, mut out) = (vec![0.0; pn], vec![0.0; pn], vec![0.0; n * 4]);
        attention(
            shape, &qkv, &valid, &mut probs, &mut mask, &mut out, 0.0, 1, 1,
        );
        let mut d_qkv = vec![0.0; n * 12];
        attention_backward(shape, &qkv, &probs, &mask, &weights, &mut d_qkv);
        for i in 0..qkv.len() {
            let (mut plus, mut minus) = (qkv.clone(), qkv.clone());
            plus[i] += 1e-2;
            minus[i] -= 1e-2;
            let numeric = (loss(&plus) - loss(&minus)) / 2e-2;
            assert!(
                (numeric - f64::from(d_qkv[i])).abs() < 1e-3,
                "d_qkv[{i}]: numeric {numeric}, analytic {}",
                d_qkv[i]
            );
        }
    }

    #[test]
    fn softmax_cross_entropy_matches_hand_computed_values() {
        // One row, hidden (1, 0), three classes with logits 1, 2, 0; target 1.
        let hidden = [1.0, 0.0];
        let table = [1.0, 5.0, 2.0, 5.0, 0.0, 5.0];
        let mut scratch = vec![0.0; 3];
        let (mut dh, mut dt) = (vec![0.0; 2], vec![0.0; 6]);
        let loss = softmax_cross_entropy(
            &hidden,
            2,
            &table,
            &[1],
            None,
            1.0,
            4,
            &mut scratch,
            &mut dh,
            &mut dt,
        );
        let z: f64 = [1f64, 2.0, 0.0].iter().map(|v| v.exp()).sum();
        assert!((loss - (z.ln() - 2.0)).abs() < 1e-6);
        let p: Vec<f64> = [1f64, 2.0, 0.0].iter().map(|v| v.exp() / z).collect();
        // d hidden = Σ_c (p_c - y_c) · table_c
        let want_dh0 = p[0] * 1.0 + (p[1] - 1.0) * 2.0;
        assert!((dh[0] as f64 - want_dh0).abs() < 1e-6);
        // d table_c = (p_c - y_c) · hidden
        assert!((dt[2] as f64 - (p[1] - 1.0)).abs() < 1e-6);
        assert_eq!(dt[3], 0.0);
        // An offset of -inf on class 0 renormalizes over classes 1 and 2.
        let (mut dh, mut dt) = (vec![0.0; 2], vec![0.0; 6]);
        let offset = [f32::NEG_INFINITY, 0.0, 0.0];
        let loss = softmax_cross_entropy(
            &hidden,
            2,
            &table,
            &[1],
            Some(&offset),
            1.0,
            4,
            &mut scratch,
            &mut dh,
            &mut dt,
        );
        let z2 = 2f64.exp() + 1.0;
        assert!((loss - (z2.ln() - 2.0)).abs() < 1e-6);
        assert_eq!(dt[0], 0.0);
    }

    #[test]
    fn dropout_is_reproducible_and_scaled() {
        let mut a = vec![1.0f32; 1000];
        let mut b = vec![1.0f32; 1000];
        let (mut ma, mut mb) = (vec![0.0; 1000], vec![0.0; 1000]);
        dropout(&mut a, &mut ma, 100, 0.25, 9, 3);
        dropout(&mut b, &mut mb, 100, 0.25, 9, 3);
        assert_eq!(a, b);
        let kept = a.iter().filter(|v| **v > 0.0).count();
        assert!((650..850).contains(&kept), "{kept}");
        assert!(
            a.iter()
                .all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6)
        );
    }
}
