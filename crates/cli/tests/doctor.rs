//! `streetflow doctor` against a real broker and lake: a healthy pipeline, and each kind
//! of problem said in plain words.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use streetflow_core::tables::TableDef;
use streetflow_lake::Lake;
use streetflow_lake::arrow::datatypes::{DataType, Field, Schema};

/// Runs the doctor; returns its exit success and its checks by name.
fn doctor(dir: &Path, args: &[&str]) -> (bool, Vec<(String, String, String)>) {
    doctor_checks(dir, args, &[])
}

fn find<'a>(checks: &'a [(String, String, String)], name: &str) -> &'a (String, String, String) {
    checks
        .iter()
        .find(|c| c.0 == name)
        .unwrap_or_else(|| panic!("no check {name} in {checks:#?}"))
}

#[test]
fn a_healthy_pipeline_passes_and_each_problem_is_named() {
    let (_guard, dir) = workdir();
    generate(&dir, &["--merchants", "4", "--days", "20", "--seed", "5"]);
    let topic = unique("doctor");
    produce(&dir, &topic, 3);
    let lake = dir.join("lake");
    let mut args = ingest_args_with_silver(&topic, &unique("g"), &lake);
    args.push("--exit-at-end".into());
    run(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let lake_arg = lake.to_str().unwrap();

    let (ok, checks) = doctor(
        &dir,
        &["--brokers", broker(), "--topic", &topic, "--lake", lake_arg],
    );
    assert!(ok, "{checks:#?}");
    assert!(find(&checks, "topic").2.contains("3 partitions"));
    assert_eq!(find(&checks, "table pos_events").1, "ok");
    assert!(
        find(&checks, "ingest progress")
            .2
            .contains(" 0 records behind")
    );
    assert_eq!(find(&checks, "silver freshness").1, "ok");
    assert_eq!(find(&checks, "table merchant_features").1, "warning");

    // No broker there.
    let (ok, checks) = doctor(
        &dir,
        &[
            "--brokers",
            "127.0.0.1:1",
            "--topic",
            &topic,
            "--lake",
            lake_arg,
        ],
    );
    assert!(!ok);
    let brokers = find(&checks, "brokers");
    assert_eq!(brokers.1, "PROBLEM");
    assert!(
        brokers
            .2
            .contains("cannot reach the Kafka brokers at 127.0.0.1:1")
    );

    // A topic that does not exist.
    let missing = unique("missing");
    let (ok, checks) = doctor(
        &dir,
        &[
            "--brokers",
            broker(),
            "--topic",
            &missing,
            "--lake",
            lake_arg,
        ],
    );
    assert!(!ok);
    assert!(find(&checks, "topic").2.contains("does not exist"));

    // The topic "recreated": a new, shorter topic under the same pipeline name. The
    // workers would skip its records; the doctor says so.
    std::fs::write(dir.join("one.jsonl"), "{}\n").unwrap();
    let recreated = unique("recreated");
    run_json(
        &dir,
        &[
            "produce",
            "--brokers",
            broker(),
            "--topic",
            &recreated,
            "--input",
            "one.jsonl",
            "--partitions",
            "3",
            "--json",
        ],
    );
    let (ok, checks) = doctor(
        &dir,
        &[
            "--brokers",
            broker(),
            "--topic",
            &recreated,
            "--lake",
            lake_arg,
        ],
    );
    assert!(!ok);
    let progress = find(&checks, "ingest progress");
    assert_eq!(progress.1, "PROBLEM");
    assert!(progress.2.contains("recreated"), "{progress:?}");

    // A table whose columns are not the contract's.
    let foreign = TableDef {
        name: "credit_decisions",
        description: "written by another tool",
        schema: Arc::new(Schema::new(vec![Field::new(
            "score",
            DataType::Float64,
            true,
        )])),
        partition_columns: &[],
    };
    let lake_handle = Lake::new(lake_arg, &Default::default()).unwrap();
    runtime()
        .block_on(lake_handle.open_or_create(&foreign))
        .unwrap();
    let (ok, checks) = doctor(
        &dir,
        &["--brokers", broker(), "--topic", &topic, "--lake", lake_arg],
    );
    assert!(!ok);
    let decisions = find(&checks, "table credit_decisions");
    assert_eq!(decisions.1, "PROBLEM");
    assert!(decisions.2.contains("missing"), "{decisions:?}");
}
