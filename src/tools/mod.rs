//! The tools beside the job: ad hoc read-only SQL over the lake (`query`),
//! public datasets into lake tables (`import`), the synthetic sample
//! (`sample`), scoring and inspecting a saved model (`recommend`), and the
//! benchmarks behind docs/benchmarks.md (`bench`). They may use everything
//! below them, stages included.

pub mod bench;
pub mod import;
pub mod publish;
pub mod query;
pub mod recommend;
pub mod sample;
