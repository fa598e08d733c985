//! The Bayes ceiling of the synthetic logs: the generator knows each
//! user's next-item probabilities given everything before it, so no model
//! can do better, in expectation, than ranking the unseen items by them.
//! For each user's leave-one-out test target this ranks the items the way
//! the evaluation does (earlier items excluded, ties by item id), and
//! records the expected HR, NDCG and MRR of that ranking and the rank it
//! gives the target that was drawn ([`CeilingRow`]).
//!
//! Both generators' next-item distributions have one shape: a few items
//! with extra mass (the successors of the last item), and a weight per item
//! (Zipf popularity) scaled by a factor per cluster (how likely the user is
//! to draw from that taste cluster). [`NextItem`] ranks such a
//! distribution's items best first by merging each cluster's items, kept in
//! descending weight, so a ranking costs the depth of the list, not the
//! catalogue.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{
    Catalogue, FOLLOW, LOG_HOME, LOG_OWN_CLUSTER, LOG_SUCCESSION, SAMPLE_STEP_SHARE, SAMPLE_STEPS,
    sample_weights,
};
use crate::artifacts::ceiling::{CEILING_DEPTH, CeilingRow};

/// A catalogue's items grouped by cluster, each cluster's items in
/// descending weight (ties by item id).
pub(super) struct Ranked {
    /// Weight of every item (unnormalised).
    pub weight: Vec<f64>,
    /// Cluster of every item.
    pub cluster: Vec<u32>,
    /// Per cluster: its items, heaviest first.
    pub by_weight: Vec<Vec<u32>>,
}

impl Ranked {
    /// Items `0..weight.len()` in the clusters `cluster_of` assigns.
    pub fn new(weight: Vec<f64>, clusters: usize, cluster_of: impl Fn(usize) -> usize) -> Ranked {
        let cluster: Vec<u32> = (0..weight.len()).map(|i| cluster_of(i) as u32).collect();
        let mut by_weight = vec![Vec::new(); clusters];
        for (item, &c) in cluster.iter().enumerate() {
            by_weight[c as usize].push(item as u32);
        }
        for items in &mut by_weight {
            items.sort_by(|&a, &b| {
                weight[b as usize]
                    .total_cmp(&weight[a as usize])
                    .then(a.cmp(&b))
            });
        }
        Ranked {
            weight,
            cluster,
            by_weight,
        }
    }
}

/// One user's next-item distribution: `p(j) = boost(j) + weight(j) ·
/// scale[cluster(j)]`.
pub(super) struct NextItem<'a> {
    /// The catalogue.
    pub ranked: &'a Ranked,
    /// Per cluster: the factor on its items' weights.
    pub scale: Vec<f64>,
    /// Items with extra probability, each once.
    pub boosts: Vec<(u32, f64)>,
}

/// A candidate of the merge: its probability and item, and where it came
/// from (a cluster and the position of the item in it, or a boost).
#[derive(Debug, Clone, Copy)]
struct Candidate {
    p: f64,
    item: u32,
    from: Option<(u32, u32)>,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    /// Higher probability first; equal ones by lower item id.
    fn cmp(&self, other: &Self) -> Ordering {
        self.p.total_cmp(&other.p).then(other.item.cmp(&self.item))
    }
}

impl NextItem<'_> {
    /// Adds `p` to `item`'s boost.
    pub fn boost(&mut self, item: u32, p: f64) {
        match self.boosts.iter_mut().find(|(i, _)| *i == item) {
            Some((_, q)) => *q += p,
            None => self.boosts.push((item, p)),
        }
    }

    /// The probability of `item`.
    pub fn probability(&self, item: u32) -> f64 {
        let boost: f64 = self
            .boosts
            .iter()
            .filter(|(i, _)| *i == item)
            .map(|(_, p)| p)
            .sum();
        let r = self.ranked;
        boost + r.weight[item as usize] * self.scale[r.cluster[item as usize] as usize]
    }

    /// The Bayes-optimal ranking of the items not in `seen` (sorted): the
    /// probabilities of its first [`CEILING_DEPTH`] items, best first, and
    /// the 1-based rank of `target` in it (`None` when seen or deeper).
    pub fn rank_unseen(&self, seen: &[u32], target: u32) -> (Vec<f64>, Option<u32>) {
        let r = self.ranked;
        let head = |c: usize, at: usize| -> Option<Candidate> {
            let &item = r.by_weight[c].get(at)?;
            Some(Candidate {
                p: r.weight[item as usize] * self.scale[c],
                item,
                from: Some((c as u32, at as u32)),
            })
        };
        let mut heap: BinaryHeap<Candidate> = (0..r.by_weight.len())
            .filter_map(|c| head(c, 0))
            .chain(self.boosts.iter().map(|&(item, _)| Candidate {
                p: self.probability(item),
                item,
                from: None,
            }))
            .collect();
        let mut probability = Vec::with_capacity(CEILING_DEPTH);
        let mut target_rank = None;
        while probability.len() < CEILING_DEPTH {
            let Some(c) = heap.pop() else { break };
            if let Some((cluster, at)) = c.from {
                if let Some(next) = head(cluster as usize, at as usize + 1) {
                    heap.push(next);
                }
                // A boosted item is ranked by its whole probability, as a boost.
                if self.boosts.iter().any(|(i, _)| *i == c.item) {
                    continue;
                }
            }
            if seen.binary_search(&c.item).is_ok() {
                continue;
            }
            probability.push(c.p);
            if c.item == target {
                target_rank = Some(probability.len() as u32);
            }
        }
        (probability, target_rank)
    }
}

/// The sorted, de-duplicated items of `history`.
pub(super) fn seen(history: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut seen: Vec<u32> = history.collect();
    seen.sort_unstable();
    seen.dedup();
    seen
}

/// One user's ceiling row from the user's next-item distribution for the
/// test target, given the items before it.
pub(super) fn ceiling_row(
    next: &NextItem,
    history: &[u32],
    target: u32,
    user_id: i64,
    item_id_base: i64,
) -> CeilingRow {
    let seen = seen(history.iter().copied());
    let (probability, target_rank) = next.rank_unseen(&seen, target);
    CeilingRow::from_ranking(
        user_id,
        i64::from(target) + item_id_base,
        history.len() as i64,
        &probability,
        target_rank,
    )
}

/// The bundled sample's next-item distribution after `last`: a step of 1,
/// 2 or 3 along the ring of items, else an item by popularity.
pub(super) fn sample_next<'a>(ranked: &'a Ranked, last: u32) -> NextItem<'a> {
    let n = ranked.weight.len();
    let total: f64 = ranked.weight.iter().sum();
    let mut next = NextItem {
        ranked,
        scale: vec![(1.0 - FOLLOW) / total],
        boosts: Vec::new(),
    };
    for (step, share) in SAMPLE_STEPS.iter().zip(SAMPLE_STEP_SHARE) {
        next.boost(((last as usize + step) % n) as u32, FOLLOW * share);
    }
    next
}

/// The bundled sample's items by popularity (one cluster).
pub(super) fn sample_ranked(items: usize) -> Ranked {
    Ranked::new(sample_weights(items), 1, |_| 0)
}

/// A log's items by cluster and popularity.
pub(super) fn log_ranked(catalogue: &Catalogue) -> Ranked {
    Ranked::new(catalogue.weight.clone(), catalogue.clusters, |i| {
        i % catalogue.clusters
    })
}

/// A log user's next-item distribution after `history` (in order, not
/// empty). The home cluster is the first item's (the first item is drawn
/// from it); the second cluster is unknown, so its posterior, given every
/// step of the history, weighs the clusters' draws. A cluster no step
/// landed in has the likelihood of every other such cluster.
pub(super) fn log_next<'a>(
    catalogue: &Catalogue,
    ranked: &'a Ranked,
    history: &[u32],
) -> NextItem<'a> {
    let clusters = catalogue.clusters;
    let total = catalogue.total_weight();
    let cluster_total: Vec<f64> = (0..clusters).map(|c| catalogue.cluster_weight(c)).collect();
    let cluster_of = |item: u32| item as usize % clusters;
    let weight = |item: u32| catalogue.weight[item as usize];
    let home = cluster_of(history[0]);
    let (home_share, second_share) = (
        LOG_OWN_CLUSTER * LOG_HOME,
        LOG_OWN_CLUSTER * (1.0 - LOG_HOME),
    );
    let any = 1.0 - LOG_SUCCESSION - LOG_OWN_CLUSTER;
    // log P(history | second = c) − log P(history | second = a cluster no step landed in).
    let mut delta = vec![0.0f64; clusters];
    for pair in history.windows(2) {
        let (prev, item) = (pair[0], pair[1]);
        let c = cluster_of(item);
        let succession: f64 = catalogue
            .successors(prev)
            .iter()
            .filter(|(s, _)| *s == item)
            .map(|(_, share)| share)
            .sum();
        let own = weight(item) / cluster_total[c];
        let base = LOG_SUCCESSION * succession
            + if c == home { home_share * own } else { 0.0 }
            + any * weight(item) / total;
        delta[c] += (base + second_share * own).ln() - base.ln();
    }
    let top = delta.iter().copied().fold(0.0f64, f64::max);
    let likelihood: Vec<f64> = delta.iter().map(|d| (d - top).exp()).collect();
    let z: f64 = likelihood.iter().sum();
    let scale = (0..clusters)
        .map(|c| {
            let posterior = likelihood[c] / z;
            let home_part = if c == home { home_share } else { 0.0 };
            (home_part + second_share * posterior) / cluster_total[c] + any / total
        })
        .collect();
    let mut next = NextItem {
        ranked,
        scale,
        boosts: Vec::new(),
    };
    let last = history[history.len() - 1];
    for (item, share) in catalogue.successors(last) {
        next.boost(item, LOG_SUCCESSION * share);
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_merge_ranks_every_unseen_item_by_probability_then_id() {
        // Three clusters of items with random weights, two boosts, some seen.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let n = 300;
        let weight: Vec<f64> = (0..n)
            .map(|i| if i % 7 == 0 { 0.5 } else { rng.random() })
            .collect();
        let ranked = Ranked::new(weight, 3, |i| i % 3);
        let mut next = NextItem {
            ranked: &ranked,
            scale: vec![0.3, 1.0, 0.0],
            boosts: Vec::new(),
        };
        next.boost(10, 0.25);
        next.boost(11, 2.0);
        next.boost(10, 0.25);
        assert_eq!(next.boosts, vec![(10, 0.5), (11, 2.0)]);
        let seen: Vec<u32> = (0..n as u32).filter(|i| i % 11 == 3).collect();
        let mut want: Vec<(f64, u32)> = (0..n as u32)
            .filter(|i| seen.binary_search(i).is_err())
            .map(|i| (next.probability(i), i))
            .collect();
        want.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let target = want[37].1;
        let (probability, rank) = next.rank_unseen(&seen, target);
        assert_eq!(probability.len(), CEILING_DEPTH);
        let want_p: Vec<f64> = want[..CEILING_DEPTH].iter().map(|w| w.0).collect();
        assert_eq!(probability, want_p);
        assert_eq!(rank, Some(38));
        // A seen target is never ranked; a deep one is past the depth.
        assert_eq!(next.rank_unseen(&seen, 3).1, None);
        assert_eq!(next.rank_unseen(&seen, want[250].1).1, None);
    }
}
