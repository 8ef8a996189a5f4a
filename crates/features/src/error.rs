//! Errors of the feature jobs.

use streetflow_lake::arrow::error::ArrowError;
use streetflow_lake::datafusion::error::DataFusionError;

/// Result with the features' [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a feature job failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lake refused an operation.
    #[error(transparent)]
    Lake(#[from] streetflow_lake::Error),
    /// A query failed to plan or run.
    #[error(transparent)]
    Query(#[from] streetflow_lake::QueryError),
    /// A result did not fit the table schema (a defect in the SQL).
    #[error("{context}: {source}")]
    Arrow {
        /// Which step.
        context: String,
        /// Arrow's error.
        #[source]
        source: ArrowError,
    },
    /// Writing a Parquet file failed.
    #[error("{context}: {source}")]
    Parquet {
        /// Which file.
        context: String,
        /// Parquet's error.
        #[source]
        source: streetflow_lake::deltalake::parquet::errors::ParquetError,
    },
    /// The knowledge time asked for cannot give a point-in-time vector: it is before the
    /// end of the day before the as-of date, or not settled yet.
    #[error("{0}")]
    KnowledgeTime(String),
    /// A local file could not be written.
    #[error("{context}: {source}")]
    Io {
        /// Which file.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn query(context: impl Into<String>) -> impl FnOnce(DataFusionError) -> Error {
        let wrap = streetflow_lake::QueryError::during(context);
        move |source| Error::Query(wrap(source))
    }
}

/// Plans and runs `query`, naming the step `context` in errors.
pub(crate) async fn collect(
    ctx: &streetflow_lake::datafusion::prelude::SessionContext,
    query: &str,
    context: &str,
) -> Result<Vec<streetflow_lake::arrow::array::RecordBatch>> {
    let frame = ctx
        .sql(query)
        .await
        .map_err(Error::query(format!("planning {context}")))?;
    frame
        .collect()
        .await
        .map_err(Error::query(format!("running {context}")))
}
