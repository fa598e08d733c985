//! A real S3-compatible server (s3s-fs) on 127.0.0.1, started in the test
//! process, with a fault injector in front of it: chosen requests get a 503
//! or 429, a dropped connection, a slow answer, or are held (to kill the job
//! while an object's bytes are in flight).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

pub const BUCKET: &str = "lake-bucket";
pub const ROOT: &str = "lake";
pub const ACCESS_KEY: &str = "SENTINELACCESSKEY7Q3Z";
pub const SECRET_KEY: &str = "SENTINEL-secret-K9v2x7Lq0w8e5r1t";

/// What happens to a request the plan picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `503 SlowDown`.
    Unavailable,
    /// `429 Too Many Requests`.
    TooMany,
    /// The connection is dropped without an answer.
    Reset,
    /// The answer comes after `slow_ms`.
    Slow,
}

/// Which requests get which fault.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Every `every`-th eligible request gets the next fault of `cycle`.
    pub every: usize,
    /// Faults handed out in turn. A write due for `Reset` or `Slow` gets a
    /// 503 instead: a write the server carries out after the client gave up
    /// could land after a newer one.
    pub cycle: Vec<Fault>,
    /// Delay of a `Slow` answer.
    pub slow_ms: u64,
    /// From this request on, every write fails with 503 (the retry budget runs out).
    pub writes_fail_after: Option<usize>,
    /// Hold the n-th PUT/POST (1-based) until the connection goes away.
    pub hold_write: Option<usize>,
}

#[derive(Default)]
struct State {
    plan: Mutex<FaultPlan>,
    requests: AtomicUsize,
    writes: AtomicUsize,
    eligible: AtomicUsize,
    injected: AtomicUsize,
    holding: AtomicBool,
}

/// A running server; stops when dropped.
pub struct S3Server {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    state: Arc<State>,
    _runtime: tokio::runtime::Runtime,
}

impl S3Server {
    /// Starts a server with one bucket, [`BUCKET`], and the sentinel credentials.
    pub fn start() -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(BUCKET)).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(State::default());
        let fs = s3s_fs::FileSystem::new(dir.path()).unwrap();
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let s3 = builder.build();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let accept_state = Arc::clone(&state);
        runtime.spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                // As any real server: without it, Nagle's algorithm and the
                // client's delayed ACKs stall every answer by ~40 ms.
                let _ = socket.set_nodelay(true);
                let (s3, state) = (s3.clone(), Arc::clone(&accept_state));
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (s3, state) = (s3.clone(), Arc::clone(&state));
                    async move { serve(&s3, &state, req).await }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        S3Server {
            addr,
            dir,
            state,
            _runtime: runtime,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The lake root URL.
    pub fn lake_url(&self) -> String {
        format!("s3://{BUCKET}/{ROOT}")
    }

    /// Where the bucket's objects lie on disk.
    pub fn bucket_dir(&self) -> PathBuf {
        self.dir.path().join(BUCKET)
    }

    /// The lake root on disk.
    pub fn lake_dir(&self) -> PathBuf {
        self.bucket_dir().join(ROOT)
    }

    pub fn set_plan(&self, plan: FaultPlan) {
        *self.state.plan.lock().unwrap() = plan;
        self.state.eligible.store(0, Ordering::SeqCst);
        self.state.writes.store(0, Ordering::SeqCst);
        self.state.holding.store(false, Ordering::SeqCst);
    }

    pub fn injected(&self) -> usize {
        self.state.injected.load(Ordering::SeqCst)
    }

    /// Writes (PUT, POST, DELETE) since the plan was set.
    pub fn writes(&self) -> usize {
        self.state.writes.load(Ordering::SeqCst)
    }

    /// Whether a write is being held now.
    pub fn holding(&self) -> bool {
        self.state.holding.load(Ordering::SeqCst)
    }

    /// A `recdistill` command set up to reach this server.
    pub fn command(&self) -> Command {
        let mut cmd = crate::common::recdistill();
        self.configure(&mut cmd);
        cmd
    }

    /// Points `cmd` at this server: endpoint, region and the sentinel credentials.
    pub fn configure(&self, cmd: &mut Command) {
        cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT", self.endpoint())
            .env("AWS_ALLOW_HTTP", "true")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE");
    }

    /// Uploads the shipped sample's tables to the lake.
    pub fn seed_sample(&self) {
        let src = crate::common::repo().join("data-samples/sample");
        crate::common::copy_dir(&src, &self.lake_dir());
    }

    /// Every object key in the bucket (relative to the bucket).
    pub fn keys(&self) -> Vec<String> {
        crate::common::files_under(&self.bucket_dir())
    }
}

type Reply = Result<Response<s3s::Body>, s3s::HttpError>;

fn error_reply(status: StatusCode, code: &str) -> Reply {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected</Message></Error>"
    );
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(s3s::Body::from(body))
        .unwrap())
}

fn reset() -> Reply {
    Err(s3s::HttpError::new(Box::new(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "injected reset",
    ))))
}

async fn serve(s3: &s3s::service::S3Service, state: &State, req: Request<Incoming>) -> Reply {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let is_write = matches!(*req.method(), Method::PUT | Method::POST | Method::DELETE);
    let plan = state.plan.lock().unwrap().clone();
    if is_write {
        let n = state.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if plan.hold_write == Some(n) {
            state.holding.store(true, Ordering::SeqCst);
            // Held until the client goes away (the test kills it); the
            // request is then dropped unanswered.
            tokio::time::sleep(Duration::from_secs(120)).await;
            return reset();
        }
        if plan.writes_fail_after.is_some_and(|after| n > after) {
            state.injected.fetch_add(1, Ordering::SeqCst);
            return error_reply(StatusCode::SERVICE_UNAVAILABLE, "SlowDown");
        }
    }
    if plan.every > 0 && !plan.cycle.is_empty() {
        let n = state.eligible.fetch_add(1, Ordering::SeqCst) + 1;
        if n.is_multiple_of(plan.every) {
            let fault = match plan.cycle[(n / plan.every - 1) % plan.cycle.len()] {
                Fault::Reset | Fault::Slow if is_write => Fault::Unavailable,
                fault => fault,
            };
            state.injected.fetch_add(1, Ordering::SeqCst);
            match fault {
                Fault::Unavailable => {
                    return error_reply(StatusCode::SERVICE_UNAVAILABLE, "SlowDown");
                }
                Fault::TooMany => return error_reply(StatusCode::TOO_MANY_REQUESTS, "SlowDown"),
                Fault::Reset => return reset(),
                Fault::Slow => tokio::time::sleep(Duration::from_millis(plan.slow_ms)).await,
            }
        }
    }
    s3.call(req.map(s3s::Body::from)).await
}
