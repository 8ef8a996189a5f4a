//! Exactly-once ingest against a real broker (Tansu) into real Delta tables.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Dead letters per reason, as the lake holds them.
fn dead_letters_by_reason(lake: &std::path::Path) -> BTreeMap<String, i64> {
    let table = sql_table(
        lake,
        "SELECT reason, count(*) AS n FROM dead_letters GROUP BY reason ORDER BY reason",
    );
    table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.contains("reason"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (cells[0].to_owned(), cells[1].parse().unwrap())
        })
        .collect()
}

fn injected(summary: &Value) -> BTreeMap<String, i64> {
    summary["malformed_by_reason"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_i64().unwrap()))
        .collect()
}

#[test]
fn every_valid_record_lands_once_and_every_bad_one_is_a_dead_letter() {
    let (_guard, dir) = workdir();
    // ≈ 200k events over 6 partitions, with 1 % duplicates and 0.5 % malformed.
    let summary = generate(
        &dir,
        &[
            "--merchants",
            "60",
            "--days",
            "50",
            "--seed",
            "11",
            "--duplicate-rate",
            "0.01",
            "--malformed-rate",
            "0.005",
            "--late-rate",
            "0.01",
        ],
    );
    let lines = summary["lines"].as_i64().unwrap();
    assert!(lines >= 200_000, "only {lines} lines");
    let topic = unique("scale");
    let produced = produce(&dir, &topic, 6);
    assert_eq!(produced["delivered"].as_i64().unwrap(), lines);

    let lake = dir.join("lake");
    let mut args = ingest_args(&topic, &unique("g"), &lake);
    args.extend(["--exit-at-end".into(), "--json".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = run_json(&dir, &args);

    let valid =
        summary["unique_events"].as_i64().unwrap() + summary["duplicates"].as_i64().unwrap();
    let malformed = summary["malformed"].as_i64().unwrap();
    assert_eq!(row_count(&lake, "pos_events"), valid);
    assert_eq!(
        sql_i64(
            &lake,
            "SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM pos_events)"
        ),
        valid,
        "a Kafka record was stored twice"
    );
    assert_eq!(row_count(&lake, "dead_letters"), malformed);
    assert_eq!(dead_letters_by_reason(&lake), injected(&summary));
    // consumed = accepted + rejected, and the worker's own report agrees with the lake.
    assert_eq!(valid + malformed, lines);
    assert_eq!(report["accepted"].as_i64().unwrap(), valid);
    assert_eq!(report["dead_lettered"].as_i64().unwrap(), malformed);
    assert_eq!(
        sql_i64(
            &lake,
            "SELECT count(DISTINCT kafka_partition) FROM pos_events"
        ),
        6
    );

    // A second run over the same topic adds nothing: the offsets are in the lake.
    let again = run_json(&dir, &args);
    assert_eq!(again["accepted"].as_i64().unwrap(), 0);
    assert_eq!(row_count(&lake, "pos_events"), valid);
}

#[test]
fn arrival_time_is_the_kafka_timestamp_and_late_events_arrive_late() {
    let (_guard, dir) = workdir();
    generate(
        &dir,
        &[
            "--merchants",
            "8",
            "--days",
            "20",
            "--seed",
            "5",
            "--late-rate",
            "0.05",
        ],
    );
    let topic = unique("late");
    produce(&dir, &topic, 2);
    let lake = dir.join("lake");
    let mut args = ingest_args(&topic, &unique("g"), &lake);
    args.push("--exit-at-end".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&dir, &args);
    // The producer stamped late events (1–10 days) days after they occurred, the rest
    // within seconds (the stream clock), never before they occurred. The records keep
    // that timestamp and its type; the lake's knowledge time is its own commit's.
    let late = sql_i64(
        &lake,
        "SELECT count(*) FROM pos_events WHERE kafka_timestamp > occurred_at + INTERVAL '1 day' \
         AND kafka_timestamp_type = 'create_time'",
    );
    let early = sql_i64(
        &lake,
        "SELECT count(*) FROM pos_events WHERE kafka_timestamp < occurred_at",
    );
    let total = row_count(&lake, "pos_events");
    assert!(
        late > total / 50 && late < total / 10,
        "{late} late of {total}"
    );
    assert_eq!(early, 0);
    // Business dates are Shanghai calendar dates of occurred_at.
    assert_eq!(
        sql_i64(
            &lake,
            "SELECT count(*) FROM pos_events WHERE business_date <> CAST(occurred_at + INTERVAL '8 hours' AS DATE)"
        ),
        0
    );
}

#[test]
fn graceful_stop_commits_and_metrics_are_served() {
    let (_guard, dir) = workdir();
    generate(
        &dir,
        &[
            "--merchants",
            "6",
            "--days",
            "10",
            "--seed",
            "2",
            "--malformed-rate",
            "0.01",
        ],
    );
    let topic = unique("stop");
    produce(&dir, &topic, 3);
    let lake = dir.join("lake");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut args = ingest_args(&topic, &unique("g"), &lake);
    // A long flush age: only the stop makes this worker commit.
    args.extend([
        "--max-age-ms".into(),
        "600000".into(),
        "--metrics-addr".into(),
        format!("127.0.0.1:{port}"),
    ]);
    let mut worker = Worker::start(&dir, &args, &[]);
    worker.wait_for("assigned", Duration::from_secs(60));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut metrics = String::new();
    while std::time::Instant::now() < deadline {
        metrics = http_get(port, "/metrics");
        if metrics.contains("streetflow_ingest_records_in_total")
            && metrics.contains("streetflow_ingest_consumer_lag_records")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        metrics.contains("streetflow_ingest_records_in_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("streetflow_ingest_consumer_lag_records{partition=\"0\"}"),
        "{metrics}"
    );
    assert_eq!(
        row_count(&lake, "pos_events"),
        0,
        "committed before the stop"
    );
    let status = worker.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status}");
    let total = row_count(&lake, "pos_events") + row_count(&lake, "dead_letters");
    // Every generated line ends with a newline (some are deliberately not UTF-8).
    let lines = std::fs::read(dir.join("events.jsonl"))
        .unwrap()
        .iter()
        .filter(|&&b| b == b'\n')
        .count() as i64;
    assert_eq!(total, lines);
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn tombstones_and_empty_messages_are_dead_letters_and_reach_the_dlq_topic() {
    use rdkafka::Message;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    let (_guard, dir) = workdir();
    let topic = unique("tomb");
    let dlq = format!("{topic}.dlq");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    streetflow_ingest::create_topic(broker(), &topic, 1, runtime.handle()).unwrap();
    streetflow_ingest::create_topic(broker(), &dlq, 1, runtime.handle()).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .create()
        .unwrap();
    let good = r#"{"event_id":"e1","operator_id":"jade-market","merchant_id":"m1","kind":"sale","amount_fen":990,"currency":"CNY","occurred_at":"2025-06-01T10:00:00+08:00","channel":"alipay"}"#;
    let card = r#"{"event_id":"e2","operator_id":"jade-market","merchant_id":"m1","kind":"sale","amount_fen":990,"currency":"CNY","occurred_at":"2025-06-01T10:00:00+08:00","channel":"alipay","payer_ref":"4111111111111111"}"#;
    producer
        .send(BaseRecord::<str, str>::to(&topic).key("m1").payload(good))
        .unwrap();
    producer
        .send(BaseRecord::<str, str>::to(&topic).key("m1"))
        .unwrap(); // tombstone
    producer
        .send(BaseRecord::<str, str>::to(&topic).key("m1").payload(""))
        .unwrap();
    producer
        .send(BaseRecord::<str, str>::to(&topic).key("m1").payload(card))
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();

    let lake = dir.join("lake");
    let mut args = vec!["--log-format".to_owned(), "json".to_owned()];
    args.extend(ingest_args(&topic, &unique("g"), &lake));
    args.extend(["--exit-at-end".into(), "--dlq-topic".into(), dlq.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = run(&dir, &args);
    // Structured logs: every line on stderr is one JSON object.
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.lines().count() >= 2, "{stderr}");
    for line in stderr.lines() {
        let log: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            log["level"].is_string() && log["fields"].is_object(),
            "{line}"
        );
    }

    assert_eq!(row_count(&lake, "pos_events"), 1);
    let letters = sql_table(
        &lake,
        "SELECT reason, payload_bytes, operator_id FROM dead_letters ORDER BY kafka_offset",
    );
    assert!(
        letters.contains("| empty_message   | 0             | unknown     |"),
        "{letters}"
    );
    assert!(letters.contains("raw_card_number"), "{letters}");
    // The card number is masked in the stored payload.
    assert_eq!(
        sql_i64(
            &lake,
            "SELECT count(*) FROM dead_letters WHERE strpos(CAST(payload AS VARCHAR), '4111111111111111') > 0"
        ),
        0
    );
    assert_eq!(
        sql_i64(
            &lake,
            "SELECT count(*) FROM dead_letters WHERE strpos(CAST(payload AS VARCHAR), '************1111') > 0"
        ),
        1
    );

    // The DLQ topic got the same three, with the reason in a header.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .set("group.id", unique("dlq"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    let mut reasons = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while reasons.len() < 3 && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(500)) {
            let headers = message.headers().unwrap();
            let reason = headers
                .iter()
                .find(|h| h.key == "streetflow.reason")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap();
            assert!(
                !String::from_utf8_lossy(message.payload().unwrap_or_default())
                    .contains("4111111111111111")
            );
            reasons.push(reason);
        }
    }
    reasons.sort();
    assert_eq!(
        reasons,
        ["empty_message", "empty_message", "raw_card_number"]
    );
}

/// Defect 9 of issue 20: the DLQ topic gets every dead letter the lake holds. A flush
/// publishes its dead letters and waits for the brokers' acknowledgement before it
/// commits; a DLQ the worker cannot write fails the run with nothing committed (it used
/// to log the error and commit, so the topic silently missed them).
#[test]
fn a_dlq_topic_that_refuses_dead_letters_fails_the_flush_and_a_rerun_delivers_them() {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    let (_guard, dir) = workdir();
    let topic = unique("dlqfail");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    streetflow_ingest::create_topic(broker(), &topic, 1, runtime.handle()).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .create()
        .unwrap();
    producer
        .send(
            BaseRecord::<str, str>::to(&topic)
                .key("m1")
                .payload("not json"),
        )
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    let config = dir.join("fast-dlq.toml");
    std::fs::write(
        &config,
        "[kafka.properties]\n\"message.timeout.ms\" = \"5000\"\n",
    )
    .unwrap();
    let lake = dir.join("lake");
    let group = unique("g");
    let worker = |dlq: &str| {
        let mut args = ingest_args(&topic, &group, &lake);
        args.extend(
            [
                "--exit-at-end",
                "--config",
                config.to_str().unwrap(),
                "--dlq-topic",
                dlq,
            ]
            .map(str::to_owned),
        );
        let mut command = streetflow();
        command.args(&args).current_dir(&dir);
        output_within(&mut command, Duration::from_secs(180))
    };
    // A name no broker accepts: every delivery fails.
    let refused = worker("no such topic!");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("DLQ topic"), "{stderr}");
    assert!(
        !lake.join("dead_letters").join("_delta_log").exists()
            || row_count(&lake, "dead_letters") == 0,
        "a dead letter the DLQ topic lacks was committed"
    );

    let dlq = format!("{topic}.dlq");
    streetflow_ingest::create_topic(broker(), &dlq, 1, runtime.handle()).unwrap();
    let delivered = worker(&dlq);
    assert!(
        delivered.status.success(),
        "{}",
        String::from_utf8_lossy(&delivered.stderr)
    );
    assert_eq!(row_count(&lake, "dead_letters"), 1);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .set("group.id", unique("dlq"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    let mut received = 0;
    let mut deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(500)) {
            received += 1;
            // A few seconds more, to see a second copy if one was published.
            deadline = deadline.min(std::time::Instant::now() + Duration::from_secs(5));
        }
    }
    assert_eq!(received, 1, "the dead letter reached the DLQ topic once");
}

#[test]
fn batch_workers_without_partitions_end_when_the_topic_is_in_the_lake() {
    let (_guard, dir) = workdir();
    let summary = generate(&dir, &["--merchants", "6", "--days", "20", "--seed", "9"]);
    let lines = summary["lines"].as_i64().unwrap();
    let topic = unique("spare");
    produce(&dir, &topic, 1);
    let lake = dir.join("lake");
    let mut args = ingest_args(&topic, &unique("g"), &lake);
    args.push("--exit-at-end".into());
    // Three members, one partition: two of them are given nothing. Each must still end
    // once the one that holds the partition has stored it, instead of waiting forever.
    let workers: Vec<Worker> = (0..3).map(|_| Worker::start(&dir, &args, &[])).collect();
    for worker in workers {
        assert!(worker.wait(Duration::from_secs(180)).success());
    }
    assert_eq!(row_count(&lake, "pos_events"), lines);
    assert_eq!(
        sql_i64(
            &lake,
            "SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM pos_events)"
        ),
        lines
    );
}

/// The lake records which topic its offsets belong to: a worker pointed at another
/// topic (a rename with `--topic`, a mirror) on the same pipeline stops with an error
/// that says what to do, instead of skipping every record at or below the stored
/// offsets as "replayed".
#[test]
fn offsets_of_one_topic_never_skip_the_records_of_another() {
    let (_guard, dir) = workdir();
    let summary = generate(&dir, &["--merchants", "4", "--days", "10", "--seed", "5"]);
    let lines = summary["lines"].as_i64().unwrap();
    let lake = dir.join("lake");
    let first = unique("first");
    produce(&dir, &first, 2);
    let mut args = ingest_args(&first, &unique("g"), &lake);
    args.extend(["--exit-at-end".into(), "--json".into()]);
    let report = run_json(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(report["accepted"].as_i64().unwrap(), lines);

    // The same records under another topic name: every offset is at or below what the
    // lake holds for the first topic.
    let renamed = unique("renamed");
    produce(&dir, &renamed, 2);
    let mut args = ingest_args(&renamed, &unique("g"), &lake);
    args.extend(["--exit-at-end".into(), "--json".into()]);
    let output = finish(streetflow().args(&args).current_dir(&dir));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the worker went on: {stderr}");
    assert!(
        stderr.contains("another topic") && stderr.contains("pipeline name"),
        "{stderr}"
    );
    assert_eq!(row_count(&lake, "pos_events"), lines);

    // With a pipeline name of its own, the renamed topic is read from its start.
    let own = dir.join("own.toml");
    std::fs::write(&own, "[pipeline]\nname = \"renamed\"\n").unwrap();
    let mut args = ingest_args(&renamed, &unique("g"), &lake);
    args.extend([
        "--config".into(),
        own.display().to_string(),
        "--exit-at-end".into(),
        "--json".into(),
    ]);
    let report = run_json(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(report["accepted"].as_i64().unwrap(), lines);
    assert_eq!(row_count(&lake, "pos_events"), 2 * lines);
}

/// A topic deleted and created again under the same name starts its offsets at 0: a
/// worker whose lake holds offsets far past the new end refuses to start there (which
/// would skip the new records as "replayed"), also now that a queried end far below the
/// stored offsets is first checked through a fetch (a broker whose ListOffsets answers
/// too low must not look recreated).
#[test]
fn a_topic_recreated_under_its_name_is_refused_not_skipped() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;

    let (_guard, dir) = workdir();
    // One partition of more than 10,000 records: past the slack for a batch.
    let summary = generate_busy_district(&dir, "83");
    let lines = summary["lines"].as_i64().unwrap();
    let topic = unique("recreated");
    produce(&dir, &topic, 1);
    let lake = dir.join("lake");
    let mut args = ingest_args(&topic, &unique("g"), &lake);
    args.extend(["--exit-at-end".into(), "--json".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(run_json(&dir, &args)["consumed"].as_i64().unwrap(), lines);

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .create()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for outcome in runtime
        .block_on(admin.delete_topics(&[&topic], &AdminOptions::new()))
        .unwrap()
    {
        outcome.unwrap();
    }
    // Fewer records than before, under the same name.
    generate(&dir, &["--merchants", "2", "--days", "5", "--seed", "84"]);
    produce(&dir, &topic, 1);

    let output = finish(streetflow().args(&args).current_dir(&dir));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the worker went on: {stderr}");
    assert!(
        stderr.contains("ends at offset") && stderr.contains("pipeline name"),
        "{stderr}"
    );
    assert_eq!(
        row_count(&lake, "pos_events") + row_count(&lake, "dead_letters"),
        lines
    );
}

/// Review of issue 20's end check: the fetch-path probe answers each partition on its
/// own (records follow, the end is reached, or it cannot tell) with one consumer, and
/// never reads an offset past a partition's end, or a broker that does not answer, as
/// "no record follows".
#[test]
fn the_end_probe_tells_records_from_ends_and_never_guesses() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use streetflow_ingest::end_probe::{ProbeAnswer, probe_ends};

    let topic = unique("probe");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .create()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for outcome in runtime
        .block_on(admin.create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        ))
        .unwrap()
    {
        outcome.unwrap();
    }
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .create()
        .unwrap();
    for (partition, records) in [(0, 5), (2, 3)] {
        for i in 0..records {
            producer
                .send(
                    BaseRecord::<str, str>::to(&topic)
                        .partition(partition)
                        .payload(&format!("{{\"n\":{i}}}")),
                )
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", broker())
        .set("group.id", unique("probe-group"));
    let answers = probe_ends(
        &base,
        &topic,
        &[(0, 2), (1, 0), (2, 3)],
        Duration::from_secs(20),
    );
    assert_eq!(
        answers,
        BTreeMap::from([
            (0, ProbeAnswer::RecordsFollow),
            (1, ProbeAnswer::EndReached),
            (2, ProbeAnswer::EndReached),
        ])
    );
    // The lake ahead of the partition (a recreated topic): the partition is shorter.
    let past_end = probe_ends(&base, &topic, &[(0, 50), (2, 4)], Duration::from_secs(10));
    assert_eq!(
        past_end,
        BTreeMap::from([
            (0, ProbeAnswer::PastEnd { end: 5 }),
            (2, ProbeAnswer::PastEnd { end: 3 }),
        ])
    );
    // A broker that does not answer: not "stored" either, and within the time.
    let mut nowhere = base.clone();
    nowhere.set("bootstrap.servers", "127.0.0.1:9");
    let started = std::time::Instant::now();
    let silent = probe_ends(&nowhere, &topic, &[(0, 0), (1, 0)], Duration::from_secs(2));
    assert!(
        silent
            .values()
            .all(|a| matches!(a, ProbeAnswer::Unknown(_)))
            && silent.len() == 2,
        "{silent:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
