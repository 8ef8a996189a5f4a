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

/// What the broker says and holds, per partition: its watermarks (ListOffsets) and the
/// records a fresh consumer reads from the start, with the highest offset read.
fn broker_census(address: &str, topic: &str, partitions: i32) -> String {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let mut lines = Vec::new();
    for p in 0..partitions {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", address)
            .set("group.id", unique("census"))
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let watermarks = consumer.fetch_watermarks(topic, p, Duration::from_secs(10));
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let (mut read, mut last) = (0_i64, -1_i64);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    read += 1;
                    last = last.max(m.offset());
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                _ => {}
            }
        }
        lines.push(format!(
            "partition {p}: ListOffsets {watermarks:?}, read {read} records up to offset {last}"
        ));
    }
    lines.join("\n")
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

/// Found a loss before the fix: both workers exited 0 after two broker restarts with
/// 34,888 of 53,971 records stored. Tansu on S3 answers ListOffsets "latest" from the
/// batch object its store stamped last (one-second timestamps), far below the end; the
/// workers' partitions were quiet across the restart, so `caught_up` asked the broker,
/// got that answer and took them for read to their end.
#[test]
fn a_broker_killed_and_restarted_twice_mid_ingest_loses_and_doubles_nothing() {
    let (_guard, dir) = workdir();
    let summary = generate_busy_district(&dir, "61");
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
    let mut outcomes = Vec::new();
    for worker in workers {
        let (status, report, log) =
            worker.wait_with_output(deadline.saturating_duration_since(Instant::now()));
        outcomes.push(format!("exit {status}\nreport: {report}\n{log}"));
        assert!(
            status.success(),
            "a worker failed after the broker restarts:\n{}",
            outcomes.join("\n---\n")
        );
    }
    let now_stored = stored(&lake);
    assert_eq!(
        now_stored,
        lines,
        "the lake holds {now_stored} of {lines} records; the workers:\n{}\nlake offsets per partition:\n{}",
        outcomes.join("\n---\n") + "\nthe broker:\n" + &broker_census(&broker.address, &topic, 4),
        sql_table(
            &lake,
            "SELECT kafka_partition, count(*) AS n, max(kafka_offset) AS last FROM pos_events GROUP BY kafka_partition ORDER BY kafka_partition"
        ),
    );
    assert_each_record_stored_once(&lake, &summary);
}

/// A small tmpfs for a test's lake, unmounted when the test ends, passed or failed.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, kib: u64) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(path)
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "mounting a {kib} KiB tmpfs at {} failed: this test needs root (CI runs as root)",
            path.display()
        );
        Self {
            path: path.to_owned(),
        }
    }

    fn grow(&self, kib: u64) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={kib}k")])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(status.success(), "growing the tmpfs failed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Issue 20, object-store faults on a local lake: the disk fills up mid-ingest. The
/// worker stops with an error that says so (never hangs, never commits part of a flush);
/// once there is room again, a restart resumes, and bronze, dead letters and silver equal
/// those of an uninterrupted run.
#[test]
fn a_local_lake_whose_disk_fills_up_stops_clearly_and_resumes_exactly_once() {
    let (_guard, dir) = workdir();
    let summary = generate(
        &dir,
        &[
            "--merchants",
            "6",
            "--days",
            "12",
            "--seed",
            "74",
            "--duplicate-rate",
            "0.02",
            "--late-rate",
            "0.02",
            "--malformed-rate",
            "0.005",
        ],
    );
    let topic = unique("diskfull");
    produce(&dir, &topic, 4);
    // Short sessions: a worker that failed leaves no member behind for long.
    let config = dir.join("short-sessions.toml");
    std::fs::write(
        &config,
        "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n",
    )
    .unwrap();
    let worker_args = |group: &str, lake: &Path| {
        let mut args = ingest_args_with_silver(&topic, group, lake);
        args.extend(["--max-records", "400", "--exit-at-end", "--config"].map(str::to_owned));
        args.push(config.display().to_string());
        args
    };
    let reference = dir.join("reference");
    let (status, _, log) = Worker::start(&dir, &worker_args(&unique("ref"), &reference), &[])
        .wait_with_output(Duration::from_secs(300));
    assert!(status.success(), "the uninterrupted run failed:\n{log}");
    let du = Command::new("du")
        .arg("-sk")
        .arg(&reference)
        .output()
        .unwrap();
    let reference_kib: u64 = String::from_utf8(du.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // A disk that holds about half of the finished lake.
    let disk = SmallDisk::mount(&dir.join("disk"), (reference_kib / 2).max(64));
    let lake = disk.path.join("lake");
    let group = unique("full");
    let (status, _, log) = Worker::start(&dir, &worker_args(&group, &lake), &[])
        .wait_with_output(Duration::from_secs(300));
    assert!(
        !status.success(),
        "a worker on a full disk reported success"
    );
    assert!(
        log.contains("No space left on device"),
        "the worker's error does not say the disk is full:\n{log}"
    );
    let stored_when_full = stored(&lake);
    assert!(
        stored_when_full < summary["lines"].as_i64().unwrap(),
        "the disk filled only after everything was stored"
    );

    disk.grow(reference_kib * 8);
    let (status, _, log) = Worker::start(&dir, &worker_args(&group, &lake), &[])
        .wait_with_output(Duration::from_secs(300));
    assert!(
        status.success(),
        "the worker did not resume once the disk had room:\n{log}"
    );
    assert_each_record_stored_once(&lake, &summary);
    for query in [
        "SELECT kafka_partition, kafka_offset, event_id, merchant_id, kind, amount_fen FROM pos_events ORDER BY 1, 2",
        "SELECT kafka_partition, kafka_offset, reason FROM dead_letters ORDER BY 1, 2",
    ] {
        assert_eq!(
            sql_table(&lake, query),
            sql_table(&reference, query),
            "{query}"
        );
    }
    assert_eq!(
        silver_as_truth(&dir, &lake),
        silver_as_truth(&dir, &reference)
    );
    eprintln!(
        "disk of {} KiB filled with {stored_when_full} of {} records stored; resumed exactly once",
        (reference_kib / 2).max(64),
        summary["lines"]
    );
}
