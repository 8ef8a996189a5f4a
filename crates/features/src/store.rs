//! Bitemporal silver in memory: every version of each merchant's daily rows in a range
//! of business dates, read from `merchant_daily_history`, with each operator's feed
//! days. Every point-in-time reader (the batch features, training sets, `serve`) takes a
//! merchant's rows as known at K from here and hands them to [`crate::vector`].
//!
//! Memory grows with merchant-days (about 80 bytes a version), plus the payer entries of
//! the payer range (24 bytes an entry), never with events.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use streetflow_core::tables::MERCHANT_DAILY_HISTORY;
use streetflow_lake::Lake;
use streetflow_lake::arrow::array::{
    Array, AsArray, BooleanArray, Date32Array, Int64Array, ListArray, RecordBatch,
    TimestampMicrosecondArray,
};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::{DataType, Int64Type, TimeUnit};
use streetflow_lake::datafusion::prelude::SessionContext;
use streetflow_lake::deltalake::DeltaTable;

use crate::daily::{Strs, strings};
use crate::error::{Error, Result};

/// Business dates from `first` to `last`, inclusive (days since 1970-01-01).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayRange {
    /// First date.
    pub first: i32,
    /// Last date.
    pub last: i32,
}

impl DayRange {
    /// Whether `day` is in the range.
    pub fn contains(&self, day: i32) -> bool {
        (self.first..=self.last).contains(&day)
    }

    /// The smallest range holding both.
    pub fn union(self, other: DayRange) -> DayRange {
        DayRange {
            first: self.first.min(other.first),
            last: self.last.max(other.last),
        }
    }
}

/// One version of one merchant-day, with the measures the features read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DayVersion {
    pub(crate) date: i32,
    pub(crate) known_from: i64,
    pub(crate) retracted: bool,
    pub(crate) sales_count: i64,
    pub(crate) sales_fen: i64,
    pub(crate) refund_fen: i64,
    pub(crate) net_fen: i64,
    pub(crate) night_sales_fen: i64,
    pub(crate) round_sales_count: i64,
    /// Where its payer entries are in [`MerchantDays::payers`]; empty outside the payer
    /// range.
    pub(crate) payers: (u32, u32),
}

/// One payer's live sales on one merchant-day: payer key, visits, fen.
pub(crate) type PayerEntry = (i64, i64, i64);

/// The versions of one merchant's days.
#[derive(Debug, Clone, Default)]
pub(crate) struct MerchantDays {
    /// Sorted by date, then `known_from`.
    pub(crate) versions: Vec<DayVersion>,
    pub(crate) payers: Vec<PayerEntry>,
    sorted: bool,
}

impl MerchantDays {
    fn push(&mut self, mut version: DayVersion, payers: impl Iterator<Item = PayerEntry>) {
        let start = self.payers.len();
        self.payers.extend(payers);
        version.payers = (start as u32, (self.payers.len() - start) as u32);
        if self
            .versions
            .last()
            .is_some_and(|last| (last.date, last.known_from) > (version.date, version.known_from))
        {
            self.sorted = false;
        }
        self.versions.push(version);
    }

    fn sort(&mut self) {
        if !self.sorted {
            self.versions
                .sort_by_key(|version| (version.date, version.known_from));
            self.sorted = true;
        }
    }

    /// The versions in force at `k`: per date, the latest known by then, unless retracted.
    pub(crate) fn as_of(&self, k: i64) -> impl Iterator<Item = &DayVersion> {
        let versions = &self.versions;
        versions
            .iter()
            .enumerate()
            .filter(move |&(i, version)| {
                version.known_from <= k
                    && !version.retracted
                    && versions
                        .get(i + 1)
                        .is_none_or(|next| next.date != version.date || next.known_from > k)
            })
            .map(|(_, version)| version)
    }

    /// The payer entries of a version.
    pub(crate) fn payers_of(&self, version: &DayVersion) -> &[PayerEntry] {
        let (start, len) = version.payers;
        &self.payers[start as usize..(start + len) as usize]
    }
}

/// Every version of every merchant-day in a date range, by operator and merchant.
#[derive(Debug, Clone, Default)]
pub struct HistoryStore {
    range: Option<DayRange>,
    payer_range: Option<DayRange>,
    /// (operator, merchant, its days), sorted by operator and merchant after
    /// [`Self::finish`].
    merchants: Vec<(String, String, MerchantDays)>,
    /// operator → merchant → position in `merchants`.
    index: HashMap<String, HashMap<String, usize>>,
    /// operator → business day → the earliest knowledge time at which its feed had
    /// delivered a sale (voided or not) or a refund of that day: its feed days at any K.
    feed: HashMap<String, BTreeMap<i32, i64>>,
    versions: usize,
    payer_entries: usize,
    /// The `merchant_daily_history` version read.
    table_version: Option<i64>,
    /// The bronze version that history version reflects.
    bronze_version: Option<i64>,
    /// Its horizon (µs UTC): every version known by then is in it, none after.
    horizon: Option<i64>,
    /// Only this operator's rows (a one-merchant evaluation without a cache).
    operator: Option<String>,
}

/// What a history table gained since a store's version: rows to add, or a whole new
/// store when it was rebuilt.
#[derive(Debug)]
pub enum HistoryChanges {
    /// Rows of the files committed since the store's version.
    Appended {
        /// The history version they bring the store to, its bronze version and horizon.
        table_version: i64,
        /// The bronze version it reflects.
        bronze_version: Option<i64>,
        /// Its horizon.
        horizon: Option<i64>,
        /// The rows, within the store's dates.
        batches: Vec<RecordBatch>,
    },
    /// The history was rebuilt: the store read again.
    Reloaded(Box<HistoryStore>),
}

/// The history columns the store reads (payers only within the payer range).
const COLUMNS: &str = "operator_id, merchant_id, business_date, known_from, retracted, \
    sales_count, sales_fen, refund_fen, net_fen, night_sales_fen, round_sales_count, \
    void_count, refund_count";

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a Arc<dyn Array>> {
    batch.column_by_name(name).ok_or_else(|| Error::Arrow {
        context: format!("merchant_daily_history rows have no column {name}"),
        source: streetflow_lake::arrow::error::ArrowError::SchemaError(name.to_owned()),
    })
}

fn typed<T: Array + Clone + 'static>(batch: &RecordBatch, name: &str, to: &DataType) -> Result<T> {
    let raw = column(batch, name)?;
    let converted = if raw.data_type() == to {
        raw.clone()
    } else {
        cast(raw, to).map_err(|source| Error::Arrow {
            context: format!("reading merchant_daily_history column {name}"),
            source,
        })?
    };
    converted
        .as_any()
        .downcast_ref::<T>()
        .cloned()
        .ok_or_else(|| Error::Arrow {
            context: format!("merchant_daily_history column {name} has an unexpected type"),
            source: streetflow_lake::arrow::error::ArrowError::SchemaError(name.to_owned()),
        })
}

impl HistoryStore {
    /// Reads every version of the days in `range` (their payer entries only for the days
    /// in `payer_range`) from the lake's `merchant_daily_history`; an empty store when
    /// the table does not exist yet.
    pub async fn load(
        lake: &Lake,
        range: DayRange,
        payer_range: DayRange,
        operator: Option<&str>,
    ) -> Result<Self> {
        let mut store = HistoryStore {
            range: Some(range),
            payer_range: Some(payer_range),
            operator: operator.map(str::to_owned),
            ..HistoryStore::default()
        };
        let Some(table) = lake.open(MERCHANT_DAILY_HISTORY.name).await? else {
            // Without bitemporal silver nothing can be read as of any K; with bronze but
            // no history, a vector would change once the history is built.
            if lake
                .open(streetflow_core::tables::POS_EVENTS.name)
                .await?
                .is_some()
            {
                return Err(Error::KnowledgeTime(
                    "merchant_daily_history has not been built yet: run `streetflow aggregate` \
                     (workers build it after each flush)"
                        .to_owned(),
                ));
            }
            return Ok(store);
        };
        store.note_version(&table).await?;
        let ctx = lake
            .pinned_session(MERCHANT_DAILY_HISTORY.name, &table)
            .await?;
        for query in store.queries(None) {
            store.scan(&ctx, &query).await?;
        }
        store.finish();
        Ok(store)
    }

    /// Records the table version a store reflects, with its bronze version and horizon.
    async fn note_version(&mut self, table: &DeltaTable) -> Result<()> {
        self.table_version = table.version().map(|v| v as i64);
        let snapshot = table.snapshot().map_err(streetflow_lake::Error::delta(
            MERCHANT_DAILY_HISTORY.name,
            "read application versions",
        ))?;
        let app = |id: &'static str| {
            let log = table.log_store();
            async move {
                snapshot
                    .transaction_version(log.as_ref(), id)
                    .await
                    .map_err(streetflow_lake::Error::delta(
                        MERCHANT_DAILY_HISTORY.name,
                        "read application versions",
                    ))
            }
        };
        self.bronze_version = app(crate::silver::BRONZE_APP_ID).await?;
        self.horizon = app(crate::history::HORIZON_APP_ID).await?;
        Ok(())
    }

    /// The queries that read the store's rows from a relation `merchant_daily_history`
    /// (or, with `files`, a relation of those files): two scans, so that the payer lists
    /// are decoded only where they are used.
    fn queries(&self, relation: Option<&str>) -> Vec<String> {
        let (Some(range), Some(payer_range)) = (self.range, self.payer_range) else {
            return Vec::new();
        };
        let relation = relation.unwrap_or("merchant_daily_history");
        let date = |day: i32| chrono::NaiveDate::default() + chrono::Duration::days(i64::from(day));
        let operator = self
            .operator
            .as_deref()
            .map_or_else(String::new, |operator| {
                format!(" AND operator_id = {}", crate::gold::sql_literal(operator))
            });
        let within = |range: DayRange| {
            format!(
                "business_month >= DATE '{}' AND business_month <= DATE '{}' \
                 AND business_date >= DATE '{}' AND business_date <= DATE '{}'{operator}",
                date(crate::daily::month_of(range.first)),
                date(crate::daily::month_of(range.last)),
                date(range.first),
                date(range.last)
            )
        };
        let payer_days = DayRange {
            first: payer_range.first.max(range.first),
            last: payer_range.last.min(range.last),
        };
        let mut queries = vec![format!(
            "SELECT {COLUMNS} FROM {relation} WHERE {} \
             AND (business_date < DATE '{}' OR business_date > DATE '{}')",
            within(range),
            date(payer_days.first),
            date(payer_days.last)
        )];
        if payer_days.first <= payer_days.last {
            queries.push(format!(
                "SELECT {COLUMNS}, payers FROM {relation} WHERE {}",
                within(payer_days)
            ));
        }
        queries
    }

    /// Adds the rows of `query`, streamed.
    async fn scan(&mut self, ctx: &SessionContext, query: &str) -> Result<()> {
        let mut stream = ctx
            .sql(query)
            .await
            .map_err(Error::query("planning the history scan"))?
            .execute_stream()
            .await
            .map_err(Error::query("scanning the history"))?;
        while let Some(batch) = stream.next().await {
            self.add(&batch.map_err(Error::query("scanning the history"))?)?;
        }
        Ok(())
    }

    /// What the history table gained since this store's version (`None`: nothing).
    /// Reads only the files committed since; does not change the store, so readers can
    /// go on meanwhile.
    pub async fn changes(&self, lake: &Lake) -> Result<Option<HistoryChanges>> {
        let Some(table) = lake.open(MERCHANT_DAILY_HISTORY.name).await? else {
            return Ok(None);
        };
        let version = table.version().map(|v| v as i64);
        if version == self.table_version {
            return Ok(None);
        }
        let reload = || async {
            let (Some(range), Some(payer_range)) = (self.range, self.payer_range) else {
                return Ok::<_, Error>(HistoryChanges::Reloaded(Box::default()));
            };
            let store =
                HistoryStore::load(lake, range, payer_range, self.operator.as_deref()).await?;
            Ok(HistoryChanges::Reloaded(Box::new(store)))
        };
        let (Some(from), Some(to)) = (self.table_version, version) else {
            return reload().await.map(Some);
        };
        let changes = streetflow_lake::data_changes(&table, from as u64, to as u64).await?;
        let added = match changes {
            Some(changes) if changes.appends_only() => changes.added,
            // Rebuilt (or its log is gone): read it all again.
            _ => return reload().await.map(Some),
        };
        let mut fresh = HistoryStore {
            range: self.range,
            payer_range: self.payer_range,
            operator: self.operator.clone(),
            ..HistoryStore::default()
        };
        fresh.note_version(&table).await?;
        let mut batches = Vec::new();
        if !added.is_empty() {
            let provider = table
                .table_provider()
                .with_file_selection(
                    streetflow_lake::deltalake::delta_datafusion::FileSelection::from_file_paths(
                        added,
                    ),
                )
                .await
                .map_err(Error::query("selecting new history files"))?;
            let ctx = SessionContext::new();
            table.update_datafusion_session(&ctx.state()).map_err(
                streetflow_lake::Error::delta(MERCHANT_DAILY_HISTORY.name, "register object store"),
            )?;
            ctx.register_table("added", provider)
                .map_err(Error::query("registering new history files"))?;
            for query in self.queries(Some("added")) {
                let frame = ctx
                    .sql(&query)
                    .await
                    .map_err(Error::query("planning the new history rows"))?;
                batches.extend(
                    frame
                        .collect()
                        .await
                        .map_err(Error::query("reading the new history rows"))?,
                );
            }
        }
        Ok(Some(HistoryChanges::Appended {
            table_version: fresh.table_version.unwrap_or(-1),
            bronze_version: fresh.bronze_version,
            horizon: fresh.horizon,
            batches,
        }))
    }

    /// Applies [`Self::changes`]; returns how many versions it added.
    pub fn apply(&mut self, changes: HistoryChanges) -> Result<usize> {
        match changes {
            HistoryChanges::Appended {
                table_version,
                bronze_version,
                horizon,
                batches,
            } => {
                let before = self.versions;
                for batch in &batches {
                    self.add(batch)?;
                }
                self.finish();
                self.table_version = Some(table_version);
                self.bronze_version = bronze_version;
                self.horizon = horizon;
                Ok(self.versions - before)
            }
            HistoryChanges::Reloaded(store) => {
                *self = *store;
                Ok(self.versions)
            }
        }
    }

    /// The bronze version the history read reflects.
    pub fn bronze_version(&self) -> Option<i64> {
        self.bronze_version
    }

    /// The history's horizon (µs UTC): the latest knowledge time it holds in full.
    pub fn horizon(&self) -> Option<DateTime<Utc>> {
        self.horizon.and_then(DateTime::from_timestamp_micros)
    }

    /// Whether vectors as of knowledge time `k` can be read from this store: the
    /// history must hold every version known by `k`, or a later refresh could still add
    /// rows to what K saw.
    pub(crate) fn check_settled(&self, k: DateTime<Utc>) -> Result<()> {
        if self.table_version.is_none() {
            // No history at all: nothing is known, at any K.
            return Ok(());
        }
        match self.horizon {
            Some(horizon) if horizon >= k.timestamp_micros() => Ok(()),
            horizon => Err(Error::KnowledgeTime(format!(
                "merchant_daily_history holds what the lake knew up to {} only, not yet at {}: \
                 run `streetflow aggregate` (streaming workers refresh it after each flush) \
                 and ask again",
                horizon
                    .and_then(DateTime::<Utc>::from_timestamp_micros)
                    .map_or_else(|| "no knowledge time".to_owned(), |h| h.to_rfc3339()),
                k.to_rfc3339()
            ))),
        }
    }

    /// Adds history rows (any order; `payers` optional).
    pub(crate) fn add(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let operators = strings(batch, "operator_id")?;
        let merchants = strings(batch, "merchant_id")?;
        let (operators, merchants) = (Strs::of(&operators), Strs::of(&merchants));
        let dates: Date32Array = typed(batch, "business_date", &DataType::Date32)?;
        let known: TimestampMicrosecondArray = typed(
            batch,
            "known_from",
            &DataType::Timestamp(TimeUnit::Microsecond, None),
        )?;
        let retracted: BooleanArray = typed(batch, "retracted", &DataType::Boolean)?;
        let long = |name: &str| typed::<Int64Array>(batch, name, &DataType::Int64);
        let (sales_count, sales_fen, refund_fen, net_fen, night_fen, round_count) = (
            long("sales_count")?,
            long("sales_fen")?,
            long("refund_fen")?,
            long("net_fen")?,
            long("night_sales_fen")?,
            long("round_sales_count")?,
        );
        let (void_count, refund_count) = (long("void_count")?, long("refund_count")?);
        let payers = batch
            .column_by_name("payers")
            .and_then(|c| c.as_any().downcast_ref::<ListArray>().cloned());
        let payer_range = self.payer_range;
        let in_payer_range = |day: i32| payer_range.is_none_or(|r| r.contains(day));
        // Rows of one merchant come together: look it up once per run.
        let mut last: Option<usize> = None;
        for row in 0..batch.num_rows() {
            let (operator, merchant) = (operators.value(row), merchants.value(row));
            let date = dates.value(row);
            let version = DayVersion {
                date,
                known_from: known.value(row),
                retracted: retracted.value(row),
                sales_count: sales_count.value(row),
                sales_fen: sales_fen.value(row),
                refund_fen: refund_fen.value(row),
                net_fen: net_fen.value(row),
                night_sales_fen: night_fen.value(row),
                round_sales_count: round_count.value(row),
                payers: (0, 0),
            };
            // A feed day from the first version with a sale (voided or not) or a refund:
            // those counts never fall as knowledge grows.
            if sales_count.value(row) + void_count.value(row) + refund_count.value(row) > 0 {
                if !self.feed.contains_key(operator) {
                    self.feed.insert(operator.to_owned(), BTreeMap::new());
                }
                if let Some(feed) = self.feed.get_mut(operator) {
                    let first = feed.entry(date).or_insert(i64::MAX);
                    *first = (*first).min(version.known_from);
                }
            }
            let position = match last {
                Some(position)
                    if self.merchants[position].0 == operator
                        && self.merchants[position].1 == merchant =>
                {
                    position
                }
                _ => self.position(operator, merchant),
            };
            last = Some(position);
            let entries: Vec<PayerEntry> = match &payers {
                Some(lists) if in_payer_range(date) && !lists.is_null(row) => {
                    let list = lists.value(row);
                    let entries = list.as_struct();
                    let keys = entries.column(0).as_primitive::<Int64Type>();
                    let visits = entries.column(1).as_primitive::<Int64Type>();
                    let fen = entries.column(2).as_primitive::<Int64Type>();
                    (0..entries.len())
                        .map(|i| (keys.value(i), visits.value(i), fen.value(i)))
                        .collect()
                }
                _ => Vec::new(),
            };
            self.payer_entries += entries.len();
            self.merchants[position]
                .2
                .push(version, entries.into_iter());
            self.versions += 1;
        }
        Ok(())
    }

    /// The position of a merchant in `merchants`, added when new.
    fn position(&mut self, operator: &str, merchant: &str) -> usize {
        if let Some(&position) = self.index.get(operator).and_then(|m| m.get(merchant)) {
            return position;
        }
        let position = self.merchants.len();
        self.merchants.push((
            operator.to_owned(),
            merchant.to_owned(),
            MerchantDays::default(),
        ));
        self.index
            .entry(operator.to_owned())
            .or_default()
            .insert(merchant.to_owned(), position);
        position
    }

    /// Sorts what [`Self::add`] gathered.
    pub(crate) fn finish(&mut self) {
        for (_, _, days) in &mut self.merchants {
            days.sort();
        }
        self.merchants
            .sort_unstable_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        self.index.clear();
        for (position, (operator, merchant, _)) in self.merchants.iter().enumerate() {
            self.index
                .entry(operator.clone())
                .or_default()
                .insert(merchant.clone(), position);
        }
    }

    /// The days of one merchant.
    pub(crate) fn merchant(&self, operator: &str, merchant: &str) -> Option<&MerchantDays> {
        let position = *self.index.get(operator)?.get(merchant)?;
        Some(&self.merchants[position].2)
    }

    /// Every (operator, merchant) with days in the store, in order.
    pub fn merchant_keys(&self) -> impl Iterator<Item = (&str, &str)> {
        self.merchants
            .iter()
            .map(|(operator, merchant, _)| (operator.as_str(), merchant.as_str()))
    }

    /// The operators with days in the store.
    pub fn operators(&self) -> Vec<&str> {
        let mut operators: Vec<&str> = self.index.keys().map(String::as_str).collect();
        operators.sort_unstable();
        operators
    }

    /// An operator's feed days known at `k`, within `range`, in order.
    pub(crate) fn feed_days(&self, operator: &str, range: DayRange, k: i64) -> Vec<i32> {
        self.feed
            .get(operator)
            .map(|days| {
                days.range(range.first..=range.last)
                    .filter(|&(_, &from)| from <= k)
                    .map(|(&day, _)| day)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Versions held.
    pub fn version_count(&self) -> usize {
        self.versions
    }

    /// Payer entries held.
    pub fn payer_entry_count(&self) -> usize {
        self.payer_entries
    }

    /// Merchants held.
    pub fn merchant_count(&self) -> usize {
        self.merchants.len()
    }

    /// The dates the store holds.
    pub fn range(&self) -> Option<DayRange> {
        self.range
    }

    /// The `merchant_daily_history` table version read (`None`: no table).
    pub fn table_version(&self) -> Option<i64> {
        self.table_version
    }
}
