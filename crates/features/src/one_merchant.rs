//! `merchant_features.sql` for one merchant, computed directly: the evaluation path of
//! `streetflow serve`.
//!
//! Run on DataFusion, the feature query is a plan of some 140 operators; over one
//! merchant's few hundred daily rows each does little, but together they take 3–10 ms,
//! most of a request's time. The same definitions over one merchant are a few loops over
//! a 456-day calendar. The SQL file stays the definition: the batch job runs it, and the
//! tests hold this module's rows equal to the SQL's on the synthetic district (integer
//! features exactly, ratios up to floating-point summation order).

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use streetflow_core::MerchantRecord;
use streetflow_core::registry::versions_on;
use streetflow_core::tables::MERCHANT_FEATURES;
use streetflow_lake::arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, AsArray, PrimitiveArray, RecordBatch,
};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::{Date32Type, Int64Type};
use streetflow_lake::datafusion::common::ScalarValue;

use crate::daily::{Strs, strings};
use crate::error::{Error, Result};
use crate::gold::{FEATURE_SET, LOOKBACK_DAYS, arrow_error, days};

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

/// What one merchant's feature row is computed from.
pub(crate) struct OneMerchant<'a> {
    pub operator_id: &'a str,
    pub merchant_id: &'a str,
    /// The as-of date D.
    pub as_of: NaiveDate,
    pub knowledge_time: DateTime<Utc>,
    /// Its registry versions (any; the one valid on D − 1 is used).
    pub registry: &'a [MerchantRecord],
    /// Its `daily` rows (dates D − 456 … D − 1), as [`crate::DailyBuilder`] gives them.
    pub daily: &'a [RecordBatch],
    /// Its `payer_sales` rows.
    pub payer_sales: &'a [RecordBatch],
    /// Its operator's feed days within the lookback (days since 1970-01-01).
    pub feed_days: &'a [i32],
    pub bronze_version: i64,
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

/// The merchant's feature row in `merchant_features`' columns (`peer_pct_net_90d`
/// null), or `None` when the query gives no row: no event and no registry version, or a
/// history that starts on or after D.
pub(crate) fn feature_row(
    input: &OneMerchant<'_>,
    rules: &SubsidyRules,
) -> Result<Option<RecordBatch>> {
    let d = days(input.as_of);
    let lookback = LOOKBACK_DAYS as i32;
    // calendar[n - 1] is D − n.
    let mut calendar = vec![Day::default(); LOOKBACK_DAYS as usize];
    let mut first_seen: Option<i32> = None;
    for batch in input.daily {
        let date = dates(batch, "business_date")?;
        let (sales_count, sales_fen) = (longs(batch, "sales_count")?, longs(batch, "sales_fen")?);
        let (refund_fen, net_fen) = (longs(batch, "refund_fen")?, longs(batch, "net_fen")?);
        let night_fen = longs(batch, "night_sales_fen")?;
        let round_count = longs(batch, "round_sales_count")?;
        for row in 0..batch.num_rows() {
            let day = date.value(row);
            first_seen = Some(first_seen.map_or(day, |seen| seen.min(day)));
            let before = d - day;
            if !(1..=lookback).contains(&before) {
                continue;
            }
            let slot = &mut calendar[before as usize - 1];
            slot.sales_count += sales_count.value(row);
            slot.sales_fen += sales_fen.value(row);
            slot.refund_fen += refund_fen.value(row);
            slot.net_fen += net_fen.value(row);
            slot.night_sales_fen += night_fen.value(row);
            slot.round_sales_count += round_count.value(row);
        }
    }
    let mut first_feed_day: Option<i32> = None;
    for &day in input.feed_days {
        let before = d - day;
        if (1..=lookback).contains(&before) {
            calendar[before as usize - 1].feed_day = true;
            first_feed_day = Some(first_feed_day.map_or(day, |first| first.min(day)));
        }
    }

    // The version valid on D − 1 (`input.registry` holds this merchant's versions only).
    let registered = versions_on(input.registry, input.as_of - chrono::Days::new(1))
        .remove(&(input.operator_id, input.merchant_id));
    let Some(started_on) = registered.map(|r| days(r.opened_on)).or(first_seen) else {
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
                *sum += day.net_fen;
            }
        }
        if (31..=60).contains(&n) {
            w.net_prev_30d += day.net_fen;
            w.book_prev_30d += 1;
        }
        if (366..=455).contains(&n) {
            w.net_last_year += day.net_fen;
            w.book_last_year += 1;
        }
        if within(30) {
            w.sales_count_30d += day.sales_count;
            w.sales_fen_30d += day.sales_fen;
            w.active_30d += i64::from(sale_day);
            w.book_30d += 1;
        }
        if within(90) {
            w.sales_count_90d += day.sales_count;
            w.sales_fen_90d += day.sales_fen;
            w.refund_fen_90d += day.refund_fen;
            w.active_90d += i64::from(sale_day);
            w.night_fen_90d += day.night_sales_fen;
            w.round_count_90d += day.round_sales_count;
            w.feed_90d += i64::from(day.feed_day);
            w.book_90d += 1;
            if is_weekend(date) {
                w.weekend_fen_90d += day.sales_fen;
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
            entry.0 += day.net_fen;
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

    // Payers over the last 90 days (payer_sales).
    let mut payers: Vec<(i64, String)> = Vec::new();
    let mut repeat_payers = 0_i64;
    for batch in input.payer_sales {
        let refs = strings(batch, "payer_ref")?;
        let refs_of = Strs::of(&refs);
        let (visits, fen) = (longs(batch, "visits")?, longs(batch, "fen")?);
        for row in 0..batch.num_rows() {
            payers.push((fen.value(row), refs_of.value(row).to_owned()));
            repeat_payers += i64::from(visits.value(row) >= 2);
        }
    }
    // The five largest payers, ties by payer reference.
    payers.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let top5_fen = (!payers.is_empty()).then(|| payers.iter().take(5).map(|p| p.0).sum::<i64>());
    let distinct_payers = payers.len() as i64;

    let mean_90d = moments_90d.average();
    let as_of = input.as_of;
    let months_on_book = date_of(started_on).map(|started| {
        (i64::from(as_of.year()) * 12 + i64::from(as_of.month()))
            - (i64::from(started.year()) * 12 + i64::from(started.month()))
            - i64::from(as_of.day() < started.day())
    });
    let mcc = registered.map(|r| r.mcc.as_str());
    let industry_code = registered.and_then(|r| r.industry_code.as_deref());
    let rent = registered.and_then(|r| r.monthly_rent_fen);

    let double = ScalarValue::Float64;
    let long = |value: i64| ScalarValue::Int64(Some(value));
    let text = |value: Option<&str>| ScalarValue::Utf8(value.map(str::to_owned));
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(MERCHANT_FEATURES.schema.fields().len());
    for field in MERCHANT_FEATURES.schema.fields() {
        let value = match field.name().as_str() {
            "as_of_date" => ScalarValue::Date32(Some(d)),
            "operator_id" => text(Some(input.operator_id)),
            "merchant_id" => text(Some(input.merchant_id)),
            "knowledge_time" => ScalarValue::TimestampMicrosecond(
                Some(input.knowledge_time.timestamp_micros()),
                Some("UTC".into()),
            ),
            "feature_set" => text(Some(FEATURE_SET)),
            "days_on_book" => long(i64::from(d - history_start)),
            "net_fen_7d" => long(w.net_7d),
            "net_fen_30d" => long(w.net_30d),
            "net_fen_90d" => long(w.net_90d),
            "net_fen_180d" => long(w.net_180d),
            "net_fen_365d" => long(w.net_365d),
            "sales_count_30d" => long(w.sales_count_30d),
            "sales_count_90d" => long(w.sales_count_90d),
            "active_days_30d" => long(w.active_30d),
            "active_days_90d" => long(w.active_90d),
            "active_day_ratio_30d" => double(ratio(w.active_30d, w.book_30d)),
            "active_day_ratio_90d" => double(ratio(w.active_90d, w.book_90d)),
            "avg_ticket_fen_30d" => ScalarValue::Int64(
                (w.sales_count_30d != 0).then(|| w.sales_fen_30d / w.sales_count_30d),
            ),
            "avg_ticket_fen_90d" => ScalarValue::Int64(
                (w.sales_count_90d != 0).then(|| w.sales_fen_90d / w.sales_count_90d),
            ),
            "refund_ratio_90d" => double(ratio(w.refund_fen_90d, w.sales_fen_90d)),
            "daily_net_cv_90d" => double(
                mean_90d
                    .filter(|mean| *mean > 0.0)
                    .and_then(|mean| Some(moments_90d.stddev_pop()? / mean)),
            ),
            "growth_mom_30d" => double(
                (w.book_prev_30d == 30 && w.net_prev_30d > 0)
                    .then(|| w.net_30d as f64 / w.net_prev_30d as f64 - 1.0),
            ),
            "growth_yoy_90d" => double(
                (w.book_last_year == 90 && w.net_last_year > 0)
                    .then(|| w.net_90d as f64 / w.net_last_year as f64 - 1.0),
            ),
            "trend_slope_26w" => double(trend_slope),
            "max_zero_streak_90d" => long(max_zero_run),
            "days_since_last_sale" => ScalarValue::Int64(w.days_since_last_sale),
            "weekend_share_90d" => double(ratio(w.weekend_fen_90d, w.sales_fen_90d)),
            "night_share_90d" => double(ratio(w.night_fen_90d, w.sales_fen_90d)),
            "round_amount_share_90d" => double(ratio(w.round_count_90d, w.sales_count_90d)),
            "spike_ratio_30d_180d" => double((w.net_180d > 0 && w.book_30d > 0).then(|| {
                (w.net_30d as f64 / w.book_30d as f64) / (w.net_180d as f64 / w.book_180d as f64)
            })),
            "distinct_payers_90d" => long(distinct_payers),
            "repeat_payer_ratio_90d" => double(ratio(repeat_payers, distinct_payers)),
            "top5_payer_share_90d" => double(top5_fen.and_then(|top| ratio(top, w.sales_fen_90d))),
            "months_on_book" => ScalarValue::Int64(months_on_book),
            "coverage_ratio_90d" => double(ratio(w.feed_90d, w.book_90d)),
            "rent_to_turnover_90d" => double(
                rent.filter(|_| w.net_90d > 0)
                    .map(|rent| (rent * 3) as f64 / w.net_90d as f64),
            ),
            "peer_pct_net_90d" => double(None),
            "mcc" => text(mcc),
            "industry_code" => text(industry_code),
            "subsidy_sector" => text(rules.sector(mcc, industry_code, d)),
            "bronze_version" => long(input.bronze_version),
            other => {
                return Err(Error::Arrow {
                    context: format!("merchant_features column {other} has no definition"),
                    source: streetflow_lake::arrow::error::ArrowError::SchemaError(
                        other.to_owned(),
                    ),
                });
            }
        };
        let array = value.to_array_of_size(1).map_err(|e| Error::Arrow {
            context: format!("feature {}: {e}", field.name()),
            source: streetflow_lake::arrow::error::ArrowError::ComputeError(e.to_string()),
        })?;
        let array = if array.data_type() == field.data_type() {
            array
        } else {
            cast(&array, field.data_type()).map_err(arrow_error(field.name()))?
        };
        columns.push(array);
    }
    RecordBatch::try_new(MERCHANT_FEATURES.schema.clone(), columns)
        .map(Some)
        .map_err(arrow_error("merchant_features row"))
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
