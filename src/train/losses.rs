//! Distillation losses on one row of student logits (one per catalogue
//! item): hard-label cross-entropy, temperature-scaled KL over the
//! teacher's top-K plus a "rest of catalogue" bucket, the MSE soft-label
//! loss on the top-K probabilities, and ranking distillation (the teacher's
//! top-K as positives weighted by rank), mixed as
//! `α · hard + (1 − α) · soft`. Each returns the loss and writes its
//! gradient with respect to the logits, so the trainer can back-propagate
//! it like plain cross-entropy.

use crate::config::{LossFamily, SoftLoss};
use crate::model::kernels::exp_normalize;

/// How one link mixes the hard label and the soft labels.
#[derive(Debug, Clone, PartialEq)]
pub struct LossMix {
    /// Weight of the hard-label cross-entropy; `1 − alpha` goes to the soft losses.
    pub alpha: f32,
    /// Softmax temperature of the KL and MSE losses.
    pub temperature: f32,
    /// The soft losses, summed.
    pub family: LossFamily,
    /// Ranking distillation: the teacher's r-th item (0-based) weighs
    /// `exp(−r / rank_decay)`, normalized to sum to one.
    pub rank_decay: f32,
}

impl LossMix {
    /// The `loss` column: `ce+kl`, or `kl` without the hard label.
    pub fn label(&self) -> String {
        if self.alpha > 0.0 {
            format!("ce+{}", self.family)
        } else {
            self.family.to_string()
        }
    }

    /// The loss of one position and its gradient: `row` holds the student's
    /// logits and is overwritten with `weight · ∂loss/∂logits`. `hard` is the
    /// next item, `soft` the teacher's soft label of the position; without a
    /// soft label the loss is the hard cross-entropy alone.
    ///
    /// With `offsets` (a sampled softmax: `row` holds only some classes), each
    /// class's log-Q correction `−ln P(drawn)` is added to its logit before
    /// every softmax, scaled by that softmax's temperature, so that the
    /// classes not in `row` are estimated by the drawn ones. Classes always
    /// present have offset 0, masked ones logit −∞.
    pub fn row_loss(
        &self,
        row: &mut [f32],
        hard: usize,
        soft: Option<SoftTarget<'_>>,
        weight: f32,
        offsets: Option<&[f32]>,
    ) -> f64 {
        let shift = |row: &mut [f32], scale: f32| {
            if let Some(offsets) = offsets {
                for (v, o) in row.iter_mut().zip(offsets) {
                    *v += scale * o;
                }
            }
        };
        let Some(soft) = soft else {
            shift(row, 1.0);
            return cross_entropy(row, hard, weight);
        };
        let logits = row.to_vec();
        let mut grad = vec![0.0f32; row.len()];
        let mut loss = 0.0;
        if self.alpha > 0.0 {
            row.copy_from_slice(&logits);
            shift(row, 1.0);
            loss += f64::from(self.alpha) * cross_entropy(row, hard, self.alpha);
            add(&mut grad, row);
        }
        let w = 1.0 - self.alpha;
        if w > 0.0 {
            for &part in &self.family.0 {
                row.copy_from_slice(&logits);
                let l = match part {
                    SoftLoss::Kl => {
                        shift(row, self.temperature);
                        kl(row, &soft, self.temperature)
                    }
                    SoftLoss::Mse => {
                        shift(row, self.temperature);
                        mse(row, &soft, self.temperature)
                    }
                    SoftLoss::Rank => {
                        shift(row, 1.0);
                        rank(row, &soft, self.rank_decay)
                    }
                };
                loss += f64::from(w) * l;
                for (g, r) in grad.iter_mut().zip(row.iter()) {
                    *g += w * r;
                }
            }
        }
        for (r, g) in row.iter_mut().zip(&grad) {
            *r = weight * g;
        }
        loss
    }
}

fn add(acc: &mut [f32], x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

/// The teacher's soft label of one position: its top-K items (best first),
/// their logits, and `rest` = `T · ln Σ exp(z/T)` over every other item, at
/// the temperature `T` the labels were produced at.
#[derive(Debug, Clone, Copy)]
pub struct SoftTarget<'a> {
    /// Top-K item indices, best first, distinct.
    pub items: &'a [u32],
    /// Their logits.
    pub logits: &'a [f32],
    /// The rest-of-catalogue logit.
    pub rest: f32,
}

impl SoftTarget<'_> {
    /// The teacher's probabilities of the K items and of the rest bucket
    /// (K + 1 values summing to one) at temperature `t`.
    pub fn probabilities(&self, t: f32) -> Vec<f64> {
        let scaled: Vec<f64> = self
            .logits
            .iter()
            .chain(std::iter::once(&self.rest))
            .map(|&z| f64::from(z) / f64::from(t))
            .collect();
        let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scaled.iter().map(|v| (v - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.into_iter().map(|e| e / sum).collect()
    }
}

/// Softmax of `row / t` in place (f32 values, f64 sum); returns ln of the
/// partition function of `row / t`.
fn softmax_in_place(row: &mut [f32], t: f32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if t != 1.0 {
        let inv = 1.0 / t;
        row.iter_mut().for_each(|v| *v *= inv);
    }
    let sum = exp_normalize(row, None);
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
    f64::from(max / t) + f64::from(sum).ln()
}

/// Cross-entropy against `target`; `row` becomes `weight · (softmax − onehot)`.
pub fn cross_entropy(row: &mut [f32], target: usize, weight: f32) -> f64 {
    let z = row[target];
    let log_partition = softmax_in_place(row, 1.0);
    row.iter_mut().for_each(|v| *v *= weight);
    row[target] -= weight;
    log_partition - f64::from(z)
}

/// `T² · Σ_b p_b ln(p_b / q_b)` over the K items and the rest bucket;
/// `row` becomes the gradient: `T (q_j − p_j)` for a top-K item,
/// `T q_j (1 − p_rest / q_rest)` for every other item.
pub fn kl(row: &mut [f32], soft: &SoftTarget<'_>, t: f32) -> f64 {
    let p = soft.probabilities(t);
    softmax_in_place(row, t);
    let k = soft.items.len();
    let top: f64 = soft.items.iter().map(|&i| f64::from(row[i as usize])).sum();
    let q_rest = (1.0 - top).max(1e-30);
    let mut kl = 0.0;
    for (b, &pb) in p.iter().enumerate() {
        if pb <= 0.0 {
            continue;
        }
        let qb = if b < k {
            f64::from(row[soft.items[b] as usize]).max(1e-30)
        } else {
            q_rest
        };
        kl += pb * (pb.ln() - qb.ln());
    }
    let rest_factor = (1.0 - p[k] / q_rest) as f32;
    let tf = t;
    // Every item as a rest item first, then the K items overwritten.
    let top_q: Vec<f32> = soft.items.iter().map(|&i| row[i as usize]).collect();
    row.iter_mut().for_each(|q| *q *= tf * rest_factor);
    for (b, &i) in soft.items.iter().enumerate() {
        row[i as usize] = tf * (top_q[b] - p[b] as f32);
    }
    f64::from(t * t) * kl
}

/// The MSE soft-label loss: the mean squared error of the top-K
/// probabilities, both softmaxes at temperature `t`, scaled by `(K · T)²`:
/// `T² · K · Σ_{j ∈ top-K} (q_j − p_j)²`. Probabilities of top items are
/// about `1/K`, so unscaled its gradients would be some 10⁻⁴ of the
/// cross-entropy's and vanish under Adam's normalization; the `T²` plays the
/// same part as in the KL loss. `row` becomes `∂/∂s_i = (1/T) q_i (g_i −
/// Σ_j g_j q_j)` with `g_j = 2 T² K (q_j − p_j)` on the top-K, 0 elsewhere.
pub fn mse(row: &mut [f32], soft: &SoftTarget<'_>, t: f32) -> f64 {
    let p = soft.probabilities(t);
    softmax_in_place(row, t);
    let k = soft.items.len();
    let scale = f64::from(t * t) * k as f64;
    let mut loss = 0.0;
    let mut g = vec![0.0f64; k];
    let mut gq = 0.0;
    for (b, &i) in soft.items.iter().enumerate() {
        let q = f64::from(row[i as usize]);
        let diff = q - p[b];
        loss += diff * diff;
        g[b] = 2.0 * scale * diff;
        gq += g[b] * q;
    }
    let top_q: Vec<f64> = soft
        .items
        .iter()
        .map(|&i| f64::from(row[i as usize]))
        .collect();
    let inv_t = 1.0 / f64::from(t);
    let rest = (-gq * inv_t) as f32;
    row.iter_mut().for_each(|q| *q *= rest);
    for (b, &i) in soft.items.iter().enumerate() {
        row[i as usize] = (inv_t * top_q[b] * (g[b] - gq)) as f32;
    }
    scale * loss
}

/// The rank weights of a top-K list: `exp(−r / decay)`, normalized.
pub fn rank_weights(k: usize, decay: f32) -> Vec<f64> {
    let raw: Vec<f64> = (0..k)
        .map(|r| (-(r as f64) / f64::from(decay)).exp())
        .collect();
    let sum: f64 = raw.iter().sum();
    raw.into_iter().map(|w| w / sum).collect()
}

/// Ranking distillation: `Σ_r w_r · (ln Σ_j exp s_j − s_{item_r})`, the
/// cross-entropy against the teacher's top-K weighted by rank; `row`
/// becomes `softmax(s) − w`.
pub fn rank(row: &mut [f32], soft: &SoftTarget<'_>, decay: f32) -> f64 {
    let weights = rank_weights(soft.items.len(), decay);
    let positives: f64 = soft
        .items
        .iter()
        .zip(&weights)
        .map(|(&i, w)| w * f64::from(row[i as usize]))
        .sum();
    let log_partition = softmax_in_place(row, 1.0);
    for (&i, w) in soft.items.iter().zip(&weights) {
        row[i as usize] -= *w as f32;
    }
    log_partition - positives
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three items with student logits (1, 2, 0); the teacher's top-2 is
    /// items 1 and 0 with logits 3 and 1, and the rest (item 2) has logit 0.
    const STUDENT: [f32; 3] = [1.0, 2.0, 0.0];
    const SOFT: SoftTarget<'static> = SoftTarget {
        items: &[1, 0],
        logits: &[3.0, 1.0],
        rest: 0.0,
    };

    fn softmax(v: &[f64]) -> Vec<f64> {
        let z: f64 = v.iter().map(|x| x.exp()).sum();
        v.iter().map(|x| x.exp() / z).collect()
    }

    /// Central finite differences of `f` at `STUDENT`.
    fn numeric_grad(f: impl Fn(&mut [f32]) -> f64) -> Vec<f64> {
        (0..3)
            .map(|j| {
                let h = 1e-2f32;
                let (mut a, mut b) = (STUDENT, STUDENT);
                a[j] += h;
                b[j] -= h;
                (f(&mut a) - f(&mut b)) / f64::from(2.0 * h)
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f64], tol: f64) {
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < tol, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn cross_entropy_matches_hand_computed_values() {
        let mut row = STUDENT;
        let loss = cross_entropy(&mut row, 1, 1.0);
        let q = softmax(&[1.0, 2.0, 0.0]);
        // −ln q_1 = ln(e + e² + 1) − 2 = 0.40761
        assert!((loss - 0.407_606).abs() < 1e-5, "{loss}");
        close(&row, &[q[0], q[1] - 1.0, q[2]], 1e-6);
    }

    #[test]
    fn kl_matches_hand_computed_values() {
        for t in [1.0f32, 2.0] {
            let tt = f64::from(t);
            // Teacher over (item 1, item 0, rest) = softmax((3, 1, 0) / T);
            // student buckets: q_1, q_0 and q_2 (the rest) of softmax(s / T).
            let p = softmax(&[3.0 / tt, 1.0 / tt, 0.0]);
            let q = softmax(&[1.0 / tt, 2.0 / tt, 0.0]);
            let q_b = [q[1], q[0], q[2]];
            let want: f64 = tt * tt * (0..3).map(|b| p[b] * (p[b] / q_b[b]).ln()).sum::<f64>();
            let mut row = STUDENT;
            let loss = kl(&mut row, &SOFT, t);
            assert!((loss - want).abs() < 1e-5, "T={t}: {loss} vs {want}");
            // Here the rest bucket is one item: the gradient is T (q − p).
            close(
                &row,
                &[tt * (q[0] - p[1]), tt * (q[1] - p[0]), tt * (q[2] - p[2])],
                1e-5,
            );
            let numeric = numeric_grad(|s| kl(s, &SOFT, t));
            close(&row, &numeric, 2e-3);
        }
        // With T = 1: p = (0.84379, 0.11420, 0.04201), q = (0.66524,
        // 0.24473, 0.09003), Σ p ln(p/q) = 0.081555.
        let mut row = STUDENT;
        assert!((kl(&mut row, &SOFT, 1.0) - 0.081_555).abs() < 1e-5);
    }

    #[test]
    fn kl_gradient_spreads_over_a_rest_bucket_of_several_items() {
        // Five items, teacher top-2 = items 3 and 1, rest = items 0, 2, 4.
        let student = [0.5f32, -1.0, 2.0, 0.3, 1.1];
        let soft = SoftTarget {
            items: &[3, 1],
            logits: &[2.5, 1.5],
            rest: 1.0,
        };
        let f = |s: &mut [f32]| kl(s, &soft, 1.5);
        let mut row = student;
        f(&mut row);
        for j in 0..5 {
            let h = 1e-2f32;
            let (mut a, mut b) = (student, student);
            a[j] += h;
            b[j] -= h;
            let numeric = (f(&mut a) - f(&mut b)) / f64::from(2.0 * h);
            assert!(
                (f64::from(row[j]) - numeric).abs() < 2e-3,
                "item {j}: {} vs {numeric}",
                row[j]
            );
        }
    }

    #[test]
    fn mse_matches_hand_computed_values() {
        let t = 2.0f32;
        let p = softmax(&[1.5, 0.5, 0.0]);
        let q = softmax(&[0.5, 1.0, 0.0]);
        // T² · K · Σ (q − p)² with T = 2, K = 2.
        let want = 8.0 * ((q[1] - p[0]).powi(2) + (q[0] - p[1]).powi(2));
        let mut row = STUDENT;
        let loss = mse(&mut row, &SOFT, t);
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        let numeric = numeric_grad(|s| mse(s, &SOFT, t));
        close(&row, &numeric, 1e-3);
    }

    #[test]
    fn rank_matches_hand_computed_values() {
        // Weights for K = 2, decay 1: (1, e⁻¹) / (1 + e⁻¹) = (0.73106, 0.26894).
        let w = rank_weights(2, 1.0);
        assert!((w[0] - 0.731_059).abs() < 1e-6 && (w[1] - 0.268_941).abs() < 1e-6);
        let mut row = STUDENT;
        let loss = rank(&mut row, &SOFT, 1.0);
        let log_z = (1f64.exp() + 2f64.exp() + 1.0).ln();
        let want = w[0] * (log_z - 2.0) + w[1] * (log_z - 1.0);
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        let q = softmax(&[1.0, 2.0, 0.0]);
        close(&row, &[q[0] - w[1], q[1] - w[0], q[2]], 1e-6);
    }

    #[test]
    fn the_mix_weighs_hard_and_soft_losses_by_alpha() {
        let mix = LossMix {
            alpha: 0.25,
            temperature: 2.0,
            family: "kl+rank".parse().unwrap(),
            rank_decay: 1.0,
        };
        assert_eq!(mix.label(), "ce+kl+rank");
        let mut row = STUDENT;
        let loss = mix.row_loss(&mut row, 2, Some(SOFT), 0.5, None);
        let (mut a, mut b, mut c) = (STUDENT, STUDENT, STUDENT);
        let want = 0.25 * cross_entropy(&mut a, 2, 1.0)
            + 0.75 * (kl(&mut b, &SOFT, 2.0) + rank(&mut c, &SOFT, 1.0));
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        let want_grad: Vec<f64> = (0..3)
            .map(|j| 0.5 * (0.25 * f64::from(a[j]) + 0.75 * (f64::from(b[j]) + f64::from(c[j]))))
            .collect();
        close(&row, &want_grad, 1e-6);
        // Without a soft label the position falls back to the hard label.
        let mut row = STUDENT;
        let mut hard = STUDENT;
        let loss = mix.row_loss(&mut row, 2, None, 0.5, None);
        assert!((loss - cross_entropy(&mut hard, 2, 0.5)).abs() < 1e-9);
        assert_eq!(row, hard);
    }
}
