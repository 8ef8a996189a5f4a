//! Recent bronze rows in memory, indexed by merchant: the source of the one-merchant
//! evaluation path of `streetflow serve`.
//!
//! Reading one merchant's rows from the lake opens a file in every (operator, day)
//! partition of its lookback window — over a thousand files, about half a second even on
//! a small lake. The cache reads the window once and afterwards only the files each new
//! bronze commit adds, so an evaluation starts from rows already in memory. Rows are kept
//! as bronze has them (duplicates, voids and all), regrouped by merchant at load, with
//! each operator's feed days. [`OneMerchantFeatures`] computes a merchant's features
//! from them: its daily rows as the batch job builds them, then the definitions of
//! `merchant_features.sql` computed directly (or, for checking, the SQL itself).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use chrono::{DateTime, Days, NaiveDate, Utc};
use streetflow_core::MerchantRecord;
use streetflow_core::tables::{MERCHANT_DAILY, POS_EVENTS};
use streetflow_lake::arrow::array::{
    Array, AsArray, Date32Array, Date32Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondArray,
};
use streetflow_lake::arrow::compute::kernels::{boolean, cmp};
use streetflow_lake::arrow::compute::{
    cast, concat_batches, filter_record_batch, interleave_record_batch,
};
use streetflow_lake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use streetflow_lake::arrow::datatypes::{Date32Type, TimestampMicrosecondType};
use streetflow_lake::datafusion::prelude::SessionContext;
use streetflow_lake::deltalake::DeltaTable;
use streetflow_lake::deltalake::delta_datafusion::FileSelection;
use streetflow_lake::{Lake, PreparedQuery, RequestTables};

use crate::daily::{DailyBuilder, PayerWindow, Strs, payer_sales_schema, strings, typed};
use crate::error::{Error, Result};
use crate::gold::{
    AsOf, FeatureInputs, FeatureReport, LOOKBACK_DAYS, PAYER_WINDOW_DAYS, arrow_error,
    conform_features, days, feed_days_schema, reference_tables, without_peer_percentile,
};
use crate::one_merchant::{OneMerchant, SubsidyRules, feature_row};
use crate::sql;

/// A bronze table version's rows with business dates from `since`, by merchant.
///
/// Each merchant's rows are kept together, as a few batches of its rows only: an
/// evaluation takes them as they are instead of gathering them out of the hundreds of
/// day files they arrived in.
#[derive(Debug)]
pub struct BronzeCache {
    since: NaiveDate,
    version: i64,
    files: HashSet<String>,
    schema: SchemaRef,
    /// operator → merchant → its rows in arrival order (slices of shared batches).
    rows: HashMap<String, HashMap<String, Vec<RecordBatch>>>,
    row_count: usize,
    /// operator → business day → when its feed first delivered a sale or refund of that
    /// day (`ingested_at`, µs UTC): the operator's `feed_days` at any knowledge time.
    feed: HashMap<String, BTreeMap<i32, i64>>,
}

/// What the cache holds for one merchant's evaluation.
#[derive(Debug, Clone)]
pub struct MerchantHistory {
    /// The merchant's bronze rows in arrival order.
    pub rows: RecordBatch,
    /// Its operator's feed: business day → when a sale or refund of that day first
    /// arrived (µs UTC), for the days the cache holds, in day order.
    pub feed: Vec<(i32, i64)>,
}

/// Rows gathered per call when the cache regroups rows by merchant. Each call pays for
/// every source batch (thousands at load), so calls must be few: on 17.8 M rows in
/// 2,920 batches, regrouping took 19 s in calls of 65,536 rows and 12 s in calls of
/// about a million.
const REGROUP_ROWS: usize = 1 << 20;

/// Pieces a merchant's rows may be split into before they are joined into one batch;
/// each bronze commit read by a refresh adds one piece per merchant in it.
const MAX_PIECES: usize = 8;

/// What changed in bronze since a cache's version: rows to append, or a whole new cache
/// when files were removed (a compaction or vacuum rewrote them).
#[derive(Debug)]
pub enum BronzeChanges {
    /// Rows of the files added since the cached version.
    Appended {
        /// The bronze version they bring the cache to.
        version: i64,
        /// Every file of that version.
        files: HashSet<String>,
        /// Rows of the added files within the cached dates.
        batches: Vec<RecordBatch>,
    },
    /// Bronze was rewritten: the cache read again.
    Reloaded(Box<BronzeCache>),
}

/// Every data file of a bronze snapshot (paths relative to the table).
pub(crate) fn file_paths(table: &DeltaTable) -> Result<HashSet<String>> {
    let snapshot = table
        .snapshot()
        .map_err(|e| streetflow_lake::Error::delta(POS_EVENTS.name, "list files")(e))?;
    Ok(snapshot
        .log_data()
        .iter()
        .map(|f| f.path().to_string())
        .collect())
}

/// The rows of `table` (optionally only `files` of it) with business dates from `since`.
async fn read_rows(
    table: &DeltaTable,
    since: NaiveDate,
    files: Option<Vec<String>>,
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let mut provider = table.table_provider();
    if let Some(files) = files {
        provider = provider.with_file_selection(FileSelection::from_file_paths(files));
    }
    let provider = provider
        .await
        .map_err(Error::query("opening bronze for the cache"))?;
    let ctx = SessionContext::new();
    table
        .update_datafusion_session(&ctx.state())
        .map_err(streetflow_lake::Error::delta(
            POS_EVENTS.name,
            "register object store",
        ))?;
    ctx.register_table(POS_EVENTS.name, provider)
        .map_err(Error::query("registering bronze for the cache"))?;
    let frame = ctx
        .sql(&format!(
            "SELECT * FROM pos_events WHERE business_date >= DATE '{since}'"
        ))
        .await
        .map_err(Error::query("planning the bronze rows for the cache"))?;
    let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
    let batches = frame
        .collect()
        .await
        .map_err(Error::query("reading the bronze rows for the cache"))?;
    Ok((
        schema,
        batches.into_iter().filter(|b| b.num_rows() > 0).collect(),
    ))
}

/// `schema` with dictionary-encoded columns as their value type. Bronze's partition
/// column `operator_id` is read as a one-value dictionary per file; regrouped rows come
/// from thousands of files, so the cache keeps plain strings instead.
fn cached_schema(schema: &SchemaRef) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|field| match field.data_type() {
            DataType::Dictionary(_, value) => field.as_ref().clone().with_data_type(*value.clone()),
            _ => field.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// `batch` with its dictionary-encoded columns decoded (see [`cached_schema`]).
fn without_dictionaries(batch: RecordBatch) -> Result<RecordBatch> {
    let schema = batch.schema();
    if !schema
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Dictionary(..)))
    {
        return Ok(batch);
    }
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| match field.data_type() {
            DataType::Dictionary(_, value) => {
                cast(column, value).map_err(arrow_error(field.name()))
            }
            _ => Ok(column.clone()),
        })
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new(cached_schema(&schema), columns)
        .map_err(arrow_error("decoded bronze rows"))
}

/// One merchant's rows in a set of batches: operator, merchant and the (batch, row)
/// position of each row in arrival order.
type MerchantPositions = (String, String, Vec<(usize, usize)>);

/// The positions of each merchant's rows in `batches`, merchants in order of first
/// appearance. Rows without an operator or merchant (which bronze does not accept) are
/// left out.
fn merchant_positions(batches: &[RecordBatch]) -> Result<Vec<MerchantPositions>> {
    let mut merchants: Vec<MerchantPositions> = Vec::new();
    // operator → merchant → index in `merchants`; looked up by borrowed strings.
    let mut index: HashMap<String, HashMap<String, usize>> = HashMap::new();
    for (batch_index, batch) in batches.iter().enumerate() {
        // Read in place: the cached columns are plain strings or views, never cast.
        let operator_column = strings(batch, "operator_id")?;
        let merchant_column = strings(batch, "merchant_id")?;
        let (operators, merchant_ids) = (Strs::of(&operator_column), Strs::of(&merchant_column));
        for row in 0..batch.num_rows() {
            if operator_column.is_null(row) || merchant_column.is_null(row) {
                continue;
            }
            let (operator, merchant) = (operators.value(row), merchant_ids.value(row));
            if !index.contains_key(operator) {
                index.insert(operator.to_owned(), HashMap::new());
            }
            let Some(of_operator) = index.get_mut(operator) else {
                continue;
            };
            let position = match of_operator.get(merchant) {
                Some(&position) => position,
                None => {
                    of_operator.insert(merchant.to_owned(), merchants.len());
                    merchants.push((operator.to_owned(), merchant.to_owned(), Vec::new()));
                    merchants.len() - 1
                }
            };
            merchants[position].2.push((batch_index, row));
        }
    }
    Ok(merchants)
}

impl BronzeCache {
    /// Reads the rows of the newest bronze version with business dates from `since`;
    /// `None` when the lake has no bronze table yet.
    pub async fn load(lake: &Lake, since: NaiveDate) -> Result<Option<Self>> {
        let Some(table) = lake.open(POS_EVENTS.name).await? else {
            return Ok(None);
        };
        Self::from_table(&table, since).await.map(Some)
    }

    /// A cache of `table`'s version without rows yet.
    fn empty(table: &DeltaTable, since: NaiveDate, schema: &SchemaRef) -> Self {
        Self {
            since,
            version: table.version().map_or(-1, |v| v as i64),
            files: HashSet::new(),
            schema: cached_schema(schema),
            rows: HashMap::new(),
            row_count: 0,
            feed: HashMap::new(),
        }
    }

    async fn from_table(table: &DeltaTable, since: NaiveDate) -> Result<Self> {
        let started = std::time::Instant::now();
        let files = file_paths(table)?;
        // One operator's files at a time (bronze's first partition directory): regrouping
        // copies the rows it reads, so reading everything at once held two copies of the
        // whole window at the peak; this way, one operator's rows are held twice.
        let mut by_operator: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for path in &files {
            let directory = path.split_once('/').map_or("", |(first, _)| first);
            by_operator.entry(directory).or_default().push(path.clone());
        }
        let mut cache: Option<Self> = None;
        for group in by_operator.into_values() {
            let (planned, batches) = read_rows(table, since, Some(group)).await?;
            // The batches' nullability can be looser than the plan's; use theirs.
            let schema = batches.first().map_or(planned, RecordBatch::schema);
            let cache = cache.get_or_insert_with(|| Self::empty(table, since, &schema));
            cache.append(batches)?;
        }
        let mut cache = match cache {
            Some(cache) => cache,
            // No files: the plan's schema of an empty table.
            None => Self::empty(table, since, &read_rows(table, since, None).await?.0),
        };
        cache.files = files;
        tracing::info!(
            bronze_version = cache.version,
            since = %since,
            rows = cache.row_count(),
            merchants = cache.merchant_count(),
            seconds = started.elapsed().as_secs_f64(),
            "bronze cache loaded"
        );
        Ok(cache)
    }

    /// What bronze gained since the cached version (`None`: nothing). Reads only the
    /// added files; does not change the cache, so readers can go on meanwhile.
    pub async fn changes(&self, lake: &Lake) -> Result<Option<BronzeChanges>> {
        let Some(table) = lake.open(POS_EVENTS.name).await? else {
            return Ok(None);
        };
        let version = table.version().map_or(-1, |v| v as i64);
        if version == self.version {
            return Ok(None);
        }
        let files = file_paths(&table)?;
        if !self.files.is_subset(&files) {
            let cache = Self::from_table(&table, self.since).await?;
            return Ok(Some(BronzeChanges::Reloaded(Box::new(cache))));
        }
        let added: Vec<String> = files.difference(&self.files).cloned().collect();
        let batches = if added.is_empty() {
            Vec::new()
        } else {
            read_rows(&table, self.since, Some(added)).await?.1
        };
        Ok(Some(BronzeChanges::Appended {
            version,
            files,
            batches,
        }))
    }

    /// Applies [`Self::changes`]; returns how many rows it added.
    pub fn apply(&mut self, changes: BronzeChanges) -> Result<usize> {
        match changes {
            BronzeChanges::Appended {
                version,
                files,
                batches,
            } => {
                let before = self.row_count();
                self.append(batches)?;
                self.version = version;
                self.files = files;
                Ok(self.row_count() - before)
            }
            BronzeChanges::Reloaded(cache) => {
                *self = *cache;
                Ok(self.row_count())
            }
        }
    }

    /// Adds `batches` to the cache, regrouped by merchant.
    fn append(&mut self, batches: Vec<RecordBatch>) -> Result<()> {
        let batches = batches
            .into_iter()
            .filter(|b| b.num_rows() > 0)
            .map(|batch| {
                let batch = without_dictionaries(batch)?;
                if batch.schema() == self.schema {
                    Ok(batch)
                } else {
                    batch
                        .with_schema(self.schema.clone())
                        .map_err(|source| Error::Arrow {
                            context: "new bronze rows do not match the cached schema".to_owned(),
                            source,
                        })
                }
            })
            .collect::<Result<Vec<_>>>()?;
        for batch in &batches {
            self.note_feed_days(batch)?;
        }
        let positions = merchant_positions(&batches)?;
        let sources: Vec<&RecordBatch> = batches.iter().collect();
        let mut touched: Vec<(String, String)> = Vec::new();
        // Merchants whose rows go into the next regrouped batch: (operator, merchant,
        // first row, rows).
        let mut pending: Vec<(String, String, usize, usize)> = Vec::new();
        let total_rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let mut gather: Vec<(usize, usize)> = Vec::with_capacity(total_rows.min(REGROUP_ROWS));
        let mut merchants = positions.into_iter().peekable();
        while let Some((operator, merchant, rows)) = merchants.next() {
            pending.push((operator, merchant, gather.len(), rows.len()));
            gather.extend(rows);
            if gather.len() < REGROUP_ROWS && merchants.peek().is_some() {
                continue;
            }
            let regrouped =
                interleave_record_batch(&sources, &gather).map_err(|source| Error::Arrow {
                    context: "regrouping bronze rows by merchant".to_owned(),
                    source,
                })?;
            for (operator, merchant, first, count) in pending.drain(..) {
                let pieces = self
                    .rows
                    .entry(operator.clone())
                    .or_default()
                    .entry(merchant.clone())
                    .or_default();
                pieces.push(regrouped.slice(first, count));
                if pieces.len() > MAX_PIECES {
                    touched.push((operator, merchant));
                }
            }
            self.row_count += gather.len();
            gather.clear();
        }
        for (operator, merchant) in touched {
            if let Some(pieces) = self
                .rows
                .get_mut(&operator)
                .and_then(|merchants| merchants.get_mut(&merchant))
                && pieces.len() > 1
            {
                let joined =
                    concat_batches(&self.schema, pieces.iter()).map_err(|source| Error::Arrow {
                        context: format!("joining the cached rows of merchant {merchant}"),
                        source,
                    })?;
                *pieces = vec![joined];
            }
        }
        Ok(())
    }

    /// Records when each (operator, day) of `batch`'s sales and refunds first arrived.
    fn note_feed_days(&mut self, batch: &RecordBatch) -> Result<()> {
        let operator_column = strings(batch, "operator_id")?;
        let kind_column = strings(batch, "kind")?;
        let dates = typed(batch, "business_date", &DataType::Date32)?;
        let ingested = typed(
            batch,
            "ingested_at",
            &DataType::Timestamp(TimeUnit::Microsecond, None),
        )?;
        let (operators, kinds) = (Strs::of(&operator_column), Strs::of(&kind_column));
        let (dates, ingested) = (
            dates.as_primitive::<Date32Type>(),
            ingested.as_primitive::<TimestampMicrosecondType>(),
        );
        // Bronze files hold one operator each: gather a run of one operator's rows, then
        // merge it into the cache's map once.
        let mut run: Option<(&str, BTreeMap<i32, i64>)> = None;
        for row in 0..batch.num_rows() {
            if operator_column.is_null(row)
                || kind_column.is_null(row)
                || dates.is_null(row)
                || ingested.is_null(row)
                || !matches!(kinds.value(row), "sale" | "refund")
            {
                continue;
            }
            let operator = operators.value(row);
            if run.as_ref().is_some_and(|(name, _)| *name != operator)
                && let Some((name, days)) = run.take()
            {
                self.merge_feed_days(name, days);
            }
            let (_, days) = run.get_or_insert_with(|| (operator, BTreeMap::new()));
            let first = days.entry(dates.value(row)).or_insert(i64::MAX);
            *first = (*first).min(ingested.value(row));
        }
        if let Some((name, days)) = run {
            self.merge_feed_days(name, days);
        }
        Ok(())
    }

    fn merge_feed_days(&mut self, operator: &str, days: BTreeMap<i32, i64>) {
        let known = self.feed.entry(operator.to_owned()).or_default();
        for (day, at) in days {
            let first = known.entry(day).or_insert(at);
            *first = (*first).min(at);
        }
    }

    /// The cached rows of one merchant and its operator's feed days.
    pub fn merchant_history(
        &self,
        operator_id: &str,
        merchant_id: &str,
    ) -> Result<MerchantHistory> {
        Ok(MerchantHistory {
            rows: self.merchant_rows(operator_id, merchant_id)?,
            feed: self
                .feed
                .get(operator_id)
                .map(|days| days.iter().map(|(&day, &at)| (day, at)).collect())
                .unwrap_or_default(),
        })
    }

    /// The cached rows of one merchant in arrival order (an empty batch for a merchant
    /// without rows), with bronze's columns, dictionary-encoded ones decoded.
    pub fn merchant_rows(&self, operator_id: &str, merchant_id: &str) -> Result<RecordBatch> {
        let pieces = self
            .rows
            .get(operator_id)
            .and_then(|merchants| merchants.get(merchant_id));
        match pieces.map(Vec::as_slice) {
            None | Some([]) => Ok(RecordBatch::new_empty(self.schema.clone())),
            Some([rows]) => Ok(rows.clone()),
            Some(pieces) => concat_batches(&self.schema, pieces).map_err(|source| Error::Arrow {
                context: format!("gathering the rows of merchant {merchant_id}"),
                source,
            }),
        }
    }

    /// The bronze version the cache holds.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The first business date cached.
    pub fn since(&self) -> NaiveDate {
        self.since
    }

    /// Rows cached.
    pub fn row_count(&self) -> usize {
        self.row_count
    }

    /// Merchants with cached rows.
    pub fn merchant_count(&self) -> usize {
        self.rows.values().map(HashMap::len).sum()
    }
}

/// Whose features to compute, as of when, with which reference data.
#[derive(Debug, Clone, Copy)]
pub struct MerchantAsOf<'a> {
    /// The merchant's operator.
    pub operator_id: &'a str,
    /// The merchant.
    pub merchant_id: &'a str,
    /// The as-of date and knowledge time.
    pub as_of: &'a AsOf,
    /// Calendars and the registry.
    pub inputs: &'a FeatureInputs,
}

/// `merchant_features.sql` for one merchant at a time: the evaluation path of
/// `streetflow serve`. [`Self::compute`] computes the definitions directly over the
/// merchant's daily rows (about a millisecond with the daily rows); [`Self::compute_with_sql`]
/// runs the SQL, planned on first use (a few milliseconds a run; planning costs tens).
/// Their rows are equal: the tests compare them on the synthetic district.
#[derive(Debug)]
pub struct OneMerchantFeatures {
    /// The feature query, planned on the first [`Self::compute_with_sql`].
    query: tokio::sync::OnceCell<PreparedQuery>,
    subsidy: SubsidyRules,
}

/// One merchant's inputs of the feature definitions for one as-of date.
struct MerchantInputs {
    registry: Vec<MerchantRecord>,
    knowledge_time: DateTime<Utc>,
    daily: Vec<RecordBatch>,
    payer_sales: Vec<RecordBatch>,
    feed_days: Vec<i32>,
}

impl OneMerchantFeatures {
    /// Reads the subsidy reference tables the definitions match sectors in.
    pub fn new() -> Result<Self> {
        let reference = sample_reference_tables()?;
        let table = |name: &str| {
            reference
                .tables
                .iter()
                .find(|(table, _)| *table == name)
                .map(|(_, batch)| batch)
                .ok_or_else(|| Error::Arrow {
                    context: format!("no reference table {name}"),
                    source: streetflow_lake::arrow::error::ArrowError::SchemaError(name.to_owned()),
                })
        };
        let subsidy =
            SubsidyRules::from_tables(table("subsidy_sectors")?, table("subsidy_industries")?)?;
        Ok(Self {
            query: tokio::sync::OnceCell::new(),
            subsidy,
        })
    }

    /// Plans the feature query over the reference tables, `daily`, `payer_sales` and
    /// `feed_days`.
    async fn plan() -> Result<PreparedQuery> {
        let reference = sample_reference_tables()?;
        let mut tables: Vec<(&str, SchemaRef)> = reference
            .tables
            .iter()
            .map(|(name, batch)| (*name, batch.schema()))
            .collect();
        tables.push(("daily", MERCHANT_DAILY.schema.clone()));
        tables.push(("payer_sales", payer_sales_schema()));
        tables.push(("feed_days", feed_days_schema()));
        Ok(PreparedQuery::new(sql::MERCHANT_FEATURES, &tables).await?)
    }

    /// The feature row of one merchant as of `as_of`, from its `history` (all of its
    /// rows in the lookback window and its operator's feed, as
    /// [`BronzeCache::merchant_history`] gives them) of bronze version `bronze_version`.
    /// Equal to what [`compute_merchant_features`](crate::compute_merchant_features)
    /// reads from the lake, `peer_pct_net_90d` null as there.
    pub fn compute(
        &self,
        history: &MerchantHistory,
        bronze_version: i64,
        request: MerchantAsOf<'_>,
    ) -> Result<(Vec<RecordBatch>, FeatureReport)> {
        let MerchantAsOf {
            operator_id,
            merchant_id,
            as_of,
            inputs: _,
        } = request;
        let prepared = merchant_inputs(history, request)?;
        let row = feature_row(
            &OneMerchant {
                operator_id,
                merchant_id,
                as_of: as_of.date,
                knowledge_time: prepared.knowledge_time,
                registry: &prepared.registry,
                daily: &prepared.daily,
                payer_sales: &prepared.payer_sales,
                feed_days: &prepared.feed_days,
                bronze_version,
            },
            &self.subsidy,
        )?;
        let report = FeatureReport {
            as_of_date: as_of.date,
            rows: row.as_ref().map_or(0, RecordBatch::num_rows),
            bronze_version,
            knowledge_times: [(operator_id.to_owned(), prepared.knowledge_time)].into(),
        };
        Ok((row.into_iter().collect(), report))
    }

    /// [`Self::compute`] by running `merchant_features.sql` on DataFusion.
    pub async fn compute_with_sql(
        &self,
        history: &MerchantHistory,
        bronze_version: i64,
        request: MerchantAsOf<'_>,
    ) -> Result<(Vec<RecordBatch>, FeatureReport)> {
        let MerchantAsOf {
            operator_id,
            merchant_id: _,
            as_of,
            inputs,
        } = request;
        let d = as_of.date;
        let prepared = merchant_inputs(history, request)?;
        let scoped = FeatureInputs {
            calendars: inputs.calendars.clone(),
            registry: prepared.registry,
        };
        let reference = reference_tables(as_of, &scoped, &[operator_id.to_owned()])?;
        let feed_days = feed_days_batch(operator_id, &prepared.feed_days)?;
        let mut tables = RequestTables::new()
            .with("daily", prepared.daily)
            .with("payer_sales", prepared.payer_sales)
            .with("feed_days", vec![feed_days]);
        for (name, batch) in reference.tables {
            tables.insert(name, vec![batch]);
        }
        let query = self.query.get_or_try_init(Self::plan).await?;
        let features = query.execute(tables).await?;
        let mut report = FeatureReport {
            as_of_date: d,
            rows: 0,
            bronze_version,
            knowledge_times: reference.knowledge_times,
        };
        let mut batches = Vec::with_capacity(features.len());
        for batch in features.iter().filter(|b| b.num_rows() > 0) {
            report.rows += batch.num_rows();
            batches.push(without_peer_percentile(&conform_features(
                batch,
                bronze_version,
            )?)?);
        }
        Ok((batches, report))
    }
}

/// The reference tables of an arbitrary date: their schemas and the subsidy tables do
/// not depend on it.
fn sample_reference_tables() -> Result<crate::gold::ReferenceTables> {
    let sample = AsOf {
        date: NaiveDate::default(),
        knowledge_time: None,
    };
    reference_tables(&sample, &FeatureInputs::default(), &[])
}

/// One merchant's `daily`, `payer_sales` and feed days as of `as_of` from its cached
/// history, with its registry versions and its operator's knowledge time.
fn merchant_inputs(history: &MerchantHistory, request: MerchantAsOf<'_>) -> Result<MerchantInputs> {
    let MerchantAsOf {
        operator_id,
        merchant_id,
        as_of,
        inputs,
    } = request;
    let d = as_of.date;
    // Only this merchant's registry entries: the query keeps registry merchants without
    // events.
    let registry: Vec<MerchantRecord> = inputs
        .registry
        .iter()
        .filter(|r| r.operator_id == operator_id && r.merchant_id == merchant_id)
        .cloned()
        .collect();
    let knowledge_time = as_of
        .knowledge_time
        .unwrap_or_else(|| inputs.calendars.for_operator(operator_id).day_start(d));
    let first_day = days(d - Days::new(LOOKBACK_DAYS));
    // The rows of `events_view` for this merchant: known by the knowledge time, business
    // dates within the lookback window.
    let known = knowable_rows(
        &history.rows,
        operator_id,
        merchant_id,
        knowledge_time.timestamp_micros(),
        first_day,
    )?;
    let mut builder = DailyBuilder::with_payer_window(PayerWindow {
        from: days(d - Days::new(PAYER_WINDOW_DAYS)),
        until: days(d),
    });
    builder.push(&known)?;
    let before = days(d);
    let (daily, payer_sales) = builder.finish_with_payer_sales(|_, date| date < before)?;
    let feed_days = operator_feed_days(
        &history.feed,
        first_day..before,
        knowledge_time.timestamp_micros(),
    );
    Ok(MerchantInputs {
        registry,
        knowledge_time,
        daily,
        payer_sales,
        feed_days,
    })
}

/// The days of `range` (days since 1970-01-01) whose first sale or refund in an
/// operator's `feed` had arrived by `knowledge_micros`: its `feed_days`.
fn operator_feed_days(feed: &[(i32, i64)], range: Range<i32>, knowledge_micros: i64) -> Vec<i32> {
    feed.iter()
        .filter(|&&(day, first_arrival)| range.contains(&day) && first_arrival <= knowledge_micros)
        .map(|&(day, _)| day)
        .collect()
}

/// An operator's feed days as a `feed_days` table.
fn feed_days_batch(operator_id: &str, feed_days: &[i32]) -> Result<RecordBatch> {
    let (mut operators, mut dates) = (StringBuilder::new(), Date32Builder::new());
    for &day in feed_days {
        operators.append_value(operator_id);
        dates.append_value(day);
    }
    RecordBatch::try_new(
        feed_days_schema(),
        vec![Arc::new(operators.finish()), Arc::new(dates.finish())],
    )
    .map_err(arrow_error("feed days"))
}

/// The rows of `rows` of one merchant ingested by `knowledge_micros` (UTC) with business
/// dates from `first_day` (days since 1970-01-01), as `events_view` selects them.
fn knowable_rows(
    rows: &RecordBatch,
    operator_id: &str,
    merchant_id: &str,
    knowledge_micros: i64,
    first_day: i32,
) -> Result<RecordBatch> {
    let micros = DataType::Timestamp(TimeUnit::Microsecond, None);
    let column = |name: &str, to: &DataType| {
        let column = rows.column_by_name(name).ok_or_else(|| Error::Arrow {
            context: format!("bronze rows have no column {name}"),
            source: streetflow_lake::arrow::error::ArrowError::SchemaError(name.to_owned()),
        })?;
        cast(column, to).map_err(arrow_error(name))
    };
    let ingested = column("ingested_at", &micros)?;
    let dates = column("business_date", &DataType::Date32)?;
    let operators = column("operator_id", &DataType::Utf8)?;
    let merchants = column("merchant_id", &DataType::Utf8)?;
    let known = cmp::lt_eq(
        &ingested,
        &TimestampMicrosecondArray::new_scalar(knowledge_micros),
    )
    .map_err(arrow_error("ingested_at"))?;
    let recent = cmp::gt_eq(&dates, &Date32Array::new_scalar(first_day))
        .map_err(arrow_error("business_date"))?;
    let of_operator = cmp::eq(
        &operators,
        &streetflow_lake::arrow::array::StringArray::new_scalar(operator_id),
    )
    .map_err(arrow_error("operator_id"))?;
    let of_merchant = cmp::eq(
        &merchants,
        &streetflow_lake::arrow::array::StringArray::new_scalar(merchant_id),
    )
    .map_err(arrow_error("merchant_id"))?;
    let mask = [recent, of_operator, of_merchant]
        .iter()
        .try_fold(known, |mask, other| boolean::and(&mask, other))
        .map_err(arrow_error("bronze row filter"))?;
    // Nulls in the mask (unknown ingestion time or date) drop the row, as SQL does.
    filter_record_batch(rows, &mask).map_err(arrow_error("bronze row filter"))
}
