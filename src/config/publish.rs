//! `[publish]`: which model a committed run offers to serve, and the gate
//! it must pass to replace the one being served.

use serde::{Deserialize, Serialize};

/// `[publish]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishSpec {
    /// The model to serve, e.g. `student-kd-teacher-rank@int8`; empty: the
    /// job publishes nothing.
    pub model: String,
    /// The model is published when its NDCG@10 is at least this share of
    /// the published run's (and beats popularity's).
    pub min_ratio: f64,
}

impl Default for PublishSpec {
    fn default() -> Self {
        PublishSpec {
            model: String::new(),
            min_ratio: 0.97,
        }
    }
}

impl PublishSpec {
    /// Whether the job publishes a model.
    pub fn enabled(&self) -> bool {
        !self.model.is_empty()
    }

    /// What is wrong with the settings, if anything.
    pub fn check(&self, popularity: bool) -> std::result::Result<(), String> {
        if !(self.min_ratio.is_finite() && self.min_ratio > 0.0) {
            return Err(format!(
                "publish.min_ratio = {}: use a share above 0, e.g. 0.97",
                self.min_ratio
            ));
        }
        if self.enabled() && !popularity {
            return Err(format!(
                "publish.model = {:?} needs models.popularity.enabled = true: the gate compares the model with popularity",
                self.model
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_needs_a_positive_ratio_and_popularity() {
        let mut spec = PublishSpec::default();
        assert!(!spec.enabled());
        assert_eq!(spec.check(false), Ok(()));
        spec.model = "student@int8".into();
        assert!(spec.check(false).unwrap_err().contains("popularity"));
        assert_eq!(spec.check(true), Ok(()));
        spec.min_ratio = 0.0;
        assert!(spec.check(true).unwrap_err().contains("min_ratio"));
        spec.min_ratio = f64::NAN;
        assert!(spec.check(true).is_err());
    }
}
