//! Numeric kernels of the CPU transformer, each with its backward: matrix
//! products (the `gemm` crate, which candle's CPU backend also uses), layer
//! norm, causal multi-head attention, dropout masks and the blocked
//! softmax–cross-entropy over the item table. They work on preallocated
//! row-major `f32` buffers; the only allocations per call are attention's
//! per-sequence scratch (a few `len × len` blocks) and its list of each
//! sequence's part of the buffers. Row kernels whose loops gain from wider
//! vectors run in an AVX2 build where the CPU has it
//! (`wide_where_supported!`), with the same results.

use gemm::Parallelism;
use rayon::prelude::*;

/// Defines `$name`, which runs the `#[inline(always)]` function `$body`
/// compiled for AVX2 and FMA where the CPU has them (its loops then run
/// eight lanes wide), else as the crate is compiled. Both compile the same
/// operations in the same order (Rust never fuses a multiply and an add on
/// its own), so they give the same bits.
macro_rules! wide_where_supported {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn wide($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

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
        .for_each(|(((y, xh), rs), x)| *rs = layer_norm_row(x, gamma, beta, eps, y, xh));
}

/// `Σ f(v)` over `values`, in eight lanes summed in a fixed order (so the
/// loop vectorizes and the result does not depend on the CPU).
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut chunks = values.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            lanes[k] += f(c[k]);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `Σ a·b` over two equally long slices, in eight lanes as [`lane_sum`].
#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let b = &b[..a.len()];
    let mut lanes = [0.0f32; 8];
    let (mut ca, mut cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn layer_norm_row_body(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [f32],
    xhat: &mut [f32],
) -> f32 {
    let d = x.len();
    let (gamma, beta, y, xhat) = (&gamma[..d], &beta[..d], &mut y[..d], &mut xhat[..d]);
    let mean = lane_sum(x, |v| v) / d as f32;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / d as f32;
    let r = 1.0 / (var + eps).sqrt();
    for i in 0..d {
        let n = (x[i] - mean) * r;
        xhat[i] = n;
        y[i] = n * gamma[i] + beta[i];
    }
    r
}

wide_where_supported! {
    /// Layer norm of one row `x`: writes `y` and `xhat`, returns `1 / std`.
    fn layer_norm_row(
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        y: &mut [f32],
        xhat: &mut [f32],
    ) -> f32 => layer_norm_row_body
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
        .for_each(|(((dx, dy), xh), r)| layer_norm_row_backward(dy, xh, *r, gamma, dx, accumulate));
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

#[inline(always)]
fn layer_norm_row_backward_body(
    dy: &[f32],
    xhat: &[f32],
    r: f32,
    gamma: &[f32],
    dx: &mut [f32],
    accumulate: bool,
) {
    let d = dy.len();
    let (xhat, gamma, dx) = (&xhat[..d], &gamma[..d], &mut dx[..d]);
    let (mut lanes_g, mut lanes_gx) = ([0.0f32; 8], [0.0f32; 8]);
    let (mut cy, mut cg, mut cx) = (
        dy.chunks_exact(8),
        gamma.chunks_exact(8),
        xhat.chunks_exact(8),
    );
    for ((y, g), x) in (&mut cy).zip(&mut cg).zip(&mut cx) {
        for k in 0..8 {
            let v = y[k] * g[k];
            lanes_g[k] += v;
            lanes_gx[k] += v * x[k];
        }
    }
    let (mut tail_g, mut tail_gx) = (0.0f32, 0.0f32);
    for ((y, g), x) in cy
        .remainder()
        .iter()
        .zip(cg.remainder())
        .zip(cx.remainder())
    {
        let v = y * g;
        tail_g += v;
        tail_gx += v * x;
    }
    let mean_g = (lanes_g.iter().sum::<f32>() + tail_g) / d as f32;
    let mean_gx = (lanes_gx.iter().sum::<f32>() + tail_gx) / d as f32;
    for i in 0..d {
        let v = r * (dy[i] * gamma[i] - mean_g - xhat[i] * mean_gx);
        if accumulate {
            dx[i] += v;
        } else {
            dx[i] = v;
        }
    }
}

wide_where_supported! {
    /// [`layer_norm_backward`] of one row: `dx` from `dy`, given the row's
    /// `xhat` and `1 / std` `r`.
    fn layer_norm_row_backward(
        dy: &[f32],
        xhat: &[f32],
        r: f32,
        gamma: &[f32],
        dx: &mut [f32],
        accumulate: bool,
    ) => layer_norm_row_backward_body
}

#[inline(always)]
fn relu_dropout_backward_body(grad: &mut [f32], mask: &[f32], pre: &[f32]) {
    let (mask, pre) = (&mask[..grad.len()], &pre[..grad.len()]);
    for i in 0..grad.len() {
        grad[i] = if pre[i] > 0.0 { grad[i] * mask[i] } else { 0.0 };
    }
}

wide_where_supported! {
    /// The backward of `dropout(relu(pre))` with dropout factors `mask`:
    /// `grad ← grad · mask` where `pre > 0`, else 0.
    fn relu_dropout_backward_rows(grad: &mut [f32], mask: &[f32], pre: &[f32])
        => relu_dropout_backward_body
}

/// The backward of `dropout(relu(pre))` with dropout factors `mask`, in
/// place on `grad` (all three the same length).
pub fn relu_dropout_backward(grad: &mut [f32], mask: &[f32], pre: &[f32]) {
    grad.par_chunks_mut(4096)
        .zip(mask.par_chunks(4096))
        .zip(pre.par_chunks(4096))
        .for_each(|((g, m), z)| relu_dropout_backward_rows(g, m, z));
}

/// The dropout draws of one (seed, site, row): element `j` of the row is
/// kept when a 32-bit hash of (row key, `j`) is at least `⌊p·2³²⌋`. The
/// hash of every element is computed on its own (no sequential generator),
/// so a row's draws run in SIMD lanes, and masks do not depend on how rows
/// are spread over threads.
#[derive(Debug, Clone, Copy)]
pub struct DropStream {
    key_lo: u32,
    key_hi: u32,
}

impl DropStream {
    /// The stream of `row` at dropout site `site` of the step seeded `seed`.
    pub fn new(seed: u64, site: u64, row: u64) -> DropStream {
        let mut z = seed
            ^ site.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ row.wrapping_mul(0xD1B5_4A32_D192_ED03);
        // splitmix64 finalizer
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        DropStream {
            key_lo: z as u32,
            key_hi: (z >> 32) as u32,
        }
    }

    /// The draw of element `j`: two rounds of murmur3's finalizer, each a
    /// bijection, keyed by the two halves of the row key (distinct `j` of a
    /// row never share a draw).
    #[inline(always)]
    fn draw(self, j: u32) -> u32 {
        fmix32(fmix32(j.wrapping_mul(0x9E37_79B9) ^ self.key_lo) ^ self.key_hi)
    }
}

#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// Dropout's rule for rate `p`: draws below `threshold` drop, the rest are
/// scaled by `scale = 1 / (1 − p)`.
#[derive(Debug, Clone, Copy)]
pub struct DropRule {
    threshold: u32,
    scale: f32,
}

impl DropRule {
    /// The rule for rate `p` (`0 ≤ p < 1`).
    pub fn new(p: f32) -> DropRule {
        DropRule {
            threshold: (p as f64 * 4_294_967_296.0).clamp(0.0, u32::MAX as f64) as u32,
            scale: 1.0 / (1.0 - p),
        }
    }
}

#[inline(always)]
fn drop_factors_body(factors: &mut [f32], stream: DropStream, first: u32, rule: DropRule) {
    for (j, f) in factors.iter_mut().enumerate() {
        let keep = stream.draw(first.wrapping_add(j as u32)) >= rule.threshold;
        *f = if keep { rule.scale } else { 0.0 };
    }
}

wide_where_supported! {
    /// Writes dropout's factors (0 or the rule's scale) for elements
    /// `first, first + 1, …` of `stream` into `factors`.
    pub fn drop_factors(factors: &mut [f32], stream: DropStream, first: u32, rule: DropRule)
        => drop_factors_body
}

/// One dropout site of a training step: its rule and the seed of its rows'
/// streams. `None` where dropout is off (rate 0, or not training).
#[derive(Debug, Clone, Copy)]
pub struct DropSite {
    rule: DropRule,
    seed: u64,
    site: u64,
}

impl DropSite {
    /// Site `site` of the step seeded `seed` at rate `p`; `None` for `p ≤ 0`.
    pub fn new(p: f32, seed: u64, site: u64) -> Option<DropSite> {
        (p > 0.0).then(|| DropSite {
            rule: DropRule::new(p),
            seed,
            site,
        })
    }
}

/// Writes dropout's factors at `drop` for elements `first, first + 1, …`
/// of stream `stream` (a row, or an attention head of a sequence) into
/// `factors`: 0 or the rule's scale, or 1 everywhere without dropout.
pub fn site_factors(drop: Option<DropSite>, stream: usize, first: usize, factors: &mut [f32]) {
    match drop {
        Some(s) => drop_factors(
            factors,
            DropStream::new(s.seed, s.site, stream as u64),
            first as u32,
            s.rule,
        ),
        None => factors.fill(1.0),
    }
}

/// Rows per parallel task of the fused row passes.
const ROWS_PER_TASK: usize = 16;

/// A residual branch's output in one pass: rows of `y` (width
/// `bias.len()`) become `(y + bias) ⊙ factors + residual`, the dropout
/// factors of `drop` written to `mask` — as adding the bias, multiplying by
/// the factors and adding `residual` in turn, with the same rounding.
pub fn bias_dropout_residual(
    y: &mut [f32],
    bias: &[f32],
    mask: &mut [f32],
    residual: &[f32],
    drop: Option<DropSite>,
) {
    let width = bias.len();
    let task = width * ROWS_PER_TASK;
    y.par_chunks_mut(task)
        .zip(mask.par_chunks_mut(task))
        .zip(residual.par_chunks(task))
        .enumerate()
        .for_each(|(t, ((y, mask), residual))| {
            let rows = y
                .chunks_exact_mut(width)
                .zip(mask.chunks_exact_mut(width))
                .zip(residual.chunks_exact(width));
            for (i, ((y, m), r)) in rows.enumerate() {
                site_factors(drop, t * ROWS_PER_TASK + i, 0, m);
                for (((v, b), m), r) in y.iter_mut().zip(bias).zip(m.iter()).zip(r) {
                    *v = (*v + b) * m + r;
                }
            }
        });
}

/// The feed-forward's hidden layer in one pass: rows of `z` (width
/// `bias.len()`) get `bias` added (kept: the backward needs them), and
/// `out = relu(z) ⊙ factors`, the dropout factors of `drop` written to
/// `mask`.
pub fn bias_relu_dropout(
    z: &mut [f32],
    bias: &[f32],
    out: &mut [f32],
    mask: &mut [f32],
    drop: Option<DropSite>,
) {
    let width = bias.len();
    let task = width * ROWS_PER_TASK;
    z.par_chunks_mut(task)
        .zip(out.par_chunks_mut(task))
        .zip(mask.par_chunks_mut(task))
        .enumerate()
        .for_each(|(t, ((z, out), mask))| {
            let rows = z
                .chunks_exact_mut(width)
                .zip(out.chunks_exact_mut(width))
                .zip(mask.chunks_exact_mut(width));
            for (i, ((z, o), m)) in rows.enumerate() {
                site_factors(drop, t * ROWS_PER_TASK + i, 0, m);
                for (((z, b), o), m) in z.iter_mut().zip(bias).zip(o.iter_mut()).zip(m.iter()) {
                    *z += b;
                    *o = z.max(0.0) * m;
                }
            }
        });
}

/// `out = x ⊙ mask` (a gradient through dropout, into a buffer of its own).
pub fn masked_copy(out: &mut [f32], x: &[f32], mask: &[f32]) {
    out.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .zip(mask.par_chunks(4096))
        .for_each(|((o, x), m)| {
            for ((o, x), m) in o.iter_mut().zip(x).zip(m) {
                *o = x * m;
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

/// A batch of whole windows: `batch` sequences of `len` positions.
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
    /// Every position of every window as a row, `len` rows per sequence.
    pub fn layout(&self) -> AttentionLayout {
        let mut layout = AttentionLayout::new(self.heads, self.d_model);
        for _ in 0..self.batch {
            layout.push(self.len);
        }
        layout
    }
}

/// Where each sequence's rows lie when attention runs: sequence `b` holds
/// rows `starts[b]..starts[b + 1]` (its whole window, or only the positions
/// worth computing), and its `heads` probability blocks of `rows × rows`
/// follow those of the sequences before it.
#[derive(Debug, Clone)]
pub struct AttentionLayout {
    heads: usize,
    d_model: usize,
    starts: Vec<usize>,
    prob_starts: Vec<usize>,
}

impl AttentionLayout {
    /// No sequences yet, `d_model`-wide rows in `heads` heads.
    pub fn new(heads: usize, d_model: usize) -> AttentionLayout {
        AttentionLayout {
            heads,
            d_model,
            starts: vec![0],
            prob_starts: vec![0],
        }
    }

    /// Drops every sequence.
    pub fn clear(&mut self) {
        self.starts.truncate(1);
        self.prob_starts.truncate(1);
    }

    /// Appends a sequence of `rows` rows.
    pub fn push(&mut self, rows: usize) {
        self.starts.push(self.rows() + rows);
        self.prob_starts
            .push(self.prob_values() + self.heads * rows * rows);
    }

    /// Rows of every sequence together.
    pub fn rows(&self) -> usize {
        self.starts[self.starts.len() - 1]
    }

    /// Probabilities (and dropout factors) of every sequence together.
    pub fn prob_values(&self) -> usize {
        self.prob_starts[self.prob_starts.len() - 1]
    }

    fn head_dim(&self) -> usize {
        self.d_model / self.heads
    }

    /// `data` (one `width`-wide row per position) cut into each sequence's rows.
    fn split_rows<'a>(&self, data: &'a mut [f32], width: usize) -> Vec<&'a mut [f32]> {
        split_at_starts(data, &self.starts, width)
    }

    /// `data` (probabilities, or their dropout factors) cut into each
    /// sequence's `heads` blocks.
    fn split_probs<'a>(&self, data: &'a mut [f32]) -> Vec<&'a mut [f32]> {
        split_at_starts(data, &self.prob_starts, 1)
    }
}

/// `data` cut at `starts` (in units of `width` values): part `b` holds
/// units `starts[b]..starts[b + 1]`.
fn split_at_starts<'a>(
    mut data: &'a mut [f32],
    starts: &[usize],
    width: usize,
) -> Vec<&'a mut [f32]> {
    let mut parts = Vec::with_capacity(starts.len().saturating_sub(1));
    for w in starts.windows(2) {
        let (part, rest) = std::mem::take(&mut data).split_at_mut((w[1] - w[0]) * width);
        parts.push(part);
        data = rest;
    }
    parts
}

/// Causal multi-head self-attention over the sequences of `layout`. `qkv`
/// holds one row per position, `3·d_model` wide (queries, keys, values
/// side by side); `valid[r]` says whether row `r` holds an item (other keys
/// are masked; a row with no valid key attends nowhere). Writes the softmax
/// probabilities `probs` (`layout.prob_values()`), the dropout factors
/// `drop_mask` (same size; head `h` of sequence `b` draws stream
/// `b · heads + h` of `drop`, all ones without dropout) and the per-head
/// outputs side by side into `out` (one `d_model`-wide row per position).
pub fn attention(
    layout: &AttentionLayout,
    qkv: &[f32],
    valid: &[bool],
    probs: &mut [f32],
    drop_mask: &mut [f32],
    out: &mut [f32],
    drop: Option<DropSite>,
) {
    let (heads, d_model) = (layout.heads, layout.d_model);
    let dh = layout.head_dim();
    let scale = 1.0 / (dh as f32).sqrt();
    let ld = 3 * d_model;
    let (probs, drop_mask) = (
        &mut probs[..layout.prob_values()],
        &mut drop_mask[..layout.prob_values()],
    );
    let out = &mut out[..layout.rows() * d_model];
    // One task per sequence: its heads' probabilities and its rows of `out`.
    layout
        .split_probs(probs)
        .into_par_iter()
        .zip(layout.split_probs(drop_mask))
        .zip(layout.split_rows(out, d_model))
        .enumerate()
        .for_each(|(b, ((probs, mask), out))| {
            let (first, len) = (layout.starts[b], layout.starts[b + 1] - layout.starts[b]);
            let rows = &qkv[first * ld..(first + len) * ld];
            let valid = &valid[first..first + len];
            let mut dropped = vec![0.0f32; len * len];
            for h in 0..heads {
                let p = &mut probs[h * len * len..(h + 1) * len * len];
                let q = View::strided(&rows[h * dh..], len, dh, ld);
                let k = View::strided(&rows[d_model + h * dh..], len, dh, ld);
                let v = View::strided(&rows[2 * d_model + h * dh..], len, dh, ld);
                matmul(p, len, q, k.t(), false, scale, Parallelism::None);
                let m = &mut mask[h * len * len..(h + 1) * len * len];
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
                    site_factors(drop, b * heads + h, i * len, mrow);
                    for j in 0..len {
                        row[j] *= inv;
                        drow[j] = row[j] * mrow[j];
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

/// Backward of [`attention`] over the same `layout`: from `d_out` (one
/// `d_model`-wide row per position) writes `d_qkv` (`3·d_model` wide).
pub fn attention_backward(
    layout: &AttentionLayout,
    qkv: &[f32],
    probs: &[f32],
    drop_mask: &[f32],
    d_out: &[f32],
    d_qkv: &mut [f32],
) {
    let (heads, d_model) = (layout.heads, layout.d_model);
    let dh = layout.head_dim();
    let scale = 1.0 / (dh as f32).sqrt();
    let ld = 3 * d_model;
    let d_qkv = &mut d_qkv[..layout.rows() * ld];
    layout
        .split_rows(d_qkv, ld)
        .into_par_iter()
        .enumerate()
        .for_each(|(b, dq_rows)| {
            let (first, len) = (layout.starts[b], layout.starts[b + 1] - layout.starts[b]);
            let rows = &qkv[first * ld..(first + len) * ld];
            let d_out = &d_out[first * d_model..(first + len) * d_model];
            let blocks = layout.prob_starts[b]..layout.prob_starts[b + 1];
            let (probs, drop_mask) = (&probs[blocks.clone()], &drop_mask[blocks]);
            let mut dropped = vec![0.0f32; len * len];
            let mut dp = vec![0.0f32; len * len];
            for h in 0..heads {
                let p = &probs[h * len * len..(h + 1) * len * len];
                let m = &drop_mask[h * len * len..(h + 1) * len * len];
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
                    let span = i * len..(i + 1) * len;
                    softmax_dropout_backward_row(
                        &mut dp[span.clone()],
                        &p[span.clone()],
                        &m[span],
                        scale,
                    );
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

#[inline(always)]
fn softmax_dropout_backward_row_body(grad: &mut [f32], probs: &[f32], mask: &[f32], scale: f32) {
    let (probs, mask) = (&probs[..grad.len()], &mask[..grad.len()]);
    for (g, m) in grad.iter_mut().zip(mask) {
        *g *= m;
    }
    let dot = lane_dot(grad, probs);
    for (g, p) in grad.iter_mut().zip(probs) {
        *g = p * (*g - dot) * scale;
    }
}

wide_where_supported! {
    /// One attention row's backward through dropout (`mask`), the softmax
    /// (`probs`) and the score scale: `grad ← p ⊙ (grad ⊙ mask − ⟨grad ⊙
    /// mask, p⟩) · scale`.
    fn softmax_dropout_backward_row(grad: &mut [f32], probs: &[f32], mask: &[f32], scale: f32)
        => softmax_dropout_backward_row_body
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
    lane_sum(row, |v| v)
}

wide_where_supported! {
    /// [`exp_normalize_body`], eight lanes wide where the CPU has AVX2.
    pub fn exp_normalize(row: &mut [f32], offset: Option<&[f32]>) -> f32 => exp_normalize_body
}

/// `Σ exp((v − shift) · scale)` over `row`, with [`fast_exp`] in eight
/// lanes (entries of −∞ add nothing). For `scale > 0` and `shift ≥` every
/// value, as a softmax's normaliser is computed.
#[inline(always)]
fn exp_sum_body(row: &[f32], shift: f32, scale: f32) -> f32 {
    lane_sum(row, |v| fast_exp((v - shift) * scale))
}

wide_where_supported! {
    /// [`exp_sum_body`], eight lanes wide where the CPU has AVX2.
    pub fn exp_sum(row: &[f32], shift: f32, scale: f32) -> f32 => exp_sum_body
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
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

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
            &shape.layout(),
            &qkv,
            &valid,
            &mut probs,
            &mut mask,
            &mut out,
            None,
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
    fn attention_over_packed_rows_equals_attention_over_padded_windows() {
        // Three windows of 4 positions holding 2, 4 and 1 items (right-aligned).
        let (len, heads, d) = (4usize, 2usize, 4usize);
        let lengths = [2usize, 4, 1];
        let shape = AttentionShape {
            batch: lengths.len(),
            len,
            heads,
            d_model: d,
        };
        let padded = shape.layout();
        let mut packed = AttentionLayout::new(heads, d);
        let mut rows = Vec::new(); // padded row of each packed row
        for (b, &n) in lengths.iter().enumerate() {
            packed.push(n);
            rows.extend((len - n..len).map(|t| b * len + t));
        }
        let n_padded = lengths.len() * len;
        let qkv_padded = data(n_padded * 3 * d, 21);
        let d_out_padded = data(n_padded * d, 22);
        let valid_padded: Vec<bool> = (0..n_padded)
            .map(|r| r % len >= len - lengths[r / len])
            .collect();
        let gather = |src: &[f32], width: usize| -> Vec<f32> {
            rows.iter()
                .flat_map(|&r| src[r * width..(r + 1) * width].iter().copied())
                .collect()
        };
        let (qkv, d_out) = (gather(&qkv_padded, 3 * d), gather(&d_out_padded, d));
        let valid = vec![true; rows.len()];
        for dropout in [0.0, 0.4] {
            let run = |layout: &AttentionLayout, qkv: &[f32], valid: &[bool], d_out: &[f32]| {
                let (pn, n) = (layout.prob_values(), layout.rows());
                let (mut probs, mut mask) = (vec![0.0; pn], vec![0.0; pn]);
                let mut out = vec![0.0; n * d];
                attention(
                    layout,
                    qkv,
                    valid,
                    &mut probs,
                    &mut mask,
                    &mut out,
                    DropSite::new(dropout, 5, 6),
                );
                let mut d_qkv = vec![0.0; n * 3 * d];
                attention_backward(layout, qkv, &probs, &mask, d_out, &mut d_qkv);
                (out, d_qkv, mask)
            };
            let (out, d_qkv, mask) = run(&packed, &qkv, &valid, &d_out);
            assert_eq!(packed.prob_values(), heads * (4 + 16 + 1));
            if dropout > 0.0 {
                assert!(mask.contains(&0.0), "dropout drew nothing");
                continue; // the packed blocks draw other streams than the padded ones
            }
            let (out_p, d_qkv_p, _) = run(&padded, &qkv_padded, &valid_padded, &d_out_padded);
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
            for (k, &r) in rows.iter().enumerate() {
                for c in 0..d {
                    assert!(close(out[k * d + c], out_p[r * d + c]), "out row {k}");
                }
                for c in 0..3 * d {
                    let (a, b) = (d_qkv[k * 3 * d + c], d_qkv_p[r * 3 * d + c]);
                    assert!(close(a, b), "d_qkv row {k} col {c}: {a} vs {b}");
                }
            }
        }
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
                &shape.layout(),
                qkv,
                &valid,
                &mut probs,
                &mut mask,
                &mut out,
                None,
            );
            out.iter()
                .zip(&weights)
                .map(|(o, w)| f64::from(o * w))
                .sum()
        };
        let (mut probs, mut mask, mut out) = (vec![0.0; pn], vec![0.0; pn], vec![0.0; n * 4]);
        attention(
            &shape.layout(),
            &qkv,
            &valid,
            &mut probs,
            &mut mask,
            &mut out,
            None,
        );
        let mut d_qkv = vec![0.0; n * 12];
        attention_backward(&shape.layout(), &qkv, &probs, &mask, &weights, &mut d_qkv);
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

    /// Dropout factors of `rows` rows of `width` at rate `p` through the
    /// residual pass (zero bias and residual, so the output is the factors).
    fn factors(rows: usize, width: usize, p: f32, seed: u64, site: u64) -> (Vec<f32>, Vec<f32>) {
        let mut y = vec![1.0f32; rows * width];
        let mut mask = vec![-1.0f32; rows * width];
        let zero = vec![0.0f32; rows * width];
        bias_dropout_residual(
            &mut y,
            &vec![0.0; width],
            &mut mask,
            &zero,
            DropSite::new(p, seed, site),
        );
        (y, mask)
    }

    #[test]
    fn dropout_is_reproducible_scaled_and_at_its_rate_independently() {
        let (rows, width) = (300, 100);
        let (a, ma) = factors(rows, width, 0.25, 9, 3);
        let (b, mb) = factors(rows, width, 0.25, 9, 3);
        assert_eq!(a, b);
        assert_eq!(ma, mb);
        assert_eq!(a, ma, "the output is the factor times 1");
        assert!(
            a.iter()
                .all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6)
        );
        // 30,000 draws at p = 0.25: the kept share within 4 standard deviations.
        let n = a.len() as f64;
        let kept = a.iter().filter(|v| **v > 0.0).count() as f64;
        let sd = (n * 0.25 * 0.75).sqrt();
        assert!((kept - 0.75 * n).abs() < 4.0 * sd, "{kept} of {n} kept");
        // Neighbours are independent: both kept with probability 0.75².
        let pairs = a
            .chunks_exact(width)
            .flat_map(|row| row.windows(2))
            .filter(|w| w[0] > 0.0 && w[1] > 0.0)
            .count() as f64;
        let n_pairs = (rows * (width - 1)) as f64;
        let q = 0.75f64 * 0.75;
        let sd = (n_pairs * q * (1.0 - q)).sqrt();
        assert!(
            (pairs - q * n_pairs).abs() < 4.0 * sd,
            "{pairs} of {n_pairs}"
        );
        // Another site or seed draws another mask; each row its own.
        assert_ne!(factors(rows, width, 0.25, 9, 4).0, a);
        assert_ne!(factors(rows, width, 0.25, 10, 3).0, a);
        assert_ne!(a[..width], a[width..2 * width]);
        // A row's factors are its own stream's, however rows are split.
        let mut row = vec![0.0f32; width];
        site_factors(DropSite::new(0.25, 9, 3), 137, 0, &mut row);
        assert_eq!(row, a[137 * width..138 * width]);
        // Other rates keep their share too.
        for p in [0.1f32, 0.5, 0.9] {
            let (a, _) = factors(rows, width, p, 1, 1);
            let kept = a.iter().filter(|v| **v > 0.0).count() as f64;
            let keep = 1.0 - p as f64;
            let sd = (n * keep * (1.0 - keep)).sqrt();
            assert!(
                (kept - keep * n).abs() < 4.0 * sd,
                "p {p}: {kept} of {n} kept"
            );
        }
    }

    #[test]
    fn fused_dropout_passes_equal_their_steps_one_by_one() {
        let (rows, width) = (37, 24);
        let bias = data(width, 3);
        let residual = data(rows * width, 4);
        let y0 = data(rows * width, 5);
        for drop in [DropSite::new(0.3, 11, 2), None] {
            let mut y = y0.clone();
            let mut mask = vec![0.0; rows * width];
            bias_dropout_residual(&mut y, &bias, &mut mask, &residual, drop);
            let mut z = y0.clone();
            let (mut out, mut zmask) = (vec![0.0; rows * width], vec![0.0; rows * width]);
            bias_relu_dropout(&mut z, &bias, &mut out, &mut zmask, drop);
            assert_eq!(mask, zmask, "both passes draw row r from the same stream");
            for r in 0..rows {
                let mut f = vec![0.0f32; width];
                site_factors(drop, r, 0, &mut f);
                for c in 0..width {
                    let i = r * width + c;
                    let biased = y0[i] + bias[c];
                    assert_eq!(mask[i], f[c]);
                    assert_eq!(y[i].to_bits(), (biased * f[c] + residual[i]).to_bits());
                    assert_eq!(z[i].to_bits(), biased.to_bits());
                    assert_eq!(out[i].to_bits(), (biased.max(0.0) * f[c]).to_bits());
                }
            }
            if drop.is_none() {
                assert!(mask.iter().all(|m| *m == 1.0));
            }
        }
        let mut out = vec![0.0; rows * width];
        masked_copy(&mut out, &y0, &residual);
        assert!(
            out.iter()
                .zip(&y0)
                .zip(&residual)
                .all(|((o, x), m)| *o == x * m)
        );
    }

    #[test]
    fn wide_row_kernels_equal_the_portable_ones() {
        // The dispatching functions run the AVX2 build where the CPU has it;
        // the bodies called directly are the crate's baseline build.
        for (case, len) in [1usize, 7, 8, 9, 50, 64, 127, 128, 513]
            .into_iter()
            .enumerate()
        {
            let seed = 10 * case as u64;
            let (x, gamma, beta) = (data(len, seed), data(len, seed + 1), data(len, seed + 2));
            let (mut y1, mut y2) = (vec![0.0; len], vec![0.0; len]);
            let (mut h1, mut h2) = (vec![0.0; len], vec![0.0; len]);
            let r1 = layer_norm_row(&x, &gamma, &beta, 1e-5, &mut y1, &mut h1);
            let r2 = layer_norm_row_body(&x, &gamma, &beta, 1e-5, &mut y2, &mut h2);
            assert_eq!((r1.to_bits(), &y1, &h1), (r2.to_bits(), &y2, &h2));
            // Against double precision.
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
            assert!((r1 as f64 - 1.0 / (var + 1e-5).sqrt()).abs() < 1e-4 * r1 as f64);

            let dy = data(len, seed + 3);
            for accumulate in [false, true] {
                let (mut d1, mut d2) = (data(len, seed + 4), data(len, seed + 4));
                layer_norm_row_backward(&dy, &h1, r1, &gamma, &mut d1, accumulate);
                layer_norm_row_backward_body(&dy, &h1, r1, &gamma, &mut d2, accumulate);
                assert_eq!(d1, d2);
            }

            let (mask, pre) = (data(len, seed + 5), data(len, seed + 6));
            let (mut g1, mut g2) = (dy.clone(), dy.clone());
            relu_dropout_backward_rows(&mut g1, &mask, &pre);
            relu_dropout_backward_body(&mut g2, &mask, &pre);
            assert_eq!(g1, g2);
            for i in 0..len {
                let want = if pre[i] > 0.0 { dy[i] * mask[i] } else { 0.0 };
                assert_eq!(g1[i].to_bits(), want.to_bits());
            }

            let probs = data(len, seed + 7);
            let (mut s1, mut s2) = (dy.clone(), dy.clone());
            softmax_dropout_backward_row(&mut s1, &probs, &mask, 0.125);
            softmax_dropout_backward_row_body(&mut s2, &probs, &mask, 0.125);
            assert_eq!(s1, s2);
            let dot: f64 = (0..len)
                .map(|i| (dy[i] * mask[i]) as f64 * probs[i] as f64)
                .sum();
            for i in 0..len {
                let want = probs[i] as f64 * ((dy[i] * mask[i]) as f64 - dot) * 0.125;
                assert!((s1[i] as f64 - want).abs() < 1e-5, "{len} {i}");
            }

            let stream = DropStream::new(seed, 3, 5);
            let rule = DropRule::new(0.3);
            let (mut f1, mut f2) = (vec![0.0; len], vec![0.0; len]);
            drop_factors(&mut f1, stream, 17, rule);
            drop_factors_body(&mut f2, stream, 17, rule);
            assert_eq!(f1, f2);
            for (j, f) in f1.iter().enumerate() {
                let keep = stream.draw(17 + j as u32) >= rule.threshold;
                assert_eq!(*f, if keep { rule.scale } else { 0.0 });
            }
        }
    }
}
