//! Integer products on stored `int8` values: the activation rows quantized
//! on the fly, `i32` accumulation, AVX2 (`maddubs`/`madd`) when the CPU
//! has it and a portable loop otherwise.

use super::{I8_MAX, ROUNDER};

/// The integer product this CPU runs, chosen at run time: `avx2`
/// (`maddubs`/`madd`, eight stored rows a step) or `portable`.
pub fn int8_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    "portable"
}

/// `out[i · ldo + j] = xs[i] · scale[j] · Σ_k xq[i, k] · q[j, k]` for every
/// row `i` of `xq` and every stored row `j` (`scale.len()` of them).
pub(super) fn int8_product(
    xq: &[i8],
    xs: &[f32],
    cols: usize,
    q: &[i8],
    scale: &[f32],
    out: &mut [f32],
    ldo: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if cols >= 16 && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            unsafe { int8_product_avx2(xq, xs, cols, q, scale, out, ldo) };
            return;
        }
    }
    for (i, &s) in xs.iter().enumerate() {
        let x = &xq[i * cols..(i + 1) * cols];
        for (j, &sj) in scale.iter().enumerate() {
            out[i * ldo + j] = s * sj * dot_i8_portable(x, &q[j * cols..(j + 1) * cols]) as f32;
        }
    }
}

/// The AVX2 product: one input row against eight stored rows at a time,
/// 32 columns per step (`maddubs` on |x| and the rows signed by x), the
/// eight sums reduced together and scaled in one vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn int8_product_avx2(
    xq: &[i8],
    xs: &[f32],
    cols: usize,
    q: &[i8],
    scale: &[f32],
    out: &mut [f32],
    ldo: usize,
) {
    use std::arch::x86_64::*;
    let (n, rows) = (xs.len(), scale.len());
    assert!(xq.len() >= n * cols && q.len() >= rows * cols);
    assert!(n == 0 || out.len() >= (n - 1) * ldo + rows);
    let full = cols / 32 * 32;
    // Columns covered by whole 32- and 16-wide steps.
    let half = if cols - full >= 16 { full + 16 } else { full };
    let ones = _mm256_set1_epi16(1);
    // SAFETY (all loads and stores below): offsets stay within the lengths asserted above.
    let load = |p: *const i8| unsafe { _mm256_loadu_si256(p as *const __m256i) };
    for i in 0..n {
        let x = &xq[i * cols..(i + 1) * cols];
        let o = &mut out[i * ldo..i * ldo + rows];
        let xscale = _mm256_set1_ps(xs[i]);
        let mut j = 0;
        while j + 8 <= rows {
            let mut acc = [_mm256_setzero_si256(); 8];
            let mut k = 0;
            while k < full {
                let xv = load(unsafe { x.as_ptr().add(k) });
                let abs_x = _mm256_sign_epi8(xv, xv);
                for (u, a) in acc.iter_mut().enumerate() {
                    let qv = load(unsafe { q.as_ptr().add((j + u) * cols + k) });
                    let pairs = _mm256_maddubs_epi16(abs_x, _mm256_sign_epi8(qv, xv));
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
                }
                k += 32;
            }
            if half > full {
                // 16 more columns in 128-bit registers.
                let x16 = unsafe { _mm_loadu_si128(x.as_ptr().add(full) as *const __m128i) };
                let abs_x = _mm_sign_epi8(x16, x16);
                for (u, a) in acc.iter_mut().enumerate() {
                    let q16 = unsafe {
                        _mm_loadu_si128(q.as_ptr().add((j + u) * cols + full) as *const __m128i)
                    };
                    let pairs = _mm_maddubs_epi16(abs_x, _mm_sign_epi8(q16, x16));
                    let sums = _mm_madd_epi16(pairs, _mm_set1_epi16(1));
                    *a = _mm256_add_epi32(*a, _mm256_zextsi128_si256(sums));
                }
            }
            let h01 = _mm256_hadd_epi32(acc[0], acc[1]);
            let h23 = _mm256_hadd_epi32(acc[2], acc[3]);
            let h45 = _mm256_hadd_epi32(acc[4], acc[5]);
            let h67 = _mm256_hadd_epi32(acc[6], acc[7]);
            let lo = _mm256_hadd_epi32(h01, h23);
            let hi = _mm256_hadd_epi32(h45, h67);
            let mut sums = _mm256_add_epi32(
                _mm256_permute2x128_si256(lo, hi, 0x20),
                _mm256_permute2x128_si256(lo, hi, 0x31),
            );
            if half < cols {
                let mut tail = [0i32; 8];
                for (u, t) in tail.iter_mut().enumerate() {
                    *t = dot_i8_portable(&x[half..], &q[(j + u) * cols + half..(j + u + 1) * cols]);
                }
                sums = _mm256_add_epi32(sums, unsafe {
                    _mm256_loadu_si256(tail.as_ptr() as *const __m256i)
                });
            }
            let scales = unsafe { _mm256_loadu_ps(scale.as_ptr().add(j)) };
            let v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), scales), xscale);
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(j), v) };
            j += 8;
        }
        for jj in j..rows {
            o[jj] = xs[i] * scale[jj] * dot_i8(x, &q[jj * cols..(jj + 1) * cols]) as f32;
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
