//! `streetflow migrate`: bring a lake written by an earlier streetflow to the current
//! table contract.
//!
//! Lakes written before knowledge time belonged to the lake have `pos_events.ingested_at`
//! (the Kafka record timestamp, or a file load's time) where `knowledge_time` and
//! `knowledge_source` are now, and no `kafka_timestamp` columns. Lakes written before
//! the month layout partition `pos_events` and `merchant_daily` by (operator, business
//! date) and `dead_letters` by (operator, ingest date). The migration rewrites each table
//! that differs from the contract in one commit, keeping every row and the ingest
//! offsets (and adding the month partition column), then builds
//! `merchant_daily_history` from bronze.
//!
//! What the old times mean afterwards: the lake never recorded when its commits made the
//! old rows visible, so their `ingested_at` is kept as **asserted** knowledge
//! (`knowledge_source = 'asserted'`): every vector computed before the migration is
//! computed again the same, and the rows say that a clock other than the lake's decided
//! their knowledge time. For Kafka rows it is also their `kafka_timestamp` (type
//! unknown: NULL). Rows written after the migration are observed.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use streetflow_core::KnowledgeSource;
use streetflow_core::tables::{DEAD_LETTERS, MERCHANT_DAILY, POS_EVENTS, TableDef};
use streetflow_features::{SilverMode, refresh_silver};
use streetflow_lake::arrow::array::{
    ArrayRef, AsArray, Date32Array, RecordBatch, StringArray, new_null_array,
};
use streetflow_lake::arrow::compute::kernels::boolean::not;
use streetflow_lake::arrow::compute::{cast, nullif};
use streetflow_lake::arrow::datatypes::{DataType, Date32Type, TimeUnit};
use streetflow_lake::{Lake, Rewritten};

use crate::runtime::runtime;
use crate::settings::load_pipeline;

/// Options of `streetflow migrate`.
#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// Lake root.
    #[arg(long, default_value = "./lake")]
    lake: String,
    /// Pipeline file (calendars, knowledge settle time, lake storage options).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The column `name` of `batch`, or an error naming the table.
fn column<'a>(batch: &'a RecordBatch, name: &str, table: &str) -> anyhow::Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .with_context(|| format!("{table} has neither {name} nor the current columns"))
}

/// `times` where the row came from Kafka (`kafka_topic` set), NULL for file loads.
fn kafka_times(batch: &RecordBatch, times: &ArrayRef, table: &str) -> anyhow::Result<ArrayRef> {
    let topics = column(batch, "kafka_topic", table)?;
    let from_files = not(&streetflow_lake::arrow::compute::is_null(topics)?)?;
    let file_rows = not(&from_files)?;
    Ok(nullif(times, &file_rows)?)
}

/// An old-contract batch of `def` in the current contract: columns the old table has
/// are kept (cast to the contract's type), the new ones derived from `ingested_at`.
fn convert(def: &TableDef, batch: RecordBatch) -> anyhow::Result<RecordBatch> {
    let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let ingested = || -> anyhow::Result<ArrayRef> {
        Ok(cast(column(&batch, "ingested_at", def.name)?, &utc)?)
    };
    // The month partition columns of the current layout, from the day columns.
    let months_of = |day_column: &str| -> anyhow::Result<ArrayRef> {
        let days = cast(column(&batch, day_column, def.name)?, &DataType::Date32)?;
        Ok(Arc::new(Date32Array::from_iter(
            days.as_primitive::<Date32Type>()
                .iter()
                .map(|day| day.map(streetflow_core::tables::month_of)),
        )))
    };
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(def.schema.fields().len());
    for field in def.schema.fields() {
        let name = field.name().as_str();
        let value: ArrayRef = match (name, batch.column_by_name(name)) {
            (_, Some(existing)) => cast(existing, field.data_type())?,
            ("business_month", None) => months_of("business_date")?,
            ("ingest_month", None) => months_of("ingest_date")?,
            ("knowledge_time", None) => ingested()?,
            ("knowledge_source", None) => Arc::new(StringArray::from(vec![
                KnowledgeSource::Asserted.as_str();
                batch.num_rows()
            ])),
            ("kafka_timestamp", None) => kafka_times(&batch, &ingested()?, def.name)?,
            ("kafka_timestamp_type", None) => new_null_array(&DataType::Utf8, batch.num_rows()),
            (other, _) => anyhow::bail!("{} has no column {other} to migrate from", def.name),
        };
        columns.push(value);
    }
    Ok(RecordBatch::try_new(def.schema.clone(), columns)?)
}

pub(crate) fn run(args: &MigrateArgs) -> anyhow::Result<()> {
    let config = load_pipeline(
        args.config.as_deref(),
        json!({ "lake": { "url": args.lake } }),
    )?;
    let lake = Lake::new(&args.lake, &config.lake.storage)?;
    let runtime = runtime()?;
    let mut done: Vec<(&str, Rewritten)> = Vec::new();
    for def in [&*POS_EVENTS, &*DEAD_LETTERS, &*MERCHANT_DAILY] {
        let Some(state) = runtime.block_on(lake.inspect(def))? else {
            continue;
        };
        if state.schema_problem.is_none() {
            continue;
        }
        let rewritten = runtime
            .block_on(lake.rewrite_table(def, |batch| {
                convert(def, batch).map_err(|e| streetflow_lake::Error::Query(format!("{e:#}")))
            }))
            .with_context(|| format!("rewriting {} into the current contract", def.name))?;
        if let Some(rewritten) = rewritten {
            done.push((def.name, rewritten));
        }
    }
    let silver = runtime
        .block_on(refresh_silver(
            &lake,
            SilverMode::Full,
            &streetflow_features::SilverSettings::of(&config)?,
        ))
        .context("building merchant_daily_history")?;
    if args.json {
        println!(
            "{}",
            json!({
                "rewritten": done.iter().map(|(table, r)| json!({
                    "table": table, "rows": r.rows, "files_before": r.files_before,
                    "files_after": r.files_after, "version": r.version,
                })).collect::<Vec<_>>(),
                "history_versions": silver.history.versions_written,
            })
        );
        return Ok(());
    }
    if done.is_empty() {
        println!("the lake's bronze tables already follow the current contract");
    }
    for (table, rewritten) in &done {
        println!(
            "{table}: {} rows rewritten into the current columns ({} files, were {}), version {}",
            rewritten.rows, rewritten.files_after, rewritten.files_before, rewritten.version
        );
    }
    if done.iter().any(|(table, _)| *table == POS_EVENTS.name) {
        println!(
            "their old ingested_at (Kafka record time or load time) is kept as asserted knowledge: \
             vectors computed before are computed again the same; rows from now on are observed"
        );
    }
    println!(
        "merchant_daily_history built: {} versions",
        silver.history.versions_written
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use streetflow_core::Knowledge;
    use streetflow_ingest::{DeadLetterRows, EventRows, Origin, RowAppender};
    use streetflow_lake::arrow::array::{Array, AsArray};
    use streetflow_lake::arrow::datatypes::{Field, Schema, TimestampMicrosecondType};

    /// Two bronze rows as an earlier streetflow wrote them: `ingested_at` in place of the
    /// knowledge and Kafka timestamp columns.
    fn old_rows(ingested: DateTime<Utc>) -> RecordBatch {
        let mut appender = RowAppender::new(Default::default(), Default::default());
        let (mut rows, mut dead) = (EventRows::default(), DeadLetterRows::default());
        let line = |id: &str| {
            format!(
                r#"{{"event_id":"{id}","operator_id":"lane","merchant_id":"cafe","kind":"sale","amount_fen":100,"currency":"CNY","occurred_at":"2025-01-02T10:00:00+08:00","channel":"cash"}}"#
            )
        };
        for (i, origin) in [
            Origin::Kafka {
                topic: "pos",
                partition: 0,
                offset: 7,
                timestamp: None,
            },
            Origin::File {
                path: "export.jsonl",
                line: 1,
            },
        ]
        .into_iter()
        .enumerate()
        {
            appender.append(
                &mut rows,
                &mut dead,
                Some(line(&format!("e{i}")).as_bytes()),
                None,
                ingested,
                Knowledge::Observed,
                origin,
                false,
            );
        }
        let current = rows.finish(ingested).unwrap_or_else(|e| panic!("{e}"));
        let (mut fields, mut columns) = (Vec::new(), Vec::new());
        for (field, column) in current.schema().fields().iter().zip(current.columns()) {
            match field.name().as_str() {
                "knowledge_time" => {
                    fields.push(Field::new("ingested_at", field.data_type().clone(), false));
                    columns.push(column.clone());
                }
                "knowledge_source" | "kafka_timestamp" | "kafka_timestamp_type" => {}
                _ => {
                    fields.push(field.as_ref().clone());
                    columns.push(column.clone());
                }
            }
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn old_rows_keep_their_times_as_asserted_knowledge() {
        let ingested = DateTime::from_timestamp(1_735_800_000, 0).unwrap_or_default();
        let new = convert(&POS_EVENTS, old_rows(ingested)).unwrap_or_else(|e| panic!("{e}"));
        let column = |name: &str| {
            new.column_by_name(name)
                .cloned()
                .unwrap_or_else(|| panic!("no {name}"))
        };
        let known = column("knowledge_time");
        let known = known.as_primitive::<TimestampMicrosecondType>();
        assert_eq!(known.value(0), ingested.timestamp_micros());
        assert_eq!(known.value(1), ingested.timestamp_micros());
        let source = column("knowledge_source");
        assert_eq!(source.as_string::<i32>().value(0), "asserted");
        assert_eq!(source.as_string::<i32>().value(1), "asserted");
        // The Kafka row's record time was its ingested_at; a file row has none.
        let kafka = column("kafka_timestamp");
        assert_eq!((kafka.is_null(0), kafka.is_null(1)), (false, true));
        assert_eq!(
            kafka.as_primitive::<TimestampMicrosecondType>().value(0),
            ingested.timestamp_micros()
        );
        assert!(column("kafka_timestamp_type").is_null(0));
    }
}
