//! `[models]`: the baselines (`popularity`, `transitions`, `cooccurrence`,
//! `meanpool`) and the SASRec teacher, with the softmax and negative
//! sampling it trains with.

use serde::{Deserialize, Serialize};

use super::features::FeatureSpec;
use super::lake::InputSpec;

/// `[models]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsSpec {
    /// `[models.popularity]`
    pub popularity: PopularitySpec,
    /// `[models.transitions]`
    pub transitions: TransitionsSpec,
    /// `[models.cooccurrence]`
    pub cooccurrence: CooccurrenceSpec,
    /// `[models.meanpool]`
    pub meanpool: MeanPoolSpec,
    /// `[models.teacher]`
    pub teacher: TeacherSpec,
}

/// `[models.teacher]`: the SASRec transformer whose knowledge is distilled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherSpec {
    /// Train and evaluate it.
    pub enabled: bool,
    /// Width of every hidden state.
    pub d_model: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads (must divide d_model).
    pub heads: usize,
    /// Width of the feed-forward layer.
    pub ffn: usize,
    /// Most recent items the model sees.
    pub max_len: usize,
    /// Which windows of each user's train sequence an epoch trains on:
    /// `last` (the most recent `max_len` items) or `all` (every `max_len`
    /// items, back to the first).
    pub windows: Windows,
    /// Dropout probability.
    pub dropout: f32,
    /// Sequences per step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Decoupled weight decay (AdamW); 0 is Adam.
    pub weight_decay: f64,
    /// Most epochs.
    pub epochs: usize,
    /// Stop after this many epochs without a better validation NDCG@10.
    pub patience: usize,
    /// `full` softmax over the catalogue, or `sampled` with log-Q correction.
    pub softmax: Softmax,
    /// Negatives per step with sampled softmax.
    pub negatives: usize,
    /// How negatives are drawn: `popularity` or `uniform`.
    pub sampling: Sampling,
    /// Sampled softmax: also score each position against every other
    /// target of the batch (in-batch negatives). Off, each position scores
    /// its own target against the step's shared negatives only, so a step
    /// costs positions × (negatives + 1) dot products whatever the batch.
    pub in_batch: bool,
    /// Train `teacher`, on item ids alone.
    pub ids: bool,
    /// Also train `teacher-content`, fed the item content table.
    pub content: bool,
    /// Also train `teacher-text`, fed the items' text vectors (`[text]`)
    /// through a learned projection.
    pub text: bool,
    /// A neighbour baseline (`transitions` or `cooccurrence`) whose soft
    /// labels the teachers learn from beside the hard labels; `""` for none.
    pub baseline: String,
    /// Weight of the hard labels when learning from `baseline` (the soft
    /// labels get 1 − it).
    pub baseline_alpha: f32,
    /// Items per position of `baseline`'s soft labels.
    pub baseline_k: usize,
    /// Loss family against `baseline`'s soft labels (`kl`, `mse`, `rank`
    /// or a `+` join), at temperature 1.
    pub baseline_loss: String,
}

/// Model name of the id-only teacher.
pub const TEACHER: &str = "teacher";
/// Model name of the teacher fed the item content table.
pub const TEACHER_CONTENT: &str = "teacher-content";
/// Model name of the teacher fed the items' text vectors.
pub const TEACHER_TEXT: &str = "teacher-text";

impl TeacherSpec {
    /// The teachers it trains, in training order (whether or not the
    /// teacher stage is enabled).
    pub fn names(&self) -> Vec<&'static str> {
        [
            (TEACHER, self.ids),
            (TEACHER_CONTENT, self.content),
            (TEACHER_TEXT, self.text),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
    }
}

impl Default for TeacherSpec {
    fn default() -> Self {
        TeacherSpec {
            enabled: true,
            d_model: 64,
            layers: 2,
            heads: 2,
            ffn: 64,
            max_len: 50,
            windows: Windows::Last,
            dropout: 0.2,
            batch_size: 128,
            lr: 0.001,
            beta1: 0.9,
            beta2: 0.98,
            weight_decay: 0.0,
            epochs: 200,
            patience: 20,
            softmax: Softmax::Full,
            negatives: 1024,
            sampling: Sampling::Popularity,
            in_batch: false,
            ids: true,
            content: false,
            text: false,
            baseline: String::new(),
            baseline_alpha: 0.5,
            baseline_k: 20,
            baseline_loss: "kl".into(),
        }
    }
}

/// `[models.popularity]`: items ranked by their train-split event counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PopularitySpec {
    /// Train and evaluate it.
    pub enabled: bool,
}

impl Default for PopularitySpec {
    fn default() -> Self {
        PopularitySpec { enabled: true }
    }
}

/// `[models.transitions]`: first-order item-to-item counts of the train
/// split (`sql/transitions.sql`): a user's next items are the ones that
/// most often followed their last item, then the most popular.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransitionsSpec {
    /// Build, store and evaluate it.
    pub enabled: bool,
    /// Successors kept per item (the most frequent).
    pub neighbors: usize,
    /// The popularity back-off: an item's score is its count after the
    /// user's last item plus `backoff` × its share of the train events (a
    /// Dirichlet prior of this many pseudo-transitions).
    pub backoff: f64,
}

impl Default for TransitionsSpec {
    fn default() -> Self {
        TransitionsSpec {
            enabled: true,
            neighbors: 50,
            backoff: 1.0,
        }
    }
}

/// `[models.cooccurrence]`: item-KNN over co-occurrence
/// (`sql/cooccurrence.sql`): two items are neighbours when users had them
/// within `window` events of each other, by cosine (`count / sqrt(n_a ·
/// n_b)`), the top `neighbors` kept per item; a user's score sums the rows
/// of their last `history` items, each older one weighed by `decay`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CooccurrenceSpec {
    /// Build, store and evaluate it.
    pub enabled: bool,
    /// Neighbours kept per item (the most similar).
    pub neighbors: usize,
    /// Events apart (1 to 5) within which two items of a user count as seen
    /// together.
    pub window: usize,
    /// The user's most recent items whose neighbours are summed.
    pub history: usize,
    /// Weight of each older item, relative to the one after it.
    pub decay: f64,
}

impl Default for CooccurrenceSpec {
    fn default() -> Self {
        CooccurrenceSpec {
            enabled: true,
            neighbors: 50,
            window: 3,
            history: 5,
            decay: 0.5,
        }
    }
}

/// The widest `models.cooccurrence.window` the SQL spells out.
pub const MAX_COOCCURRENCE_WINDOW: usize = 5;

/// `[models.meanpool]`: the learned baseline. A user is the mean of the
/// embeddings of their last `window` items; scores are dot products with a
/// second (output) item table; trained with full-softmax cross-entropy on
/// the next item at every position of the train split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeanPoolSpec {
    /// Train and evaluate it.
    pub enabled: bool,
    /// Embedding width.
    pub d_model: usize,
    /// How many recent items make up the user.
    pub window: usize,
    /// Most epochs.
    pub epochs: usize,
    /// Stop after this many epochs without a better validation NDCG@10.
    pub patience: usize,
    /// Training examples per step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for MeanPoolSpec {
    fn default() -> Self {
        MeanPoolSpec {
            enabled: true,
            d_model: 64,
            window: 20,
            epochs: 30,
            patience: 3,
            batch_size: 256,
            lr: 0.003,
            weight_decay: 0.0,
        }
    }
}

/// A job spec with where it came from (to resolve relative paths and to name
impl ModelsSpec {
    /// Checks the rules serde cannot express, for the enabled models.
    pub(super) fn validate(
        &self,
        input: &InputSpec,
        features: &FeatureSpec,
    ) -> std::result::Result<(), String> {
        let t = &self.transitions;
        if t.enabled && (t.neighbors == 0 || !(t.backoff.is_finite() && t.backoff >= 0.0)) {
            return Err("models.transitions: neighbors must be at least 1 and backoff ≥ 0".into());
        }
        let c = &self.cooccurrence;
        if c.enabled
            && (c.neighbors == 0
                || c.history == 0
                || !(1..=MAX_COOCCURRENCE_WINDOW).contains(&c.window)
                || !(c.decay.is_finite() && c.decay > 0.0 && c.decay <= 1.0))
        {
            return Err(format!(
                "models.cooccurrence: neighbors and history must be at least 1, window between 1 and {MAX_COOCCURRENCE_WINDOW}, decay in (0, 1]"
            ));
        }
        let m = &self.meanpool;
        if m.enabled {
            if m.d_model == 0 || m.window == 0 || m.batch_size == 0 || m.epochs == 0 {
                return Err(
                    "models.meanpool: d_model, window, batch_size and epochs must be at least 1"
                        .into(),
                );
            }
            let valid = m.lr.is_finite() && m.lr > 0.0 && m.weight_decay >= 0.0;
            if !valid {
                return Err("models.meanpool: lr must be > 0 and weight_decay ≥ 0".into());
            }
        }
        let t = &self.teacher;
        if t.enabled {
            check_sasrec(
                "models.teacher",
                [
                    t.d_model,
                    t.layers,
                    t.heads,
                    t.ffn,
                    t.max_len,
                    t.batch_size,
                    t.epochs,
                ],
                (t.lr, t.beta1, t.beta2, t.weight_decay, t.dropout),
            )?;
            if t.softmax == Softmax::Sampled && t.negatives == 0 {
                return Err("models.teacher: sampled softmax needs negatives ≥ 1".into());
            }
            if !t.ids && !t.content && !t.text {
                return Err(
                    "models.teacher: ids, content and text all false train no teacher; set enabled = false instead".into(),
                );
            }
            match t.baseline.as_str() {
                "" => {}
                "transitions" | "cooccurrence" => {
                    let enabled = if t.baseline == "transitions" {
                        self.transitions.enabled
                    } else {
                        self.cooccurrence.enabled
                    };
                    if !enabled {
                        return Err(format!(
                            "models.teacher.baseline = {:?} needs models.{}.enabled = true",
                            t.baseline, t.baseline
                        ));
                    }
                    if !(0.0..=1.0).contains(&t.baseline_alpha) || t.baseline_k == 0 {
                        return Err(
                            "models.teacher: baseline_alpha must be in [0, 1] and baseline_k at least 1"
                                .into(),
                        );
                    }
                    t.baseline_loss
                        .parse::<super::distill::LossFamily>()
                        .map_err(|e| format!("models.teacher.baseline_loss: {e}"))?;
                }
                other => {
                    return Err(format!(
                        "models.teacher.baseline = {other:?}: a teacher learns from transitions or cooccurrence, or \"\" for none"
                    ));
                }
            }
            if t.content && input.item_content.is_empty() && features.item_content_sql.is_empty() {
                return Err(
                    "models.teacher.content = true needs an item content table: set input.item_content or features.item_content_sql".into(),
                );
            }
        }
        Ok(())
    }

    /// Whether any model is enabled.
    pub fn any_enabled(&self) -> bool {
        self.popularity.enabled
            || self.transitions.enabled
            || self.cooccurrence.enabled
            || self.meanpool.enabled
            || self.teacher.enabled
    }
}

/// Which softmax the loss uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Softmax {
    /// Over the whole catalogue.
    Full,
    /// Over sampled negatives (and, with `in_batch`, the batch's other
    /// targets), with the log-Q correction.
    Sampled,
}

/// Which windows of each user's train sequence an epoch trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Windows {
    /// The most recent `max_len` train items of each user.
    Last,
    /// Every `max_len` train items of each user, from the most recent back:
    /// each train item after the first is a target once per epoch.
    All,
}

/// How negatives are drawn for sampled softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// In proportion to train-split popularity (plus one).
    Popularity,
    /// Uniformly.
    Uniform,
}

/// The size and optimizer rules every SASRec section obeys: `sizes` are
/// d_model, layers, heads, ffn, max_len, batch_size, epochs; `optimizer` is
/// lr, beta1, beta2, weight_decay, dropout.
pub(super) fn check_sasrec(
    section: &str,
    sizes: [usize; 7],
    optimizer: (f64, f64, f64, f64, f32),
) -> std::result::Result<(), String> {
    if sizes.contains(&0) {
        return Err(format!(
            "{section}: d_model, layers, heads, ffn, max_len, batch_size and epochs must be at least 1"
        ));
    }
    let (d_model, heads) = (sizes[0], sizes[2]);
    if !d_model.is_multiple_of(heads) {
        return Err(format!(
            "{section}: d_model {d_model} must be a multiple of heads {heads}"
        ));
    }
    let (lr, beta1, beta2, weight_decay, dropout) = optimizer;
    let valid = lr.is_finite()
        && lr > 0.0
        && (0.0..1.0).contains(&beta1)
        && (0.0..1.0).contains(&beta2)
        && weight_decay >= 0.0
        && (0.0..1.0).contains(&dropout);
    if !valid {
        return Err(format!(
            "{section}: lr must be > 0, beta1 and beta2 and dropout in [0, 1), weight_decay ≥ 0"
        ));
    }
    Ok(())
}
