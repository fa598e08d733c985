//! The fit loop: shuffled batches of one window per user, validation
//! after every epoch, early stopping with the best epoch restored. The
//! steps themselves are taken by a [`Steps`]: the CPU trainer
//! ([`Trainer`]) or candle's autograd on a device ([`CandleSteps`]).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::candle::{CandleSteps, device};
use super::cpu::Trainer;
use super::distillation::{Distillation, LabelSource, NO_LABEL, ShuffleBuffer, SoftRows, Turn};
use super::pool::thread_pool;
use super::steps::{Steps, TrainSettings};
use super::stopping::{EarlyStopping, EpochLog};
use crate::config::Windows;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::model::sasrec::{PAD, SasRec};

/// A user's train sequence (up to the end of the window), as the inputs
/// and next-item targets of one window of `len` positions, right-aligned
/// (the most recent last).
pub fn fill_window(sequence: &[u32], inputs: &mut [u32], targets: &mut [u32]) {
    if sequence.is_empty() {
        inputs.fill(PAD);
        targets.fill(PAD);
        return;
    }
    let len = inputs.len();
    let usable = sequence.len().saturating_sub(1).min(len);
    let pad = len - usable;
    inputs[..pad].fill(PAD);
    targets[..pad].fill(PAD);
    let start = sequence.len() - usable - 1;
    inputs[pad..].copy_from_slice(&sequence[start..start + usable]);
    targets[pad..].copy_from_slice(&sequence[start + 1..start + 1 + usable]);
}

/// The position (index in the train sequence) of the target in slot `slot`
/// of [`fill_window`]'s window over the first `len` items of a sequence:
/// train item `len − max_len + slot`, when the slot holds one.
pub fn target_position(len: usize, max_len: usize, slot: usize) -> Option<usize> {
    let position = (len + slot).checked_sub(max_len)?;
    (position >= 1 && position < len).then_some(position)
}

/// The ends (exclusive) of the windows an epoch trains on over a train
/// sequence of `len` items: the most recent `max_len` targets, and with
/// [`Windows::All`] every earlier `max_len` before them, so an epoch
/// predicts every train item after the first once.
pub fn window_ends(len: usize, max_len: usize, windows: Windows) -> Vec<usize> {
    match windows {
        Windows::Last => vec![len],
        Windows::All => (0..)
            .map(|w| len.saturating_sub(w * max_len))
            .take_while(|&end| end >= 2)
            .collect(),
    }
}

/// Trains `model` on `dataset`'s train split on the CPU, early-stopping on
/// its valid split; returns the best epoch's model and the per-epoch log.
pub fn fit(
    model: SasRec,
    dataset: &Dataset,
    settings: &TrainSettings,
) -> Result<(SasRec, Vec<EpochLog>)> {
    let mut trainer = Trainer::new(&model, dataset, settings)?;
    fit_with(model, dataset, settings, &mut trainer, None)
}

/// Trains `model` like [`fit`], its loss mixing the hard labels with the
/// soft labels `labels` streams, as `distillation` says.
pub fn fit_distilled(
    model: SasRec,
    dataset: &Dataset,
    settings: &TrainSettings,
    distillation: Arc<Distillation>,
    labels: &mut dyn LabelSource,
) -> Result<(SasRec, Vec<EpochLog>)> {
    let mut trainer = Trainer::distilling(&model, dataset, settings, distillation)?;
    fit_with(model, dataset, settings, &mut trainer, Some(labels))
}

/// Users' train sequences with at least one next item to learn, with
/// their user index.
pub fn train_sequences(dataset: &Dataset) -> Result<Vec<(usize, Vec<u32>)>> {
    let sequences: Vec<(usize, Vec<u32>)> = (0..dataset.n_users())
        .map(|u| (u, dataset.train_items(u)))
        .filter(|(_, s)| s.len() >= 2)
        .collect();
    if sequences.is_empty() {
        return Err(Error::data(
            "split table",
            "no user has two train events: nothing to learn a next item from",
        ));
    }
    Ok(sequences)
}

/// The epoch loop: shuffled batches of one window per user (their most
/// recent `max_len` train items), validation NDCG@10 after every epoch,
/// early stopping with patience and the best epoch's weights restored.
/// With `labels`, users come in the order of a [`ShuffleBuffer`] of
/// `settings.label_buffer` rows over the soft labels streamed from it, and
/// each target slot gets its soft-label row.
pub fn fit_with(
    mut model: SasRec,
    dataset: &Dataset,
    settings: &TrainSettings,
    steps_by: &mut dyn Steps,
    mut labels: Option<&mut dyn LabelSource>,
) -> Result<(SasRec, Vec<EpochLog>)> {
    let c = model.config;
    let sequences = train_sequences(dataset)?;
    let mut sequence_of = vec![usize::MAX; dataset.n_users()];
    for (s, (user, _)) in sequences.iter().enumerate() {
        sequence_of[*user] = s;
    }
    let mut rng = StdRng::seed_from_u64(settings.seed);
    // Every window of the epoch: (train sequence, end).
    let mut order: Vec<(usize, usize)> = sequences
        .iter()
        .enumerate()
        .flat_map(|(s, (_, sequence))| {
            window_ends(sequence.len(), c.max_len, settings.windows)
                .into_iter()
                .map(move |end| (s, end))
        })
        .collect();
    let b = settings.batch_size;
    let mut inputs = vec![PAD; b * c.max_len];
    let mut targets = vec![PAD; b * c.max_len];
    let k = labels.as_ref().map_or(0, |l| l.info().k);
    let distilling = labels.is_some();
    let mut soft = vec![NO_LABEL; if distilling { b * c.max_len } else { 0 }];
    // A window to train on: its sequence, soft labels and end.
    let mut turns: Vec<(usize, Option<Rc<SoftRows>>, usize)> = Vec::with_capacity(b);
    // Windows of a user drawn from the shuffle buffer, not yet in a batch.
    let mut pending: Vec<(usize, Option<Rc<SoftRows>>, usize)> = Vec::new();
    let mut stopping = EarlyStopping::new(
        &settings.label,
        settings.patience,
        dataset,
        settings.valid_users,
    );
    let steps = order.len().div_ceil(b);
    let mut step_count = 0u64;
    for epoch in 1..=settings.epochs {
        let mut buffer = match labels.as_deref_mut() {
            Some(source) => Some(ShuffleBuffer::start(
                source,
                &sequence_of,
                settings.label_buffer,
                rng.random(),
            )?),
            None => {
                order.shuffle(&mut rng);
                None
            }
        };
        let mut in_order = order.iter();
        pending.clear();
        let progress = crate::progress::bar(
            steps as u64,
            &format!(
                "{} epoch {epoch}{}",
                settings.label,
                stopping.last_summary()
            ),
        );
        let started = Instant::now();
        let mut loss_sum = 0.0;
        loop {
            turns.clear();
            while turns.len() < b {
                if let Some(window) = pending.pop() {
                    turns.push(window);
                    continue;
                }
                match &mut buffer {
                    Some(buffer) => {
                        let Some((s, rows)): Option<Turn> = buffer.next(&mut rng)? else {
                            break;
                        };
                        let rows = rows.map(Rc::new);
                        let len = sequences[s].1.len();
                        pending.extend(
                            window_ends(len, c.max_len, settings.windows)
                                .into_iter()
                                .map(|end| (s, rows.clone(), end)),
                        );
                    }
                    None => match in_order.next() {
                        Some(&(s, end)) => turns.push((s, None, end)),
                        None => break,
                    },
                }
            }
            if turns.is_empty() {
                break;
            }
            let n = turns.len() * c.max_len;
            let mut batch_labels = SoftRows::new(k);
            for (slot, (s, rows, end)) in turns.iter().enumerate() {
                let (user, sequence) = &sequences[*s];
                let span = slot * c.max_len..(slot + 1) * c.max_len;
                fill_window(
                    &sequence[..*end],
                    &mut inputs[span.clone()],
                    &mut targets[span.clone()],
                );
                if !distilling {
                    continue;
                }
                for i in 0..c.max_len {
                    let at = slot * c.max_len + i;
                    let row = rows
                        .as_deref()
                        .filter(|_| targets[at] != PAD)
                        .and_then(|rows| {
                            target_position(*end, c.max_len, i)
                                .and_then(|p| rows.row(0, p))
                                .map(|r| (rows, r))
                        });
                    soft[at] = match row {
                        Some((rows, r)) => {
                            batch_labels.push_row(*user as u32, rows, r);
                            (batch_labels.len() - 1) as u32
                        }
                        None => NO_LABEL,
                    };
                }
            }
            step_count += 1;
            let step_seed = rng.random::<u64>() ^ step_count;
            let slot_labels = distilling.then(|| (&batch_labels, &soft[..n]));
            loss_sum += steps_by.step(
                &mut model,
                &inputs[..n],
                &targets[..n],
                slot_labels,
                turns.len(),
                step_seed,
            )?;
            progress.inc(1);
        }
        if let Some(buffer) = &buffer {
            tracing::debug!(
                model = %settings.label,
                epoch,
                peak_rows = buffer.peak_rows(),
                "soft-label shuffle buffer"
            );
        }
        drop(buffer);
        let seconds = started.elapsed().as_secs_f64();
        progress.finish_and_clear();
        steps_by.sync(&mut model)?;
        let loss = loss_sum / steps as f64;
        if stopping.end_epoch(epoch, seconds, loss, &model, dataset, || {
            model.weights.clone()
        })? {
            break;
        }
    }
    let (best, log) = stopping.finish();
    if let Some(weights) = best {
        model.weights = weights;
    }
    Ok((model, log))
}

/// Trains `model` (fresh, or warm-started from an earlier run's) on
/// `device` (`cpu`: the hand-written CPU trainer; otherwise candle's
/// autograd on that device) in a pool of `threads` threads; with
/// `distillation`, its loss mixes the hard labels with the soft labels the
/// source streams.
pub fn fit_on_device(
    model: SasRec,
    dataset: &Dataset,
    settings: &TrainSettings,
    device_name: &str,
    threads: usize,
    distillation: Option<(Arc<Distillation>, &mut dyn LabelSource)>,
) -> Result<(SasRec, Vec<EpochLog>)> {
    thread_pool(threads)?.install(|| match (device_name, distillation) {
        ("cpu", None) => fit(model, dataset, settings),
        ("cpu", Some((distill, labels))) => {
            fit_distilled(model, dataset, settings, distill, labels)
        }
        (name, None) => {
            let device = device(name)?;
            let mut steps = CandleSteps::new(&model, dataset, settings, &device)?;
            fit_with(model, dataset, settings, &mut steps, None)
        }
        (name, Some((distill, labels))) => {
            let device = device(name)?;
            let mut steps = CandleSteps::distilling(&model, dataset, settings, &device, distill)?;
            fit_with(model, dataset, settings, &mut steps, Some(labels))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_window_right_aligns_inputs_and_next_item_targets() {
        let mut inputs = [0u32; 4];
        let mut targets = [0u32; 4];
        fill_window(&[5, 6, 7], &mut inputs, &mut targets);
        assert_eq!(inputs, [PAD, PAD, 5, 6]);
        assert_eq!(targets, [PAD, PAD, 6, 7]);
        fill_window(&[1, 2, 3, 4, 5, 6], &mut inputs, &mut targets);
        assert_eq!(inputs, [2, 3, 4, 5]);
        assert_eq!(targets, [3, 4, 5, 6]);
        fill_window(&[], &mut inputs, &mut targets);
        assert_eq!(inputs, [PAD; 4]);
        assert_eq!(targets, [PAD; 4]);
    }

    #[test]
    fn all_windows_make_every_train_item_after_the_first_a_target_once() {
        for len in 0..40 {
            for max_len in 1..8 {
                let sequence: Vec<u32> = (0..len as u32).collect();
                let mut targeted = Vec::new();
                for end in window_ends(len, max_len, Windows::All) {
                    let (mut inputs, mut targets) = (vec![0; max_len], vec![0; max_len]);
                    fill_window(&sequence[..end], &mut inputs, &mut targets);
                    for (slot, &t) in targets.iter().enumerate() {
                        match target_position(end, max_len, slot) {
                            Some(p) => {
                                assert_eq!(t, sequence[p]);
                                targeted.push(p);
                            }
                            None => assert_eq!(t, PAD),
                        }
                    }
                }
                targeted.sort_unstable();
                let want: Vec<usize> = (1..len).collect();
                assert_eq!(targeted, want, "len {len}, max_len {max_len}");
                let last = window_ends(len, max_len, Windows::Last);
                assert_eq!(last, vec![len]);
            }
        }
    }

    #[test]
    fn target_positions_follow_the_window() {
        let mut inputs = [0u32; 4];
        let mut targets = [0u32; 4];
        for (sequence, max_len) in [(vec![5u32, 6, 7], 4), (vec![1, 2, 3, 4, 5, 6], 4)] {
            fill_window(&sequence, &mut inputs[..max_len], &mut targets[..max_len]);
            for (slot, &target) in targets[..max_len].iter().enumerate() {
                match target_position(sequence.len(), max_len, slot) {
                    Some(p) => assert_eq!(target, sequence[p], "{sequence:?} slot {slot}"),
                    None => assert_eq!(target, PAD, "{sequence:?} slot {slot}"),
                }
            }
        }
    }
}
