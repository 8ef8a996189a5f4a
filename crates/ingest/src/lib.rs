//! streetflow's ingest: Kafka → bronze Delta tables, exactly once.
//!
//! The entry point is [`run_worker`]: a streaming worker in a consumer group that decodes
//! each record with the `core` decoder, buffers accepted events and dead letters as Arrow
//! rows, and commits them to `pos_events` and `dead_letters` together with the Kafka
//! offsets they cover (Delta `txn` actions). [`produce_file`] publishes a JSON Lines file
//! with simulated arrival times, for tests, demos and benchmarks. [`backfill_file`] loads
//! operator exports (JSON Lines, gzip, CSV with a mapping) through the same decoder.

mod backfill;
mod batch;
mod clients;
pub mod end_probe;
mod error;
mod group;
mod health;
mod line_decoding;
pub mod metrics;
mod produce;
mod worker;

pub use backfill::{
    BackfillOptions, FileReport, InputFormat, KnowledgeTime, backfill_file, expand_inputs,
    file_identity, is_csv_file, legacy_file_identity,
};
pub use batch::{
    Appended, DeadLetter, DeadLetterRows, EventRows, KafkaTimestamp, KafkaTimestampKind, Origin,
    RowAppender, restamp_observed,
};
pub use clients::{ClientRole, client_config};
pub use error::{Error, Result};
pub use health::{TopicEnds, check_broker, check_ingest_progress};
pub use produce::{
    PartitionWatermarks, ProduceOptions, ProduceReport, Throttle, create_topic, create_topic_with,
    produce_file,
};
pub use streetflow_core::csv_mapping::{AmountUnit, BoundMapping, CsvMapping, MappingError};
pub use worker::{AfterCommit, IngestOptions, IngestReport, run_worker};
