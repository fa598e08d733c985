//! `[distill]`: the source teacher, the chain of assistants and the
//! student, and the soft-label loss families (`kl`, `mse`, `rank`, `+`-joined)
//! a link learns with.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::check_segment;
use super::models::{ModelsSpec, Sampling, Softmax, Windows, check_sasrec};
use crate::error::{Error, Result};

/// `[distill]`: the source teacher's soft labels, the chain of assistants
/// that each learn from the previous link's soft labels and emit their own,
/// and the student — trained from scratch, distilled directly from the
/// teacher and via the assistants, once per loss family (the ablation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillSpec {
    /// Emit soft labels and train the chain.
    pub enabled: bool,
    /// The teacher model the chain starts from (`teacher` or `teacher-content`).
    pub source: String,
    /// Items per soft label (the teacher's top K).
    pub k: usize,
    /// Soft labels for the last `positions` positions of each user; 0 for
    /// every position the producing model's `max_len` window holds.
    pub positions: usize,
    /// Weight of the hard-label loss: `alpha · hard + (1 − alpha) · soft`.
    pub alpha: f32,
    /// Temperature of the KL and MSE losses (and of the soft labels' rest bucket).
    pub temperature: f32,
    /// Ranking distillation: the teacher's r-th item weighs `exp(−r / rank_decay)`.
    pub rank_decay: f32,
    /// Loss families the student is distilled with, one student each:
    /// `kl`, `mse`, `rank` or `+`-joined (`kl+rank`). The first is the
    /// assistants' unless they name their own.
    pub losses: Vec<String>,
    /// Also train the student on hard labels only (`<student>-scratch`).
    pub scratch: bool,
    /// Also distil the student directly from the teacher (`<student>-kd-teacher-<loss>`).
    pub direct: bool,
    /// Train the assistants and students once per seed (names end in
    /// `-s<seed>`); empty for once, with the job's seed. The teacher is
    /// trained once.
    pub seeds: Vec<u64>,
    /// The links' softmax: `full` over the catalogue, or `sampled` over
    /// each position's soft-label items and target plus the step's shared
    /// negatives, the rest of the catalogue estimated with the log-Q
    /// correction (a step's cost does not grow with the catalogue).
    pub softmax: Softmax,
    /// Shared negatives per step with the sampled softmax.
    pub negatives: usize,
    /// How the negatives are drawn: `popularity` or `uniform`.
    pub sampling: Sampling,
    /// Rows of soft labels a link's shuffle buffer holds while they stream
    /// in from the lake, row group by row group (memory stays flat however
    /// large the file).
    pub shuffle_buffer: usize,
    /// The assistants, in chain order (`[[distill.assistants]]`; `[]` for none).
    pub assistants: Vec<LinkSpec>,
    /// The student (`[distill.student]`).
    pub student: LinkSpec,
}

impl Default for DistillSpec {
    fn default() -> Self {
        DistillSpec {
            enabled: true,
            source: "teacher".into(),
            k: 50,
            positions: 0,
            alpha: 0.5,
            temperature: 2.0,
            rank_decay: 5.0,
            losses: vec!["kl".into(), "mse".into(), "rank".into()],
            scratch: true,
            direct: true,
            seeds: Vec::new(),
            softmax: Softmax::Full,
            negatives: 1024,
            sampling: Sampling::Popularity,
            shuffle_buffer: 65_536,
            assistants: vec![LinkSpec {
                name: "assistant".into(),
                d_model: 64,
                layers: 2,
                heads: 2,
                ffn: 64,
                ..LinkSpec::default()
            }],
            student: LinkSpec::default(),
        }
    }
}

/// One link of the chain: a SASRec model, its training, and how it mixes
/// the previous link's soft labels with the hard labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkSpec {
    /// Model name (students get a suffix per training: `-scratch`, `-kd-teacher-kl`, ...).
    pub name: String,
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
    /// Which windows of each user's train sequence an epoch trains on
    /// (`last` or `all`, as for the teacher).
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
    /// Loss family of an assistant; empty for the first of `distill.losses`.
    pub loss: String,
    /// This link's α; unset for `distill.alpha`.
    pub alpha: Option<f32>,
    /// This link's temperature; unset for `distill.temperature`. The
    /// previous link's soft labels are emitted at it.
    pub temperature: Option<f32>,
}

impl Default for LinkSpec {
    fn default() -> Self {
        LinkSpec {
            name: "student".into(),
            d_model: 32,
            layers: 1,
            heads: 1,
            ffn: 32,
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
            loss: String::new(),
            alpha: None,
            temperature: None,
        }
    }
}

impl DistillSpec {
    /// The chain's links in order: the assistants, then the student.
    pub fn links(&self) -> Vec<&LinkSpec> {
        self.assistants
            .iter()
            .chain(std::iter::once(&self.student))
            .collect()
    }

    /// The names of the models the chain trains, in training order: per
    /// seed, the assistants, `<student>-scratch`, then
    /// `<student>-<route>-<loss>` for each route and loss family. Families
    /// that do not parse are skipped ([`DistillSpec::validate`] refuses them).
    pub fn trained_models(&self) -> Vec<String> {
        let families: Vec<String> = self
            .losses
            .iter()
            .filter_map(|f| f.parse::<LossFamily>().ok())
            .map(|f| f.to_string().replace('+', "-"))
            .collect();
        let suffixes: Vec<String> = if self.seeds.is_empty() {
            vec![String::new()]
        } else {
            self.seeds.iter().map(|s| format!("-s{s}")).collect()
        };
        let mut routes = Vec::new();
        if self.direct || self.assistants.is_empty() {
            routes.push("kd-teacher");
        }
        if !self.assistants.is_empty() {
            routes.push("kd-assistant");
        }
        let student = &self.student.name;
        let mut names = Vec::new();
        for suffix in &suffixes {
            names.extend(
                self.assistants
                    .iter()
                    .map(|a| format!("{}{suffix}", a.name)),
            );
            if self.scratch {
                names.push(format!("{student}-scratch{suffix}"));
            }
            for route in &routes {
                for family in &families {
                    names.push(format!("{student}-{route}-{family}{suffix}"));
                }
            }
        }
        names
    }

    /// A link's α.
    pub fn alpha_of(&self, link: &LinkSpec) -> f32 {
        link.alpha.unwrap_or(self.alpha)
    }

    /// A link's temperature.
    pub fn temperature_of(&self, link: &LinkSpec) -> f32 {
        link.temperature.unwrap_or(self.temperature)
    }

    /// Checks the rules serde cannot express.
    pub(super) fn validate(&self, models: &ModelsSpec) -> std::result::Result<(), String> {
        if !models.teacher.enabled {
            return Err(
                "distill.enabled needs [models.teacher] enabled: the chain starts from a teacher"
                    .into(),
            );
        }
        let t = &models.teacher;
        let teachers = t.names();
        if !teachers.contains(&self.source.as_str()) {
            return Err(format!(
                "distill.source {:?} is not a teacher this job trains ({})",
                self.source,
                teachers.join(", ")
            ));
        }
        if self.k == 0 {
            return Err("distill.k must be at least 1".into());
        }
        if self.losses.is_empty() {
            return Err("distill.losses must name at least one loss family".into());
        }
        for family in &self.losses {
            family
                .parse::<LossFamily>()
                .map_err(|e| format!("distill.losses: {e}"))?;
        }
        if !(self.rank_decay.is_finite() && self.rank_decay > 0.0) {
            return Err("distill.rank_decay must be > 0".into());
        }
        if self.shuffle_buffer == 0 {
            return Err("distill.shuffle_buffer must be at least 1 row".into());
        }
        if self.softmax == Softmax::Sampled && self.negatives == 0 {
            return Err("distill: sampled softmax needs negatives ≥ 1".into());
        }
        let mut names: Vec<&str> = teachers.clone();
        for link in self.links() {
            let at = |msg: String| format!("distill link {:?}: {msg}", link.name);
            check_segment("distill link name", &link.name).map_err(|e| at(e.to_string()))?;
            if names.contains(&link.name.as_str()) {
                return Err(at("the name is taken by another model".into()));
            }
            names.push(&link.name);
            if !link.loss.is_empty() {
                link.loss
                    .parse::<LossFamily>()
                    .map_err(|e| at(e.to_string()))?;
            }
            let alpha = self.alpha_of(link);
            if !(0.0..=1.0).contains(&alpha) {
                return Err(at(format!("alpha {alpha} must be in [0, 1]")));
            }
            let t = self.temperature_of(link);
            if !(t.is_finite() && t > 0.0) {
                return Err(at(format!("temperature {t} must be > 0")));
            }
            check_sasrec(
                &format!("distill link {:?}", link.name),
                [
                    link.d_model,
                    link.layers,
                    link.heads,
                    link.ffn,
                    link.max_len,
                    link.batch_size,
                    link.epochs,
                ],
                (
                    link.lr,
                    link.beta1,
                    link.beta2,
                    link.weight_decay,
                    link.dropout,
                ),
            )?;
        }
        Ok(())
    }
}

/// A soft-label loss family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SoftLoss {
    /// `T² · KL(p_teacher ‖ q_student)` over top-K + rest, at temperature T.
    Kl,
    /// Squared error of the top-K probabilities at temperature T, scaled
    /// by `T² · K` (see [`mse`]).
    Mse,
    /// The top-K items as positives weighted by teacher rank.
    Rank,
}

impl SoftLoss {
    /// Name in job files and in the `loss` column.
    pub fn as_str(self) -> &'static str {
        match self {
            SoftLoss::Kl => "kl",
            SoftLoss::Mse => "mse",
            SoftLoss::Rank => "rank",
        }
    }
}

/// One or more soft losses, summed (`kl`, `mse`, `rank`, or `+`-joined such
/// as `kl+rank`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossFamily(pub Vec<SoftLoss>);

impl FromStr for LossFamily {
    type Err = Error;

    fn from_str(s: &str) -> Result<LossFamily> {
        let mut parts = Vec::new();
        for part in s.split('+') {
            let loss = match part.trim() {
                "kl" => SoftLoss::Kl,
                "mse" => SoftLoss::Mse,
                "rank" => SoftLoss::Rank,
                other => {
                    return Err(Error::config(format!(
                        "unknown distillation loss {other:?} in {s:?}: use kl, mse, rank or a +-joined combination such as kl+rank"
                    )));
                }
            };
            if parts.contains(&loss) {
                return Err(Error::config(format!(
                    "distillation loss {s:?} names {} twice",
                    loss.as_str()
                )));
            }
            parts.push(loss);
        }
        Ok(LossFamily(parts))
    }
}

impl fmt::Display for LossFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|l| l.as_str()).collect();
        f.write_str(&names.join("+"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_parse_and_print() {
        let f: LossFamily = "kl+rank".parse().unwrap();
        assert_eq!(f.0, vec![SoftLoss::Kl, SoftLoss::Rank]);
        assert_eq!(f.to_string(), "kl+rank");
        assert!("kl+kl".parse::<LossFamily>().is_err());
        assert!("ce".parse::<LossFamily>().is_err());
    }
}
