//! `recdistill sql`: read-only ad hoc SQL over the lake's input tables and the
//! latest committed run of a job.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Float64Builder, ListBuilder, RecordBatch,
    StringArray, StringBuilder, StructBuilder, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use clap::ValueEnum;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::SessionContext;

use crate::artifacts::ceiling::CEILING_TABLE;
use crate::artifacts::evaluation::EVALUATION_FILE;
use crate::config::{JobSpec, check_segment};
use crate::error::{Error, Result};
use crate::lake::{Lake, engine};
use crate::run::RunFolder;
use crate::run::commit::{self, Manifest};
use crate::run::publish;
use crate::stages::evaluate::results::evaluation_schema;
use crate::stages::ingest;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header line.
    Csv,
    /// One JSON object per row (newline-delimited JSON).
    Json,
    /// A Parquet file (to `--out`, or stdout).
    Parquet,
}

/// What the session can query.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Registered table names.
    pub tables: Vec<String>,
    /// The run whose tables are registered, if any.
    pub run: Option<String>,
    /// Jobs found in the lake when none was chosen.
    pub jobs: Vec<String>,
}

/// Opens a session over the lake: `interactions`, `items` and, for `job`
/// (or the only job in the lake), the tables of its latest committed run
/// (or of `run_date`'s run).
pub async fn open(
    spec: &JobSpec,
    job: Option<&str>,
    run_date: Option<chrono::NaiveDate>,
) -> Result<(SessionContext, Catalog)> {
    let lake = Lake::open(&spec.lake)?;
    let ctx = engine::session(&spec.input, &spec.lake).await?;
    lake.register(&ctx);
    let mut catalog = Catalog::default();
    for (name, folder) in [
        ("interactions", &spec.input.interactions),
        ("items", &spec.input.items),
        (CEILING_TABLE, &spec.input.ceiling),
    ] {
        if folder.is_empty() {
            continue;
        }
        // A damaged input file (or one still being written) leaves that
        // table out, with a warning naming it; the run tables still answer.
        match engine::register_folder(&lake, &ctx, name, folder.trim_end_matches('/')).await {
            Ok(true) => catalog.tables.push(name.to_string()),
            Ok(false) => {}
            Err(Error::Data { message, .. }) => {
                let file = first_unreadable(&lake, folder.trim_end_matches('/')).await;
                tracing::warn!(
                    table = name,
                    file = file.as_deref().unwrap_or("?"),
                    "input table left out: a file cannot be read ({message})"
                );
            }
            Err(err) => return Err(err),
        }
    }

    let prefix = spec.lake.output_prefix.trim_matches('/');
    let job = match job {
        Some(name) => Some(name.to_string()),
        None => {
            let jobs = lake.list_folders(prefix).await?;
            if jobs.len() == 1 {
                jobs.into_iter().next()
            } else {
                catalog.jobs = jobs;
                None
            }
        }
    };
    if let Some(job) = job {
        check_segment("job name", &job)?;
        let found = match run_date {
            Some(date) => {
                let run = RunFolder::new(lake.clone(), prefix, &job, date);
                commit::read_manifest(&run).await?.map(|m| (run, m))
            }
            None => commit::latest_committed(&lake, prefix, &job).await?,
        };
        if let Some((run, manifest)) = found {
            commit::verify_sizes(&run, &manifest).await?;
            register_run(&ctx, &run, &manifest, &mut catalog.tables).await?;
            catalog.run = Some(run.display());
        }
        let history = commit::committed_runs(&lake, prefix, &job).await?;
        let published = match publish::published_run_date(&lake, prefix, &job).await {
            Ok(date) => date,
            Err(err @ Error::Data { .. }) => {
                tracing::warn!(%err, "the publication log is unreadable: runs.published is false for every run");
                None
            }
            Err(err) => return Err(err),
        };
        register_history(&ctx, &history, published.as_deref(), &mut catalog.tables).await?;
    }
    Ok((ctx, catalog))
}

/// Registers `runs` (one row per committed run) and `evaluation_history`
/// (every committed run's evaluation rows; `run_date` is a column), when
/// there are committed runs.
async fn register_history(
    ctx: &SessionContext,
    history: &[(RunFolder, Manifest)],
    published: Option<&str>,
    tables: &mut Vec<String>,
) -> Result<()> {
    if history.is_empty() {
        return Ok(());
    }
    let batch = runs_batch(history, published)?;
    let table = MemTable::try_new(batch.schema(), vec![vec![batch]])
        .map_err(|e| Error::from_datafusion("runs", e))?;
    ctx.register_table("runs", Arc::new(table))
        .map_err(|e| Error::from_datafusion("runs", e))?;
    tables.push("runs".to_string());

    let urls = history
        .iter()
        .filter(|(_, m)| m.listed(EVALUATION_FILE).is_some())
        .map(|(run, _)| {
            let url = run.url_of(EVALUATION_FILE);
            ListingTableUrl::parse(&url).map_err(|e| Error::from_datafusion(&url, e))
        })
        .collect::<Result<Vec<_>>>()?;
    if urls.is_empty() {
        return Ok(());
    }
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    // The schema this version writes: a run committed before a column was
    // added reads it as null, whichever run comes first.
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(evaluation_schema());
    let listing = ListingTable::try_new(config)
        .map_err(|e| Error::from_datafusion("evaluation_history", e))?;
    ctx.register_table("evaluation_history", Arc::new(listing))
        .map_err(|e| Error::from_datafusion("evaluation_history", e))?;
    tables.push("evaluation_history".to_string());
    Ok(())
}

/// One row per committed run: what ran, on what input, how long each
/// stage took, and whether it is the run whose model is published.
fn runs_batch(history: &[(RunFolder, Manifest)], published: Option<&str>) -> Result<RecordBatch> {
    let stage_fields = Fields::from(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("seconds", DataType::Float64, false),
    ]);
    let mut stages =
        ListBuilder::new(StructBuilder::from_fields(stage_fields.clone(), 0)).with_field(
            Field::new_list_field(DataType::Struct(stage_fields.clone()), false),
        );
    let mut total = Vec::new();
    for (_, m) in history {
        let entry = stages.values();
        for stage in &m.stages {
            entry
                .field_builder::<StringBuilder>(0)
                .ok_or_else(|| Error::internal("runs: stage name builder"))?
                .append_value(&stage.name);
            entry
                .field_builder::<Float64Builder>(1)
                .ok_or_else(|| Error::internal("runs: stage seconds builder"))?
                .append_value(stage.seconds);
            entry.append(true);
        }
        stages.append(true);
        total.push(m.stages.iter().map(|s| s.seconds).sum::<f64>());
    }
    let text = |f: &dyn Fn(&Manifest) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            history.iter().map(|(_, m)| f(m)),
        ))
    };
    let bound = |f: &dyn Fn(&Manifest) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter(history.iter().map(|(_, m)| {
            let b = f(m);
            (!b.is_empty()).then_some(b)
        })))
    };
    let days_since_epoch = |run: &RunFolder| {
        let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
        (run.run_date() - epoch).num_days() as i32
    };
    let columns: Vec<(&str, ArrayRef, bool)> = vec![
        ("run_id", text(&|m| m.run_id.clone()), false),
        (
            "run_date",
            Arc::new(Date32Array::from_iter_values(
                history.iter().map(|(run, _)| days_since_epoch(run)),
            )),
            false,
        ),
        ("job", text(&|m| m.job.clone()), false),
        ("config_hash", text(&|m| m.config_hash.clone()), false),
        (
            "seed",
            Arc::new(UInt64Array::from_iter_values(
                history.iter().map(|(_, m)| m.seed),
            )),
            false,
        ),
        (
            "input_from",
            bound(&|m| &m.input_fingerprint.bounds.from),
            true,
        ),
        ("input_to", bound(&|m| &m.input_fingerprint.bounds.to), true),
        (
            "input_sha256",
            text(&|m| m.input_fingerprint.sha256.clone()),
            false,
        ),
        (
            "input_files",
            Arc::new(UInt64Array::from_iter_values(
                history
                    .iter()
                    .map(|(_, m)| m.input_fingerprint.files.len() as u64),
            )),
            false,
        ),
        ("seconds", Arc::new(Float64Array::from(total)), false),
        ("stages", Arc::new(stages.finish()), false),
        ("version", text(&|m| m.tool.version.clone()), false),
        ("committed_at", text(&|m| m.committed_at.clone()), false),
        (
            "published",
            Arc::new(BooleanArray::from_iter(
                history
                    .iter()
                    .map(|(_, m)| Some(published == Some(m.run_date.as_str()))),
            )),
            false,
        ),
    ];
    let schema = Schema::new(
        columns
            .iter()
            .map(|(name, array, nullable)| Field::new(*name, array.data_type().clone(), *nullable))
            .collect::<Vec<_>>(),
    );
    RecordBatch::try_new(
        Arc::new(schema),
        columns.into_iter().map(|(_, array, _)| array).collect(),
    )
    .map_err(|e| Error::internal(format!("runs table: {e}")))
}

/// The first Parquet file under `folder` whose footer cannot be read, for
/// a message that names it.
async fn first_unreadable(lake: &Lake, folder: &str) -> Option<String> {
    for meta in lake.list(folder).await.ok()? {
        if meta.location.as_ref().ends_with(".parquet")
            && ingest::read_footer(lake, &meta).await.is_err()
        {
            return Some(lake.display(&meta.location));
        }
    }
    None
}

/// Registers the files a manifest lists: `features/<t>.parquet` as table
/// `t`, and every other folder's files as one table named after the folder.
async fn register_run(
    ctx: &SessionContext,
    run: &RunFolder,
    manifest: &Manifest,
    tables: &mut Vec<String>,
) -> Result<()> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for object in &manifest.outputs {
        let Some((folder, file)) = object.path.split_once('/') else {
            continue;
        };
        if !file.ends_with(".parquet") {
            continue;
        }
        let table = if folder == "features" {
            file.trim_end_matches(".parquet").to_string()
        } else {
            folder.to_string()
        };
        match groups.iter_mut().find(|(t, _)| *t == table) {
            Some((_, files)) => files.push(object.path.clone()),
            None => groups.push((table, vec![object.path.clone()])),
        }
    }
    let state = ctx.state();
    for (table, files) in groups {
        let urls = files
            .iter()
            .map(|f| {
                ListingTableUrl::parse(run.url_of(f)).map_err(|e| Error::from_datafusion(f, e))
            })
            .collect::<Result<Vec<_>>>()?;
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .infer_schema(&state)
            .await
            .map_err(|e| Error::from_datafusion(&table, e))?;
        let listing =
            ListingTable::try_new(config).map_err(|e| Error::from_datafusion(&table, e))?;
        ctx.register_table(table.as_str(), Arc::new(listing))
            .map_err(|e| Error::from_datafusion(&table, e))?;
        tables.push(table);
    }
    Ok(())
}

/// Runs one read-only statement.
pub async fn execute(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    engine::check_read_only(sql)?;
    let df = ctx
        .sql_with_options(sql, engine::read_only_options())
        .await
        .map_err(|e| Error::from_datafusion("query", e))?;
    df.collect()
        .await
        .map_err(|e| Error::from_datafusion("query", e))
}

/// Writes `batches` to `out` in `format`.
pub fn print(
    batches: &[RecordBatch],
    format: OutputFormat,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let io = |e: std::io::Error| Error::io("output", e);
    match format {
        OutputFormat::Table => {
            let table = arrow::util::pretty::pretty_format_batches(batches)
                .map_err(|e| Error::internal(e.to_string()))?;
            writeln!(out, "{table}").map_err(io)?;
        }
        OutputFormat::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut *out);
            for batch in batches {
                writer
                    .write(batch)
                    .map_err(|e| Error::internal(e.to_string()))?;
            }
        }
        OutputFormat::Json => {
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut *out);
            for batch in batches {
                writer
                    .write(batch)
                    .map_err(|e| Error::internal(e.to_string()))?;
            }
            writer
                .finish()
                .map_err(|e| Error::internal(e.to_string()))?;
        }
        OutputFormat::Parquet => {
            let Some(first) = batches.first() else {
                return Err(Error::config(
                    "the query returned no batches; nothing to write as Parquet",
                ));
            };
            let props = crate::lake::writer_properties(vec![]);
            let mut writer =
                parquet::arrow::ArrowWriter::try_new(&mut *out, first.schema(), Some(props))
                    .map_err(|e| Error::internal(e.to_string()))?;
            for batch in batches {
                writer
                    .write(batch)
                    .map_err(|e| Error::internal(e.to_string()))?;
            }
            writer.close().map_err(|e| Error::internal(e.to_string()))?;
        }
    }
    out.flush().map_err(io)
}

/// Reads `;`-terminated statements from stdin and runs each, printing errors
/// and carrying on. Ends at end of input or `\q`.
pub async fn interactive(ctx: &SessionContext, format: OutputFormat) -> Result<()> {
    let stdin = std::io::stdin();
    let prompt = stdin.is_terminal();
    let mut pending = String::new();
    let mut lines = stdin.lock().lines();
    loop {
        if prompt {
            eprint!(
                "{}",
                if pending.is_empty() {
                    "recdistill> "
                } else {
                    "        ...> "
                }
            );
        }
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| Error::io("stdin", e))?;
        let trimmed = line.trim();
        if pending.is_empty() && matches!(trimmed, "\\q" | "quit" | "exit") {
            break;
        }
        pending.push_str(&line);
        pending.push('\n');
        if !trimmed.ends_with(';') {
            continue;
        }
        let statement = std::mem::take(&mut pending);
        let statement = statement.trim().trim_end_matches(';');
        if statement.trim().is_empty() {
            continue;
        }
        match execute(ctx, statement).await {
            Ok(batches) => print(
                &batches,
                format,
                &mut std::io::BufWriter::new(std::io::stdout()),
            )?,
            Err(e) => eprintln!("error: {e}"),
        }
    }
    let rest = pending.trim();
    if !rest.is_empty() {
        let batches = execute(ctx, rest).await?;
        print(
            &batches,
            format,
            &mut std::io::BufWriter::new(std::io::stdout()),
        )?;
    }
    Ok(())
}
