//! `recdistill import` and `recdistill sample`: data into a lake.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::job::open_lake;
use crate::error::{Error, Result};
use crate::tools::import::import_movielens;
use crate::tools::sample::{self, LogSpec, SampleSpec};

/// Public datasets `recdistill import` converts.
#[derive(Debug, Subcommand)]
pub enum ImportSource {
    /// MovieLens as RecBole atomic files (ml-100k.inter, ml-100k.item).
    Movielens {
        /// Folder holding the .inter and .item files.
        #[arg(long)]
        from: PathBuf,
        /// Lake root URL or path.
        #[arg(long)]
        lake: String,
        /// Replace existing interactions/ and items/ tables.
        #[arg(long)]
        replace: bool,
    },
}

/// `recdistill sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Lake root (path or URL) to write interactions/ and items/ into.
    #[arg(long)]
    out: String,
    /// Users.
    #[arg(long, default_value_t = SampleSpec::default().users)]
    users: usize,
    /// Items.
    #[arg(long, default_value_t = SampleSpec::default().items)]
    items: usize,
    /// Seed.
    #[arg(long, default_value_t = SampleSpec::default().seed)]
    seed: u64,
    /// Writes a log of any size instead of the bundled sample: this many
    /// events per user on average (taste clusters, item-to-item successions,
    /// Zipf popularity), as `dt=` partitions.
    #[arg(long)]
    mean_events: Option<f64>,
    /// Days the log spans (with --mean-events).
    #[arg(long, default_value_t = 30, requires = "mean_events")]
    days: usize,
    /// Parquet files per day (with --mean-events).
    #[arg(long, default_value_t = 4, requires = "mean_events")]
    files_per_day: usize,
}

/// Converts a public dataset into the lake's `interactions/` and `items/`.
pub async fn import(source: ImportSource) -> Result<()> {
    let ImportSource::Movielens {
        from,
        lake,
        replace,
    } = source;
    let lake = open_lake(&lake)?;
    let summary = import_movielens(&from, &lake, replace).await?;
    println!(
        "imported {} interactions and {} items into {} ({} files)",
        summary.interactions,
        summary.items,
        lake.url(),
        summary.written.len()
    );
    Ok(())
}

/// Writes the deterministic synthetic sample.
pub async fn sample(args: SampleArgs) -> Result<()> {
    let lake = open_lake(&args.out)?;
    if let Some(mean_events) = args.mean_events {
        let spec = LogSpec {
            users: args.users,
            items: args.items,
            mean_events,
            days: args.days,
            files_per_day: args.files_per_day,
            seed: args.seed,
        };
        spec.validate()?;
        let summary = sample::write_log(&lake, &spec).await?;
        println!(
            "wrote a log of {} events, {} users and {} items ({} files) to {}",
            summary.events,
            spec.users,
            spec.items,
            summary.written.len(),
            lake.url()
        );
        if let Some((_, [hr, ndcg, _])) = summary.ceiling.iter().find(|(k, _)| *k == 10) {
            println!(
                "Bayes ceiling of its test targets ({}): HR@10 {hr:.4}, NDCG@10 {ndcg:.4}",
                sample::CEILING_FILE
            );
        }
        return Ok(());
    }
    let spec = SampleSpec {
        users: args.users,
        items: args.items,
        seed: args.seed,
    };
    if spec.users == 0 || spec.items < 4 {
        return Err(Error::config(
            "--users must be at least 1 and --items at least 4",
        ));
    }
    let written = sample::write_sample(&lake, &spec).await?;
    println!(
        "wrote the sample ({} files) to {}",
        written.len(),
        lake.url()
    );
    Ok(())
}
