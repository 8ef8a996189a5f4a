//! Arrow schemas of the lake's tables: the column contract risk modellers read.
//!
//! Each table lives at `<lake>/<name>`. Column names and types are public; they are
//! documented column by column in `schemas/tables.md`.

use std::sync::{Arc, LazyLock};

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// A table of the lake: name, schema and partition columns.
#[derive(Debug, Clone)]
pub struct TableDef {
    /// Directory under the lake root, and the table name in SQL.
    pub name: &'static str,
    /// One-line description, stored as the Delta table comment.
    pub description: &'static str,
    /// Columns, partition columns included.
    pub schema: SchemaRef,
    /// Hive-style partition columns, in directory order.
    pub partition_columns: &'static [&'static str],
}

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Bronze: every accepted event once, with where and when it came from.
pub static POS_EVENTS: LazyLock<TableDef> = LazyLock::new(|| TableDef {
    name: "pos_events",
    description: "Accepted pos_transaction/v1 events, each (operator_id, event_id) delivery once per Kafka offset or file line",
    schema: Arc::new(Schema::new(vec![
        Field::new("operator_id", DataType::Utf8, false),
        Field::new("business_date", DataType::Date32, false),
        Field::new("event_id", DataType::Utf8, false),
        Field::new("merchant_id", DataType::Utf8, false),
        Field::new("terminal_id", DataType::Utf8, true),
        Field::new("kind", DataType::Utf8, false),
        Field::new("amount_fen", DataType::Int64, false),
        Field::new("currency", DataType::Utf8, false),
        Field::new("occurred_at", utc_micros(), false),
        Field::new("utc_offset_seconds", DataType::Int32, false),
        Field::new("channel", DataType::Utf8, false),
        Field::new("ref_event_id", DataType::Utf8, true),
        Field::new("payer_ref", DataType::Utf8, true),
        Field::new("ingested_at", utc_micros(), false),
        Field::new("kafka_topic", DataType::Utf8, true),
        Field::new("kafka_partition", DataType::Int32, true),
        Field::new("kafka_offset", DataType::Int64, true),
        Field::new("source_file", DataType::Utf8, true),
        Field::new("source_line", DataType::Int64, true),
    ])),
    partition_columns: &["operator_id", "business_date"],
});

/// Rejected messages with their reason, never dropped.
pub static DEAD_LETTERS: LazyLock<TableDef> = LazyLock::new(|| TableDef {
    name: "dead_letters",
    description: "Rejected messages: raw payload (card numbers masked), stable reason code, detail and origin",
    schema: Arc::new(Schema::new(vec![
        Field::new("operator_id", DataType::Utf8, false),
        Field::new("ingest_date", DataType::Date32, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("payload", DataType::Binary, true),
        Field::new("payload_bytes", DataType::Int64, false),
        Field::new("payload_truncated", DataType::Boolean, false),
        Field::new("message_key", DataType::Binary, true),
        Field::new("ingested_at", utc_micros(), false),
        Field::new("kafka_topic", DataType::Utf8, true),
        Field::new("kafka_partition", DataType::Int32, true),
        Field::new("kafka_offset", DataType::Int64, true),
        Field::new("source_file", DataType::Utf8, true),
        Field::new("source_line", DataType::Int64, true),
    ])),
    partition_columns: &["operator_id", "ingest_date"],
});

/// `operator_id` of a dead letter whose operator cannot be read from the message.
pub const UNKNOWN_OPERATOR: &str = "unknown";

/// Dead letters keep at most this many payload bytes (Kafka's default message limit).
pub const MAX_DEAD_LETTER_PAYLOAD_BYTES: usize = 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_columns_exist_and_are_required() {
        for table in [&*POS_EVENTS, &*DEAD_LETTERS] {
            for column in table.partition_columns {
                let field = table.schema.field_with_name(column).unwrap();
                assert!(!field.is_nullable(), "{}.{column}", table.name);
            }
        }
    }
}
