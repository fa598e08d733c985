//! `[warm_start]`: each learned model begins from the model of the same
//! name in an earlier committed run of the job.

use serde::{Deserialize, Serialize};

/// `[warm_start]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmStartSpec {
    /// Whether learned models (meanpool, teachers, assistants, students)
    /// start from an earlier run's.
    pub enabled: bool,
    /// `"previous"`: the latest committed run of the job before this run's
    /// date; or that run's date, `YYYY-MM-DD`.
    pub from: String,
    /// Epoch cap of a warm-started model; 0 keeps the model's own `epochs`.
    pub epochs: usize,
    /// Early-stopping patience of a warm-started model; 0 keeps its own.
    pub patience: usize,
}

/// `warm_start.from` for the latest committed run before this one.
pub const PREVIOUS: &str = "previous";

impl Default for WarmStartSpec {
    fn default() -> Self {
        WarmStartSpec {
            enabled: false,
            from: PREVIOUS.into(),
            epochs: 0,
            patience: 0,
        }
    }
}

impl WarmStartSpec {
    /// The run date `from` names, or `None` for the previous run; `Err`
    /// says what is wrong with it.
    pub fn from_date(&self) -> std::result::Result<Option<chrono::NaiveDate>, String> {
        if self.from == PREVIOUS {
            return Ok(None);
        }
        chrono::NaiveDate::parse_from_str(&self.from, "%Y-%m-%d")
            .map(Some)
            .map_err(|_| {
                format!(
                    "warm_start.from = {:?}: use \"previous\" or a run date YYYY-MM-DD",
                    self.from
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_is_previous_or_a_run_date() {
        let mut spec = WarmStartSpec::default();
        assert_eq!(spec.from_date(), Ok(None));
        spec.from = "2025-03-01".into();
        assert_eq!(
            spec.from_date(),
            Ok(chrono::NaiveDate::from_ymd_opt(2025, 3, 1))
        );
        spec.from = "yesterday".into();
        assert!(spec.from_date().unwrap_err().contains("\"yesterday\""));
    }
}
