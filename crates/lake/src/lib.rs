//! streetflow's lake: Delta tables on object_store, written with their Kafka offsets.
//!
//! The entry point is [`Lake`], a root location (a local directory or an object-store
//! URL) holding one Delta table per [`TableDef`](streetflow_core::tables::TableDef).
//! [`OffsetWriter`] appends Arrow batches to one table and commits the Parquet files
//! together with Delta `txn` actions that record, per Kafka partition, the last offset
//! the commit contains. The commit checks that those versions are still the ones the
//! writer started from, so a worker that lost its partitions to another cannot write
//! the same offsets twice.

mod changes;
mod error;
pub mod freeze;
mod health;
mod integrity;
mod json;
mod lake;
mod maintenance;
mod migrate;
mod prepared;
mod query;
mod runtime;
mod writer;

pub use changes::{DataChanges, data_changes};
pub use error::{Error, QueryError, Result};
pub use integrity::Damage;
pub use json::{json_int, json_text, rows_json};
pub use lake::{Lake, TableState};
pub use maintenance::{CompactReport, ORPHAN_MAX_RETAIN_HOURS, ORPHAN_MIN_HOURS, VacuumReport};
pub use migrate::{Rewritten, to_contract};
pub use prepared::{PreparedQuery, RequestTables};
pub use query::memory_limit;
pub use runtime::runtime;
pub use writer::{AppProgress, CommitOutcome, OffsetWriter, PartitionProgress, StagedFiles};

/// Re-exported for callers that need Delta types (tables, file selections).
pub use deltalake;
/// Re-exported so callers build batches with the exact Arrow version Delta writes.
pub use deltalake::arrow;
/// Re-exported for queries over the lake.
pub use deltalake::datafusion;
