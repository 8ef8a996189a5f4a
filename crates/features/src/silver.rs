//! `merchant_daily` (silver): kept equal to the daily definition over all of bronze.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::NaiveDate;
use streetflow_core::tables::{MERCHANT_DAILY, POS_EVENTS};
use streetflow_lake::arrow::array::{Array, AsArray, RecordBatch};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::{DataType, Date32Type};
use streetflow_lake::datafusion::datasource::MemTable;
use streetflow_lake::{AppProgress, CommitOutcome, Lake, OffsetWriter};

use crate::error::{Error, Result, collect};
use crate::relations::{broadcast_small_join_sides, materialize, register_resolved, register_view};
use crate::serving::file_paths;
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
}

/// Partition keys (operator, `YYYY-MM-DD`) of batches with those two columns first.
fn partition_keys(batches: &[RecordBatch]) -> Result<HashSet<Vec<String>>> {
    let mut keys = HashSet::new();
    for batch in batches {
        let operators = cast(batch.column(0), &DataType::Utf8).map_err(|source| Error::Arrow {
            context: "reading touched operators".to_owned(),
            source,
        })?;
        let operators = operators.as_string::<i32>();
        let dates = batch.column(1).as_primitive::<Date32Type>();
        for i in 0..batch.num_rows() {
            let date = NaiveDate::from_epoch_days(dates.value(i)).unwrap_or_default();
            keys.insert(vec![
                operators.value(i).to_owned(),
                date.format("%Y-%m-%d").to_string(),
            ]);
        }
    }
    Ok(keys)
}

/// Gives daily rows the exact column types and order of `merchant_daily`.
fn conform(batch: &RecordBatch) -> Result<RecordBatch> {
    let schema = MERCHANT_DAILY.schema.clone();
    let columns = schema
        .fields()
        .iter()
        .map(|field| {
            let column = batch
                .column_by_name(field.name())
                .ok_or_else(|| Error::Arrow {
                    context: format!("daily.sql has no column {}", field.name()),
                    source: streetflow_lake::arrow::error::ArrowError::SchemaError(
                        field.name().clone(),
                    ),
                })?;
            if column.data_type() == field.data_type() {
                Ok(column.clone())
            } else {
                cast(column, field.data_type()).map_err(|source| Error::Arrow {
                    context: format!("casting {}", field.name()),
                    source,
                })
            }
        })
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new(schema, columns).map_err(|source| Error::Arrow {
        context: "building merchant_daily rows".to_owned(),
        source,
    })
}

/// Brings `merchant_daily` up to the newest `pos_events` version.
pub async fn refresh_silver(lake: &Lake, mode: SilverMode) -> Result<SilverReport> {
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

    let ctx = lake.session().await?;
    let touched = match (mode, previous) {
        (SilverMode::Incremental, Some(previous)) => {
            let mut before = lake.open(POS_EVENTS.name).await?.ok_or_else(|| {
                streetflow_lake::Error::BadLocation {
                    location: POS_EVENTS.name.to_owned(),
                    reason: "bronze disappeared".to_owned(),
                }
            })?;
            before.load_version(previous as u64).await.map_err(|e| {
                streetflow_lake::Error::delta(POS_EVENTS.name, "load older version")(e)
            })?;
            let old = file_paths(&before)?;
            let added: Vec<String> = file_paths(&bronze)?
                .into_iter()
                .filter(|p| !old.contains(p))
                .collect();
            report.new_bronze_files = added.len();
            let touched = if added.is_empty() {
                Vec::new()
            } else {
                let new_events = bronze
                    .table_provider()
                    .with_file_selection(streetflow_lake::deltalake::delta_datafusion::FileSelection::from_file_paths(added))
                    .await
                    .map_err(Error::query("selecting new bronze files"))?;
                ctx.register_table("new_events", new_events)
                    .map_err(Error::query("registering new bronze files"))?;
                collect(&ctx, sql::TOUCHED_PARTITIONS, "touched partitions").await?
            };
            Some(touched)
        }
        _ => None,
    };

    let events_query = match &touched {
        Some(batches) => {
            let schema = batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| Arc::new(touched_schema()));
            let table = MemTable::try_new(schema, vec![batches.clone()])
                .map_err(Error::query("registering touched partitions"))?;
            ctx.register_table("touched", Arc::new(table))
                .map_err(Error::query("registering touched partitions"))?;
            sql::EVENTS_FOR_TOUCHED
        }
        None => "SELECT * FROM pos_events",
    };
    broadcast_small_join_sides(&ctx);
    match &touched {
        // The touched partitions' rows are few and read several times: keep them in memory.
        Some(_) => materialize(&ctx, "events", events_query).await?,
        // All of bronze may not fit: stream it (each step scans it again).
        None => register_view(&ctx, "events", events_query).await?,
    }
    register_resolved(&ctx).await?;
    let daily_query = match &touched {
        Some(_) => format!(
            "SELECT d.* FROM ({}) d JOIN touched t ON d.operator_id = t.operator_id AND d.business_date = t.business_date",
            sql::DAILY
        ),
        None => sql::DAILY.to_owned(),
    };
    let daily = collect(&ctx, &daily_query, "daily.sql").await?;

    for batch in &daily {
        if batch.num_rows() > 0 {
            report.rows_written += batch.num_rows();
            silver.write(conform(batch)?).await?;
        }
    }
    let staged = silver.stage().await?;
    let partitions = match &touched {
        Some(batches) => Some(partition_keys(batches)?),
        None => None,
    };
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
