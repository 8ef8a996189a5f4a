//! Errors of the lake.

use deltalake::DeltaTableError;

/// Result with the lake's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A query that failed to plan or run, with the step that ran it: the error the feature
/// and credit jobs share for their DataFusion stages.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct QueryError {
    /// Which step.
    pub context: String,
    /// DataFusion's error (boxed: it is large).
    #[source]
    pub source: Box<deltalake::datafusion::error::DataFusionError>,
}

impl QueryError {
    /// Wraps DataFusion's errors of the step `context`.
    pub fn during(
        context: impl Into<String>,
    ) -> impl FnOnce(deltalake::datafusion::error::DataFusionError) -> QueryError {
        let context = context.into();
        move |source| QueryError {
            context,
            source: Box::new(source),
        }
    }
}

/// What can go wrong with a table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lake location is not a path or URL streetflow can use.
    #[error("bad lake location {location:?}: {reason}")]
    BadLocation {
        /// As given.
        location: String,
        /// Why it was refused.
        reason: String,
    },
    /// The table exists with columns other than the contract's.
    #[error(
        "table {table} at {url} does not match the streetflow schema: {detail} (a lake written by an earlier streetflow is brought to the current one by `streetflow migrate`)"
    )]
    SchemaMismatch {
        /// Table name.
        table: String,
        /// Table location.
        url: String,
        /// First difference found.
        detail: String,
    },
    /// A commit would move a partition's recorded offset backwards (a caller defect:
    /// it would make the next reader re-write what the table holds).
    #[error("table {table}: {app_id} would move back from version {stored} to {proposed}")]
    OffsetWouldMoveBack {
        /// Table name.
        table: String,
        /// Delta txn application id.
        app_id: String,
        /// Offset the table holds.
        stored: i64,
        /// Offset the commit proposed.
        proposed: i64,
    },
    /// The table's offsets under this prefix were recorded from another source (topic):
    /// they say nothing about this one, so nothing is committed.
    #[error(
        "table {table}: the offsets of {app_prefix} belong to another source (identity \
         {recorded}, this one is {identity}): a renamed, recreated or failed-over topic \
         starts at offsets of its own; give it a pipeline name of its own ([pipeline] name) \
         or read the topic those offsets belong to"
    )]
    SourceChanged {
        /// Table name.
        table: &'static str,
        /// The writer's application-id prefix (the pipeline name).
        app_prefix: String,
        /// The identity the table records.
        recorded: i64,
        /// The identity of the source this writer reads.
        identity: i64,
    },
    /// `streetflow sql` and other read-only paths accept queries only.
    #[error("read-only: {0}")]
    NotAQuery(String),
    /// A query failed to plan or run.
    #[error("query: {0}")]
    Query(String),
    /// A table written by an earlier streetflow cannot be brought to the current contract.
    #[error("migrating {table}: {detail}")]
    Migration {
        /// Table name.
        table: String,
        /// What is missing or does not convert.
        detail: String,
    },
    /// Result rows could not be rendered as JSON.
    #[error("rendering result rows as JSON: {0}")]
    Json(String),
    /// Files of the table are damaged at rest (see [`crate::Lake::find_damage`]).
    #[error("table {table} is damaged: {}", damage.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Damaged {
        /// Table name.
        table: String,
        /// The damaged files, relative to the table.
        damage: Vec<crate::Damage>,
    },
    /// A Delta operation failed.
    #[error("Delta table {table} ({operation}): {source}")]
    Delta {
        /// Table name.
        table: String,
        /// What was being done.
        operation: &'static str,
        /// Underlying error (boxed: Delta's error type is large).
        #[source]
        source: Box<DeltaTableError>,
    },
}

impl Error {
    /// Whether trying again later may succeed (storage hiccups, lost races); schema and
    /// location errors need a person.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Delta { source, .. } => matches!(
                source.as_ref(),
                DeltaTableError::ObjectStore { .. }
                    | DeltaTableError::Io { .. }
                    | DeltaTableError::Transaction { .. }
                    | DeltaTableError::VersionAlreadyExists(_)
            ),
            Error::BadLocation { .. }
            | Error::NotAQuery(_)
            | Error::Query(_)
            | Error::Json(_)
            | Error::Migration { .. }
            | Error::SchemaMismatch { .. }
            | Error::OffsetWouldMoveBack { .. }
            | Error::SourceChanged { .. }
            | Error::Damaged { .. } => false,
        }
    }

    /// Wraps a Delta error with the table and the operation.
    pub fn delta<'a>(
        table: &'a str,
        operation: &'static str,
    ) -> impl FnOnce(DeltaTableError) -> Error + 'a {
        move |source| Error::Delta {
            table: table.to_owned(),
            operation,
            source: Box::new(source),
        }
    }
}
