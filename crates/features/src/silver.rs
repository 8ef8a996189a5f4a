//! `merchant_daily` (silver): kept equal to the daily definition over all of bronze.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::NaiveDate;
use streetflow_core::tables::{MERCHANT_DAILY, POS_EVENTS};
use streetflow_lake::arrow::array::{AsArray, RecordBatch};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::{DataType, Date32Type};
use streetflow_lake::datafusion::datasource::MemTable;
use streetflow_lake::{AppProgress, CommitOutcome, Lake, OffsetWriter, data_changes};

use crate::daily::DailyBuilder;
use crate::daily_parallel::ParallelDaily;
use crate::error::{Error, Result, collect};
use crate::history::{HistoryReport, SilverSettings, refresh_history, write_all};
use crate::relations::broadcast_small_join_sides;
use crate::sql;

/// The Delta `txn` application id under which silver records the bronze version it
/// reflects.
pub const BRONZE_APP_ID: &str = "pos_events";

/// How to bring silver up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SilverMode {
    /// Recompute only the partitions the bronze rows added since the recorded version
    /// touch (from scratch when nothing is recorded yet).
    Incremental,
    /// Recompute every partition from all of bronze.
    Full,
}

/// What a refresh did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SilverReport {
    /// Bronze version silver reflected before.
    pub previous_bronze_version: Option<i64>,
    /// Bronze version silver reflects now (`None`: no bronze yet).
    pub bronze_version: Option<i64>,
    /// Bronze files read as new (incremental mode).
    pub new_bronze_files: usize,
    /// (operator, business date) partitions rewritten; `None` for a full rewrite.
    pub partitions_rewritten: Option<usize>,
    /// Daily rows written.
    pub rows_written: usize,
    /// Another process refreshed silver first; nothing was written.
    pub fenced: bool,
    /// What the refresh of `merchant_daily_history` (bitemporal silver) did.
    pub history: HistoryReport,
}

/// (operator, business date) pairs of batches with those two columns first.
fn touched_days(batches: &[RecordBatch]) -> Result<HashSet<(String, i32)>> {
    let mut days = HashSet::new();
    for batch in batches {
        let operators = cast(batch.column(0), &DataType::Utf8).map_err(|source| Error::Arrow {
            context: "reading touched operators".to_owned(),
            source,
        })?;
        let operators = operators.as_string::<i32>();
        let dates = batch.column(1).as_primitive::<Date32Type>();
        for i in 0..batch.num_rows() {
            days.insert((operators.value(i).to_owned(), dates.value(i)));
        }
    }
    Ok(days)
}

/// Delta partition values (operator, `YYYY-MM-DD`) of (operator, date) pairs.
fn partition_keys(days: &HashSet<(String, i32)>) -> HashSet<Vec<String>> {
    days.iter()
        .map(|(operator, date)| {
            let date = NaiveDate::from_epoch_days(*date).unwrap_or_default();
            vec![operator.clone(), date.format("%Y-%m-%d").to_string()]
        })
        .collect()
}

/// Brings `merchant_daily` up to the newest `pos_events` version, then
/// `merchant_daily_history` up to it and to the knowledge settled now
/// ([`refresh_history`]).
pub async fn refresh_silver(
    lake: &Lake,
    mode: SilverMode,
    settings: &SilverSettings,
) -> Result<SilverReport> {
    let mut report = refresh_latest(lake, mode).await?;
    report.history = refresh_history(lake, mode, settings, chrono::Utc::now()).await?;
    Ok(report)
}

/// Brings `merchant_daily` up to the newest `pos_events` version.
async fn refresh_latest(lake: &Lake, mode: SilverMode) -> Result<SilverReport> {
    let Some(bronze) = lake.open(POS_EVENTS.name).await? else {
        return Ok(SilverReport::default());
    };
    let bronze_version = bronze.version().map(|v| v as i64);
    let mut silver = OffsetWriter::new(lake, &MERCHANT_DAILY, "merchant_daily").await?;
    let previous = silver.app_version(BRONZE_APP_ID).await?;
    let mut report = SilverReport {
        previous_bronze_version: previous,
        bronze_version,
        ..SilverReport::default()
    };
    let Some(version) = bronze_version else {
        return Ok(report);
    };
    if mode == SilverMode::Incremental && previous == Some(version) {
        return Ok(report);
    }

    // Bronze as of the version silver will record, whatever commits land meanwhile.
    let ctx = lake.pinned_session(POS_EVENTS.name, &bronze).await?;
    // New rows are what commits since the recorded version added as data: a compaction
    // rewrites files without new rows and touches nothing. Without that history (the log
    // was cleaned up) or after a data removal, every partition is recomputed.
    let changes = match (mode, previous) {
        (SilverMode::Incremental, Some(previous)) if previous <= version => {
            data_changes(&bronze, previous as u64, version as u64)
                .await?
                .filter(|changes| changes.appends_only())
        }
        _ => None,
    };
    let touched = match changes {
        Some(changes) => {
            report.new_bronze_files = changes.added.len();
            let touched = if changes.added.is_empty() {
                Vec::new()
            } else {
                let new_events = bronze
                    .table_provider()
                    .with_file_selection(streetflow_lake::deltalake::delta_datafusion::FileSelection::from_file_paths(changes.added))
                    .await
                    .map_err(Error::query("selecting new bronze files"))?;
                ctx.register_table("new_events", new_events)
                    .map_err(Error::query("registering new bronze files"))?;
                collect(&ctx, sql::TOUCHED_PARTITIONS, "touched partitions").await?
            };
            Some(touched)
        }
        None => None,
    };

    let started = std::time::Instant::now();
    let keep = match &touched {
        Some(batches) => Some(touched_days(batches)?),
        None => None,
    };
    let keep_day = |operator: &str, date: i32| {
        keep.as_ref()
            .is_none_or(|days| days.contains(&(operator.to_owned(), date)))
    };
    match &touched {
        Some(batches) => {
            let schema = batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| Arc::new(touched_schema()));
            let table = MemTable::try_new(schema, vec![batches.clone()])
                .map_err(Error::query("registering touched partitions"))?;
            ctx.register_table("touched", Arc::new(table))
                .map_err(Error::query("registering touched partitions"))?;
            broadcast_small_join_sides(&ctx);
            let events = collect(&ctx, sql::EVENTS_FOR_TOUCHED, "events of touched days").await?;
            let mut builder = ParallelDaily::per_core(DailyBuilder::new);
            for batch in events {
                builder.push(batch).await?;
            }
            report.rows_written += write_all(&mut silver, builder.finish(keep_day)?).await?;
        }
        // Everything, one operator at a time: event keys never cross operators, and
        // memory then holds the largest operator's events, not the lake's.
        None => {
            for operator in crate::history::operators(&ctx).await? {
                let mut builder = ParallelDaily::new(1, DailyBuilder::new);
                builder
                    .push_scan(
                        &ctx,
                        &format!(
                            "(SELECT * FROM pos_events WHERE operator_id = {})",
                            crate::gold::sql_literal(&operator)
                        ),
                    )
                    .await?;
                report.rows_written += write_all(&mut silver, builder.finish(keep_day)?).await?;
            }
        }
    }
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        rows = report.rows_written,
        "daily rows computed"
    );
    let staged = silver.stage().await?;
    let partitions = keep.as_ref().map(partition_keys);
    report.partitions_rewritten = partitions.as_ref().map(HashSet::len);
    let progress = [AppProgress {
        app_id: BRONZE_APP_ID.to_owned(),
        expected: previous,
        version,
    }];
    match silver
        .replace_partitions(&staged, partitions.as_ref(), &progress)
        .await?
    {
        CommitOutcome::Committed { .. } => {}
        CommitOutcome::Fenced { .. } => {
            silver.discard();
            report.fenced = true;
        }
    }
    Ok(report)
}

fn touched_schema() -> streetflow_lake::arrow::datatypes::Schema {
    use streetflow_lake::arrow::datatypes::{Field, Schema};
    Schema::new(vec![
        Field::new("operator_id", DataType::Utf8, false),
        Field::new("business_date", DataType::Date32, false),
    ])
}
