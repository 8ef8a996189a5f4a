//! Decisions read back from `credit_decisions`, for reports and reviews.

use chrono::NaiveDate;
use serde_json::Value;
use streetflow_core::tables::CREDIT_DECISIONS;
use streetflow_lake::{Lake, json_int, json_text as text};

use crate::decide::{Decision, Outcome};
use crate::error::{Error, Result};

/// One stored decision with the product and policy version it was made under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionRecord {
    /// Product id.
    pub product: String,
    /// Version of the product's policy.
    pub policy_version: String,
    /// The decision.
    pub decision: Decision,
}

/// Every decision stored as of `as_of`, ordered by product, operator and merchant. No
/// table, or no decision for the date, is [`Error::NoDecisions`].
pub async fn stored_decisions(lake: &Lake, as_of: NaiveDate) -> Result<Vec<DecisionRecord>> {
    if lake.open(CREDIT_DECISIONS.name).await?.is_none() {
        return Err(Error::NoDecisions(as_of));
    }
    let batches = lake
        .query(&format!(
            "SELECT operator_id, merchant_id, product, policy_version, decision, limit_fen, \
             array_to_string(reasons, ',') AS reasons, subsidy_sector, subsidy_eligible, \
             feature_set, bronze_version \
             FROM credit_decisions WHERE as_of_date = DATE '{as_of}' \
             ORDER BY product, operator_id, merchant_id"
        ))
        .await?;
    let rows = streetflow_lake::rows_json(&batches)?;
    if rows.is_empty() {
        return Err(Error::NoDecisions(as_of));
    }
    rows.iter()
        .map(|row| {
            let outcome = text(row, "decision");
            Ok(DecisionRecord {
                product: text(row, "product"),
                policy_version: text(row, "policy_version"),
                decision: Decision {
                    operator_id: text(row, "operator_id"),
                    merchant_id: text(row, "merchant_id"),
                    decision: Outcome::parse(&outcome).ok_or_else(|| {
                        Error::Internal(format!("a stored decision reads {outcome:?}"))
                    })?,
                    limit_fen: json_int(row, "limit_fen"),
                    reasons: text(row, "reasons")
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    subsidy_sector: row
                        .get("subsidy_sector")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    subsidy_eligible: row
                        .get("subsidy_eligible")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    feature_set: text(row, "feature_set"),
                    bronze_version: json_int(row, "bronze_version"),
                },
            })
        })
        .collect()
}
