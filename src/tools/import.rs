//! `recdistill import movielens`: RecBole atomic files (`*.inter`, `*.item`;
//! tab-separated, typed headers such as `user_id:token`) → the lake's
//! `interactions/dt=YYYY-MM-DD/` (Hive partitions by event day, UTC) and
//! `items/` tables. DataFusion reads and converts; the lake writes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::prelude::{CsvReadOptions, SessionContext};
use futures::{StreamExt, TryStreamExt};

use crate::error::{Error, Result};
use crate::lake::engine::collect_sql;
use crate::lake::{Lake, WrittenObject};

/// Written by an import.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    /// Interaction rows.
    pub interactions: u64,
    /// Item rows.
    pub items: u64,
    /// Files written.
    pub written: Vec<WrittenObject>,
}

/// RecBole files quote nothing; a byte that never occurs in text keeps the
/// CSV reader from treating `"` in titles as quoting.
const NO_QUOTE: u8 = 0x1f;

/// Imports the RecBole files in `from` into `lake`. Refuses to touch existing
/// tables unless `replace` is set; then the old files are removed after the
/// new ones are written.
pub async fn import_movielens(from: &Path, lake: &Lake, replace: bool) -> Result<ImportSummary> {
    let inter = find_one(from, "inter")?;
    let item = find_one(from, "item")?;
    if !replace {
        for table in ["interactions", "items"] {
            let existing = lake.list(table).await?;
            if !existing.is_empty() {
                return Err(Error::config(format!(
                    "{} already holds {} file(s); pass --replace to overwrite it",
                    lake.url_of(&format!("{table}/")),
                    existing.len()
                )));
            }
        }
    }
    let ctx = SessionContext::new();
    lake.register(&ctx);

    let inter_columns = register_atomic(&ctx, "ml_inter", &inter).await?;
    require(&inter, &inter_columns, &["user_id", "item_id", "timestamp"])?;
    let what = inter.display().to_string();
    let user_type = id_type(&ctx, "ml_inter", "user_id", &what).await?;
    let item_type = id_type(&ctx, "ml_inter", "item_id", &what).await?;
    check_inter(&ctx, &what).await?;
    let rating = if inter_columns.iter().any(|c| c == "rating") {
        "TRY_CAST(rating AS FLOAT)"
    } else {
        "CAST(NULL AS FLOAT)"
    };
    let sql = format!(
        "SELECT {user} AS user_id, {item} AS item_id,
                to_timestamp_micros(CAST(round(CAST(\"timestamp\" AS DOUBLE) * 1000000) AS BIGINT)) AS \"timestamp\",
                {rating} AS rating,
                to_char(to_timestamp_seconds(CAST(floor(CAST(\"timestamp\" AS DOUBLE)) AS BIGINT)), '%Y-%m-%d') AS dt
         FROM ml_inter
         ORDER BY dt, user_id, \"timestamp\", item_id",
        user = id_expr("user_id", &user_type),
        item = id_expr("item_id", &item_type),
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("user_id", user_type.clone(), false),
        Field::new("item_id", item_type.clone(), false),
        Field::new(
            "timestamp",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("rating", DataType::Float32, true),
        Field::new("dt", DataType::Utf8, false),
    ]));
    let df = ctx
        .sql(&sql)
        .await
        .map_err(|e| Error::from_datafusion(&what, e))?;
    let stream = df
        .execute_stream()
        .await
        .map_err(|e| Error::from_datafusion(&what, e))?
        .map_err(|e| Error::from_datafusion(&what, e))
        .map(|batch| batch.and_then(|b| conform(&b, &schema, &what)));
    let mut written = lake
        .write_hive_partitions("interactions", "dt", stream)
        .await?;
    let interactions: u64 = count_rows(&ctx, "ml_inter", &what).await?;

    let item_columns = register_atomic(&ctx, "ml_item", &item).await?;
    require(&item, &item_columns, &["item_id"])?;
    let what = item.display().to_string();
    let pick = |names: &[&'static str]| -> Option<&'static str> {
        names
            .iter()
            .find(|n| item_columns.iter().any(|c| c == *n))
            .copied()
    };
    let title = pick(&["movie_title", "title", "name"]).unwrap_or("CAST(NULL AS VARCHAR)");
    let year = pick(&["release_year", "year"])
        .map(|c| format!("TRY_CAST({c} AS INT)"))
        .unwrap_or_else(|| "CAST(NULL AS INT)".into());
    let genres = pick(&["class", "genre", "genres"])
        .map(|c| format!("string_to_array({c}, ' ')"))
        .unwrap_or_else(|| "CAST(NULL AS VARCHAR[])".into());
    let item_type_items = id_type(&ctx, "ml_item", "item_id", &what).await?;
    if item_type_items != item_type {
        return Err(Error::data(
            &what,
            format!("item_id is {item_type_items} here but {item_type} in the .inter file"),
        ));
    }
    let sql = format!(
        "SELECT {id} AS item_id, {title} AS title, {year} AS release_year, {genres} AS genres
         FROM ml_item ORDER BY item_id",
        id = id_expr("item_id", &item_type)
    );
    let item_schema = Arc::new(Schema::new(vec![
        Field::new("item_id", item_type.clone(), false),
        Field::new("title", DataType::Utf8, true),
        Field::new("release_year", DataType::Int32, true),
        Field::new(
            "genres",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
    ]));
    let batches = collect_sql(&ctx, &sql, &[], &what).await?;
    let batches = batches
        .iter()
        .map(|b| conform(b, &item_schema, &what))
        .collect::<Result<Vec<_>>>()?;
    let items = batches.iter().map(|b| b.num_rows() as u64).sum();
    written.push(
        lake.write_batches("items/part-00000.parquet", item_schema, batches, vec![])
            .await?,
    );

    lake.delete_others("interactions", &written).await?;
    lake.delete_others("items", &written).await?;
    Ok(ImportSummary {
        interactions,
        items,
        written,
    })
}

/// The one file in `dir` ending in `.ext`.
fn find_one(dir: &Path, ext: &str) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::config(format!("cannot read --from folder {}: {e}", dir.display())))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::config(format!(
            "no .{ext} file in {} (expected RecBole atomic files such as ml-100k.{ext})",
            dir.display()
        ))),
        _ => Err(Error::config(format!(
            "several .{ext} files in {}: {found:?}",
            dir.display()
        ))),
    }
}

/// Reads the typed header (`name:type` fields) of an atomic file and
/// registers the file as a table of text columns with those names.
async fn register_atomic(ctx: &SessionContext, table: &str, path: &Path) -> Result<Vec<String>> {
    let location = path.display().to_string();
    let file = std::fs::File::open(path)
        .map_err(|e| Error::config(format!("cannot read {location}: {e}")))?;
    let mut header = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(file), &mut header)
        .map_err(|e| Error::data(&location, format!("cannot read the header line: {e}")))?;
    let header = header.trim_end_matches(['\n', '\r']);
    let mut names = Vec::new();
    for field in header.split('\t') {
        let (name, kind) = field.split_once(':').ok_or_else(|| {
            Error::data(
                &location,
                format!(
                    "header field {field:?} is not of the form name:type (RecBole atomic file)"
                ),
            )
        })?;
        let valid_kind = matches!(kind, "token" | "token_seq" | "float" | "float_seq");
        if name.is_empty() || !valid_kind {
            return Err(Error::data(
                &location,
                format!(
                    "header field {field:?}: expected name:token, name:token_seq, name:float or name:float_seq"
                ),
            ));
        }
        names.push(name.to_string());
    }
    let schema = Schema::new(
        names
            .iter()
            .map(|n| Field::new(n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    );
    let extension = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let options = CsvReadOptions::new()
        .has_header(true)
        .delimiter(b'\t')
        .quote(NO_QUOTE)
        .schema(&schema)
        .file_extension(&extension);
    ctx.register_csv(table, &location, options)
        .await
        .map_err(|e| Error::from_datafusion(&location, e))?;
    Ok(names)
}

fn require(path: &Path, columns: &[String], required: &[&str]) -> Result<()> {
    for name in required {
        if !columns.iter().any(|c| c == name) {
            return Err(Error::data(
                path.display(),
                format!("missing column `{name}` in the header (found {columns:?})"),
            ));
        }
    }
    Ok(())
}

/// Refuses rows with an empty id or a timestamp that is not a number, before
/// anything is written.
async fn check_inter(ctx: &SessionContext, what: &str) -> Result<()> {
    let condition =
        "user_id IS NULL OR item_id IS NULL OR TRY_CAST(\"timestamp\" AS DOUBLE) IS NULL";
    let sql =
        format!("SELECT user_id, item_id, \"timestamp\" FROM ml_inter WHERE {condition} LIMIT 5");
    let bad = collect_sql(ctx, &sql, &[], what).await?;
    if bad.iter().all(|b| b.num_rows() == 0) {
        return Ok(());
    }
    let rows = arrow::util::pretty::pretty_format_batches(&bad)
        .map(|t| t.to_string())
        .unwrap_or_default();
    Err(Error::data(
        what,
        format!("rows with an empty user_id/item_id or a non-numeric timestamp (first 5):\n{rows}"),
    ))
}

/// Ids are imported as integers when every one of them is an integer,
/// otherwise as text.
async fn id_type(ctx: &SessionContext, table: &str, column: &str, what: &str) -> Result<DataType> {
    let sql =
        format!("SELECT COUNT(*) FILTER (WHERE TRY_CAST({column} AS BIGINT) IS NULL) FROM {table}");
    let batches = collect_sql(ctx, &sql, &[], what).await?;
    let non_integers = batches
        .first()
        .and_then(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0);
    Ok(if non_integers == 0 {
        DataType::Int64
    } else {
        DataType::Utf8
    })
}

fn id_expr(column: &str, data_type: &DataType) -> String {
    match data_type {
        DataType::Int64 => format!("CAST({column} AS BIGINT)"),
        _ => column.to_string(),
    }
}

async fn count_rows(ctx: &SessionContext, table: &str, what: &str) -> Result<u64> {
    let batches = collect_sql(ctx, &format!("SELECT COUNT(*) FROM {table}"), &[], what).await?;
    Ok(batches
        .first()
        .and_then(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0) as u64)
}

/// Casts a batch's columns to `schema` (same names, in order).
pub fn conform(batch: &RecordBatch, schema: &SchemaRef, what: &str) -> Result<RecordBatch> {
    let mut columns = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column = batch.column_by_name(field.name()).ok_or_else(|| {
            Error::internal(format!("{what}: query lost column {}", field.name()))
        })?;
        let cast_column = cast(column, field.data_type())
            .map_err(|e| Error::data(what, format!("column `{}`: {e}", field.name())))?;
        if !field.is_nullable() && cast_column.null_count() > 0 {
            return Err(Error::data(
                what,
                format!(
                    "column `{}` has {} empty or unreadable value(s)",
                    field.name(),
                    cast_column.null_count()
                ),
            ));
        }
        columns.push(cast_column);
    }
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(|e| Error::internal(e.to_string()))
}
