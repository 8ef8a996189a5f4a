//! The broker's side of `streetflow doctor`: can the brokers be reached with the
//! pipeline's settings, does the topic exist with leaders, and how far behind the end of
//! each partition the lake's offsets stand.

use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use streetflow_core::PipelineConfig;
use streetflow_core::health::{Checks, Status};
use streetflow_core::money::thousands;
use streetflow_core::tables::POS_EVENTS;
use streetflow_lake::Lake;

use crate::clients::{ClientRole, client_config};
use crate::error::Result;

/// Keeps librdkafka's own connection errors off the terminal: the doctor reports what
/// failed in one line of its own.
struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, _level: RDKafkaLogLevel, _fac: &str, _log_message: &str) {}
    fn error(&self, _error: KafkaError, _reason: &str) {}
}

impl ConsumerContext for Quiet {}

/// What the broker says about the topic.
pub struct TopicEnds {
    consumer: BaseConsumer<Quiet>,
    topic: String,
    /// (partition, high watermark)
    ends: Vec<(i32, i64)>,
    timeout: Duration,
}

impl TopicEnds {
    /// The highest offset the broker returns when reading `partition` from `from`, or
    /// `None` when it returns nothing. Some brokers (Tansu 0.6) report the last record
    /// batch's base offset + 1 as the end, so the end alone cannot prove records are gone.
    fn highest_readable(&self, partition: i32, from: i64) -> Option<i64> {
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&self.topic, partition, Offset::Offset(from.max(0)))
            .ok()?;
        self.consumer.assign(&assignment).ok()?;
        let deadline = Instant::now() + self.timeout;
        let mut highest = None;
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => highest = highest.max(Some(message.offset())),
                Some(Err(_)) => break,
                None if highest.is_some() => break,
                None => {}
            }
        }
        let _ = self.consumer.unassign();
        highest
    }
}

/// Checks the brokers and the topic; returns the end offset of each partition.
pub fn check_broker(
    config: &PipelineConfig,
    timeout: Duration,
    checks: &mut Checks,
) -> Option<TopicEnds> {
    let kafka = &config.kafka;
    let client = client_config(
        &kafka.brokers,
        &kafka.properties,
        ClientRole::Inspector {
            group: &kafka.group,
        },
    );
    let consumer: BaseConsumer<Quiet> = match client.create_with_context(Quiet) {
        Ok(consumer) => consumer,
        Err(error) => {
            checks.add(
                "kafka settings",
                Status::Fail,
                format!("librdkafka refuses the [kafka] settings: {error}"),
            );
            return None;
        }
    };
    let metadata = match consumer.fetch_metadata(None, timeout) {
        Ok(metadata) => metadata,
        Err(error) => {
            checks.add(
                "brokers",
                Status::Fail,
                format!(
                    "cannot reach the Kafka brokers at {} within {} s ({error}). Check kafka.brokers, \
                     the network path, and security.protocol / sasl.* under [kafka.properties]",
                    kafka.brokers,
                    timeout.as_secs()
                ),
            );
            return None;
        }
    };
    checks.add(
        "brokers",
        Status::Ok,
        format!(
            "{} broker(s) answered at {}",
            metadata.brokers().len(),
            kafka.brokers
        ),
    );
    let Some(topic) = metadata
        .topics()
        .iter()
        .find(|t| t.name() == kafka.topic && !t.partitions().is_empty())
    else {
        checks.add(
            "topic",
            Status::Fail,
            format!(
                "topic {} does not exist on the cluster: create it with as many partitions as you \
                 want workers (e.g. kafka-topics.sh --create --topic {} --partitions 12)",
                kafka.topic, kafka.topic
            ),
        );
        return None;
    };
    let leaderless: Vec<i32> = topic
        .partitions()
        .iter()
        .filter(|p| p.leader() < 0)
        .map(|p| p.id())
        .collect();
    if leaderless.is_empty() {
        checks.add(
            "topic",
            Status::Ok,
            format!(
                "{}: {} partitions, so at most {} workers share the work",
                kafka.topic,
                topic.partitions().len(),
                topic.partitions().len()
            ),
        );
    } else {
        checks.add(
            "topic",
            Status::Warn,
            format!(
                "{}: partitions {leaderless:?} have no leader; their records cannot be read until the cluster elects one",
                kafka.topic
            ),
        );
    }
    if let Some(dlq) = &kafka.dlq_topic
        && !metadata
            .topics()
            .iter()
            .any(|t| t.name() == dlq.as_str() && !t.partitions().is_empty())
    {
        checks.add(
            "dead-letter topic",
            Status::Warn,
            format!("{dlq} does not exist: dead letters still go to the lake, but publishing them will fail unless the cluster creates topics automatically"),
        );
    }
    let mut ends = Vec::new();
    for partition in topic.partitions() {
        match consumer.fetch_watermarks(&kafka.topic, partition.id(), timeout) {
            Ok((_, high)) => ends.push((partition.id(), high)),
            Err(error) => checks.add(
                "topic",
                Status::Warn,
                format!(
                    "cannot read the end of partition {}: {error}",
                    partition.id()
                ),
            ),
        }
    }
    Some(TopicEnds {
        consumer,
        topic: kafka.topic.clone(),
        ends,
        timeout,
    })
}

/// How far behind the end of each partition (`ends`) the lake's offsets of the pipeline
/// stand; a lake past the end of a partition whose records are gone means a recreated
/// topic, which workers would skip.
pub async fn check_ingest_progress(
    config: &PipelineConfig,
    lake: &Lake,
    ends: &TopicEnds,
    checks: &mut Checks,
) -> Result<()> {
    let mut behind = 0_i64;
    let mut beyond = Vec::new();
    for &(partition, end) in &ends.ends {
        let app_id = format!("{}-{partition}", config.pipeline.name);
        let stored = lake.app_version(POS_EVENTS.name, &app_id).await?;
        let next = stored.map_or(0, |offset| offset + 1);
        if next <= end {
            behind += end - next;
            continue;
        }
        // Past the reported end: make sure the records the lake holds are really
        // gone before calling it a recreated topic.
        match ends.highest_readable(partition, end - 1) {
            Some(highest) if highest + 1 >= next => {}
            highest => beyond.push(format!(
                "partition {partition}: lake at offset {next}, topic ends at {}",
                highest.map_or(end, |h| h + 1)
            )),
        }
    }
    if beyond.is_empty() {
        checks.add(
            "ingest progress",
            Status::Ok,
            format!(
                "pipeline {} is {} records behind the end of {}",
                config.pipeline.name,
                thousands(behind as u64),
                config.kafka.topic
            ),
        );
    } else {
        checks.add(
            "ingest progress",
            Status::Fail,
            format!(
                "the lake records offsets past the end of the topic ({}): was the topic deleted and \
                 recreated? Workers would skip its new records. Use a new [pipeline] name for a new topic",
                beyond.join("; ")
            ),
        );
    }
    Ok(())
}
