//! What a distilled model learns from besides the hard labels: the soft
//! labels of the model before it in the chain, streamed group by group from
//! a [`LabelSource`] through a bounded shuffle buffer, and how its loss
//! mixes them with the hard labels. The files they are read from are
//! [`crate::artifacts::soft_labels`].

use std::collections::VecDeque;
use std::ops::Range;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::losses::{LossMix, SoftTarget};
use crate::config::LossFamily;
use crate::error::{Error, Result};

/// A window slot without a soft label.
pub const NO_LABEL: u32 = u32::MAX;

/// Where a set of soft labels comes from and how it was made.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelInfo {
    /// Items per row.
    pub k: usize,
    /// Temperature of `rest_logit`.
    pub temperature: f32,
    /// Producing model.
    pub model: String,
    /// SHA-256 of the producing model's artifact.
    pub model_sha256: String,
    /// Where they were read from.
    pub location: String,
}

/// Soft-label rows of some users: each user's rows together, positions
/// ascending. A row group of a soft-label file, one user in the shuffle
/// buffer, or the rows of one training batch.
#[derive(Debug, Clone, Default)]
pub struct SoftRows {
    /// Items per row.
    pub k: usize,
    users: Vec<u32>,
    /// Rows of `users[i]`: `user_rows[i]..user_rows[i + 1]`.
    user_rows: Vec<usize>,
    positions: Vec<u32>,
    items: Vec<u32>,
    logits: Vec<f32>,
    rest: Vec<f32>,
}

impl SoftRows {
    /// No rows yet, `k` items each.
    pub fn new(k: usize) -> SoftRows {
        SoftRows {
            k,
            user_rows: vec![0],
            ..SoftRows::default()
        }
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Users held.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// The `i`-th user held and its rows.
    pub fn user(&self, i: usize) -> (u32, Range<usize>) {
        (self.users[i], self.user_rows[i]..self.user_rows[i + 1])
    }

    /// The position of row `row`.
    pub fn position(&self, row: usize) -> u32 {
        self.positions[row]
    }

    /// The row of the `i`-th user held at `position`, if there is one.
    pub fn row(&self, i: usize, position: usize) -> Option<usize> {
        let (_, rows) = self.user(i);
        let found = self.positions[rows.clone()].binary_search(&(position as u32));
        found.ok().map(|r| rows.start + r)
    }

    /// The soft label of row `row`.
    pub fn target(&self, row: usize) -> SoftTarget<'_> {
        let span = row * self.k..(row + 1) * self.k;
        SoftTarget {
            items: &self.items[span.clone()],
            logits: &self.logits[span],
            rest: self.rest[row],
        }
    }

    /// Appends the row of `user` at `position`: `k` items, their logits and
    /// the rest logit. A user's rows come together, positions ascending;
    /// anything else is refused, naming the rule.
    pub fn push(
        &mut self,
        user: u32,
        position: u32,
        items: &[u32],
        logits: &[f32],
        rest: f32,
    ) -> std::result::Result<(), String> {
        if self.users.last() == Some(&user) {
            if self.positions.last().is_some_and(|&p| p >= position) {
                return Err(format!(
                    "position {position} after position {}: a user's positions must ascend without repeats",
                    self.positions[self.positions.len() - 1]
                ));
            }
        } else {
            self.users.push(user);
            self.user_rows.push(self.positions.len());
        }
        self.positions.push(position);
        self.items.extend_from_slice(items);
        self.logits.extend_from_slice(logits);
        self.rest.push(rest);
        *self
            .user_rows
            .last_mut()
            .expect("one entry per user and one more") += 1;
        Ok(())
    }

    /// Appends row `row` of `from` (same K) as a row of `user`.
    pub fn push_row(&mut self, user: u32, from: &SoftRows, row: usize) {
        let t = from.target(row);
        // Rows copied in the order they were checked keep that order.
        let _ = self.push(user, from.positions[row], t.items, t.logits, t.rest);
    }

    /// The rows of one user each, in order.
    pub fn split_users(self) -> Vec<SoftRows> {
        (0..self.users.len())
            .map(|i| {
                let (user, rows) = self.user(i);
                let mut one = SoftRows::new(self.k);
                for r in rows {
                    one.push_row(user, &self, r);
                }
                one
            })
            .collect()
    }
}

/// A stream of soft labels, read again each epoch: groups of whole users,
/// never the whole set at once.
pub trait LabelSource: Send {
    /// What the labels are.
    fn info(&self) -> &LabelInfo;

    /// Starts an epoch; its groups come in an order `seed` shuffles.
    fn start_epoch(&mut self, seed: u64) -> Result<()>;

    /// The epoch's next group, or `None` once every group was handed out.
    /// A user's rows all lie in one group.
    fn next_group(&mut self) -> Result<Option<SoftRows>>;
}

/// The order a [`LabelSource`] hands out its groups in: each epoch a
/// permutation its seed shuffles, walked once.
#[derive(Debug, Clone)]
pub struct GroupOrder {
    order: Vec<usize>,
    next: usize,
}

impl GroupOrder {
    /// Groups `0..groups`, in file order until the first epoch starts.
    pub fn new(groups: usize) -> GroupOrder {
        GroupOrder {
            order: (0..groups).collect(),
            next: 0,
        }
    }

    /// Starts an epoch: the groups in an order `seed` shuffles.
    pub fn start_epoch(&mut self, seed: u64) {
        self.order.shuffle(&mut StdRng::seed_from_u64(seed));
        self.next = 0;
    }

    /// The epoch's next group, `None` once every group was handed out.
    pub fn next_group(&mut self) -> Option<usize> {
        let group = self.order.get(self.next).copied();
        self.next += usize::from(group.is_some());
        group
    }
}

/// Soft labels held in memory as groups, handed out like a file's row
/// groups (small label sets and tests).
#[derive(Debug, Clone)]
pub struct HeldLabels {
    info: LabelInfo,
    groups: Vec<SoftRows>,
    order: GroupOrder,
}

impl HeldLabels {
    /// `groups` described by `info`.
    pub fn new(info: LabelInfo, groups: Vec<SoftRows>) -> HeldLabels {
        HeldLabels {
            info,
            order: GroupOrder::new(groups.len()),
            groups,
        }
    }
}

impl LabelSource for HeldLabels {
    fn info(&self) -> &LabelInfo {
        &self.info
    }

    fn start_epoch(&mut self, seed: u64) -> Result<()> {
        self.order.start_epoch(seed);
        Ok(())
    }

    fn next_group(&mut self) -> Result<Option<SoftRows>> {
        Ok(self.order.next_group().map(|g| self.groups[g].clone()))
    }
}

/// One user's turn in an epoch: the index of its train sequence and its
/// soft labels (`None` when the labels have none for it).
pub type Turn = (usize, Option<SoftRows>);

/// The epoch's users in a random order, drawn from at most `capacity`
/// buffered rows (plus one group) as groups stream in from a
/// [`LabelSource`]; once the source is done, the users it never named (with
/// hard labels only) join the draw.
pub struct ShuffleBuffer<'a> {
    source: &'a mut dyn LabelSource,
    /// Train-sequence index of each user, `usize::MAX` for none.
    sequence_of: &'a [usize],
    capacity: usize,
    held: Vec<Turn>,
    held_rows: usize,
    peak_rows: usize,
    seen: Vec<bool>,
    done: bool,
    unnamed: VecDeque<usize>,
}

impl<'a> ShuffleBuffer<'a> {
    /// Starts an epoch of `source` over users whose train sequences are
    /// `sequence_of` (by user index), holding about `capacity` rows.
    pub fn start(
        source: &'a mut dyn LabelSource,
        sequence_of: &'a [usize],
        capacity: usize,
        seed: u64,
    ) -> Result<ShuffleBuffer<'a>> {
        source.start_epoch(seed)?;
        Ok(ShuffleBuffer {
            source,
            sequence_of,
            capacity: capacity.max(1),
            held: Vec::new(),
            held_rows: 0,
            peak_rows: 0,
            seen: vec![false; sequence_of.len()],
            done: false,
            unnamed: VecDeque::new(),
        })
    }

    /// The most rows held at once so far.
    pub fn peak_rows(&self) -> usize {
        self.peak_rows
    }

    /// The next user's turn, drawn at random from the buffer after topping
    /// it up; `None` once the epoch is over.
    pub fn next(&mut self, rng: &mut StdRng) -> Result<Option<Turn>> {
        while !self.done && self.held_rows < self.capacity {
            match self.source.next_group()? {
                Some(group) => self.hold(group)?,
                None => {
                    self.done = true;
                    self.unnamed = (0..self.sequence_of.len())
                        .filter(|&u| !self.seen[u] && self.sequence_of[u] != usize::MAX)
                        .collect();
                }
            }
        }
        // With the source done, the unnamed users are drawn alongside.
        let pool = self.held.len() + self.unnamed.len();
        if pool == 0 {
            return Ok(None);
        }
        let pick = rng.random_range(0..pool);
        if pick >= self.held.len() {
            let u = self.unnamed.swap_remove_back(pick - self.held.len());
            return Ok(u.map(|u| (self.sequence_of[u], None)));
        }
        let turn = self.held.swap_remove(pick);
        self.held_rows -= turn.1.as_ref().map_or(0, SoftRows::len);
        Ok(Some(turn))
    }

    fn hold(&mut self, group: SoftRows) -> Result<()> {
        let location = &self.source.info().location;
        for i in 0..group.users() {
            let (user, _) = group.user(i);
            let seen = self.seen.get_mut(user as usize).ok_or_else(|| {
                Error::data(
                    location,
                    format!("user index {user} is outside the dataset"),
                )
            })?;
            if *seen {
                return Err(Error::data(
                    location,
                    format!(
                        "the rows of user index {user} are split between row groups (or repeated): a user's soft labels must lie in one row group"
                    ),
                ));
            }
            *seen = true;
        }
        for one in group.split_users() {
            let (user, _) = one.user(0);
            let sequence = self.sequence_of[user as usize];
            if sequence != usize::MAX {
                self.held_rows += one.len();
                self.held.push((sequence, Some(one)));
            }
        }
        self.peak_rows = self.peak_rows.max(self.held_rows);
        Ok(())
    }
}

/// What a distilled model learns from besides the hard labels: which soft
/// labels, and how the losses mix.
#[derive(Debug, Clone)]
pub struct Distillation {
    /// The source's soft labels: who made them, where they are.
    pub labels: LabelInfo,
    /// α, T and the soft-loss family.
    pub mix: LossMix,
}

impl Distillation {
    /// Learning from `labels` with weight `alpha` on the hard label and the
    /// soft losses of `family`, at the temperature the labels were produced at.
    pub fn new(labels: LabelInfo, alpha: f32, family: LossFamily, rank_decay: f32) -> Self {
        let mix = LossMix {
            alpha,
            temperature: labels.temperature,
            family,
            rank_decay,
        };
        Distillation { labels, mix }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `groups` groups of `users` consecutive users with `rows` rows each.
    fn held(groups: usize, users: usize, rows: usize) -> HeldLabels {
        let groups = (0..groups)
            .map(|g| {
                let mut group = SoftRows::new(2);
                for u in g * users..(g + 1) * users {
                    for p in 1..=rows {
                        let items = [u as u32, p as u32];
                        group
                            .push(u as u32, p as u32, &items, &[1.0, 0.5], 0.0)
                            .unwrap();
                    }
                }
                group
            })
            .collect();
        HeldLabels::new(LabelInfo::default(), groups)
    }

    #[test]
    fn the_shuffle_buffer_hands_out_every_user_once_holding_bounded_rows() {
        // 500 labelled users in 50 groups of 30 rows, 20 users the labels
        // never name; every seventh user has no train sequence.
        let source = held(50, 10, 3);
        let sequence_of: Vec<usize> = (0..520)
            .map(|u| if u % 7 == 3 { usize::MAX } else { u })
            .collect();
        let want: Vec<usize> = (0..520).filter(|&u| sequence_of[u] != usize::MAX).collect();
        for capacity in [1, 20, 100] {
            let mut source = source.clone();
            let mut buffer = ShuffleBuffer::start(&mut source, &sequence_of, capacity, 9).unwrap();
            let mut rng = StdRng::seed_from_u64(1);
            let mut got = Vec::new();
            while let Some((s, rows)) = buffer.next(&mut rng).unwrap() {
                match rows {
                    Some(rows) => {
                        assert_eq!((rows.users(), rows.len()), (1, 3));
                        assert_eq!(rows.user(0).0 as usize, s);
                        assert_eq!(rows.target(rows.row(0, 2).unwrap()).items, [s as u32, 2]);
                    }
                    None => assert!(s >= 500, "user {s} has labels"),
                }
                got.push(s);
            }
            assert!(
                buffer.peak_rows() <= capacity + 30,
                "capacity {capacity}: held {} rows",
                buffer.peak_rows()
            );
            assert_ne!(got, want, "capacity {capacity}: not shuffled");
            got.sort_unstable();
            assert_eq!(got, want, "capacity {capacity}");
        }
    }

    #[test]
    fn a_user_in_two_groups_or_out_of_order_is_refused() {
        let mut a = SoftRows::new(1);
        a.push(4, 1, &[0], &[1.0], 0.0).unwrap();
        assert!(
            a.push(4, 1, &[0], &[1.0], 0.0).is_err(),
            "repeated position"
        );
        let mut b = SoftRows::new(1);
        b.push(4, 2, &[0], &[1.0], 0.0).unwrap();
        let mut source = HeldLabels::new(LabelInfo::default(), vec![a, b]);
        let sequence_of: Vec<usize> = (0..8).collect();
        let mut buffer = ShuffleBuffer::start(&mut source, &sequence_of, 100, 1).unwrap();
        let err = buffer.next(&mut StdRng::seed_from_u64(1)).unwrap_err();
        assert_eq!(err.exit_code(), crate::error::exit_code::DATA, "{err}");
        assert!(err.to_string().contains("split"), "{err}");
    }
}
