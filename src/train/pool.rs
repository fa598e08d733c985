//! The thread pool training and scoring run in.

use crate::error::{Error, Result};

/// The thread pool training runs in: `threads` threads, 0 for one per core.
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::internal(format!("cannot start {threads} training threads: {e}")))
}
