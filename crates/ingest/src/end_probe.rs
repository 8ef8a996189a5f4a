//! Whether partitions hold records from given offsets on, asked through the fetch path.
//!
//! ListOffsets is not always right (Tansu 0.6 on S3 answers "latest" far below the end),
//! and it counts offsets that hold no record (transaction markers, aborted records). A
//! fetch is what consumers live by: one short-lived consumer outside the worker's group
//! is positioned at each offset and reports what the fetches show. A delivered record
//! proves that records follow; an end of partition at the offset proves that none do.
//!
//! Tansu 0.6 answers some fetches with neither: one that starts inside the last record
//! batch, or past the partition's end, gets no records and no error. There the ends its
//! fetch responses carry decide: an end past the offset that stays without an end of
//! partition for [`END_GRACE`] means records follow (a transaction marker would have
//! been skipped to the end within that time), and a high watermark below the offset
//! means the partition is shorter. Anything else is [`ProbeAnswer::Unknown`], and
//! callers must not read it as either.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// What a probe learned about one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// A record at or after the offset was delivered (or the offset lies below the
    /// partition's start, so every record it holds follows it).
    RecordsFollow,
    /// The partition ends at the offset: no record follows.
    EndReached,
    /// The offset lies past the partition's end (the broker said it is out of range,
    /// and its watermarks agree): the partition is shorter than whoever asks believes.
    PastEnd {
        /// The partition's end (high watermark).
        end: i64,
    },
    /// The broker did not say within the time; why, in words.
    Unknown(String),
}

/// How long an end past the offset, from the fetch responses, must stand without an end
/// of partition before it counts as records that follow.
pub const END_GRACE: Duration = Duration::from_secs(1);

/// The ends one partition's fetch responses carried (the highest seen).
#[derive(Debug, Clone, Copy)]
struct FetchedEnds {
    /// Last stable offset: where a `read_committed` reader's records end.
    last_stable: i64,
    /// High watermark.
    high: i64,
}

/// The probe's client context: collects the ends the fetch responses carry, and keeps
/// quiet about the ends of partitions and offset resets the probe provokes on purpose
/// (rdkafka's default logs each one as an error).
struct ProbeContext {
    topic: String,
    ends: Mutex<BTreeMap<i32, FetchedEnds>>,
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka (end probe)");
    }

    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner);
        for (&partition, p) in &topic.partitions {
            // -1 until a fetch response said.
            if partition < 0 || p.hi_offset < 0 {
                continue;
            }
            let seen = ends.entry(partition).or_insert(FetchedEnds {
                last_stable: p.ls_offset,
                high: p.hi_offset,
            });
            seen.last_stable = seen.last_stable.max(p.ls_offset);
            seen.high = seen.high.max(p.hi_offset);
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// Probes each `(partition, offset)` of `topic` at once; every partition gets an answer
/// within about `timeout`. `base` is the worker's consumer configuration (brokers,
/// security, isolation level); the probe uses a group name of its own derived from the
/// worker's (it only assigns, so it never joins or touches the worker's group) and
/// commits nothing.
pub fn probe_ends(
    base: &ClientConfig,
    topic: &str,
    partitions: &[(i32, i64)],
    timeout: Duration,
) -> BTreeMap<i32, ProbeAnswer> {
    let mut answers = BTreeMap::new();
    if partitions.is_empty() {
        return answers;
    }
    let unknown_all = |why: &str| -> BTreeMap<i32, ProbeAnswer> {
        partitions
            .iter()
            .map(|&(p, _)| (p, ProbeAnswer::Unknown(why.to_owned())))
            .collect()
    };
    let group = format!("{}-end-probe", base.get("group.id").unwrap_or("streetflow"));
    let mut config = base.clone();
    config
        .set("group.id", &group)
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Answer as soon as one byte is there: the worker's large fetches would hold
        // the probe's fetch for their whole wait.
        .set("fetch.min.bytes", "1")
        .set("fetch.wait.max.ms", "100")
        .set("statistics.interval.ms", "100");
    let context = ProbeContext {
        topic: topic.to_owned(),
        ends: Mutex::new(BTreeMap::new()),
    };
    let consumer: BaseConsumer<ProbeContext> = match config.create_with_context(context) {
        Ok(consumer) => consumer,
        Err(error) => return unknown_all(&format!("cannot create the probe consumer: {error}")),
    };
    let from: BTreeMap<i32, i64> = partitions.iter().copied().collect();
    let mut tpl = TopicPartitionList::new();
    for (&partition, &offset) in &from {
        if let Err(error) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset)) {
            return unknown_all(&format!("cannot position the probe: {error}"));
        }
    }
    if let Err(error) = consumer.assign(&tpl) {
        return unknown_all(&format!("cannot assign the probe: {error}"));
    }
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    // Since when the fetched end has stood past the offset, by partition.
    let mut end_past_since: BTreeMap<i32, Instant> = BTreeMap::new();
    while answers.len() < from.len() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(message)) => {
                let partition = message.partition();
                if from.get(&partition).is_some_and(|&o| message.offset() >= o) {
                    answers
                        .entry(partition)
                        .or_insert(ProbeAnswer::RecordsFollow);
                    // Enough of this partition: fetch no more of it.
                    let _ = consumer.pause(&single(topic, partition));
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                answers.entry(partition).or_insert(ProbeAnswer::EndReached);
            }
            // An offset outside the partition (this error does not say which one): the
            // partitions still open are judged by their watermarks. Below the start,
            // every record follows; past the end, the lake holds offsets the broker does
            // not (never "stored").
            Some(Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange,
            ))) => {
                for (&partition, &offset) in &from {
                    if answers.contains_key(&partition) {
                        continue;
                    }
                    let Ok((low, high)) =
                        consumer.fetch_watermarks(topic, partition, Duration::from_secs(3))
                    else {
                        continue;
                    };
                    if offset < low && high > low {
                        answers.insert(partition, ProbeAnswer::RecordsFollow);
                    } else if offset > high {
                        answers.insert(partition, ProbeAnswer::PastEnd { end: high });
                    }
                }
            }
            Some(Err(error)) => last_error = Some(error.to_string()),
            None => {}
        }
        let ends = consumer
            .context()
            .ends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (&partition, &offset) in &from {
            if answers.contains_key(&partition) {
                continue;
            }
            let Some(fetched) = ends.get(&partition) else {
                continue;
            };
            if offset > fetched.high {
                answers.insert(partition, ProbeAnswer::PastEnd { end: fetched.high });
            } else if fetched.last_stable > offset {
                let since = *end_past_since.entry(partition).or_insert_with(Instant::now);
                if since.elapsed() >= END_GRACE {
                    answers.insert(partition, ProbeAnswer::RecordsFollow);
                }
            }
        }
    }
    for &partition in from.keys() {
        answers.entry(partition).or_insert_with(|| {
            ProbeAnswer::Unknown(match &last_error {
                Some(error) => format!("no answer within {timeout:?} (last error: {error})"),
                None => format!("no record and no end of partition within {timeout:?}"),
            })
        });
    }
    answers
}

fn single(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}
