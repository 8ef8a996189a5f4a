//! `merchant_daily` (silver): kept equal to the daily definition over all of bronze.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::mpsc;

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

/// Both silver tables about to be built from scratch as of one bronze version: their
/// writers, the progress they recorded (fences) and the history's spec.
struct FirstBuild {
    silver: OffsetWriter,
    history: OffsetWriter,
    previous: Option<i64>,
    previous_history: Option<i64>,
    previous_horizon: Option<i64>,
    horizon: i64,
    report: SilverReport,
}

impl FirstBuild {
    /// `None` unless both tables must be built from scratch: `full`, or neither holds
    /// anything yet (a first load).
    async fn start(
        lake: &Lake,
        full: bool,
        version: i64,
        settings: &SilverSettings,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<Self>> {
        let mut silver = OffsetWriter::new(lake, &MERCHANT_DAILY, "merchant_daily").await?;
        let mut history = OffsetWriter::new(lake, &MERCHANT_DAILY_HISTORY, "history").await?;
        let previous = silver.app_version(BRONZE_APP_ID).await?;
        let previous_history = history.app_version(BRONZE_APP_ID).await?;
        let previous_horizon = history.app_version(HORIZON_APP_ID).await?;
        let first_build =
            previous.is_none() && (previous_history.is_none() || previous_horizon.is_none());
        if !full && !first_build {
            return Ok(None);
        }
        let horizon = (now - settings.knowledge.settle())
            .timestamp_micros()
            .max(previous_horizon.unwrap_or(i64::MIN));
        let report = SilverReport {
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
        Ok(Some(FirstBuild {
            silver,
            history,
            previous,
            previous_history,
            previous_horizon,
            horizon,
            report,
        }))
    }

    /// Finishes `builder` (fed with bronze rows) into both tables' writers.
    async fn add(&mut self, builder: ParallelDaily, settings: &SilverSettings) -> Result<()> {
        let calendars = &settings.calendars;
        let end_of = |operator: &str, date: i32| day_end(calendars, operator, date);
        let every_day = |_: &str, _: i32| true;
        let spec = HistorySpec {
            after: None,
            horizon: self.horizon,
            day_end: &end_of,
            keep: &every_day,
        };
        let (daily, versions) = builder.finish_daily_and_history(every_day, &spec)?;
        self.report.rows_written += write_all(&mut self.silver, daily).await?;
        self.report.history.versions_written += write_all(&mut self.history, versions).await?;
        Ok(())
    }

    /// Commits both tables as of bronze `version`, each fenced on what it recorded: a
    /// crash between the two commits leaves the history to the next refresh.
    async fn commit(mut self, version: i64) -> Result<SilverReport> {
        let staged = self.silver.stage().await?;
        let progress = [AppProgress {
            app_id: BRONZE_APP_ID.to_owned(),
            expected: self.previous,
            version,
        }];
        if let CommitOutcome::Fenced { .. } = self
            .silver
            .replace_partitions(&staged, None, &progress)
            .await?
        {
            self.silver.discard();
            self.report.fenced = true;
        }
        let staged = self.history.stage().await?;
        freeze::point(points::HISTORY_FILES);
        let progress = [
            AppProgress {
                app_id: BRONZE_APP_ID.to_owned(),
                expected: self.previous_history,
                version,
            },
            AppProgress {
                app_id: HORIZON_APP_ID.to_owned(),
                expected: self.previous_horizon,
                version: self.horizon,
            },
        ];
        match self
            .history
            .replace_partitions(&staged, None, &progress)
            .await?
        {
            CommitOutcome::Committed { .. } => freeze::point(points::HISTORY_COMMIT),
            CommitOutcome::Fenced { .. } => {
                self.history.discard();
                self.report.history.fenced = true;
            }
        }
        Ok(self.report)
    }
}

/// Rebuilds `merchant_daily` and `merchant_daily_history` together, from one pass over
/// bronze, when both must be built from scratch (`--full`, or neither holds anything
/// yet: a first load); `None` otherwise.
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
    let full = mode == SilverMode::Full;
    let Some(mut build) = FirstBuild::start(lake, full, version, settings, now).await? else {
        return Ok(None);
    };
    let ctx = lake.pinned_session(POS_EVENTS.name, &bronze).await?;
    for relation in rebuild_passes(&ctx).await? {
        let mut builder = ParallelDaily::per_core(DailyBuilder::new);
        builder.push_scan(&ctx, &relation).await?;
        build.add(builder, settings).await?;
    }
    build.commit(version).await.map(Some)
}

/// Committed batches waiting for the builders. A load hands a commit's rows over at
/// once (2 M lines by default, about 120 of its 16,384-line batches); a queue shorter
/// than that held the load's writer, and so its decoders, until the builders had read
/// them all, and one core idled (measured: about 4 s of a 21 s load). About 250 bytes
/// of Arrow per row: 256 batches are at most about 1 GB, and the builders read faster
/// than a load decodes, so the queue stays short.
const LOAD_QUEUED_BATCHES: usize = 256;

/// Bronze rows a load may feed [`SilverFromLoad`] before it gives up (its builders
/// hold about 190 bytes an event) and leaves silver to a refresh.
const LOAD_EVENTS_LIMIT: u64 = 20_000_000;

/// Silver built from the rows a first load commits, as they are committed, instead of
/// from bronze read back after it: the daily builders run beside the load's decoding
/// and encoding. Used only when the lake has no bronze yet; [`SilverFromLoad::finish`]
/// commits only when bronze then holds exactly the rows it was given (no other writer
/// came in between), and otherwise leaves silver to [`refresh_silver`].
pub struct SilverFromLoad {
    sender: mpsc::Sender<RecordBatch>,
    task: tokio::task::JoinHandle<Result<(Option<ParallelDaily>, u64)>>,
}

impl SilverFromLoad {
    /// Starts the builders, or `None` when `pos_events` exists already.
    pub async fn start(lake: &Lake) -> Result<Option<Self>> {
        if lake.open(POS_EVENTS.name).await?.is_some() {
            return Ok(None);
        }
        let (sender, mut receiver) = mpsc::channel::<RecordBatch>(LOAD_QUEUED_BATCHES);
        let task = tokio::spawn(async move {
            let mut builder = Some(ParallelDaily::per_core(DailyBuilder::new));
            let mut rows = 0_u64;
            while let Some(batch) = receiver.recv().await {
                rows += batch.num_rows() as u64;
                if rows > LOAD_EVENTS_LIMIT {
                    // Too large to hold: a refresh reads bronze in passes instead.
                    builder = None;
                }
                if let Some(builder) = &mut builder {
                    builder.push(batch).await?;
                }
            }
            Ok((builder, rows))
        });
        Ok(Some(SilverFromLoad { sender, task }))
    }

    /// Where the load sends each `pos_events` batch once committed
    /// (`BackfillOptions::committed_rows`).
    pub fn sender(&self) -> mpsc::Sender<RecordBatch> {
        self.sender.clone()
    }

    /// Builds and commits both silver tables from the rows received, once every sender
    /// is dropped; `None` when it cannot (bronze holds rows it was not given, silver was
    /// written meanwhile, or the load was too large): then run [`refresh_silver`].
    pub async fn finish(
        self,
        lake: &Lake,
        settings: &SilverSettings,
    ) -> Result<Option<SilverReport>> {
        drop(self.sender);
        // A builder that failed costs only the shortcut: the refresh reads bronze.
        let (builder, rows) = match self.task.await {
            Ok(Ok(built)) => built,
            Ok(Err(error)) => {
                tracing::warn!(%error, "building silver beside the load failed; refreshing it from bronze");
                return Ok(None);
            }
            Err(error) => {
                tracing::warn!(%error, "the silver builder beside the load stopped; refreshing it from bronze");
                return Ok(None);
            }
        };
        let Some(builder) = builder else {
            return Ok(None);
        };
        let Some(bronze) = lake.open(POS_EVENTS.name).await? else {
            return Ok(None);
        };
        let Some(version) = bronze.version().map(|v| v as i64) else {
            return Ok(None);
        };
        let in_bronze: u64 = bronze
            .snapshot()
            .map_err(streetflow_lake::Error::delta(POS_EVENTS.name, "list files"))?
            .log_data()
            .iter()
            .map(|file| file.num_records().unwrap_or(usize::MAX) as u64)
            .fold(0_u64, u64::saturating_add);
        if in_bronze != rows || builder.rows() != rows {
            tracing::info!(
                in_bronze,
                received = rows,
                "bronze holds rows the load did not send: silver is refreshed from bronze"
            );
            return Ok(None);
        }
        let Some(mut build) =
            FirstBuild::start(lake, false, version, settings, chrono::Utc::now()).await?
        else {
            return Ok(None);
        };
        build.add(builder, settings).await?;
        let report = build.commit(version).await?;
        // Another writer built silver meanwhile (a worker's refresh, `aggregate`): what
        // it recorded need not hold this load, so the refresh brings it up to date.
        if report.fenced || report.history.fenced {
            tracing::info!("silver was written meanwhile; refreshing it from bronze");
            return Ok(None);
        }
        Ok(Some(report))
    }
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
                collect(&ctx, &sql::touched_partitions(), "touched partitions").await?
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
