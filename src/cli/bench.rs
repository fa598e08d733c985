//! `recdistill bench …`: the benchmarks behind docs/benchmarks.md.

use std::path::PathBuf;

use clap::Subcommand;

use super::job::{JobArgs, load_job};
use crate::config::Softmax;
use crate::error::{Error, Result};
use crate::tools;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Median teacher epoch time on the job's data, next to the PyTorch peer's.
    Teacher {
        #[command(flatten)]
        job: JobArgs,
        /// Epochs to time.
        #[arg(long, default_value_t = 10)]
        epochs: usize,
        /// Python with torch, to run the peer with the same config.
        #[arg(long, requires_all = ["peer_script", "peer_inter"])]
        peer_python: Option<PathBuf>,
        /// The peer's script (sasrec_torch.py).
        #[arg(long)]
        peer_script: Option<PathBuf>,
        /// The same data as a RecBole .inter file, for the peer.
        #[arg(long)]
        peer_inter: Option<PathBuf>,
    },
    /// Soft-label generation for synthetic users: scoring alone, then
    /// scoring while streaming to Parquet, with peak memory.
    SoftLabels {
        #[command(flatten)]
        job: JobArgs,
        /// Synthetic users.
        #[arg(long, default_value_t = 200_000)]
        users: usize,
        /// Catalogue size.
        #[arg(long, default_value_t = 1682)]
        items: usize,
        /// Train items per user (each labelled up to the teacher's max_len).
        #[arg(long, default_value_t = 20)]
        len: usize,
        /// Lake folder the file is written to.
        #[arg(long)]
        out: String,
    },
    /// Scoring speed of the job's student and its compressed variants
    /// (random weights) at several catalogue sizes.
    Compress {
        #[command(flatten)]
        job: JobArgs,
        /// Catalogue sizes.
        #[arg(long, value_delimiter = ',', default_value = "1682,200000")]
        items: Vec<usize>,
        /// Synthetic users.
        #[arg(long, default_value_t = 2000)]
        users: usize,
        /// Items per user.
        #[arg(long, default_value_t = 20)]
        len: usize,
        /// Variants (default: the job's compress.variants).
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
        /// The integer kernel to run (`avx512-vnni`, `avx-vnni`, `avx2`,
        /// `portable`; default: the fastest this CPU has).
        #[arg(long)]
        int8_kernel: Option<String>,
    },
    /// Training step time at several catalogue sizes, same batch.
    Softmax {
        #[command(flatten)]
        job: JobArgs,
        /// Catalogue sizes.
        #[arg(long, value_delimiter = ',', default_value = "2000,200000")]
        items: Vec<usize>,
        /// `sampled` or `full`.
        #[arg(long, default_value = "sampled")]
        softmax: String,
        /// Steps timed per size.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Time the job's student link distilled from synthetic soft labels
        /// (with `distill.negatives` for `sampled`) instead of the teacher.
        #[arg(long)]
        link: bool,
    },
}

/// Runs one benchmark and prints its report.
pub async fn bench(what: BenchWhat) -> Result<()> {
    let report = match what {
        BenchWhat::Teacher {
            job,
            epochs,
            peer_python,
            peer_script,
            peer_inter,
        } => {
            let peer = match (peer_python, peer_script, peer_inter) {
                (Some(python), Some(script), Some(inter)) => Some(tools::bench::Peer {
                    python,
                    script,
                    inter,
                }),
                _ => None,
            };
            tools::bench::teacher(&load_job(&job)?, epochs.max(1), peer).await?
        }
        BenchWhat::SoftLabels {
            job,
            users,
            items,
            len,
            out,
        } => {
            if users == 0 || items < 2 || len == 0 {
                return Err(Error::config(
                    "--users and --len must be at least 1, --items at least 2",
                ));
            }
            tools::bench::soft_labels(&load_job(&job)?, users, items, len, &out).await?
        }
        BenchWhat::Compress {
            job,
            items,
            users,
            len,
            variants,
            int8_kernel,
        } => {
            if let Some(name) = int8_kernel {
                use crate::model::stored::simd::{Int8Kernel, choose_int8_kernel};
                let kernel: Int8Kernel = name
                    .parse()
                    .map_err(|e| Error::config(format!("--int8-kernel: {e}")))?;
                choose_int8_kernel(kernel)
                    .map_err(|e| Error::config(format!("--int8-kernel: {e}")))?;
            }
            if users == 0 || len == 0 || items.iter().any(|&n| n < 2) {
                return Err(Error::config(
                    "--users and --len must be at least 1, every --items size at least 2",
                ));
            }
            let job = load_job(&job)?;
            let variants = if variants.is_empty() {
                job.spec.compress.variants.clone()
            } else {
                variants
            };
            tokio::task::spawn_blocking(move || {
                tools::bench::compressed_scoring(&job, &items, users, len, &variants)
            })
            .await
            .map_err(|e| Error::internal(format!("bench failed: {e}")))??
        }
        BenchWhat::Softmax {
            job,
            items,
            softmax,
            steps,
            link,
        } => {
            let softmax = match softmax.as_str() {
                "sampled" => Softmax::Sampled,
                "full" => Softmax::Full,
                other => {
                    return Err(Error::config(format!(
                        "--softmax {other:?}: use sampled or full"
                    )));
                }
            };
            if items.iter().any(|&n| n < 2) {
                return Err(Error::config("--items: every size must be at least 2"));
            }
            let job = load_job(&job)?;
            tokio::task::spawn_blocking(move || {
                tools::bench::softmax_steps(&job, &items, softmax, steps.max(1), link)
            })
            .await
            .map_err(|e| Error::internal(format!("bench failed: {e}")))??
        }
    };
    print!("{report}");
    Ok(())
}
