//! Whether a partition holds records from an offset on, asked through the fetch path.
//!
//! ListOffsets is not always right (Tansu 0.6 on S3 answers "latest" far below the end);
//! a fetch is what consumers live by. A short-lived consumer outside the group is
//! positioned at the offset and reports what the broker's fetch responses show: a
//! record, an end past the offset, the end of the partition there, or an offset out of
//! range.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// The end (last stable offset) the probe's fetch responses carried.
struct ProbeContext {
    topic: String,
    partition: i32,
    end: Mutex<Option<i64>>,
}

impl ClientContext for ProbeContext {
    fn stats(&self, statistics: Statistics) {
        let end = statistics
            .topics
            .get(&self.topic)
            .and_then(|t| t.partitions.get(&self.partition))
            .map(|p| p.ls_offset)
            .filter(|&end| end >= 0);
        if let Some(end) = end {
            let mut seen = self.end.lock().unwrap_or_else(PoisonError::into_inner);
            *seen = Some(seen.map_or(end, |s| s.max(end)));
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// `Some(true)` when partition `partition` of `topic` holds a record at or after
/// `offset` (one was delivered, or a fetch response put the end past it); `Some(false)`
/// when its end is at `offset` or the offset is out of range; `None` when the broker
/// did not say within `timeout`. `base` is the worker's consumer configuration (brokers,
/// security); the probe joins no group and commits nothing.
pub(crate) fn holds_records_from(
    base: &ClientConfig,
    topic: &str,
    partition: i32,
    offset: i64,
    timeout: Duration,
) -> Option<bool> {
    let mut config = base.clone();
    config
        // Never the worker's group: the probe only assigns, and must not touch it.
        .set("group.id", "streetflow-end-probe")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error")
        .set("statistics.interval.ms", "100")
        .set("enable.auto.commit", "false");
    let context = ProbeContext {
        topic: topic.to_owned(),
        partition,
        end: Mutex::new(None),
    };
    let consumer: BaseConsumer<ProbeContext> = match config.create_with_context(context) {
        Ok(consumer) => consumer,
        Err(error) => {
            tracing::warn!(%error, "cannot create a consumer to probe the partition's end");
            return None;
        }
    };
    let mut tpl = TopicPartitionList::new();
    if tpl
        .add_partition_offset(topic, partition, Offset::Offset(offset))
        .and_then(|()| consumer.assign(&tpl))
        .is_err()
    {
        return None;
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => return Some(true),
            Some(Err(KafkaError::PartitionEOF(_))) => return Some(false),
            // With `auto.offset.reset=error`, an offset past the end is reported, not
            // silently moved.
            Some(Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange,
            ))) => return Some(false),
            Some(Err(error)) => {
                tracing::debug!(%error, partition, offset, "probing the partition's end");
            }
            None => {}
        }
        let end = *consumer
            .context()
            .end
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if end.is_some_and(|end| end > offset) {
            return Some(true);
        }
    }
    None
}
