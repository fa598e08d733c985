//! recdistill: turns raw recommendation logs in a data lake into a small,
//! fast recommender, with the evidence of how good it is.
//!
//! Data flows one way through the stages, each a module with one entry point:
//!
//! ```text
//! ingest ─► features ─► dataset ─► baselines ─► teacher ─► evaluate ─► commit
//! (check)   (sql/ → features/)     (models/)    (models/)   (recommendations/, evaluation/)  (_SUCCESS)
//! ```
//!
//! [`pipeline`] wires them for `recdistill run` and `recdistill stage`;
//! [`lake`] and [`commit`] are the only code that writes to the lake.

pub mod baselines;
pub mod bench;
pub mod commit;
pub mod dataset;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod features;
pub mod import;
pub mod ingest;
pub mod job;
pub mod lake;
pub mod model;
pub mod pipeline;
pub mod progress;
pub mod query;
pub mod sample;
pub mod schema;
pub mod score;
pub mod teacher;
pub mod train;

pub use error::{Error, Result};
