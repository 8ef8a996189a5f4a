//! Errors of the ingest workers.

use rdkafka::error::KafkaError;

/// Result with the ingest [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a worker stopped. Bad messages are never errors: they become dead letters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to Kafka failed.
    #[error("Kafka ({context}): {source}")]
    Kafka {
        /// What the worker was doing.
        context: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The lake refused an operation.
    #[error(transparent)]
    Lake(#[from] streetflow_lake::Error),
    /// Building a batch failed (a defect: the builders follow the table schema).
    #[error("building an Arrow batch for {table}: {source}")]
    Arrow {
        /// Table.
        table: &'static str,
        /// Arrow's error.
        #[source]
        source: streetflow_lake::arrow::error::ArrowError,
    },
    /// The settings are unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A backfill cannot go on (a concurrent load of the same file, an unreadable
    /// export).
    #[error("backfill: {0}")]
    Backfill(String),
    /// A batch run saw records waiting in the topic and nothing storing them for its
    /// whole stall timeout, rejoins included.
    #[error("stalled: {0}")]
    Stalled(String),
    /// The broker's answers disagree with the lake and a fetch could not settle which
    /// is right; running again may.
    #[error("unconfirmed: {0}")]
    Unconfirmed(String),
    /// A producer gave up because the consumers it paces itself by stopped.
    #[error("stopped: {0}")]
    Stopped(String),
    /// A flush failed; the partitions and offset ranges it held are not stored (a restart
    /// reads them again).
    #[error("flushing {ranges}: {source}")]
    Flush {
        /// `topic` partitions with their buffered offset ranges, as `p0 5..=8, p3 12..=40`.
        ranges: String,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// Reading an input file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> Error {
        let context = context.into();
        move |source| Error::Kafka { context, source }
    }

    /// Whether restarting the worker may succeed without a person (broker or storage
    /// outages); configuration and schema problems need a fix first.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Kafka { .. } | Error::Io { .. } | Error::Stalled(_) | Error::Unconfirmed(_) => {
                true
            }
            Error::Lake(e) => e.is_retryable(),
            Error::Flush { source, .. } => source.is_retryable(),
            Error::Arrow { .. } | Error::Config(_) | Error::Backfill(_) | Error::Stopped(_) => {
                false
            }
        }
    }
}

impl From<streetflow_core::csv_mapping::MappingError> for Error {
    fn from(error: streetflow_core::csv_mapping::MappingError) -> Self {
        Error::Config(error.0)
    }
}
