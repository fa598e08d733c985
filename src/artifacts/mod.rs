//! The files stages write and the stages after them read back: trained
//! models with their training histories, soft labels, recommendation lists,
//! and the Bayes ceiling a synthetic log is written with.
//! What two stages share lives here, below them, so that no stage imports
//! another.

pub mod ceiling;
pub mod evaluation;
pub mod models;
pub mod recommendations;
pub mod soft_labels;
pub mod warm;
