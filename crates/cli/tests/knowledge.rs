//! Knowledge time belongs to the lake: no producer's, gateway's or broker's clock decides
//! what a point-in-time feature may see (ARCHITECTURE §3), against a real broker.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use common::*;
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// A short settle time: the test's worker, lake and reader share one machine.
const SETTLE_MS: &str = "1000";

fn env() -> Vec<(&'static str, String)> {
    vec![("STREETFLOW__KNOWLEDGE__SETTLE_MS", SETTLE_MS.to_owned())]
}

fn ingest(dir: &Path, topic: &str, lake: &Path) {
    let mut args = ingest_args(topic, &unique("g"), lake);
    args.push("--exit-at-end".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_with_env(dir, &args, &env());
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Every feature of every merchant as of (`date`, `k`), through the batch job, after
/// bringing bitemporal silver up to the settled present.
fn features(dir: &Path, lake: &Path, date: &str, k: DateTime<Utc>) -> String {
    let lake_arg = lake.display().to_string();
    run_with_env(dir, &["aggregate", "--lake", &lake_arg], &env());
    let k = rfc3339(k);
    run_with_env(
        dir,
        &[
            "features",
            "--lake",
            &lake_arg,
            "--as-of",
            date,
            "--knowledge-time",
            &k,
        ],
        &env(),
    );
    // The bronze version read differs between runs by design; everything else must not.
    sql_table(
        lake,
        &format!(
            "SELECT * EXCLUDE (bronze_version) FROM merchant_features \
             WHERE as_of_date = DATE '{date}' ORDER BY operator_id, merchant_id"
        ),
    )
}

/// Creates `topic` with two partitions.
fn create_topic(topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .create()
        .unwrap();
    let created = runtime()
        .block_on(admin.create_topics(
            &[NewTopic::new(topic, 2, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        ))
        .unwrap();
    for result in created {
        result.unwrap();
    }
}

/// Publishes `lines` (JSON events) with the given producer timestamp (CreateTime).
fn publish(topic: &str, lines: &[String], create_time: DateTime<Utc>) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .create()
        .unwrap();
    for line in lines {
        let key = serde_json::from_str::<serde_json::Value>(line).unwrap()["merchant_id"]
            .as_str()
            .unwrap()
            .to_owned();
        producer
            .send(
                BaseRecord::to(topic)
                    .key(&key)
                    .payload(line)
                    .timestamp(create_time.timestamp_millis()),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// A worker that was down across the cutoff and catches up later commits records whose
/// producer timestamps lie before K; the lake knows them only from that commit, so every
/// vector (and training row) for K is the same before and after.
#[test]
fn a_worker_held_down_across_the_cutoff_changes_no_vector_for_an_earlier_knowledge_time() {
    let (_guard, dir) = workdir();
    let start = (Utc::now().date_naive() - chrono::Days::new(50)).to_string();
    generate(
        &dir,
        &[
            "--merchants",
            "6",
            "--days",
            "45",
            "--start",
            &start,
            "--seed",
            "11",
        ],
    );
    let text = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let (first, held) = lines.split_at(lines.len() * 3 / 4);
    let topic = unique("knowledge");
    create_topic(&topic);
    let lake = dir.join("lake");
    let today = Utc::now().date_naive().to_string();

    // The first three quarters arrive and are ingested in time.
    let before = Utc::now() - chrono::Duration::minutes(5);
    publish(&topic, first, before);
    ingest(&dir, &topic, &lake);
    let k = Utc::now();
    std::thread::sleep(Duration::from_millis(1500));
    let at_k = features(&dir, &lake, &today, k);
    assert!(at_k.lines().count() > 4, "{at_k}");

    // The rest was produced before K (its records say so), but its worker was down and
    // commits it only now.
    publish(&topic, held, before);
    ingest(&dir, &topic, &lake);
    std::thread::sleep(Duration::from_millis(1500));
    let late = sql_i64(
        &lake,
        &format!(
            "SELECT count(*) FROM pos_events WHERE kafka_timestamp < TIMESTAMP '{}' \
             AND knowledge_time > TIMESTAMP '{}' AND knowledge_source = 'observed'",
            rfc3339(k),
            rfc3339(k)
        ),
    );
    assert!(
        late > 0,
        "the held records carry their backdated producer time"
    );
    assert_eq!(
        features(&dir, &lake, &today, k),
        at_k,
        "a vector for K changed after K"
    );
    // Asked as of now, the same features do see the late records.
    assert_ne!(
        features(
            &dir,
            &lake,
            &today,
            Utc::now() - chrono::Duration::seconds(2)
        ),
        at_k
    );
}

/// A POS gateway whose clock is 11 minutes slow stamps its records 11 minutes in the
/// past: the events are neither dead-lettered (`future_timestamp` is judged against the
/// worker's clock) nor known earlier than the lake's commit. An event that really lies in
/// the future is still refused.
#[test]
fn a_slow_or_backdated_producer_clock_decides_no_knowledge_time() {
    let (_guard, dir) = workdir();
    let topic = unique("slowclock");
    create_topic(&topic);
    let lake = dir.join("lake");
    let now = Utc::now();
    let event = |id: &str, occurred: DateTime<Utc>| {
        serde_json::json!({
            "event_id": id, "operator_id": "lane", "merchant_id": "cafe", "kind": "sale",
            "amount_fen": 1200, "currency": "CNY", "channel": "wechat",
            "occurred_at": occurred.with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap()).to_rfc3339(),
        })
        .to_string()
    };
    let slow_gateway = now - chrono::Duration::minutes(11);
    publish(
        &topic,
        &[
            event("on-time", now - chrono::Duration::seconds(30)),
            event("future", now + chrono::Duration::minutes(11)),
        ],
        slow_gateway,
    );
    let started = Utc::now();
    ingest(&dir, &topic, &lake);
    let rows = sql_table(
        &lake,
        "SELECT event_id, kafka_timestamp, kafka_timestamp_type, knowledge_source FROM pos_events",
    );
    assert!(rows.contains("on-time"), "{rows}");
    assert!(
        rows.contains("create_time") && rows.contains("observed"),
        "{rows}"
    );
    assert_eq!(
        sql_i64(
            &lake,
            &format!(
                "SELECT count(*) FROM pos_events WHERE knowledge_time >= TIMESTAMP '{}' \
                 AND kafka_timestamp = TIMESTAMP '{}'",
                rfc3339(started),
                rfc3339(slow_gateway.with_nanosecond_truncated_to_millis())
            )
        ),
        1,
        "knowledge is the commit's, the producer's time is kept beside it: {rows}"
    );
    let dead = sql_table(
        &lake,
        "SELECT reason, kafka_timestamp_type FROM dead_letters",
    );
    assert!(dead.contains("future_timestamp"), "{dead}");
    assert_eq!(row_count(&lake, "dead_letters"), 1, "{dead}");
}

/// Millisecond precision, as Kafka keeps timestamps.
trait Millis {
    fn with_nanosecond_truncated_to_millis(self) -> Self;
}

impl Millis for DateTime<Utc> {
    fn with_nanosecond_truncated_to_millis(self) -> Self {
        DateTime::from_timestamp_millis(self.timestamp_millis()).unwrap()
    }
}
