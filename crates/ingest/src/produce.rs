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
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use std::collections::HashMap;

use serde::Deserialize;

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
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in properties {
        config.set(key, value);
    }
    let admin: AdminClient<DefaultClientContext> = config
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

/// The stream clock: never goes back, ignores timestamps absurdly far ahead (a broken
/// POS clock must not drag every later record into the future).
#[derive(Debug, Default)]
pub(crate) struct StreamClock {
    now_ms: Option<i64>,
}

impl StreamClock {
    const MAX_JUMP_MS: i64 = 30 * 86_400_000;

    pub(crate) fn observe(&mut self, occurred_ms: i64) {
        let wall = Utc::now().timestamp_millis();
        self.now_ms = match self.now_ms {
            None if occurred_ms <= wall + 86_400_000 => Some(occurred_ms),
            Some(now) if occurred_ms > now && occurred_ms - now <= Self::MAX_JUMP_MS => {
                Some(occurred_ms)
            }
            other => other,
        };
    }

    pub(crate) fn now_ms(&self) -> i64 {
        self.now_ms.unwrap_or_else(|| Utc::now().timestamp_millis())
    }
}

/// Publishes every line of `path` (`\n`-separated, trailing `\r` dropped) as one record.
pub fn produce_file(path: &Path, options: &ProduceOptions) -> Result<ProduceReport> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let counts = Arc::new(DeliveryCounts::default());
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .set("enable.idempotence", "false");
    for (key, value) in &options.properties {
        config.set(key, value);
    }
    let producer: ThreadedProducer<CountingContext> = config
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
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(io)? == 0 {
            break;
        }
        let mut payload = line.as_slice();
        payload = payload.strip_suffix(b"\n").unwrap_or(payload);
        payload = payload.strip_suffix(b"\r").unwrap_or(payload);
        let probe: Option<Probe<'_>> = serde_json::from_slice(payload).ok();
        let key = probe.as_ref().and_then(|p| p.merchant_id.as_deref());
        if let Some(occurred) = probe
            .as_ref()
            .and_then(|p| p.occurred_at.as_deref())
            .and_then(streetflow_core::time::parse_rfc3339)
        {
            clock.observe(occurred.timestamp_millis());
        }
        if key.is_none() {
            report.unkeyed += 1;
        }
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&options.topic)
            .payload(payload)
            .timestamp(clock.now_ms());
        let mut chosen_partition = None;
        if let Some(key) = key {
            record = record.key(key);
            if let Some(partition) = options.key_partitions.as_ref().and_then(|m| m.get(key)) {
                record = record.partition(*partition);
                chosen_partition = Some(*partition);
            }
        }
        if let (
            Some(partition),
            Some(Throttle {
                per_partition: Some((marks, max_ahead)),
                ..
            }),
        ) = (chosen_partition, &options.throttle)
        {
            let index = usize::try_from(partition).unwrap_or_default();
            if sent_to.len() <= index {
                sent_to.resize(index + 1, 0);
            }
            while sent_to[index] - marks.get(partition) >= *max_ahead {
                std::thread::sleep(Duration::from_millis(2));
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
                std::thread::sleep(Duration::from_millis(2));
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
        clock.observe(1_000_000);
        clock.observe(999_000); // a late event: the clock stays
        assert_eq!(clock.now_ms(), 1_000_000);
        clock.observe(1_000_000 + 2 * 86_400_000); // after a two-day outage
        assert_eq!(clock.now_ms(), 1_000_000 + 2 * 86_400_000);
        clock.observe(1_000_000 + 100 * 365 * 86_400_000); // a POS clock a century fast
        assert_eq!(clock.now_ms(), 1_000_000 + 2 * 86_400_000);
    }
}
