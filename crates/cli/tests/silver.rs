//! merchant_daily against the generator's ground truth, incrementally and from scratch.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn csv(dir: &Path, lake: &Path, query: &str) -> String {
    let lake = lake.display().to_string();
    let output = run(dir, &["sql", "--lake", &lake, "--format", "csv", query]);
    String::from_utf8(output.stdout).unwrap()
}

fn all_silver(dir: &Path, lake: &Path) -> String {
    csv(
        dir,
        lake,
        "SELECT * FROM merchant_daily ORDER BY operator_id, merchant_id, business_date",
    )
}

fn aggregate_full(dir: &Path, lake: &Path) {
    run(
        dir,
        &["aggregate", "--lake", &lake.display().to_string(), "--full"],
    );
}

#[test]
fn silver_kept_by_the_workers_equals_the_truth_and_a_full_recompute() {
    let (_guard, dir) = workdir();
    generate(
        &dir,
        &[
            "--merchants",
            "8",
            "--days",
            "40",
            "--seed",
            "17",
            "--truth",
            "truth.csv",
            "--duplicate-rate",
            "0.02",
            "--late-rate",
            "0.03",
            "--malformed-rate",
            "0.005",
        ],
    );
    let topic = unique("silver");
    produce(&dir, &topic, 3);
    let lake = dir.join("lake");
    let mut args = ingest_args_with_silver(&topic, &unique("g"), &lake);
    // Small flushes: silver is refreshed incrementally many times.
    args.extend([
        "--max-records".into(),
        "4000".into(),
        "--exit-at-end".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&dir, &args);

    let truth = std::fs::read_to_string(dir.join("truth.csv")).unwrap();
    assert_eq!(silver_as_truth(&dir, &lake), truth);
    let incremental = all_silver(&dir, &lake);
    aggregate_full(&dir, &lake);
    assert_eq!(
        all_silver(&dir, &lake),
        incremental,
        "incremental and full recompute differ"
    );
    // Late events changed earlier days: silver holds the final state of each.
    assert!(truth.lines().count() > 8 * 35);
}

#[test]
fn a_crash_between_bronze_and_silver_is_repaired_on_restart() {
    let (_guard, dir) = workdir();
    generate(
        &dir,
        &[
            "--merchants",
            "6",
            "--days",
            "30",
            "--seed",
            "19",
            "--truth",
            "truth.csv",
            "--duplicate-rate",
            "0.02",
            "--late-rate",
            "0.02",
        ],
    );
    let topic = unique("silvercrash");
    produce(&dir, &topic, 2);
    let lake = dir.join("lake");
    let group = unique("g");
    let mut args = ingest_args_with_silver(&topic, &group, &lake);
    let config = dir.join("fast-group.toml");
    std::fs::write(&config, "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n").unwrap();
    args.extend([
        "--max-records".into(),
        "3000".into(),
        "--config".into(),
        config.display().to_string(),
    ]);
    let mut worker = Worker::start(
        &dir,
        &args,
        &[("STREETFLOW_FREEZE_AT", "after_commit_pending:2")],
    );
    worker.wait_for("FROZEN AT", Duration::from_secs(180));
    worker.kill();
    // Bronze is ahead of silver now.
    let stale = sql_i64(&lake, "SELECT count(*) FROM merchant_daily");
    assert!(stale > 0);

    args.push("--exit-at-end".into());
    let mut restarted = Worker::start(&dir, &args, &[]);
    let log = restarted.wait_for(
        "partition of the topic is in the lake",
        Duration::from_secs(300),
    );
    assert!(restarted.wait(Duration::from_secs(60)).success());
    let lines = std::fs::read(dir.join("events.jsonl"))
        .unwrap()
        .iter()
        .filter(|&&b| b == b'\n')
        .count() as i64;
    assert_eq!(
        row_count(&lake, "pos_events") + row_count(&lake, "dead_letters"),
        lines,
        "bronze incomplete; the restarted worker said:\n{}",
        log.join("\n")
    );
    let truth = std::fs::read_to_string(dir.join("truth.csv")).unwrap();
    assert_eq!(silver_as_truth(&dir, &lake), truth);
    let repaired = all_silver(&dir, &lake);
    aggregate_full(&dir, &lake);
    assert_eq!(all_silver(&dir, &lake), repaired);
}

/// Every version of bitemporal silver, in a stable order.
fn all_history(dir: &Path, lake: &Path) -> String {
    csv(
        dir,
        lake,
        "SELECT * EXCLUDE (payers), cardinality(payers) AS payer_entries \
         FROM merchant_daily_history ORDER BY operator_id, merchant_id, business_date, known_from",
    )
}

/// The lake knows streamed events from the workers' commits; a second settles them here.
fn settle_fast() -> Vec<(&'static str, String)> {
    vec![("STREETFLOW__KNOWLEDGE__SETTLE_MS", "1000".to_owned())]
}

fn aggregate(dir: &Path, lake: &Path, full: bool) {
    let lake = lake.display().to_string();
    let mut args = vec!["aggregate", "--lake", &lake];
    if full {
        args.push("--full");
    }
    run_with_env(dir, &args, &settle_fast());
}

/// Workers append versions of bitemporal silver after each flush as their commits
/// settle; the result equals a rebuild from bronze row for row, and an `aggregate`
/// killed after writing its files but before committing them leaves it exact.
#[test]
fn history_kept_by_the_workers_equals_a_rebuild_and_survives_a_killed_commit() {
    let (_guard, dir) = workdir();
    generate(
        &dir,
        &[
            "--merchants",
            "6",
            "--days",
            "30",
            "--seed",
            "23",
            "--duplicate-rate",
            "0.03",
            "--late-rate",
            "0.05",
        ],
    );
    let topic = unique("history");
    produce(&dir, &topic, 3);
    let lake = dir.join("lake");
    let mut args = ingest_args_with_silver(&topic, &unique("g"), &lake);
    args.extend([
        "--max-records".into(),
        "1500".into(),
        "--exit-at-end".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_with_env(&dir, &args, &settle_fast());
    std::thread::sleep(Duration::from_millis(1500));
    aggregate(&dir, &lake, false);
    let incremental = all_history(&dir, &lake);
    let commits = sql_i64(
        &lake,
        "SELECT count(DISTINCT knowledge_time) FROM pos_events",
    );
    assert!(commits > 3, "the workers committed {commits} times");
    let versions = incremental.lines().count() as i64;
    let days = sql_i64(&lake, "SELECT count(*) FROM merchant_daily");
    assert!(versions > days, "{versions} versions of {days} days");
    aggregate(&dir, &lake, true);
    assert_eq!(
        all_history(&dir, &lake),
        incremental,
        "the history kept after each flush differs from a rebuild"
    );

    // More rows, loaded now; the refresh that would append their versions is killed
    // after writing its files, before committing them.
    let extra = dir.join("extra.jsonl");
    let more: Vec<String> = std::fs::read_to_string(dir.join("events.jsonl"))
        .unwrap()
        .lines()
        .take(300)
        .map(|line| line.replace("\"event_id\":\"", "\"event_id\":\"again-"))
        .collect();
    std::fs::write(&extra, more.join("\n") + "\n").unwrap();
    let lake_arg = lake.display().to_string();
    run_with_env(
        &dir,
        &[
            "backfill",
            "--lake",
            &lake_arg,
            "--input",
            extra.to_str().unwrap(),
            "--no-silver",
        ],
        &settle_fast(),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let mut env: Vec<(&str, &str)> = vec![("STREETFLOW__KNOWLEDGE__SETTLE_MS", "1000")];
    env.push(("STREETFLOW_FREEZE_AT", "history_files_written"));
    let refresh: Vec<String> = ["aggregate", "--lake", &lake_arg]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let mut killed = Worker::start(&dir, &refresh, &env);
    killed.wait_for("FROZEN AT", Duration::from_secs(180));
    killed.kill();
    assert_eq!(
        all_history(&dir, &lake),
        incremental,
        "files written but never committed changed the history"
    );
    aggregate(&dir, &lake, false);
    let repaired = all_history(&dir, &lake);
    assert!(repaired.lines().count() > incremental.lines().count());
    aggregate(&dir, &lake, true);
    assert_eq!(all_history(&dir, &lake), repaired);
}
