//! The merchant registry: reference data operators deliver as CSV or JSON Lines.
//!
//! One row is one version of a merchant's record, valid from `valid_from` until the
//! next version's `valid_from`. The registry is bitemporal: `recorded_at` says when the
//! bank recorded a version, so a correction recorded later (a backdated opening date,
//! rent or MCC) does not change what a vector as of an earlier knowledge time saw.
//! Column names and order are the public file format (`schemas/README.md`).

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
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
    /// When the bank recorded this version (RFC 3339). Versions without it count as
    /// known from the start, which protects no earlier vector from a later correction:
    /// load files into the lake (`streetflow registry load`), which stamps it.
    #[serde(default)]
    pub recorded_at: Option<DateTime<Utc>>,
}

/// The version of each merchant's record valid on `day` as the bank knew it at
/// `known_at` (`None`: everything recorded): per (operator, merchant), among the versions
/// recorded by then, the one with the latest `valid_from` on or before `day`; of versions
/// with the same `valid_from` the one recorded last (a correction), then the first listed.
pub fn versions_on(
    records: &[MerchantRecord],
    day: NaiveDate,
    known_at: Option<DateTime<Utc>>,
) -> BTreeMap<(&str, &str), &MerchantRecord> {
    let mut current: BTreeMap<(&str, &str), &MerchantRecord> = BTreeMap::new();
    let recorded = |r: &MerchantRecord| {
        known_at.is_none_or(|k| r.recorded_at.is_none_or(|recorded| recorded <= k))
    };
    for record in records
        .iter()
        .filter(|r| r.valid_from <= day && recorded(r))
    {
        let key = (record.operator_id.as_str(), record.merchant_id.as_str());
        if current.get(&key).is_none_or(|seen| {
            (seen.valid_from, seen.recorded_at) < (record.valid_from, record.recorded_at)
        }) {
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
            recorded_at: None,
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
            versions_on(&records, on, None)
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

    #[test]
    fn a_correction_recorded_later_is_unknown_before_it_was_recorded() {
        let at = |h: i64| DateTime::from_timestamp(1_750_000_000 + h * 3600, 0);
        let mut first = version("cafe", "5812", (2025, 1, 1));
        first.recorded_at = at(0);
        // The same version corrected (MCC 5814 all along), recorded two hours later.
        let mut corrected = version("cafe", "5814", (2025, 1, 1));
        corrected.recorded_at = at(2);
        // A future version recorded in advance.
        let mut next = version("cafe", "5813", (2025, 7, 1));
        next.recorded_at = at(1);
        let records = [corrected, first, next];
        let mcc = |day: (u32, u32), known: Option<DateTime<Utc>>| {
            let on = NaiveDate::from_ymd_opt(2025, day.0, day.1).unwrap_or_default();
            versions_on(&records, on, known)
                .values()
                .map(|r| r.mcc.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(mcc((3, 1), at(1)), ["5812"]);
        assert_eq!(mcc((3, 1), at(2)), ["5814"]);
        assert_eq!(mcc((3, 1), None), ["5814"]);
        assert_eq!(mcc((8, 1), at(1)), ["5813"]);
        assert!(mcc((3, 1), DateTime::from_timestamp(0, 0)).is_empty());
    }
}
