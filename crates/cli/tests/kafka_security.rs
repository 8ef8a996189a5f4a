//! Secured Kafka settings: the binary's librdkafka has TLS and SCRAM (OpenSSL), a secret
//! given through the environment reaches librdkafka and never shows in a worker's log.
//!
//! An end-to-end TLS run is not here: Tansu 0.6, the test broker, refuses `--cert` with
//! `--key`, and with a combined PEM its listener does not answer a TLS handshake.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use common::*;

#[test]
fn a_secret_from_the_environment_never_reaches_the_log() {
    let (_guard, dir) = workdir();
    let summary = generate(&dir, &["--merchants", "3", "--days", "10", "--seed", "3"]);
    let lines = summary["lines"].as_i64().unwrap();
    let topic = unique("secret");
    produce(&dir, &topic, 2);
    let secret = "do-not-log-me-7f3a9c";
    let output = streetflow()
        .args([
            "ingest",
            "--brokers",
            broker(),
            "--topic",
            &topic,
            "--group",
            &unique("g"),
            "--lake",
            "lake",
            "--exit-at-end",
            "--no-silver",
        ])
        // PLAINTEXT ignores SASL settings, but librdkafka still receives and checks them.
        .env("STREETFLOW__KAFKA__PROPERTIES__SASL_USERNAME", "streetflow")
        .env("STREETFLOW__KAFKA__PROPERTIES__SASL_PASSWORD", secret)
        .env("RUST_LOG", "debug")
        .current_dir(&dir)
        .output()
        .unwrap();
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
