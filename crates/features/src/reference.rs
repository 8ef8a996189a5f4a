//! The feature definitions as SQL over raw events: the reference the one
//! implementation ([`crate::vector`]) is checked against.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{Days, NaiveDate};
use streetflow_core::tables::{MERCHANT_DAILY, MERCHANT_FEATURES, POS_EVENTS};
use streetflow_lake::Lake;
use streetflow_lake::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::daily::{DailyBuilder, PayerWindow, payer_sales_schema};
use crate::daily_parallel::ParallelDaily;
use crate::error::{Error, Result, collect};
use crate::gold::{
    AsOf, FEATURE_SET, FeatureInputs, FeatureReport, PAYER_WINDOW_DAYS, arrow_error, days,
    events_view, reference_tables, sql_literal,
};
use crate::relations::{explain_if_asked, log_computed, mem_table};
use crate::sql;

/// SQL of the `feed_days` relation of one operator as of `date`, straight from bronze:
/// the business days before `date` with a sale or refund of the operator's known by its
/// knowledge time. Equal to `feed_days.sql` over that operator's `daily` rows (a sale,
/// voided or not, and a refund each leave a daily row on their own date).
pub(crate) fn operator_feed_days_sql(date: NaiveDate, operator_id: &str) -> String {
    format!(
        "SELECT DISTINCT operator_id, business_date \
         FROM ({} AND e.operator_id = {}) events \
         WHERE kind IN ('sale', 'refund') AND business_date < DATE '{date}'",
        events_view(date),
        sql_literal(operator_id)
    )
}

/// The schema of the `feed_days` relation `merchant_features.sql` reads.
pub(crate) fn feed_days_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("operator_id", DataType::Utf8, true),
        Field::new("business_date", DataType::Date32, true),
    ]))
}

/// Column `field` of `batch` (by name), cast to the field's type when it has another.
fn column_as(batch: &RecordBatch, field: &Field, relation: &str) -> Result<ArrayRef> {
    let name = field.name();
    let column = batch.column_by_name(name).ok_or_else(|| Error::Arrow {
        context: format!("{relation} has no column {name}"),
        source: streetflow_lake::arrow::error::ArrowError::SchemaError(name.to_owned()),
    })?;
    if column.data_type() == field.data_type() {
        Ok(column.clone())
    } else {
        cast(column, field.data_type()).map_err(arrow_error(name))
    }
}

/// `batch` with the columns of `schema`, by name, cast to its types.
fn conform(batch: &RecordBatch, schema: &SchemaRef, relation: &str) -> Result<RecordBatch> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| column_as(batch, field, relation))
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(arrow_error(relation))
}

/// `merchant_features.sql` over the events the lake knew at each operator's knowledge
/// time, resolved by [`DailyBuilder`] (held to the SQL resolution by its tests): the
/// definition stated in SQL over raw events. Not a production path: it reads every
/// bronze event of the 456-day lookback. The tests hold the history-based vectors
/// ([`crate::compute_features`], `serve`) to it, and `streetflow bench features` runs
/// the same SQL in DuckDB.
pub async fn reference_features(
    lake: &Lake,
    as_of: &AsOf,
    inputs: &FeatureInputs,
    merchant: Option<(&str, &str)>,
) -> Result<(Vec<RecordBatch>, FeatureReport)> {
    let d = as_of.date;
    let mut report = FeatureReport {
        as_of_date: d,
        rows: 0,
        bronze_version: -1,
        knowledge_times: BTreeMap::new(),
    };
    let Some(table) = lake.open(POS_EVENTS.name).await? else {
        return Ok((Vec::new(), report));
    };
    report.bronze_version = table.version().map_or(-1, |v| v as i64);
    let ctx = lake.session().await?;

    let mut operators = Vec::new();
    if let Some((operator, _)) = merchant {
        operators.push(operator.to_owned());
    } else {
        let operator_batches = collect(
            &ctx,
            "SELECT DISTINCT operator_id FROM pos_events",
            "operators",
        )
        .await?;
        for batch in &operator_batches {
            let column =
                cast(batch.column(0), &DataType::Utf8).map_err(arrow_error("operators"))?;
            let names: &StringArray = column.as_string::<i32>();
            operators.extend(names.iter().flatten().map(str::to_owned));
        }
    }
    // One merchant: its registry entries only (the feature query keeps registry merchants
    // without events, which would bring in the rest of the district).
    let scoped_inputs;
    let inputs = match merchant {
        Some((operator, merchant)) => {
            scoped_inputs = FeatureInputs {
                calendars: inputs.calendars.clone(),
                knowledge: inputs.knowledge,
                registry: inputs
                    .registry
                    .iter()
                    .filter(|r| r.operator_id == operator && r.merchant_id == merchant)
                    .cloned()
                    .collect(),
            };
            &scoped_inputs
        }
        None => inputs,
    };
    let reference = reference_tables(as_of, inputs, &operators)?;
    report.knowledge_times = reference.knowledge_times;
    for (name, batch) in reference.tables {
        mem_table(&ctx, name, batch.schema(), vec![batch])?;
    }
    let mut events = events_view(d);
    if let Some((operator, merchant)) = merchant {
        events.push_str(&format!(
            " AND e.operator_id = {} AND e.merchant_id = {}",
            sql_literal(operator),
            sql_literal(merchant)
        ));
    }
    // One pass over the knowable events: `daily` and `payer_sales` as `daily.sql` and
    // `payer_sales.sql` define them over the resolution steps (the builder's tests hold
    // the two equal), without running the resolution's joins over a year of events.
    let started = std::time::Instant::now();
    let window = PayerWindow {
        from: days(d - Days::new(PAYER_WINDOW_DAYS)),
        until: days(d),
    };
    let make = || DailyBuilder::with_payer_window(window);
    let mut builder = match merchant {
        // One merchant's few thousand rows: one operator, one thread.
        Some(_) => ParallelDaily::new(1, make),
        None => ParallelDaily::per_core(make),
    };
    builder.push_scan(&ctx, &format!("({events})")).await?;
    let before = days(d);
    let (daily, payer_sales) = builder.finish_with_payer_sales(|_, date| date < before)?;
    log_computed("daily", &daily, started);
    mem_table(&ctx, "daily", MERCHANT_DAILY.schema.clone(), daily)?;
    mem_table(&ctx, "payer_sales", payer_sales_schema(), payer_sales)?;
    // The operator's feed days come from all of its merchants; one merchant's `daily`
    // rows do not have them, so that path reads the operator's sales and refunds.
    let feed_query = match merchant {
        None => sql::FEED_DAYS.to_owned(),
        Some((operator, _)) => operator_feed_days_sql(d, operator),
    };
    let feed_days = collect(&ctx, &feed_query, "feed_days.sql")
        .await?
        .iter()
        .map(|batch| conform(batch, &feed_days_schema(), "feed_days"))
        .collect::<Result<Vec<_>>>()?;
    mem_table(&ctx, "feed_days", feed_days_schema(), feed_days)?;
    explain_if_asked(&ctx, "merchant_features", sql::MERCHANT_FEATURES).await?;
    let started = std::time::Instant::now();
    let features = collect(&ctx, sql::MERCHANT_FEATURES, "merchant_features.sql").await?;
    log_computed("merchant_features", &features, started);
    let mut batches = Vec::with_capacity(features.len());
    for batch in &features {
        if batch.num_rows() > 0 {
            report.rows += batch.num_rows();
            let batch = conform_features(batch, report.bronze_version)?;
            batches.push(match merchant {
                Some(_) => without_peer_percentile(&batch)?,
                None => batch,
            });
        }
    }
    Ok((batches, report))
}

/// `batch` with `peer_pct_net_90d` set to null (computed without the peers).
pub(crate) fn without_peer_percentile(batch: &RecordBatch) -> Result<RecordBatch> {
    let schema = batch.schema();
    let mut columns = batch.columns().to_vec();
    if let Ok(index) = schema.index_of("peer_pct_net_90d") {
        columns[index] = streetflow_lake::arrow::array::new_null_array(
            schema.field(index).data_type(),
            batch.num_rows(),
        );
    }
    RecordBatch::try_new(schema, columns).map_err(arrow_error("peer percentile"))
}

/// Orders and types feature rows as `merchant_features`, adding the constant columns.
pub(crate) fn conform_features(batch: &RecordBatch, bronze_version: i64) -> Result<RecordBatch> {
    let rows = batch.num_rows();
    let schema = MERCHANT_FEATURES.schema.clone();
    let mut columns = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column: ArrayRef = match field.name().as_str() {
            "feature_set" => Arc::new(StringArray::from(vec![FEATURE_SET; rows])),
            "bronze_version" => Arc::new(streetflow_lake::arrow::array::Int64Array::from(
                vec![bronze_version; rows],
            )),
            _ => column_as(batch, field, "merchant_features.sql")?,
        };
        columns.push(column);
    }
    RecordBatch::try_new(schema, columns).map_err(arrow_error("merchant_features rows"))
}
