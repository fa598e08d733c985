//! The end of every epoch: validation NDCG@10/HR@10, the log line and the
//! history row, and early stopping that keeps the best epoch's state.

use crate::dataset::{Dataset, Split, Target};
use crate::error::{Error, Result};
use crate::model::Scorer;
use crate::model::score;

/// One epoch of training, for the training history.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochLog {
    /// 1-based epoch.
    pub epoch: usize,
    /// Wall time of the epoch's training steps.
    pub seconds: f64,
    /// Mean training loss.
    pub loss: f64,
    /// Validation NDCG@10.
    pub valid_ndcg_10: f64,
    /// Validation HR@10.
    pub valid_hr_10: f64,
}

/// The epoch with the best validation NDCG@10 (the one early stopping keeps).
pub fn best_epoch(log: &[EpochLog]) -> Option<&EpochLog> {
    log.iter()
        .max_by(|a, b| a.valid_ndcg_10.total_cmp(&b.valid_ndcg_10))
}

/// `n` of `targets`, evenly spaced (all of them for `n` = 0 or more than
/// there are): the same users for every model of a run.
pub fn valid_sample(targets: Vec<Target>, n: usize) -> Vec<Target> {
    if n == 0 || targets.len() <= n {
        return targets;
    }
    let len = targets.len();
    (0..n).map(|i| targets[i * len / n]).collect()
}

/// The end of every epoch: validation NDCG@10/HR@10, the log line and
/// history row, and early stopping that keeps the best epoch's state.
pub struct EarlyStopping<T> {
    label: String,
    patience: usize,
    valid: Vec<Target>,
    best: Option<(f64, T)>,
    since_best: usize,
    log: Vec<EpochLog>,
}

impl<T> EarlyStopping<T> {
    /// Validates on `dataset`'s valid split — on `valid_users` of its
    /// targets, evenly spaced, when it has more (0: all); stops after
    /// `patience` epochs without a better NDCG@10.
    pub fn new(
        label: &str,
        patience: usize,
        dataset: &Dataset,
        valid_users: usize,
    ) -> EarlyStopping<T> {
        EarlyStopping {
            label: label.to_string(),
            patience,
            valid: valid_sample(dataset.targets(Split::Valid), valid_users),
            best: None,
            since_best: 0,
            log: Vec::new(),
        }
    }

    /// The last epoch's loss and validation NDCG@10, for progress bars.
    pub fn last_summary(&self) -> String {
        self.log
            .last()
            .map(|e| {
                format!(
                    " (loss {:.3}, valid ndcg@10 {:.4})",
                    e.loss, e.valid_ndcg_10
                )
            })
            .unwrap_or_default()
    }

    /// Records epoch `epoch` (its training `seconds` and mean `loss`) with
    /// `scorer`'s validation metrics; keeps `snapshot()` if it is the best so
    /// far (always, without valid targets). Returns whether to stop.
    pub fn end_epoch(
        &mut self,
        epoch: usize,
        seconds: f64,
        loss: f64,
        scorer: &dyn Scorer,
        dataset: &Dataset,
        snapshot: impl FnOnce() -> T,
    ) -> Result<bool> {
        if !loss.is_finite() {
            return Err(Error::internal(format!(
                "{}: training diverged (loss {loss}) at epoch {epoch}; lower the learning rate",
                self.label
            )));
        }
        let metrics = if self.valid.is_empty() {
            None
        } else {
            Some(score::evaluate(scorer, dataset, &self.valid, &[10], 512)?)
        };
        let valid_ndcg = metrics.as_ref().and_then(|m| m.ndcg_at(10)).unwrap_or(0.0);
        let entry = EpochLog {
            epoch,
            seconds,
            loss,
            valid_ndcg_10: valid_ndcg,
            valid_hr_10: metrics.as_ref().and_then(|m| m.hr_at(10)).unwrap_or(0.0),
        };
        tracing::info!(
            model = %self.label,
            epoch,
            loss = entry.loss,
            valid_ndcg_10 = entry.valid_ndcg_10,
            seconds = entry.seconds,
            "epoch done"
        );
        self.log.push(entry);
        if metrics.is_none() || self.best.as_ref().is_none_or(|(v, _)| valid_ndcg > *v) {
            self.best = Some((valid_ndcg, snapshot()));
            self.since_best = 0;
            Ok(false)
        } else {
            self.since_best += 1;
            Ok(self.since_best >= self.patience)
        }
    }

    /// The best epoch's state (`None` if no epoch ended) and the history.
    pub fn finish(self) -> (Option<T>, Vec<EpochLog>) {
        (self.best.map(|(_, state)| state), self.log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_valid_sample_is_evenly_spaced_and_all_for_zero_or_few() {
        let targets: Vec<Target> = (0..10)
            .map(|u| Target {
                user: u,
                position: 3,
                item: 100 + u,
            })
            .collect();
        let users = |t: &[Target]| t.iter().map(|t| t.user).collect::<Vec<_>>();
        assert_eq!(users(&valid_sample(targets.clone(), 4)), [0, 2, 5, 7]);
        assert_eq!(
            users(&valid_sample(targets.clone(), 0)),
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(users(&valid_sample(targets.clone(), 10)).len(), 10);
        assert_eq!(users(&valid_sample(targets, 25)).len(), 10);
    }
}
