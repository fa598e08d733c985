//! DataFusion, set up once per process: memory limit, partitions and batch
//! size from the job, and the read-only rules of ad hoc SQL.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use ballista::prelude::SessionContextExt;
use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingOptions;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::config::{InputSpec, LakeSpec};
use crate::error::{Error, Result};
use crate::lake::Lake;

/// Cores DataFusion may use: the job's `target_partitions`, or every core.
pub fn partitions(input: &InputSpec) -> usize {
    if input.target_partitions > 0 {
        input.target_partitions
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    }
}

/// Memory consumers named when a query runs out of memory.
const TOP_CONSUMERS: NonZeroUsize = NonZeroUsize::new(5).unwrap();

/// A session with the job's limits. Memory-hungry operators (sorts, joins,
/// aggregations) spill to temporary files or fail cleanly rather than take
/// more than `memory_limit_mb`. The pool is DataFusion's fair spill pool:
/// each spilling operator (the split's sorts) gets its share of what the
/// others (hash tables, buffers) leave, so a sort larger than the limit
/// spills and merges back instead of being refused the memory its merge
/// needs, as under the greedy pool, where the first comer takes it all.
///
/// With `lake.engine = "df://HOST:PORT"` the session sends its queries to
/// that Ballista scheduler, whose executors run them and read the lake
/// with their own credentials; results stream back. The scheduler is
/// reached once here: out of reach is exit 4, before anything is written.
pub async fn session(input: &InputSpec, lake: &LakeSpec) -> Result<SessionContext> {
    let pool = TrackConsumersPool::new(
        FairSpillPool::new(input.memory_limit_mb * 1024 * 1024),
        TOP_CONSUMERS,
    );
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(pool))
        .build_arc()
        .map_err(|e| Error::from_datafusion("setting up DataFusion", e))?;
    let config = SessionConfig::new()
        .with_target_partitions(partitions(input))
        .with_batch_size(input.batch_size)
        .with_information_schema(true);
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .build();
    let Some((host, port)) = lake.ballista_scheduler().map_err(Error::config)? else {
        return Ok(SessionContext::new_with_state(state));
    };
    if lake.url.trim().starts_with("memory:") {
        return Err(Error::config(format!(
            "lake.engine = {:?} runs queries on Ballista executors, which cannot reach this process's memory:// lake; use a file or object store lake",
            lake.engine
        )));
    }
    let endpoint = format!("http://{host}:{port}");
    let wait = Duration::from_secs(lake.connect_timeout_s.max(1));
    let unreachable = |why: String| {
        Error::io(
            &lake.engine,
            format!(
                "the Ballista scheduler at {endpoint} is unreachable: {why}; start it (ballista-scheduler) or fix lake.engine"
            ),
        )
    };
    match tokio::time::timeout(wait, SchedulerGrpcClient::connect(endpoint.clone())).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(unreachable(format!("{e:?}"))),
        Err(_) => return Err(unreachable(format!("no answer in {} s", wait.as_secs()))),
    }
    tracing::info!(scheduler = %endpoint, "queries run on Ballista");
    SessionContext::remote_with_state(lake.engine.trim(), state)
        .await
        .map_err(|e| Error::from_datafusion(format!("connecting to {endpoint}"), e))
}

/// Checks that `sql` is one read-only query before DataFusion plans it:
/// `SELECT`, `WITH`, `VALUES`, `EXPLAIN` and `SHOW`/`DESCRIBE` pass; DDL,
/// DML, `COPY`, `SET` and the rest are refused with a clear message.
/// (DataFusion's `SQLOptions` refuse the same plans again after planning.)
pub fn check_read_only(sql: &str) -> Result<()> {
    let statements = Parser::parse_sql(&GenericDialect {}, sql)
        .map_err(|e| Error::config(format!("SQL syntax: {e}")))?;
    if statements.len() != 1 {
        return Err(Error::config(format!(
            "expected one statement, got {}",
            statements.len()
        )));
    }
    match &statements[0] {
        Statement::Explain { statement, .. } if !matches!(**statement, Statement::Query(_)) => Err(
            Error::config("recdistill sql is read-only: EXPLAIN is allowed for queries only"),
        ),
        Statement::Query(_)
        | Statement::Explain { .. }
        | Statement::ExplainTable { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. } => Ok(()),
        other => {
            let text = other.to_string();
            let verb = text
                .split_whitespace()
                .next()
                .unwrap_or("this")
                .to_uppercase();
            Err(Error::config(format!(
                "recdistill sql is read-only: {verb} statements are refused (only SELECT / WITH / VALUES / EXPLAIN / SHOW)"
            )))
        }
    }
}

/// The options ad hoc queries run under: no DDL, no DML (including COPY), no
/// statements such as SET.
pub fn read_only_options() -> datafusion::execution::context::SQLOptions {
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Named SQL parameters (`$name`) and their values.
pub type SqlParams = Vec<(String, ScalarValue)>;

/// Plans `sql` with those of `params` it mentions (`$name`) bound.
pub async fn plan_sql(
    ctx: &SessionContext,
    sql: &str,
    params: &[(String, ScalarValue)],
    what: &str,
) -> Result<datafusion::dataframe::DataFrame> {
    let df = ctx
        .sql(sql)
        .await
        .map_err(|e| Error::from_datafusion(what, e))?;
    let used: SqlParams = params
        .iter()
        .filter(|(name, _)| sql.contains(&format!("${name}")))
        .cloned()
        .collect();
    if used.is_empty() {
        Ok(df)
    } else {
        df.with_param_values(used)
            .map_err(|e| Error::from_datafusion(what, e))
    }
}

/// Runs `sql` (see [`plan_sql`]) and collects the result.
pub async fn collect_sql(
    ctx: &SessionContext,
    sql: &str,
    params: &[(String, ScalarValue)],
    what: &str,
) -> Result<Vec<arrow::array::RecordBatch>> {
    plan_sql(ctx, sql, params, what)
        .await?
        .collect()
        .await
        .map_err(|e| Error::from_datafusion(what, e))
}

/// Registers a Parquet folder (Hive-partitioned by `dt` or flat) as `name`.
/// Returns false when the folder holds no files.
pub async fn register_folder(
    lake: &Lake,
    ctx: &SessionContext,
    name: &str,
    folder: &str,
) -> Result<bool> {
    if lake.list(folder).await?.is_empty() {
        return Ok(false);
    }
    let partitioned = lake
        .list_folders(folder)
        .await?
        .iter()
        .any(|f| f.starts_with("dt="));
    let mut options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    if partitioned {
        options = options
            .with_table_partition_cols(vec![("dt".into(), arrow::datatypes::DataType::Utf8)]);
    }
    let url = lake.url_of(&format!("{folder}/"));
    ctx.register_listing_table(name, &url, options, None, None)
        .await
        .map_err(|e| Error::from_datafusion(&url, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_check() {
        for ok in [
            "SELECT 1",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "VALUES (1)",
            "EXPLAIN SELECT 1",
            "SHOW TABLES",
        ] {
            check_read_only(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "CREATE TABLE t AS SELECT 1",
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/etc'",
            "INSERT INTO t VALUES (1)",
            "DELETE FROM t",
            "COPY (SELECT 1) TO '/tmp/x.parquet'",
            "DROP TABLE split",
            "SET datafusion.execution.batch_size = 1",
            "SELECT 1; DROP TABLE split",
            "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
        ] {
            let err = check_read_only(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
    }

    #[tokio::test]
    async fn ballista_needs_a_shared_lake() {
        let input = InputSpec::default();
        let lake = LakeSpec {
            url: "memory://x".into(),
            engine: "df://localhost:50050".into(),
            ..LakeSpec::default()
        };
        let Err(err) = session(&input, &lake).await else {
            panic!("a memory:// lake on Ballista was accepted");
        };
        assert_eq!(err.exit_code(), 2, "{err}");
        assert!(err.to_string().contains("memory://"), "{err}");
        // In process, any lake.
        let lake = LakeSpec {
            engine: String::new(),
            ..lake
        };
        session(&input, &lake).await.unwrap();
        for (engine, ok) in [
            ("df://host", true),
            ("df://10.0.0.1:50050/", true),
            ("ballista://host:1", false),
            ("df://:50050", false),
            ("df://host:port", false),
        ] {
            let lake = LakeSpec {
                engine: engine.into(),
                ..LakeSpec::default()
            };
            assert_eq!(lake.ballista_scheduler().is_ok(), ok, "{engine}");
        }
    }
}
