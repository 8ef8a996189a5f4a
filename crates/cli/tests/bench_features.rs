//! `streetflow bench features` on a small lake: streetflow and DuckDB run the same feature
//! SQL on the same Parquet and must agree on every value (the benchmark fails otherwise).

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use common::*;

#[test]
fn streetflow_and_duckdb_agree_on_every_feature() {
    let (_guard, dir) = workdir();
    let work = dir.join("bench");
    let work_arg = work.display().to_string();
    let args = [
        "bench",
        "features",
        "--merchants",
        "24",
        "--days",
        "120",
        "--sales-per-day",
        "4",
        "--workdir",
        &work_arg,
    ];
    let output = run(&dir, &args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("generated bronze"), "{stdout}");
    assert!(stdout.contains("DuckDB"), "{stdout}");
    // 24 merchants × 44 feature columns compared (numbers and text), none differ.
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("streetflow ÷ DuckDB time"))
        .unwrap_or_else(|| panic!("no comparison line in {stdout}"));
    assert!(summary.ends_with(", 0 differ"), "{summary}");
    let compared: u64 = summary
        .split("compared: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .map(|s| s.replace(',', "").parse().unwrap())
        .unwrap();
    assert!(compared >= 24 * 30, "only {compared} values compared");

    // A second run reuses the generated lake.
    let again = run(&dir, &args);
    assert!(String::from_utf8_lossy(&again.stdout).contains("reusing the bronze table"));
}
