//! The lake on an S3-compatible object store (moto's server on loopback): two workers
//! ingest into one `s3://` lake exactly once, silver equals the truth, and features and
//! decisions read it. Commits use conditional puts (If-None-Match), so concurrent writers
//! are safe without a lock service.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn sql_csv(dir: &Path, lake: &str, query: &str) -> String {
    let env = s3_env();
    let output = run_with_env(
        dir,
        &["sql", "--lake", lake, "--format", "csv", query],
        &env,
    );
    String::from_utf8(output.stdout).unwrap()
}

fn count(dir: &Path, lake: &str, query: &str) -> i64 {
    sql_csv(dir, lake, query)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn two_workers_write_one_s3_lake_exactly_once_and_the_batch_jobs_read_it() {
    let (_guard, dir) = workdir();
    let summary = generate(
        &dir,
        &[
            "--merchants",
            "8",
            "--days",
            "30",
            "--seed",
            "31",
            "--truth",
            "truth.csv",
            "--registry",
            "merchants.csv",
            "--duplicate-rate",
            "0.02",
            "--late-rate",
            "0.02",
            "--malformed-rate",
            "0.005",
        ],
    );
    let lines = summary["lines"].as_i64().unwrap();
    let topic = unique("s3");
    produce(&dir, &topic, 4);
    let bucket = unique("lake").replace('_', "-");
    create_bucket(&bucket);
    let lake = format!("s3://{bucket}/district");

    let group = unique("g");
    let args: Vec<String> = [
        "ingest",
        "--brokers",
        broker(),
        "--topic",
        &topic,
        "--group",
        &group,
        "--lake",
        &lake,
        "--max-records",
        "4000",
        "--exit-at-end",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut env = s3_env();
    // The lake knows the district from the workers' commits: the features below ask as of
    // the moment they ended, settled after a second.
    env.push(("STREETFLOW__KNOWLEDGE__SETTLE_MS", "1000".to_owned()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let workers: Vec<Worker> = (0..2)
        .map(|_| Worker::start(&dir, &args, &env_refs))
        .collect();
    for worker in workers {
        assert!(worker.wait(Duration::from_secs(300)).success());
    }
    let known = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(1500));

    // Exactly once: every line in bronze or dead letters, no Kafka record twice.
    let events = count(&dir, &lake, "SELECT count(*) FROM pos_events");
    let dead = count(&dir, &lake, "SELECT count(*) FROM dead_letters");
    assert_eq!(events + dead, lines);
    let distinct = count(
        &dir,
        &lake,
        "SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM pos_events)",
    );
    assert_eq!(distinct, events);

    // Silver (kept by the workers) equals the generator's truth.
    let truth = std::fs::read_to_string(dir.join("truth.csv")).unwrap();
    let silver = sql_csv(
        &dir,
        &lake,
        &format!(
            "SELECT {TRUTH_COLUMNS} FROM merchant_daily ORDER BY operator_id, merchant_id, business_date"
        ),
    );
    assert_eq!(silver, truth);

    // The batch jobs read and write the same lake.
    let last_day = truth
        .lines()
        .last()
        .unwrap()
        .split(',')
        .nth(2)
        .unwrap()
        .to_owned();
    let as_of = chrono::NaiveDate::parse_from_str(&last_day, "%Y-%m-%d")
        .unwrap()
        .succ_opt()
        .unwrap()
        .to_string();
    // Bitemporal silver up to what is settled now, then features as of what the lake
    // knew when the workers ended.
    run_with_env(&dir, &["aggregate", "--lake", &lake], &env);
    let known = known.to_rfc3339();
    run_with_env(
        &dir,
        &[
            "features",
            "--lake",
            &lake,
            "--as-of",
            &as_of,
            "--knowledge-time",
            &known,
            "--registry",
            "merchants.csv",
        ],
        &env,
    );
    assert_eq!(
        count(
            &dir,
            &lake,
            "SELECT count(*) FROM merchant_features WHERE net_fen_30d > 0"
        ),
        8,
        "every merchant's turnover is known"
    );
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../pipelines/policies/district-turnover-loan.toml");
    run_with_env(
        &dir,
        &[
            "decide",
            "--lake",
            &lake,
            "--as-of",
            &as_of,
            "--policy",
            policy.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(
        count(&dir, &lake, "SELECT count(*) FROM credit_decisions"),
        8
    );
    // Nothing was written to the local disk instead.
    assert!(!dir.join("s3:").exists());
}

/// Defect 9 of issue 20: `sql`, `compact`, `vacuum` and `report` open an object-store
/// lake with the pipeline file's `[lake.storage]` options, as the writers do (they used
/// to ignore them and could only use the AWS environment).
#[test]
fn queries_and_maintenance_use_the_storage_options_of_the_pipeline_file() {
    let (_guard, dir) = workdir();
    generate(&dir, &["--merchants", "3", "--days", "6", "--seed", "52"]);
    let bucket = unique("cfg").replace('_', "-");
    create_bucket(&bucket);
    let lake = format!("s3://{bucket}/district");
    let config = dir.join("s3-pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[lake.storage]\naws_endpoint_url = \"{}\"\naws_access_key_id = \"streetflow-test\"\n\
             aws_secret_access_key = \"streetflow-test\"\naws_region = \"us-east-1\"\nallow_http = \"true\"\n",
            s3_endpoint()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    // No AWS_* variables anywhere below: only the pipeline file says where the lake is.
    let run_plain = |args: &[&str]| -> String {
        let mut command = streetflow();
        command.args(args).current_dir(&dir);
        for (key, _) in s3_env() {
            command.env_remove(key);
        }
        let output = finish(&mut command);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    // Several commits, so the compaction has files to merge.
    run_plain(&[
        "backfill",
        "--config",
        &config,
        "--lake",
        &lake,
        "--input",
        "events.jsonl",
        "--knowledge-time",
        "2026-11-01T00:00:00Z",
        "--commit-every",
        "100",
        "--no-silver",
        "--json",
    ]);
    let count = |out: &str| -> i64 { out.lines().nth(1).unwrap().trim().parse().unwrap() };
    let query = "SELECT count(*) FROM pos_events";
    let before = count(&run_plain(&[
        "sql", "--config", &config, "--lake", &lake, "--format", "csv", query,
    ]));
    assert!(before > 0);
    run_plain(&[
        "compact",
        "--config",
        &config,
        "--lake",
        &lake,
        "--table",
        "pos_events",
    ]);
    run_plain(&[
        "vacuum",
        "--config",
        &config,
        "--lake",
        &lake,
        "--table",
        "pos_events",
        "--dry-run",
    ]);
    let after = count(&run_plain(&[
        "sql", "--config", &config, "--lake", &lake, "--format", "csv", query,
    ]));
    assert_eq!(after, before);
}
