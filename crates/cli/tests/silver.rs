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
