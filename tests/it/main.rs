//! Integration tests: the built `recdistill` binary against small lakes in
//! temporary folders. One test binary, a module per area.

mod bad_input;
mod ballista;
mod baselines;
mod common;
mod compress;
mod crash;
mod daily;
mod distill;
mod import;
mod interop;
mod pipeline;
mod s3;
mod s3server;
mod shards;
mod sql;
mod teacher;
mod text;
