//! `[evaluation]`: the metrics' cut-offs, the recommendation lists and the
//! timing of every model.

use serde::{Deserialize, Serialize};

/// `[evaluation]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluationSpec {
    /// Cut-offs for HR/NDCG/MRR@K.
    pub ks: Vec<u32>,
    /// Length of each user's recommendation list; 0 means the largest K.
    pub recommend_k: u32,
    /// Users scored together in one batch.
    pub batch_users: usize,
    /// Users scored one at a time for each model's latency percentiles
    /// (0: no latency or throughput measured).
    pub latency_users: usize,
    /// Early stopping validates every trained model after each epoch on an
    /// evenly spaced sample of this many users' valid targets (the same
    /// users for every model); 0 for every user. The evaluation tables
    /// always rank every test user.
    pub valid_users: usize,
    /// Throughput (users/s) is timed over whole passes of the first this
    /// many test users, in batches; 0 for every test user.
    pub throughput_users: usize,
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        EvaluationSpec {
            ks: vec![5, 10, 20],
            recommend_k: 0,
            batch_users: 256,
            latency_users: 200,
            valid_users: 0,
            throughput_users: 20_000,
        }
    }
}

impl EvaluationSpec {
    /// Length of the recommendation lists written.
    pub fn list_len(&self) -> usize {
        if self.recommend_k > 0 {
            self.recommend_k as usize
        } else {
            self.ks.iter().copied().max().unwrap_or(10) as usize
        }
    }
}
