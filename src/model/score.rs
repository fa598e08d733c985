//! Full ranking, shared by evaluation, early stopping and recommendation
//! lists: every item is ranked, the items a user interacted with before the
//! target are excluded, and ties in score go to the lower item index, so a
//! recommendation list *is* the top of the ranking.

use std::cmp::Ordering;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Target};
use crate::error::{Error, Result};
use crate::model::Scorer;

/// A target's outcome: its rank and the top of the list.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// The target, as given.
    pub target: Target,
    /// 1-based rank of the target item; `None` when it was excluded
    /// (the user had interacted with it before).
    pub rank: Option<usize>,
    /// The top `list_len` items and their scores, best first.
    pub top: Vec<(u32, f32)>,
}

/// NaN ranks last, like minus infinity.
fn key(score: f32) -> f32 {
    if score.is_nan() {
        f32::NEG_INFINITY
    } else {
        score
    }
}

/// Does item `a` (score `sa`) rank above item `b` (score `sb`)?
#[inline]
fn better(sa: f32, a: u32, sb: f32, b: u32) -> bool {
    match sa.partial_cmp(&sb) {
        Some(Ordering::Greater) => true,
        Some(Ordering::Less) => false,
        _ => a < b,
    }
}

/// Reusable scratch space for ranking one user at a time.
#[derive(Debug, Default)]
pub struct Ranker {
    excluded: Vec<bool>,
    /// The user's history, sorted and without repeats.
    distinct: Vec<u32>,
}

impl Ranker {
    /// Ranks one user's `scores` (one per item): the target's rank and the top
    /// `list_len` items, `history` excluded.
    pub fn rank(
        &mut self,
        scores: &[f32],
        history: &[u32],
        target: u32,
        list_len: usize,
    ) -> (Option<usize>, Vec<(u32, f32)>) {
        let n = scores.len();
        if self.excluded.len() != n {
            self.excluded = vec![false; n];
        }
        for &i in history {
            if let Some(slot) = self.excluded.get_mut(i as usize) {
                *slot = true;
            }
        }

        let ranked_target = if self.excluded.get(target as usize).copied().unwrap_or(true) {
            None
        } else {
            Some((target as usize, key(scores[target as usize])))
        };
        // One pass over the scores counts the items above the target and
        // keeps the top of the list.
        let (top, counted) = scan(scores, &self.excluded, list_len, ranked_target);
        let rank = ranked_target.map(|(t, st)| {
            // The excluded items among those above the target are taken
            // back, each once however often the history repeats it.
            let mut above = counted;
            self.distinct.clear();
            self.distinct.extend_from_slice(history);
            self.distinct.sort_unstable();
            self.distinct.dedup();
            for &i in &self.distinct {
                if let Some(&s) = scores.get(i as usize)
                    && i as usize != t
                    && better(key(s), i, st, t as u32)
                {
                    above -= 1;
                }
            }
            above + 1
        });

        for &i in history {
            if let Some(slot) = self.excluded.get_mut(i as usize) {
                *slot = false;
            }
        }
        (rank, top)
    }
}

/// The best `k` not-excluded items, best first.
pub fn top_k(scores: &[f32], excluded: &[bool], k: usize) -> Vec<(u32, f32)> {
    scan(scores, excluded, k, None).0
}

/// Scores looked at together: counted branch-free, and skipped whole by
/// the top-`k` selection when none beats the list's last.
const SCAN_CHUNK: usize = 64;
const _: () = assert!(SCAN_CHUNK <= 64, "a chunk's candidates are bits of a u64");

/// One pass over `scores`: the best `k` not-excluded items, best first, and,
/// for `target = Some((t, key))`, the number of items ranking above item `t`
/// (excluded ones included).
///
/// The list keeps the `k` best seen so far, sorted best first; once it is
/// full, only the scores of a chunk above the last one's are looked at,
/// found together as a bit mask (a later item never wins a tie). The count is a sum of comparisons, which
/// vectorizes: items after `t` count when their score is higher, items
/// before it when their score is at least the target's (they win a tie);
/// a NaN is never either, except that when the target's key is −∞ every
/// item before it ranks above it (a NaN ties with −∞ and wins on index).
fn scan(
    scores: &[f32],
    excluded: &[bool],
    k: usize,
    target: Option<(usize, f32)>,
) -> (Vec<(u32, f32)>, usize) {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    let mut above = 0;
    for (c, chunk) in scores.chunks(SCAN_CHUNK).enumerate() {
        let first = c * SCAN_CHUNK;
        if let Some((t, st)) = target {
            let split = t.clamp(first, first + chunk.len()) - first;
            let (before, after) = chunk.split_at(split);
            above += if st == f32::NEG_INFINITY {
                before.len()
            } else {
                before.iter().map(|&s| u32::from(s >= st)).sum::<u32>() as usize
            } + after.iter().map(|&s| u32::from(s > st)).sum::<u32>() as usize;
        }
        if k == 0 {
            continue;
        }
        if best.len() == k {
            // Only scores above the list's last can enter (a later item
            // never wins a tie; a NaN is never above): a chunk without one
            // is skipped (a vectorized test), otherwise their positions as
            // bits, each checked again against the last as it rises.
            let kth = best[k - 1].1;
            if !chunk.iter().fold(false, |any, &s| any | (s > kth)) {
                continue;
            }
            let mut above_kth = chunk
                .iter()
                .enumerate()
                .fold(0u64, |bits, (j, &s)| bits | (u64::from(s > kth) << j));
            while above_kth != 0 {
                let j = above_kth.trailing_zeros() as usize;
                above_kth &= above_kth - 1;
                if !excluded[first + j] {
                    admit(&mut best, k, (first + j) as u32, chunk[j]);
                }
            }
            continue;
        }
        for (j, &s) in chunk.iter().enumerate() {
            if !excluded[first + j] {
                admit(&mut best, k, (first + j) as u32, key(s));
            }
        }
    }
    (best, above)
}

/// Puts item `j` with key `s` into `best` (the `k` best so far, best
/// first) when the list has room or `j` beats its last, which then leaves.
#[inline]
fn admit(best: &mut Vec<(u32, f32)>, k: usize, j: u32, s: f32) {
    if best.len() == k {
        let (wj, ws) = best[k - 1];
        if !better(s, j, ws, wj) {
            return;
        }
        best.pop();
    }
    let at = best.partition_point(|&(bj, bs)| better(bs, bj, s, j));
    best.insert(at, (j, s));
}

/// Fewest whole passes over the targets when timing throughput.
const THROUGHPUT_PASSES: usize = 3;
/// Fewest seconds of throughput passes.
const THROUGHPUT_SECONDS: f64 = 0.5;

/// How fast a model recommends, measured in this process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Speed {
    /// Median milliseconds to score one user and pick their list.
    pub latency_ms_p50: f64,
    /// 99th percentile of the same.
    pub latency_ms_p99: f64,
    /// Users per second when every test user is scored in batches.
    pub users_per_s: f64,
}

/// Times `scorer`: the first `latency_users` targets one at a time (score,
/// exclude the history, pick the top `list_len`), then every target in
/// batches of `batch`, pass after pass (the median pass's rate). A warm-up
/// batch runs first.
pub fn measure_speed(
    scorer: &dyn Scorer,
    dataset: &Dataset,
    targets: &[Target],
    batch: usize,
    list_len: usize,
    latency_users: usize,
) -> Result<Speed> {
    let n = scorer.n_items();
    let mut scores = Vec::new();
    let mut ranker = Ranker::default();
    let warm: Vec<&[u32]> = targets
        .iter()
        .take(batch.max(1))
        .map(|t| dataset.history(t))
        .collect();
    scorer.score(&warm, &mut scores)?;
    let mut times = Vec::with_capacity(latency_users);
    for t in targets.iter().cycle().take(latency_users.max(1)) {
        let history = dataset.history(t);
        let started = std::time::Instant::now();
        scorer.score(&[history], &mut scores)?;
        let (_, top) = ranker.rank(&scores[..n], history, t.item, list_len);
        std::hint::black_box(top);
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let pct =
        |p: f64| times[((p * (times.len() - 1) as f64).round() as usize).min(times.len() - 1)];
    // Whole passes over the targets until at least THROUGHPUT_PASSES passes
    // and THROUGHPUT_SECONDS have gone by; the median pass counts.
    let mut rates = Vec::new();
    let started = std::time::Instant::now();
    while rates.len() < THROUGHPUT_PASSES || started.elapsed().as_secs_f64() < THROUGHPUT_SECONDS {
        let pass = std::time::Instant::now();
        let mut users = 0usize;
        rank_targets(scorer, dataset, targets, batch, list_len, |ranked| {
            users += ranked.len();
            Ok(())
        })?;
        rates.push(users as f64 / pass.elapsed().as_secs_f64().max(1e-9));
    }
    rates.sort_by(f64::total_cmp);
    Ok(Speed {
        latency_ms_p50: pct(0.5),
        latency_ms_p99: pct(0.99),
        users_per_s: rates[rates.len() / 2],
    })
}

/// Ranks every target with `scorer`, `batch` users at a time, handing each
/// batch's results to `sink` in target order.
pub fn rank_targets(
    scorer: &dyn Scorer,
    dataset: &Dataset,
    targets: &[Target],
    batch: usize,
    list_len: usize,
    mut sink: impl FnMut(&[Ranked]) -> Result<()>,
) -> Result<()> {
    let n = scorer.n_items();
    if n != dataset.n_items() {
        return Err(Error::internal(format!(
            "scorer has {n} items, dataset {}",
            dataset.n_items()
        )));
    }
    let threads = rayon::current_num_threads().max(1);
    let batch = batch.max(1);
    // Each task scores a slice of the batch and ranks it at once, while its
    // scores are still in cache (a whole batch's scores at 200,000 items are
    // 205 MB). The slices of a batch are a whole multiple of the threads, so
    // that none waits on another's last slice; a task takes its scratch from
    // a pool (as many as run at once), kept from batch to batch.
    let widest = (scorer.slice_bytes() / (4 * n.max(1))).max(1);
    let users = batch.min(targets.len()).max(1);
    let slices = users.div_ceil(widest).div_ceil(threads) * threads;
    let slice = users.div_ceil(slices);
    let pool: std::sync::Mutex<Vec<(Vec<f32>, Ranker)>> = std::sync::Mutex::default();
    let mut ranked = Vec::with_capacity(batch);
    for chunk in targets.chunks(batch) {
        let slices: Vec<Result<Vec<Ranked>>> = chunk
            .par_chunks(slice)
            .map(|slice| {
                let taken = pool.lock().ok().and_then(|mut pool| pool.pop());
                let mut scratch = taken.unwrap_or_default();
                let ranked = rank_slice(scorer, dataset, slice, list_len, &mut scratch);
                if let Ok(mut pool) = pool.lock() {
                    pool.push(scratch);
                }
                ranked
            })
            .collect();
        ranked.clear();
        for slice in slices {
            ranked.extend(slice?);
        }
        sink(&ranked)?;
    }
    Ok(())
}

/// Scores `slice`'s users in one call and ranks each.
fn rank_slice(
    scorer: &dyn Scorer,
    dataset: &Dataset,
    slice: &[Target],
    list_len: usize,
    (scores, ranker): &mut (Vec<f32>, Ranker),
) -> Result<Vec<Ranked>> {
    let n = scorer.n_items();
    let histories: Vec<&[u32]> = slice.iter().map(|t| dataset.history(t)).collect();
    scorer.score(&histories, scores)?;
    if scores.len() != slice.len() * n {
        return Err(Error::internal(format!(
            "scorer returned {} scores for {} users × {n} items",
            scores.len(),
            slice.len()
        )));
    }
    Ok(slice
        .iter()
        .zip(&histories)
        .enumerate()
        .map(|(row, (target, history))| {
            let scores = &scores[row * n..(row + 1) * n];
            let (rank, top) = ranker.rank(scores, history, target.item, list_len);
            Ranked {
                target: *target,
                rank,
                top,
            }
        })
        .collect())
}

/// Mean HR, NDCG and MRR at each cut-off.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Cut-offs.
    pub ks: Vec<u32>,
    /// Mean hit rate at each cut-off.
    pub hr: Vec<f64>,
    /// Mean NDCG at each cut-off.
    pub ndcg: Vec<f64>,
    /// Mean reciprocal rank at each cut-off.
    pub mrr: Vec<f64>,
    /// Targets averaged over.
    pub users: usize,
}

/// Accumulates metrics over ranked targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSums {
    ks: Vec<u32>,
    /// `hits[r]`: targets ranked at `r` (1-based), for `r` up to the largest K.
    hits: Vec<u64>,
    users: u64,
}

impl MetricSums {
    /// Empty sums for cut-offs `ks`.
    pub fn new(ks: &[u32]) -> MetricSums {
        let top = ks.iter().copied().max().unwrap_or(0) as usize;
        MetricSums {
            ks: ks.to_vec(),
            hits: vec![0; top + 1],
            users: 0,
        }
    }

    /// Adds one target's rank.
    pub fn add(&mut self, rank: Option<usize>) {
        self.users += 1;
        if let Some(rank) = rank
            && rank < self.hits.len()
        {
            self.hits[rank] += 1;
        }
    }

    /// Adds the targets another share of the same evaluation counted: the
    /// counts are exact, so shares add up to the whole bit for bit.
    pub fn merge(&mut self, other: &MetricSums) -> Result<()> {
        if other.ks != self.ks || other.hits.len() != self.hits.len() {
            return Err(Error::internal(format!(
                "cannot add metrics at K = {:?} to metrics at K = {:?}",
                other.ks, self.ks
            )));
        }
        for (a, b) in self.hits.iter_mut().zip(&other.hits) {
            *a += b;
        }
        self.users += other.users;
        Ok(())
    }

    /// The means.
    pub fn finish(&self) -> Metrics {
        let n = self.users.max(1) as f64;
        let mut metrics = Metrics {
            ks: self.ks.clone(),
            hr: Vec::with_capacity(self.ks.len()),
            ndcg: Vec::with_capacity(self.ks.len()),
            mrr: Vec::with_capacity(self.ks.len()),
            users: self.users as usize,
        };
        for &k in &self.ks {
            let (mut hr, mut ndcg, mut mrr) = (0.0, 0.0, 0.0);
            for rank in 1..=k as usize {
                let hits = self.hits[rank] as f64;
                hr += hits;
                ndcg += hits / ((rank + 1) as f64).log2();
                mrr += hits / rank as f64;
            }
            metrics.hr.push(hr / n);
            metrics.ndcg.push(ndcg / n);
            metrics.mrr.push(mrr / n);
        }
        metrics
    }
}

impl Metrics {
    /// NDCG at cut-off `k`, if computed.
    pub fn ndcg_at(&self, k: u32) -> Option<f64> {
        self.ks.iter().position(|&x| x == k).map(|i| self.ndcg[i])
    }

    /// HR at cut-off `k`, if computed.
    pub fn hr_at(&self, k: u32) -> Option<f64> {
        self.ks.iter().position(|&x| x == k).map(|i| self.hr[i])
    }
}

/// Metrics of `scorer` on `targets`.
pub fn evaluate(
    scorer: &dyn Scorer,
    dataset: &Dataset,
    targets: &[Target],
    ks: &[u32],
    batch: usize,
) -> Result<Metrics> {
    let mut sums = MetricSums::new(ks);
    rank_targets(scorer, dataset, targets, batch, 0, |ranked| {
        for r in ranked {
            sums.add(r.rank);
        }
        Ok(())
    })?;
    Ok(sums.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_excludes_history_and_breaks_ties_by_index() {
        let mut r = Ranker::default();
        //            item: 0    1    2    3    4    5
        let scores = [0.5, 0.9, 0.5, 0.7, 0.9, f32::NAN];
        // Item 1 is history: excluded. Order: 4 (0.9), 3 (0.7), 0 (0.5), 2 (0.5, tie → after 0), 5 (NaN).
        let (rank, top) = r.rank(&scores, &[1], 2, 3);
        assert_eq!(rank, Some(4));
        assert_eq!(top, vec![(4, 0.9), (3, 0.7), (0, 0.5)]);
        let (rank, _) = r.rank(&scores, &[1], 0, 3);
        assert_eq!(rank, Some(3));
        let (rank, top) = r.rank(&scores, &[], 4, 2);
        assert_eq!(
            rank,
            Some(2),
            "tie at 0.9 with item 1 goes to the lower index"
        );
        assert_eq!(top, vec![(1, 0.9), (4, 0.9)]);
        // A target the user had before is excluded: a miss.
        let (rank, _) = r.rank(&scores, &[3, 1], 3, 3);
        assert_eq!(rank, None);
        let (rank, top) = r.rank(&scores, &[], 5, 10);
        assert_eq!(rank, Some(6));
        assert_eq!(top.len(), 6);
    }

    #[test]
    fn metrics_match_hand_computed_values() {
        let mut m = MetricSums::new(&[1, 3, 10]);
        m.add(Some(1)); // hr 1,1,1  ndcg 1,1,1  mrr 1,1,1
        m.add(Some(3)); // hr 0,1,1  ndcg 0,0.5,0.5  mrr 0,1/3,1/3
        m.add(Some(11)); // nothing
        m.add(None); // nothing
        let r = m.finish();
        assert_eq!(r.users, 4);
        assert_eq!(r.hr, vec![0.25, 0.5, 0.5]);
        assert!((r.ndcg[0] - 0.25).abs() < 1e-12);
        assert!((r.ndcg[1] - 1.5 / 4.0).abs() < 1e-12);
        assert!((r.mrr[1] - (1.0 + 1.0 / 3.0) / 4.0).abs() < 1e-12);
        assert_eq!(r.ndcg_at(3), Some(r.ndcg[1]));
    }

    /// The target's rank counted branch-free equals the item-by-item count
    /// of every not-excluded item ranked above it: ties, NaN, ±∞, a history
    /// that repeats items, holds the target or items past the catalogue.
    #[test]
    fn the_target_rank_equals_an_item_by_item_count() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(11);
        let mut ranker = Ranker::default();
        for case in 0..500 {
            let n = rng.random_range(1..300);
            let scores: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..40) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => f32::INFINITY,
                    _ => rng.random_range(0..8) as f32 * 0.5,
                })
                .collect();
            let history: Vec<u32> = (0..rng.random_range(0..30))
                .map(|_| rng.random_range(0..n as u32 + 3))
                .collect();
            let target = rng.random_range(0..n as u32);
            let excluded: Vec<bool> = (0..n as u32).map(|i| history.contains(&i)).collect();
            let want = (!excluded[target as usize]).then(|| {
                let st = key(scores[target as usize]);
                1 + (0..n as u32)
                    .filter(|&j| {
                        !excluded[j as usize]
                            && j != target
                            && better(key(scores[j as usize]), j, st, target)
                    })
                    .count()
            });
            let (rank, top) = ranker.rank(&scores, &history, target, 5);
            assert_eq!(rank, want, "case {case}: n {n}, target {target}");
            // The same pass picks the list: the best five by a full sort.
            let mut full: Vec<(u32, f32)> = (0..n as u32)
                .filter(|&j| !excluded[j as usize])
                .map(|j| (j, key(scores[j as usize])))
                .collect();
            full.sort_by(|a, b| {
                if better(a.1, a.0, b.1, b.0) {
                    Ordering::Less
                } else {
                    Ordering::Greater
                }
            });
            full.truncate(5);
            assert_eq!(top, full, "case {case}: n {n}, target {target}");
        }
    }

    #[test]
    fn top_k_equals_a_full_sort() {
        let scores: Vec<f32> = (0..200).map(|i| ((i * 37) % 23) as f32).collect();
        let excluded: Vec<bool> = (0..200).map(|i| i % 7 == 0).collect();
        let mut full: Vec<(u32, f32)> = (0..200u32)
            .filter(|&i| !excluded[i as usize])
            .map(|i| (i, scores[i as usize]))
            .collect();
        full.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
        assert_eq!(top_k(&scores, &excluded, 15), full[..15].to_vec());
    }

    #[test]
    fn top_k_with_chunk_skipping_equals_a_full_sort_on_any_shape() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(5);
        for case in 0..300 {
            let n = rng.random_range(1..400);
            let k = rng.random_range(1..40);
            // Few distinct values (ties), a NaN and -inf now and then, and
            // an ascending run so chunks are not all skipped.
            let scores: Vec<f32> = (0..n)
                .map(|i| match rng.random_range(0..50) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2..10 => i as f32 * 0.01,
                    _ => rng.random_range(0..12) as f32,
                })
                .collect();
            let excluded: Vec<bool> = (0..n).map(|_| rng.random_bool(0.1)).collect();
            let mut full: Vec<(u32, f32)> = (0..n as u32)
                .filter(|&i| !excluded[i as usize])
                .map(|i| (i, key(scores[i as usize])))
                .collect();
            full.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
            full.truncate(k);
            assert_eq!(
                top_k(&scores, &excluded, k),
                full,
                "case {case}: n {n}, k {k}"
            );
        }
    }
}
