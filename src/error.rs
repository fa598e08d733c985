//! One error type for the whole job. Each variant says whose fault a failure is,
//! because that decides the exit code and whether a scheduler should retry.

use std::fmt;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exit codes, documented in the README.
pub mod exit_code {
    /// Everything worked.
    pub const OK: i32 = 0;
    /// A bug or an unexpected failure in recdistill itself.
    pub const INTERNAL: i32 = 1;
    /// Bad command line, job file or `--set` override: fix the call, then rerun.
    pub const CONFIG: i32 = 2;
    /// The input data breaks its contract: do not retry until the data is fixed.
    pub const DATA: i32 = 3;
    /// Storage or network trouble that may pass: retry later.
    pub const TRANSIENT_IO: i32 = 4;
    /// Another run holds the run folder (or took it over): this one wrote
    /// nothing there and did not commit. Retry after the other finishes.
    pub const BUSY: i32 = 5;
    /// The run committed, but its model failed the publish gate: the model
    /// that served before still serves. Do not retry; look at the run.
    pub const NOT_PUBLISHED: i32 = 6;
}

/// The library's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user's configuration (command line, job file, SQL files) is wrong.
    #[error("configuration error: {0}")]
    Config(String),

    /// The input data breaks its contract.
    #[error("invalid input data: {location}: {message}")]
    Data {
        /// File, table or column the problem is in.
        location: String,
        /// What rule was broken, with offending rows where rows are the problem.
        message: String,
    },

    /// Storage or network trouble that may pass on retry.
    #[error("storage I/O failed: {location}: {message}")]
    Io {
        /// Object or URL the operation touched.
        location: String,
        /// The underlying error, rendered.
        message: String,
    },

    /// Another run holds the run folder.
    #[error("run folder busy: {0}")]
    Busy(String),

    /// The run committed, but the publish gate refused its model.
    #[error("not published: {0}")]
    NotPublished(String),

    /// Something that should not happen: a bug in recdistill.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A configuration error.
    pub fn config(message: impl fmt::Display) -> Self {
        Error::Config(message.to_string())
    }

    /// A data error located at `location` (file, table or column).
    pub fn data(location: impl fmt::Display, message: impl fmt::Display) -> Self {
        Error::Data {
            location: location.to_string(),
            message: message.to_string(),
        }
    }

    /// A transient I/O error at `location`.
    pub fn io(location: impl fmt::Display, message: impl fmt::Display) -> Self {
        Error::Io {
            location: location.to_string(),
            message: message.to_string(),
        }
    }

    /// Another run holds the run folder.
    pub fn busy(message: impl fmt::Display) -> Self {
        Error::Busy(message.to_string())
    }

    /// An internal error.
    pub fn internal(message: impl fmt::Display) -> Self {
        Error::Internal(message.to_string())
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => exit_code::CONFIG,
            Error::Data { .. } => exit_code::DATA,
            Error::Io { .. } => exit_code::TRANSIENT_IO,
            Error::Busy(_) => exit_code::BUSY,
            Error::NotPublished(_) => exit_code::NOT_PUBLISHED,
            Error::Internal(_) => exit_code::INTERNAL,
        }
    }

    /// Classifies an object store error at `location`: a missing object or a
    /// refused credential is not worth retrying, everything else may pass.
    pub fn from_store(location: impl fmt::Display, err: object_store::Error) -> Self {
        use object_store::Error as E;
        match err {
            E::NotFound { .. } => Error::data(location, format!("not found ({err})")),
            E::InvalidPath { .. } => Error::config(format!("{location}: {err}")),
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
                Error::config(format!("{location}: access refused: {err}"))
            }
            E::NotSupported { .. }
            | E::NotImplemented { .. }
            | E::UnknownConfigurationKey { .. } => Error::config(format!("{location}: {err}")),
            // Some requests (listings) report a refusal only as a status in
            // a generic error; a refusal does not pass by retrying.
            other if refused_status(&other.to_string()) => {
                Error::config(format!("{location}: access refused: {other}"))
            }
            other => Error::io(location, other),
        }
    }

    /// Classifies a DataFusion error raised while running `what`.
    pub fn from_datafusion(
        what: impl fmt::Display,
        err: datafusion::error::DataFusionError,
    ) -> Self {
        use datafusion::error::DataFusionError as D;
        match err {
            D::External(inner) => {
                let what = what.to_string();
                Error::from_external(&what, inner)
                    .unwrap_or_else(|inner| Error::internal(format!("{what}: {inner}")))
            }
            D::Context(context, inner) => {
                Error::from_datafusion(format!("{what}: {context}"), *inner)
            }
            D::Diagnostic(_, inner) => Error::from_datafusion(what, *inner),
            D::Collection(mut errors) if !errors.is_empty() => {
                Error::from_datafusion(what, errors.swap_remove(0))
            }
            D::Shared(inner) => match std::sync::Arc::try_unwrap(inner) {
                Ok(inner) => Error::from_datafusion(what, inner),
                Err(shared) => Error::internal(format!("{what}: {shared}")),
            },
            D::ObjectStore(inner) => Error::from_store(what, *inner),
            // A read that failed in the store is storage trouble, not bad data.
            D::ParquetError(inner) => {
                let what = what.to_string();
                match *inner {
                    parquet::errors::ParquetError::External(source) => {
                        Error::from_external(&what, source).unwrap_or_else(|source| {
                            Error::data(&what, format!("unreadable Parquet: {source}"))
                        })
                    }
                    other => Error::data(what, format!("unreadable Parquet: {other}")),
                }
            }
            D::ArrowError(inner, _) => {
                let what = what.to_string();
                match *inner {
                    arrow::error::ArrowError::ExternalError(source) => {
                        Error::from_external(&what, source)
                            .unwrap_or_else(|source| Error::data(&what, source))
                    }
                    other => Error::data(what, other),
                }
            }
            D::SQL(inner, _) => Error::config(format!("{what}: SQL syntax: {inner}")),
            D::Plan(msg) => Error::config(format!("{what}: {msg}")),
            D::SchemaError(inner, _) => Error::config(format!("{what}: {inner}")),
            D::NotImplemented(msg) => Error::config(format!("{what}: not supported: {msg}")),
            D::Configuration(msg) => Error::config(format!("{what}: {msg}")),
            D::ResourcesExhausted(msg) => Error::config(format!(
                "{what}: memory limit reached ({msg}); raise input.memory_limit_mb"
            )),
            D::IoError(inner) => Error::io(what, inner),
            // A Ballista job reports its executors' failures as text.
            D::Execution(msg) if refused_status(&msg) || refused_text(&msg) => Error::config(
                format!("{what}: access refused (check the executors' credentials): {msg}"),
            ),
            D::Execution(msg) if unreachable_text(&msg) => Error::io(what, msg),
            other => Error::internal(format!("{what}: {other}")),
        }
    }
}

/// Whether a store's error text reports HTTP 401 or 403.
fn refused_status(text: &str) -> bool {
    text.contains("401 Unauthorized") || text.contains("403 Forbidden")
}

/// Whether an error passed on as text (a Ballista executor's) is a store
/// refusing credentials.
fn refused_text(text: &str) -> bool {
    [
        "PermissionDenied",
        "Unauthenticated",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "access refused",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// Whether an error passed on as text is a connection that could not be
/// made (a Ballista scheduler or executor out of reach).
fn unreachable_text(text: &str) -> bool {
    [
        "GrpcConnectionError",
        "transport error",
        "Connection refused",
        "connection refused",
        "TonicError",
        "Unavailable",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

impl Error {
    /// Classifies an error passed through DataFusion, Parquet or Arrow as
    /// an opaque source: ours, the store's and DataFusion's keep their
    /// class; anything else is handed back for the caller to place.
    fn from_external(
        what: &str,
        source: Box<dyn std::error::Error + Send + Sync>,
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let source = match source.downcast::<Error>() {
            Ok(ours) => return Ok(*ours),
            Err(source) => source,
        };
        let source = match source.downcast::<object_store::Error>() {
            Ok(store) => return Ok(Error::from_store(what, *store)),
            Err(source) => source,
        };
        match source.downcast::<datafusion::error::DataFusionError>() {
            Ok(df) => Ok(Error::from_datafusion(what, *df)),
            Err(source) => Err(source),
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(err: candle_core::Error) -> Self {
        Error::internal(format!("tensor operation failed: {err}"))
    }
}
