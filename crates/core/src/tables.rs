//! Arrow schemas of the lake's tables: the column contract risk modellers read.
//!
//! Each table lives at `<lake>/<name>`. Column names and types are public; they are
//! documented column by column in `schemas/tables.md`.

use std::sync::{Arc, LazyLock};

use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

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
        Field::new("local_minute_of_day", DataType::Int32, false),
        Field::new("channel", DataType::Utf8, false),
        Field::new("ref_event_id", DataType::Utf8, true),
        Field::new("payer_ref", DataType::Utf8, true),
        Field::new("knowledge_time", utc_micros(), false),
        Field::new("knowledge_source", DataType::Utf8, false),
        Field::new("kafka_topic", DataType::Utf8, true),
        Field::new("kafka_partition", DataType::Int32, true),
        Field::new("kafka_offset", DataType::Int64, true),
        Field::new("kafka_timestamp", utc_micros(), true),
        Field::new("kafka_timestamp_type", DataType::Utf8, true),
        Field::new("source_file", DataType::Utf8, true),
        Field::new("source_line", DataType::Int64, true),
        Field::new("business_month", DataType::Date32, false),
    ])),
    partition_columns: &["business_month"],
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
        Field::new("kafka_timestamp", utc_micros(), true),
        Field::new("kafka_timestamp_type", DataType::Utf8, true),
        Field::new("source_file", DataType::Utf8, true),
        Field::new("source_line", DataType::Int64, true),
        Field::new("ingest_month", DataType::Date32, false),
    ])),
    partition_columns: &["ingest_month"],
});

/// Silver: one row per (operator, merchant, business date) with anything on it; an exact,
/// deterministic function of `pos_events` (see `pipelines/features/daily.sql`).
pub static MERCHANT_DAILY: LazyLock<TableDef> = LazyLock::new(|| {
    let count = |name: &str| Field::new(name, DataType::Int64, false);
    let mut fields = vec![
        Field::new("operator_id", DataType::Utf8, false),
        Field::new("business_date", DataType::Date32, false),
        Field::new("merchant_id", DataType::Utf8, false),
        count("sales_count"),
        count("sales_fen"),
        count("refund_count"),
        count("refund_fen"),
        count("void_count"),
        count("net_fen"),
        count("orphan_refund_count"),
        count("orphan_void_count"),
        count("distinct_payers"),
        count("max_ticket_fen"),
        Field::new("first_sale_at", utc_micros(), true),
        Field::new("last_sale_at", utc_micros(), true),
    ];
    for channel in crate::Channel::ALL {
        fields.push(count(&format!("{}_fen", channel.as_str())));
    }
    fields.extend([
        count("night_sales_count"),
        count("night_sales_fen"),
        count("round_sales_count"),
        count("round_sales_fen"),
        count("duplicate_deliveries"),
        count("conflicting_events"),
        Field::new("business_month", DataType::Date32, false),
    ]);
    TableDef {
        name: "merchant_daily",
        description: "Daily cash flow per merchant: deduplicated, voids cancelling their sale, refunds on their own date",
        schema: Arc::new(Schema::new(fields)),
        partition_columns: &["business_month"],
    }
});

/// The payer-day entries of a `merchant_daily_history` row: per payer key
/// ([`crate::payer_key`]), the day's live sales and their sum, sorted by key.
pub fn payers_type() -> DataType {
    let entry = Fields::from(vec![
        Field::new("payer_key", DataType::Int64, false),
        Field::new("visits", DataType::Int64, false),
        Field::new("fen", DataType::Int64, false),
    ]);
    DataType::List(Arc::new(Field::new(
        "element",
        DataType::Struct(entry),
        false,
    )))
}

/// Bitemporal silver: every version of every `merchant_daily` row as the lake knew it
/// from the end of its business day on: a row holds from `known_from` until the next
/// version of its key. Partitioned by month; each version also carries its payer-day
/// entries, so payer features read the same versions.
pub static MERCHANT_DAILY_HISTORY: LazyLock<TableDef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("operator_id", DataType::Utf8, false),
        Field::new("business_month", DataType::Date32, false),
        Field::new("business_date", DataType::Date32, false),
        Field::new("merchant_id", DataType::Utf8, false),
        Field::new("known_from", utc_micros(), false),
        Field::new("retracted", DataType::Boolean, false),
    ];
    fields.extend(
        MERCHANT_DAILY
            .schema
            .fields()
            .iter()
            .filter(|f| {
                !matches!(
                    f.name().as_str(),
                    "operator_id" | "business_date" | "merchant_id" | "business_month"
                )
            })
            .map(|f| f.as_ref().clone()),
    );
    fields.push(Field::new("payers", payers_type(), false));
    TableDef {
        name: "merchant_daily_history",
        description: "Every version of each merchant-day's cash flow as the lake knew it, from the end of the day on (bitemporal silver)",
        schema: Arc::new(Schema::new(fields)),
        partition_columns: &["business_month"],
    }
});

/// Gold: one row per (operator, merchant) as of a date, computed only from what was known
/// at the knowledge time (see `pipelines/features/merchant_features.sql` and
/// `schemas/merchant_features.md`).
pub static MERCHANT_FEATURES: LazyLock<TableDef> = LazyLock::new(|| {
    let long = |name: &str, nullable: bool| Field::new(name, DataType::Int64, nullable);
    let double = |name: &str| Field::new(name, DataType::Float64, true);
    TableDef {
        name: "merchant_features",
        description: "Point-in-time merchant cash-flow features (v1) as of a date",
        schema: Arc::new(Schema::new(vec![
            Field::new("as_of_date", DataType::Date32, false),
            Field::new("operator_id", DataType::Utf8, false),
            Field::new("merchant_id", DataType::Utf8, false),
            Field::new("knowledge_time", utc_micros(), false),
            Field::new("feature_set", DataType::Utf8, false),
            long("days_on_book", false),
            long("net_fen_7d", false),
            long("net_fen_30d", false),
            long("net_fen_90d", false),
            long("net_fen_180d", false),
            long("net_fen_365d", false),
            long("sales_count_30d", false),
            long("sales_count_90d", false),
            long("active_days_30d", false),
            long("active_days_90d", false),
            double("active_day_ratio_30d"),
            double("active_day_ratio_90d"),
            long("avg_ticket_fen_30d", true),
            long("avg_ticket_fen_90d", true),
            double("refund_ratio_90d"),
            double("daily_net_cv_90d"),
            double("growth_mom_30d"),
            double("growth_yoy_90d"),
            double("trend_slope_26w"),
            long("max_zero_streak_90d", false),
            long("days_since_last_sale", true),
            double("weekend_share_90d"),
            double("night_share_90d"),
            double("round_amount_share_90d"),
            double("spike_ratio_30d_180d"),
            long("distinct_payers_90d", false),
            double("repeat_payer_ratio_90d"),
            double("top5_payer_share_90d"),
            long("months_on_book", true),
            double("coverage_ratio_90d"),
            double("rent_to_turnover_90d"),
            double("peer_pct_net_90d"),
            Field::new("mcc", DataType::Utf8, true),
            Field::new("industry_code", DataType::Utf8, true),
            Field::new("subsidy_sector", DataType::Utf8, true),
            long("bronze_version", false),
        ])),
        partition_columns: &["as_of_date"],
    }
});

/// Credit decisions: one row per (as-of date, product, operator, merchant), with what is
/// needed to reproduce and audit it (policy version and hash, table versions read).
pub static CREDIT_DECISIONS: LazyLock<TableDef> = LazyLock::new(|| TableDef {
    name: "credit_decisions",
    description: "Credit decisions per merchant and product as of a date: decision, limit in fen, reason codes, subsidy sector, policy version and hash",
    schema: Arc::new(Schema::new(vec![
        Field::new("as_of_date", DataType::Date32, false),
        Field::new("product", DataType::Utf8, false),
        Field::new("operator_id", DataType::Utf8, false),
        Field::new("merchant_id", DataType::Utf8, false),
        Field::new("policy_version", DataType::Utf8, false),
        Field::new("policy_hash", DataType::Utf8, false),
        Field::new("decision", DataType::Utf8, false),
        Field::new("limit_fen", DataType::Int64, false),
        Field::new(
            "reasons",
            DataType::List(Arc::new(Field::new("element", DataType::Utf8, true))),
            false,
        ),
        Field::new("subsidy_sector", DataType::Utf8, true),
        Field::new("subsidy_eligible", DataType::Boolean, false),
        Field::new("feature_set", DataType::Utf8, false),
        Field::new("feature_table_version", DataType::Int64, false),
        Field::new("bronze_version", DataType::Int64, false),
    ])),
    partition_columns: &["as_of_date", "product"],
});

/// The partition value of a day: the first day of its month, both as days since
/// 1970-01-01 (`business_month` of `pos_events`, `merchant_daily` and
/// `merchant_daily_history`, `ingest_month` of `dead_letters`).
///
/// Why months: a district's day holds a few hundred daily rows and a few thousand events,
/// so day partitions (per operator, as the first layout had them) made files of a few
/// kilobytes, thousands per backfill and per query plan; a month of a city is a few GB
/// of bronze, split into files by size. Within a month, files carry min/max statistics
/// of `operator_id` and `business_date`, which readers use to skip files.
pub fn month_of(day: i32) -> i32 {
    use chrono::{Datelike, NaiveDate};
    NaiveDate::default()
        .checked_add_signed(chrono::Duration::days(i64::from(day)))
        .and_then(|date| date.with_day(1))
        .map_or(day, |first| {
            first.signed_duration_since(NaiveDate::default()).num_days() as i32
        })
}

/// `operator_id` of a dead letter whose operator cannot be read from the message.
pub const UNKNOWN_OPERATOR: &str = "unknown";

/// Dead letters keep at most this many payload bytes (Kafka's default message limit).
pub const MAX_DEAD_LETTER_PAYLOAD_BYTES: usize = 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_belongs_to_the_first_day_of_its_month() {
        use chrono::NaiveDate;
        let day = |y, m, d| {
            NaiveDate::from_ymd_opt(y, m, d)
                .map(|date| date.signed_duration_since(NaiveDate::default()).num_days() as i32)
                .unwrap_or_default()
        };
        assert_eq!(month_of(day(2025, 3, 31)), day(2025, 3, 1));
        assert_eq!(month_of(day(2025, 3, 1)), day(2025, 3, 1));
        assert_eq!(month_of(day(2024, 2, 29)), day(2024, 2, 1));
        assert_eq!(month_of(day(1969, 12, 31)), day(1969, 12, 1));
    }

    #[test]
    fn partition_columns_exist_and_are_required() {
        for table in [
            &*POS_EVENTS,
            &*DEAD_LETTERS,
            &*MERCHANT_DAILY,
            &*MERCHANT_DAILY_HISTORY,
            &*MERCHANT_FEATURES,
            &*CREDIT_DECISIONS,
        ] {
            for column in table.partition_columns {
                let field = table.schema.field_with_name(column).unwrap();
                assert!(!field.is_nullable(), "{}.{column}", table.name);
            }
        }
    }
}
