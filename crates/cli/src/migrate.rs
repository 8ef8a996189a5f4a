//! `streetflow migrate`: bring a lake written by an earlier streetflow to the current
//! table contract.
//!
//! The conversion and what the old knowledge times mean afterwards are documented with
//! `streetflow_lake::Lake::migrate_table`; then `merchant_daily_history` is built from
//! bronze.

use anyhow::Context;
use clap::Args;
use serde_json::json;
use streetflow_core::tables::{DEAD_LETTERS, MERCHANT_DAILY, POS_EVENTS};
use streetflow_features::{SilverMode, refresh_silver};
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

pub(crate) fn run(args: &MigrateArgs) -> anyhow::Result<()> {
    let config = load_pipeline(
        args.config.as_deref(),
        json!({ "lake": { "url": args.lake } }),
    )?;
    let lake = Lake::new(&args.lake, &config.lake.storage)?;
    let runtime = runtime()?;
    let mut done: Vec<(&str, Rewritten)> = Vec::new();
    for def in [&*POS_EVENTS, &*DEAD_LETTERS, &*MERCHANT_DAILY] {
        let rewritten = runtime
            .block_on(lake.migrate_table(def))
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
    use std::sync::Arc;

    use chrono::{DateTime, Utc};
    use streetflow_core::Knowledge;
    use streetflow_ingest::{DeadLetterRows, EventRows, Origin, RowAppender};
    use streetflow_lake::arrow::array::RecordBatch;
    use streetflow_lake::arrow::array::{Array, AsArray};
    use streetflow_lake::arrow::datatypes::{Field, Schema, TimestampMicrosecondType};
    use streetflow_lake::to_contract as convert;

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
