//! `[features]` and `[split]`: the feature SQL and its parameters, and the
//! protocol that splits each user's events into train, valid and test.

use serde::{Deserialize, Serialize};

/// `[features]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureSpec {
    /// Folder of the feature SQL files, relative to the job file; empty for
    /// the copies built into the binary (identical to the repository's `sql/`).
    pub sql_dir: String,
    /// Users with fewer events are dropped before splitting.
    pub min_user_events: u32,
    /// Items with fewer events are dropped before splitting.
    pub min_item_events: u32,
    /// A feature SQL file (in `sql_dir`, or built in) that builds the item
    /// content table from `items`; empty for none.
    pub item_content_sql: String,
}

impl Default for FeatureSpec {
    fn default() -> Self {
        FeatureSpec {
            sql_dir: String::new(),
            min_user_events: 1,
            min_item_events: 1,
            item_content_sql: String::new(),
        }
    }
}

/// The split protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Per user: last event → test, second-to-last → valid, the rest → train.
    #[serde(alias = "leave-one-out", alias = "loo")]
    LeaveOneOut,
    /// Global cut at timestamp quantiles: before → train, then valid, then test.
    Temporal,
}

impl Protocol {
    /// The name used in SQL file names and evaluation rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::LeaveOneOut => "leave_one_out",
            Protocol::Temporal => "temporal",
        }
    }
}

/// `[split]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitSpec {
    /// `leave_one_out` or `temporal`.
    pub protocol: Protocol,
    /// Temporal only: events at or after this quantile of timestamps are `valid`.
    pub valid_quantile: f64,
    /// Temporal only: events at or after this quantile of timestamps are `test`.
    pub test_quantile: f64,
}

impl Default for SplitSpec {
    fn default() -> Self {
        SplitSpec {
            protocol: Protocol::LeaveOneOut,
            valid_quantile: 0.8,
            test_quantile: 0.9,
        }
    }
}
