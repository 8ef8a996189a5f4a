//! `merchant_daily_history` (bitemporal silver): kept equal to every version of every
//! daily row that bronze gives, up to the lake's settled knowledge.
//!
//! The table records, in Delta `txn` actions, the bronze version it reflects
//! ([`BRONZE_APP_ID`]) and its horizon ([`HORIZON_APP_ID`], µs UTC): every version known
//! by the horizon is in the table, and none after it. A refresh moves the horizon to
//! "now − the settle time" ([`KnowledgeRules`]): by then every bronze row stamped at or
//! before it is visible, so the versions up to it are final.
//!
//! - Versions between the old and the new horizon come from the days that events known
//!   in between touch, and from the days that ended in between: their rows are computed
//!   over every event they depend on and only the new versions are appended.
//! - Rows new to bronze but stamped at or before the old horizon (a backfill that asserts
//!   past knowledge) change versions already written: the table is then rebuilt from all
//!   of bronze, so it stays exactly what a rebuild would give.
//!
//! The commit carries both `txn` versions and is fenced on them, so a refresh that lost a
//! race or repeats one writes nothing, and a crash anywhere is repaired by the next one.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Days, NaiveDate, Utc};
use streetflow_core::tables::{MERCHANT_DAILY_HISTORY, POS_EVENTS};
use streetflow_core::{KnowledgeRules, OperatorCalendars};
use streetflow_lake::arrow::array::{Array, AsArray, RecordBatch};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::{DataType, Date32Type, Field, Schema};
use streetflow_lake::datafusion::prelude::SessionContext;
use streetflow_lake::freeze::{self, points};
use streetflow_lake::{AppProgress, CommitOutcome, Lake, OffsetWriter, data_changes};

use crate::daily::{DailyBuilder, HistorySpec};
use crate::daily_parallel::ParallelDaily;
use crate::error::{Error, Result, collect};
use crate::gold::days;
use crate::relations::{broadcast_small_join_sides, mem_table};
use crate::silver::{BRONZE_APP_ID, SilverMode};
use crate::sql;

/// The Delta `txn` application id under which the history records its horizon (µs UTC).
pub const HORIZON_APP_ID: &str = "horizon";

/// Observed bronze rows that became visible only after their knowledge time had settled.
const KNOWLEDGE_VIOLATIONS: &str = "streetflow_silver_late_observed_rows_total";

/// What the history needs besides the lake: the operators' calendars (when a business
/// day ends) and the knowledge rules (how far back knowledge is settled).
#[derive(Debug, Clone, Default)]
pub struct SilverSettings {
    /// Business calendars of the operators.
    pub calendars: OperatorCalendars,
    /// When knowledge is settled.
    pub knowledge: KnowledgeRules,
}

impl SilverSettings {
    /// The settings of a pipeline file: its operators' calendars and knowledge rules.
    pub fn of(
        config: &streetflow_core::PipelineConfig,
    ) -> std::result::Result<Self, streetflow_core::CalendarError> {
        Ok(Self {
            calendars: config.calendars()?,
            knowledge: config.knowledge_rules(),
        })
    }
}

/// What a history refresh did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryReport {
    /// Horizon before (µs UTC).
    pub previous_horizon: Option<i64>,
    /// Horizon now (µs UTC).
    pub horizon: Option<i64>,
    /// (operator, business date) days whose versions were computed.
    pub days_computed: usize,
    /// Versions written.
    pub versions_written: usize,
    /// Rebuilt from all of bronze (first run, `--full`, or past knowledge arrived).
    pub rebuilt: bool,
    /// Another process refreshed the history first; nothing was written.
    pub fenced: bool,
}

/// The end of business day `date` (days since 1970-01-01) of an operator, µs UTC.
pub(crate) fn day_end(calendars: &OperatorCalendars, operator: &str, date: i32) -> i64 {
    let next = NaiveDate::default()
        .checked_add_signed(chrono::Duration::days(i64::from(date) + 1))
        .unwrap_or(NaiveDate::MAX);
    calendars
        .for_operator(operator)
        .day_start(next)
        .timestamp_micros()
}

fn timestamp_literal(micros: i64) -> String {
    let at = DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or_default();
    format!(
        "TIMESTAMP '{}'",
        at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
}

/// (operator, date) pairs of batches whose first two columns are those.
fn day_pairs(batches: &[RecordBatch]) -> Result<BTreeSet<(String, i32)>> {
    let mut pairs = BTreeSet::new();
    for batch in batches {
        let operators = cast(batch.column(0), &DataType::Utf8).map_err(|source| Error::Arrow {
            context: "reading touched days".to_owned(),
            source,
        })?;
        let operators = operators.as_string::<i32>();
        let dates = batch.column(1).as_primitive::<Date32Type>();
        for row in 0..batch.num_rows() {
            if operators.is_valid(row) && dates.is_valid(row) {
                pairs.insert((operators.value(row).to_owned(), dates.value(row)));
            }
        }
    }
    Ok(pairs)
}

fn days_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("operator_id", DataType::Utf8, false),
        Field::new("business_date", DataType::Date32, false),
    ]))
}

/// The operators bronze holds.
pub(crate) async fn operators(ctx: &SessionContext) -> Result<Vec<String>> {
    Ok(operator_events(ctx)
        .await?
        .into_iter()
        .map(|(operator, _)| operator)
        .collect())
}

/// Each operator of bronze with its number of rows, by name.
async fn operator_events(ctx: &SessionContext) -> Result<Vec<(String, i64)>> {
    let batches = collect(
        ctx,
        "SELECT operator_id, count(*) FROM pos_events GROUP BY operator_id ORDER BY operator_id",
        "operators",
    )
    .await?;
    let mut found = Vec::new();
    for batch in &batches {
        let column = cast(batch.column(0), &DataType::Utf8).map_err(|source| Error::Arrow {
            context: "reading operators".to_owned(),
            source,
        })?;
        let counts = batch
            .column(1)
            .as_primitive::<streetflow_lake::arrow::datatypes::Int64Type>();
        for (row, name) in column.as_string::<i32>().iter().enumerate() {
            if let Some(name) = name {
                found.push((name.to_owned(), counts.value(row)));
            }
        }
    }
    Ok(found)
}

/// Bronze rows one rebuild pass resolves at most (the builders hold about 190 bytes an
/// event, so about 4 GB), unless one operator alone has more.
const EVENTS_PER_PASS: i64 = 20_000_000;

/// The relations (over `pos_events`) a rebuild reads, one pass each: groups of whole
/// operators (event keys never cross operators) of at most [`EVENTS_PER_PASS`] rows.
/// Few passes matter: a month file holds every operator's rows, so a pass per operator
/// would read all of bronze once per operator.
pub(crate) async fn rebuild_passes(ctx: &SessionContext) -> Result<Vec<String>> {
    let mut groups: Vec<(Vec<String>, i64)> = Vec::new();
    for (operator, events) in operator_events(ctx).await? {
        match groups.last_mut() {
            Some((names, total)) if *total + events <= EVENTS_PER_PASS => {
                names.push(operator);
                *total += events;
            }
            _ => groups.push((vec![operator], events)),
        }
    }
    if groups.len() <= 1 {
        return Ok(vec!["pos_events".to_owned()]);
    }
    Ok(groups
        .into_iter()
        .map(|(names, _)| {
            let list: Vec<String> = names.iter().map(|n| crate::gold::sql_literal(n)).collect();
            format!(
                "(SELECT * FROM pos_events WHERE operator_id IN ({}))",
                list.join(", ")
            )
        })
        .collect())
}

/// The business days of `operator` that end in (`after`, `until`] (µs UTC).
fn days_ending(calendars: &OperatorCalendars, operator: &str, after: i64, until: i64) -> Vec<i32> {
    let to_date = |micros: i64| {
        DateTime::<Utc>::from_timestamp_micros(micros)
            .map(|at| calendars.for_operator(operator).business_date(&at))
    };
    let (Some(first), Some(last)) = (to_date(after), to_date(until)) else {
        return Vec::new();
    };
    // The day an instant falls on ends after it; the days before it ended at or before.
    let mut days_found = Vec::new();
    let mut date = first - Days::new(1);
    while date <= last {
        let day = days(date);
        let end = day_end(calendars, operator, day);
        if end > after && end <= until {
            days_found.push(day);
        }
        date = date + Days::new(1);
    }
    days_found
}

/// Writes `rows` to `writer` (unstaged); returns how many.
pub(crate) async fn write_all(history: &mut OffsetWriter, rows: Vec<RecordBatch>) -> Result<usize> {
    let mut written = 0;
    for batch in rows {
        if batch.num_rows() > 0 {
            written += batch.num_rows();
            history.write(batch).await?;
        }
    }
    Ok(written)
}

/// Brings `merchant_daily_history` up to the newest bronze version and the knowledge
/// settled by `now`.
pub async fn refresh_history(
    lake: &Lake,
    mode: SilverMode,
    settings: &SilverSettings,
    now: DateTime<Utc>,
) -> Result<HistoryReport> {
    let Some(bronze) = lake.open(POS_EVENTS.name).await? else {
        return Ok(HistoryReport::default());
    };
    let Some(version) = bronze.version().map(|v| v as i64) else {
        return Ok(HistoryReport::default());
    };
    let horizon = (now - settings.knowledge.settle()).timestamp_micros();
    let mut history = OffsetWriter::new(lake, &MERCHANT_DAILY_HISTORY, "history").await?;
    let previous_version = history.app_version(BRONZE_APP_ID).await?;
    let previous_horizon = history.app_version(HORIZON_APP_ID).await?;
    let mut report = HistoryReport {
        previous_horizon,
        horizon: Some(horizon.max(previous_horizon.unwrap_or(i64::MIN))),
        ..HistoryReport::default()
    };
    if mode == SilverMode::Incremental
        && previous_version == Some(version)
        && previous_horizon.is_some_and(|h| h >= horizon)
    {
        return Ok(report);
    }
    // Bronze as of the version the history will record, whatever commits land meanwhile.
    let ctx = lake.pinned_session(POS_EVENTS.name, &bronze).await?;
    let calendars = &settings.calendars;

    // Days to compute, and whether past versions changed (a rebuild).
    let touched: Option<BTreeSet<(String, i32)>> = match (mode, previous_version, previous_horizon)
    {
        (SilverMode::Incremental, Some(previous_version), Some(previous_horizon)) => {
            if horizon < previous_horizon {
                // A clock behind the last refresh's: nothing can be settled beyond it.
                return Ok(report);
            }
            // New rows are what commits since the recorded version added as data; a
            // compaction's rewritten files are not new rows.
            let changes = if previous_version <= version {
                data_changes(&bronze, previous_version as u64, version as u64).await?
            } else {
                None
            };
            let added = match changes {
                Some(changes) if changes.appends_only() => Some(changes.added),
                _ => None,
            };
            let past_knowledge = match added {
                // Bronze lost rows, a compaction rewrote new rows, or the log is gone:
                // nothing to diff against.
                None => true,
                Some(added) if added.is_empty() => false,
                Some(added) => {
                    let new_rows = bronze
                    .table_provider()
                    .with_file_selection(
                        streetflow_lake::deltalake::delta_datafusion::FileSelection::from_file_paths(
                            added,
                        ),
                    )
                    .await
                    .map_err(Error::query("selecting new bronze files"))?;
                    ctx.register_table("new_rows", new_rows)
                        .map_err(Error::query("registering new bronze files"))?;
                    let past = collect(
                        &ctx,
                        &format!(
                            "SELECT count(*), count(*) FILTER (WHERE knowledge_source = 'observed') \
                             FROM new_rows WHERE knowledge_time <= {}",
                            timestamp_literal(previous_horizon)
                        ),
                        "rows with past knowledge",
                    )
                    .await?;
                    let count = |column: usize| {
                        past.first()
                            .and_then(|b| {
                                b.column(column)
                                    .as_primitive_opt::<streetflow_lake::arrow::datatypes::Int64Type>()
                            })
                            .map_or(0, |c| c.value(0))
                    };
                    if count(1) > 0 {
                        // A writer's commit became visible after the knowledge time it
                        // stamped had settled: vectors already read as of it change.
                        metrics::counter!(KNOWLEDGE_VIOLATIONS).increment(count(1) as u64);
                        tracing::error!(
                            rows = count(1),
                            horizon = %timestamp_literal(previous_horizon),
                            "observed rows reached bronze after their knowledge time had \
                             settled (a commit missed its deadline): rebuilding the history, \
                             so vectors read as of the settled past change; raise \
                             knowledge.settle_ms"
                        );
                    }
                    count(0) > 0
                }
            };
            if past_knowledge {
                None
            } else {
                let known_between = format!(
                    "SELECT operator_id, event_id FROM pos_events WHERE knowledge_time > {} AND knowledge_time <= {}",
                    timestamp_literal(previous_horizon),
                    timestamp_literal(horizon)
                );
                broadcast_small_join_sides(&ctx);
                let mut days_found = day_pairs(
                    &collect(
                        &ctx,
                        &sql::related_days(&known_between),
                        "days known events touch",
                    )
                    .await?,
                )?;
                for operator in operators(&ctx).await? {
                    for day in days_ending(calendars, &operator, previous_horizon, horizon) {
                        days_found.insert((operator.clone(), day));
                    }
                }
                Some(days_found)
            }
        }
        _ => None,
    };
    report.rebuilt = touched.is_none();

    report.days_computed = touched.as_ref().map_or(0, BTreeSet::len);
    let keep_days: Option<HashSet<(String, i32)>> =
        touched.as_ref().map(|d| d.iter().cloned().collect());
    let keep = |operator: &str, date: i32| {
        keep_days
            .as_ref()
            .is_none_or(|days| days.contains(&(operator.to_owned(), date)))
    };
    let end_of = |operator: &str, date: i32| day_end(calendars, operator, date);
    let spec = HistorySpec {
        after: if report.rebuilt {
            None
        } else {
            previous_horizon
        },
        horizon: report.horizon.unwrap_or(horizon),
        day_end: &end_of,
        keep: &keep,
    };
    match &touched {
        Some(days_touched) if days_touched.is_empty() => {}
        Some(days_touched) => {
            let (mut operator_column, mut date_column) = (
                streetflow_lake::arrow::array::StringBuilder::new(),
                streetflow_lake::arrow::array::Date32Builder::new(),
            );
            for (operator, date) in days_touched {
                operator_column.append_value(operator);
                date_column.append_value(*date);
            }
            let batch = RecordBatch::try_new(
                days_schema(),
                vec![
                    Arc::new(operator_column.finish()),
                    Arc::new(date_column.finish()),
                ],
            )
            .map_err(|source| Error::Arrow {
                context: "touched days".to_owned(),
                source,
            })?;
            mem_table(&ctx, "touched", days_schema(), vec![batch])?;
            broadcast_small_join_sides(&ctx);
            let mut builder = ParallelDaily::per_core(DailyBuilder::new);
            builder
                .push_scan(&ctx, &format!("({})", sql::EVENTS_OF_DAYS))
                .await?;
            report.versions_written +=
                write_all(&mut history, builder.finish_history(&spec)?).await?;
        }
        // A rebuild resolves whole operators, as many per pass as memory allows.
        None => {
            for relation in rebuild_passes(&ctx).await? {
                let mut builder = ParallelDaily::per_core(DailyBuilder::new);
                builder.push_scan(&ctx, &relation).await?;
                report.versions_written +=
                    write_all(&mut history, builder.finish_history(&spec)?).await?;
            }
        }
    }
    let staged = history.stage().await?;
    freeze::point(points::HISTORY_FILES);
    let progress = [
        AppProgress {
            app_id: BRONZE_APP_ID.to_owned(),
            expected: previous_version,
            version,
        },
        AppProgress {
            app_id: HORIZON_APP_ID.to_owned(),
            expected: previous_horizon,
            version: spec.horizon,
        },
    ];
    let outcome = if report.rebuilt {
        history.replace_partitions(&staged, None, &progress).await?
    } else {
        history.commit_appended(&staged, &progress).await?
    };
    match outcome {
        CommitOutcome::Committed { .. } => freeze::point(points::HISTORY_COMMIT),
        CommitOutcome::Fenced { .. } => {
            history.discard();
            report.fenced = true;
        }
    }
    Ok(report)
}
