//! Operator CSV exports: a mapping file says which column holds which event field, and
//! each row becomes the `pos_transaction/v1` JSON object the decoder checks. Nothing is
//! validated here: a row that cannot be converted keeps its odd value, so the one decoder
//! rejects it with the same reason code a Kafka message would get.

use std::collections::BTreeMap;

use chrono::{LocalResult, NaiveDateTime, TimeZone};
use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::time::parse_rfc3339;

/// A mapping file that cannot be used, or a header it does not fit; the message lists
/// every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MappingError(pub String);

type Result<T> = std::result::Result<T, MappingError>;

/// Event fields a mapping may fill, in contract order.
const FIELDS: [&str; 11] = [
    "event_id",
    "operator_id",
    "merchant_id",
    "terminal_id",
    "kind",
    "amount_fen",
    "currency",
    "occurred_at",
    "channel",
    "ref_event_id",
    "payer_ref",
];

/// Unit of the amount column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AmountUnit {
    /// Integer fen, as in the event contract.
    #[default]
    Fen,
    /// Yuan with at most two decimals (`12.50`); converted to fen exactly, never via
    /// floating point.
    Yuan,
}

/// How a CSV export maps onto the event contract (a TOML file; see
/// `pipelines/backfill/csv-mapping.example.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvMapping {
    /// Field separator (one byte); default `,`.
    #[serde(default = "comma")]
    pub delimiter: char,
    /// Whether the first row names the columns; without it, `columns` name 1-based
    /// column numbers (`"3"`).
    #[serde(default = "yes")]
    pub header: bool,
    /// Unit of the `amount` column.
    #[serde(default)]
    pub amount_unit: AmountUnit,
    /// Zone of `occurred_at` values written without an offset (IANA name). Values with
    /// an offset keep it.
    #[serde(default)]
    pub timezone: Option<String>,
    /// chrono format of offset-less `occurred_at` values; by default
    /// `%Y-%m-%d %H:%M:%S%.f` and the same with `T` or `/` are tried.
    #[serde(default)]
    pub timestamp_format: Option<String>,
    /// Event field → column. The amount's key is `amount` (unit: `amount_unit`).
    pub columns: BTreeMap<String, String>,
    /// Event field → the same value for every row (e.g. `operator_id`, `currency`).
    #[serde(default)]
    pub constants: BTreeMap<String, String>,
    /// Event field → (value in the export → value of the contract), e.g. `kind`
    /// `"SALE" → "sale"`. Values without an entry pass unchanged.
    #[serde(default)]
    pub values: BTreeMap<String, BTreeMap<String, String>>,
}

fn comma() -> char {
    ','
}

fn yes() -> bool {
    true
}

/// The contract field a mapping key fills (`amount` fills `amount_fen`).
fn contract_field(key: &str) -> &str {
    if key == "amount" { "amount_fen" } else { key }
}

impl CsvMapping {
    /// Parses and checks a mapping file's text, reporting every problem at once.
    pub fn from_toml(text: &str) -> Result<Self> {
        let mapping: CsvMapping =
            toml::from_str(text).map_err(|e| MappingError(format!("CSV mapping: {e}")))?;
        let mut problems = Vec::new();
        if !mapping.delimiter.is_ascii() {
            problems.push(format!(
                "delimiter {:?} is not one ASCII character",
                mapping.delimiter
            ));
        }
        for key in mapping.columns.keys().chain(mapping.constants.keys()) {
            if !FIELDS.contains(&contract_field(key)) || key == "amount_fen" {
                problems.push(format!(
                    "unknown event field {key:?} (known: {}, with the amount as \"amount\")",
                    FIELDS
                        .iter()
                        .filter(|f| **f != "amount_fen")
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        for key in mapping.columns.keys() {
            if mapping.constants.contains_key(key) {
                problems.push(format!("{key:?} is both a column and a constant"));
            }
        }
        for key in mapping.values.keys() {
            if !mapping.columns.contains_key(key) {
                problems.push(format!("values for {key:?}, which is not a mapped column"));
            }
        }
        for required in [
            "event_id",
            "operator_id",
            "merchant_id",
            "kind",
            "amount",
            "occurred_at",
        ] {
            if !mapping.columns.contains_key(required) && !mapping.constants.contains_key(required)
            {
                problems.push(format!("no column or constant for {required:?}"));
            }
        }
        if let Some(zone) = &mapping.timezone
            && zone.parse::<Tz>().is_err()
        {
            problems.push(format!("unknown time zone {zone:?}"));
        }
        if !mapping.header {
            for column in mapping.columns.values() {
                if column.parse::<usize>().map_or(true, |n| n == 0) {
                    problems.push(format!(
                        "without a header, columns are numbers from 1; {column:?} is not"
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(mapping)
        } else {
            Err(MappingError(format!(
                "CSV mapping has {} problem(s):\n  - {}",
                problems.len(),
                problems.join("\n  - ")
            )))
        }
    }

    /// Resolves the columns against the header row (or column numbers).
    pub fn bind(&self, header: Option<&csv::StringRecord>) -> Result<BoundMapping> {
        let mut columns = Vec::new();
        let mut missing = Vec::new();
        for (key, column) in &self.columns {
            let index = match header {
                Some(header) => header.iter().position(|name| name.trim() == column),
                None => column.parse::<usize>().ok().and_then(|n| n.checked_sub(1)),
            };
            match index {
                Some(index) => columns.push((contract_field(key).to_owned(), index)),
                None => missing.push(column.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(MappingError(format!(
                "the CSV header has no column {} (it has: {})",
                missing.join(", "),
                header
                    .map(|h| h.iter().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            )));
        }
        Ok(BoundMapping {
            columns,
            constants: self
                .constants
                .iter()
                .map(|(k, v)| (contract_field(k).to_owned(), v.clone()))
                .collect(),
            values: self
                .values
                .iter()
                .map(|(k, v)| (contract_field(k).to_owned(), v.clone()))
                .collect(),
            amount_unit: self.amount_unit,
            timezone: self.timezone.as_deref().and_then(|z| z.parse().ok()),
            timestamp_format: self.timestamp_format.clone(),
        })
    }

    /// The `csv` reader settings of this mapping.
    pub fn reader_builder(&self) -> csv::ReaderBuilder {
        let mut builder = csv::ReaderBuilder::new();
        builder
            .delimiter(u8::try_from(self.delimiter).unwrap_or(b','))
            .has_headers(self.header)
            .flexible(true);
        builder
    }
}

/// A mapping bound to one file's columns.
#[derive(Debug, Clone)]
pub struct BoundMapping {
    columns: Vec<(String, usize)>,
    constants: Vec<(String, String)>,
    values: BTreeMap<String, BTreeMap<String, String>>,
    amount_unit: AmountUnit,
    timezone: Option<Tz>,
    timestamp_format: Option<String>,
}

impl BoundMapping {
    /// The event JSON of one row (empty cells leave the field out), and its
    /// `occurred_at` as written there (for a stream clock, without parsing the JSON back).
    pub fn to_event_json(&self, row: &csv::StringRecord) -> (Vec<u8>, Option<String>) {
        let mut object = Map::new();
        for (field, value) in &self.constants {
            object.insert(field.clone(), Value::String(value.clone()));
        }
        for (field, index) in &self.columns {
            let Some(cell) = row.get(*index).map(str::trim).filter(|c| !c.is_empty()) else {
                continue;
            };
            let cell = self
                .values
                .get(field)
                .and_then(|map| map.get(cell))
                .map_or(cell, String::as_str);
            let value = match field.as_str() {
                "amount_fen" => amount_value(cell, self.amount_unit),
                "occurred_at" => Value::String(self.timestamp(cell)),
                _ => Value::String(cell.to_owned()),
            };
            object.insert(field.clone(), value);
        }
        let occurred_at = object
            .get("occurred_at")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let json = serde_json::to_vec(&Value::Object(object)).unwrap_or_default();
        (json, occurred_at)
    }

    /// An RFC 3339 timestamp for a cell: kept when it has an offset, placed in the
    /// mapping's zone when it has none; left as written when it cannot be read (the
    /// decoder then rejects it as `bad_timestamp`).
    fn timestamp(&self, cell: &str) -> String {
        if parse_rfc3339(cell).is_some() {
            return cell.to_owned();
        }
        let Some(zone) = self.timezone else {
            return cell.to_owned();
        };
        let parsed = match &self.timestamp_format {
            Some(format) => NaiveDateTime::parse_from_str(cell, format).ok(),
            None => [
                "%Y-%m-%d %H:%M:%S%.f",
                "%Y-%m-%dT%H:%M:%S%.f",
                "%Y/%m/%d %H:%M:%S%.f",
            ]
            .iter()
            .find_map(|format| NaiveDateTime::parse_from_str(cell, format).ok()),
        };
        match parsed.map(|local| zone.from_local_datetime(&local)) {
            // In a daylight-saving fold the earlier instant is taken, as most POS
            // systems log wall-clock time without a fold marker.
            Some(LocalResult::Single(at) | LocalResult::Ambiguous(at, _)) => {
                at.fixed_offset().to_rfc3339()
            }
            _ => cell.to_owned(),
        }
    }
}

/// The `amount_fen` JSON value of an amount cell: an integer when it converts exactly,
/// otherwise the text itself (which the decoder rejects as `bad_amount`).
fn amount_value(cell: &str, unit: AmountUnit) -> Value {
    let fen = match unit {
        AmountUnit::Fen => cell.parse::<i64>().ok(),
        AmountUnit::Yuan => yuan_to_fen(cell),
    };
    fen.map_or_else(|| Value::String(cell.to_owned()), Value::from)
}

/// `"12.5"` → 1250 fen, exactly; `None` for more than two decimals, signs other than a
/// leading `-`, or overflow.
fn yuan_to_fen(text: &str) -> Option<i64> {
    let text = text.replace(',', "");
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || fraction.len() > 2
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let mut fen = whole.parse::<i64>().ok()?.checked_mul(100)?;
    if !fraction.is_empty() {
        let cents = fraction.parse::<i64>().ok()? * if fraction.len() == 1 { 10 } else { 1 };
        fen = fen.checked_add(cents)?;
    }
    Some(if negative { -fen } else { fen })
}

/// The row as CSV text again (for a dead letter's payload).
pub fn row_as_csv(row: &csv::StringRecord, delimiter: u8) -> Vec<u8> {
    // A reader drops a byte-order mark at the start of its input: a first cell that
    // begins with one is quoted, so the payload reads back as the row (found by fuzzing).
    let quote = if row.get(0).is_some_and(|cell| cell.starts_with('\u{feff}')) {
        csv::QuoteStyle::Always
    } else {
        csv::QuoteStyle::Necessary
    };
    let mut writer = csv::WriterBuilder::new()
        .delimiter(delimiter)
        .quote_style(quote)
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    let _ = writer.write_record(row);
    let mut bytes = writer.into_inner().unwrap_or_default();
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPPING: &str = r#"
        amount_unit = "yuan"
        timezone = "Asia/Shanghai"
        [columns]
        event_id = "流水号"
        merchant_id = "商户"
        occurred_at = "时间"
        amount = "金额"
        kind = "类型"
        channel = "渠道"
        ref_event_id = "原流水号"
        [constants]
        operator_id = "silverfish-lane"
        currency = "CNY"
        [values.kind]
        "消费" = "sale"
        "退款" = "refund"
        [values.channel]
        "微信" = "wechat"
    "#;

    fn convert(row: &[&str]) -> Value {
        let mapping = CsvMapping::from_toml(MAPPING).expect("mapping parses");
        let header = csv::StringRecord::from(vec![
            "流水号",
            "商户",
            "时间",
            "金额",
            "类型",
            "渠道",
            "原流水号",
        ]);
        let bound = mapping.bind(Some(&header)).expect("header has the columns");
        let (json, occurred_at) = bound.to_event_json(&csv::StringRecord::from(row.to_vec()));
        let event: Value = serde_json::from_slice(&json).expect("valid JSON");
        assert_eq!(event["occurred_at"].as_str(), occurred_at.as_deref());
        event
    }

    #[test]
    fn a_row_becomes_the_event_json_with_exact_fen_and_an_offset() {
        let event = convert(&[
            "T1",
            "m-001",
            "2026-03-01 12:30:00",
            "12.5",
            "消费",
            "微信",
            "",
        ]);
        assert_eq!(
            event,
            serde_json::json!({
                "event_id": "T1", "merchant_id": "m-001", "operator_id": "silverfish-lane",
                "currency": "CNY", "occurred_at": "2026-03-01T12:30:00+08:00",
                "amount_fen": 1250, "kind": "sale", "channel": "wechat"
            })
        );
    }

    #[test]
    fn values_that_do_not_convert_are_passed_on_for_the_decoder_to_reject() {
        let event = convert(&["T2", "m-001", "yesterday", "12.345", "退款", "cash", "T1"]);
        assert_eq!(event["amount_fen"], "12.345");
        assert_eq!(event["occurred_at"], "yesterday");
        assert_eq!(event["kind"], "refund");
        assert_eq!(event["channel"], "cash");
        assert_eq!(event["ref_event_id"], "T1");
    }

    #[test]
    fn the_shipped_example_mapping_is_valid() {
        let text = include_str!("../../../pipelines/backfill/csv-mapping.example.toml");
        let mapping = CsvMapping::from_toml(text).expect("example parses");
        assert_eq!(mapping.amount_unit, AmountUnit::Yuan);
        assert_eq!(mapping.columns.len(), 9);
    }

    #[test]
    fn yuan_converts_exactly() {
        assert_eq!(yuan_to_fen("0.01"), Some(1));
        assert_eq!(yuan_to_fen("1,234.5"), Some(123_450));
        assert_eq!(yuan_to_fen("7"), Some(700));
        assert_eq!(yuan_to_fen("-3.20"), Some(-320));
        assert_eq!(yuan_to_fen("1.234"), None);
        assert_eq!(yuan_to_fen("1e3"), None);
        assert_eq!(yuan_to_fen(".5"), None);
        assert_eq!(yuan_to_fen("99999999999999999999"), None);
    }

    #[test]
    fn a_bad_mapping_reports_every_problem() {
        let error = CsvMapping::from_toml(
            r#"
            timezone = "Mars/Olympus"
            [columns]
            event_id = "id"
            amout = "x"
            [values.kind]
            "S" = "sale"
            "#,
        )
        .expect_err("bad mapping");
        let text = error.to_string();
        for expected in [
            "unknown event field \"amout\"",
            "unknown time zone",
            "values for \"kind\"",
            "no column or constant for \"merchant_id\"",
            "no column or constant for \"amount\"",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from {text}");
        }
    }

    #[test]
    fn a_missing_header_column_is_named() {
        let mapping = CsvMapping::from_toml(MAPPING).expect("mapping parses");
        let error = mapping
            .bind(Some(&csv::StringRecord::from(vec!["流水号", "商户"])))
            .expect_err("columns missing");
        assert!(error.to_string().contains("时间"), "{error}");
    }

    #[test]
    fn a_first_cell_starting_with_a_byte_order_mark_reads_back() {
        let row = csv::StringRecord::from(vec!["\u{feff} 23:59", "1"]);
        let payload = row_as_csv(&row, b';');
        let back = csv::ReaderBuilder::new()
            .delimiter(b';')
            .has_headers(false)
            .from_reader(payload.as_slice())
            .records()
            .next()
            .and_then(std::result::Result::ok);
        assert_eq!(back, Some(row));
    }

    #[test]
    fn dead_letter_payloads_keep_the_row_as_csv() {
        let row = csv::StringRecord::from(vec!["a", "b,c", "d\"e"]);
        assert_eq!(row_as_csv(&row, b','), b"a,\"b,c\",\"d\"\"e\"".to_vec());
    }
}
