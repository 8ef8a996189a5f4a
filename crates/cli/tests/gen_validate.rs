//! `streetflow gen` and `streetflow validate` as a user runs them.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn streetflow(args: &[&str], dir: &Path) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_streetflow"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run streetflow");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The acceptance command: a year of 120 merchants validates without a reject.
#[test]
fn a_clean_district_has_no_rejects() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = streetflow(
        &[
            "gen",
            "--merchants",
            "120",
            "--days",
            "365",
            "--seed",
            "7",
            "--out",
            "e.jsonl",
            "--truth",
            "t.csv",
            "--json",
        ],
        dir.path(),
    );
    assert!(ok, "{err}");
    let generated = json(&out);
    let (ok, out, err) = streetflow(&["validate", "e.jsonl", "--json"], dir.path());
    assert!(ok, "{err}");
    let report = json(&out);
    assert_eq!(report["rejected"], 0);
    assert_eq!(report["accepted"], generated["lines"]);
    assert_eq!(report["by_reason"], serde_json::json!({}));
    let truth = std::fs::read_to_string(dir.path().join("t.csv")).unwrap();
    assert!(truth.starts_with("operator_id,merchant_id,business_date,sales_count,sales_fen,refund_count,refund_fen,void_count,net_fen"));
    assert!(
        truth.lines().count() > 120 * 300,
        "{} truth rows",
        truth.lines().count()
    );
}

/// With faults on, the rejects per reason are exactly what the generator injected.
#[test]
fn rejects_match_what_the_generator_injected() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = streetflow(
        &[
            "gen",
            "--merchants",
            "40",
            "--days",
            "120",
            "--seed",
            "7",
            "--out",
            "e.jsonl",
            "--malformed-rate",
            "0.01",
            "--duplicate-rate",
            "0.01",
            "--late-rate",
            "0.01",
            "--json",
        ],
        dir.path(),
    );
    assert!(ok, "{err}");
    let generated = json(&out);
    let (ok, out, err) = streetflow(&["validate", "e.jsonl", "--json"], dir.path());
    assert!(ok, "{err}");
    let report = json(&out);
    assert_eq!(report["by_reason"], generated["malformed_by_reason"]);
    assert_eq!(report["rejected"], generated["malformed"]);
    let accepted = report["accepted"].as_u64().unwrap();
    let expected =
        generated["unique_events"].as_u64().unwrap() + generated["duplicates"].as_u64().unwrap();
    assert_eq!(accepted, expected);
    assert!(generated["malformed_by_reason"].as_object().unwrap().len() >= 30);
}

#[test]
fn validate_fails_only_on_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = streetflow(&["validate", "no-such-file.jsonl"], dir.path());
    assert!(!ok);
    assert!(err.contains("no-such-file.jsonl"), "{err}");
    std::fs::write(dir.path().join("junk.jsonl"), b"not json\n\xff\xfe\n[1]\n").unwrap();
    let (ok, out, _) = streetflow(&["validate", "junk.jsonl", "--json"], dir.path());
    assert!(ok);
    assert_eq!(
        json(&out),
        serde_json::json!({"accepted": 0, "rejected": 3, "by_reason": {"invalid_json": 1, "invalid_utf8": 1, "not_an_object": 1}})
    );
    let (ok, out, _) = streetflow(&["validate", "junk.jsonl"], dir.path());
    assert!(ok);
    assert!(
        out.contains("invalid_utf8") && out.contains("first rejected lines"),
        "{out}"
    );
}

#[test]
fn bad_generator_options_are_refused_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = streetflow(
        &[
            "gen",
            "--merchants",
            "0",
            "--late-rate",
            "2",
            "--out",
            "e.jsonl",
        ],
        dir.path(),
    );
    assert!(!ok);
    assert!(
        err.contains("merchants") && err.contains("late-rate"),
        "{err}"
    );
    let (ok, _, err) = streetflow(
        &["gen", "--time-zone", "Mars/Olympus", "--out", "e.jsonl"],
        dir.path(),
    );
    assert!(!ok);
    assert!(err.contains("Mars/Olympus"), "{err}");
}
