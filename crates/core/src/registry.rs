//! The merchant registry: reference data operators deliver as CSV or JSON Lines.
//!
//! One row is one version of a merchant's record, valid from `valid_from` until the
//! next version's `valid_from`. Column names and order are the public file format
//! (`schemas/README.md`).

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// One version of a merchant's registry record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantRecord {
    /// District operator.
    pub operator_id: String,
    /// Merchant, scoped by the operator.
    pub merchant_id: String,
    /// Shop name as registered.
    pub name: String,
    /// Merchant category code (ISO 18245), four digits.
    pub mcc: String,
    /// Registered industry (GB/T 4754 code), when the operator knows it.
    #[serde(default)]
    pub industry_code: Option<String>,
    /// Date the shop opened (may precede the data).
    pub opened_on: NaiveDate,
    /// Monthly rent in fen, when the operator shares it.
    #[serde(default)]
    pub monthly_rent_fen: Option<i64>,
    /// End of the current lease.
    #[serde(default)]
    pub lease_end: Option<NaiveDate>,
    /// First date this version of the record applies.
    pub valid_from: NaiveDate,
}
