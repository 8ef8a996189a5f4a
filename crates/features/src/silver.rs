//! `merchant_daily` (silver): kept equal to the daily definition over all of bronze.

use std::collections::HashSet;
use std::sync::Arc;

use streetflow_core::tables::{MERCHANT_DAILY, MERCHANT_DAILY_HISTORY, POS_EVENTS};
use streetflow_lake::arrow::array::{AsArray, RecordBatch};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::{DataType, Date32Type};
use streetflow_lake::datafusion::datasource::MemTable;
use streetflow_lake::{AppProgress, CommitOutcome, Lake, OffsetWriter, StagedFiles, data_changes};

use crate::daily::{DailyBuilder, HistorySpec};
use crate::daily_parallel::ParallelDaily;
use crate::error::{Error, Result, collect};
use crate::history::{
    HORIZON_APP_ID, HistoryReport, SilverSettings, day_end, rebuild_passes, refresh_history,
    write_all,
};
use crate::relations::broadcast_small_join_sides;
use crate::sql;
use streetflow_lake::freeze::{self, points};

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
    /// (operator, business date) days rewritten; `None` for a full rewrite.
    pub days_rewritten: Option<usize>,
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

/// Brings `merchant_daily` up to the newest `pos_events` version, then
/// `merchant_daily_history` up to it and to the knowledge settled now
/// ([`refresh_history`]).
pub async fn refresh_silver(
    lake: &Lake,
    mode: SilverMode,
    settings: &SilverSettings,
) -> Result<SilverReport> {
    let now = chrono::Utc::now();
    if let Some(report) = rebuild_both(lake, mode, settings, now).await? {
        return Ok(report);
    }
    let mut report = refresh_latest(lake, mode).await?;
    report.history = refresh_history(lake, mode, settings, now).await?;
    Ok(report)
}

/// Rebuilds `merchant_daily` and `merchant_daily_history` together, from one pass over
/// bronze, when both must be built from scratch (`--full`, or neither holds anything
/// yet: a first load); `None` otherwise. Each table's commit is fenced on the versions
/// it read, as the separate refreshes' are, so a crash between them leaves the history
/// to the next refresh.
async fn rebuild_both(
    lake: &Lake,
    mode: SilverMode,
    settings: &SilverSettings,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<SilverReport>> {
    let Some(bronze) = lake.open(POS_EVENTS.name).await? else {
        return Ok(None);
    };
    let Some(version) = bronze.version().map(|v| v as i64) else {
        return Ok(None);
    };
    let mut silver = OffsetWriter::new(lake, &MERCHANT_DAILY, "merchant_daily").await?;
    let mut history = OffsetWriter::new(lake, &MERCHANT_DAILY_HISTORY, "history").await?;
    let previous = silver.app_version(BRONZE_APP_ID).await?;
    let previous_history = history.app_version(BRONZE_APP_ID).await?;
    let previous_horizon = history.app_version(HORIZON_APP_ID).await?;
    let first_build =
        previous.is_none() && (previous_history.is_none() || previous_horizon.is_none());
    if mode != SilverMode::Full && !first_build {
        return Ok(None);
    }
    let horizon = (now - settings.knowledge.settle())
        .timestamp_micros()
        .max(previous_horizon.unwrap_or(i64::MIN));
    let calendars = &settings.calendars;
    let end_of = |operator: &str, date: i32| day_end(calendars, operator, date);
    let every_day = |_: &str, _: i32| true;
    let spec = HistorySpec {
        after: None,
        horizon,
        day_end: &end_of,
        keep: &every_day,
    };
    let mut report = SilverReport {
        previous_bronze_version: previous,
        bronze_version: Some(version),
        history: HistoryReport {
            previous_horizon,
            horizon: Some(horizon),
            rebuilt: true,
            ..HistoryReport::default()
        },
        ..SilverReport::default()
    };
    let ctx = lake.pinned_session(POS_EVENTS.name, &bronze).await?;
    for relation in rebuild_passes(&ctx).await? {
        let mut builder = ParallelDaily::per_core(DailyBuilder::new);
        builder.push_scan(&ctx, &relation).await?;
        let (daily, versions) = builder.finish_daily_and_history(every_day, &spec)?;
        report.rows_written += write_all(&mut silver, daily).await?;
        report.history.versions_written += write_all(&mut history, versions).await?;
    }
    let staged = silver.stage().await?;
    let progress = [AppProgress {
        app_id: BRONZE_APP_ID.to_owned(),
        expected: previous,
        version,
    }];
    if let CommitOutcome::Fenced { .. } =
        silver.replace_partitions(&staged, None, &progress).await?
    {
        silver.discard();
        report.fenced = true;
    }
    let staged = history.stage().await?;
    freeze::point(points::HISTORY_FILES);
    let progress = [
        AppProgress {
            app_id: BRONZE_APP_ID.to_owned(),
            expected: previous_history,
            version,
        },
        AppProgress {
            app_id: HORIZON_APP_ID.to_owned(),
            expected: previous_horizon,
            version: horizon,
        },
    ];
    match history.replace_partitions(&staged, None, &progress).await? {
        CommitOutcome::Committed { .. } => freeze::point(points::HISTORY_COMMIT),
        CommitOutcome::Fenced { .. } => {
            history.discard();
            report.history.fenced = true;
        }
    }
    Ok(Some(report))
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
    let mut staged_days = None;
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
            let rows = builder.finish(keep_day)?;
            report.rows_written += rows.iter().map(RecordBatch::num_rows).sum::<usize>();
            // One file per business date: the next refresh of a day rewrites that day's
            // file, not its month's.
            staged_days = Some(silver.stage_days(rows).await?);
        }
        // Everything, whole operators, as many per pass as memory allows.
        None => {
            for relation in rebuild_passes(&ctx).await? {
                let mut builder = ParallelDaily::per_core(DailyBuilder::new);
                builder.push_scan(&ctx, &relation).await?;
                report.rows_written += write_all(&mut silver, builder.finish(keep_day)?).await?;
            }
        }
    }
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        rows = report.rows_written,
        "daily rows computed"
    );
    report.days_rewritten = keep.as_ref().map(HashSet::len);
    let progress = [AppProgress {
        app_id: BRONZE_APP_ID.to_owned(),
        expected: previous,
        version,
    }];
    let outcome = match (&keep, staged_days) {
        (Some(days), Some(staged)) => silver.replace_days(&staged, days, &progress).await?,
        (Some(days), None) => {
            silver
                .replace_days(&StagedFiles::default(), days, &progress)
                .await?
        }
        (None, _) => {
            let staged = silver.stage().await?;
            silver.replace_partitions(&staged, None, &progress).await?
        }
    };
    match outcome {
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
