//! `streetflow validate`: decode and validate a JSON Lines file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, FixedOffset, Utc};
use clap::Args;
use streetflow_core::{DecodeOptions, ReasonCode, decode};

use crate::output::{table, thousands};

/// Options of `streetflow validate`.
#[derive(Debug, Args)]
pub(crate) struct ValidateArgs {
    /// JSON Lines file of pos_transaction/v1 events; `-` for standard input.
    file: PathBuf,
    /// Print one JSON object `{"accepted": N, "rejected": N, "by_reason": {…}}`.
    #[arg(long)]
    json: bool,
    /// Time the events count as received, for the future-timestamp rule (RFC 3339);
    /// default: now.
    #[arg(long)]
    ingest_time: Option<DateTime<FixedOffset>>,
    /// Rejected lines to show with their line number and detail (table output only).
    #[arg(long, default_value_t = 5)]
    show: usize,
}

/// Counts of one validation run.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) accepted: u64,
    pub(crate) rejected: u64,
    pub(crate) by_reason: BTreeMap<ReasonCode, u64>,
    /// (line number, reason, detail) of the first rejected lines.
    pub(crate) examples: Vec<(u64, ReasonCode, String)>,
}

impl Report {
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let by_reason: serde_json::Map<String, serde_json::Value> = self
            .by_reason
            .iter()
            .map(|(reason, n)| (reason.as_str().to_owned(), (*n).into()))
            .collect();
        serde_json::json!({
            "accepted": self.accepted,
            "rejected": self.rejected,
            "by_reason": by_reason,
        })
    }
}

/// Validates every line of `reader`. Lines end at `\n`; a trailing `\r` is dropped; an
/// empty line is an `empty_message`. Only I/O errors fail; bad lines are counted.
pub(crate) fn validate_lines(
    mut reader: impl BufRead,
    ingest_time: DateTime<Utc>,
    keep_examples: usize,
) -> io::Result<Report> {
    let options = DecodeOptions::default();
    let mut report = Report::default();
    let mut line = Vec::with_capacity(1024);
    let mut number = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        let mut message = line.as_slice();
        message = message.strip_suffix(b"\n").unwrap_or(message);
        message = message.strip_suffix(b"\r").unwrap_or(message);
        match decode(message, ingest_time, &options) {
            Ok(_) => report.accepted += 1,
            Err(rejection) => {
                report.rejected += 1;
                *report.by_reason.entry(rejection.reason).or_default() += 1;
                if report.examples.len() < keep_examples {
                    report
                        .examples
                        .push((number, rejection.reason, rejection.detail));
                }
            }
        }
    }
    Ok(report)
}

pub(crate) fn run(args: &ValidateArgs) -> anyhow::Result<()> {
    let ingest_time = args
        .ingest_time
        .map_or_else(Utc::now, |t| t.with_timezone(&Utc));
    let keep = if args.json { 0 } else { args.show };
    let report = if args.file.as_os_str() == "-" {
        validate_lines(io::stdin().lock(), ingest_time, keep)
    } else {
        let file = File::open(&args.file)
            .with_context(|| format!("cannot open {}", args.file.display()))?;
        validate_lines(BufReader::with_capacity(1 << 20, file), ingest_time, keep)
    }
    .with_context(|| format!("reading {}", args.file.display()))?;

    if args.json {
        println!("{}", report.to_json());
        return Ok(());
    }
    let lines = report.accepted + report.rejected;
    let share = |n: u64| format!("{:.3} %", 100.0 * n as f64 / lines.max(1) as f64);
    let mut t = table(&["result", "lines", "share"]);
    t.add_row(vec![
        "accepted".to_owned(),
        thousands(report.accepted),
        share(report.accepted),
    ]);
    t.add_row(vec![
        "rejected".to_owned(),
        thousands(report.rejected),
        share(report.rejected),
    ]);
    for (reason, n) in &report.by_reason {
        t.add_row(vec![format!("  {reason}"), thousands(*n), share(*n)]);
    }
    println!("{}: {} lines", args.file.display(), thousands(lines));
    println!("{t}");
    if !report.examples.is_empty() {
        let mut examples = table(&["line", "reason", "detail"]);
        for (number, reason, detail) in &report.examples {
            examples.add_row(vec![number.to_string(), reason.to_string(), detail.clone()]);
        }
        println!("first rejected lines:\n{examples}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lines_and_handles_crlf_blank_and_unterminated_lines() {
        let good = r#"{"event_id":"e1","operator_id":"op","merchant_id":"m1","kind":"sale","amount_fen":100,"currency":"CNY","occurred_at":"2025-01-01T10:00:00+08:00","channel":"cash"}"#;
        let input = format!("{good}\r\n\n{{\"a\":\n{good}");
        let report = validate_lines(input.as_bytes(), Utc::now(), 10).unwrap();
        assert_eq!(report.accepted, 2);
        assert_eq!(report.rejected, 2);
        assert_eq!(report.by_reason[&ReasonCode::EmptyMessage], 1);
        assert_eq!(report.by_reason[&ReasonCode::InvalidJson], 1);
        assert_eq!(report.examples[0].0, 2);
        assert_eq!(
            report.to_json(),
            serde_json::json!({"accepted": 2, "rejected": 2, "by_reason": {"empty_message": 1, "invalid_json": 1}})
        );
    }

    #[test]
    fn empty_input_is_empty_report() {
        assert_eq!(
            validate_lines(&b""[..], Utc::now(), 5).unwrap(),
            Report::default()
        );
    }
}
