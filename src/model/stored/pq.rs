//! Product quantization of a table's rows: each row cut into `subspaces`
//! equal sub-vectors, each sub-vector replaced by the nearest of 256
//! centroids learned for its subspace (k-means), so a row is stored as one
//! byte per subspace plus the shared codebooks.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// Centroids per subspace: a code is one byte.
pub const CENTROIDS: usize = 256;

/// Lloyd iterations at most (fewer once no code changes).
const ITERATIONS: usize = 25;

/// The codes (`rows × subspaces`, row-major) and codebooks
/// (`subspaces × CENTROIDS × cols / subspaces`) of `data`, a row-major
/// `rows × cols` table, by k-means in each subspace. Deterministic for a
/// seed: the starting centroids are distinct rows drawn by it (with
/// probability in proportion to their weights), ties go to the lower
/// centroid, and a centroid left with no rows keeps its value.
/// `subspaces` divides `cols`. `weights` (one per row, positive; `None`
/// for all alike) weigh each row's squared error: a centroid is its rows'
/// weighted mean, so heavy rows (frequent items) are stored closer.
pub fn fit(
    data: &[f32],
    rows: usize,
    cols: usize,
    subspaces: usize,
    weights: Option<&[f32]>,
    seed: u64,
) -> (Vec<u8>, Vec<f32>) {
    assert!(
        subspaces > 0 && cols.is_multiple_of(subspaces),
        "subspaces divide cols"
    );
    assert_eq!(data.len(), rows * cols, "table size");
    if let Some(w) = weights {
        assert_eq!(w.len(), rows, "one weight per row");
    }
    let sub = cols / subspaces;
    let k = CENTROIDS.min(rows);
    let mut codes = vec![0u8; rows * subspaces];
    let mut codebook = vec![0.0f32; subspaces * CENTROIDS * sub];
    let mut points = vec![0.0f32; rows * sub];
    let mut assigned = vec![0u8; rows];
    for s in 0..subspaces {
        gather(data, cols, s * sub, sub, &mut points);
        let book = &mut codebook[s * CENTROIDS * sub..(s + 1) * CENTROIDS * sub];
        let order = draw_order(rows, weights, seed ^ (s as u64).wrapping_mul(0x9e37_79b9));
        for (c, &r) in order.iter().take(k).enumerate() {
            book[c * sub..(c + 1) * sub].copy_from_slice(&points[r * sub..(r + 1) * sub]);
        }
        assign(&points, sub, &book[..k * sub], &mut assigned);
        for _ in 0..ITERATIONS {
            update_means(&points, sub, &assigned, weights, &mut book[..k * sub]);
            let before = assigned.clone();
            assign(&points, sub, &book[..k * sub], &mut assigned);
            if before == assigned {
                break;
            }
        }
        for (r, &a) in assigned.iter().enumerate() {
            codes[r * subspaces + s] = a;
        }
    }
    (codes, codebook)
}

/// The codebooks that reproduce `data` best with these `codes` (each
/// centroid the weighted mean of its sub-vectors; one with none keeps its
/// value in `codebook`): the weighted least-squares projection of a table
/// onto the tables these codes can store.
pub fn refit(
    data: &[f32],
    cols: usize,
    subspaces: usize,
    codes: &[u8],
    weights: Option<&[f32]>,
    codebook: &mut [f32],
) {
    let rows = codes.len() / subspaces;
    let sub = cols / subspaces;
    let mut points = vec![0.0f32; rows * sub];
    let mut assigned = vec![0u8; rows];
    for s in 0..subspaces {
        gather(data, cols, s * sub, sub, &mut points);
        for (r, a) in assigned.iter_mut().enumerate() {
            *a = codes[r * subspaces + s];
        }
        update_means(
            &points,
            sub,
            &assigned,
            weights,
            &mut codebook[s * CENTROIDS * sub..(s + 1) * CENTROIDS * sub],
        );
    }
}

/// Row `j` of the table the codes and codebooks store.
pub fn row_into(codes: &[u8], codebook: &[f32], subspaces: usize, j: usize, out: &mut [f32]) {
    let sub = out.len() / subspaces;
    for (s, span) in out.chunks_exact_mut(sub).enumerate() {
        let c = codes[j * subspaces + s] as usize;
        let at = (s * CENTROIDS + c) * sub;
        // An element loop, not `copy_from_slice`: a call to `memcpy` per
        // few-value sub-vector costs more than the copy.
        for (o, &v) in span.iter_mut().zip(&codebook[at..at + sub]) {
            *o = v;
        }
    }
}

/// Columns `from..from + sub` of every row, contiguous.
fn gather(data: &[f32], cols: usize, from: usize, sub: usize, out: &mut [f32]) {
    for (row, o) in data.chunks_exact(cols).zip(out.chunks_exact_mut(sub)) {
        o.copy_from_slice(&row[from..from + sub]);
    }
}

/// Each point's nearest centroid (squared distance; ties to the lower one).
fn assign(points: &[f32], sub: usize, book: &[f32], out: &mut [u8]) {
    out.par_chunks_mut(1024)
        .zip(points.par_chunks(1024 * sub))
        .for_each(|(out, points)| {
            for (o, p) in out.iter_mut().zip(points.chunks_exact(sub)) {
                let mut best = (f32::INFINITY, 0usize);
                for (c, centroid) in book.chunks_exact(sub).enumerate() {
                    let d: f32 = p.iter().zip(centroid).map(|(a, b)| (a - b) * (a - b)).sum();
                    if d < best.0 {
                        best = (d, c);
                    }
                }
                *o = best.1 as u8;
            }
        });
}

/// Rows in the order their starting centroids are drawn: a seeded
/// shuffle, or with weights a weighted draw without replacement (each row
/// keyed by `u^(1/w)` for a uniform `u`, largest first).
fn draw_order(rows: usize, weights: Option<&[f32]>, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..rows).collect();
    match weights {
        None => order.shuffle(&mut rng),
        Some(w) => {
            let keys: Vec<f64> = w
                .iter()
                .map(|&w| rng.random::<f64>().ln() / f64::from(w).max(f64::MIN_POSITIVE))
                .collect();
            order.sort_by(|&a, &b| keys[b].total_cmp(&keys[a]).then(a.cmp(&b)));
        }
    }
    order
}

/// Each centroid the (weighted) mean of its points (sums in `f64`, in row
/// order).
fn update_means(
    points: &[f32],
    sub: usize,
    assigned: &[u8],
    weights: Option<&[f32]>,
    book: &mut [f32],
) {
    let k = book.len() / sub;
    let mut sums = vec![0.0f64; k * sub];
    let mut mass = vec![0.0f64; k];
    for (r, (p, &a)) in points.chunks_exact(sub).zip(assigned).enumerate() {
        let a = a as usize;
        let w = weights.map_or(1.0, |w| f64::from(w[r]));
        mass[a] += w;
        for (s, &v) in sums[a * sub..(a + 1) * sub].iter_mut().zip(p) {
            *s += w * f64::from(v);
        }
    }
    for c in 0..k {
        if mass[c] > 0.0 {
            for t in 0..sub {
                book[c * sub + t] = (sums[c * sub + t] / mass[c]) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::Range;

    /// The (weighted) squared error of rows `rows_of` of `data` as the
    /// codes and codebooks store them.
    fn squared_error(
        data: &[f32],
        cols: usize,
        m: usize,
        codes: &[u8],
        book: &[f32],
        rows_of: Range<usize>,
        weights: Option<&[f32]>,
    ) -> f64 {
        let mut row = vec![0.0; cols];
        rows_of
            .map(|r| {
                row_into(codes, book, m, r, &mut row);
                let e: f64 = row
                    .iter()
                    .zip(&data[r * cols..(r + 1) * cols])
                    .map(|(a, b)| f64::from((a - b) * (a - b)))
                    .sum();
                e * weights.map_or(1.0, |w| f64::from(w[r]))
            })
            .sum()
    }

    #[test]
    fn a_table_with_few_distinct_sub_vectors_is_stored_exactly() {
        // 300 rows drawn from 5 distinct sub-vectors per subspace: k-means
        // with 256 centroids must find each of them.
        let (rows, cols, m) = (300, 8, 4);
        let mut rng = StdRng::seed_from_u64(3);
        let atoms: Vec<f32> = (0..5 * 2).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut data = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for s in 0..m {
                let a = rng.random_range(0..5);
                data[r * cols + s * 2..r * cols + s * 2 + 2]
                    .copy_from_slice(&atoms[a * 2..a * 2 + 2]);
            }
        }
        let (codes, book) = fit(&data, rows, cols, m, None, 7);
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            row_into(&codes, &book, m, r, &mut row);
            assert_eq!(row, data[r * cols..(r + 1) * cols], "row {r}");
        }
        assert_eq!(
            fit(&data, rows, cols, m, None, 7),
            (codes, book),
            "same seed, same codes"
        );
    }

    #[test]
    fn k_means_beats_its_starting_rows_and_refit_is_the_least_squares_codebook() {
        let (rows, cols, m) = (2000, 8, 2);
        let mut rng = StdRng::seed_from_u64(5);
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let (codes, book) = fit(&data, rows, cols, m, None, 1);
        let error =
            |codes: &[u8], book: &[f32]| squared_error(&data, cols, m, codes, book, 0..rows, None);
        // Each row's code is its nearest centroid: no other code does better.
        let mut row = vec![0.0; cols];
        for r in (0..rows).step_by(97) {
            for s in 0..m {
                row_into(&codes, &book, m, r, &mut row);
                let own: f32 = (0..4)
                    .map(|t| (row[s * 4 + t] - data[r * cols + s * 4 + t]).powi(2))
                    .sum();
                for c in 0..CENTROIDS {
                    let at = (s * CENTROIDS + c) * 4;
                    let d: f32 = (0..4)
                        .map(|t| (book[at + t] - data[r * cols + s * 4 + t]).powi(2))
                        .sum();
                    assert!(
                        own <= d + 1e-6,
                        "row {r} subspace {s}: centroid {c} is nearer"
                    );
                }
            }
        }
        // Moving any centroid off its mean makes the fit worse; refit puts it back.
        let base = error(&codes, &book);
        let mut moved = book.clone();
        for v in moved.iter_mut().step_by(3) {
            *v += 0.05;
        }
        assert!(error(&codes, &moved) > base);
        refit(&data, cols, m, &codes, None, &mut moved);
        assert!((error(&codes, &moved) - base).abs() < 1e-6 * base.max(1.0));
    }

    #[test]
    fn weighted_k_means_stores_heavy_rows_closer_and_refit_is_their_weighted_mean() {
        // 4,000 random rows, the first 200 weighing 100 times the rest: the
        // weighted fit must store those 200 with less error than the plain
        // fit does, and refit must give the weighted least-squares codebook.
        let (rows, cols, m) = (4000, 8, 2);
        let mut rng = StdRng::seed_from_u64(11);
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let weights: Vec<f32> = (0..rows)
            .map(|r| if r < 200 { 100.0 } else { 1.0 })
            .collect();
        let error_of = |codes: &[u8], book: &[f32], rows_of: Range<usize>, w: Option<&[f32]>| {
            squared_error(&data, cols, m, codes, book, rows_of, w)
        };
        let (plain_codes, plain_book) = fit(&data, rows, cols, m, None, 1);
        let (codes, book) = fit(&data, rows, cols, m, Some(&weights), 1);
        let heavy_plain = error_of(&plain_codes, &plain_book, 0..200, None);
        let heavy = error_of(&codes, &book, 0..200, None);
        assert!(
            heavy < 0.7 * heavy_plain,
            "heavy rows: weighted {heavy} against plain {heavy_plain}"
        );
        let base = error_of(&codes, &book, 0..rows, Some(&weights));
        let mut moved = book.clone();
        for v in moved.iter_mut().step_by(3) {
            *v -= 0.05;
        }
        assert!(error_of(&codes, &moved, 0..rows, Some(&weights)) > base);
        refit(&data, cols, m, &codes, Some(&weights), &mut moved);
        let refitted = error_of(&codes, &moved, 0..rows, Some(&weights));
        // The weighted least-squares codebook for these codes: no worse than
        // the fit's own (equal once its iterations have converged).
        assert!(refitted <= base * (1.0 + 1e-6), "{refitted} vs {base}");
        assert_eq!(
            fit(&data, rows, cols, m, Some(&weights), 1),
            (codes, book),
            "same seed and weights, same codes"
        );
    }
}
