//! The feature definitions, once: one merchant's `merchant_features` vector as of
//! (D, K) from its bitemporal daily rows ([`crate::store`]).
//!
//! Every path that produces vectors calls [`feature_vector`]: the batch job for every
//! merchant, training sets for each spine row, and `serve` for one merchant. The
//! definitions are those of `schemas/merchant_features.md`; the conformance fixtures
//! (`crates/features/tests/conformance/`) hold every path to hand-checked values, and
//! `pipelines/features/merchant_features.sql` states the same definitions in SQL for
//! DuckDB to check the batch job against in `streetflow bench features`.
//!
//! A vector reads a 456-day calendar of its merchant's days as known at K, and, for the
//! payer features, the payer entries of the last 90 of them: its cost grows with
//! merchant-days and payers, never with events.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use streetflow_core::MerchantRecord;
use streetflow_core::tables::MERCHANT_FEATURES;
use streetflow_lake::arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, AsArray, Date32Array, Float64Array, Int64Array,
    PrimitiveArray, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use streetflow_lake::arrow::datatypes::{Date32Type, Int64Type};

use crate::daily::{Strs, strings};
use crate::error::{Error, Result};
use crate::gold::{FEATURE_SET, LOOKBACK_DAYS, PAYER_WINDOW_DAYS, arrow_error};
use crate::store::{DayRange, MerchantDays};

/// An MCC range of a subsidy sector (`subsidy_sectors.csv`), days since 1970-01-01.
#[derive(Debug, Clone)]
struct MccRange {
    sector: String,
    from: i64,
    to: i64,
    effective_from: i32,
    effective_to: Option<i32>,
}

/// An industry-code prefix of a subsidy sector (`subsidy_industries.csv`).
#[derive(Debug, Clone)]
struct IndustryPrefix {
    sector: String,
    prefix: String,
    effective_from: i32,
    effective_to: Option<i32>,
}

/// The subsidy reference tables, as the feature query matches them.
#[derive(Debug, Clone, Default)]
pub(crate) struct SubsidyRules {
    ranges: Vec<MccRange>,
    prefixes: Vec<IndustryPrefix>,
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| Error::Arrow {
        context: format!("no column {name}"),
        source: streetflow_lake::arrow::error::ArrowError::SchemaError(name.to_owned()),
    })
}

/// Column `name` of `batch` as a primitive array of type `T` (no cast: the builder and
/// the reference tables give these types).
fn primitive<'a, T: ArrowPrimitiveType>(
    batch: &'a RecordBatch,
    name: &str,
) -> Result<&'a PrimitiveArray<T>> {
    column(batch, name)?
        .as_primitive_opt::<T>()
        .ok_or_else(|| Error::Arrow {
            context: format!("column {name} is not {}", T::DATA_TYPE),
            source: streetflow_lake::arrow::error::ArrowError::SchemaError(name.to_owned()),
        })
}

fn longs<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a PrimitiveArray<Int64Type>> {
    primitive::<Int64Type>(batch, name)
}

fn dates<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a PrimitiveArray<Date32Type>> {
    primitive::<Date32Type>(batch, name)
}

impl SubsidyRules {
    /// Reads the `subsidy_sectors` and `subsidy_industries` reference tables.
    pub(crate) fn from_tables(sectors: &RecordBatch, industries: &RecordBatch) -> Result<Self> {
        let mut rules = Self::default();
        let (names, from, to) = (
            strings(sectors, "sector")?,
            longs(sectors, "mcc_from")?,
            longs(sectors, "mcc_to")?,
        );
        let (start, end) = (
            dates(sectors, "effective_from")?,
            dates(sectors, "effective_to")?,
        );
        let names_of = Strs::of(&names);
        for row in 0..sectors.num_rows() {
            rules.ranges.push(MccRange {
                sector: names_of.value(row).to_owned(),
                from: from.value(row),
                to: to.value(row),
                effective_from: start.value(row),
                effective_to: end.is_valid(row).then(|| end.value(row)),
            });
        }
        let (names, prefixes) = (
            strings(industries, "sector")?,
            strings(industries, "industry_prefix")?,
        );
        let (start, end) = (
            dates(industries, "effective_from")?,
            dates(industries, "effective_to")?,
        );
        let (names_of, prefixes_of) = (Strs::of(&names), Strs::of(&prefixes));
        for row in 0..industries.num_rows() {
            rules.prefixes.push(IndustryPrefix {
                sector: names_of.value(row).to_owned(),
                prefix: prefixes_of.value(row).to_owned(),
                effective_from: start.value(row),
                effective_to: end.is_valid(row).then(|| end.value(row)),
            });
        }
        Ok(rules)
    }

    /// The sector of a merchant on `day`: among the entries in effect, a matching
    /// industry prefix (longest first) before an MCC range (narrowest first), ties by
    /// sector name — the `sectors` relation of the feature query.
    fn sector(&self, mcc: Option<&str>, industry_code: Option<&str>, day: i32) -> Option<&str> {
        let in_effect = |from: i32, to: Option<i32>| from <= day && to.is_none_or(|to| day <= to);
        // (source: industry 0, MCC 1; width; sector), the smallest wins.
        let mut best: Option<(u8, i64, &str)> = None;
        if let Some(code) = industry_code {
            for entry in &self.prefixes {
                if code.starts_with(&entry.prefix)
                    && in_effect(entry.effective_from, entry.effective_to)
                {
                    let key = (
                        0,
                        -(entry.prefix.chars().count() as i64),
                        entry.sector.as_str(),
                    );
                    best = Some(best.map_or(key, |b| b.min(key)));
                }
            }
        }
        if let Some(mcc) = mcc.and_then(|m| m.trim().parse::<i64>().ok()) {
            for entry in &self.ranges {
                if entry.from <= mcc
                    && mcc <= entry.to
                    && in_effect(entry.effective_from, entry.effective_to)
                {
                    let key = (1, entry.to - entry.from, entry.sector.as_str());
                    best = Some(best.map_or(key, |b| b.min(key)));
                }
            }
        }
        best.map(|(_, _, sector)| sector)
    }
}

/// One calendar day of the merchant's dense history (`dense` in the SQL).
#[derive(Debug, Clone, Copy, Default)]
struct Day {
    sales_count: i64,
    sales_fen: i64,
    refund_fen: i64,
    net_fen: i64,
    night_sales_fen: i64,
    round_sales_count: i64,
    feed_day: bool,
}

/// Welford's running mean and population variance (DataFusion's `avg` and
/// `stddev_pop` add the same terms).
#[derive(Debug, Default)]
struct Moments {
    count: u64,
    sum: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn add(&mut self, value: f64) {
        self.count += 1;
        self.sum += value;
        let delta = value - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (value - self.mean);
    }

    fn average(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    fn stddev_pop(&self) -> Option<f64> {
        (self.count > 0).then(|| (self.m2 / self.count as f64).sqrt())
    }
}

/// `regr_slope(y, x)` as DataFusion computes it (cov_pop / var_pop, online).
#[derive(Debug, Default)]
struct Slope {
    count: u64,
    mean_x: f64,
    mean_y: f64,
    m2_x: f64,
    co: f64,
}

impl Slope {
    fn add(&mut self, y: f64, x: f64) {
        self.count += 1;
        let delta_x = x - self.mean_x;
        let delta_y = y - self.mean_y;
        self.mean_x += delta_x / self.count as f64;
        self.mean_y += delta_y / self.count as f64;
        self.m2_x += delta_x * (x - self.mean_x);
        self.co += delta_x * (y - self.mean_y);
    }

    fn slope(&self) -> Option<f64> {
        let var_x = self.m2_x / self.count as f64;
        (self.count > 1 && var_x != 0.0).then(|| (self.co / self.count as f64) / var_x)
    }
}

fn ratio(numerator: i64, denominator: i64) -> Option<f64> {
    (denominator != 0).then(|| numerator as f64 / denominator as f64)
}

/// What one merchant's vector is computed from.
pub(crate) struct VectorInput<'a> {
    pub(crate) operator_id: &'a str,
    pub(crate) merchant_id: &'a str,
    /// The as-of date D (days since 1970-01-01).
    pub(crate) as_of: i32,
    /// The knowledge time K.
    pub(crate) knowledge_time: DateTime<Utc>,
    /// Its daily rows, every version (`None`: none known in the store's range).
    pub(crate) days: Option<&'a MerchantDays>,
    /// Its operator's feed days known at K in D − 456 … D − 1, in order.
    pub(crate) feed_days: &'a [i32],
    /// Its registry version valid on D − 1 as recorded by K.
    pub(crate) registered: Option<&'a MerchantRecord>,
    /// The bronze version the daily rows reflect.
    pub(crate) bronze_version: i64,
}

/// One `merchant_features` row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FeatureVector {
    pub(crate) operator_id: String,
    pub(crate) merchant_id: String,
    pub(crate) as_of_date: i32,
    pub(crate) knowledge_time: i64,
    pub(crate) days_on_book: i64,
    pub(crate) net_fen_7d: i64,
    pub(crate) net_fen_30d: i64,
    pub(crate) net_fen_90d: i64,
    pub(crate) net_fen_180d: i64,
    pub(crate) net_fen_365d: i64,
    pub(crate) sales_count_30d: i64,
    pub(crate) sales_count_90d: i64,
    pub(crate) active_days_30d: i64,
    pub(crate) active_days_90d: i64,
    pub(crate) active_day_ratio_30d: Option<f64>,
    pub(crate) active_day_ratio_90d: Option<f64>,
    pub(crate) avg_ticket_fen_30d: Option<i64>,
    pub(crate) avg_ticket_fen_90d: Option<i64>,
    pub(crate) refund_ratio_90d: Option<f64>,
    pub(crate) daily_net_cv_90d: Option<f64>,
    pub(crate) growth_mom_30d: Option<f64>,
    pub(crate) growth_yoy_90d: Option<f64>,
    pub(crate) trend_slope_26w: Option<f64>,
    pub(crate) max_zero_streak_90d: i64,
    pub(crate) days_since_last_sale: Option<i64>,
    pub(crate) weekend_share_90d: Option<f64>,
    pub(crate) night_share_90d: Option<f64>,
    pub(crate) round_amount_share_90d: Option<f64>,
    pub(crate) spike_ratio_30d_180d: Option<f64>,
    pub(crate) distinct_payers_90d: i64,
    pub(crate) repeat_payer_ratio_90d: Option<f64>,
    pub(crate) top5_payer_share_90d: Option<f64>,
    pub(crate) months_on_book: Option<i64>,
    pub(crate) coverage_ratio_90d: Option<f64>,
    pub(crate) rent_to_turnover_90d: Option<f64>,
    /// Percentile of `net_fen_90d` among the merchants of its operator and MCC at the
    /// same (D, K): set by [`peer_percentiles`] over a population, `None` alone.
    pub(crate) peer_pct_net_90d: Option<f64>,
    pub(crate) mcc: Option<String>,
    pub(crate) industry_code: Option<String>,
    pub(crate) subsidy_sector: Option<String>,
    pub(crate) bronze_version: i64,
}

/// Adds, failing loudly instead of wrapping (money is never allowed to wrap).
fn add(total: &mut i64, value: i64) -> Result<()> {
    *total = total.checked_add(value).ok_or_else(|| Error::Arrow {
        context: "computing merchant_features".to_owned(),
        source: streetflow_lake::arrow::error::ArrowError::ComputeError(
            "a feature sum overflows 64 bits".to_owned(),
        ),
    })?;
    Ok(())
}

/// The merchant's vector as of (D, K), or `None` when it has none: no day and no
/// registry version, or a history that starts on or after D.
pub(crate) fn feature_vector(
    input: &VectorInput<'_>,
    rules: &SubsidyRules,
) -> Result<Option<FeatureVector>> {
    let d = input.as_of;
    let k = input.knowledge_time.timestamp_micros();
    let lookback = LOOKBACK_DAYS as i32;
    let window = DayRange {
        first: d - lookback,
        last: d - 1,
    };
    let payer_from = d - PAYER_WINDOW_DAYS as i32;
    // calendar[n - 1] is D − n.
    let mut calendar = vec![Day::default(); LOOKBACK_DAYS as usize];
    let mut first_seen: Option<i32> = None;
    let mut payer_entries: Vec<(i64, i64, i64)> = Vec::new();
    if let Some(days) = input.days {
        for version in days.as_of(k).filter(|v| window.contains(v.date)) {
            first_seen = Some(first_seen.map_or(version.date, |seen| seen.min(version.date)));
            let slot = &mut calendar[(d - version.date) as usize - 1];
            slot.sales_count = version.sales_count;
            slot.sales_fen = version.sales_fen;
            slot.refund_fen = version.refund_fen;
            slot.net_fen = version.net_fen;
            slot.night_sales_fen = version.night_sales_fen;
            slot.round_sales_count = version.round_sales_count;
            if version.date >= payer_from {
                payer_entries.extend_from_slice(days.payers_of(version));
            }
        }
    }
    let mut first_feed_day: Option<i32> = None;
    for &day in input.feed_days {
        if window.contains(day) {
            calendar[(d - day) as usize - 1].feed_day = true;
            first_feed_day = Some(first_feed_day.map_or(day, |first| first.min(day)));
        }
    }

    let registered = input.registered;
    let Some(started_on) = registered.map(|r| days_of(r.opened_on)).or(first_seen) else {
        return Ok(None);
    };
    let history_start = first_feed_day.map_or(started_on, |first| started_on.max(first));
    if history_start >= d {
        return Ok(None);
    }

    // The windows: sums over the days on book, D − n for n = 1 … min(456, D − start).
    let book = (d - history_start).min(lookback);
    let mut w = Windows::default();
    let mut moments_90d = Moments::default();
    let (mut zero_run, mut max_zero_run) = (0_i64, 0_i64);
    let mut weeks: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for n in 1..=book {
        let day = calendar[n as usize - 1];
        let date = d - n;
        let sale_day = day.sales_count > 0;
        let within = |days: i32| n <= days;
        for (window, sum) in [
            (7, &mut w.net_7d),
            (30, &mut w.net_30d),
            (90, &mut w.net_90d),
            (180, &mut w.net_180d),
            (365, &mut w.net_365d),
        ] {
            if within(window) {
                add(sum, day.net_fen)?;
            }
        }
        if (31..=60).contains(&n) {
            add(&mut w.net_prev_30d, day.net_fen)?;
            w.book_prev_30d += 1;
        }
        if (366..=455).contains(&n) {
            add(&mut w.net_last_year, day.net_fen)?;
            w.book_last_year += 1;
        }
        if within(30) {
            add(&mut w.sales_count_30d, day.sales_count)?;
            add(&mut w.sales_fen_30d, day.sales_fen)?;
            w.active_30d += i64::from(sale_day);
            w.book_30d += 1;
        }
        if within(90) {
            add(&mut w.sales_count_90d, day.sales_count)?;
            add(&mut w.sales_fen_90d, day.sales_fen)?;
            add(&mut w.refund_fen_90d, day.refund_fen)?;
            w.active_90d += i64::from(sale_day);
            add(&mut w.night_fen_90d, day.night_sales_fen)?;
            add(&mut w.round_count_90d, day.round_sales_count)?;
            w.feed_90d += i64::from(day.feed_day);
            w.book_90d += 1;
            if is_weekend(date) {
                add(&mut w.weekend_fen_90d, day.sales_fen)?;
            }
            moments_90d.add(day.net_fen as f64);
            // Days are visited in order of days_before, so a zero-sales run is a streak.
            if sale_day {
                zero_run = 0;
            } else {
                zero_run += 1;
                max_zero_run = max_zero_run.max(zero_run);
            }
        }
        if within(180) {
            w.book_180d += 1;
        }
        if sale_day && w.days_since_last_sale.is_none() {
            w.days_since_last_sale = Some(i64::from(n));
        }
        if n <= 182 {
            let week = 25 - i64::from((n - 1) / 7);
            let entry = weeks.entry(week).or_default();
            add(&mut entry.0, day.net_fen)?;
            entry.1 += 1;
        }
    }
    let mut trend = Slope::default();
    for (&week, &(net_fen, days_in_week)) in &weeks {
        if days_in_week == 7 {
            let yuan = (net_fen as f64).max(0.0) / 100.0;
            trend.add((1.0 + yuan).ln(), week as f64);
        }
    }
    let trend_slope = if trend.count >= 4 {
        trend.slope()
    } else {
        None
    };

    // Payers over the last 90 days: each payer's visits and fen over its days.
    payer_entries.sort_unstable_by_key(|&(payer, _, _)| payer);
    let mut payer_fen: Vec<i64> = Vec::new();
    let mut repeat_payers = 0_i64;
    let mut current: Option<(i64, i64, i64)> = None;
    for entry in payer_entries.into_iter().map(Some).chain([None]) {
        match (current.as_mut(), entry) {
            (Some(open), Some((payer, visits, fen))) if open.0 == payer => {
                add(&mut open.1, visits)?;
                add(&mut open.2, fen)?;
            }
            _ => {
                if let Some((_, visits, fen)) = current.take() {
                    payer_fen.push(fen);
                    repeat_payers += i64::from(visits >= 2);
                }
                current = entry;
            }
        }
    }
    let distinct_payers = payer_fen.len() as i64;
    // The five largest payers (which five of equal ones does not change the sum).
    payer_fen.sort_unstable_by(|a, b| b.cmp(a));
    let top5_fen = if payer_fen.is_empty() {
        None
    } else {
        let mut top = 0_i64;
        for fen in payer_fen.iter().take(5) {
            add(&mut top, *fen)?;
        }
        Some(top)
    };

    let mean_90d = moments_90d.average();
    let as_of = date_of(d).unwrap_or_default();
    let months_on_book = date_of(started_on).map(|started| {
        (i64::from(as_of.year()) * 12 + i64::from(as_of.month()))
            - (i64::from(started.year()) * 12 + i64::from(started.month()))
            - i64::from(as_of.day() < started.day())
    });
    let mcc = registered.map(|r| r.mcc.clone());
    let industry_code = registered.and_then(|r| r.industry_code.clone());
    let rent = registered.and_then(|r| r.monthly_rent_fen);
    let subsidy_sector = rules
        .sector(mcc.as_deref(), industry_code.as_deref(), d)
        .map(str::to_owned);
    Ok(Some(FeatureVector {
        operator_id: input.operator_id.to_owned(),
        merchant_id: input.merchant_id.to_owned(),
        as_of_date: d,
        knowledge_time: k,
        days_on_book: i64::from(d - history_start),
        net_fen_7d: w.net_7d,
        net_fen_30d: w.net_30d,
        net_fen_90d: w.net_90d,
        net_fen_180d: w.net_180d,
        net_fen_365d: w.net_365d,
        sales_count_30d: w.sales_count_30d,
        sales_count_90d: w.sales_count_90d,
        active_days_30d: w.active_30d,
        active_days_90d: w.active_90d,
        active_day_ratio_30d: ratio(w.active_30d, w.book_30d),
        active_day_ratio_90d: ratio(w.active_90d, w.book_90d),
        avg_ticket_fen_30d: (w.sales_count_30d != 0).then(|| w.sales_fen_30d / w.sales_count_30d),
        avg_ticket_fen_90d: (w.sales_count_90d != 0).then(|| w.sales_fen_90d / w.sales_count_90d),
        refund_ratio_90d: ratio(w.refund_fen_90d, w.sales_fen_90d),
        daily_net_cv_90d: mean_90d
            .filter(|mean| *mean > 0.0)
            .and_then(|mean| Some(moments_90d.stddev_pop()? / mean)),
        growth_mom_30d: (w.book_prev_30d == 30 && w.net_prev_30d > 0)
            .then(|| w.net_30d as f64 / w.net_prev_30d as f64 - 1.0),
        growth_yoy_90d: (w.book_last_year == 90 && w.net_last_year > 0)
            .then(|| w.net_90d as f64 / w.net_last_year as f64 - 1.0),
        trend_slope_26w: trend_slope,
        max_zero_streak_90d: max_zero_run,
        days_since_last_sale: w.days_since_last_sale,
        weekend_share_90d: ratio(w.weekend_fen_90d, w.sales_fen_90d),
        night_share_90d: ratio(w.night_fen_90d, w.sales_fen_90d),
        round_amount_share_90d: ratio(w.round_count_90d, w.sales_count_90d),
        spike_ratio_30d_180d: (w.net_180d > 0 && w.book_30d > 0).then(|| {
            (w.net_30d as f64 / w.book_30d as f64) / (w.net_180d as f64 / w.book_180d as f64)
        }),
        distinct_payers_90d: distinct_payers,
        repeat_payer_ratio_90d: ratio(repeat_payers, distinct_payers),
        top5_payer_share_90d: top5_fen.and_then(|top| ratio(top, w.sales_fen_90d)),
        months_on_book,
        coverage_ratio_90d: ratio(w.feed_90d, w.book_90d),
        rent_to_turnover_90d: match rent.filter(|_| w.net_90d > 0) {
            Some(rent) => Some(
                rent.checked_mul(3).ok_or_else(|| Error::Arrow {
                    context: "computing merchant_features".to_owned(),
                    source: streetflow_lake::arrow::error::ArrowError::ComputeError(
                        "three months of rent overflow 64 bits".to_owned(),
                    ),
                })? as f64
                    / w.net_90d as f64,
            ),
            None => None,
        },
        peer_pct_net_90d: None,
        mcc,
        industry_code,
        subsidy_sector,
        bronze_version: input.bronze_version,
    }))
}

/// Sets `peer_pct_net_90d` of each vector with an MCC: the percent rank of its
/// `net_fen_90d` among the vectors of its operator and MCC, (rank − 1) / (n − 1) with
/// equal values sharing the lowest rank, 0 when it is alone.
pub(crate) fn peer_percentiles(vectors: &mut [FeatureVector]) {
    let mut groups: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for (i, vector) in vectors.iter().enumerate() {
        if let Some(mcc) = &vector.mcc {
            groups
                .entry((vector.operator_id.clone(), mcc.clone()))
                .or_default()
                .push(i);
        }
    }
    for members in groups.into_values() {
        let mut values: Vec<i64> = members.iter().map(|&i| vectors[i].net_fen_90d).collect();
        values.sort_unstable();
        let n = values.len();
        for &i in &members {
            let below = values.partition_point(|&v| v < vectors[i].net_fen_90d);
            vectors[i].peer_pct_net_90d = Some(if n > 1 {
                below as f64 / (n - 1) as f64
            } else {
                0.0
            });
        }
    }
}

/// Vectors as `merchant_features` rows.
pub(crate) fn vector_batch(vectors: &[FeatureVector]) -> Result<RecordBatch> {
    type Get<T> = fn(&FeatureVector) -> T;
    let long = |get: Get<i64>| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(vectors.iter().map(get)))
    };
    let maybe_long = |get: Get<Option<i64>>| -> ArrayRef {
        Arc::new(Int64Array::from_iter(vectors.iter().map(get)))
    };
    let double = |get: Get<Option<f64>>| -> ArrayRef {
        Arc::new(Float64Array::from_iter(vectors.iter().map(get)))
    };
    let text = |get: fn(&FeatureVector) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from_iter(vectors.iter().map(get)))
    };
    let mut columns = Vec::with_capacity(MERCHANT_FEATURES.schema.fields().len());
    for field in MERCHANT_FEATURES.schema.fields() {
        let column: ArrayRef = match field.name().as_str() {
            "as_of_date" => Arc::new(Date32Array::from_iter_values(
                vectors.iter().map(|v| v.as_of_date),
            )),
            "operator_id" => text(|v| Some(&v.operator_id)),
            "merchant_id" => text(|v| Some(&v.merchant_id)),
            "knowledge_time" => Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    vectors.iter().map(|v| v.knowledge_time),
                )
                .with_timezone("UTC"),
            ),
            "feature_set" => text(|_| Some(FEATURE_SET)),
            "days_on_book" => long(|v| v.days_on_book),
            "net_fen_7d" => long(|v| v.net_fen_7d),
            "net_fen_30d" => long(|v| v.net_fen_30d),
            "net_fen_90d" => long(|v| v.net_fen_90d),
            "net_fen_180d" => long(|v| v.net_fen_180d),
            "net_fen_365d" => long(|v| v.net_fen_365d),
            "sales_count_30d" => long(|v| v.sales_count_30d),
            "sales_count_90d" => long(|v| v.sales_count_90d),
            "active_days_30d" => long(|v| v.active_days_30d),
            "active_days_90d" => long(|v| v.active_days_90d),
            "active_day_ratio_30d" => double(|v| v.active_day_ratio_30d),
            "active_day_ratio_90d" => double(|v| v.active_day_ratio_90d),
            "avg_ticket_fen_30d" => maybe_long(|v| v.avg_ticket_fen_30d),
            "avg_ticket_fen_90d" => maybe_long(|v| v.avg_ticket_fen_90d),
            "refund_ratio_90d" => double(|v| v.refund_ratio_90d),
            "daily_net_cv_90d" => double(|v| v.daily_net_cv_90d),
            "growth_mom_30d" => double(|v| v.growth_mom_30d),
            "growth_yoy_90d" => double(|v| v.growth_yoy_90d),
            "trend_slope_26w" => double(|v| v.trend_slope_26w),
            "max_zero_streak_90d" => long(|v| v.max_zero_streak_90d),
            "days_since_last_sale" => maybe_long(|v| v.days_since_last_sale),
            "weekend_share_90d" => double(|v| v.weekend_share_90d),
            "night_share_90d" => double(|v| v.night_share_90d),
            "round_amount_share_90d" => double(|v| v.round_amount_share_90d),
            "spike_ratio_30d_180d" => double(|v| v.spike_ratio_30d_180d),
            "distinct_payers_90d" => long(|v| v.distinct_payers_90d),
            "repeat_payer_ratio_90d" => double(|v| v.repeat_payer_ratio_90d),
            "top5_payer_share_90d" => double(|v| v.top5_payer_share_90d),
            "months_on_book" => maybe_long(|v| v.months_on_book),
            "coverage_ratio_90d" => double(|v| v.coverage_ratio_90d),
            "rent_to_turnover_90d" => double(|v| v.rent_to_turnover_90d),
            "peer_pct_net_90d" => double(|v| v.peer_pct_net_90d),
            "mcc" => text(|v| v.mcc.as_deref()),
            "industry_code" => text(|v| v.industry_code.as_deref()),
            "subsidy_sector" => text(|v| v.subsidy_sector.as_deref()),
            "bronze_version" => long(|v| v.bronze_version),
            other => {
                return Err(Error::Arrow {
                    context: format!("merchant_features column {other} has no definition"),
                    source: streetflow_lake::arrow::error::ArrowError::SchemaError(
                        other.to_owned(),
                    ),
                });
            }
        };
        columns.push(column);
    }
    RecordBatch::try_new(MERCHANT_FEATURES.schema.clone(), columns)
        .map_err(arrow_error("merchant_features rows"))
}

/// Days since 1970-01-01 of a date.
fn days_of(date: NaiveDate) -> i32 {
    date.signed_duration_since(NaiveDate::default()).num_days() as i32
}

/// The date of a day number (days since 1970-01-01); `None` beyond chrono's range.
fn date_of(day: i32) -> Option<NaiveDate> {
    NaiveDate::default().checked_add_signed(chrono::Duration::days(i64::from(day)))
}

/// Whether a day number is a Saturday or Sunday (`date_part('dow', …)` 6 or 0).
fn is_weekend(day: i32) -> bool {
    date_of(day).is_some_and(|date| matches!(date.weekday().num_days_from_sunday(), 0 | 6))
}

/// The sums of the `windows` relation.
#[derive(Debug, Default)]
struct Windows {
    net_7d: i64,
    net_30d: i64,
    net_90d: i64,
    net_180d: i64,
    net_365d: i64,
    net_prev_30d: i64,
    net_last_year: i64,
    sales_count_30d: i64,
    sales_count_90d: i64,
    sales_fen_30d: i64,
    sales_fen_90d: i64,
    refund_fen_90d: i64,
    active_30d: i64,
    active_90d: i64,
    weekend_fen_90d: i64,
    night_fen_90d: i64,
    round_count_90d: i64,
    feed_90d: i64,
    book_30d: i64,
    book_90d: i64,
    book_180d: i64,
    book_prev_30d: i64,
    book_last_year: i64,
    days_since_last_sale: Option<i64>,
}
