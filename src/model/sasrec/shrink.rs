//! Shrinking a trained SASRec model into a compressed variant: the
//! content projection folded into the item table, feed-forward units
//! pruned (structured), the item table projected onto its top singular
//! subspace (low rank) or product-quantized (each row one of 256 centroids
//! per sub-vector), small weights zeroed (unstructured), and the result
//! encoded as stored matrices (factors, sparse rows, codes, int8/int4).
//!
//! The steps run in a fixed order: [`shrink`] (structured, low rank or
//! product quantization, unstructured), an optional recovery fine-tune done
//! by the compress stage (with [`constrain`] after every optimizer step, so
//! the recovered model still compresses exactly), then [`encode`].

use nalgebra::DMatrix;

use super::infer::StoredSasRec;
use super::{SasRec, SasRecConfig, Weights};
use crate::config::{CompressSpec, Quantization, RankChoice, Variant};
use crate::error::{Error, Result};
use crate::model::stored::{Matrix, PqHead, pq};

/// The k-means seed of product quantization (a variant is the same for
/// the same model).
const PQ_SEED: u64 = 0x005e_ed0f_c0de;

/// A product-quantized item table's codes: which centroid stands for each
/// sub-vector of each row. The centroids themselves follow from the rows
/// ([`pq::refit`]), so recovery may move them while the codes stay.
#[derive(Debug, Clone)]
pub struct PqCodes {
    /// Sub-vectors per row.
    pub subspaces: usize,
    /// `n_items × subspaces`.
    pub codes: Vec<u8>,
    /// Each row's weight in the codebooks' least squares (`None`: alike;
    /// 0 for the head's rows, which the codebooks need not store).
    pub weights: Option<Vec<f32>>,
    /// The rows kept whole, increasing: never rebuilt from codes.
    pub head: Vec<u32>,
}

impl PqCodes {
    /// Puts `table` (`n × d`) onto the tables these codes store: the
    /// codebooks refitted to its rows, then each row not in the head
    /// rebuilt from them. Returns the codebooks.
    fn project(&self, table: &mut [f32], d: usize) -> Vec<f32> {
        let mut codebook = vec![0.0f32; self.subspaces * pq::CENTROIDS * (d / self.subspaces)];
        // The head's rows never weigh in the codebooks, weights given or not.
        let head_only;
        let weights = match &self.weights {
            Some(w) => Some(w.as_slice()),
            None if self.head.is_empty() => None,
            None => {
                let mut w = vec![1.0f32; self.codes.len() / self.subspaces];
                for &h in &self.head {
                    w[h as usize] = 0.0;
                }
                head_only = w;
                Some(head_only.as_slice())
            }
        };
        pq::refit(
            table,
            d,
            self.subspaces,
            &self.codes,
            weights,
            &mut codebook,
        );
        let mut head = self.head.iter().peekable();
        for (j, row) in table.chunks_exact_mut(d).enumerate() {
            if head.next_if(|&&h| h as usize == j).is_none() {
                pq::row_into(&self.codes, &codebook, self.subspaces, j, row);
            }
        }
        codebook
    }
}

/// A variant's model after its shape steps, before encoding.
#[derive(Debug, Clone)]
pub struct Shrunk {
    /// The model, pruned and projected (still dense `f32`).
    pub model: SasRec,
    /// The rank the low-rank step chose.
    pub rank: Option<usize>,
    /// Low rank: `V_r V_rᵀ`, the projector onto the item table's subspace.
    pub basis: Option<Vec<f32>>,
    /// Unstructured pruning: per pruned matrix, which weights are kept.
    pub masks: Option<Vec<Vec<bool>>>,
    /// Product quantization: the item table's codes.
    pub pq: Option<PqCodes>,
    /// What each step did, for the artifact's provenance.
    pub steps: Vec<String>,
}

/// The shape steps of `variant` on `source` (content already folded):
/// structured pruning of feed-forward units, low-rank projection of the
/// item table (or its product quantization: k-means codes, the table
/// replaced by what they store), then unstructured magnitude pruning in
/// `prune_scope`. A sub-vector count that does not divide `d_model` is a
/// configuration error. `item_counts` (training events per item) order the
/// items for the variant's head (the rows kept whole) and, at
/// `pq_weighting` > 0, weigh each row in the k-means by
/// `(events + 1)^pq_weighting`, so frequent items are stored closer.
pub fn shrink(
    source: &SasRec,
    variant: &Variant,
    prune_scope: &str,
    item_counts: Option<&[u64]>,
    pq_weighting: f64,
) -> Result<Shrunk> {
    let mut model = source.clone();
    let mut steps = Vec::new();
    let d = model.config.d_model;
    if let Some(f) = variant.structured {
        let before = model.config.ffn;
        model = prune_ffn_units(&model, f);
        steps.push(format!(
            "feed-forward units {before} → {} per layer (lowest ‖w1 column‖·‖w2 row‖ removed)",
            model.config.ffn
        ));
    }
    let mut basis = None;
    let mut rank = None;
    if let Some(choice) = variant.lowrank {
        let svd = Svd::of(&model.weights.item, model.config.n_items, d);
        let r = svd.rank_for(choice, d);
        let energy = svd.energy(r);
        let p = svd.projector(r);
        project_rows(&mut model.weights.item, &p, d);
        basis = Some(p);
        rank = Some(r);
        steps.push(format!(
            "item table rank {} → {r}, spectral energy kept {energy:.4}",
            d.min(model.config.n_items)
        ));
    }
    let mut pq_codes = None;
    if let Some(m) = variant.pq {
        if m > d || !d.is_multiple_of(m) {
            return Err(Error::config(format!(
                "compress.variants {:?}: {m} sub-vectors do not divide d_model {d}",
                variant.to_string()
            )));
        }
        let n = model.config.n_items;
        let before = model.weights.item.clone();
        let name = variant.to_string();
        if item_counts.is_some_and(|c| c.len() != n) {
            return Err(Error::config(format!(
                "compress.variants {name:?}: item counts must be one per item ({n})"
            )));
        }
        let (head, weights) = pq_rows(item_counts, variant.pq_head, pq_weighting, n)
            .map_err(|e| Error::config(format!("compress.variants {name:?}: {e}")))?;
        let (codes, _) = pq::fit(&before, n, d, m, weights.as_deref(), PQ_SEED);
        let codes = PqCodes {
            subspaces: m,
            codes,
            weights,
            head,
        };
        codes.project(&mut model.weights.item, d);
        let total: f64 = before.iter().map(|v| f64::from(v * v)).sum();
        let error: f64 = before
            .iter()
            .zip(&model.weights.item)
            .map(|(a, b)| f64::from((a - b) * (a - b)))
            .sum();
        steps.push(format!(
            "item table product-quantized: {m} sub-vectors of {} values per row, {} centroids each (k-means{}), {} rows of the most frequent items kept whole, relative squared error {:.4}",
            d / m,
            pq::CENTROIDS,
            if pq_weighting > 0.0 {
                format!(", rows weighted by (events + 1)^{pq_weighting}")
            } else {
                String::new()
            },
            codes.head.len(),
            error / total.max(f64::MIN_POSITIVE)
        ));
        pq_codes = Some(codes);
    }
    let mut masks = None;
    if let Some(s) = variant.unstructured {
        let m = prune_magnitude(&mut model.weights, s, prune_scope);
        let (zero, total) = m.iter().flatten().fold((0usize, 0usize), |(z, t), &keep| {
            (z + usize::from(!keep), t + 1)
        });
        steps.push(format!(
            "unstructured magnitude pruning ({prune_scope} scope): {zero} of {total} matrix weights removed ({:.4})",
            zero as f64 / total.max(1) as f64
        ));
        masks = Some(m);
    }
    Ok(Shrunk {
        model,
        rank,
        basis,
        masks,
        pq: pq_codes,
        steps,
    })
}

/// The head (the `head` items with the most training events, ties to the
/// lower index, increasing) and the k-means row weights: `(events + 1)^power`
/// at `power` > 0, else 1, and 0 for the head's rows. `None` for weights
/// when every row weighs alike.
fn pq_rows(
    counts: Option<&[u64]>,
    head: Option<usize>,
    power: f64,
    n: usize,
) -> std::result::Result<(Vec<u32>, Option<Vec<f32>>), String> {
    let need = head.is_some() || power > 0.0;
    let counts = match counts {
        Some(c) => c,
        None if need => {
            return Err("a head or weighted rows need the items' training events".into());
        }
        None => return Ok((Vec::new(), None)),
    };
    let mut rows = Vec::new();
    if let Some(h) = head {
        if h >= n {
            return Err(format!(
                "head-{h} keeps at least every one of the {n} items' rows; use a smaller head or int8"
            ));
        }
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
        rows = order[..h].to_vec();
        rows.sort_unstable();
    }
    if !need {
        return Ok((rows, None));
    }
    let mut weights: Vec<f32> = counts
        .iter()
        .map(|&c| {
            if power > 0.0 {
                (c as f64 + 1.0).powf(power) as f32
            } else {
                1.0
            }
        })
        .collect();
    for &r in &rows {
        weights[r as usize] = 0.0;
    }
    Ok((rows, Some(weights)))
}

/// Puts the compression constraints back after an optimizer step: the
/// item table onto its subspace (`basis`) or onto what its product
/// quantization's codes store (`pq`), pruned weights to zero (`masks`).
pub fn constrain(
    model: &mut SasRec,
    basis: Option<&[f32]>,
    masks: Option<&[Vec<bool>]>,
    pq: Option<&PqCodes>,
) {
    if let Some(p) = basis {
        project_rows(&mut model.weights.item, p, model.config.d_model);
    }
    if let Some(codes) = pq {
        codes.project(&mut model.weights.item, model.config.d_model);
    }
    if let Some(masks) = masks {
        for (t, mask) in matrices_mut(&mut model.weights).into_iter().zip(masks) {
            for (v, &keep) in t.iter_mut().zip(mask) {
                if !keep {
                    *v = 0.0;
                }
            }
        }
    }
}

/// Encodes a shrunk (and possibly recovered) model as `variant` stores it:
/// the item table as rank-`rank` factors or as its product quantization's
/// codes and codebooks, pruned matrices as sparse rows, every other matrix
/// quantized (`int4` in groups of `int4_group`).
pub fn encode(
    model: &SasRec,
    variant: &Variant,
    rank: Option<usize>,
    pq: Option<&PqCodes>,
    int4_group: usize,
) -> StoredSasRec {
    let d = model.config.d_model;
    let mut stored = StoredSasRec::from_dense(model);
    if let Some(r) = rank {
        let (n, table) = (model.config.n_items, &model.weights.item);
        stored.item = Svd::of(table, n, d).factors(r);
    }
    if variant.unstructured.is_some() {
        let int8 = variant.quantization == Some(Quantization::Int8);
        for m in stored.matrices_mut() {
            let (rows, cols) = (m.rows(), m.cols());
            *m = Matrix::sparsify(rows, cols, &m.to_dense(), int8);
        }
    } else if let Some(q) = variant.quantization {
        for m in stored.matrices_mut() {
            *m = quantize(m, q, int4_group);
        }
    }
    if let Some(codes) = pq {
        let (n, mut table) = (model.config.n_items, model.weights.item.clone());
        let codebook = codes.project(&mut table, d);
        let head = (!codes.head.is_empty()).then(|| {
            let rows: Vec<f32> = codes
                .head
                .iter()
                .flat_map(|&r| table[r as usize * d..(r as usize + 1) * d].iter().copied())
                .collect();
            let dense = Matrix::dense(codes.head.len(), d, rows);
            let values = match variant.quantization {
                Some(q) => quantize(&dense, q, int4_group),
                None => dense,
            };
            PqHead::new(codes.head.clone(), values, n)
                .expect("the head's rows are increasing item indices")
        });
        stored.item = Matrix::Pq {
            rows: n,
            cols: d,
            subspaces: codes.subspaces,
            codes: codes.codes.clone(),
            codebook,
            head,
        };
    }
    stored
}

/// `variant` of `source` without recovery (benchmarks; the compress stage
/// recovers pruned and low-rank variants between the two steps).
pub fn encode_variant(
    source: &SasRec,
    variant: &Variant,
    spec: &CompressSpec,
    item_counts: Option<&[u64]>,
) -> Result<StoredSasRec> {
    let shrunk = shrink(
        &fold_content(source),
        variant,
        &spec.prune_scope,
        item_counts,
        spec.pq_weighting,
    )?;
    Ok(encode(
        &shrunk.model,
        variant,
        shrunk.rank,
        shrunk.pq.as_ref(),
        spec.int4_group,
    ))
}

/// The model with its content projection folded into the id table (the
/// item table it scores with), so compression sees one `n_items × d` table.
pub fn fold_content(model: &SasRec) -> SasRec {
    if model.config.content_dim == 0 {
        return model.clone();
    }
    let config = SasRecConfig {
        content_dim: 0,
        ..model.config
    };
    let mut weights = model.weights.clone();
    weights.item = model.item_table();
    weights.content_w.clear();
    weights.content_b.clear();
    SasRec {
        config,
        weights,
        content: Vec::new(),
    }
}

fn quantize(m: &Matrix, q: Quantization, group: usize) -> Matrix {
    match m {
        Matrix::LowRank { u, v } => Matrix::LowRank {
            u: Box::new(quantize(u, q, group)),
            v: Box::new(quantize(v, q, group)),
        },
        _ => {
            let (rows, cols, data) = (m.rows(), m.cols(), m.to_dense());
            match q {
                Quantization::Int8 => Matrix::quantize_int8(rows, cols, &data),
                Quantization::Int4 => Matrix::quantize_int4(rows, cols, group.min(cols), &data),
            }
        }
    }
}

/// Removes the `fraction` of feed-forward units with the smallest
/// `‖w1[:, u]‖ · ‖w2[u, :]‖` in every layer (the same count per layer, at
/// least one kept): smaller dense `w1`, `b1`, `w2`.
pub fn prune_ffn_units(model: &SasRec, fraction: f32) -> SasRec {
    let c = model.config;
    let (d, f) = (c.d_model, c.ffn);
    let keep = (((1.0 - fraction) * f as f32).round() as usize).clamp(1, f);
    let config = SasRecConfig { ffn: keep, ..c };
    let mut weights = model.weights.clone();
    for layer in &mut weights.layers {
        let norm = |u: usize| {
            let a: f32 = (0..d).map(|k| layer.w1[k * f + u].powi(2)).sum();
            let b: f32 = layer.w2[u * d..(u + 1) * d].iter().map(|v| v * v).sum();
            a.sqrt() * b.sqrt()
        };
        let mut units: Vec<usize> = (0..f).collect();
        units.sort_by(|&a, &b| norm(b).total_cmp(&norm(a)).then(a.cmp(&b)));
        let mut kept = units[..keep].to_vec();
        kept.sort_unstable();
        let mut w1 = Vec::with_capacity(d * keep);
        for k in 0..d {
            w1.extend(kept.iter().map(|&u| layer.w1[k * f + u]));
        }
        let b1 = kept.iter().map(|&u| layer.b1[u]).collect();
        let w2 = kept
            .iter()
            .flat_map(|&u| layer.w2[u * d..(u + 1) * d].iter().copied())
            .collect();
        layer.w1 = w1;
        layer.b1 = b1;
        layer.w2 = w2;
    }
    SasRec {
        config,
        weights,
        content: model.content.clone(),
    }
}

/// The matrices of the dense weights that pruning applies to.
fn matrices_mut(w: &mut Weights) -> Vec<&mut Vec<f32>> {
    let mut out = vec![&mut w.item, &mut w.pos];
    for l in &mut w.layers {
        out.extend([&mut l.wqkv, &mut l.wo, &mut l.w1, &mut l.w2]);
    }
    out
}

/// Zeroes the `sparsity` share of smallest-magnitude weights of each
/// matrix (`layer` scope) or of all matrices together (`global`); returns
/// the kept masks.
pub fn prune_magnitude(w: &mut Weights, sparsity: f32, scope: &str) -> Vec<Vec<bool>> {
    let threshold = |values: &mut Vec<f32>| -> f32 {
        let cut = ((sparsity as f64) * values.len() as f64).round() as usize;
        if cut == 0 {
            return -1.0;
        }
        values.sort_by(f32::total_cmp);
        values[cut.min(values.len()) - 1]
    };
    let mut tensors = matrices_mut(w);
    let global = if scope == "global" {
        let mut all: Vec<f32> = tensors
            .iter()
            .flat_map(|t| t.iter().map(|v| v.abs()))
            .collect();
        Some(threshold(&mut all))
    } else {
        None
    };
    let mut masks = Vec::with_capacity(tensors.len());
    for t in &mut tensors {
        let cut = global.unwrap_or_else(|| threshold(&mut t.iter().map(|v| v.abs()).collect()));
        // Ties at the threshold: keep the count exact by removing in order.
        let mut to_remove = if global.is_some() {
            usize::MAX
        } else {
            ((sparsity as f64) * t.len() as f64).round() as usize
        };
        let mut mask = vec![true; t.len()];
        for (v, keep) in t.iter_mut().zip(mask.iter_mut()) {
            if v.abs() < cut || (v.abs() == cut && to_remove > 0) {
                *v = 0.0;
                *keep = false;
            }
            if !*keep {
                to_remove = to_remove.saturating_sub(1);
            }
        }
        masks.push(mask);
    }
    masks
}

/// `rows ← rows · P` for a row-major matrix with `d` columns.
fn project_rows(table: &mut [f32], p: &[f32], d: usize) {
    let mut tmp = vec![0.0f32; d];
    for row in table.chunks_exact_mut(d) {
        for (j, t) in tmp.iter_mut().enumerate() {
            *t = (0..d).map(|k| row[k] * p[k * d + j]).sum();
        }
        row.copy_from_slice(&tmp);
    }
}

/// A thin SVD `A = U Σ Vᵀ` of a row-major `rows × cols` matrix, singular
/// values in decreasing order.
pub struct Svd {
    rows: usize,
    cols: usize,
    /// Singular values, decreasing.
    pub sigma: Vec<f64>,
    u: DMatrix<f64>,
    v_t: DMatrix<f64>,
}

impl Svd {
    /// The decomposition (in f64).
    pub fn of(a: &[f32], rows: usize, cols: usize) -> Svd {
        let m = DMatrix::from_row_iterator(rows, cols, a.iter().map(|&v| f64::from(v)));
        let svd = m.svd(true, true);
        Svd {
            rows,
            cols,
            sigma: svd.singular_values.iter().copied().collect(),
            u: svd.u.expect("U was asked for"),
            v_t: svd.v_t.expect("Vᵀ was asked for"),
        }
    }

    /// Share of Σσ² held by the first `r` singular values.
    pub fn energy(&self, r: usize) -> f64 {
        let total: f64 = self.sigma.iter().map(|s| s * s).sum();
        if total == 0.0 {
            return 1.0;
        }
        self.sigma.iter().take(r).map(|s| s * s).sum::<f64>() / total
    }

    /// The rank `choice` picks (1 ..= min(rows, cols)).
    pub fn rank_for(&self, choice: RankChoice, d: usize) -> usize {
        let most = self.sigma.len().max(1);
        let r = match choice {
            RankChoice::Fixed(r) => r,
            RankChoice::Ratio(x) => (x * d as f32).round() as usize,
            RankChoice::Energy(e) => (1..=most)
                .find(|&r| self.energy(r) >= f64::from(e) - 1e-12)
                .unwrap_or(most),
        };
        r.clamp(1, most)
    }

    /// `V_r V_rᵀ` (`cols × cols`, row-major): projects rows onto the top-`r`
    /// right singular subspace.
    pub fn projector(&self, r: usize) -> Vec<f32> {
        let c = self.cols;
        let mut p = vec![0.0f32; c * c];
        for i in 0..c {
            for j in 0..c {
                p[i * c + j] = (0..r)
                    .map(|t| self.v_t[(t, i)] * self.v_t[(t, j)])
                    .sum::<f64>() as f32;
            }
        }
        p
    }

    /// The rank-`r` factors as a stored matrix: `U_r Σ_r` (`rows × r`) and
    /// `V_rᵀ` (`r × cols`).
    pub fn factors(&self, r: usize) -> Matrix {
        let mut u = Vec::with_capacity(self.rows * r);
        for i in 0..self.rows {
            u.extend((0..r).map(|t| (self.u[(i, t)] * self.sigma[t]) as f32));
        }
        let mut v = Vec::with_capacity(r * self.cols);
        for t in 0..r {
            v.extend((0..self.cols).map(|j| self.v_t[(t, j)] as f32));
        }
        Matrix::LowRank {
            u: Box::new(Matrix::dense(self.rows, r, u)),
            v: Box::new(Matrix::dense(r, self.cols, v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sasrec::tests_support::random_model;

    #[test]
    fn svd_reconstruction_error_is_the_discarded_singular_values() {
        let (rows, cols) = (40, 12);
        let a: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let svd = Svd::of(&a, rows, cols);
        assert!(svd.sigma.windows(2).all(|w| w[0] >= w[1]));
        for r in [1, 4, 6, 12] {
            let approx = svd.factors(r).to_dense();
            let err: f64 = a
                .iter()
                .zip(&approx)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum();
            let discarded: f64 = svd.sigma[r..].iter().map(|s| s * s).sum();
            assert!(
                (err - discarded).abs() <= 1e-4 * discarded.max(1.0),
                "rank {r}: ‖A − A_r‖² {err} vs Σ discarded σ² {discarded}"
            );
            // Projecting onto the top-r subspace is the same approximation.
            let mut projected = a.clone();
            project_rows(&mut projected, &svd.projector(r), cols);
            for (p, q) in projected.iter().zip(&approx) {
                assert!((p - q).abs() < 1e-4);
            }
        }
        assert_eq!(svd.rank_for(RankChoice::Ratio(0.5), cols), 6);
        assert_eq!(svd.rank_for(RankChoice::Fixed(99), cols), 12);
        let r = svd.rank_for(RankChoice::Energy(0.9), cols);
        assert!(svd.energy(r) >= 0.9 && svd.energy(r - 1) < 0.9);
    }

    #[test]
    fn product_quantization_stores_what_recovery_trains_and_scores_like_it() {
        let m = random_model(2, 0);
        let (n, d) = (m.config.n_items, m.config.d_model);
        let variant: Variant = "pq-4+int8".parse().unwrap();
        let shrunk = shrink(&m, &variant, "layer", None, 0.0).unwrap();
        let codes = shrunk.pq.clone().unwrap();
        assert_eq!((codes.subspaces, codes.codes.len()), (4, n * 4));
        // 13 items, 256 centroids: every sub-vector is its own centroid.
        for (a, b) in shrunk.model.weights.item.iter().zip(&m.weights.item) {
            assert!((a - b).abs() < 1e-6);
        }
        // Recovery's projection: rows sharing every code become their mean.
        let mut moved = m.clone();
        let shared = PqCodes {
            subspaces: 4,
            codes: (0..n * 4).map(|i| ((i / 4) % 3) as u8).collect(),
            weights: None,
            head: Vec::new(),
        };
        constrain(&mut moved, None, None, Some(&shared));
        let item = &moved.weights.item;
        for j in 0..n {
            let group: Vec<usize> = (0..n).filter(|k| k % 3 == j % 3).collect();
            for t in 0..d {
                let mean = group
                    .iter()
                    .map(|&k| m.weights.item[k * d + t])
                    .sum::<f32>()
                    / group.len() as f32;
                assert!((item[j * d + t] - mean).abs() < 1e-5, "row {j} value {t}");
            }
        }
        // Encoded, the item table is its codes and scores as the projected model.
        let stored = encode(&moved, &variant, None, Some(&shared), 32);
        assert_eq!(stored.item.layout().scheme(), "pq-4x256");
        let mut dense = StoredSasRec::from_dense(&moved);
        dense.item = Matrix::dense(n, d, moved.weights.item.clone());
        assert_eq!(stored.item.to_dense(), dense.item.to_dense());
        // Weighted codes: rows sharing every code become their weighted mean.
        let weights: Vec<f32> = (0..n).map(|j| 1.0 + j as f32).collect();
        let mut weighted = m.clone();
        let heavy = PqCodes {
            weights: Some(weights.clone()),
            ..shared.clone()
        };
        constrain(&mut weighted, None, None, Some(&heavy));
        for j in 0..n {
            let group: Vec<usize> = (0..n).filter(|k| k % 3 == j % 3).collect();
            let mass: f32 = group.iter().map(|&k| weights[k]).sum();
            for t in 0..d {
                let mean = group
                    .iter()
                    .map(|&k| weights[k] * m.weights.item[k * d + t])
                    .sum::<f32>()
                    / mass;
                let got = weighted.weights.item[j * d + t];
                assert!((got - mean).abs() < 1e-5, "weighted row {j} value {t}");
            }
        }
        // Weighted by training events, the head's rows kept whole: the three
        // most frequent items (ties to the lower index), weight 0 in k-means.
        let counts: Vec<u64> = (0..n as u64).map(|j| (j * 7) % 5).collect();
        let with_head: Variant = "pq-4+head-3+int8".parse().unwrap();
        let fitted = shrink(&m, &with_head, "layer", Some(&counts), 1.0).unwrap();
        let fitted_codes = fitted.pq.clone().unwrap();
        let mut top: Vec<u32> = (0..n as u32).collect();
        top.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
        let mut expect_head = top[..3].to_vec();
        expect_head.sort_unstable();
        assert_eq!(fitted_codes.head, expect_head);
        let w = fitted_codes.weights.as_deref().unwrap();
        for j in 0..n {
            let expected = if expect_head.contains(&(j as u32)) {
                0.0
            } else {
                (counts[j] as f32 + 1.0).powf(1.0)
            };
            assert_eq!(w[j], expected, "weight of row {j}");
        }
        // Recovery never rebuilds the head's rows from codes; encoding stores
        // them whole (int8) and the rest as codes.
        let mut free = m.clone();
        for v in free.weights.item.iter_mut() {
            *v += 0.25;
        }
        let before_constrain = free.weights.item.clone();
        let grouped = PqCodes {
            head: expect_head.clone(),
            ..shared.clone()
        };
        constrain(&mut free, None, None, Some(&grouped));
        for &h in &expect_head {
            let r = h as usize * d..(h as usize + 1) * d;
            assert_eq!(
                free.weights.item[r.clone()],
                before_constrain[r],
                "head row {h}"
            );
        }
        let stored = encode(&free, &with_head, None, Some(&grouped), 32);
        assert_eq!(stored.item.layout().scheme(), "pq-4x256+head-3(int8-row)");
        let decoded = stored.item.to_dense();
        for j in 0..n {
            let (got, want) = (
                &decoded[j * d..(j + 1) * d],
                &free.weights.item[j * d..(j + 1) * d],
            );
            let tolerance = if expect_head.contains(&(j as u32)) {
                0.02
            } else {
                1e-6
            };
            for (a, b) in got.iter().zip(want) {
                assert!((a - b).abs() <= tolerance, "row {j}: {a} vs {b}");
            }
        }
        // Counts that do not match the items, a head of every row, or a head
        // without counts are refused by the variant's name.
        let err = shrink(&m, &with_head, "layer", Some(&counts[1..]), 0.0).unwrap_err();
        assert!(err.to_string().contains("one per item"), "{err}");
        let all: Variant = format!("pq-4+head-{n}").parse().unwrap();
        let err = shrink(&m, &all, "layer", Some(&counts), 0.0).unwrap_err();
        assert!(err.to_string().contains(&format!("head-{n}")), "{err}");
        let err = shrink(&m, &with_head, "layer", None, 0.0).unwrap_err();
        assert!(err.to_string().contains("training events"), "{err}");
        // Sub-vectors that do not divide d_model are refused by name.
        let bad: Variant = "pq-3".parse().unwrap();
        let err = shrink(&m, &bad, "layer", None, 0.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pq-3") && err.contains("d_model 8"), "{err}");
    }

    #[test]
    fn magnitude_pruning_hits_the_sparsity_and_the_file_shrinks() {
        let m = random_model(2, 0);
        for scope in ["layer", "global"] {
            let mut w = m.weights.clone();
            let masks = prune_magnitude(&mut w, 0.6, scope);
            let mut pruned = m.clone();
            pruned.weights = w;
            let total: usize = masks.iter().map(Vec::len).sum();
            let removed: usize = masks.iter().flatten().filter(|k| !**k).count();
            let share = removed as f64 / total as f64;
            assert!((share - 0.6).abs() < 0.01, "{scope}: {share}");
            if scope == "layer" {
                for mask in &masks {
                    let r = mask.iter().filter(|k| !**k).count() as f64 / mask.len() as f64;
                    assert!((r - 0.6).abs() <= 1.0 / mask.len() as f64 + 1e-9, "{r}");
                }
            }
            // The kept weights are the largest ones.
            let kept_min = masks
                .iter()
                .zip(matrices_mut(&mut m.weights.clone()))
                .flat_map(|(mask, t)| {
                    mask.iter()
                        .zip(t.iter())
                        .filter(|(k, _)| **k)
                        .map(|(_, v)| v.abs())
                        .collect::<Vec<_>>()
                })
                .fold(f32::INFINITY, f32::min);
            if scope == "global" {
                let removed_max = masks
                    .iter()
                    .zip(matrices_mut(&mut m.weights.clone()))
                    .flat_map(|(mask, t)| {
                        mask.iter()
                            .zip(t.iter())
                            .filter(|(k, _)| !**k)
                            .map(|(_, v)| v.abs())
                            .collect::<Vec<_>>()
                    })
                    .fold(0.0f32, f32::max);
                assert!(removed_max <= kept_min);
            }
            // Stored sparsely, the matrices take 6 bytes per kept value (+ row offsets).
            let dense = StoredSasRec::from_dense(&m);
            let mut sparse = StoredSasRec::from_dense(&pruned);
            for mat in sparse.matrices_mut() {
                *mat = Matrix::sparsify(mat.rows(), mat.cols(), &mat.to_dense(), false);
            }
            let bytes = |s: &StoredSasRec| -> u64 {
                s.matrices().iter().map(|(_, m)| m.stored_bytes()).sum()
            };
            let kept = (total - removed) as u64;
            let offsets: u64 = sparse
                .matrices()
                .iter()
                .map(|(_, m)| 4 * (m.rows() as u64 + 1))
                .sum();
            assert_eq!(bytes(&sparse), 6 * kept + offsets);
            assert!(bytes(&sparse) < bytes(&dense));
        }
    }

    #[test]
    fn structured_pruning_keeps_the_strongest_units_and_the_function_of_the_rest() {
        let mut m = random_model(1, 0);
        // Silence unit 3 entirely: removing it must not change any score.
        let (d, f) = (m.config.d_model, m.config.ffn);
        m.weights.layers[0].w2[3 * d..4 * d].fill(0.0);
        let pruned = prune_ffn_units(&m, 1.0 / f as f32);
        assert_eq!(pruned.config.ffn, f - 1);
        let histories: Vec<&[u32]> = vec![&[1, 2, 3], &[4], &[5, 6, 7, 8, 9, 10]];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        crate::model::Scorer::score(&m, &histories, &mut a).unwrap();
        crate::model::Scorer::score(&pruned, &histories, &mut b).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        let half = prune_ffn_units(&m, 0.5);
        assert_eq!(half.config.ffn, f / 2);
        assert_eq!(half.weights.layers[0].w1.len(), d * f / 2);
    }
}
