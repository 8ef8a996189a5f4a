//! The merchant registry: reference data operators deliver as CSV or JSON Lines.
//!
//! One row is one version of a merchant's record, valid from `valid_from` until the
//! next version's `valid_from`. Column names and order are the public file format
//! (`schemas/README.md`).

use std::collections::BTreeMap;

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

/// The version of each merchant's record valid on `day`: per (operator, merchant), the
/// version with the latest `valid_from` on or before it (the first listed of equal ones).
pub fn versions_on(
    records: &[MerchantRecord],
    day: NaiveDate,
) -> BTreeMap<(&str, &str), &MerchantRecord> {
    let mut current: BTreeMap<(&str, &str), &MerchantRecord> = BTreeMap::new();
    for record in records.iter().filter(|r| r.valid_from <= day) {
        let key = (record.operator_id.as_str(), record.merchant_id.as_str());
        if current
            .get(&key)
            .is_none_or(|seen| seen.valid_from < record.valid_from)
        {
            current.insert(key, record);
        }
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(merchant: &str, mcc: &str, valid_from: (i32, u32, u32)) -> MerchantRecord {
        let (y, m, d) = valid_from;
        let valid_from = NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default();
        MerchantRecord {
            operator_id: "lane".into(),
            merchant_id: merchant.into(),
            name: merchant.into(),
            mcc: mcc.into(),
            industry_code: None,
            opened_on: valid_from,
            monthly_rent_fen: None,
            lease_end: None,
            valid_from,
        }
    }

    #[test]
    fn the_latest_version_on_the_day_applies() {
        let records = [
            version("cafe", "5812", (2025, 1, 1)),
            version("cafe", "5814", (2025, 6, 1)),
            version("cafe", "5813", (2025, 6, 1)),
            version("shop", "5651", (2025, 7, 1)),
        ];
        let day = |m, d| NaiveDate::from_ymd_opt(2025, m, d).unwrap_or_default();
        let mcc_on = |on| {
            versions_on(&records, on)
                .into_iter()
                .map(|((_, merchant), r)| format!("{merchant}:{}", r.mcc))
                .collect::<Vec<_>>()
        };
        assert_eq!(mcc_on(day(5, 31)), ["cafe:5812"]);
        // On the day a version starts it applies; of two starting together, the first.
        assert_eq!(mcc_on(day(6, 1)), ["cafe:5814"]);
        assert_eq!(mcc_on(day(7, 1)), ["cafe:5814", "shop:5651"]);
        assert!(mcc_on(day(1, 1) - chrono::Days::new(1)).is_empty());
    }
}
