//! `merchant_features` (gold): point-in-time features as of a date.
//!
//! For as-of date D and each operator's knowledge time K (by default the end of D − 1 in
//! its calendar), the job reads the merchant-days of D − 456 … D − 1 from bitemporal
//! silver ([`HistoryStore`]), takes each row as the lake knew it at K, and computes every
//! merchant's vector with the one set of definitions ([`crate::vector`]). K must not be
//! before the end of D − 1, must have settled, and the history must hold it (its horizon);
//! so a vector for (D, K) is the same whenever it is computed, and a late event known
//! after K never changes it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Days, NaiveDate, Utc};
use streetflow_core::tables::MERCHANT_FEATURES;
use streetflow_core::{KnowledgeRules, MerchantRecord, OperatorCalendars};
use streetflow_lake::arrow::array::{
    ArrayRef, Date32Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use streetflow_lake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use streetflow_lake::{Lake, OffsetWriter};

use crate::error::{Error, Result};
use crate::sql;
use crate::store::{DayRange, HistoryStore};
use crate::vector::{
    FeatureVector, SubsidyRules, VectorInput, feature_vector, peer_percentiles, vector_batch,
};

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
    /// Only what the lake knew at this instant counts; `None`: the end of the day before
    /// `date` (the start of `date`) in each operator's business calendar.
    pub knowledge_time: Option<DateTime<Utc>>,
}

impl AsOf {
    /// The knowledge time K for one operator, checked: K must not be before the end of
    /// D − 1 in the operator's calendar (that day is not over yet, so no vector as of D
    /// exists), and must have settled ([`KnowledgeRules`]) by `now`.
    pub fn knowledge_time_for(
        &self,
        operator_id: &str,
        inputs: &FeatureInputs,
        now: DateTime<Utc>,
    ) -> Result<DateTime<Utc>> {
        let day_end = inputs
            .calendars
            .for_operator(operator_id)
            .day_start(self.date);
        let k = self.knowledge_time.unwrap_or(day_end);
        if k < day_end {
            return Err(Error::KnowledgeTime(format!(
                "knowledge time {} is before the end of {} for operator {operator_id} ({}): \
                 features as of {} need that whole day",
                k.to_rfc3339(),
                self.date - Days::new(1),
                day_end.to_rfc3339(),
                self.date
            )));
        }
        inputs
            .knowledge
            .check_readable(k, now)
            .map_err(Error::KnowledgeTime)?;
        Ok(k)
    }
}

/// Reference data the features use besides bronze.
#[derive(Debug, Clone, Default)]
pub struct FeatureInputs {
    /// Business calendars of the operators.
    pub calendars: OperatorCalendars,
    /// Merchant registry versions (all of them; the job picks those valid on D − 1).
    pub registry: Vec<MerchantRecord>,
    /// When a knowledge time is settled enough to read.
    pub knowledge: KnowledgeRules,
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
    let current = streetflow_core::registry::versions_on(registry, day, None);
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

/// The subsidy rules shipped in `pipelines/reference/`.
pub(crate) fn shipped_subsidy_rules() -> Result<SubsidyRules> {
    let (_, sectors) = subsidy_batch()?;
    SubsidyRules::from_tables(&sectors, &subsidy_industry_batch()?)
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
    let now = Utc::now();
    for name in operators {
        let k = as_of.knowledge_time_for(name, inputs, now)?;
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
    // The registry as recorded by each operator's knowledge time (bitemporal: a
    // correction recorded later is not seen).
    let recorded: Vec<MerchantRecord> = inputs
        .registry
        .iter()
        .filter(|record| {
            let k = knowledge_times
                .get(&record.operator_id)
                .copied()
                .or(as_of.knowledge_time)
                .unwrap_or_else(|| {
                    inputs
                        .calendars
                        .for_operator(&record.operator_id)
                        .day_start(d)
                });
            record.recorded_at.is_none_or(|at| at <= k)
        })
        .cloned()
        .collect();
    let (_, registry) = registry_batch(&recorded, d - Days::new(1))?;
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
pub(crate) fn events_view(date: NaiveDate) -> String {
    let window_start = date - Days::new(LOOKBACK_DAYS);
    format!(
        "SELECT e.* FROM knowledge k JOIN pos_events e ON e.operator_id = k.operator_id \
         WHERE e.knowledge_time <= k.knowledge_time AND e.business_date >= DATE '{window_start}'"
    )
}

/// Computes the feature rows as of `as_of` (without writing them), in the column
/// order of `merchant_features`: one vector per merchant with days in the lookback or a
/// registry version ([`crate::vector::feature_vector`]), from the bitemporal daily rows
/// of `merchant_daily_history` as known at each operator's knowledge time.
pub async fn compute_features(
    lake: &Lake,
    as_of: &AsOf,
    inputs: &FeatureInputs,
) -> Result<(Vec<RecordBatch>, FeatureReport)> {
    compute(lake, as_of, inputs, None).await
}

/// Computes the feature row of one merchant as of `as_of`, reading only its operator's
/// daily rows from the lake (`streetflow serve` without its cache). Every feature equals
/// the one [`compute_features`] gives, except `peer_pct_net_90d`: a percentile among
/// peers needs the peers, so it is null here.
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

/// The dates a vector as of `date` reads, and those whose payer entries it reads.
pub(crate) fn ranges_for(date: NaiveDate) -> (DayRange, DayRange) {
    let d = days(date);
    (
        DayRange {
            first: d - LOOKBACK_DAYS as i32,
            last: d - 1,
        },
        DayRange {
            first: d - PAYER_WINDOW_DAYS as i32,
            last: d - 1,
        },
    )
}

async fn compute(
    lake: &Lake,
    as_of: &AsOf,
    inputs: &FeatureInputs,
    merchant: Option<(&str, &str)>,
) -> Result<(Vec<RecordBatch>, FeatureReport)> {
    let (range, payer_range) = ranges_for(as_of.date);
    let started = std::time::Instant::now();
    let store = HistoryStore::load(
        lake,
        range,
        payer_range,
        merchant.map(|(operator, _)| operator),
    )
    .await?;
    tracing::debug!(
        versions = store.version_count(),
        payer_entries = store.payer_entry_count(),
        merchants = store.merchant_count(),
        seconds = started.elapsed().as_secs_f64(),
        "history read"
    );
    let population = Population::of(&store, inputs, merchant);
    let (vectors, report) = vectors_as_of(&store, as_of, inputs, &population, merchant.is_none())?;
    let batches = if vectors.is_empty() {
        Vec::new()
    } else {
        vec![vector_batch(&vectors)?]
    };
    Ok((batches, report))
}

/// The merchants a features run computes: those with days in the store and those in
/// the registry, each once, in order.
pub(crate) struct Population {
    pub(crate) merchants: Vec<(String, String)>,
}

impl Population {
    /// Everyone in `store` and `inputs.registry`, or only `merchant`.
    pub(crate) fn of(
        store: &HistoryStore,
        inputs: &FeatureInputs,
        merchant: Option<(&str, &str)>,
    ) -> Self {
        let mut merchants: std::collections::BTreeSet<(String, String)> = store
            .merchant_keys()
            .map(|(o, m)| (o.to_owned(), m.to_owned()))
            .collect();
        merchants.extend(
            inputs
                .registry
                .iter()
                .map(|r| (r.operator_id.clone(), r.merchant_id.clone())),
        );
        if let Some((operator, merchant)) = merchant {
            merchants.retain(|(o, m)| o == operator && m == merchant);
        }
        Population {
            merchants: merchants.into_iter().collect(),
        }
    }
}

/// What a vector of one operator's merchants reads besides the merchant's own days.
struct OperatorView<'a> {
    k: DateTime<Utc>,
    feed_days: Vec<i32>,
    registry: BTreeMap<(&'a str, &'a str), &'a MerchantRecord>,
}

/// The vectors of `population` as of `as_of` from `store` (peer percentiles among them
/// when `with_peers`), and the report.
pub(crate) fn vectors_as_of(
    store: &HistoryStore,
    as_of: &AsOf,
    inputs: &FeatureInputs,
    population: &Population,
    with_peers: bool,
) -> Result<(Vec<FeatureVector>, FeatureReport)> {
    let d = days(as_of.date);
    let (range, _) = ranges_for(as_of.date);
    let now = Utc::now();
    let mut report = FeatureReport {
        as_of_date: as_of.date,
        rows: 0,
        bronze_version: store.bronze_version().unwrap_or(-1),
        knowledge_times: BTreeMap::new(),
    };
    let rules = shipped_subsidy_rules()?;
    let mut operators: BTreeMap<&str, OperatorView<'_>> = BTreeMap::new();
    for (operator, _) in &population.merchants {
        if operators.contains_key(operator.as_str()) {
            continue;
        }
        let k = as_of.knowledge_time_for(operator, inputs, now)?;
        store.check_settled(k)?;
        // The registry version valid on D − 1 as recorded by K (bitemporal).
        let registry = streetflow_core::registry::versions_on(
            &inputs.registry,
            as_of.date - Days::new(1),
            Some(k),
        )
        .into_iter()
        .filter(|((o, _), _)| *o == operator.as_str())
        .collect();
        report.knowledge_times.insert(operator.clone(), k);
        operators.insert(
            operator.as_str(),
            OperatorView {
                k,
                feed_days: store.feed_days(operator, range, k.timestamp_micros()),
                registry,
            },
        );
    }
    let bronze_version = report.bronze_version;
    let vectors_of = |merchants: &[(String, String)]| -> Result<Vec<FeatureVector>> {
        let mut vectors = Vec::with_capacity(merchants.len());
        for (operator, merchant) in merchants {
            let Some(view) = operators.get(operator.as_str()) else {
                continue;
            };
            let input = VectorInput {
                operator_id: operator,
                merchant_id: merchant,
                as_of: d,
                knowledge_time: view.k,
                days: store.merchant(operator, merchant),
                feed_days: &view.feed_days,
                registered: view
                    .registry
                    .get(&(operator.as_str(), merchant.as_str()))
                    .copied(),
                bronze_version,
            };
            if let Some(vector) = feature_vector(&input, &rules)? {
                vectors.push(vector);
            }
        }
        Ok(vectors)
    };
    // Each vector reads only its merchant's days: the population is shared out among
    // the cores in contiguous runs, and the runs joined in order.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let run = population.merchants.len().div_ceil(threads).max(1);
    let mut vectors = Vec::with_capacity(population.merchants.len());
    if threads == 1 || population.merchants.len() < 1_000 {
        vectors = vectors_of(&population.merchants)?;
    } else {
        let parts: Vec<Result<Vec<FeatureVector>>> = std::thread::scope(|scope| {
            let running: Vec<_> = population
                .merchants
                .chunks(run)
                .map(|part| scope.spawn(|| vectors_of(part)))
                .collect();
            running
                .into_iter()
                .map(|thread| {
                    thread.join().unwrap_or_else(|_| {
                        Err(Error::Arrow {
                            context: "computing feature vectors".to_owned(),
                            source: streetflow_lake::arrow::error::ArrowError::ComputeError(
                                "a feature thread stopped".to_owned(),
                            ),
                        })
                    })
                })
                .collect()
        });
        for part in parts {
            vectors.extend(part?);
        }
    }
    if with_peers {
        peer_percentiles(&mut vectors);
    }
    report.rows = vectors.len();
    Ok((vectors, report))
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
pub fn load_registry(path: &Path) -> std::result::Result<Vec<MerchantRecord>, RegistryError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| RegistryError {
        file: file.clone(),
        line: None,
        message: format!("cannot be read: {e}"),
    })?;
    if path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json")
    {
        return text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| RegistryError {
                    file: file.clone(),
                    line: Some(i as u64 + 1),
                    message: e.to_string(),
                })
            })
            .collect();
    }
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    reader
        .deserialize()
        .map(|row| {
            row.map_err(|e| RegistryError {
                file: file.clone(),
                line: e.position().map(|p| p.line()),
                message: e.to_string(),
            })
        })
        .collect()
}

/// A registry file that cannot be read, or a line of it that is no merchant record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", line.map_or_else(String::new, |n| format!(" line {n}")))]
pub struct RegistryError {
    /// The file.
    pub file: String,
    /// Its line (1-based), when one line is at fault.
    pub line: Option<u64>,
    /// What is wrong.
    pub message: String,
}
