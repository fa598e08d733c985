//! Integer products on stored `int8` values: the activation rows quantized
//! on the fly, `i32` accumulation, AVX2 (`maddubs`/`madd`) when the CPU
//! has it and a portable loop otherwise.

use super::{I8_MAX, ROUNDER};

/// Bytes of packed rows the AVX2 product keeps in L1 while every input
/// row of a block runs against them.
const PANEL_TILE_BYTES: usize = 16 << 10;
/// Stored rows side by side in a panel (one AVX2 register of `i32` sums).
const PANEL_ROWS: usize = 8;
/// Columns per group in a panel (four `int8` make one `i32` lane).
const PANEL_GROUP: usize = 4;

/// The integer product this CPU runs, chosen at run time: `avx2`
/// (packed panels, four input rows × sixteen stored rows a step,
/// `maddubs`/`madd`) or `portable`.
pub fn int8_kernel() -> &'static str {
    if panels_supported() {
        "avx2"
    } else {
        "portable"
    }
}

/// Does this CPU run the panel product ([`int8_panel_product`])?
pub(super) fn panels_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            return true;
        }
    }
    false
}

/// Bytes of [`pack_panels`]'s layout for a `rows × cols` matrix.
pub(super) fn panels_len(rows: usize, cols: usize) -> usize {
    rows.div_ceil(PANEL_ROWS) * cols.div_ceil(PANEL_GROUP) * PANEL_ROWS * PANEL_GROUP
}

/// Lays the row-major `rows × cols` values `q` out in panels: rows in
/// groups of eight (the last padded with zero rows), and within a panel
/// the columns four at a time, each stored row's four values side by
/// side (the last group padded with zeros): 32 bytes per panel and group.
pub(super) fn pack_panels(q: &[i8], rows: usize, cols: usize, out: &mut Vec<i8>) {
    let groups = cols.div_ceil(PANEL_GROUP);
    out.clear();
    out.resize(panels_len(rows, cols), 0);
    for (j, row) in q.chunks_exact(cols.max(1)).take(rows).enumerate() {
        let (panel, lane) = (j / PANEL_ROWS, j % PANEL_ROWS);
        for (g, four) in row.chunks(PANEL_GROUP).enumerate() {
            let at = ((panel * groups + g) * PANEL_ROWS + lane) * PANEL_GROUP;
            out[at..at + four.len()].copy_from_slice(four);
        }
    }
}

/// `out[i · ldo + j] = (Σ_k xq[i, k] · q[j, k]) · scale[j] · xs[i]` for every
/// row `i` of `xq` and stored row `j` (`scale.len()` of them), the stored
/// rows as [`pack_panels`] lays them out. Needs [`panels_supported`].
pub(super) fn int8_panel_product(
    xq: &[i8],
    xs: &[f32],
    cols: usize,
    panels: &[i8],
    scale: &[f32],
    out: &mut [f32],
    ldo: usize,
) {
    assert!(panels_supported(), "the panel product needs AVX2");
    // Input rows widened to whole groups, and their absolute values.
    let stride = cols.div_ceil(PANEL_GROUP) * PANEL_GROUP;
    let n = xs.len();
    let mut signed = vec![0i8; n * stride];
    let mut magnitude = vec![0i8; n * stride];
    for ((row, s), m) in xq
        .chunks_exact(cols.max(1))
        .take(n)
        .zip(signed.chunks_exact_mut(stride.max(1)))
        .zip(magnitude.chunks_exact_mut(stride.max(1)))
    {
        s[..cols].copy_from_slice(row);
        for (m, &v) in m.iter_mut().zip(row) {
            *m = v.wrapping_abs();
        }
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 is present (asserted above).
    unsafe {
        panels_avx2(&signed, &magnitude, xs, stride, panels, scale, out, ldo)
    };
}

/// The panel product: the panels a tile at a time (in L1), and within a
/// tile blocks of up to four input rows × two panels held in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn panels_avx2(
    signed: &[i8],
    magnitude: &[i8],
    xs: &[f32],
    stride: usize,
    panels: &[i8],
    scale: &[f32],
    out: &mut [f32],
    ldo: usize,
) {
    let (n, rows) = (xs.len(), scale.len());
    let groups = stride / PANEL_GROUP;
    let n_panels = rows.div_ceil(PANEL_ROWS);
    let panel_bytes = groups * PANEL_ROWS * PANEL_GROUP;
    assert!(panels.len() >= n_panels * panel_bytes);
    assert!(signed.len() >= n * stride && magnitude.len() >= n * stride);
    assert!(n == 0 || out.len() >= (n - 1) * ldo + rows);
    let at = Block {
        signed,
        magnitude,
        xs,
        stride,
        groups,
        panels,
        scale,
    };
    let tile = (PANEL_TILE_BYTES / panel_bytes.max(1)).max(2);
    for p0 in (0..n_panels).step_by(tile) {
        let p1 = (p0 + tile).min(n_panels);
        let mut i = 0;
        while i < n {
            let users = (n - i).min(4);
            let mut p = p0;
            while p < p1 {
                let two = p + 2 <= p1;
                // SAFETY: AVX2 is present; rows i..i + users and panels
                // p..p + 1 or 2 lie within the lengths asserted above.
                unsafe {
                    match (users, two) {
                        (4, true) => at.run::<4, 2>(i, p, out, ldo),
                        (4, false) => at.run::<4, 1>(i, p, out, ldo),
                        (3, true) => at.run::<3, 2>(i, p, out, ldo),
                        (3, false) => at.run::<3, 1>(i, p, out, ldo),
                        (2, true) => at.run::<2, 2>(i, p, out, ldo),
                        (2, false) => at.run::<2, 1>(i, p, out, ldo),
                        (_, true) => at.run::<1, 2>(i, p, out, ldo),
                        (_, false) => at.run::<1, 1>(i, p, out, ldo),
                    }
                }
                p += if two { 2 } else { 1 };
            }
            i += users;
        }
    }
}

/// The operands of [`panels_avx2`].
#[cfg(target_arch = "x86_64")]
struct Block<'a> {
    signed: &'a [i8],
    magnitude: &'a [i8],
    xs: &'a [f32],
    stride: usize,
    groups: usize,
    panels: &'a [i8],
    scale: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
impl Block<'_> {
    /// Input rows `i..i + U` against panels `p..p + P`: per group of four
    /// columns, each input row's four values broadcast, `maddubs` of their
    /// magnitudes with the panel signed by them, `madd` into `i32` lanes
    /// (one per stored row: no horizontal sums), then scaled and stored.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn run<const U: usize, const P: usize>(
        &self,
        i: usize,
        p: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        use std::arch::x86_64::*;
        let panel_bytes = self.groups * PANEL_ROWS * PANEL_GROUP;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); P]; U];
        for g in 0..self.groups {
            let mut w = [_mm256_setzero_si256(); P];
            for (b, w) in w.iter_mut().enumerate() {
                let at = (p + b) * panel_bytes + g * PANEL_ROWS * PANEL_GROUP;
                // SAFETY: the panel lies inside `panels` (asserted by the caller).
                *w = unsafe { _mm256_loadu_si256(self.panels.as_ptr().add(at) as *const __m256i) };
            }
            for (u, acc) in acc.iter_mut().enumerate() {
                let at = (i + u) * self.stride + g * PANEL_GROUP;
                // SAFETY: four bytes inside row i + u (stride ≥ 4 · groups).
                let (x, m) = unsafe {
                    (
                        (self.signed.as_ptr().add(at) as *const i32).read_unaligned(),
                        (self.magnitude.as_ptr().add(at) as *const i32).read_unaligned(),
                    )
                };
                let (x, m) = (_mm256_set1_epi32(x), _mm256_set1_epi32(m));
                for (a, &w) in acc.iter_mut().zip(&w) {
                    let pairs = _mm256_maddubs_epi16(m, _mm256_sign_epi8(w, x));
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        let rows = self.scale.len();
        for b in 0..P {
            let j = (p + b) * PANEL_ROWS;
            let live = (rows - j).min(PANEL_ROWS);
            let mut scales = [0.0f32; PANEL_ROWS];
            scales[..live].copy_from_slice(&self.scale[j..j + live]);
            // SAFETY: eight floats on the stack.
            let scales = unsafe { _mm256_loadu_ps(scales.as_ptr()) };
            for (u, acc) in acc.iter().enumerate() {
                let xs = _mm256_set1_ps(self.xs[i + u]);
                let v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[b]), scales), xs);
                let o = (i + u) * ldo + j;
                if live == PANEL_ROWS {
                    // SAFETY: o + 8 ≤ (i + u) · ldo + rows ≤ out.len().
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(o), v) };
                } else {
                    let mut lanes = [0.0f32; PANEL_ROWS];
                    // SAFETY: eight floats on the stack.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
                    out[o..o + live].copy_from_slice(&lanes[..live]);
                }
            }
        }
    }
}

/// `out[i · ldo + j] = (Σ_k xq[i, k] · q[j, k]) · scale[j] · xs[i]` for every
/// row `i` of `xq` and every stored row `j` (`scale.len()` of them), on
/// row-major stored values: the portable product, rounding like the panel
/// product.
pub(super) fn int8_product(
    xq: &[i8],
    xs: &[f32],
    cols: usize,
    q: &[i8],
    scale: &[f32],
    out: &mut [f32],
    ldo: usize,
) {
    for (i, &s) in xs.iter().enumerate() {
        let x = &xq[i * cols..(i + 1) * cols];
        for (j, &sj) in scale.iter().enumerate() {
            out[i * ldo + j] = dot_i8_portable(x, &q[j * cols..(j + 1) * cols]) as f32 * sj * s;
        }
    }
}

/// Quantizes each `cols`-wide row of activations to `int8` with an `f32`
/// scale of its own (max |x| / 127).
pub(super) fn quantize_activations(x: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    let rows = x.len() / cols;
    let mut q = vec![0i8; rows * cols];
    let mut scale = vec![0.0f32; rows];
    for ((row, qrow), s) in x
        .chunks_exact(cols)
        .zip(q.chunks_exact_mut(cols))
        .zip(scale.iter_mut())
    {
        let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if max > 0.0 && max.is_finite() {
            *s = max / I8_MAX;
            let inv = I8_MAX / max;
            for (o, &v) in qrow.iter_mut().zip(row) {
                // Round to nearest by the 1.5·2²³ trick (|v · inv| ≤ 127):
                // vectorizes, unlike `f32::round`.
                *o = ((v * inv + ROUNDER) - ROUNDER) as i8;
            }
        }
    }
    (q, scale)
}

/// `dots[i] = Σ_k xq[i · stride + offset + k] · row[k]` for `count` rows of `xq`.
pub(super) fn dots_into(
    xq: &[i8],
    count: usize,
    stride: usize,
    offset: usize,
    row: &[i8],
    dots: &mut [i32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if row.len() >= 32 && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            unsafe { dots_avx2(xq, count, stride, offset, row, dots) };
            return;
        }
    }
    for (i, d) in dots.iter_mut().enumerate().take(count) {
        let x = &xq[i * stride + offset..i * stride + offset + row.len()];
        *d = dot_i8_portable(x, row);
    }
}

/// Four rows of `xq` against one stored row at a time: the row's absolute
/// values are computed once per 32 columns and the four sums reduced
/// together.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_avx2(
    xq: &[i8],
    count: usize,
    stride: usize,
    offset: usize,
    row: &[i8],
    dots: &mut [i32],
) {
    use std::arch::x86_64::*;
    let len = row.len();
    let full = len / 32 * 32;
    assert!(count == 0 || (count - 1) * stride + offset + len <= xq.len());
    assert!(dots.len() >= count);
    let ones = _mm256_set1_epi16(1);
    let load = |p: *const i8| {
        // SAFETY: every pointer below stays inside `xq` or `row` (asserted above).
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    };
    let mut i = 0;
    while i + 4 <= count {
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut k = 0;
        while k < full {
            // SAFETY: k + 32 ≤ full ≤ len.
            let r = load(unsafe { row.as_ptr().add(k) });
            let abs_r = _mm256_sign_epi8(r, r);
            for (u, a) in acc.iter_mut().enumerate() {
                // SAFETY: (i + u) < count, so the 32 bytes lie inside xq.
                let x = load(unsafe { xq.as_ptr().add((i + u) * stride + offset + k) });
                let pairs = _mm256_maddubs_epi16(abs_r, _mm256_sign_epi8(x, r));
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
            }
            k += 32;
        }
        let h = _mm256_hadd_epi32(
            _mm256_hadd_epi32(acc[0], acc[1]),
            _mm256_hadd_epi32(acc[2], acc[3]),
        );
        let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        let mut sums = [0i32; 4];
        // SAFETY: `sums` holds four i32.
        unsafe { _mm_storeu_si128(sums.as_mut_ptr() as *mut __m128i, s) };
        if full == len {
            dots[i..i + 4].copy_from_slice(&sums);
        } else {
            for (u, sum) in sums.iter().enumerate() {
                let base = (i + u) * stride + offset;
                dots[i + u] = sum + dot_i8_portable(&xq[base + full..base + len], &row[full..]);
            }
        }
        i += 4;
    }
    for (u, d) in dots.iter_mut().enumerate().take(count).skip(i) {
        let base = u * stride + offset;
        *d = dot_i8(&xq[base..base + len], row);
    }
}

/// `Σ a_k · b_k` in `i32`. Inputs lie in `[-127, 127]`.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if a.len() >= 32 && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            return unsafe { dot_i8_avx2(a, b) };
        }
    }
    dot_i8_portable(a, b)
}

pub(super) fn dot_i8_portable(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

/// 32 products per step: `maddubs(|a|, sign(b, a))` pairs them into `i16`
/// (at most 2 · 127 · 127, no saturation), `madd` with ones into `i32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_si256();
    let ones = _mm256_set1_epi16(1);
    let mut k = 0;
    while k + 32 <= n {
        // SAFETY: k + 32 ≤ n ≤ both lengths; unaligned loads.
        let (va, vb) = unsafe {
            (
                _mm256_loadu_si256(a.as_ptr().add(k) as *const __m256i),
                _mm256_loadu_si256(b.as_ptr().add(k) as *const __m256i),
            )
        };
        let abs_a = _mm256_sign_epi8(va, va);
        let signed_b = _mm256_sign_epi8(vb, va);
        let pairs = _mm256_maddubs_epi16(abs_a, signed_b);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
        k += 32;
    }
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(acc),
        _mm256_extracti128_si256(acc, 1),
    );
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s) + dot_i8_portable(&a[k..n], &b[k..n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_panel_product_equals_the_portable_one_on_any_shape() {
        if !panels_supported() {
            // The panel product never runs on this CPU; the portable one does.
            assert_eq!(int8_kernel(), "portable");
            return;
        }
        let mut rng = StdRng::seed_from_u64(17);
        let mut panels = Vec::new();
        for case in 0..300 {
            let n = rng.random_range(0..11);
            let rows = rng.random_range(1..45);
            let cols = rng.random_range(1..75);
            let extreme = case % 10 == 0;
            let value = |rng: &mut StdRng| {
                if extreme {
                    [-127i8, 127][rng.random_range(0..2)]
                } else {
                    rng.random_range(-127..=127)
                }
            };
            let xq: Vec<i8> = (0..n * cols).map(|_| value(&mut rng)).collect();
            let q: Vec<i8> = (0..rows * cols).map(|_| value(&mut rng)).collect();
            let xs: Vec<f32> = (0..n).map(|_| rng.random_range(0.001..1.0)).collect();
            let scale: Vec<f32> = (0..rows).map(|_| rng.random_range(0.001..1.0)).collect();
            // Output rows wider than the product: the slots past `rows` stay.
            let ldo = rows + rng.random_range(0..4);
            let mut want = vec![f32::NAN; n * ldo];
            int8_product(&xq, &xs, cols, &q, &scale, &mut want, ldo);
            pack_panels(&q, rows, cols, &mut panels);
            assert_eq!(panels.len(), panels_len(rows, cols));
            let mut got = vec![f32::NAN; n * ldo];
            int8_panel_product(&xq, &xs, cols, &panels, &scale, &mut got, ldo);
            for (at, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits(),
                    "case {case}: n {n}, rows {rows}, cols {cols}, ldo {ldo}, at {at}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn the_avx2_dot_equals_the_portable_one() {
        let mut rng = StdRng::seed_from_u64(7);
        for len in [0, 1, 31, 32, 33, 64, 100, 512] {
            let a: Vec<i8> = (0..len).map(|_| rng.random_range(-127..=127)).collect();
            let b: Vec<i8> = (0..len).map(|_| rng.random_range(-127..=127)).collect();
            assert_eq!(dot_i8(&a, &b), dot_i8_portable(&a, &b), "len {len}");
        }
        let extreme = vec![-127i8; 64];
        assert_eq!(dot_i8(&extreme, &extreme), 64 * 127 * 127);
    }
}
