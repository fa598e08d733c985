//! `[compress]`: which variants of the distilled students to make, and the
//! grammar of a variant name (`int8`, `lowrank-0.5+int8`, ...).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::check_segment;
use crate::error::{Error, Result};

/// `[compress]`: compressed variants of trained SASRec models (the
/// distilled students), each saved as stored (integers, sparse rows or
/// factors) and evaluated and timed like any other model under the name
/// `<model>@<variant>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressSpec {
    /// Make the variants.
    pub enabled: bool,
    /// The models to compress; empty for the student distilled with the
    /// first loss family, from the teacher (or, with `distill.direct = false`,
    /// via the assistants). Nothing is compressed without `[distill]`.
    pub models: Vec<String>,
    /// Variants: `int8`, `int4`, `prune-unstructured-<sparsity>`,
    /// `prune-structured-<fraction>`, `lowrank-<rank>` (or a fraction of
    /// d_model, `lowrank-0.5`, or the spectral energy kept, `lowrank-e0.9`),
    /// `pq-<subspaces>` (the item table product-quantized: each row cut into
    /// that many sub-vectors, each stored as a byte naming one of its
    /// subspace's 256 centroids; `pq-16+int8` quantizes the other matrices
    /// to int8; `pq-16+head-4000+int8` keeps the rows of the 4,000 items
    /// with the most training events whole, in int8), or several joined
    /// with `+` (`lowrank-0.5+int8`).
    pub variants: Vec<String>,
    /// Unstructured pruning: `layer` (each matrix to the sparsity) or
    /// `global` (one magnitude threshold over all matrices).
    pub prune_scope: String,
    /// Values sharing one scale in `int4`.
    pub int4_group: usize,
    /// Recovery fine-tuning of pruned and low-rank variants against the
    /// distillation source's soft labels: most epochs (0 for none).
    pub recovery_epochs: usize,
    /// Stop recovery after this many epochs without a better valid NDCG@10.
    pub recovery_patience: usize,
    /// Recovery learning rate; 0 for the student's.
    pub recovery_lr: f64,
    /// Product quantization weighs each item's row in its k-means (and in
    /// recovery's codebook refits) by `(training events + 1)^pq_weighting`:
    /// frequent items, which are most of the targets and of the rivals
    /// they are ranked against, get the closer codes. 0 weighs all alike.
    pub pq_weighting: f64,
}

impl Default for CompressSpec {
    fn default() -> Self {
        CompressSpec {
            enabled: true,
            models: Vec::new(),
            variants: [
                "int8",
                "int4",
                "prune-unstructured-0.5",
                "prune-structured-0.5",
                "lowrank-0.5",
                "lowrank-0.5+int8",
                "prune-structured-0.5+int8",
            ]
            .map(String::from)
            .to_vec(),
            prune_scope: "layer".into(),
            int4_group: 32,
            recovery_epochs: 10,
            recovery_patience: 3,
            recovery_lr: 0.0,
            pq_weighting: 0.0,
        }
    }
}

impl CompressSpec {
    pub(super) fn validate(&self) -> std::result::Result<(), String> {
        if self.variants.is_empty() {
            return Err("compress.variants must list at least one variant".into());
        }
        let mut seen = Vec::new();
        for v in &self.variants {
            let variant: Variant = v
                .parse()
                .map_err(|e: Error| format!("compress.variants: {e}"))?;
            let name = variant.to_string();
            if seen.contains(&name) {
                return Err(format!("compress.variants lists {name:?} twice"));
            }
            seen.push(name);
        }
        for m in &self.models {
            check_segment("compress.models entry", m).map_err(|e| e.to_string())?;
        }
        if !matches!(self.prune_scope.as_str(), "layer" | "global") {
            return Err(format!(
                "compress.prune_scope {:?}: use layer or global",
                self.prune_scope
            ));
        }
        if self.int4_group == 0 || self.int4_group > 4096 {
            return Err("compress.int4_group must be in 1..=4096".into());
        }
        if !(self.recovery_lr.is_finite() && self.recovery_lr >= 0.0) {
            return Err("compress.recovery_lr must be ≥ 0".into());
        }
        if !(self.pq_weighting.is_finite() && (0.0..=4.0).contains(&self.pq_weighting)) {
            return Err("compress.pq_weighting must be in 0..=4".into());
        }
        Ok(())
    }
}

/// How the low-rank step picks its rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankChoice {
    /// This rank (capped at d_model).
    Fixed(usize),
    /// This fraction of d_model.
    Ratio(f32),
    /// The smallest rank keeping this share of the spectral energy (Σσ²).
    Energy(f32),
}

/// Integer storage of the matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// `int8`, a scale per output row.
    Int8,
    /// `int4`, a scale per group.
    Int4,
}

/// A compression plan: which steps, with what settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Variant {
    /// Fraction of feed-forward units removed.
    pub structured: Option<f32>,
    /// Low-rank item table.
    pub lowrank: Option<RankChoice>,
    /// Product-quantized item table: sub-vectors per row.
    pub pq: Option<usize>,
    /// With `pq`: the rows of this many most frequent items stored whole
    /// (quantized like the other matrices) instead of as codes.
    pub pq_head: Option<usize>,
    /// Fraction of matrix weights zeroed (and not stored).
    pub unstructured: Option<f32>,
    /// Integer storage.
    pub quantization: Option<Quantization>,
}

fn fraction(token: &str, what: &str, text: &str) -> Result<f32> {
    let v: f32 = text
        .parse()
        .map_err(|_| Error::config(format!("{token:?}: {what} {text:?} is not a number")))?;
    if !(v > 0.0 && v < 1.0) {
        return Err(Error::config(format!(
            "{token:?}: {what} must be strictly between 0 and 1"
        )));
    }
    Ok(v)
}

impl FromStr for Variant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Variant> {
        let mut v = Variant::default();
        let twice = |token: &str| Error::config(format!("{s:?}: {token} appears twice"));
        for token in s.split('+') {
            if token == "int8" || token == "int4" {
                if v.quantization.is_some() {
                    return Err(twice("a quantization"));
                }
                v.quantization = Some(if token == "int8" {
                    Quantization::Int8
                } else {
                    Quantization::Int4
                });
            } else if let Some(x) = token.strip_prefix("prune-unstructured-") {
                if v.unstructured
                    .replace(fraction(token, "sparsity", x)?)
                    .is_some()
                {
                    return Err(twice("prune-unstructured"));
                }
            } else if let Some(x) = token.strip_prefix("prune-structured-") {
                if v.structured
                    .replace(fraction(token, "fraction", x)?)
                    .is_some()
                {
                    return Err(twice("prune-structured"));
                }
            } else if let Some(x) = token.strip_prefix("pq-") {
                let m: usize = x.parse().map_err(|_| {
                    Error::config(format!(
                        "{token:?}: sub-vectors {x:?} is not a whole number"
                    ))
                })?;
                if m == 0 {
                    return Err(Error::config(format!(
                        "{token:?}: at least one sub-vector per row"
                    )));
                }
                if v.pq.replace(m).is_some() {
                    return Err(twice("pq"));
                }
            } else if let Some(x) = token.strip_prefix("head-") {
                let h: usize = x.parse().map_err(|_| {
                    Error::config(format!("{token:?}: rows {x:?} is not a whole number"))
                })?;
                if h == 0 {
                    return Err(Error::config(format!(
                        "{token:?}: at least one row (leave head out for none)"
                    )));
                }
                if v.pq_head.replace(h).is_some() {
                    return Err(twice("head"));
                }
            } else if let Some(x) = token.strip_prefix("lowrank-") {
                let choice = if let Some(e) = x.strip_prefix('e') {
                    let e: f32 = e
                        .parse()
                        .map_err(|_| Error::config(format!("{token:?}: energy is not a number")))?;
                    if !(e > 0.0 && e <= 1.0) {
                        return Err(Error::config(format!(
                            "{token:?}: energy must be in (0, 1]"
                        )));
                    }
                    RankChoice::Energy(e)
                } else if x.contains('.') {
                    RankChoice::Ratio(fraction(token, "rank ratio", x)?)
                } else {
                    let r: usize = x.parse().map_err(|_| {
                        Error::config(format!("{token:?}: rank {x:?} is not a whole number"))
                    })?;
                    if r == 0 {
                        return Err(Error::config(format!("{token:?}: rank must be at least 1")));
                    }
                    RankChoice::Fixed(r)
                };
                if v.lowrank.replace(choice).is_some() {
                    return Err(twice("lowrank"));
                }
            } else {
                return Err(Error::config(format!(
                    "{s:?}: unknown step {token:?} (int8, int4, prune-unstructured-<sparsity>, prune-structured-<fraction>, lowrank-<rank|ratio|e<energy>>, pq-<sub-vectors>, head-<rows>)"
                )));
            }
        }
        if v.lowrank.is_some() && v.unstructured.is_some() {
            return Err(Error::config(format!(
                "{s:?}: low-rank factors are stored dense or quantized, not sparse; pick one of lowrank and prune-unstructured"
            )));
        }
        if v.pq.is_some() && (v.lowrank.is_some() || v.unstructured.is_some()) {
            return Err(Error::config(format!(
                "{s:?}: a product-quantized item table is neither low-rank nor sparse; pq combines with int8, int4 and prune-structured"
            )));
        }
        if v.pq_head.is_some() && v.pq.is_none() {
            return Err(Error::config(format!(
                "{s:?}: head-<rows> keeps rows of a product-quantized item table whole; add pq-<sub-vectors>"
            )));
        }
        if v.unstructured.is_some() && v.quantization == Some(Quantization::Int4) {
            return Err(Error::config(format!(
                "{s:?}: sparse values are stored as f32 or int8, not int4"
            )));
        }
        Ok(v)
    }
}

impl Variant {
    /// Whether a step changes the weights so that recovery can help.
    pub fn recovers(&self) -> bool {
        self.structured.is_some()
            || self.lowrank.is_some()
            || self.unstructured.is_some()
            || self.pq.is_some()
    }

    /// The variant's name, with the rank the low-rank step chose.
    pub fn name(&self, rank: Option<usize>) -> String {
        let mut parts = Vec::new();
        if let Some(f) = self.structured {
            parts.push(format!("prune-structured-{f}"));
        }
        if let Some(choice) = self.lowrank {
            parts.push(match (rank, choice) {
                (Some(r), _) => format!("lowrank-{r}"),
                (None, RankChoice::Fixed(r)) => format!("lowrank-{r}"),
                (None, RankChoice::Ratio(x)) => format!("lowrank-{x}"),
                (None, RankChoice::Energy(e)) => format!("lowrank-e{e}"),
            });
        }
        if let Some(m) = self.pq {
            parts.push(format!("pq-{m}"));
        }
        if let Some(h) = self.pq_head {
            parts.push(format!("head-{h}"));
        }
        if let Some(s) = self.unstructured {
            parts.push(format!("prune-unstructured-{s}"));
        }
        match self.quantization {
            Some(Quantization::Int8) => parts.push("int8".into()),
            Some(Quantization::Int4) => parts.push("int4".into()),
            None => {}
        }
        parts.join("+")
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_and_name_themselves() {
        let v: Variant = "prune-structured-0.5+int8".parse().unwrap();
        assert_eq!(v.structured, Some(0.5));
        assert_eq!(v.quantization, Some(Quantization::Int8));
        assert_eq!(v.to_string(), "prune-structured-0.5+int8");
        let v: Variant = "int8+lowrank-0.5".parse().unwrap();
        assert_eq!(v.name(Some(16)), "lowrank-16+int8");
        assert_eq!(
            "lowrank-e0.9".parse::<Variant>().unwrap().lowrank,
            Some(RankChoice::Energy(0.9))
        );
        let v: Variant = "int8+pq-16".parse().unwrap();
        assert_eq!((v.pq, v.quantization), (Some(16), Some(Quantization::Int8)));
        assert_eq!(v.to_string(), "pq-16+int8");
        assert!(v.recovers());
        let v: Variant = "int8+head-4000+pq-16".parse().unwrap();
        assert_eq!((v.pq, v.pq_head), (Some(16), Some(4000)));
        assert_eq!(v.to_string(), "pq-16+head-4000+int8");
        assert_eq!(
            "lowrank-8".parse::<Variant>().unwrap().lowrank,
            Some(RankChoice::Fixed(8))
        );
        for bad in [
            "int16",
            "int8+int4",
            "prune-unstructured-1.5",
            "prune-structured-0",
            "lowrank-0",
            "lowrank-0.5+prune-unstructured-0.5",
            "prune-unstructured-0.5+int4",
            "int8+int8",
            "pq-0",
            "pq-x",
            "pq-8+pq-16",
            "pq-16+lowrank-8",
            "pq-16+prune-unstructured-0.5",
            "head-100",
            "head-100+int8",
            "pq-16+head-0",
            "pq-16+head-x",
            "pq-16+head-5+head-6",
            "",
        ] {
            assert!(bad.parse::<Variant>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pq_weighting_outside_zero_to_four_is_refused() {
        assert!(CompressSpec::default().validate().is_ok());
        for good in [0.0, 1.0, 4.0] {
            let spec = CompressSpec {
                pq_weighting: good,
                ..CompressSpec::default()
            };
            assert!(spec.validate().is_ok(), "{good}");
        }
        for bad in [-0.5, 4.5, f64::NAN, f64::INFINITY] {
            let spec = CompressSpec {
                pq_weighting: bad,
                ..CompressSpec::default()
            };
            let err = spec.validate().unwrap_err();
            assert!(err.contains("compress.pq_weighting"), "{bad}: {err}");
        }
    }
}
