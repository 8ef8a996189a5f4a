//! The JSON Schema in `schemas/` and the Rust decoder must agree.
//!
//! Every case of `fixtures/contract_corpus.jsonl` names the decoder's expected verdict
//! (`accept` or a reason code) and what the schema can say about it:
//! - `agrees`: the schema accepts exactly when the decoder does;
//! - `beyond`: a rule JSON Schema cannot state (Luhn, ingest-relative time, size,
//!   repeated keys, `1e3` read as an integer): the schema accepts, the decoder refuses;
//! - `not_json`: not a JSON document at all, so no schema applies.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use streetflow_core::{DecodeOptions, ReasonCode, decode};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    case: String,
    expect: String,
    schema: String,
    message: Option<Value>,
    message_text: Option<String>,
    message_hex: Option<String>,
    pad_to_bytes: Option<usize>,
}

impl Case {
    fn bytes(&self) -> Vec<u8> {
        if let Some(text) = &self.message_text {
            return text.as_bytes().to_vec();
        }
        if let Some(hex) = &self.message_hex {
            return (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
        }
        if let Some(size) = self.pad_to_bytes {
            let mut value: Value = serde_json::from_str(FULL_SALE).unwrap();
            value["padding"] = Value::String("x".repeat(size));
            return serde_json::to_vec(&value).unwrap();
        }
        // `Some(Value::Null)` is a JSON null message; serde maps a present null to None,
        // so the raw line decides.
        serde_json::to_vec(self.message.as_ref().unwrap_or(&Value::Null)).unwrap()
    }
}

const FULL_SALE: &str = r#"{"event_id":"sl-m001-000001","operator_id":"silverfish-lane","merchant_id":"m001","kind":"sale","amount_fen":3500,"currency":"CNY","occurred_at":"2025-09-30T12:34:56.789+08:00","channel":"wechat"}"#;

fn ingest_time() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2025-10-01T12:00:00+08:00")
        .unwrap()
        .with_timezone(&Utc)
}

fn load_cases() -> Vec<Case> {
    include_str!("fixtures/contract_corpus.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad fixture line {l}: {e}")))
        .collect()
}

#[test]
fn schema_and_decoder_agree_on_the_corpus() {
    let schema: Value = serde_json::from_str(include_str!(
        "../../../schemas/pos_transaction.v1.schema.json"
    ))
    .unwrap();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    let cases = load_cases();
    let mut failures = Vec::new();
    for case in &cases {
        let bytes = case.bytes();
        let verdict = match decode(&bytes, ingest_time(), &DecodeOptions::default()) {
            Ok(_) => "accept".to_owned(),
            Err(rejection) => rejection.reason.as_str().to_owned(),
        };
        if verdict != case.expect {
            failures.push(format!(
                "{}: decoder said {verdict}, expected {}",
                case.case, case.expect
            ));
        }
        let instance = serde_json::from_slice::<Value>(&bytes);
        let schema_problem = match (case.schema.as_str(), instance) {
            ("not_json", Err(_)) => None,
            ("not_json", Ok(_)) => Some("is JSON after all".to_owned()),
            (_, Err(e)) => Some(format!("is not JSON ({e})")),
            ("agrees", Ok(v)) => {
                let valid = validator.is_valid(&v);
                (valid != (case.expect == "accept")).then(|| format!("schema valid = {valid}"))
            }
            ("beyond", Ok(v)) => (!validator.is_valid(&v) || case.expect == "accept")
                .then(|| "a `beyond` case must pass the schema and fail the decoder".to_owned()),
            (other, _) => Some(format!("unknown schema category {other}")),
        };
        if let Some(problem) = schema_problem {
            failures.push(format!("{}: {problem}", case.case));
        }
    }
    assert!(
        failures.is_empty(),
        "disagreements:\n{}",
        failures.join("\n")
    );
}

#[test]
fn corpus_is_large_and_covers_every_rule() {
    let cases = load_cases();
    let accepted = cases.iter().filter(|c| c.expect == "accept").count();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    assert!(accepted >= 20 && cases.len() - accepted >= 40);
    let seen: BTreeSet<&str> = cases.iter().map(|c| c.expect.as_str()).collect();
    let unseen: Vec<&str> = ReasonCode::all()
        .into_iter()
        .map(|c| c.as_str())
        // One duplicate key stands for all of them.
        .filter(|code| {
            !code.starts_with("duplicate_field:") || *code == "duplicate_field:amount_fen"
        })
        .filter(|code| !seen.contains(code))
        .collect();
    assert!(
        unseen.is_empty(),
        "reason codes without a corpus case: {unseen:?}"
    );
}
