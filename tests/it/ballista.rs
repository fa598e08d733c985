//! The features SQL and `recdistill sql` on Apache Ballista: a standalone
//! cluster (a scheduler and an executor talking gRPC on localhost) started
//! in this test process, the job pointed at it with
//! `lake.engine = "df://localhost:PORT"`. Its feature tables equal
//! in-process execution's row for row and in order, on a local lake and on
//! the S3 server; a scheduler out of reach is exit 4 and executors with
//! wrong credentials exit 2, writing nothing.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ballista_core::extension::SessionConfigExt;
use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::SessionConfig;
use object_store::aws::AmazonS3Builder;

use crate::common::*;
use crate::s3server::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY};

/// A running standalone cluster; stops with the runtime when dropped.
struct Cluster {
    engine: String,
    _runtime: tokio::runtime::Runtime,
}

/// The S3 store the cluster's executor (and scheduler, which lists files
/// when it plans) reads with: the test server's, with `secret`.
fn s3_store(server: &S3Server, secret: &str) -> Arc<dyn object_store::ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(server.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(secret)
            .with_retry(object_store::RetryConfig {
                max_retries: 1,
                ..Default::default()
            })
            .build()
            .unwrap(),
    )
}

/// Starts a scheduler and one executor of 2 task slots on localhost; with
/// `s3`, they reach the S3 server's bucket with that store.
fn start_cluster(s3: Option<Arc<dyn object_store::ObjectStore>>) -> Cluster {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine = runtime.block_on(async move {
        let registry = Arc::new(DefaultObjectStoreRegistry::new());
        if let Some(store) = s3 {
            let bucket = url::Url::parse(&format!("s3://{BUCKET}")).unwrap();
            registry.register_store(&bucket, store);
        }
        let env = RuntimeEnvBuilder::new()
            .with_object_store_registry(registry)
            .build_arc()
            .unwrap();
        let state = SessionStateBuilder::new()
            .with_config(SessionConfig::new_with_ballista())
            .with_runtime_env(env)
            .with_default_features()
            .build();
        let addr = ballista_scheduler::standalone::new_standalone_scheduler_from_state(&state)
            .await
            .unwrap();
        let url = format!("http://localhost:{}", addr.port());
        let scheduler = loop {
            match SchedulerGrpcClient::connect(url.clone()).await {
                Ok(client) => break client,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        ballista_executor::new_standalone_executor_from_state(scheduler, 2, &state)
            .await
            .unwrap();
        format!("df://localhost:{}", addr.port())
    });
    Cluster {
        engine,
        _runtime: runtime,
    }
}

/// `recdistill stage features` of the sample job on `lake`, on `engine`.
fn features(lake: &str, engine: &str, configure: impl Fn(&mut Command)) -> Command {
    let mut cmd = recdistill();
    configure(&mut cmd);
    cmd.args(["stage", "features", "--job"])
        .arg(repo().join("jobs/sample.toml"))
        .args(["--lake", lake, "--run-date", RUN_DATE])
        .args(["--set", &format!("lake.engine={engine:?}")]);
    cmd
}

const TABLES: [&str; 5] = ["item_map", "user_map", "split", "item_popularity", "stats"];

/// Every feature table of the run folder `a` equals `b`'s, row for row.
fn same_features(a: &Path, b: &Path) {
    for table in TABLES {
        let rel = format!("features/{table}.parquet");
        let (x, y) = (read_all(&a.join(&rel)), read_all(&b.join(&rel)));
        assert!(x.num_rows() > 0, "{rel} is empty");
        assert_eq!(x, y, "{rel} differs between in-process and Ballista");
    }
}

fn run_folder(root: &Path) -> std::path::PathBuf {
    root.join("recdistill/sample")
        .join(format!("run_date={RUN_DATE}"))
}

#[test]
fn features_and_sql_on_ballista_equal_in_process_on_a_local_lake() {
    let cluster = start_cluster(None);
    let (local, remote) = (TestLake::with_sample(), TestLake::with_sample());
    let path = |lake: &TestLake| lake.path().display().to_string();
    ok(&mut features(&path(&local), "", |_| {}));
    let out = ok(&mut features(&path(&remote), &cluster.engine, |_| {}));
    assert!(out.contains("features/split.parquet"), "{out}");
    same_features(&run_folder(local.path()), &run_folder(remote.path()));

    // Ad hoc SQL over the lake through the scheduler.
    let query = "SELECT dt, COUNT(*) AS events, COUNT(DISTINCT user_id) AS users \
                 FROM interactions GROUP BY dt ORDER BY dt";
    let sql = |lake: &TestLake, engine: &str| {
        let mut cmd = recdistill();
        cmd.args([
            "sql",
            "--lake",
            &path(lake),
            "--engine",
            engine,
            "--format",
            "csv",
            query,
        ]);
        ok(&mut cmd)
    };
    let here = sql(&local, "");
    assert!(here.lines().count() > 2, "{here}");
    assert_eq!(sql(&remote, &cluster.engine), here);
}

#[test]
fn features_on_ballista_equal_in_process_on_the_s3_server() {
    let server = S3Server::start();
    server.seed_sample();
    let cluster = start_cluster(Some(s3_store(&server, SECRET_KEY)));
    let lake = server.lake_url();
    let configure = |cmd: &mut Command| server.configure(cmd);
    ok(&mut features(&lake, "", configure));
    let reference = tempfile::tempdir().unwrap();
    copy_tree(&run_folder(&server.lake_dir()), reference.path());
    std::fs::remove_dir_all(run_folder(&server.lake_dir())).unwrap();
    ok(&mut features(&lake, &cluster.engine, configure));
    same_features(reference.path(), &run_folder(&server.lake_dir()));
}

#[test]
fn executors_with_wrong_credentials_exit_2_and_write_nothing() {
    let server = S3Server::start();
    server.seed_sample();
    let cluster = start_cluster(Some(s3_store(&server, "not-the-secret")));
    let err = fails(
        &mut features(&server.lake_url(), &cluster.engine, |cmd| {
            server.configure(cmd)
        }),
        2,
    );
    assert!(err.contains("access refused"), "{err}");
    let written: Vec<String> = files_under(&run_folder(&server.lake_dir()))
        .into_iter()
        .filter(|f| !f.starts_with("_lease/"))
        .collect();
    assert!(written.is_empty(), "{written:?}");
}

#[test]
fn a_scheduler_out_of_reach_is_exit_4_before_anything_is_written() {
    let lake = TestLake::with_sample();
    // Nothing listens on port 1.
    let err = fails(
        &mut features(
            &lake.path().display().to_string(),
            "df://127.0.0.1:1",
            |_| {},
        ),
        4,
    );
    assert!(err.contains("Ballista scheduler"), "{err}");
    assert!(!lake.run_folder("sample").exists());
    // A malformed engine is a configuration error.
    let err = fails(
        &mut features(&lake.path().display().to_string(), "ballista://x", |_| {}),
        2,
    );
    assert!(err.contains("lake.engine"), "{err}");
}

fn copy_tree(from: &Path, to: &Path) {
    for name in files_under(from) {
        let target = to.join(&name);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(from.join(&name), target).unwrap();
    }
}
