//! recdistill: turns raw recommendation logs in a data lake into a small,
//! fast recommender, with the evidence of how good it is.
//!
//! Data flows one way through the stages, each a module with one entry point:
//!
//! ```text
//! ingest ─► features ─► dataset ─► baselines ─► teacher ─► soft-labels ─► distill ─► evaluate ─► commit
//! (check)   (sql/ → features/)     (models/)    (models/)  (soft_labels/)  (models/,      (recommendations/,  (_SUCCESS)
//!                                                                          soft_labels/)  evaluation/)
//! ```
//!
//! [`pipeline`] wires them for `recdistill run` and `recdistill stage`;
//! [`lake`] and [`commit`] are the only code that writes to the lake.

pub mod baselines;
pub mod bench;
pub mod commit;
pub mod compress;
pub mod dataset;
pub mod distill;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod features;
pub mod gc;
pub mod import;
pub mod ingest;
pub mod job;
pub mod lake;
pub mod lease;
pub mod loss;
pub mod model;
pub mod pipeline;
pub mod progress;
pub mod query;
pub mod recommend;
pub mod report;
pub mod sample;
pub mod schema;
pub mod score;
pub mod soft_labels;
pub mod teacher;
pub mod train;

pub use error::{Error, Result};
