//! Metric names, in one place. Labels are low-cardinality (table, reason, partition).

/// Kafka records read (label: none).
pub const RECORDS_IN: &str = "streetflow_ingest_records_in_total";
/// Records written to `pos_events`.
pub const RECORDS_ACCEPTED: &str = "streetflow_ingest_records_accepted_total";
/// Records written to `dead_letters` (label: `reason`).
pub const RECORDS_DEAD_LETTERED: &str = "streetflow_ingest_records_dead_lettered_total";
/// Records skipped because the lake already holds them (replays after a restart).
pub const RECORDS_REPLAYED: &str = "streetflow_ingest_records_replayed_total";
/// Flushes that committed.
pub const FLUSHES: &str = "streetflow_ingest_flushes_total";
/// Records per flush.
pub const FLUSH_RECORDS: &str = "streetflow_ingest_flush_records";
/// Seconds per Delta commit (label: `table`).
pub const COMMIT_SECONDS: &str = "streetflow_ingest_commit_seconds";
/// Parquet files committed (label: `table`).
pub const FILES_WRITTEN: &str = "streetflow_ingest_files_written_total";
/// Commits refused because another worker owned the partition.
pub const FENCED: &str = "streetflow_ingest_fenced_total";
/// Offsets missing after positioning a partition (label: `outcome` = `repaired` when
/// the broker still held them, `lost` when retention had deleted them).
pub const OFFSET_GAPS: &str = "streetflow_ingest_offset_gaps_total";
/// Records deleted by the broker before any worker read them.
pub const RECORDS_LOST: &str = "streetflow_ingest_records_lost_on_broker_total";
/// Rejoins forced because the coordinator's assignment disagreed with the worker's.
pub const GROUP_REJOINS: &str = "streetflow_ingest_group_rejoins_total";
/// Seconds spent in the after-commit hook (the merchant_daily refresh).
pub const AFTER_COMMIT_SECONDS: &str = "streetflow_ingest_after_commit_seconds";
/// Commits whose rows were stamped again because the first stamp's knowledge deadline
/// passed before the commit.
pub const KNOWLEDGE_RESTAMPS: &str = "streetflow_ingest_knowledge_restamps_total";
/// Commits that became visible after the knowledge deadline of their stamp (silver
/// finds such rows behind its horizon and rebuilds).
pub const KNOWLEDGE_LATE_COMMITS: &str = "streetflow_ingest_knowledge_late_commits_total";
/// Consumer lag per partition, from librdkafka statistics (label: `partition`).
pub const CONSUMER_LAG: &str = "streetflow_ingest_consumer_lag_records";

/// Registers descriptions with the installed recorder.
pub fn describe() {
    metrics::describe_counter!(RECORDS_IN, "Kafka records read");
    metrics::describe_counter!(RECORDS_ACCEPTED, "records written to pos_events");
    metrics::describe_counter!(
        RECORDS_DEAD_LETTERED,
        "records written to dead_letters, by reason"
    );
    metrics::describe_counter!(
        RECORDS_REPLAYED,
        "records skipped because the lake already holds them"
    );
    metrics::describe_counter!(FLUSHES, "flushes committed");
    metrics::describe_histogram!(FLUSH_RECORDS, "records per flush");
    metrics::describe_histogram!(
        COMMIT_SECONDS,
        metrics::Unit::Seconds,
        "Delta commit latency by table"
    );
    metrics::describe_counter!(FILES_WRITTEN, "Parquet files committed by table");
    metrics::describe_counter!(
        FENCED,
        "commits refused because another worker owned the partition"
    );
    metrics::describe_counter!(
        OFFSET_GAPS,
        "offset gaps after positioning, repaired or lost"
    );
    metrics::describe_counter!(
        RECORDS_LOST,
        "records deleted by the broker before they were read"
    );
    metrics::describe_counter!(GROUP_REJOINS, "rejoins forced by a stale group assignment");
    metrics::describe_histogram!(
        AFTER_COMMIT_SECONDS,
        metrics::Unit::Seconds,
        "after-commit hook (merchant_daily refresh) latency"
    );
    metrics::describe_gauge!(CONSUMER_LAG, "consumer lag in records by partition");
    metrics::describe_counter!(
        KNOWLEDGE_RESTAMPS,
        "flushes stamped again because their commit missed the knowledge deadline"
    );
    metrics::describe_counter!(
        KNOWLEDGE_LATE_COMMITS,
        "commits visible only after the knowledge deadline of their stamp"
    );
}
