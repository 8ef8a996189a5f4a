//! What the generator knows besides the events: ground truth, the merchant registry and
//! each merchant's hidden archetype, with their CSV writers.

use std::io::Write;

use chrono::NaiveDate;
use serde::Serialize;
use streetflow_core::MerchantRecord;

/// Exact expected figures of one merchant on one business date, as the silver table
/// `merchant_daily` must compute them (deduplicated, voids cancelling their sale,
/// refunds on their own date).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DayTruth {
    /// Sales not voided.
    pub sales_count: u32,
    /// Sum of sales not voided, fen.
    pub sales_fen: i64,
    /// Refunds dated this day (including orphans).
    pub refund_count: u32,
    /// Sum of those refunds, fen.
    pub refund_fen: i64,
    /// Sales of this day that a void cancelled.
    pub void_count: u32,
    /// Refunds whose sale is not in the feed.
    pub orphan_refund_count: u32,
    /// Voids whose sale is not in the feed, on the void's own date.
    pub orphan_void_count: u32,
}

impl DayTruth {
    /// `sales_fen − refund_fen`.
    pub fn net_fen(&self) -> i64 {
        self.sales_fen - self.refund_fen
    }

    /// Whether anything happened.
    pub fn is_empty(&self) -> bool {
        *self == DayTruth::default()
    }
}

/// One row of `truth.csv`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TruthRow {
    /// Operator.
    pub operator_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Business date.
    pub business_date: NaiveDate,
    /// See [`DayTruth`].
    pub sales_count: u32,
    /// See [`DayTruth`].
    pub sales_fen: i64,
    /// See [`DayTruth`].
    pub refund_count: u32,
    /// See [`DayTruth`].
    pub refund_fen: i64,
    /// See [`DayTruth`].
    pub void_count: u32,
    /// `sales_fen − refund_fen`.
    pub net_fen: i64,
    /// See [`DayTruth`].
    pub orphan_refund_count: u32,
    /// See [`DayTruth`].
    pub orphan_void_count: u32,
}

impl TruthRow {
    pub(crate) fn new(operator_id: &str, merchant_id: &str, date: NaiveDate, t: &DayTruth) -> Self {
        Self {
            operator_id: operator_id.to_owned(),
            merchant_id: merchant_id.to_owned(),
            business_date: date,
            sales_count: t.sales_count,
            sales_fen: t.sales_fen,
            refund_count: t.refund_count,
            refund_fen: t.refund_fen,
            void_count: t.void_count,
            net_fen: t.net_fen(),
            orphan_refund_count: t.orphan_refund_count,
            orphan_void_count: t.orphan_void_count,
        }
    }
}

/// The hidden story of one merchant, for tests that check what models conclude.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MerchantProfile {
    /// Operator.
    pub operator_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// [`crate::Archetype::as_str`].
    pub archetype: &'static str,
    /// Opening date (may precede the data).
    pub opened_on: NaiveDate,
    /// Last trading day of a declining merchant.
    pub closes_on: Option<NaiveDate>,
    /// First day of a pumping merchant's self-payments.
    pub pumping_from: Option<NaiveDate>,
}

fn write_csv<T: Serialize>(rows: impl IntoIterator<Item = T>, out: impl Write) -> csv::Result<()> {
    let mut writer = csv::Writer::from_writer(out);
    for row in rows {
        writer.serialize(row)?;
    }
    writer.flush()?;
    Ok(())
}

/// Writes `truth.csv`.
pub fn write_truth_csv<'a>(
    rows: impl IntoIterator<Item = &'a TruthRow>,
    out: impl Write,
) -> csv::Result<()> {
    write_csv(rows, out)
}

/// Writes the merchant registry (`merchants.csv`) in the contract's column order.
pub fn write_registry_csv<'a>(
    rows: impl IntoIterator<Item = &'a MerchantRecord>,
    out: impl Write,
) -> csv::Result<()> {
    write_csv(rows, out)
}

/// Writes the hidden profiles (`profiles.csv`).
pub fn write_profiles_csv<'a>(
    rows: impl IntoIterator<Item = &'a MerchantProfile>,
    out: impl Write,
) -> csv::Result<()> {
    write_csv(rows, out)
}
