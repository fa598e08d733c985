//! The run-folder protocol: where a run writes (`folder`), one writer at a
//! time (`lease`), what makes a run whole (`commit`: stage records, the
//! `_SUCCESS` manifest written last), and cleaning what killed runs left
//! (`gc`). It knows the lake and the job config, nothing of models.

pub mod commit;
pub mod folder;
pub mod gc;
pub mod lease;
pub mod publish;
pub mod shard;

pub use folder::RunFolder;
