//! The `recdistill` command line. It only parses arguments, wires the stages
//! and maps errors to exit codes (see the README).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use recdistill::error::{Error, Result, exit_code};
use recdistill::job::{Job, parse_run_date};
use recdistill::lake::Lake;
use recdistill::pipeline::{self, RunContext, Stage, StageOutcome};
use recdistill::query::{self, OutputFormat};
use recdistill::sample::{self, SampleSpec};

#[derive(Debug, Parser)]
#[command(
    name = "recdistill",
    version,
    about = "Recommendation logs in a data lake → a small, fast recommender, with the evidence of how good it is."
)]
struct Cli {
    /// Log format on stderr: `text` for people, `json` for schedulers.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole job and commit it. Without --job: the bundled sample in ./lake.
    Run(JobArgs),
    /// Run one stage (ingest, features, baselines, teacher, evaluate, commit) of a run.
    Stage {
        /// Stage name.
        name: String,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Convert a public dataset into lake tables.
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// Read-only SQL over the lake's tables and the latest committed run.
    Sql(SqlArgs),
    /// Write the deterministic synthetic sample (as shipped in data-samples/sample).
    Sample(SampleArgs),
    /// Top-K recommendations from a saved model (as trained or compressed)
    /// for users of a run, on their whole history.
    Recommend(RecommendArgs),
    /// Print a saved model's card and each tensor's scheme, shape and bytes.
    Inspect {
        /// The model file (model.safetensors).
        artifact: PathBuf,
    },
    /// Remove what killed runs left in run folders: half-written files,
    /// objects a committed run does not list, and (with --uncommitted)
    /// uncommitted run folders. Folders in use by a live run are skipped.
    Gc {
        #[command(flatten)]
        job: JobArgs,
        /// Every job under the lake's output prefix, not only the job file's.
        #[arg(long)]
        all_jobs: bool,
        /// Delete uncommitted run folders (killed or failed runs) whole.
        #[arg(long)]
        uncommitted: bool,
        /// Report what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Benchmarks for docs/benchmarks.md (they print numbers; they never fail on them).
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Debug, Subcommand)]
enum BenchWhat {
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
    },
}

#[derive(Debug, Args)]
struct JobArgs {
    /// Job file (TOML); default: the embedded sample job (jobs/sample.toml).
    #[arg(long)]
    job: Option<PathBuf>,
    /// Lake root URL or path; overrides lake.url.
    #[arg(long)]
    lake: Option<String>,
    /// Run date (YYYY-MM-DD); default: today (UTC).
    #[arg(long)]
    run_date: Option<String>,
    /// Override a job key: --set models.meanpool.epochs=5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Where models train: cpu, cuda or cuda:N; overrides `device`.
    #[arg(long)]
    device: Option<String>,
}

#[derive(Debug, Args)]
struct RecommendArgs {
    /// The model file (model.safetensors) to score with.
    #[arg(long)]
    model: PathBuf,
    /// Users to recommend for: a file with one user id per line.
    #[arg(long, conflicts_with = "all", required_unless_present = "all")]
    users: Option<PathBuf>,
    /// Recommend for every user of the run.
    #[arg(long)]
    all: bool,
    /// Items per user.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Parquet file to write (replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// The run whose users, histories and catalogue to use.
    #[command(flatten)]
    job: JobArgs,
}

#[derive(Debug, Subcommand)]
enum ImportSource {
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

#[derive(Debug, Args)]
struct SqlArgs {
    /// The query; without it, statements ending in ';' are read from stdin.
    query: Option<String>,
    /// Lake root URL or path (default: the job's lake.url).
    #[arg(long)]
    lake: Option<String>,
    /// Job file or job name whose latest committed run to query.
    #[arg(long)]
    job: Option<String>,
    /// Query this run date's run instead of the latest.
    #[arg(long)]
    run_date: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
    /// Write the result here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SampleArgs {
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let json_logs = matches!(cli.log_format, LogFormat::Json);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit_code::INTERNAL as u8);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One report: a JSON line for schedulers, or plain text for people.
            if json_logs {
                tracing::error!(exit_code = e.exit_code(), "{e}");
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn init_logging(cli: &Cli) {
    let level = if cli.quiet {
        "warn"
    } else {
        match cli.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    // Our own logs at `level`; the engines' only when asked for.
    let default = format!("warn,recdistill={level}");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => builder.with_target(false).init(),
        LogFormat::Json => {
            recdistill::progress::disable();
            builder.json().init()
        }
    }
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run(args) => run(args).await,
        Command::Stage { name, job } => stage(&name, job).await,
        Command::Import {
            source:
                ImportSource::Movielens {
                    from,
                    lake,
                    replace,
                },
        } => {
            let lake = open_lake(&lake)?;
            let summary = recdistill::import::import_movielens(&from, &lake, replace).await?;
            println!(
                "imported {} interactions and {} items into {} ({} files)",
                summary.interactions,
                summary.items,
                lake.url(),
                summary.written.len()
            );
            Ok(())
        }
        Command::Sql(args) => sql(args).await,
        Command::Recommend(args) => recommend(args).await,
        Command::Inspect { artifact } => {
            let artifact = recdistill::recommend::read_artifact(&artifact)?;
            print!("{}", recdistill::recommend::inspect(&artifact)?);
            Ok(())
        }
        Command::Bench { what } => bench(what).await,
        Command::Gc {
            job,
            all_jobs,
            uncommitted,
            dry_run,
        } => {
            let spec = load_job(&job)?.spec;
            let options = recdistill::gc::GcOptions {
                job: (!all_jobs).then(|| spec.name.clone()),
                run_date: job.run_date.as_deref().map(parse_run_date).transpose()?,
                remove_uncommitted: uncommitted,
                dry_run,
            };
            let report = recdistill::gc::gc(&spec, &options).await?;
            print!("{report}");
            Ok(())
        }
        Command::Sample(args) => {
            let lake = open_lake(&args.out)?;
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
    }
}

fn open_lake(url: &str) -> Result<Lake> {
    Lake::open(&recdistill::job::LakeSpec {
        url: url.to_string(),
        ..Default::default()
    })
}

/// Loads the job: the file given, or the embedded sample job.
fn load_job(args: &JobArgs) -> Result<Job> {
    let mut overrides = args.overrides.clone();
    if let Some(lake) = &args.lake {
        // --lake is a shorthand for --set lake.url=...; quote it as a TOML string.
        overrides.push(format!("lake.url={}", toml::Value::String(lake.clone())));
    }
    if let Some(device) = &args.device {
        overrides.push(format!("device={}", toml::Value::String(device.clone())));
    }
    match &args.job {
        Some(path) => Job::load(path, &overrides),
        None => Job::embedded_sample(&overrides),
    }
}

fn run_date(arg: &Option<String>) -> Result<chrono::NaiveDate> {
    match arg {
        Some(d) => parse_run_date(d),
        None => Ok(chrono::Utc::now().date_naive()),
    }
}

async fn bench(what: BenchWhat) -> Result<()> {
    let report = match what {
        BenchWhat::Teacher {
            job,
            epochs,
            peer_python,
            peer_script,
            peer_inter,
        } => {
            let peer = match (peer_python, peer_script, peer_inter) {
                (Some(python), Some(script), Some(inter)) => Some(recdistill::bench::Peer {
                    python,
                    script,
                    inter,
                }),
                _ => None,
            };
            recdistill::bench::teacher(&load_job(&job)?, epochs.max(1), peer).await?
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
            recdistill::bench::soft_labels(&load_job(&job)?, users, items, len, &out).await?
        }
        BenchWhat::Compress {
            job,
            items,
            users,
            len,
            variants,
        } => {
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
                recdistill::bench::compressed_scoring(&job, &items, users, len, &variants)
            })
            .await
            .map_err(|e| Error::internal(format!("bench failed: {e}")))??
        }
        BenchWhat::Softmax {
            job,
            items,
            softmax,
            steps,
        } => {
            let softmax = match softmax.as_str() {
                "sampled" => recdistill::train::Softmax::Sampled,
                "full" => recdistill::train::Softmax::Full,
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
                recdistill::bench::softmax_steps(&job, &items, softmax, steps.max(1))
            })
            .await
            .map_err(|e| Error::internal(format!("bench failed: {e}")))??
        }
    };
    print!("{report}");
    Ok(())
}

async fn run(args: JobArgs) -> Result<()> {
    let job = load_job(&args)?;
    let date = run_date(&args.run_date)?;
    if args.job.is_none() {
        seed_sample_lake(&job).await?;
    }
    let rc = RunContext::new(job, date)?;
    let summary = pipeline::run_all(&rc).await?;
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| Error::io("stdout", e);
    writeln!(
        out,
        "run {} of job {} committed to {}",
        summary.manifest.run_id, summary.manifest.job, summary.folder
    )
    .map_err(io)?;
    writeln!(
        out,
        "{} events from {} files; {} output files",
        summary.ingested.rows,
        summary.ingested.files,
        summary.manifest.outputs.len()
    )
    .map_err(io)?;
    writeln!(
        out,
        "{:<48} {:<10} {:>8} {:>8} {:>8} {:>9} {:>10} {:>9} {:>9} {:>8}",
        "model",
        "role",
        "ndcg@10",
        "hr@10",
        "mrr@10",
        "params",
        "bytes",
        "p50_ms",
        "users/s",
        "frontier"
    )
    .map_err(io)?;
    for r in &summary.evaluation.results {
        let at = |v: &[f64]| {
            r.metrics
                .ks
                .iter()
                .position(|&k| k == 10)
                .map(|i| format!("{:.4}", v[i]))
                .unwrap_or_else(|| "-".into())
        };
        let speed = |f: fn(&recdistill::score::Speed) -> f64, digits: usize| {
            r.speed
                .as_ref()
                .map_or("-".to_string(), |s| format!("{:.*}", digits, f(s)))
        };
        writeln!(
            out,
            "{:<48} {:<10} {:>8} {:>8} {:>8} {:>9} {:>10} {:>9} {:>9} {:>8}",
            r.name,
            r.role,
            at(&r.metrics.ndcg),
            at(&r.metrics.hr),
            at(&r.metrics.mrr),
            r.params,
            r.size_bytes,
            speed(|s| s.latency_ms_p50, 3),
            speed(|s| s.users_per_s, 0),
            if r.pareto { "*" } else { "" }
        )
        .map_err(io)?;
    }
    Ok(())
}

/// The embedded job runs on a local `lake/` folder; fill it with the bundled
/// sample the first time.
async fn seed_sample_lake(job: &Job) -> Result<()> {
    let lake = Lake::open(&job.spec.lake)?;
    if lake.list(&job.spec.input.interactions).await?.is_empty() {
        tracing::info!(lake = %lake.url(), "seeding the lake with the bundled sample");
        sample::write_sample(&lake, &SampleSpec::default()).await?;
    }
    Ok(())
}

async fn stage(name: &str, args: JobArgs) -> Result<()> {
    let stage: Stage = name.parse()?;
    let job = load_job(&args)?;
    let date = run_date(&args.run_date)?;
    let mut rc = RunContext::new(job, date)?;
    match pipeline::run_stage(&mut rc, stage).await? {
        StageOutcome::Validated(ingested) => println!(
            "input valid: {} events in {} files; fingerprint {}",
            ingested.rows, ingested.files, ingested.fingerprint.sha256
        ),
        StageOutcome::Wrote(written) => {
            for object in written {
                println!("{}\t{} bytes", rc.run.url_of(&object.path), object.size);
            }
        }
        StageOutcome::Committed(manifest) => println!(
            "run {} committed to {} ({} files)",
            manifest.run_id,
            rc.run.display(),
            manifest.outputs.len()
        ),
    }
    Ok(())
}

async fn recommend(args: RecommendArgs) -> Result<()> {
    if args.k == 0 {
        return Err(Error::config("--k must be at least 1"));
    }
    let artifact = recdistill::recommend::read_artifact(&args.model)?;
    let job = load_job(&args.job)?;
    let date = run_date(&args.job.run_date)?;
    let rc = RunContext::new(job, date)?;
    recdistill::features::register_features(&rc.ctx, &rc.run, &rc.job).await?;
    let dataset = recdistill::dataset::load_dataset(&rc.ctx).await?;
    let users = recdistill::recommend::select_users(&dataset, args.users.as_deref())?;
    let batch = rc.job.spec.evaluation.batch_users;
    let (k, out) = (args.k, args.out.clone());
    let rows = tokio::task::spawn_blocking(move || {
        recdistill::recommend::recommend(&artifact, &dataset, &users, k, batch, &out)
    })
    .await
    .map_err(|e| Error::internal(format!("recommend failed: {e}")))??;
    println!("{rows} recommendations written to {}", args.out.display());
    Ok(())
}

async fn sql(args: SqlArgs) -> Result<()> {
    // --job may name a job file (its lake and name are used) or just a job name.
    let (mut spec, job_name) = match &args.job {
        Some(j) if std::path::Path::new(j).is_file() => {
            let job = Job::load(std::path::Path::new(j), &[])?;
            let name = job.spec.name.clone();
            (job.spec, Some(name))
        }
        Some(name) => (recdistill::job::JobSpec::default(), Some(name.clone())),
        None => (recdistill::job::JobSpec::default(), None),
    };
    if let Some(lake) = &args.lake {
        spec.lake.url = lake.clone();
    }
    let run_date = args.run_date.as_deref().map(parse_run_date).transpose()?;
    let (ctx, catalog) = query::open(&spec, job_name.as_deref(), run_date).await?;
    match &catalog.run {
        Some(run) => tracing::info!(run = %run, tables = ?catalog.tables, "querying"),
        None if !catalog.jobs.is_empty() => tracing::warn!(
            jobs = ?catalog.jobs,
            "several jobs in the lake; pass --job NAME to query one's latest run"
        ),
        None => {
            tracing::info!(tables = ?catalog.tables, "no committed run found; querying the input tables")
        }
    }
    match &args.query {
        Some(sql) => {
            let batches = query::execute(&ctx, sql).await?;
            match &args.out {
                Some(path) => {
                    let mut file = std::fs::File::create(path).map_err(|e| {
                        Error::config(format!("cannot create {}: {e}", path.display()))
                    })?;
                    query::print(&batches, args.format, &mut file)
                }
                None => query::print(
                    &batches,
                    args.format,
                    &mut std::io::BufWriter::new(std::io::stdout()),
                ),
            }
        }
        None => query::interactive(&ctx, args.format).await,
    }
}
