//! `streetflow demo` end to end on a small district: embedded broker, two workers,
//! silver equal to the generator's truth, features, decisions for both products.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use common::*;

#[test]
fn the_demo_runs_the_whole_job_on_an_embedded_broker() {
    let (_guard, dir) = workdir();
    let output = run(
        &dir,
        &[
            "demo",
            "--merchants",
            "20",
            "--days",
            "60",
            "--workers",
            "2",
            "--out",
            "demo",
        ],
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    for step in 1..=7 {
        assert!(
            stdout.contains(&format!("[{step}/7]")),
            "step {step}:\n{stdout}"
        );
    }
    assert!(stdout.contains("district-turnover-loan"), "{stdout}");
    assert!(stdout.contains("daily-takings-line"), "{stdout}");

    let demo = dir.join("demo");
    let lake = demo.join("lake");
    // Every published message is in bronze or dead-lettered, none twice, none lost.
    let lines = std::fs::read(demo.join("events.jsonl"))
        .unwrap()
        .iter()
        .filter(|&&b| b == b'\n')
        .count() as i64;
    let accepted = row_count(&lake, "pos_events");
    let dead = row_count(&lake, "dead_letters");
    assert!(dead > 0, "the demo injects malformed messages");
    assert_eq!(accepted + dead, lines);
    assert!(
        stdout.contains(&format!("{} into dead_letters", dead)),
        "{stdout}"
    );

    // Silver equals the generator's exact daily figures, re-deliveries, late events and
    // voids included.
    let truth = std::fs::read_to_string(demo.join("truth.csv")).unwrap();
    assert_eq!(silver_as_truth(&dir, &lake), truth);

    // A feature row per merchant and a decision per merchant and product.
    assert_eq!(row_count(&lake, "merchant_features"), 20);
    assert_eq!(
        sql_i64s(
            &lake,
            "SELECT count(*) FROM credit_decisions GROUP BY product ORDER BY product"
        ),
        vec![20, 20]
    );

    // The credit officer's page: a section per chosen merchant with its decisions, the
    // features behind each reason and three inline charts; nothing loaded from outside.
    let html = std::fs::read_to_string(demo.join("report.html")).unwrap();
    let sections = html.matches("<section id=").count();
    assert!(sections >= 2, "{sections} merchants in the report");
    assert_eq!(html.matches("<svg").count(), 3 * sections);
    for forbidden in ["<script", "<link", " src="] {
        assert!(!html.contains(forbidden), "report loads {forbidden}");
    }
    // Each stored decision of a shown merchant appears with its limit.
    let declined = sql_table(
        &lake,
        "SELECT merchant_id FROM credit_decisions WHERE decision <> 'approve' ORDER BY merchant_id LIMIT 1",
    );
    let merchant = declined
        .lines()
        .nth(3)
        .unwrap()
        .trim_matches(|c| c == '|' || c == ' ');
    let page = dir.join("one.html");
    let as_of = html
        .split("Credit report as of ")
        .nth(1)
        .unwrap()
        .get(..10)
        .unwrap()
        .to_owned();
    run(
        &dir,
        &[
            "report",
            "--lake",
            lake.to_str().unwrap(),
            "--as-of",
            &as_of,
            "--merchant",
            merchant,
            "--out",
            page.to_str().unwrap(),
        ],
    );
    let one = std::fs::read_to_string(&page).unwrap();
    assert_eq!(one.matches("<section id=").count(), 1);
    let reasons = sql_table(
        &lake,
        &format!(
            "SELECT DISTINCT unnest(reasons) FROM credit_decisions WHERE merchant_id = '{merchant}'"
        ),
    );
    for code in reasons.lines().skip(3).filter(|l| l.starts_with('|')) {
        let code = code.trim_matches(|c| c == '|' || c == ' ');
        assert!(
            one.contains(&format!("<code>{code}</code>")),
            "{code} missing"
        );
    }
    // A date without decisions is a clear error, not an empty page.
    let failed = streetflow()
        .args([
            "report",
            "--lake",
            lake.to_str().unwrap(),
            "--as-of",
            "2001-01-01",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(!failed.status.success());
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("no credit decisions as of 2001-01-01")
    );
}
