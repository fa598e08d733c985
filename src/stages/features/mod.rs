//! The features stage: runs the `sql/` files in order with the job's values as
//! parameters, writes each table to the run's `features/` folder as it
//! streams out of DataFusion, and registers the written file under the
//! table's name for the queries after it. With `[text]`, its [`text`] step
//! then encodes each item's text into `features/item_text_embeddings.parquet`.

pub mod text;

use std::path::PathBuf;

use datafusion::common::Column;
use datafusion::logical_expr::SortExpr;
use datafusion::physical_plan::common::spawn_buffered;
use datafusion::prelude::{ParquetReadOptions, SessionContext, col};
use datafusion::scalar::ScalarValue;
use futures::TryStreamExt;

use super::StageOutput;
use crate::config::Job;
use crate::error::{Error, Result};
use crate::lake::engine::{SqlParams, plan_sql};
use crate::lake::schema::contract;
use crate::run::RunFolder;

/// The SQL files built into the binary (the repository's `sql/` folder).
const EMBEDDED_SQL: &[(&str, &str)] = &[
    ("events.sql", include_str!("../../../sql/events.sql")),
    ("item_map.sql", include_str!("../../../sql/item_map.sql")),
    ("user_map.sql", include_str!("../../../sql/user_map.sql")),
    (
        "split_leave_one_out.sql",
        include_str!("../../../sql/split_leave_one_out.sql"),
    ),
    (
        "split_temporal.sql",
        include_str!("../../../sql/split_temporal.sql"),
    ),
    (
        "item_popularity.sql",
        include_str!("../../../sql/item_popularity.sql"),
    ),
    ("stats.sql", include_str!("../../../sql/stats.sql")),
    (
        "item_content.sql",
        include_str!("../../../sql/item_content.sql"),
    ),
    (
        "transitions.sql",
        include_str!("../../../sql/transitions.sql"),
    ),
    (
        "cooccurrence.sql",
        include_str!("../../../sql/cooccurrence.sql"),
    ),
    ("item_text.sql", include_str!("../../../sql/item_text.sql")),
];

/// The optional content table, written as `features/item_content.parquet`
/// when the job names one (`input.item_content` or
/// `features.item_content_sql`).
pub const ITEM_CONTENT_TABLE: &str = "item_content";

/// The tables the stage writes, in the order they are built. Each is written
/// to `features/<name>.parquet`.
pub const FEATURE_TABLES: &[&str] = &["item_map", "user_map", "split", "item_popularity", "stats"];

/// The neighbour tables of the item-to-item baselines, built after the
/// feature tables when their model is enabled (`features/<name>.parquet`,
/// from `sql/<name>.sql`).
pub const TRANSITIONS_TABLE: &str = "transitions";
/// See [`TRANSITIONS_TABLE`].
pub const COOCCURRENCE_TABLE: &str = "cooccurrence";

/// The neighbour tables `job` builds, in order.
pub fn neighbor_tables(job: &Job) -> Vec<&'static str> {
    let models = &job.spec.models;
    [
        (TRANSITIONS_TABLE, models.transitions.enabled),
        (COOCCURRENCE_TABLE, models.cooccurrence.enabled),
    ]
    .into_iter()
    .filter_map(|(table, enabled)| enabled.then_some(table))
    .collect()
}

/// One feature query: the table it makes and its SQL.
#[derive(Debug, Clone)]
pub struct FeatureQuery {
    /// Table name.
    pub table: String,
    /// File the SQL came from (for messages).
    pub file: String,
    /// The SQL text.
    pub sql: String,
}

/// The feature queries of `job`, in order, starting with the `events` view.
pub fn feature_queries(job: &Job) -> Result<Vec<FeatureQuery>> {
    let split_file = format!("split_{}.sql", job.spec.split.protocol.as_str());
    let mut order: Vec<(&str, String)> = vec![("events", "events.sql".into())];
    for table in FEATURE_TABLES {
        let file = if *table == "split" {
            split_file.clone()
        } else {
            format!("{table}.sql")
        };
        order.push((table, file));
    }
    let mut queries = order
        .into_iter()
        .map(|(table, file)| {
            let (file_label, sql) = load_sql(job, &file)?;
            Ok(FeatureQuery {
                table: table.to_string(),
                file: file_label,
                sql,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for table in neighbor_tables(job) {
        let (file, sql) = load_sql(job, &format!("{table}.sql"))?;
        queries.push(FeatureQuery {
            table: table.to_string(),
            file,
            sql,
        });
    }
    let content_sql = &job.spec.features.item_content_sql;
    if !content_sql.is_empty() {
        let (file, sql) = load_sql(job, content_sql)?;
        queries.push(FeatureQuery {
            table: ITEM_CONTENT_TABLE.into(),
            file,
            sql,
        });
    } else if !job.spec.input.item_content.is_empty() {
        // The input table, copied into the run so later stages and other
        // machines read the exact vectors this run used.
        queries.push(FeatureQuery {
            table: ITEM_CONTENT_TABLE.into(),
            file: format!("input.item_content = {:?}", job.spec.input.item_content),
            sql: "SELECT item_id, embedding FROM item_content".into(),
        });
    }
    Ok(queries)
}

/// Whether the job builds `features/item_content.parquet`.
pub fn has_item_content(job: &Job) -> bool {
    !job.spec.features.item_content_sql.is_empty() || !job.spec.input.item_content.is_empty()
}

fn load_sql(job: &Job, file: &str) -> Result<(String, String)> {
    let dir = &job.spec.features.sql_dir;
    if dir.is_empty() {
        let text = EMBEDDED_SQL
            .iter()
            .find(|(name, _)| *name == file)
            .map(|(_, text)| text.to_string())
            .ok_or_else(|| Error::internal(format!("no embedded SQL file {file}")))?;
        return Ok((format!("sql/{file} (built in)"), text));
    }
    let base = job.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let path = base.join(dir).join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::config(format!(
            "cannot read feature SQL {} (features.sql_dir = {dir:?} in {}): {e}",
            path.display(),
            job.source
        ))
    })?;
    Ok((path.display().to_string(), text))
}

/// The job values the SQL files may use, as named parameters.
pub fn sql_parameters(job: &Job) -> SqlParams {
    let spec = &job.spec;
    vec![
        (
            "min_user_events".into(),
            ScalarValue::Int64(Some(spec.features.min_user_events as i64)),
        ),
        (
            "min_item_events".into(),
            ScalarValue::Int64(Some(spec.features.min_item_events as i64)),
        ),
        (
            "valid_quantile".into(),
            ScalarValue::Float64(Some(spec.split.valid_quantile)),
        ),
        (
            "test_quantile".into(),
            ScalarValue::Float64(Some(spec.split.test_quantile)),
        ),
        (
            "transitions_neighbors".into(),
            ScalarValue::Int64(Some(spec.models.transitions.neighbors as i64)),
        ),
        (
            "cooccurrence_neighbors".into(),
            ScalarValue::Int64(Some(spec.models.cooccurrence.neighbors as i64)),
        ),
        (
            "cooccurrence_window".into(),
            ScalarValue::Int64(Some(spec.models.cooccurrence.window as i64)),
        ),
    ]
}

/// Builds every feature table. `ctx` must have `interactions` (and `items`
/// if present) registered; on return it also has every feature table.
pub async fn build_features(
    job: &Job,
    run: &RunFolder,
    ctx: &SessionContext,
) -> Result<StageOutput> {
    let queries = feature_queries(job)?;
    let params = sql_parameters(job);
    let mut written = Vec::new();
    for query in &queries {
        let what = format!("feature SQL {}", query.file);
        let needs_items =
            query.table == ITEM_CONTENT_TABLE && !job.spec.features.item_content_sql.is_empty();
        if needs_items
            && !ctx
                .table_exist("items")
                .map_err(|e| Error::from_datafusion(&what, e))?
        {
            return Err(Error::config(format!(
                "features.item_content_sql = {:?} builds item content from the items table, but input.items ({:?}) has no files",
                job.spec.features.item_content_sql, job.spec.input.items
            )));
        }
        let df = plan_sql(ctx, &query.sql, &params, &what).await?;
        if query.table == "events" {
            ctx.register_table("events", df.into_view())
                .map_err(|e| Error::from_datafusion(&query.file, e))?;
            continue;
        }
        let schema = df.schema().inner().clone();
        // The query runs on a task of its own, a few batches ahead, so its
        // last operator (the split's merge) and the Parquet encoder below
        // use both cores instead of taking turns on one.
        let batches = df
            .execute_stream()
            .await
            .map_err(|e| Error::from_datafusion(&what, e))?;
        let stream = spawn_buffered(batches, 2).map_err(|e| Error::from_datafusion(&what, e));
        let rel = format!("features/{}.parquet", query.table);
        let object = run.write_parquet(&rel, schema, stream, vec![]).await?;
        tracing::info!(table = %query.table, bytes = object.size, "feature table written");
        register_run_table(ctx, run, &query.table, &rel).await?;
        written.push(object);
    }
    if job.spec.text.enabled {
        let (file, sql) = load_sql(job, &job.spec.text.sql)?;
        let (object, _) = text::encode_item_text(job, run, ctx, (&file, &sql), &params).await?;
        written.push(object);
    }
    Ok(StageOutput {
        models: Vec::new(),
        written,
    })
}

/// Registers the run's file `rel` as table `name`, replacing any earlier one,
/// with the row order its contract promises (`order` in `schemas/`), so
/// readers stream a sorted table instead of sorting it again.
pub async fn register_run_table(
    ctx: &SessionContext,
    run: &RunFolder,
    name: &str,
    rel: &str,
) -> Result<()> {
    ctx.deregister_table(name)
        .map_err(|e| Error::from_datafusion(name, e))?;
    let order: Vec<SortExpr> = contract(name)
        .map(|c| c.order)
        .unwrap_or_default()
        .iter()
        .map(|column| col(Column::new_unqualified(column)).sort(true, false))
        .collect();
    let options = if order.is_empty() {
        ParquetReadOptions::default()
    } else {
        ParquetReadOptions::default().file_sort_order(vec![order])
    };
    ctx.register_parquet(name, run.url_of(rel), options)
        .await
        .map_err(|e| Error::from_datafusion(format!("registering {name}"), e))
}

/// Registers the feature tables an earlier `features` stage wrote.
pub async fn register_features(ctx: &SessionContext, run: &RunFolder, job: &Job) -> Result<()> {
    let content = has_item_content(job).then_some(ITEM_CONTENT_TABLE);
    let text = job
        .spec
        .text
        .enabled
        .then_some(text::ITEM_TEXT_EMBEDDINGS_TABLE);
    let tables = FEATURE_TABLES
        .iter()
        .copied()
        .chain(neighbor_tables(job))
        .chain(content)
        .chain(text);
    for table in tables {
        let rel = format!("features/{table}.parquet");
        if run.lake().head(&run.rel(&rel)).await?.is_none() {
            return Err(Error::config(format!(
                "{} has no features/{table}.parquet; run the features stage first",
                run.display()
            )));
        }
        register_run_table(ctx, run, table, &rel).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sql_file_is_built_in() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".sql") {
                assert!(
                    EMBEDDED_SQL.iter().any(|(n, _)| *n == name),
                    "{name} is not in EMBEDDED_SQL"
                );
            }
        }
    }

    /// Runs the feature SQL of `job_toml` over `rows` (user, item, seconds)
    /// in a memory lake and returns the split table as
    /// (user_id, item_id, split, user_index, item_index) rows in table order.
    async fn split_of<T: Into<ScalarValue> + Clone>(
        job_toml: &str,
        rows: &[(T, T, i64)],
    ) -> Vec<(String, String, String, u32, u32)> {
        use arrow::array::{ArrayRef, AsArray, RecordBatch, TimestampSecondArray};
        use arrow::datatypes::{DataType, Field, Schema, TimeUnit, UInt32Type};
        use datafusion::datasource::MemTable;
        use std::sync::Arc;

        let users = ScalarValue::iter_to_array(rows.iter().map(|r| r.0.clone().into())).unwrap();
        let items = ScalarValue::iter_to_array(rows.iter().map(|r| r.1.clone().into())).unwrap();
        let times: ArrayRef = Arc::new(TimestampSecondArray::from(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        ));
        let schema = Arc::new(Schema::new(vec![
            Field::new("user_id", users.data_type().clone(), false),
            Field::new("item_id", items.data_type().clone(), false),
            Field::new(
                "timestamp",
                DataType::Timestamp(TimeUnit::Second, None),
                false,
            ),
        ]));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![users, items, times]).unwrap();
        let job = Job::parse(job_toml, "t", None, &[]).unwrap();
        let lake = crate::lake::Lake::open(&crate::config::LakeSpec {
            url: format!("memory://features-{}", rand::random::<u32>()),
            ..Default::default()
        })
        .unwrap();
        let ctx = SessionContext::new();
        lake.register(&ctx);
        ctx.register_table(
            "interactions",
            Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
        )
        .unwrap();
        let date = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        let run = RunFolder::new(lake, "out", "t", date);
        let built = build_features(&job, &run, &ctx).await.unwrap();
        assert_eq!(
            built.written.len(),
            FEATURE_TABLES.len()
                + neighbor_tables(&job).len()
                + usize::from(has_item_content(&job))
        );
        let batches = ctx
            .sql("SELECT CAST(user_id AS VARCHAR), CAST(item_id AS VARCHAR), split, user_index, item_index FROM split")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut out = Vec::new();
        for b in &batches {
            let text = |i: usize| arrow::compute::cast(b.column(i), &DataType::Utf8).unwrap();
            let (u, it, sp) = (text(0), text(1), text(2));
            for r in 0..b.num_rows() {
                out.push((
                    u.as_string::<i32>().value(r).to_string(),
                    it.as_string::<i32>().value(r).to_string(),
                    sp.as_string::<i32>().value(r).to_string(),
                    b.column(3).as_primitive::<UInt32Type>().value(r),
                    b.column(4).as_primitive::<UInt32Type>().value(r),
                ));
            }
        }
        out
    }

    fn row(u: &str, i: &str, s: &str, ui: u32, ii: u32) -> (String, String, String, u32, u32) {
        (u.into(), i.into(), s.into(), ui, ii)
    }

    #[tokio::test]
    async fn leave_one_out_breaks_timestamp_ties_by_item_id() {
        // User 7: two pairs of events in the same second, given out of order.
        // User 3: only two events, so train only.
        let rows = [
            (7i64, 9i64, 200),
            (7, 5, 100),
            (7, 1, 200),
            (7, 3, 100),
            (3, 5, 50),
            (3, 9, 40),
        ];
        let split = split_of("", &rows).await;
        assert_eq!(
            split,
            vec![
                // user_map: 3 → 0, 7 → 1; item_map: 1 → 0, 3 → 1, 5 → 2, 9 → 3.
                row("3", "9", "train", 0, 3),
                row("3", "5", "train", 0, 2),
                row("7", "3", "train", 1, 1),
                row("7", "5", "train", 1, 2),
                row("7", "1", "valid", 1, 0),
                row("7", "9", "test", 1, 3),
            ]
        );
    }

    #[tokio::test]
    async fn string_ids_are_indexed_in_id_order() {
        let rows = [
            ("bob", "zeta", 1),
            ("bob", "alpha", 2),
            ("bob", "mid", 3),
            ("al", "mid", 5),
        ];
        let split = split_of("", &rows).await;
        assert_eq!(
            split,
            vec![
                row("al", "mid", "train", 0, 1),
                row("bob", "zeta", "train", 1, 2),
                row("bob", "alpha", "valid", 1, 0),
                row("bob", "mid", "test", 1, 1),
            ]
        );
    }

    #[tokio::test]
    async fn min_event_filters_drop_rare_items_then_users() {
        // Item 4 occurs once and goes; user 2 is then left with one event and goes.
        let rows = [
            (1i64, 1i64, 1),
            (1, 2, 2),
            (1, 1, 3),
            (2, 4, 1),
            (2, 2, 2),
            (3, 1, 1),
            (3, 2, 2),
        ];
        let split = split_of(
            "[features]\nmin_item_events = 2\nmin_user_events = 2\n",
            &rows,
        )
        .await;
        let users: Vec<&str> = split.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(users, ["1", "1", "1", "3", "3"]);
        assert!(split.iter().all(|r| r.1 != "4"));
    }

    #[tokio::test]
    async fn temporal_split_cuts_at_quantiles() {
        // Ten events at t = 1..10: 80 % → valid from t = 9, 90 % → test from t = 10.
        let rows: Vec<(i64, i64, i64)> = (1..=10).map(|t| (t % 2, t, t)).collect();
        let split = split_of("[split]\nprotocol = \"temporal\"\n", &rows).await;
        let by_item = |item: &str| split.iter().find(|r| r.1 == item).unwrap().2.clone();
        assert_eq!(by_item("8"), "train");
        assert_eq!(by_item("9"), "valid");
        assert_eq!(by_item("10"), "test");
    }

    #[test]
    fn protocol_picks_the_split_file() {
        let job = Job::parse("[split]\nprotocol = \"temporal\"", "t", None, &[]).unwrap();
        let q = feature_queries(&job).unwrap();
        let split = q.iter().find(|q| q.table == "split").unwrap();
        assert!(split.file.contains("split_temporal.sql"));
        assert_eq!(q[0].table, "events");
    }
}
