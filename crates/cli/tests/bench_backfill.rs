//! `streetflow bench backfill` on a small export: streetflow and DuckDB must both produce
//! the generator's daily totals (the benchmark fails when streetflow does not).

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use common::*;

#[test]
fn both_engines_reproduce_the_truth_on_a_small_export() {
    let (_guard, dir) = workdir();
    let work = dir.join("bench").display().to_string();
    let args = [
        "bench",
        "backfill",
        "--merchants",
        "8",
        "--days",
        "40",
        "--workdir",
        &work,
    ];
    let output = run(&dir, &args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("streetflow (bronze") || l.contains("DuckDB "))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for row in rows {
        assert!(row.contains("┆ yes"), "an engine missed the truth: {row}");
    }
    assert!(stdout.contains("× DuckDB's speed"), "{stdout}");
    // The export is reused by a second run with the same settings.
    let again = run(&dir, &args);
    assert!(!String::from_utf8_lossy(&again.stdout).contains("generating"));
}
