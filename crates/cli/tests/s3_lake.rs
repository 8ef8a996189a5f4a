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

/// What the fault proxy does to the store's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Fault {
    /// Forwards both ways.
    Pass = 0,
    /// Closes every connection at its next request: the store is down.
    Refuse = 1,
    /// Answers every request with `503 Slow Down`, as S3 does under load.
    ServerError = 2,
    /// Forwards the request, so the store applies it, and drops the answer: the writer
    /// cannot know whether its write or commit landed.
    LoseResponse = 3,
}

impl Fault {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Fault::Refuse,
            2 => Fault::ServerError,
            3 => Fault::LoseResponse,
            _ => Fault::Pass,
        }
    }
}

/// A TCP proxy in front of the test S3 server that injects [`Fault`]s into live
/// connections, including the ones a client keeps in its pool.
struct FaultProxy {
    address: String,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    /// Connections faulted, by [`Fault`] discriminant.
    injected: std::sync::Arc<[std::sync::atomic::AtomicU64; 4]>,
}

impl FaultProxy {
    fn start(upstream: &str) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU8, AtomicU64};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let mode = Arc::new(AtomicU8::new(Fault::Pass as u8));
        let injected: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
        let upstream = upstream.to_owned();
        let (accept_mode, accept_injected) = (mode.clone(), injected.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let (mode, injected, upstream) = (
                    accept_mode.clone(),
                    accept_injected.clone(),
                    upstream.clone(),
                );
                std::thread::spawn(move || proxy_connection(client, &upstream, &mode, &injected));
            }
        });
        Self {
            address,
            mode,
            injected,
        }
    }

    fn set(&self, fault: Fault) {
        self.mode
            .store(fault as u8, std::sync::atomic::Ordering::SeqCst);
    }

    fn injected(&self, fault: Fault) -> u64 {
        self.injected[fault as usize].load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Pumps one client connection to the store and back, faulting it as the mode says at
/// each chunk of a request or an answer.
fn proxy_connection(
    mut client: std::net::TcpStream,
    upstream: &str,
    mode: &std::sync::Arc<std::sync::atomic::AtomicU8>,
    injected: &std::sync::Arc<[std::sync::atomic::AtomicU64; 4]>,
) {
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::sync::atomic::Ordering;
    let Ok(mut server) = std::net::TcpStream::connect(upstream) else {
        return;
    };
    let (Ok(mut client_back), Ok(mut server_back)) = (client.try_clone(), server.try_clone())
    else {
        return;
    };
    // Answers: the connection is closed instead while responses are being lost.
    let answer_mode = mode.clone();
    let answers = std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let read = match server_back.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            if Fault::from_u8(answer_mode.load(Ordering::SeqCst)) == Fault::LoseResponse {
                break;
            }
            if client_back.write_all(&buffer[..read]).is_err() {
                break;
            }
        }
        let _ = client_back.shutdown(Shutdown::Both);
        let _ = server_back.shutdown(Shutdown::Both);
    });
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let read = match client.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let fault = Fault::from_u8(mode.load(Ordering::SeqCst));
        if fault != Fault::Pass {
            injected[fault as usize].fetch_add(1, Ordering::SeqCst);
        }
        match fault {
            Fault::Pass | Fault::LoseResponse => {}
            Fault::Refuse => break,
            Fault::ServerError => {
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>\
                            <Message>Please reduce your request rate.</Message></Error>";
                let _ = write!(
                    client,
                    "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                break;
            }
        }
        if server.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
    let _ = answers.join();
}

/// Issue 20, object-store faults: while a worker ingests and keeps silver, the S3 store
/// answers `503`, refuses connections and applies writes whose answers are lost, cycle
/// after cycle. A worker whose store fails past its retries exits with an error that names
/// the table; started again, it resumes where the lake says. In the end nothing is lost or
/// doubled, no commit is partial (doctor finds the tables whole) and silver equals the
/// truth.
#[test]
fn an_s3_store_that_fails_and_loses_answers_mid_ingest_loses_and_doubles_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    let (_guard, dir) = workdir();
    let summary = generate(
        &dir,
        &[
            "--merchants",
            "6",
            "--days",
            "12",
            "--seed",
            "73",
            "--truth",
            "truth.csv",
            "--duplicate-rate",
            "0.02",
            "--late-rate",
            "0.02",
            "--malformed-rate",
            "0.005",
        ],
    );
    let lines = summary["lines"].as_i64().unwrap();
    let topic = unique("s3faults");
    produce(&dir, &topic, 4);
    let bucket = unique("faults").replace('_', "-");
    create_bucket(&bucket);
    let lake = format!("s3://{bucket}/district");
    let proxy = Arc::new(FaultProxy::start(
        s3_endpoint().trim_start_matches("http://"),
    ));
    // The store through the proxy, with few and short retries, so that faults reach the
    // worker instead of being absorbed by the object store client.
    let config = dir.join("faulty-store.toml");
    std::fs::write(
        &config,
        format!(
            "[lake.storage]\naws_endpoint_url = \"http://{}\"\naws_access_key_id = \"streetflow-test\"\n\
             aws_secret_access_key = \"streetflow-test\"\naws_region = \"us-east-1\"\nallow_http = \"true\"\n\
             max_retries = \"2\"\nretry_timeout = \"4s\"\n\
             [kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n",
            proxy.address
        ),
    )
    .unwrap();
    let group = unique("g");
    let args: Vec<String> = [
        "ingest",
        "--config",
        config.to_str().unwrap(),
        "--brokers",
        broker(),
        "--topic",
        &topic,
        "--group",
        &group,
        "--lake",
        &lake,
        "--max-records",
        "400",
        "--exit-at-end",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();

    // Faults for the first 45 seconds, then a healthy store for the run that finishes.
    let healthy = Arc::new(AtomicBool::new(false));
    let schedule = {
        let (proxy, healthy) = (proxy.clone(), healthy.clone());
        std::thread::spawn(move || {
            let cycle = [
                (Fault::Pass, 1200),
                (Fault::ServerError, 900),
                (Fault::Pass, 1200),
                (Fault::Refuse, 900),
                (Fault::Pass, 1200),
                (Fault::LoseResponse, 500),
            ];
            let until = Instant::now() + Duration::from_secs(45);
            'faults: while Instant::now() < until {
                for (fault, millis) in cycle {
                    if healthy.load(Ordering::SeqCst) {
                        break 'faults;
                    }
                    proxy.set(fault);
                    std::thread::sleep(Duration::from_millis(millis));
                }
            }
            proxy.set(Fault::Pass);
        })
    };

    let deadline = Instant::now() + Duration::from_secs(480);
    let mut failed_runs = Vec::new();
    loop {
        let worker = Worker::start(&dir, &args, &[]);
        let (status, _report, log) =
            worker.wait_with_output(deadline.saturating_duration_since(Instant::now()));
        if status.success() {
            break;
        }
        assert!(
            log.contains("Delta table") || log.contains("object store"),
            "a worker failed without naming the store or the table:\n{log}"
        );
        failed_runs.push(log);
        assert!(
            failed_runs.len() <= 30,
            "the worker never finished:\n{}",
            failed_runs.join("\n---\n")
        );
    }
    healthy.store(true, Ordering::SeqCst);
    schedule.join().unwrap();
    for fault in [Fault::ServerError, Fault::Refuse, Fault::LoseResponse] {
        assert!(
            proxy.injected(fault) > 0,
            "no {fault:?} reached the store's traffic"
        );
    }
    eprintln!(
        "faults injected: {} answered 503, {} refused, {} answers lost; {} worker runs failed",
        proxy.injected(Fault::ServerError),
        proxy.injected(Fault::Refuse),
        proxy.injected(Fault::LoseResponse),
        failed_runs.len()
    );

    // Read straight from the store, past the proxy.
    let events = count(&dir, &lake, "SELECT count(*) FROM pos_events");
    let dead = count(&dir, &lake, "SELECT count(*) FROM dead_letters");
    assert_eq!(events + dead, lines, "records lost or doubled");
    let distinct_events = count(
        &dir,
        &lake,
        "SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM pos_events)",
    );
    assert_eq!(
        distinct_events, events,
        "an offset stored twice in pos_events"
    );
    let distinct_dead = count(
        &dir,
        &lake,
        "SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM dead_letters)",
    );
    assert_eq!(
        distinct_dead, dead,
        "an offset stored twice in dead_letters"
    );
    assert_eq!(
        dead,
        summary["malformed"].as_i64().unwrap(),
        "dead letters lost or doubled"
    );
    let truth = std::fs::read_to_string(dir.join("truth.csv")).unwrap();
    let silver = sql_csv(
        &dir,
        &lake,
        &format!(
            "SELECT {TRUTH_COLUMNS} FROM merchant_daily ORDER BY operator_id, merchant_id, business_date"
        ),
    );
    assert_eq!(silver, truth);
    let env: Vec<(String, String)> = s3_env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let (_, checks) = doctor_checks(
        &dir,
        &["--brokers", broker(), "--topic", &topic, "--lake", &lake],
        &env,
    );
    assert!(
        checks.iter().all(|c| !c.0.starts_with("files of")),
        "damaged files after the faults: {checks:#?}"
    );
    for table in ["pos_events", "dead_letters", "merchant_daily"] {
        let check = checks.iter().find(|c| c.0 == format!("table {table}"));
        assert!(
            check.is_some_and(|c| c.1 == "ok"),
            "{table} after the faults: {checks:#?}"
        );
    }
}
