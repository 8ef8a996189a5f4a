//! Helpers for end-to-end tests against a real Kafka-protocol broker and a real lake.
//!
//! The broker is `STREETFLOW_TEST_BROKERS` when set (`.ci/run` starts Tansu and sets it);
//! otherwise the first test starts its own Tansu (memory storage, loopback, a free port)
//! behind a shell that kills it when this test process exits.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // shared by several test binaries

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use streetflow_lake::Lake;
use streetflow_lake::arrow::array::{Array, Int64Array};
use streetflow_lake::arrow::util::pretty::pretty_format_batches;

static OWN_BROKER: Mutex<Option<Child>> = Mutex::new(None);

/// The test broker's bootstrap address.
pub fn broker() -> &'static str {
    static ADDRESS: OnceLock<String> = OnceLock::new();
    ADDRESS.get_or_init(|| {
        if let Ok(address) = std::env::var("STREETFLOW_TEST_BROKERS") {
            return address;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address = format!("127.0.0.1:{port}");
        start_server(
            &format!(
                "tansu broker --listener-url tcp://{address} --advertised-listener-url tcp://{address} \
                 --storage-engine memory://tansu/"
            ),
            &address,
            &OWN_BROKER,
            "no test broker: set STREETFLOW_TEST_BROKERS or install Tansu (.ci/run does both)",
        );
        address
    })
}

/// Starts `command` in the background behind a shell that stops it when this test
/// process exits (its stdin closes), and waits until `address` accepts connections.
pub fn start_server(command: &str, address: &str, keeper: &Mutex<Option<Child>>, missing: &str) {
    start_server_in(Path::new("."), command, address, keeper, missing);
}

/// [`start_server`] with `dir` as the server's working directory.
pub fn start_server_in(
    dir: &Path,
    command: &str,
    address: &str,
    keeper: &Mutex<Option<Child>>,
    missing: &str,
) {
    let script = format!("{command} >/dev/null 2>&1 & pid=$!; cat >/dev/null; kill $pid");
    let child = Command::new("sh")
        .args(["-c", &script])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    *keeper.lock().unwrap() = Some(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(address).is_err() {
        assert!(Instant::now() < deadline, "{missing}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops a server [`start_server`] started and waits until `address` refuses connections.
pub fn stop_server(keeper: &Mutex<Option<Child>>, address: &str) {
    if let Some(mut child) = keeper.lock().unwrap().take() {
        drop(child.stdin.take());
        child.wait().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(address).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the server at {address} did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A name no other test uses (topics, groups).
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t_{prefix}_{nanos}")
}

/// The `streetflow` binary under test.
pub fn streetflow() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_streetflow"));
    // deltalake's per-file statistics warnings would bury the worker's own lines.
    command.env(
        "RUST_LOG",
        "warn,streetflow_ingest=info,deltalake_core=error",
    );
    command
}

/// How long one command of a test may run before it is killed: a hung worker must fail
/// its test with its log, not stall CI until its time limit.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(600);

/// Like [`Command::output`], but kills the process after `limit` and panics with what it
/// printed by then.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = sender.send(bytes);
        });
        receiver
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // A grandchild holding a pipe open must not hang the test either.
    let collect = |receiver: std::sync::mpsc::Receiver<Vec<u8>>| {
        receiver
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_default()
    };
    let (stdout, stderr) = (collect(stdout), collect(stderr));
    let Some(status) = status else {
        panic!(
            "{command:?} still running after {limit:?}; killed. stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    Output {
        status,
        stdout,
        stderr,
    }
}

/// [`output_within`] the [`COMMAND_LIMIT`].
pub fn finish(command: &mut Command) -> Output {
    output_within(command, COMMAND_LIMIT)
}

/// Runs `streetflow` to completion; panics with its output when it fails.
pub fn run(dir: &Path, args: &[&str]) -> Output {
    let output = finish(streetflow().args(args).current_dir(dir));
    assert!(
        output.status.success(),
        "streetflow {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `streetflow … --json` and parses its output.
pub fn run_json(dir: &Path, args: &[&str]) -> Value {
    let output = run(dir, args);
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

/// The district of the group and broker-fault tests: 20 merchants × 30 days (about
/// 54,000 records) with 1 % re-deliveries and 0.5 % malformed messages.
pub fn generate_busy_district(dir: &Path, seed: &str) -> Value {
    generate(
        dir,
        &[
            "--merchants",
            "20",
            "--days",
            "30",
            "--seed",
            seed,
            "--duplicate-rate",
            "0.01",
            "--malformed-rate",
            "0.005",
        ],
    )
}

/// Generates a district into `dir/events.jsonl` and returns the generator's summary.
pub fn generate(dir: &Path, args: &[&str]) -> Value {
    let mut all = vec!["gen", "--out", "events.jsonl", "--json"];
    all.extend_from_slice(args);
    run_json(dir, &all)
}

/// Publishes `dir/events.jsonl` to a new topic with `partitions` partitions.
pub fn produce(dir: &Path, topic: &str, partitions: u32) -> Value {
    let partitions = partitions.to_string();
    run_json(
        dir,
        &[
            "produce",
            "--brokers",
            broker(),
            "--topic",
            topic,
            "--input",
            "events.jsonl",
            "--partitions",
            &partitions,
            "--json",
        ],
    )
}

/// The arguments of an ingest worker reading `topic` into `lake`.
///
/// Without the merchant_daily refresh: these tests are about bronze, and refreshing
/// silver after every small flush of a debug build would dominate their run time.
pub fn ingest_args(topic: &str, group: &str, lake: &Path) -> Vec<String> {
    let mut args = ingest_args_with_silver(topic, group, lake);
    args.push("--no-silver".into());
    args
}

/// `streetflow ingest` arguments with merchant_daily kept fresh after each flush.
pub fn ingest_args_with_silver(topic: &str, group: &str, lake: &Path) -> Vec<String> {
    vec![
        "ingest".into(),
        "--brokers".into(),
        broker().into(),
        "--topic".into(),
        topic.into(),
        "--group".into(),
        group.into(),
        "--lake".into(),
        lake.display().to_string(),
    ]
}

/// A worker started in the background; stderr is watched for `FROZEN AT`.
pub struct Worker {
    pub child: Child,
    stderr_lines: std::sync::mpsc::Receiver<String>,
}

impl Worker {
    pub fn start(dir: &Path, args: &[String], env: &[(&str, &str)]) -> Self {
        let mut command = streetflow();
        command
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stderr_lines: rx,
        }
    }

    /// Waits for a line containing `needle` on stderr; returns the lines seen.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match self.stderr_lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    seen.push(line);
                    if hit {
                        return seen;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!(
                            "worker exited ({status}) before {needle:?}:\n{}",
                            seen.join("\n")
                        );
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("no {needle:?} within {timeout:?}:\n{}", seen.join("\n"));
    }

    /// The warnings and errors printed since the previous call, then the last `count`
    /// other lines (for failure messages).
    pub fn log_digest(&mut self, count: usize) -> String {
        let lines: Vec<String> = self.stderr_lines.try_iter().collect();
        let problems: Vec<&str> = lines
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(String::as_str)
            .collect();
        format!(
            "warnings and errors:\n{}\nlast lines:\n{}",
            problems.join("\n"),
            lines[lines.len().saturating_sub(count)..].join("\n")
        )
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(self, timeout: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.wait(timeout)
    }

    /// Waits for the worker to exit.
    pub fn wait(mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Worker {
    /// Waits for the worker to exit; its status, its report (stdout) and the warnings
    /// and last lines of its log, for a test that must explain a wrong outcome.
    pub fn wait_with_output(
        mut self,
        timeout: Duration,
    ) -> (std::process::ExitStatus, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "worker still running after {timeout:?}:\n{}",
                self.log_digest(40)
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut report = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut stdout, &mut report);
        }
        // The stderr reader thread ends with the process; give it a moment to drain.
        std::thread::sleep(Duration::from_millis(200));
        let log = self.log_digest(40);
        (status, report, log)
    }
}

/// A test that fails must not leave its workers running (they would hold the broker's
/// partitions and the machine's cores for the tests after it).
impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs SQL over the lake at `dir` and renders the result as a table.
pub fn sql_table(lake: &Path, query: &str) -> String {
    let lake = Lake::new(lake.to_str().unwrap(), &Default::default()).unwrap();
    let batches = runtime().block_on(lake.query(query)).unwrap();
    pretty_format_batches(&batches).unwrap().to_string()
}

/// Runs SQL returning one BIGINT row per result row.
pub fn sql_i64s(lake: &Path, query: &str) -> Vec<i64> {
    let lake = Lake::new(lake.to_str().unwrap(), &Default::default()).unwrap();
    let batches = runtime().block_on(lake.query(query)).unwrap();
    let mut values = Vec::new();
    for batch in batches {
        let column = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        values.extend((0..column.len()).map(|i| column.value(i)));
    }
    values
}

/// One number from SQL.
pub fn sql_i64(lake: &Path, query: &str) -> i64 {
    sql_i64s(lake, query)[0]
}

/// Rows per table, 0 when the table does not exist yet.
pub fn row_count(lake: &Path, table: &str) -> i64 {
    if !lake.join(table).join("_delta_log").exists() {
        return 0;
    }
    sql_i64(lake, &format!("SELECT count(*) FROM {table}"))
}

/// A fresh directory for one test.
pub fn workdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

/// The columns of the generator's `truth.csv`, in its order.
pub const TRUTH_COLUMNS: &str = "operator_id, merchant_id, business_date, sales_count, sales_fen, refund_count, \
    refund_fen, void_count, net_fen, orphan_refund_count, orphan_void_count";

/// `merchant_daily` as CSV in the layout of the generator's `truth.csv`.
pub fn silver_as_truth(dir: &Path, lake: &Path) -> String {
    let lake = lake.display().to_string();
    let query = format!(
        "SELECT {TRUTH_COLUMNS} FROM merchant_daily ORDER BY operator_id, merchant_id, business_date"
    );
    let output = run(dir, &["sql", "--lake", &lake, "--format", "csv", &query]);
    String::from_utf8(output.stdout).unwrap()
}

static OWN_S3: Mutex<Option<Child>> = Mutex::new(None);

/// The test S3-compatible endpoint: `STREETFLOW_TEST_S3_ENDPOINT` when set (`.ci/run`
/// starts moto's server and sets it); otherwise the first test starts moto itself.
pub fn s3_endpoint() -> &'static str {
    static ADDRESS: OnceLock<String> = OnceLock::new();
    ADDRESS.get_or_init(|| {
        if let Ok(endpoint) = std::env::var("STREETFLOW_TEST_S3_ENDPOINT") {
            return endpoint;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address = format!("127.0.0.1:{port}");
        start_server(
            &format!("python3 -m moto.server -H 127.0.0.1 -p {port}"),
            &address,
            &OWN_S3,
            "no S3 test server: set STREETFLOW_TEST_S3_ENDPOINT or install moto[server] (.ci/run does both)",
        );
        format!("http://{address}")
    })
}

/// The AWS environment a process needs to use the test S3 server.
pub fn s3_env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", s3_endpoint().to_owned()),
        ("AWS_ACCESS_KEY_ID", "streetflow-test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "streetflow-test".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
    ]
}

/// Creates a bucket on the test S3 server (moto accepts unsigned requests).
pub fn create_bucket(bucket: &str) {
    use std::io::{Read, Write};
    let address = s3_endpoint().trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "PUT /{bucket} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "creating bucket {bucket}: {response}"
    );
}

/// Runs streetflow with extra environment variables; panics with its output on failure.
pub fn run_with_env(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut command = streetflow();
    command.args(args).current_dir(dir);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = finish(&mut command);
    assert!(
        output.status.success(),
        "streetflow {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `streetflow doctor --json` with `args` and the environment `env`; returns its exit
/// success and its checks as (check, status, detail).
pub fn doctor_checks(
    dir: &Path,
    args: &[&str],
    env: &[(String, String)],
) -> (bool, Vec<(String, String, String)>) {
    let mut command = streetflow();
    command
        .args(["doctor", "--json", "--timeout-seconds", "5"])
        .args(args)
        .current_dir(dir);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = finish(&mut command);
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    let checks = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["check"].as_str().unwrap().to_owned(),
                c["status"].as_str().unwrap().to_owned(),
                c["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (output.status.success(), checks)
}

/// The lake holds every record of a generated district exactly once: each valid event
/// (duplicates included, they are separate records) once in `pos_events` at its own
/// offset, each malformed one in `dead_letters`.
pub fn assert_each_record_stored_once(lake: &Path, summary: &Value) {
    let valid =
        summary["unique_events"].as_i64().unwrap() + summary["duplicates"].as_i64().unwrap();
    assert_eq!(
        row_count(lake, "pos_events"),
        valid,
        "lost or doubled events"
    );
    assert_eq!(
        sql_i64(
            lake,
            "SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM pos_events)"
        ),
        valid,
        "two rows at one offset"
    );
    assert_eq!(
        row_count(lake, "dead_letters"),
        summary["malformed"].as_i64().unwrap(),
        "lost or doubled dead letters"
    );
}
