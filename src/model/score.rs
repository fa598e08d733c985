//! Full ranking, shared by evaluation, early stopping and recommendation
//! lists: every item is ranked, the items a user interacted with before the
//! target are excluded, and ties in score go to the lower item index, so a
//! recommendation list *is* the top of the ranking.

use std::cmp::Ordering;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Target};
use crate::error::{Error, Result};
use crate::model::{ItemBlocks, Scorer};

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
        let distinct = std::mem::take(&mut self.distinct);
        let mut ranking =
            UserRanking::new(history, target, scores.len(), list_len, distinct, |t| {
                scores[t]
            });
        ranking.feed(0, scores);
        let (rank, top, distinct) = ranking.finish();
        self.distinct = distinct;
        (rank, top)
    }
}

/// One user's ranking, fed their scores a block of items at a time, in
/// item order: the target's rank and the top of the list, the history
/// excluded. Whole rows are one block.
struct UserRanking {
    scan: Scan,
    /// The history, sorted and without repeats.
    distinct: Vec<u32>,
    /// How many of `distinct` lie in the blocks fed so far.
    passed: usize,
    /// One past the last item fed.
    fed: usize,
}

impl UserRanking {
    /// A ranking of the `n` items for the user with `history` and `target`,
    /// keeping the best `k`; `score_of(target)` is asked for the target's
    /// score when it is ranked (inside the catalogue, not in the history).
    /// `distinct` is scratch space.
    fn new(
        history: &[u32],
        target: u32,
        n: usize,
        k: usize,
        mut distinct: Vec<u32>,
        score_of: impl FnOnce(usize) -> f32,
    ) -> UserRanking {
        distinct.clear();
        distinct.extend_from_slice(history);
        distinct.sort_unstable();
        distinct.dedup();
        let t = target as usize;
        let ranked =
            (t < n && distinct.binary_search(&target).is_err()).then(|| (t, key(score_of(t))));
        UserRanking {
            scan: Scan::new(k, ranked),
            distinct,
            passed: 0,
            fed: 0,
        }
    }

    /// The scores of items `first..first + scores.len()`, `first` being
    /// where the blocks fed so far end.
    fn feed(&mut self, first: usize, scores: &[f32]) {
        assert_eq!(first, self.fed, "blocks are fed in item order");
        let end = first + scores.len();
        self.fed = end;
        let rest = &self.distinct[self.passed..];
        let here = &rest[..rest.partition_point(|&i| (i as usize) < end)];
        self.passed += here.len();
        self.scan
            .feed(first, scores, |j| here.binary_search(&(j as u32)).is_ok());
        // The scan counted the history's items above the target with the
        // others: they are taken back, each once however often the history
        // repeats it.
        if let Some((t, st)) = self.scan.target {
            for &i in here {
                if i as usize != t && better(key(scores[i as usize - first]), i, st, t as u32) {
                    self.scan.above -= 1;
                }
            }
        }
    }

    /// The target's 1-based rank (`None` when it was not ranked), the top
    /// of the list, best first, and the scratch space back.
    fn finish(self) -> (Option<usize>, Vec<(u32, f32)>, Vec<u32>) {
        let rank = self.scan.target.map(|_| self.scan.above + 1);
        (rank, self.scan.best, self.distinct)
    }
}

/// The best `k` not-excluded items, best first.
pub fn top_k(scores: &[f32], excluded: &[bool], k: usize) -> Vec<(u32, f32)> {
    let mut scan = Scan::new(k, None);
    scan.feed(0, scores, |j| excluded[j]);
    scan.best
}

/// Scores looked at together: counted branch-free, and skipped whole by
/// the top-`k` selection when none beats the list's last.
const SCAN_CHUNK: usize = 64;
const _: () = assert!(SCAN_CHUNK <= 64, "a chunk's candidates are bits of a u64");

/// A pass over scores, fed in item order: the best `k` not-excluded items,
/// best first, and, for `target = Some((t, key))`, the number of items
/// ranking above item `t` (excluded ones included).
///
/// The list keeps the `k` best seen so far, sorted best first; once it is
/// full, only the scores of a chunk above the last one's are looked at,
/// found together as a bit mask (a later item never wins a tie). The count is a sum of comparisons, which
/// vectorizes: items after `t` count when their score is higher, items
/// before it when their score is at least the target's (they win a tie);
/// a NaN is never either, except that when the target's key is −∞ every
/// item before it ranks above it (a NaN ties with −∞ and wins on index).
struct Scan {
    k: usize,
    best: Vec<(u32, f32)>,
    above: usize,
    target: Option<(usize, f32)>,
}

impl Scan {
    fn new(k: usize, target: Option<(usize, f32)>) -> Scan {
        Scan {
            k,
            best: Vec::with_capacity(k + 1),
            above: 0,
            target,
        }
    }

    /// The scores of items `first..first + scores.len()`; `excluded(j)`
    /// says whether item `j` (of these) is kept off the list. Compiled for
    /// AVX2 where the CPU has it (the comparisons and sums then run eight
    /// lanes wide), with the same results.
    fn feed(&mut self, first: usize, scores: &[f32], excluded: impl Fn(usize) -> bool) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { self.feed_avx2(first, scores, excluded) };
            return;
        }
        self.feed_chunks(first, scores, excluded);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn feed_avx2(&mut self, first: usize, scores: &[f32], excluded: impl Fn(usize) -> bool) {
        self.feed_chunks(first, scores, excluded);
    }

    /// [`Scan::feed`] as the crate is compiled.
    #[inline(always)]
    fn feed_chunks(&mut self, first: usize, scores: &[f32], excluded: impl Fn(usize) -> bool) {
        let (k, best) = (self.k, &mut self.best);
        for (c, chunk) in scores.chunks(SCAN_CHUNK).enumerate() {
            let first = first + c * SCAN_CHUNK;
            if let Some((t, st)) = self.target {
                let split = t.clamp(first, first + chunk.len()) - first;
                let (before, after) = chunk.split_at(split);
                self.above += if st == f32::NEG_INFINITY {
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
                    if !excluded(first + j) {
                        admit(best, k, (first + j) as u32, chunk[j]);
                    }
                }
                continue;
            }
            for (j, &s) in chunk.iter().enumerate() {
                if !excluded(first + j) {
                    admit(best, k, (first + j) as u32, key(s));
                }
            }
        }
    }
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
    let mut scratch = (Vec::new(), Ranker::default());
    let warm = &targets[..batch.max(1).min(targets.len())];
    rank_slice(scorer, dataset, warm, list_len, &mut scratch)?;
    let mut times = Vec::with_capacity(latency_users);
    for t in targets.iter().cycle().take(latency_users.max(1)) {
        let started = std::time::Instant::now();
        let one = std::slice::from_ref(t);
        std::hint::black_box(rank_slice(scorer, dataset, one, list_len, &mut scratch)?);
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
    // Each task scores a slice of users and ranks it at once, while its
    // scores are still in cache (a whole batch's scores at 200,000 items are
    // 205 MB). The slices of a batch are a whole multiple of the threads, so
    // that none waits on another's last slice; a task takes its scratch from
    // a pool (as many as run at once), kept from slice to slice. Several
    // batches run as one round, so the threads meet (and the sink runs) once
    // a round rather than once a batch; the sink still gets batch by batch.
    let widest = (scorer.slice_bytes() / (4 * n.max(1))).max(1);
    let users = batch.min(targets.len()).max(1);
    let slices = users.div_ceil(widest).div_ceil(threads) * threads;
    let slice = users.div_ceil(slices);
    let round = batch * ROUND_USERS.div_ceil(batch);
    let pool: std::sync::Mutex<Vec<(Vec<f32>, Ranker)>> = std::sync::Mutex::default();
    let mut ranked = Vec::with_capacity(round.min(targets.len()));
    for round in targets.chunks(round) {
        let slices: Vec<Result<Vec<Ranked>>> = round
            .chunks(batch)
            .flat_map(|batch| batch.chunks(slice))
            .collect::<Vec<_>>()
            .into_par_iter()
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
        for batch in ranked.chunks(batch) {
            sink(batch)?;
        }
    }
    Ok(())
}

/// Users ranked between two meetings of the threads in [`rank_targets`]
/// (rounded up to whole batches): their results are held until the round
/// ends, a few MB at most.
const ROUND_USERS: usize = 8192;

/// Scores `slice`'s users and ranks each: block by block where the scorer
/// computes scores that way, otherwise all in one call.
fn rank_slice(
    scorer: &dyn Scorer,
    dataset: &Dataset,
    slice: &[Target],
    list_len: usize,
    (scores, ranker): &mut (Vec<f32>, Ranker),
) -> Result<Vec<Ranked>> {
    let n = scorer.n_items();
    let histories: Vec<&[u32]> = slice.iter().map(|t| dataset.history(t)).collect();
    if let Some(blocks) = scorer.item_blocks(&histories)? {
        let width = block_width(slice.len(), blocks.granule());
        return rank_in_blocks(
            blocks.as_ref(),
            n,
            slice,
            &histories,
            list_len,
            width,
            scores,
        );
    }
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

/// Bytes of one block of scores for all the users of a slice in
/// [`rank_in_blocks`]: ranked while in the core's L2 cache.
const BLOCK_SCORES_BYTES: usize = 256 << 10;

/// Items per block for `users` users: [`BLOCK_SCORES_BYTES`] of scores, a
/// whole number of granules.
fn block_width(users: usize, granule: usize) -> usize {
    let granule = granule.max(1);
    (BLOCK_SCORES_BYTES / (4 * users.max(1)) / granule).max(1) * granule
}

/// Ranks `slice`'s users on scores computed `width` items (a multiple of the
/// granule) at a time, each block ranked as soon as it is computed. Every user's target is scored
/// first (its own granule of items, the same bits as in its block), so the
/// items above it are counted as the blocks pass; the results equal
/// [`Ranker::rank`] on whole rows.
fn rank_in_blocks(
    blocks: &dyn ItemBlocks,
    n: usize,
    slice: &[Target],
    histories: &[&[u32]],
    list_len: usize,
    width: usize,
    buffer: &mut Vec<f32>,
) -> Result<Vec<Ranked>> {
    let users = slice.len();
    if blocks.users() != users {
        return Err(Error::internal(format!(
            "scorer made item blocks for {} users, not {users}",
            blocks.users()
        )));
    }
    let granule = blocks.granule().max(1);
    let mut one = vec![0.0f32; granule];
    let mut rankings: Vec<UserRanking> = slice
        .iter()
        .zip(histories)
        .enumerate()
        .map(|(u, (target, history))| {
            UserRanking::new(history, target.item, n, list_len, Vec::new(), |t| {
                let start = t / granule * granule;
                let items = start..(start + granule).min(n);
                let one = &mut one[..items.len()];
                blocks.scores(u..u + 1, items, one);
                one[t - start]
            })
        })
        .collect();
    if !width.is_multiple_of(granule) || width == 0 {
        return Err(Error::internal(format!(
            "blocks of {width} items are not whole granules of {granule}"
        )));
    }
    for start in (0..n).step_by(width) {
        let items = start..(start + width).min(n);
        let len = items.len();
        buffer.resize(users * len, 0.0);
        blocks.scores(0..users, items, &mut buffer[..users * len]);
        for (ranking, scores) in rankings.iter_mut().zip(buffer.chunks_exact(len)) {
            ranking.feed(start, scores);
        }
    }
    Ok(rankings
        .into_iter()
        .zip(slice)
        .map(|(ranking, target)| {
            let (rank, top, _) = ranking.finish();
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

    /// Scores held whole, handed out a range at a time.
    struct HeldBlocks {
        scores: Vec<f32>,
        n: usize,
        granule: usize,
    }

    impl ItemBlocks for HeldBlocks {
        fn users(&self) -> usize {
            self.scores.len() / self.n
        }

        fn granule(&self) -> usize {
            self.granule
        }

        fn scores(
            &self,
            users: std::ops::Range<usize>,
            items: std::ops::Range<usize>,
            out: &mut [f32],
        ) {
            assert!(
                items.start.is_multiple_of(self.granule),
                "{items:?} not on a granule"
            );
            let width = items.len();
            for (u, out) in users.zip(out.chunks_exact_mut(width)) {
                out.copy_from_slice(&self.scores[u * self.n + items.start..u * self.n + items.end]);
            }
        }
    }

    /// Ranking blocks of items as they come gives what ranking whole rows
    /// gives: ranks, lists and their order, with ties, NaN, ±∞, histories
    /// that repeat items, hold the target or items past the catalogue, and
    /// blocks of any whole number of granules.
    #[test]
    fn ranking_in_blocks_equals_ranking_whole_rows() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(23);
        let mut ranker = Ranker::default();
        for case in 0..400 {
            let n = rng.random_range(1..500);
            let users = rng.random_range(1..9);
            let granule = [1, 8, 16][rng.random_range(0..3)];
            let width = granule * rng.random_range(1..12);
            let list_len = rng.random_range(0..25);
            let scores: Vec<f32> = (0..users * n)
                .map(|i| match rng.random_range(0..60) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => f32::INFINITY,
                    3..20 => (i % n) as f32 * 0.01,
                    _ => rng.random_range(0..10) as f32 * 0.25,
                })
                .collect();
            let history_items: Vec<Vec<u32>> = (0..users)
                .map(|_| {
                    (0..rng.random_range(0..40))
                        .map(|_| rng.random_range(0..n as u32 + 3))
                        .collect()
                })
                .collect();
            let histories: Vec<&[u32]> = history_items.iter().map(|h| h.as_slice()).collect();
            let slice: Vec<Target> = (0..users)
                .map(|u| Target {
                    user: u as u32,
                    position: 1,
                    item: if rng.random_bool(0.2) && !histories[u].is_empty() {
                        histories[u][0].min(n as u32 - 1)
                    } else {
                        rng.random_range(0..n as u32)
                    },
                })
                .collect();
            let blocks = HeldBlocks {
                scores: scores.clone(),
                n,
                granule,
            };
            let mut buffer = Vec::new();
            let got = rank_in_blocks(&blocks, n, &slice, &histories, list_len, width, &mut buffer)
                .unwrap();
            for (u, ranked) in got.iter().enumerate() {
                let (rank, top) = ranker.rank(
                    &scores[u * n..(u + 1) * n],
                    histories[u],
                    slice[u].item,
                    list_len,
                );
                let context =
                    format!("case {case}: n {n}, granule {granule}, width {width}, user {u}");
                assert_eq!(ranked.target, slice[u], "{context}");
                assert_eq!(ranked.rank, rank, "{context}");
                assert_eq!(ranked.top.len(), top.len(), "{context}");
                for (g, w) in ranked.top.iter().zip(&top) {
                    assert!(
                        g.0 == w.0 && g.1.to_bits() == w.1.to_bits(),
                        "{context}: {g:?} vs {w:?}"
                    );
                }
            }
        }
        // Blocks that are not whole granules are refused, not misread.
        let blocks = HeldBlocks {
            scores: vec![0.0; 32],
            n: 32,
            granule: 16,
        };
        let target = [Target {
            user: 0,
            position: 1,
            item: 3,
        }];
        assert!(rank_in_blocks(&blocks, 32, &target, &[&[]], 5, 24, &mut Vec::new()).is_err());
    }

    /// The scan compiled for AVX2 keeps the list and counts the target's
    /// rank exactly as the crate's own build does: ties, NaN, ±∞,
    /// exclusions, any length and any target.
    #[test]
    fn wide_scans_equal_the_portable_scan() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(31);
        let mut wide_runs = 0;
        for case in 0..400 {
            let n = rng.random_range(1..700);
            let scores: Vec<f32> = (0..n)
                .map(|i| match rng.random_range(0..40) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => f32::INFINITY,
                    3..12 => i as f32 * 0.01,
                    _ => rng.random_range(0..8) as f32 * 0.5,
                })
                .collect();
            let excluded: Vec<bool> = (0..n).map(|_| rng.random_bool(0.1)).collect();
            let k = rng.random_range(0..30);
            let target = rng
                .random_bool(0.8)
                .then(|| rng.random_range(0..n))
                .map(|t| (t, key(scores[t])));
            let mut portable = Scan::new(k, target);
            portable.feed_chunks(0, &scores, |j| excluded[j]);
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                let mut wide = Scan::new(k, target);
                // SAFETY: the CPU has AVX2 (checked just above).
                unsafe { wide.feed_avx2(0, &scores, |j| excluded[j]) };
                wide_runs += 1;
                assert_eq!(wide.above, portable.above, "case {case}: n {n}, k {k}");
                assert_eq!(wide.best.len(), portable.best.len(), "case {case}");
                for (w, p) in wide.best.iter().zip(&portable.best) {
                    assert!(w.0 == p.0 && w.1.to_bits() == p.1.to_bits(), "case {case}");
                }
            }
        }
        // The crate's own build is checked against a full sort by the tests
        // above; on a CPU without AVX2 nothing wider runs.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(wide_runs > 0, std::arch::is_x86_feature_detected!("avx2"));
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(wide_runs, 0);
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
