//! Integration tests: the built `recdistill` binary against small lakes in
//! temporary folders. One test binary, a module per area.

mod bad_input;
mod common;
mod compress;
mod distill;
mod import;
mod interop;
mod pipeline;
mod sql;
mod teacher;
