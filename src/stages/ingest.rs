//! The ingest stage: finds the input files, checks each against its contract
//! (`schemas/interactions.json`, `schemas/items.json`) and the rows against
//! the job's rules, fingerprints them, and registers the tables with
//! DataFusion. It writes nothing: a bad input stops the job before any
//! output exists.

use std::sync::Arc;

use arrow::array::{Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::TableProvider;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
use datafusion::logical_expr::{Operator, binary_expr};
use datafusion::prelude::{SessionContext, col, lit};
use datafusion::scalar::ScalarValue;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectMeta, ObjectStoreExt};

use crate::config::{Job, parse_instant_micros};
use crate::error::{Error, Result};
use crate::lake::Lake;
use crate::lake::engine::{SqlParams, collect_sql};
use crate::lake::schema::{Contract, contract, type_name};
use crate::run::commit::{Fingerprint, InputBounds, InputFile};

/// Rows shown in an error about bad rows.
const SAMPLE_ROWS: usize = 5;

/// What ingest found.
#[derive(Debug, Clone)]
pub struct Ingested {
    /// Every input file read.
    pub fingerprint: Fingerprint,
    /// Interaction rows (from the Parquet footers).
    pub rows: u64,
    /// Interaction files.
    pub files: usize,
    /// Type of `user_id` in the input.
    pub user_id_type: DataType,
    /// Type of `item_id` in the input.
    pub item_id_type: DataType,
    /// Whether an `items` table was found and registered.
    pub has_items: bool,
}

/// One validated input table.
struct InputTable {
    /// Lake-relative folder, without trailing `/`.
    folder: String,
    /// Files with their store metadata, in path order.
    files: Vec<ObjectMeta>,
    /// Schema merged over all files (first file's order, later additions appended).
    schema: SchemaRef,
    /// Hive partition column (`dt`) if files sit in `dt=...` folders.
    partitioned: bool,
    rows: u64,
}

/// Validates the job's inputs and registers `interactions` (and `items`).
/// Of a `dt=`-partitioned interactions table only the partitions within
/// `bounds` are listed, checked and registered: a run never sees a day
/// after its own.
pub async fn ingest(
    job: &Job,
    lake: &Lake,
    ctx: &SessionContext,
    bounds: &InputBounds,
) -> Result<Ingested> {
    let interactions_contract = contract("interactions")?;
    let folder = job
        .spec
        .input
        .interactions
        .trim_end_matches('/')
        .to_string();
    let interactions = scan_table(lake, &folder, &interactions_contract, true, Some(bounds))
        .await?
        .expect("required tables are always returned");
    if interactions.rows == 0 {
        return Err(Error::data(
            lake.url_of(&format!("{folder}/")),
            format!(
                "the interactions table has {} file(s) but no rows",
                interactions.files.len()
            ),
        ));
    }
    register(lake, ctx, "interactions", &interactions, Some(bounds))?;
    check_rows(job, lake, ctx, &interactions).await?;

    let user_id_type = interactions
        .schema
        .field_with_name("user_id")
        .map(|f| f.data_type().clone());
    let item_id_type = interactions
        .schema
        .field_with_name("item_id")
        .map(|f| f.data_type().clone());
    let (user_id_type, item_id_type) = match (user_id_type, item_id_type) {
        (Ok(u), Ok(i)) => (u, i),
        _ => {
            return Err(Error::internal(
                "validated interactions lost their id columns",
            ));
        }
    };

    let mut inputs = vec![&interactions];
    let items = if job.spec.input.items.is_empty() {
        None
    } else {
        let folder = job.spec.input.items.trim_end_matches('/').to_string();
        scan_table(lake, &folder, &contract("items")?, false, None).await?
    };
    if let Some(items) = &items {
        check_id_type(lake, items, &item_id_type)?;
        register(lake, ctx, "items", items, None)?;
        inputs.push(items);
    }

    let content = if job.spec.input.item_content.is_empty() {
        None
    } else {
        let folder = job
            .spec
            .input
            .item_content
            .trim_end_matches('/')
            .to_string();
        scan_table(lake, &folder, &contract("item_content")?, true, None).await?
    };
    if let Some(content) = &content {
        check_id_type(lake, content, &item_id_type)?;
        register(lake, ctx, "item_content", content, None)?;
        inputs.push(content);
    }

    let root = lake.path("");
    let files: Vec<InputFile> = futures::stream::iter(inputs.iter().flat_map(|t| t.files.iter()))
        .map(|meta| {
            let path = Lake::relative_to(&root, &meta.location);
            async move {
                // Some stores list without entity tags; ask for the object's own.
                let etag = match &meta.e_tag {
                    Some(etag) => Some(etag.clone()),
                    None => lake.head(&path).await?.and_then(|m| m.e_tag),
                };
                Ok::<_, Error>(InputFile {
                    path,
                    size: meta.size,
                    etag,
                    last_modified: meta.last_modified.to_rfc3339(),
                })
            }
        })
        .buffered(FETCH_CONCURRENCY)
        .try_collect()
        .await?;
    let mut fingerprint = Fingerprint::of(files);
    if interactions.partitioned {
        fingerprint.bounds = bounds.clone();
    }
    Ok(Ingested {
        fingerprint,
        rows: interactions.rows,
        files: interactions.files.len(),
        user_id_type,
        item_id_type,
        has_items: items.is_some(),
    })
}

/// Checks that `table`'s `item_id` has the type of `interactions.item_id`.
fn check_id_type(lake: &Lake, table: &InputTable, item_id_type: &DataType) -> Result<()> {
    let their = table
        .schema
        .field_with_name("item_id")
        .map(|f| f.data_type().clone())
        .ok();
    if their.as_ref().map(type_name) != Some(type_name(item_id_type)) {
        return Err(Error::data(
            lake.url_of(&format!("{}/", table.folder)),
            format!(
                "column `item_id` has type {}, but interactions.item_id is {}; they must match",
                their.as_ref().map(type_name).unwrap_or_default(),
                type_name(item_id_type)
            ),
        ));
    }
    Ok(())
}

/// Lists and checks one table's files. Returns `None` for a missing optional
/// table. With `bounds`, files in `dt=` partitions outside them are skipped
/// before they are checked or read.
async fn scan_table(
    lake: &Lake,
    folder: &str,
    contract: &Contract,
    required: bool,
    bounds: Option<&InputBounds>,
) -> Result<Option<InputTable>> {
    let folder_url = lake.url_of(&format!("{folder}/"));
    let base = lake.path(folder);
    let listed = lake.list(folder).await?;
    let mut files = Vec::new();
    let mut depth: Option<usize> = None;
    // Partitions skipped by `bounds`: (first, last, how many files).
    let mut outside: Option<(String, String, usize)> = None;
    for meta in listed {
        let rel = Lake::relative_to(&base, &meta.location);
        let parts: Vec<&str> = rel.split('/').collect();
        // Hadoop/Spark convention: `_SUCCESS`, `.crc`, `_temporary/` are not data.
        if parts
            .iter()
            .any(|p| p.starts_with('_') || p.starts_with('.'))
        {
            continue;
        }
        let partition = (parts.len() == 2)
            .then(|| partition_day(parts[0]))
            .flatten();
        if let (Some(bounds), Some(dt)) = (bounds, partition)
            && !bounds.contains(dt)
        {
            let (first, last, count) =
                outside.get_or_insert_with(|| (dt.to_string(), dt.to_string(), 0));
            if dt < first.as_str() {
                *first = dt.to_string();
            }
            if dt > last.as_str() {
                *last = dt.to_string();
            }
            *count += 1;
            continue;
        }
        let url = lake.display(&meta.location);
        if !rel.ends_with(".parquet") {
            return Err(Error::data(
                url,
                format!(
                    "not a Parquet file name: every file in {folder_url} must end in .parquet (or start with '_' or '.' to be ignored)"
                ),
            ));
        }
        let dirs = &parts[..parts.len() - 1];
        for dir in dirs {
            if partition_day(dir).is_none() {
                return Err(Error::data(
                    url,
                    format!("folder {dir:?} is not a partition of the form dt=YYYY-MM-DD"),
                ));
            }
        }
        match depth {
            None => depth = Some(dirs.len()),
            Some(d) if d != dirs.len() => {
                return Err(Error::data(
                    url,
                    format!(
                        "mixed layout in {folder_url}: some files sit in dt=YYYY-MM-DD folders, some do not"
                    ),
                ));
            }
            Some(_) => {}
        }
        if dirs.len() > 1 {
            return Err(Error::data(
                url,
                "nested partition folders; only dt=YYYY-MM-DD is supported",
            ));
        }
        files.push(meta);
    }
    if files.is_empty() {
        if let (Some(bounds), Some((first, last, count))) = (bounds, &outside) {
            return Err(Error::data(
                folder_url,
                format!(
                    "no input files within {} (input.window_days and the run date): the {} table's {count} file(s) lie in partitions from dt={first} to dt={last}",
                    bounds.describe(),
                    contract.table
                ),
            ));
        }
        if !required {
            return Ok(None);
        }
        return Err(Error::data(
            folder_url,
            format!(
                "no input files: the {} table is empty or missing",
                contract.table
            ),
        ));
    }
    if let (Some(bounds), Some((first, last, count))) = (bounds, &outside) {
        tracing::info!(
            table = %contract.table,
            bounds = %bounds.describe(),
            skipped_files = count,
            skipped_from = %first,
            skipped_to = %last,
            "partitions outside the run's bounds are not read"
        );
    }

    let mut merged: Vec<Field> = Vec::new();
    let mut first_seen: Vec<String> = Vec::new();
    let mut rows = 0u64;
    let mut first_columns: Option<(String, Vec<String>)> = None;
    // Footers are fetched several at a time (each is a round trip to the
    // store) and checked in path order, so the first bad file is reported.
    let footers: Vec<(Schema, u64)> = futures::stream::iter(files.iter())
        .map(|meta| read_footer(lake, meta))
        .buffered(FETCH_CONCURRENCY)
        .try_collect()
        .await?;
    for (meta, (schema, file_rows)) in files.iter().zip(footers) {
        let url = lake.display(&meta.location);
        contract.check_input(&url, &schema)?;
        rows += file_rows;
        // Columns beyond the contract are the same in every file: one added
        // to or renamed in some partitions only is drift, not data. (The
        // contract's optional columns may be missing from some files.)
        let mut columns: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|name| !contract.columns.iter().any(|c| &c.name == name))
            .collect();
        columns.sort();
        match &first_columns {
            None => first_columns = Some((url.clone(), columns)),
            Some((first_url, first)) if *first != columns => {
                let extra = columns.iter().find(|c| !first.contains(c));
                let missing = first.iter().find(|c| !columns.contains(c));
                let what = match (extra, missing) {
                    (Some(column), _) => {
                        format!("column `{column}` is in {url} but not in {first_url}")
                    }
                    (None, Some(column)) => {
                        format!("column `{column}` is in {first_url} but not in {url}")
                    }
                    (None, None) => {
                        format!("the columns of {url} repeat differently from {first_url}'s")
                    }
                };
                return Err(Error::data(
                    &url,
                    format!(
                        "schema drift: {what}; every file of the {} table must have the same columns",
                        contract.table
                    ),
                ));
            }
            Some(_) => {}
        }
        for field in schema.fields() {
            match merged.iter().position(|f| f.name() == field.name()) {
                None => {
                    merged.push(field.as_ref().clone().with_nullable(true));
                    first_seen.push(url.clone());
                }
                Some(i) if type_name(merged[i].data_type()) != type_name(field.data_type()) => {
                    return Err(Error::data(
                        url,
                        format!(
                            "schema drift: column `{}` is {} here but {} in {}",
                            field.name(),
                            type_name(field.data_type()),
                            type_name(merged[i].data_type()),
                            first_seen[i]
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(Some(InputTable {
        folder: folder.to_string(),
        files,
        schema: Arc::new(Schema::new(merged)),
        partitioned: depth == Some(1),
        rows,
    }))
}

/// Requests to the store in flight at once while reading footers and tags.
const FETCH_CONCURRENCY: usize = 16;

/// The day of a `dt=YYYY-MM-DD` partition folder; `None` for any other name.
fn partition_day(folder: &str) -> Option<&str> {
    folder
        .strip_prefix("dt=")
        .filter(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").is_ok())
}

/// Reads one file's footer: its Arrow schema and row count. A file it
/// refuses is a data error naming the file.
pub async fn read_footer(lake: &Lake, meta: &ObjectMeta) -> Result<(Schema, u64)> {
    let url = lake.display(&meta.location);
    if meta.size == 0 {
        return Err(Error::data(url, "zero-byte file, not a Parquet file"));
    }
    let unreadable = |e: &dyn std::fmt::Display| {
        Error::data(
            &url,
            format!("not a readable Parquet file (truncated or corrupt?): {e}"),
        )
    };
    let store = lake.store();
    // Check the footer's own claims before a decoder trusts them: a length
    // beyond the file is a forgery or a truncation, not a reason to allocate.
    if meta.size < 12 {
        return Err(unreadable(&format!(
            "{} bytes is too short for Parquet",
            meta.size
        )));
    }
    let tail = store
        .get_range(&meta.location, meta.size - 8..meta.size)
        .await
        .map_err(|e| Error::from_store(&url, e))?;
    if tail.len() != 8 || &tail[4..8] != b"PAR1" {
        let what = if tail.len() == 8 && &tail[4..8] == b"PARE" {
            "encrypted Parquet is not supported".to_string()
        } else {
            "no PAR1 magic at the end".to_string()
        };
        return Err(unreadable(&what));
    }
    let footer_len = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) as u64;
    if footer_len + 12 > meta.size {
        return Err(unreadable(&format!(
            "the footer claims {footer_len} bytes of metadata, but the file has {} bytes",
            meta.size
        )));
    }
    let metadata = DFParquetMetadata::new(store.as_ref(), meta)
        .fetch_metadata()
        .await
        .map_err(|e| {
            let message = e.to_string();
            match Error::from_datafusion(&url, e) {
                // Storage trouble stays retryable; anything else is the file.
                err @ Error::Io { .. } => err,
                _ => unreadable(&message),
            }
        })?;
    let file = metadata.file_metadata();
    let schema =
        parquet::arrow::parquet_to_arrow_schema(file.schema_descr(), file.key_value_metadata())
            .map_err(|e| unreadable(&e))?;
    Ok((schema, file.num_rows().max(0) as u64))
}

/// Registers a validated table with DataFusion. A partitioned table with
/// `bounds` is a view filtered on `dt`, which DataFusion prunes at listing
/// time: files outside the bounds are never opened.
fn register(
    lake: &Lake,
    ctx: &SessionContext,
    name: &str,
    table: &InputTable,
    bounds: Option<&InputBounds>,
) -> Result<()> {
    let url = lake.url_of(&format!("{}/", table.folder));
    let table_url = ListingTableUrl::parse(&url).map_err(|e| Error::from_datafusion(&url, e))?;
    let mut options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    if table.partitioned {
        options = options.with_table_partition_cols(vec![("dt".to_string(), DataType::Utf8)]);
    }
    let config = ListingTableConfig::new(table_url)
        .with_listing_options(options)
        .with_schema(Arc::clone(&table.schema));
    let listing = ListingTable::try_new(config).map_err(|e| Error::from_datafusion(&url, e))?;
    let mut provider: Arc<dyn TableProvider> = Arc::new(listing);
    if let Some(bounds) = bounds.filter(|b| table.partitioned && **b != InputBounds::everything()) {
        let mut frame = ctx
            .read_table(provider)
            .map_err(|e| Error::from_datafusion(name, e))?;
        for (bound, op) in [(&bounds.from, Operator::GtEq), (&bounds.to, Operator::LtEq)] {
            if !bound.is_empty() {
                frame = frame
                    .filter(binary_expr(col("dt"), op, lit(bound.as_str())))
                    .map_err(|e| Error::from_datafusion(name, e))?;
            }
        }
        provider = frame.into_view();
    }
    ctx.deregister_table(name)
        .map_err(|e| Error::from_datafusion(name, e))?;
    ctx.register_table(name, provider)
        .map_err(|e| Error::from_datafusion(name, e))?;
    Ok(())
}

/// A row rule: an SQL condition that is true for offending rows.
struct RowRule {
    description: String,
    condition: String,
}

/// The job's row rules for `interactions`.
fn row_rules(job: &Job, table: &InputTable) -> Result<(Vec<RowRule>, SqlParams)> {
    let unit = match table
        .schema
        .field_with_name("timestamp")
        .map(|f| f.data_type().clone())
    {
        Ok(DataType::Timestamp(unit, _)) => unit,
        _ => {
            return Err(Error::internal(
                "validated interactions have no timestamp column",
            ));
        }
    };
    let per_micro = |micros: i64| -> i64 {
        match unit {
            TimeUnit::Second => micros.div_euclid(1_000_000),
            TimeUnit::Millisecond => micros.div_euclid(1_000),
            TimeUnit::Microsecond => micros,
            TimeUnit::Nanosecond => micros.saturating_mul(1_000),
        }
    };
    let input = &job.spec.input;
    let min = per_micro(parse_instant_micros(
        "input.min_timestamp",
        &input.min_timestamp,
    )?);
    let max = per_micro(parse_instant_micros(
        "input.max_timestamp",
        &input.max_timestamp,
    )?);
    let rules = vec![
        RowRule {
            description: "`user_id` must not be null".into(),
            condition: "user_id IS NULL".into(),
        },
        RowRule {
            description: "`item_id` must not be null".into(),
            condition: "item_id IS NULL".into(),
        },
        RowRule {
            description: "`timestamp` must not be null".into(),
            condition: "\"timestamp\" IS NULL".into(),
        },
        RowRule {
            description: format!(
                "`timestamp` must lie in [{}, {}) (input.min_timestamp, input.max_timestamp)",
                input.min_timestamp, input.max_timestamp
            ),
            condition: "(arrow_cast(\"timestamp\", 'Int64') < $min_ts OR arrow_cast(\"timestamp\", 'Int64') >= $max_ts)".into(),
        },
    ];
    let params = vec![
        ("min_ts".to_string(), ScalarValue::Int64(Some(min))),
        ("max_ts".to_string(), ScalarValue::Int64(Some(max))),
    ];
    Ok((rules, params))
}

/// Checks every row rule in one pass; where one fails, finds the first file
/// breaking it and shows up to [`SAMPLE_ROWS`] of its offending rows.
async fn check_rows(
    job: &Job,
    lake: &Lake,
    ctx: &SessionContext,
    table: &InputTable,
) -> Result<()> {
    let (rules, params) = row_rules(job, table)?;
    let counts: Vec<String> = rules
        .iter()
        .enumerate()
        .map(|(i, r)| format!("COUNT(*) FILTER (WHERE {}) AS rule_{i}", r.condition))
        .collect();
    let sql = format!("SELECT {} FROM interactions", counts.join(", "));
    let batches = match collect_sql(ctx, &sql, &params, "checking interactions").await {
        Ok(batches) => batches,
        // The footers were fine but some data page is not: name the file.
        Err(err @ Error::Data { .. }) => {
            let per_file = format!("SELECT {} FROM _ingest_check", counts.join(", "));
            return Err(unreadable_file(lake, ctx, table, &per_file, &params)
                .await?
                .unwrap_or(err));
        }
        Err(err) => return Err(err),
    };
    let mut violations = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let count = single_i64(&batches, i);
        if count > 0 {
            violations.push((rule, count));
        }
    }
    if violations.is_empty() {
        return Ok(());
    }
    let mut message = String::new();
    let mut first_file = None;
    for (rule, count) in &violations {
        message.push_str(&format!(
            "\nrule {}: broken by {count} row(s)",
            rule.description
        ));
        if let Some((file, sample)) = first_offender(lake, ctx, table, rule, &params).await? {
            message.push_str(&format!(" - first in {file}:\n{sample}"));
            first_file.get_or_insert(file);
        }
    }
    Err(Error::data(
        first_file.unwrap_or_else(|| lake.url_of(&format!("{}/", table.folder))),
        format!("interactions break {} rule(s):{message}", violations.len()),
    ))
}

/// Runs `sql` over the one file at `url`, registered as `_ingest_check`.
async fn query_file(
    ctx: &SessionContext,
    url: &str,
    sql: &str,
    params: &[(String, ScalarValue)],
) -> Result<Vec<RecordBatch>> {
    ctx.deregister_table("_ingest_check")
        .map_err(|e| Error::from_datafusion(url, e))?;
    ctx.register_parquet("_ingest_check", url, Default::default())
        .await
        .map_err(|e| Error::from_datafusion(url, e))?;
    let outcome = collect_sql(ctx, sql, params, url).await;
    ctx.deregister_table("_ingest_check")
        .map_err(|e| Error::from_datafusion(url, e))?;
    outcome
}

/// The first file of `table` whose pages cannot be read by `sql` (over
/// `_ingest_check`), as a data error naming it.
async fn unreadable_file(
    lake: &Lake,
    ctx: &SessionContext,
    table: &InputTable,
    sql: &str,
    params: &[(String, ScalarValue)],
) -> Result<Option<Error>> {
    for meta in &table.files {
        let url = lake.display(&meta.location);
        match query_file(ctx, &url, sql, params).await {
            Ok(_) => {}
            Err(Error::Data { message, .. }) => {
                return Ok(Some(Error::data(
                    url,
                    format!("not a readable Parquet file (corrupt data pages?): {message}"),
                )));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The first file with rows breaking `rule`, and those rows rendered.
async fn first_offender(
    lake: &Lake,
    ctx: &SessionContext,
    table: &InputTable,
    rule: &RowRule,
    params: &[(String, ScalarValue)],
) -> Result<Option<(String, String)>> {
    for meta in &table.files {
        let url = lake.display(&meta.location);
        let sql = format!(
            "SELECT user_id, item_id, \"timestamp\" FROM _ingest_check WHERE {} LIMIT {SAMPLE_ROWS}",
            rule.condition
        );
        let rows = query_file(ctx, &url, &sql, params).await?;
        if rows.iter().map(RecordBatch::num_rows).sum::<usize>() > 0 {
            let rendered = arrow::util::pretty::pretty_format_batches(&rows)
                .map(|t| t.to_string())
                .unwrap_or_else(|e| format!("(cannot render rows: {e})"));
            return Ok(Some((url, rendered)));
        }
    }
    Ok(None)
}

fn single_i64(batches: &[RecordBatch], column: usize) -> i64 {
    batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .and_then(|b| {
            b.column(column)
                .as_any()
                .downcast_ref::<Int64Array>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0)
}
