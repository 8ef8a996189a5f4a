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

/// Files of the table's newest version under `table` (data files, not the log).
fn data_files(table: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![table.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.ends_with("_delta_log") {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Issue 20, corrupt input at rest: a truncated Parquet file and a torn Delta commit are
/// each named, file by file, by `doctor` and by the error of a query that reads them.
#[test]
fn a_truncated_data_file_and_a_torn_commit_are_named_by_doctor_and_by_queries() {
    let (_guard, dir) = workdir();
    generate(
        &dir,
        &[
            "--merchants",
            "3",
            "--days",
            "10",
            "--seed",
            "8",
            "--malformed-rate",
            "0.05",
        ],
    );
    let lake = dir.join("lake");
    let lake_arg = lake.to_str().unwrap();
    run(
        &dir,
        &[
            "backfill",
            "--lake",
            lake_arg,
            "--input",
            "events.jsonl",
            "--json",
        ],
    );
    let topic = unique("doctor-damage");
    let doctor_args = ["--brokers", broker(), "--topic", &topic, "--lake", lake_arg];
    let (_, checks) = doctor(&dir, &doctor_args);
    assert!(
        checks.iter().all(|c| !c.0.starts_with("files of")),
        "a whole lake has no damaged files: {checks:#?}"
    );
    let query = |sql: &str| {
        let mut command = streetflow();
        command
            .args(["sql", "--lake", lake_arg, sql])
            .current_dir(&dir);
        finish(&mut command)
    };
    let reads_every_row = "SELECT sum(length(event_id)) FROM pos_events";
    assert!(query(reads_every_row).status.success());

    // A data file cut in half (a copy that stopped, a disk that filled).
    let events = lake.join("pos_events");
    let victim = data_files(&events)
        .pop()
        .expect("pos_events has data files");
    let size = std::fs::metadata(&victim).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    let name = victim
        .strip_prefix(&events)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    // (doctor fails anyway here: the topic does not exist; the files check is the point.)
    let (_, checks) = doctor(&dir, &doctor_args);
    let files = find(&checks, "files of pos_events");
    assert_eq!(files.1, "PROBLEM");
    assert!(
        files.2.contains(&name) && files.2.contains("truncated"),
        "{files:?} names {name}"
    );
    let failed = query(reads_every_row);
    assert!(!failed.status.success());
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(said.contains(&name), "the query error names {name}: {said}");

    // The newest commit of dead_letters torn in the middle of a line.
    let log = lake.join("dead_letters").join("_delta_log");
    let mut commits: Vec<_> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    commits.sort();
    let newest = commits.pop().expect("dead_letters has commits");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let commit = format!(
        "_delta_log/{}",
        newest.file_name().unwrap().to_str().unwrap()
    );
    let (_, checks) = doctor(&dir, &doctor_args);
    let files = find(&checks, "files of dead_letters");
    assert_eq!(files.1, "PROBLEM");
    assert!(files.2.contains(&commit), "{files:?} names {commit}");
    let failed = query("SELECT count(*) FROM dead_letters");
    assert!(!failed.status.success());
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(
        said.contains(&commit),
        "the query error names {commit}: {said}"
    );
}
