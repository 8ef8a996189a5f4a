//! Secured Kafka settings: the binary's librdkafka has TLS and SCRAM (OpenSSL), a secret
//! given through the environment reaches librdkafka and never shows in a worker's log.
//!
//! End to end over TLS: Tansu 0.6 cannot serve TLS itself (its `--cert` and `--key`
//! options are one clap group, so they exclude each other and TLS never starts), so the
//! test puts a TLS terminator (`common/tls_proxy.py`, Python's `ssl`) in front of a
//! Tansu of its own that advertises the terminator's address: every byte a client sends
//! or reads crosses TLS, and the client verifies the server certificate.
//!
//! End to end over SASL/SCRAM-SHA-512: Tansu keeps SCRAM credentials in its storage, and
//! `tansu user create` cannot log in to a broker that already demands authentication. So
//! the test starts a Tansu on SQLite storage without authentication, creates the user,
//! and restarts it on the same database with `--authentication`.
//!
//! Both at once (`SASL_SSL`): that Tansu, advertising the address of a TLS terminator in
//! front of it.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Mutex;

use common::*;

static TLS_BROKER: Mutex<Option<Child>> = Mutex::new(None);
static TLS_TERMINATOR: Mutex<Option<Child>> = Mutex::new(None);
static SASL_BROKER: Mutex<Option<Child>> = Mutex::new(None);
static SASL_SSL_BROKER: Mutex<Option<Child>> = Mutex::new(None);
static SASL_SSL_TERMINATOR: Mutex<Option<Child>> = Mutex::new(None);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway self-signed certificate for 127.0.0.1 (its own CA): `(cert, key)`.
fn certificate(dir: &Path, name: &str) -> (String, String) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (.ci/run installs it)");
    assert!(status.status.success(), "{status:?}");
    (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    )
}

/// Starts a Tansu reachable only through TLS; returns its bootstrap address.
fn tls_broker(dir: &Path, cert: &str, key: &str) -> String {
    let (plain, tls) = (free_port(), free_port());
    let tls_address = format!("127.0.0.1:{tls}");
    start_server(
        &format!(
            "tansu broker --listener-url tcp://127.0.0.1:{plain} \
             --advertised-listener-url tcp://{tls_address} --storage-engine memory://tansu/"
        ),
        &format!("127.0.0.1:{plain}"),
        &TLS_BROKER,
        "Tansu did not start (.ci/run installs it)",
    );
    let proxy = dir.join("tls_proxy.py");
    std::fs::write(&proxy, include_str!("common/tls_proxy.py")).unwrap();
    start_server(
        &format!("python3 {} {tls} {plain} {cert} {key}", proxy.display()),
        &tls_address,
        &TLS_TERMINATOR,
        "the TLS terminator did not start",
    );
    tls_address
}

/// The environment that sets the librdkafka `properties` for a streetflow command.
fn property_envs(properties: &[(&str, &str)]) -> Vec<(String, String)> {
    properties
        .iter()
        .map(|(key, value)| {
            (
                format!(
                    "STREETFLOW__KAFKA__PROPERTIES__{}",
                    key.replace('.', "_").to_uppercase()
                ),
                (*value).to_owned(),
            )
        })
        .collect()
}

/// Generates a district with duplicates and malformed lines, produces it to a new topic
/// on `brokers` with the librdkafka `properties` (as `--property`), ingests it with the
/// same properties from the environment, and checks that every line reached the lake and
/// silver equals the generator's truth. Returns the topic and the worker's log.
fn secured_round_trip(dir: &Path, brokers: &str, properties: &[(&str, &str)]) -> (String, String) {
    let summary = generate(
        dir,
        &[
            "--merchants",
            "4",
            "--days",
            "20",
            "--seed",
            "5",
            "--truth",
            "truth.csv",
            "--duplicate-rate",
            "0.03",
            "--malformed-rate",
            "0.01",
        ],
    );
    let lines = summary["lines"].as_i64().unwrap();
    let topic = unique("secured");
    let mut produce = vec![
        "produce".to_owned(),
        "--brokers".to_owned(),
        brokers.to_owned(),
        "--topic".to_owned(),
        topic.clone(),
        "--input".to_owned(),
        "events.jsonl".to_owned(),
        "--partitions".to_owned(),
        "2".to_owned(),
    ];
    for (key, value) in properties {
        produce.extend(["--property".to_owned(), format!("{key}={value}")]);
    }
    run(dir, &produce.iter().map(String::as_str).collect::<Vec<_>>());
    let env = property_envs(properties);
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let ingest = run_with_env(
        dir,
        &[
            "ingest",
            "--brokers",
            brokers,
            "--topic",
            &topic,
            "--group",
            &unique("g"),
            "--lake",
            "lake",
            "--exit-at-end",
        ],
        &env,
    );
    let lake = dir.join("lake");
    assert_eq!(
        row_count(&lake, "pos_events") + row_count(&lake, "dead_letters"),
        lines,
        "every produced line crossed the secured connection into the lake"
    );
    let truth = std::fs::read_to_string(dir.join("truth.csv")).unwrap();
    assert_eq!(silver_as_truth(dir, &lake), truth);
    (topic, String::from_utf8_lossy(&ingest.stderr).into_owned())
}

/// The status `streetflow doctor` gives each of its checks (e.g. "brokers") for `topic`
/// on `brokers`, with the librdkafka `properties` from the environment.
fn doctor_with(
    dir: &Path,
    brokers: &str,
    topic: &str,
    properties: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let args = ["--brokers", brokers, "--topic", topic, "--lake", "lake"];
    let (_, checks) = doctor_checks(dir, &args, &property_envs(properties));
    checks
        .into_iter()
        .map(|(check, status, _)| (check, status))
        .collect()
}

#[test]
fn events_cross_tls_end_to_end_and_a_wrong_ca_is_refused() {
    let (_guard, dir) = workdir();
    let (cert, key) = certificate(&dir, "broker");
    let (other_ca, _) = certificate(&dir, "stranger");
    let brokers = tls_broker(&dir, &cert, &key);
    let trusted = [
        ("security.protocol", "SSL"),
        ("ssl.ca.location", cert.as_str()),
    ];
    let stranger = [
        ("security.protocol", "SSL"),
        ("ssl.ca.location", other_ca.as_str()),
    ];
    let (topic, _) = secured_round_trip(&dir, &brokers, &trusted);

    // The same broker through a client that trusts another CA: the handshake fails, so
    // the client really verifies the certificate.
    assert_eq!(
        doctor_with(&dir, &brokers, &topic, &trusted)["brokers"],
        "ok"
    );
    assert_eq!(
        doctor_with(&dir, &brokers, &topic, &stranger)["brokers"],
        "PROBLEM"
    );
}

/// Starts a Tansu that admits only SCRAM-SHA-512 user `user` with `password`; returns its
/// bootstrap address.
fn sasl_broker(dir: &Path, user: &str, password: &str) -> String {
    let address = format!("127.0.0.1:{}", free_port());
    start_sasl_tansu(dir, user, password, &address, &address, &SASL_BROKER);
    address
}

/// Starts a Tansu listening on `address` with SCRAM-SHA-512 user `user` and
/// `--authentication`, advertising `advertised` (another address when a TLS terminator
/// is in front of it).
fn start_sasl_tansu(
    dir: &Path,
    user: &str,
    password: &str,
    address: &str,
    advertised: &str,
    keeper: &Mutex<Option<Child>>,
) {
    // Tansu reads the SQLite path relative to its working directory.
    let tansu = |advertised: &str| {
        format!(
            "tansu broker --listener-url tcp://{address} --advertised-listener-url tcp://{advertised} \
             --storage-engine sqlite://broker.db"
        )
    };
    // The user is created on a broker without authentication, reached directly.
    start_server_in(
        dir,
        &tansu(address),
        address,
        keeper,
        "Tansu did not start (.ci/run installs it with the libsql feature)",
    );
    let created = Command::new("tansu")
        .args(["user", "create", "--broker", &format!("tcp://{address}")])
        .args([user, password, "--mechanism", "scram512"])
        .output()
        .unwrap();
    assert!(created.status.success(), "tansu user create: {created:?}");
    stop_server(keeper, address);
    start_server_in(
        dir,
        &format!("{} --authentication", tansu(advertised)),
        address,
        keeper,
        "Tansu did not restart with --authentication",
    );
}

#[test]
fn events_cross_sasl_scram_end_to_end_and_a_wrong_password_is_refused() {
    let (_guard, dir) = workdir();
    let password = "scram-secret-5b1e";
    let brokers = sasl_broker(&dir, "alice", password);
    let sasl = |secret| {
        [
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "alice"),
            ("sasl.password", secret),
        ]
    };
    let (topic, log) = secured_round_trip(&dir, &brokers, &sasl(password));
    assert!(!log.contains(password), "the password is in the log");

    // The broker really checks the password.
    let admitted = doctor_with(&dir, &brokers, &topic, &sasl(password));
    assert_eq!(admitted["brokers"], "ok", "{admitted:?}");
    assert_eq!(admitted["topic"], "ok", "{admitted:?}");
    let refused = doctor_with(&dir, &brokers, &topic, &sasl("not-the-password"));
    assert_eq!(refused["brokers"], "PROBLEM", "{refused:?}");
}

/// SCRAM over TLS (`SASL_SSL`), the usual setting of a bank's managed Kafka: a Tansu with
/// authentication behind the TLS terminator.
#[test]
fn events_cross_sasl_over_tls_end_to_end() {
    let (_guard, dir) = workdir();
    let (cert, key) = certificate(&dir, "broker");
    let password = "scram-over-tls-91c4";
    let (plain, tls) = (free_port(), free_port());
    let (plain, tls) = (format!("127.0.0.1:{plain}"), format!("127.0.0.1:{tls}"));
    start_sasl_tansu(&dir, "bob", password, &plain, &tls, &SASL_SSL_BROKER);
    let proxy = dir.join("tls_proxy.py");
    std::fs::write(&proxy, include_str!("common/tls_proxy.py")).unwrap();
    let (tls_port, plain_port) = (
        tls.rsplit(':').next().unwrap(),
        plain.rsplit(':').next().unwrap(),
    );
    start_server(
        &format!(
            "python3 {} {tls_port} {plain_port} {cert} {key}",
            proxy.display()
        ),
        &tls,
        &SASL_SSL_TERMINATOR,
        "the TLS terminator did not start",
    );
    let settings = |secret| {
        [
            ("security.protocol", "SASL_SSL"),
            ("ssl.ca.location", cert.as_str()),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "bob"),
            ("sasl.password", secret),
        ]
    };
    let (topic, log) = secured_round_trip(&dir, &tls, &settings(password));
    assert!(!log.contains(password), "the password is in the log");
    let admitted = doctor_with(&dir, &tls, &topic, &settings(password));
    assert_eq!(admitted["brokers"], "ok", "{admitted:?}");
    let refused = doctor_with(&dir, &tls, &topic, &settings("not-the-password"));
    assert_eq!(refused["brokers"], "PROBLEM", "{refused:?}");
}

#[test]
fn a_secret_from_the_environment_never_reaches_the_log() {
    let (_guard, dir) = workdir();
    let summary = generate(&dir, &["--merchants", "3", "--days", "10", "--seed", "3"]);
    let lines = summary["lines"].as_i64().unwrap();
    let topic = unique("secret");
    produce(&dir, &topic, 2);
    let secret = "do-not-log-me-7f3a9c";
    let output = finish(
        streetflow()
            .args(ingest_args(&topic, &unique("g"), Path::new("lake")))
            .arg("--exit-at-end")
            // PLAINTEXT ignores SASL settings, but librdkafka still receives and checks them.
            .env("STREETFLOW__KAFKA__PROPERTIES__SASL_USERNAME", "streetflow")
            .env("STREETFLOW__KAFKA__PROPERTIES__SASL_PASSWORD", secret)
            .env("RUST_LOG", "debug")
            .current_dir(&dir),
    );
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{log}");
    assert!(
        log.lines().count() > 20,
        "too little logged to be a test:\n{log}"
    );
    assert!(!log.contains(secret), "the secret is in the log");
    assert_eq!(
        row_count(&dir.join("lake"), "pos_events") + row_count(&dir.join("lake"), "dead_letters"),
        lines
    );
}

#[test]
fn tls_and_scram_settings_are_supported_by_the_built_librdkafka() {
    let (_guard, dir) = workdir();
    for (protocol, extra) in [
        ("SSL", ""),
        (
            "SASL_SSL",
            "\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"u\"\n",
        ),
    ] {
        std::fs::write(
            dir.join("pipeline.toml"),
            format!(
                "[kafka]\nbrokers = \"127.0.0.1:1\"\n[kafka.properties]\n\"security.protocol\" = \"{protocol}\"\n{extra}"
            ),
        )
        .unwrap();
        let output = streetflow()
            .args([
                "doctor",
                "--config",
                "pipeline.toml",
                "--lake",
                "lake",
                "--json",
                "--timeout-seconds",
                "2",
            ])
            .env("STREETFLOW__KAFKA__PROPERTIES__SASL_PASSWORD", "p")
            .current_dir(&dir)
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let checks = report["checks"].as_array().unwrap();
        // librdkafka accepted the settings; only the (absent) broker is a problem.
        assert!(
            !checks.iter().any(|c| c["check"] == "kafka settings"),
            "{protocol}: {checks:#?}"
        );
        let brokers = checks.iter().find(|c| c["check"] == "brokers").unwrap();
        assert_eq!(brokers["status"], "PROBLEM", "{protocol}");
    }
}
