//! `merchant_features` (gold): point-in-time features as of a date.
//!
//! For as-of date D the job reads only bronze rows ingested by the knowledge time (by
//! default the start of business day D in each operator's calendar) with business dates
//! from D − 456 days. From them it builds the daily rows of `daily.sql` (dates before D)
//! and the 90-day payer table of `payer_sales.sql` in one pass ([`DailyBuilder`], equal
//! to those SQL definitions over the resolution steps), and applies
//! `merchant_features.sql` on DataFusion. A late event
//! that arrived after the knowledge time therefore never changes a vector already
//! computed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Days, NaiveDate, Utc};
use streetflow_core::tables::{MERCHANT_DAILY, MERCHANT_FEATURES, POS_EVENTS};
use streetflow_core::{MerchantRecord, OperatorCalendars};
use streetflow_lake::arrow::array::{
    Array, ArrayRef, AsArray, Date32Builder, Int64Builder, RecordBatch, StringArray, StringBuilder,
    TimestampMicrosecondBuilder,
};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use streetflow_lake::{Lake, OffsetWriter};

use crate::daily::{DailyBuilder, PayerWindow, payer_sales_schema};
use crate::daily_parallel::ParallelDaily;
use crate::error::{Error, Result, collect};
use crate::relations::{explain_if_asked, log_computed, mem_table};
use crate::sql;

/// Name of the feature set these definitions produce.
pub const FEATURE_SET: &str = "v1";

/// Days of sales the payer features look at (`payer_sales.sql`).
pub(crate) const PAYER_WINDOW_DAYS: u64 = 90;

/// Days of history a feature vector can look back (365-day window plus the 90 days of
/// last year's comparison window, and a day of margin).
pub const LOOKBACK_DAYS: u64 = 456;

/// What to compute features as of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsOf {
    /// Windows end the day before this business date.
    pub date: NaiveDate,
    /// Events ingested after this are ignored; `None`: the start of `date` in each
    /// operator's business calendar.
    pub knowledge_time: Option<DateTime<Utc>>,
}

/// Reference data the features use besides bronze.
#[derive(Debug, Clone, Default)]
pub struct FeatureInputs {
    /// Business calendars of the operators.
    pub calendars: OperatorCalendars,
    /// Merchant registry versions (all of them; the job picks those valid on D − 1).
    pub registry: Vec<MerchantRecord>,
}

/// What a features run wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureReport {
    /// As-of date.
    pub as_of_date: NaiveDate,
    /// Feature rows (merchants).
    pub rows: usize,
    /// Bronze version the features were computed from.
    pub bronze_version: i64,
    /// Knowledge time used per operator.
    pub knowledge_times: BTreeMap<String, DateTime<Utc>>,
}

pub(crate) fn arrow_error(
    context: &str,
) -> impl FnOnce(streetflow_lake::arrow::error::ArrowError) -> Error + '_ {
    move |source| Error::Arrow {
        context: context.to_owned(),
        source,
    }
}

pub(crate) fn days(date: NaiveDate) -> i32 {
    date.signed_duration_since(NaiveDate::default()).num_days() as i32
}

fn utc_micros_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The registry versions valid on `day`, as a table.
fn registry_batch(registry: &[MerchantRecord], day: NaiveDate) -> Result<(SchemaRef, RecordBatch)> {
    let current = streetflow_core::registry::versions_on(registry, day);
    let schema = Arc::new(Schema::new(vec![
        Field::new("operator_id", DataType::Utf8, false),
        Field::new("merchant_id", DataType::Utf8, false),
        Field::new("mcc", DataType::Utf8, true),
        Field::new("industry_code", DataType::Utf8, true),
        Field::new("opened_on", DataType::Date32, true),
        Field::new("monthly_rent_fen", DataType::Int64, true),
    ]));
    let (mut op, mut merchant, mut mcc, mut industry) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut opened, mut rent) = (Date32Builder::new(), Int64Builder::new());
    for record in current.values() {
        op.append_value(&record.operator_id);
        merchant.append_value(&record.merchant_id);
        mcc.append_value(&record.mcc);
        industry.append_option(record.industry_code.as_deref());
        opened.append_value(days(record.opened_on));
        rent.append_option(record.monthly_rent_fen);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(op.finish()),
        Arc::new(merchant.finish()),
        Arc::new(mcc.finish()),
        Arc::new(industry.finish()),
        Arc::new(opened.finish()),
        Arc::new(rent.finish()),
    ];
    let batch =
        RecordBatch::try_new(schema.clone(), columns).map_err(arrow_error("registry table"))?;
    Ok((schema, batch))
}

/// The subsidy sector reference table shipped in `pipelines/reference/`.
fn subsidy_batch() -> Result<(SchemaRef, RecordBatch)> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("sector", DataType::Utf8, false),
        Field::new("mcc_from", DataType::Int64, false),
        Field::new("mcc_to", DataType::Int64, false),
        Field::new("effective_from", DataType::Date32, false),
        Field::new("effective_to", DataType::Date32, true),
    ]));
    let (mut sector, mut from, mut to) = (
        StringBuilder::new(),
        Int64Builder::new(),
        Int64Builder::new(),
    );
    let (mut start, mut end) = (Date32Builder::new(), Date32Builder::new());
    for (line_no, line) in sql::SUBSIDY_SECTORS.lines().enumerate().skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        let parsed = (|| {
            Some((
                cells.first()?,
                cells.get(1)?.parse::<i64>().ok()?,
                cells.get(2)?.parse::<i64>().ok()?,
                NaiveDate::parse_from_str(cells.get(3)?, "%Y-%m-%d").ok()?,
                cells
                    .get(4)
                    .and_then(|c| NaiveDate::parse_from_str(c, "%Y-%m-%d").ok()),
            ))
        })();
        let Some((name, lo, hi, effective_from, effective_to)) = parsed else {
            return Err(Error::Arrow {
                context: format!(
                    "pipelines/reference/subsidy_sectors.csv line {}",
                    line_no + 1
                ),
                source: streetflow_lake::arrow::error::ArrowError::ParseError(line.to_owned()),
            });
        };
        sector.append_value(name);
        from.append_value(lo);
        to.append_value(hi);
        start.append_value(days(effective_from));
        end.append_option(effective_to.map(days));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(sector.finish()),
        Arc::new(from.finish()),
        Arc::new(to.finish()),
        Arc::new(start.finish()),
        Arc::new(end.finish()),
    ];
    let batch =
        RecordBatch::try_new(schema.clone(), columns).map_err(arrow_error("subsidy sectors"))?;
    Ok((schema, batch))
}

/// The subsidy industry-prefix reference table shipped in `pipelines/reference/`.
fn subsidy_industry_batch() -> Result<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("sector", DataType::Utf8, false),
        Field::new("industry_prefix", DataType::Utf8, false),
        Field::new("effective_from", DataType::Date32, false),
        Field::new("effective_to", DataType::Date32, true),
    ]));
    let (mut sector, mut prefix) = (StringBuilder::new(), StringBuilder::new());
    let (mut start, mut end) = (Date32Builder::new(), Date32Builder::new());
    for (line_no, line) in sql::SUBSIDY_INDUSTRIES.lines().enumerate().skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        let parsed = (|| {
            let code = cells.get(1)?;
            code.chars().all(|c| c.is_ascii_digit()).then_some(())?;
            Some((
                cells.first()?,
                code,
                NaiveDate::parse_from_str(cells.get(2)?, "%Y-%m-%d").ok()?,
                cells
                    .get(3)
                    .and_then(|c| NaiveDate::parse_from_str(c, "%Y-%m-%d").ok()),
            ))
        })();
        let Some((name, code, effective_from, effective_to)) = parsed else {
            return Err(Error::Arrow {
                context: format!(
                    "pipelines/reference/subsidy_industries.csv line {}",
                    line_no + 1
                ),
                source: streetflow_lake::arrow::error::ArrowError::ParseError(line.to_owned()),
            });
        };
        sector.append_value(name);
        prefix.append_value(code);
        start.append_value(days(effective_from));
        end.append_option(effective_to.map(days));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(sector.finish()),
        Arc::new(prefix.finish()),
        Arc::new(start.finish()),
        Arc::new(end.finish()),
    ];
    RecordBatch::try_new(schema, columns).map_err(arrow_error("subsidy industries"))
}

/// The tables the feature SQL reads besides bronze, for one as-of date.
#[derive(Debug)]
pub struct ReferenceTables {
    /// `knowledge`, `calendar`, `params`, `registry`, `subsidy_sectors` and
    /// `subsidy_industries`, by name.
    pub tables: Vec<(&'static str, RecordBatch)>,
    /// The knowledge time of each operator.
    pub knowledge_times: BTreeMap<String, DateTime<Utc>>,
}

/// Builds the reference tables of `merchant_features.sql` for `as_of` and the operators
/// present in bronze. Shared by [`compute_features`] and the DuckDB comparison in
/// `streetflow bench features`, so both engines read the same inputs.
pub fn reference_tables(
    as_of: &AsOf,
    inputs: &FeatureInputs,
    operators: &[String],
) -> Result<ReferenceTables> {
    let d = as_of.date;
    let mut knowledge_times = BTreeMap::new();
    let (mut op, mut known) = (
        StringBuilder::new(),
        TimestampMicrosecondBuilder::new().with_timezone("UTC"),
    );
    for name in operators {
        let k = as_of
            .knowledge_time
            .unwrap_or_else(|| inputs.calendars.for_operator(name).day_start(d));
        knowledge_times.insert(name.clone(), k);
        op.append_value(name);
        known.append_value(k.timestamp_micros());
    }
    let knowledge_schema = Arc::new(Schema::new(vec![
        Field::new("operator_id", DataType::Utf8, false),
        Field::new("knowledge_time", utc_micros_type(), false),
    ]));
    let knowledge = RecordBatch::try_new(
        knowledge_schema,
        vec![Arc::new(op.finish()) as ArrayRef, Arc::new(known.finish())],
    )
    .map_err(arrow_error("knowledge table"))?;

    // The dense calendar and the as-of date.
    let (mut dates, mut before) = (Date32Builder::new(), Int64Builder::new());
    for n in 1..=LOOKBACK_DAYS {
        dates.append_value(days(d - Days::new(n)));
        before.append_value(n as i64);
    }
    let calendar_schema = Arc::new(Schema::new(vec![
        Field::new("business_date", DataType::Date32, false),
        Field::new("days_before", DataType::Int64, false),
    ]));
    let calendar = RecordBatch::try_new(
        calendar_schema,
        vec![
            Arc::new(dates.finish()) as ArrayRef,
            Arc::new(before.finish()),
        ],
    )
    .map_err(arrow_error("calendar"))?;
    let params_schema = Arc::new(Schema::new(vec![Field::new(
        "as_of_date",
        DataType::Date32,
        false,
    )]));
    let mut as_of_date = Date32Builder::new();
    as_of_date.append_value(days(d));
    let params = RecordBatch::try_new(
        params_schema,
        vec![Arc::new(as_of_date.finish()) as ArrayRef],
    )
    .map_err(arrow_error("params"))?;
    let (_, registry) = registry_batch(&inputs.registry, d - Days::new(1))?;
    let (_, subsidy) = subsidy_batch()?;
    let industries = subsidy_industry_batch()?;
    Ok(ReferenceTables {
        tables: vec![
            ("knowledge", knowledge),
            ("calendar", calendar),
            ("params", params),
            ("registry", registry),
            ("subsidy_sectors", subsidy),
            ("subsidy_industries", industries),
        ],
        knowledge_times,
    })
}

/// SQL of the `events` relation as of `date`: the bronze rows (`pos_events`) ingested by
/// their operator's knowledge time (`knowledge`), business dates within the lookback.
pub fn events_view(date: NaiveDate) -> String {
    let window_start = date - Days::new(LOOKBACK_DAYS);
    format!(
        "SELECT e.* FROM knowledge k JOIN pos_events e ON e.operator_id = k.operator_id \
         WHERE e.ingested_at <= k.knowledge_time AND e.business_date >= DATE '{window_start}'"
    )
}

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

/// SQL of the `daily` relation as of `date`: `daily.sql` over `resolved`, dates before it.
pub fn daily_view(date: NaiveDate) -> String {
    format!(
        "SELECT * FROM ({}) d WHERE d.business_date < DATE '{date}'",
        sql::DAILY
    )
}

/// Computes the feature rows as of `as_of` (without writing them), in the column
/// order of `merchant_features`.
pub async fn compute_features(
    lake: &Lake,
    as_of: &AsOf,
    inputs: &FeatureInputs,
) -> Result<(Vec<RecordBatch>, FeatureReport)> {
    compute(lake, as_of, inputs, None).await
}

/// Computes the feature row of one merchant as of `as_of`, reading only that merchant's
/// bronze rows from the lake (`streetflow serve` without its bronze cache). Every feature
/// equals the one [`compute_features`] gives, except `peer_pct_net_90d`: a percentile
/// among peers needs the peers, so it is null here.
pub async fn compute_merchant_features(
    lake: &Lake,
    as_of: &AsOf,
    inputs: &FeatureInputs,
    operator_id: &str,
    merchant_id: &str,
) -> Result<(Vec<RecordBatch>, FeatureReport)> {
    compute(lake, as_of, inputs, Some((operator_id, merchant_id))).await
}

/// A string as a SQL string literal (quotes doubled).
pub fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

async fn compute(
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

/// Computes features as of a date and replaces that date's partition of
/// `merchant_features` with them.
pub async fn write_features(
    lake: &Lake,
    as_of: &AsOf,
    inputs: &FeatureInputs,
) -> Result<FeatureReport> {
    let (batches, report) = compute_features(lake, as_of, inputs).await?;
    let mut table = OffsetWriter::new(lake, &MERCHANT_FEATURES, "merchant_features").await?;
    for batch in batches {
        table.write(batch).await?;
    }
    let staged = table.stage().await?;
    let partition =
        std::collections::HashSet::from([vec![as_of.date.format("%Y-%m-%d").to_string()]]);
    table
        .replace_partitions(&staged, Some(&partition), &[])
        .await?;
    Ok(report)
}

/// Reads a merchant registry file: CSV with a header, or JSON Lines (`.jsonl`).
pub fn load_registry(path: &Path) -> std::result::Result<Vec<MerchantRecord>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json")
    {
        return text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))
            })
            .collect();
    }
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    reader
        .deserialize()
        .enumerate()
        .map(|(i, row)| row.map_err(|e| format!("{} record {}: {e}", path.display(), i + 1)))
        .collect()
}
