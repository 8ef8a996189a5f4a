//! Errors of credit decisions.

use chrono::NaiveDate;
use streetflow_lake::datafusion::error::DataFusionError;

/// Result with the credit crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a decision run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lake refused an operation.
    #[error(transparent)]
    Lake(#[from] streetflow_lake::Error),
    /// The policy query failed to plan or run.
    #[error(transparent)]
    Query(#[from] streetflow_lake::QueryError),
    /// `merchant_features` has no rows for the date.
    #[error("merchant_features has no rows as of {0}; run `streetflow features --as-of {0}` first")]
    NoFeatures(NaiveDate),
    /// `credit_decisions` holds no decision for the date.
    #[error("no credit decisions as of {0}: run `streetflow decide --as-of {0}` first")]
    NoDecisions(NaiveDate),
    /// Decisions made on newer features are stored for the date and product already.
    #[error(
        "credit_decisions holds {product} decisions as of {as_of_date} made on merchant_features \
         version {stored}, newer than version {read} this run read: nothing replaced (re-run \
         to decide on the newest features)"
    )]
    NewerDecisions {
        /// The as-of date.
        as_of_date: NaiveDate,
        /// The product.
        product: String,
        /// The feature version the stored decisions were made on.
        stored: i64,
        /// The feature version this run read.
        read: i64,
    },
    /// A result did not have the expected shape (a defect).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn query(context: impl Into<String>) -> impl FnOnce(DataFusionError) -> Error {
        let wrap = streetflow_lake::QueryError::during(context);
        move |source| Error::Query(wrap(source))
    }
}
