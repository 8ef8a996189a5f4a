//! Publishing a JSON Lines file to Kafka with simulated arrival times.
//!
//! Each line becomes one record, keyed by its `merchant_id` (so a merchant's events stay
//! in order on one partition). The record timestamp is a *stream clock*: the latest
//! `occurred_at` seen so far in the file. `streetflow gen` writes events in arrival order,
//! so an event the generator made late carries the clock of the day it arrived, and the
//! bronze `ingested_at` (the record timestamp) says when the lake could first know it.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use std::collections::HashMap;

use serde::Deserialize;

use crate::clients::{ClientRole, client_config};
use crate::error::{Error, Result};

/// How to publish.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Bootstrap servers.
    pub brokers: String,
    /// Target topic.
    pub topic: String,
    /// Extra librdkafka producer properties.
    pub properties: Vec<(String, String)>,
    /// Records handed to the producer so far, for a progress display.
    pub progress: Option<Arc<AtomicU64>>,
    /// Keep at most this many records ahead of a consumer's count (see [`Throttle`]).
    pub throttle: Option<Throttle>,
    /// Partition of each key, instead of librdkafka's hash of the key (keys not listed
    /// are hashed). A merchant still always lands on one partition; an even spread keeps
    /// any partition from holding much more than its share (see [`Throttle`]).
    pub key_partitions: Option<Arc<HashMap<String, i32>>>,
}

/// Back-pressure from consumers: the producer waits while it is more than `max_ahead`
/// records ahead of `done`. For brokers that keep little (the embedded mock broker holds
/// about 5 MB per partition and drops older records).
#[derive(Debug, Clone)]
pub struct Throttle {
    /// Records the consumers have finished with.
    pub done: Arc<AtomicU64>,
    /// How far ahead of them the producer may run.
    pub max_ahead: u64,
    /// With [`ProduceOptions::key_partitions`]: the workers' per-partition progress and
    /// how many records one partition may hold beyond it (a partition nobody consumes
    /// yet, e.g. during a rebalance, would otherwise fill while the others drain).
    pub per_partition: Option<(Arc<PartitionWatermarks>, i64)>,
    /// Set when the consumers stopped (ended, failed or stalled): a producer waiting on
    /// them would wait forever, so it stops with [`Error::Stopped`] instead.
    pub stop: Option<Arc<AtomicBool>>,
}

impl Throttle {
    /// [`Error::Stopped`] once the consumers have stopped; `doing` says what the
    /// producer was doing then.
    fn ensure_consumers_run(&self, doing: &str) -> Result<()> {
        if self
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
        {
            return Err(Error::Stopped(format!(
                "the consumers stopped while the producer {doing}"
            )));
        }
        Ok(())
    }

    /// Sleeps a moment while the producer is too far ahead (see
    /// [`Throttle::ensure_consumers_run`]).
    fn pause(&self, waiting_for: &str) -> Result<()> {
        self.ensure_consumers_run(&format!("waited for {waiting_for}"))?;
        std::thread::sleep(Duration::from_millis(2));
        Ok(())
    }
}

/// The next offset not yet committed to the lake, per partition of a topic: advanced by
/// the workers after each lake commit, read by a producer that must not outrun them on
/// any one partition.
#[derive(Debug)]
pub struct PartitionWatermarks {
    next: Vec<AtomicI64>,
}

impl PartitionWatermarks {
    /// Watermarks at 0 for `partitions` partitions.
    pub fn new(partitions: usize) -> Self {
        Self {
            next: (0..partitions).map(|_| AtomicI64::new(0)).collect(),
        }
    }

    /// Records that everything before `next` is committed (never moves back).
    pub fn advance(&self, partition: i32, next: i64) {
        if let Some(slot) = usize::try_from(partition)
            .ok()
            .and_then(|p| self.next.get(p))
        {
            slot.fetch_max(next, Ordering::Relaxed);
        }
    }

    /// The next uncommitted offset of a partition (0 if unknown).
    pub fn get(&self, partition: i32) -> i64 {
        usize::try_from(partition)
            .ok()
            .and_then(|p| self.next.get(p))
            .map_or(0, |slot| slot.load(Ordering::Relaxed))
    }
}

/// What was published.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProduceReport {
    /// Records acknowledged by the broker.
    pub delivered: u64,
    /// Records the broker refused after retries.
    pub failed: u64,
    /// Payload bytes sent.
    pub bytes: u64,
    /// Lines without a readable `merchant_id` (sent without a key).
    pub unkeyed: u64,
}

#[derive(Default)]
struct DeliveryCounts {
    delivered: AtomicU64,
    failed: AtomicU64,
}

struct CountingContext(Arc<DeliveryCounts>);

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        match result {
            Ok(_) => self.0.delivered.fetch_add(1, Ordering::Relaxed),
            Err((error, _)) => {
                tracing::warn!(%error, "record not delivered");
                self.0.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Creates `topic` with `partitions` partitions unless it exists.
pub fn create_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    handle: &tokio::runtime::Handle,
) -> Result<()> {
    create_topic_with(brokers, &[], topic, partitions, handle)
}

/// [`create_topic`] with librdkafka properties (TLS, SASL).
pub fn create_topic_with(
    brokers: &str,
    properties: &[(String, String)],
    topic: &str,
    partitions: i32,
    handle: &tokio::runtime::Handle,
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(
        brokers,
        properties.iter().map(|(k, v)| (k, v)),
        ClientRole::Admin,
    )
    .create()
    .map_err(Error::kafka("create admin client"))?;
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = handle
        .block_on(admin.create_topics(
            [&new_topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        ))
        // librdkafka reports a refused SASL login or TLS handshake only as a timeout here.
        .map_err(Error::kafka(format!(
            "create topic {topic} at {brokers} (a timeout means no broker answered: check \
             the address and the security settings, since a refused login looks the same)"
        )))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(Error::Kafka {
                    context: format!("create topic {name}"),
                    source: KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    merchant_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    occurred_at: Option<Cow<'a, str>>,
}

/// The stream clock: the latest `occurred_at` seen so far, as the arrival time a stream
/// would have given. It never goes back and ignores times in the future of the
/// machine's clock (a POS clock that is years fast). A time more than 30 days from the
/// clock (and the very first time) counts only once two more lines near it confirm it:
/// a line or two with a broken clock move nothing, while an old first line or a month
/// without data never pins the clock (which would make later lines known before they
/// happened).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct StreamClock {
    now_ms: Option<i64>,
    /// A far time seen, waiting for confirmation: the latest such time, and how many
    /// lines near it have been seen.
    jump: Option<(i64, u32)>,
}

impl StreamClock {
    const MAX_JUMP_MS: i64 = 30 * 86_400_000;
    /// Lines near a far time (the first included) that make the clock follow it.
    const CONFIRMATIONS: u32 = 3;

    pub(crate) fn observe(&mut self, occurred_ms: i64) {
        if occurred_ms > Utc::now().timestamp_millis() + 86_400_000 {
            return;
        }
        match self.now_ms {
            Some(now) if occurred_ms <= now => {}
            Some(now) if occurred_ms - now <= Self::MAX_JUMP_MS => {
                self.now_ms = Some(occurred_ms);
                self.jump = None;
            }
            // The first time, or one far from the clock.
            _ => {
                let jump = match self.jump {
                    Some((at, seen)) if (occurred_ms - at).abs() <= Self::MAX_JUMP_MS => {
                        (at.max(occurred_ms), seen + 1)
                    }
                    _ => (occurred_ms, 1),
                };
                if jump.1 >= Self::CONFIRMATIONS {
                    self.now_ms = Some(jump.0);
                    self.jump = None;
                } else {
                    self.jump = Some(jump);
                }
            }
        }
    }

    /// The clock (the wall clock until a line set it).
    #[cfg(test)]
    pub(crate) fn now_ms(&self) -> i64 {
        self.now_ms.unwrap_or_else(|| Utc::now().timestamp_millis())
    }

    /// When a stream would have delivered a line that occurred at `occurred_ms` (after
    /// [`StreamClock::observe`]): the clock, but never before the line itself happened
    /// (before the clock is confirmed, the line's own time).
    pub(crate) fn arrival_ms(&self, occurred_ms: Option<i64>) -> i64 {
        let occurred =
            occurred_ms.filter(|&occurred| occurred <= Utc::now().timestamp_millis() + 86_400_000);
        match (self.now_ms, occurred) {
            (Some(now), Some(occurred)) => now.max(occurred),
            (Some(now), None) => now,
            (None, Some(occurred)) => occurred,
            (None, None) => Utc::now().timestamp_millis(),
        }
    }
}

/// Publishes every line of `path` (`\n`-separated, trailing `\r` dropped) as one record.
pub fn produce_file(path: &Path, options: &ProduceOptions) -> Result<ProduceReport> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let counts = Arc::new(DeliveryCounts::default());
    let producer: ThreadedProducer<CountingContext> = client_config(
        &options.brokers,
        options.properties.iter().map(|(k, v)| (k, v)),
        ClientRole::Producer,
    )
    .create_with_context(CountingContext(counts.clone()))
    .map_err(Error::kafka("create producer"))?;

    let mut reader = BufReader::with_capacity(1 << 20, File::open(path).map_err(io)?);
    let mut line = Vec::with_capacity(1024);
    let mut clock = StreamClock::default();
    let mut report = ProduceReport::default();
    let mut sent = 0_u64;
    // Records handed to each explicitly chosen partition (for the per-partition throttle).
    let mut sent_to: Vec<i64> = Vec::new();
    loop {
        if let Some(throttle) = &options.throttle {
            throttle.ensure_consumers_run("published the input")?;
        }
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(io)? == 0 {
            break;
        }
        let mut payload = line.as_slice();
        payload = payload.strip_suffix(b"\n").unwrap_or(payload);
        payload = payload.strip_suffix(b"\r").unwrap_or(payload);
        let probe: Option<Probe<'_>> = serde_json::from_slice(payload).ok();
        let key = probe.as_ref().and_then(|p| p.merchant_id.as_deref());
        let occurred = probe
            .as_ref()
            .and_then(|p| p.occurred_at.as_deref())
            .and_then(streetflow_core::time::parse_rfc3339)
            .map(|at| at.timestamp_millis());
        if let Some(occurred) = occurred {
            clock.observe(occurred);
        }
        if key.is_none() {
            report.unkeyed += 1;
        }
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&options.topic)
            .payload(payload)
            .timestamp(clock.arrival_ms(occurred));
        let mut chosen_partition = None;
        if let Some(key) = key {
            record = record.key(key);
            if let Some(partition) = options.key_partitions.as_ref().and_then(|m| m.get(key)) {
                record = record.partition(*partition);
                chosen_partition = Some(*partition);
            }
        }
        if let (Some(partition), Some(throttle)) = (chosen_partition, &options.throttle)
            && let Some((marks, max_ahead)) = &throttle.per_partition
        {
            let index = usize::try_from(partition).unwrap_or_default();
            if sent_to.len() <= index {
                sent_to.resize(index + 1, 0);
            }
            while sent_to[index] - marks.get(partition) >= *max_ahead {
                throttle.pause(&format!("partition {partition} to be committed"))?;
            }
            sent_to[index] += 1;
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((error, _)) => {
                    return Err(Error::kafka(format!("send to {}", options.topic))(error));
                }
            }
        }
        report.bytes += payload.len() as u64;
        sent += 1;
        if sent.is_multiple_of(4096)
            && let Some(progress) = &options.progress
        {
            progress.store(sent, Ordering::Relaxed);
        }
        if let Some(throttle) = &options.throttle {
            while sent.saturating_sub(throttle.done.load(Ordering::Relaxed)) > throttle.max_ahead {
                throttle.pause("its records to be committed")?;
            }
        }
    }
    if let Some(progress) = &options.progress {
        progress.store(sent, Ordering::Relaxed);
    }
    producer
        .flush(Duration::from_secs(120))
        .map_err(Error::kafka("flush producer"))?;
    report.delivered = counts.delivered.load(Ordering::Relaxed);
    report.failed = counts.failed.load(Ordering::Relaxed);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_only_moves_forward_and_ignores_broken_clocks() {
        let mut clock = StreamClock::default();
        for _ in 0..3 {
            clock.observe(1_000_000);
        }
        clock.observe(999_000); // a late event: the clock stays
        assert_eq!(clock.now_ms(), 1_000_000);
        clock.observe(1_000_000 + 2 * 86_400_000); // after a two-day outage
        assert_eq!(clock.now_ms(), 1_000_000 + 2 * 86_400_000);
        clock.observe(1_000_000 + 100 * 365 * 86_400_000); // a POS clock a century fast
        assert_eq!(clock.now_ms(), 1_000_000 + 2 * 86_400_000);
    }

    const DAY: i64 = 86_400_000;

    #[test]
    fn an_old_first_line_or_a_month_without_data_never_pins_the_clock() {
        let base = 1_740_000_000_000; // 2025-02-19
        // An old first line: the next lines, a second apart, confirm the later time.
        let mut clock = StreamClock::default();
        clock.observe(base - 5 * 365 * DAY);
        assert_eq!(
            clock.arrival_ms(Some(base - 5 * 365 * DAY)),
            base - 5 * 365 * DAY
        );
        for i in 0..3 {
            clock.observe(base + i * 1_000);
            assert_eq!(clock.arrival_ms(Some(base + i * 1_000)), base + i * 1_000);
        }
        assert_eq!(clock.now_ms(), base + 2_000);
        // Forty days without data, then the feed again.
        for i in 0..3 {
            clock.observe(base + 40 * DAY + i * 60_000);
        }
        assert_eq!(clock.now_ms(), base + 40 * DAY + 120_000);
        // A late line arrives at the clock.
        clock.observe(base + 39 * DAY);
        assert_eq!(
            clock.arrival_ms(Some(base + 39 * DAY)),
            base + 40 * DAY + 120_000
        );
    }

    #[test]
    fn a_line_or_two_with_a_broken_clock_move_nothing_even_first() {
        let base = 1_740_000_000_000;
        // First in the file, a year fast (still in the past): the lines after it set the
        // clock.
        let mut clock = StreamClock::default();
        clock.observe(base + 365 * DAY);
        for i in 0..3 {
            clock.observe(base + i * 60_000);
        }
        assert_eq!(clock.now_ms(), base + 120_000);
        // Two adjacent lines 200 days ahead: the clock stays.
        clock.observe(base + 200 * DAY);
        clock.observe(base + 200 * DAY + 1_000);
        clock.observe(base + 180_000);
        assert_eq!(clock.now_ms(), base + 180_000);
        assert_eq!(clock.arrival_ms(Some(base + 30_000)), base + 180_000);
        // Their own arrival is never before they happened.
        assert_eq!(clock.arrival_ms(Some(base + 200 * DAY)), base + 200 * DAY);
    }

    #[test]
    fn a_producer_waiting_on_consumers_that_stopped_ends_and_says_why() {
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("embedded broker");
        let path = std::env::temp_dir().join(format!(
            "streetflow-throttle-{}-{}.jsonl",
            std::process::id(),
            Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ));
        std::fs::write(&path, "{\"merchant_id\":\"m1\"}\n".repeat(3)).expect("input");
        let stop = Arc::new(AtomicBool::new(false));
        let options = ProduceOptions {
            brokers: cluster.bootstrap_servers(),
            topic: "throttled".to_owned(),
            properties: Vec::new(),
            progress: None,
            // Nothing is ever committed: the producer waits after its first record.
            throttle: Some(Throttle {
                done: Arc::new(AtomicU64::new(0)),
                max_ahead: 0,
                per_partition: None,
                stop: Some(stop.clone()),
            }),
            key_partitions: None,
        };
        let stopper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                stop.store(true, Ordering::Relaxed);
            })
        };
        let outcome = produce_file(&path, &options);
        stopper.join().expect("stopper");
        let _ = std::fs::remove_file(&path);
        match outcome {
            Err(Error::Stopped(why)) => assert!(why.contains("consumers stopped"), "{why}"),
            other => panic!("expected the producer to stop, got {other:?}"),
        }
    }
}
