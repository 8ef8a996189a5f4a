//! Stored features and daily cash flow read back for a few merchants, for reports.

use chrono::NaiveDate;
use serde_json::{Map, Value};
use streetflow_core::Channel;

use crate::error::Result;
use crate::gold::sql_literal;
use streetflow_lake::{Lake, json_int, json_text as text};

/// One merchant-day of `merchant_daily` (money in fen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyCashFlow {
    /// District operator.
    pub operator_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Business date.
    pub business_date: NaiveDate,
    /// Sales less refunds.
    pub net_fen: i64,
    /// Sales by channel, in the order of [`Channel::ALL`].
    pub channel_fen: [i64; Channel::ALL.len()],
}

/// `merchant_id IN (…)` for the merchants of `merchants` (operators are told apart by
/// the caller: ids are unique within an operator only).
fn merchants_in(merchants: &[(String, String)]) -> String {
    let list: Vec<String> = merchants.iter().map(|(_, m)| sql_literal(m)).collect();
    format!("merchant_id IN ({})", list.join(", "))
}

/// The stored feature vectors as of `as_of` of `merchants` ((operator, merchant) pairs),
/// as JSON objects (dates as `YYYY-MM-DD`).
pub async fn stored_features(
    lake: &Lake,
    as_of: NaiveDate,
    merchants: &[(String, String)],
) -> Result<Vec<Map<String, Value>>> {
    if merchants.is_empty() {
        return Ok(Vec::new());
    }
    let batches = lake
        .query(&format!(
            "SELECT * FROM merchant_features WHERE as_of_date = DATE '{as_of}' AND {}",
            merchants_in(merchants)
        ))
        .await?;
    let rows = streetflow_lake::rows_json(&batches)?;
    Ok(rows
        .into_iter()
        .filter(|row| {
            let key = (text(row, "operator_id"), text(row, "merchant_id"));
            merchants.contains(&key)
        })
        .collect())
}

/// The latest daily rows of `merchants` for the business dates `first` ≤ d < `until`.
pub async fn daily_cash_flow(
    lake: &Lake,
    first: NaiveDate,
    until: NaiveDate,
    merchants: &[(String, String)],
) -> Result<Vec<DailyCashFlow>> {
    if merchants.is_empty() {
        return Ok(Vec::new());
    }
    let channels: Vec<String> = Channel::ALL
        .iter()
        .map(|c| format!("{}_fen", c.as_str()))
        .collect();
    let batches = lake
        .query(&format!(
            "SELECT operator_id, merchant_id, CAST(business_date AS VARCHAR) AS day, net_fen, {} \
             FROM merchant_daily WHERE business_date >= DATE '{first}' \
             AND business_date < DATE '{until}' AND {}",
            channels.join(", "),
            merchants_in(merchants)
        ))
        .await?;
    let mut days = Vec::new();
    for row in streetflow_lake::rows_json(&batches)? {
        let key = (text(&row, "operator_id"), text(&row, "merchant_id"));
        let Ok(business_date) = text(&row, "day").parse::<NaiveDate>() else {
            continue;
        };
        if !merchants.contains(&key) {
            continue;
        }
        let mut channel_fen = [0; Channel::ALL.len()];
        for (slot, name) in channel_fen.iter_mut().zip(&channels) {
            *slot = json_int(&row, name);
        }
        days.push(DailyCashFlow {
            operator_id: key.0,
            merchant_id: key.1,
            business_date,
            net_fen: json_int(&row, "net_fen"),
            channel_fen,
        });
    }
    Ok(days)
}
