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
}
