//! The streaming worker: Kafka → decode → Arrow → Delta, exactly once.
//!
//! The worker runs on its own thread with a blocking librdkafka consumer and drives the
//! asynchronous lake through a Tokio runtime handle. Its state per assigned partition is
//! the pair of offsets the lake already holds, read from the Delta `txn` actions of
//! `pos_events` and `dead_letters`:
//!
//! - on assignment it starts reading at `pos_events`' offset + 1;
//! - records at or below that offset are skipped (already stored), dead letters at or
//!   below `dead_letters`' offset likewise;
//! - a flush commits `dead_letters` first, then `pos_events`, each with the last offset
//!   of the flushed range, and each only if the table still holds the offset the worker
//!   started from (otherwise another worker owns the partition: the buffer is dropped);
//! - Kafka group offsets are committed last, for lag monitoring only.
//!
//! A crash at any step therefore replays from the last `pos_events` commit and the
//! skips make the replay write nothing twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders, Timestamp};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use streetflow_core::tables::{DEAD_LETTERS, POS_EVENTS};
use streetflow_core::{Knowledge, PipelineConfig};
use streetflow_lake::arrow::array::{AsArray, RecordBatch};
use streetflow_lake::arrow::datatypes::TimestampMicrosecondType;
use streetflow_lake::{CommitOutcome, Lake, OffsetWriter, PartitionProgress, StagedFiles};
use tokio::runtime::Handle;

use crate::batch::{
    Appended, DeadLetterRows, EventRows, KafkaTimestamp, KafkaTimestampKind, Origin, RowAppender,
};
use crate::clients::{ClientRole, client_config};
use crate::error::{Error, Result};
use crate::metrics as names;
use crate::produce::PartitionWatermarks;
use streetflow_lake::freeze::{self, points};

mod commit;
mod context;
mod intake;
mod watchdog;

use commit::*;
use context::*;
use intake::*;
use watchdog::*;

/// Work to run after each bronze commit, at start-up and before exit, and after five
/// minutes without a commit, on the worker's thread with the lake and the runtime handle
/// (the binary refreshes `merchant_daily` and its history). It must handle its own
/// errors: bronze is committed whatever it does.
pub type AfterCommit = Arc<dyn Fn(&Lake, &Handle) + Send + Sync>;

/// How a worker runs.
#[derive(Clone)]
pub struct IngestOptions {
    /// Pipeline settings (Kafka, lake, flush limits, calendars).
    pub config: PipelineConfig,
    /// Stop once every assigned partition is caught up (batch runs, tests).
    pub exit_at_end: bool,
    /// With `exit_at_end`: how long records may wait in the topic with nothing storing
    /// them (this worker reading none of them, rejoins included) before the run fails.
    pub stall_timeout: Duration,
    /// Runs after each bronze commit (see [`AfterCommit`]).
    pub after_commit: Option<AfterCommit>,
    /// Records committed to `pos_events` or `dead_letters` so far, added to at each
    /// flush: for progress displays and for a producer that waits on the workers
    /// (see [`crate::Throttle`]).
    pub committed: Option<Arc<AtomicU64>>,
    /// Per-partition progress, advanced after each lake commit (for a producer that
    /// waits on each partition, see [`crate::Throttle::per_partition`]).
    pub partition_watermarks: Option<Arc<PartitionWatermarks>>,
}

impl IngestOptions {
    /// How long a batch run waits on what does not move (a stall, a broker that does not
    /// answer); `None` for a streaming worker, which waits and keeps saying so.
    fn give_up_after(&self) -> Option<Duration> {
        self.exit_at_end.then_some(self.stall_timeout)
    }
}

impl std::fmt::Debug for IngestOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestOptions")
            .field("config", &self.config)
            .field("exit_at_end", &self.exit_at_end)
            .field("stall_timeout", &self.stall_timeout)
            .field("after_commit", &self.after_commit.is_some())
            .field("committed", &self.committed.is_some())
            .field("partition_watermarks", &self.partition_watermarks.is_some())
            .finish()
    }
}

/// What a worker did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// Records read from Kafka.
    pub consumed: u64,
    /// Records committed to `pos_events`.
    pub accepted: u64,
    /// Records committed to `dead_letters`, by reason code.
    pub dead_lettered: BTreeMap<String, u64>,
    /// Records skipped because the lake already held them.
    pub replayed: u64,
    /// Records buffered but dropped because a rebalance or a fence took their partition.
    pub dropped_on_rebalance: u64,
    /// Flushes committed.
    pub flushes: u64,
    /// Commits refused because another worker owned a partition.
    pub fenced: u64,
    /// Times the broker skipped records it still held and the worker re-read them.
    pub gaps_repaired: u64,
    /// Records gone from the broker before they were read (retention): reported, never
    /// silently skipped.
    pub records_lost_on_broker: u64,
}

impl IngestReport {
    /// Dead letters in all.
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered.values().sum()
    }
}

/// Offsets the lake already holds for one partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bases {
    events: Option<i64>,
    dead_letters: Option<i64>,
}

/// The two bronze tables of a worker.
struct Sink {
    events: OffsetWriter,
    dead_letters: OffsetWriter,
}

impl Sink {
    async fn bases(&mut self, partitions: &[i32]) -> Result<Vec<Bases>> {
        let events = self.events.committed_offsets(partitions).await?;
        let dead = self.dead_letters.committed_offsets(partitions).await?;
        Ok(events
            .into_iter()
            .zip(dead)
            .map(|(events, dead_letters)| Bases {
                events,
                dead_letters,
            })
            .collect())
    }
}

enum RebalanceEvent {
    Assigned(Vec<(i32, Bases)>),
    Revoked,
    /// The assignment could not start; the worker stops with this error.
    Failed(Error),
}

/// The number a topic's offsets are recorded under in the lake: a 63-bit digest of its
/// name (the Kafka protocol's topic ids are not exposed by the client library).
pub(crate) fn topic_identity(topic: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("kafka-topic:{topic}").as_bytes());
    let mut bytes = [0_u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(bytes) >> 1) as i64
}

/// How far the broker's queried high watermark may lag the stored offsets before a
/// partition is suspected of being recreated: Tansu 0.6 answers ListOffsets with the
/// base offset + 1 of a record batch, so a lake that stored the whole of that batch is
/// up to one batch ahead of it (librdkafka's producer batches hold at most
/// `batch.num.messages`, 10,000). On S3 storage the answer can be any earlier batch;
/// a larger shortfall is therefore confirmed through a fetch before it is refused
/// (`IngestContext::confirm_shorter`).
const HIGH_WATERMARK_SLACK: i64 = 10_000;

/// Refuses to start partition `partition` after offset `stored` when the broker's log
/// ends at `high` (the next offset it would write) well before it (more than
/// [`HIGH_WATERMARK_SLACK`]); a smaller shortfall is only logged.
fn check_offsets_continue(topic: &str, partition: i32, stored: i64, high: i64) -> Result<()> {
    if high > stored {
        return Ok(());
    }
    if stored - high < HIGH_WATERMARK_SLACK {
        tracing::debug!(
            partition,
            stored,
            high,
            "the high watermark is at or before the stored offsets (within one record batch)"
        );
        return Ok(());
    }
    Err(recreated(topic, partition, high, stored))
}

/// The refusal for a partition that ends before the offsets the lake holds.
fn recreated(topic: &str, partition: i32, end: i64, stored: i64) -> Error {
    Error::Config(format!(
        "partition {partition} of topic {topic:?} ends at offset {end}, but the lake already \
         holds its offsets up to {stored}: the topic was recreated or failed over to a cluster \
         with other offsets, and reading it after offset {stored} would skip its records. Give \
         it a pipeline name of its own ([pipeline] name in the pipeline file) to read it from \
         its start"
    ))
}

/// One worker: the consumer, and everything else (split so a polled message, which
/// borrows the consumer, can update the state).
struct Worker {
    consumer: BaseConsumer<IngestContext>,
    client_id: String,
    /// Consecutive group checks that found the group inconsistent.
    group_suspicions: u32,
    /// Members of the group when this worker last received an assignment.
    member_baseline: Option<BTreeSet<String>>,
    /// `State::assignments` when the baseline was taken.
    assignments_seen: u64,
    /// Whether the lake advances on the records this worker reads none of.
    stall: crate::group::StallWatch,
    /// Whether the broker answers the worker's queries.
    broker: BrokerWatch,
    /// When the worker last forced a rejoin.
    last_rejoin: Option<Instant>,
    /// When [`Worker::topic_stored`] last found records after the lake's offsets.
    records_follow_at: Option<Instant>,
    /// Per partition, whether the fetch path answers [`Worker::position_moved_back`]'s
    /// probe (apart from `broker`, which every successful query resets).
    moved_back_probe: BTreeMap<i32, BrokerWatch>,
    /// Per partition, an offset [`Worker::topic_stored`] found a record at: the
    /// partition's end is past it whatever a queried end says.
    record_seen_at: BTreeMap<i32, i64>,
    state: State,
}

/// A worker's state besides its consumer.
struct State {
    options: IngestOptions,
    topic: String,
    appender: RowAppender,
    lake: Lake,
    dlq: Option<(BaseProducer<DlqContext>, String)>,
    handle: Handle,
    sink: Arc<Mutex<Sink>>,
    partitions: BTreeMap<i32, PartitionState>,
    buffer: Buffer,
    report: IngestReport,
    failed: Option<Error>,
    ever_assigned: bool,
    /// Assignments received so far.
    assignments: u64,
    gaps: Vec<Gap>,
    /// When the after-commit hook last ran.
    last_after_commit: Instant,
}

/// A Kafka record's timestamp and whose clock set it.
fn kafka_timestamp(timestamp: Timestamp) -> Option<KafkaTimestamp> {
    let (millis, kind) = match timestamp {
        Timestamp::NotAvailable => return None,
        Timestamp::CreateTime(millis) => (millis, KafkaTimestampKind::CreateTime),
        Timestamp::LogAppendTime(millis) => (millis, KafkaTimestampKind::LogAppendTime),
    };
    DateTime::from_timestamp_millis(millis).map(|at| KafkaTimestamp { at, kind })
}

/// The stamp of a batch's observed rows (they all share one), if it has any.
fn observed_stamp(batch: &RecordBatch) -> Option<DateTime<Utc>> {
    let sources = batch
        .column_by_name("knowledge_source")?
        .as_string_opt::<i32>()?;
    let times = batch
        .column_by_name("knowledge_time")?
        .as_primitive_opt::<TimestampMicrosecondType>()?;
    (0..batch.num_rows())
        .find(|&row| sources.value(row) == streetflow_core::KnowledgeSource::Observed.as_str())
        .and_then(|row| DateTime::from_timestamp_micros(times.value(row)))
}

fn consumer_config(config: &PipelineConfig, client_id: &str) -> ClientConfig {
    client_config(
        &config.kafka.brokers,
        &config.kafka.properties,
        ClientRole::Worker {
            group: &config.kafka.group,
            client_id,
        },
    )
}

/// Runs a worker on the calling thread until `stop` is set (then it flushes, commits and
/// leaves the group) or, with `exit_at_end`, until its partitions are caught up. The
/// calling thread must not be a Tokio runtime thread; lake I/O runs on `handle`.
pub fn run_worker(
    options: IngestOptions,
    handle: Handle,
    stop: Arc<AtomicBool>,
) -> Result<IngestReport> {
    let mut state = State::open(options, handle.clone())?;
    let config = &state.options.config;
    let sink = state.sink.clone();
    // Unique per worker: the group check finds this worker's member by it.
    let client_id = format!(
        "streetflow-ingest-{}-{}",
        std::process::id(),
        Utc::now().timestamp_nanos_opt().unwrap_or_default() % 1_000_000_000
    );
    let context = IngestContext {
        handle: handle.clone(),
        topic: config.kafka.topic.clone(),
        sink: sink.clone(),
        events: Mutex::new(Vec::new()),
        fetched_high: Mutex::new(HashMap::new()),
        probe_config: consumer_config(config, &format!("{client_id}-probe")),
    };
    let consumer: BaseConsumer<IngestContext> = consumer_config(config, &client_id)
        .create_with_context(context)
        .map_err(Error::kafka("create consumer"))?;
    consumer
        .subscribe(&[&config.kafka.topic])
        .map_err(Error::kafka(format!("subscribe to {}", config.kafka.topic)))?;
    state.dlq = match &config.kafka.dlq_topic {
        Some(topic) => {
            let producer_config = client_config(
                &config.kafka.brokers,
                &config.kafka.properties,
                ClientRole::DeadLetters,
            );
            let producer: BaseProducer<DlqContext> = producer_config
                .create_with_context(DlqContext::default())
                .map_err(Error::kafka("create DLQ producer"))?;
            Some((producer, topic.clone()))
        }
        None => None,
    };
    tracing::info!(
        topic = %config.kafka.topic,
        group = %config.kafka.group,
        lake = %state.lake.root(),
        pipeline = %config.pipeline.name,
        "ingest worker started"
    );
    let mut worker = Worker {
        consumer,
        client_id,
        group_suspicions: 0,
        member_baseline: None,
        assignments_seen: 0,
        stall: crate::group::StallWatch::default(),
        broker: BrokerWatch::default(),
        last_rejoin: None,
        records_follow_at: None,
        moved_back_probe: BTreeMap::new(),
        record_seen_at: BTreeMap::new(),
        state,
    };
    worker.run(&stop)?;
    Ok(worker.state.report)
}

impl Worker {
    fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        // Catch up after a crash between a bronze commit and its silver refresh.
        self.after_commit();
        let started = Instant::now();
        let mut last_end_check = Instant::now();
        let mut last_lake_check = Instant::now();
        let mut waiting_for_others = false;
        let mut last_progress = Instant::now();
        let mut last_group_check = Instant::now();
        let mut reported = (0u64, 0u64);
        loop {
            if stop.load(Ordering::Relaxed) {
                tracing::info!("stop requested: flushing and leaving the group");
                self.flush()?;
                break;
            }
            let polled = self.consumer.poll(Duration::from_millis(100));
            let rebalances = self.consumer.context().take_events();
            if !rebalances.is_empty() {
                self.moved_back_probe.clear();
            }
            self.state.apply_rebalances(rebalances);
            if let Some(error) = self.state.failed.take() {
                // As it is: a refusal stays a refusal, a broker that did not say stays
                // retryable.
                return Err(error);
            }
            let idle = match polled {
                None => true,
                Some(Ok(message)) => {
                    self.state.on_message(&message);
                    false
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    if let Some(state) = self.state.partitions.get_mut(&p) {
                        // A partition holds the offsets the lake read from it: an end at
                        // or below them is librdkafka's end-of-partition signal for an
                        // error response whose end equals the position (Tansu's
                        // "unknown topic" ends at 0 while it restarts), not its end.
                        let below_lake = state
                            .next
                            .zip(state.bases.events)
                            .is_some_and(|(next, stored)| next <= stored);
                        if !below_lake {
                            state.at_end = true;
                        }
                        state.heard_at = Some(Instant::now());
                    }
                    true
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "consumer error (librdkafka retries)");
                    true
                }
            };
            self.handle_gaps()?;
            if self.state.flush_due() {
                self.flush()?;
            }
            // Without traffic the hook still runs now and then: silver's history settles
            // what the lake knew as time passes (days end), not only when events arrive.
            if idle && self.state.last_after_commit.elapsed() >= IDLE_AFTER_COMMIT {
                self.after_commit();
            }
            if last_progress.elapsed() >= Duration::from_secs(1) {
                self.find_silent_partitions()?;
                self.handle_gaps()?;
                // Per-second progress counters: visible between flushes, not per record.
                last_progress = Instant::now();
                let report = &self.state.report;
                metrics::counter!(names::RECORDS_IN).increment(report.consumed - reported.0);
                metrics::counter!(names::RECORDS_REPLAYED).increment(report.replayed - reported.1);
                reported = (report.consumed, report.replayed);
            }
            let new_assignment = self.assignments_seen != self.state.assignments;
            if last_group_check.elapsed() >= GROUP_CHECK_INTERVAL
                || (new_assignment && last_group_check.elapsed() >= Duration::from_millis(500))
            {
                last_group_check = Instant::now();
                self.check_group()?;
            }
            let exit_at_end = self.state.options.exit_at_end;
            if exit_at_end && idle && last_end_check.elapsed() > Duration::from_millis(500) {
                last_end_check = Instant::now();
                if self.state.partitions.is_empty() {
                    // A member left without partitions (revoked and never given new
                    // ones, or more members than partitions) must still end once the
                    // others have stored the whole topic, or a batch run never ends;
                    // and if nobody stores it, it must say so and rejoin, then fail.
                    if (self.state.ever_assigned || started.elapsed() >= EMPTY_MEMBER_GRACE)
                        && last_lake_check.elapsed() >= EMPTY_MEMBER_GRACE
                    {
                        last_lake_check = Instant::now();
                        let answer = self.topic_lag();
                        let Some(lag) = self.broker_may_be_away(answer)? else {
                            continue;
                        };
                        if self.topic_stored(&lag)? {
                            tracing::info!(
                                "no partitions assigned and every partition of the topic is in the lake"
                            );
                            break;
                        }
                        self.watch_stall(&lag)?;
                    }
                } else if self.caught_up()? {
                    self.flush()?;
                    if self.caught_up()? {
                        // Other members (or a crashed one whose session has not expired
                        // yet) may still hold partitions: a batch run ends when the whole
                        // topic is in the lake, not just this worker's share.
                        let answer = self.topic_lag();
                        let Some(lag) = self.broker_may_be_away(answer)? else {
                            continue;
                        };
                        if self.topic_stored(&lag)? {
                            tracing::info!("every partition of the topic is in the lake");
                            break;
                        }
                        if !waiting_for_others {
                            tracing::info!(
                                waiting = lag.waiting(),
                                "assigned partitions caught up; waiting for the rest of the topic"
                            );
                            waiting_for_others = true;
                        }
                        self.watch_stall(&lag)?;
                    } else {
                        self.stall.reset();
                    }
                } else {
                    self.stall.reset();
                }
            } else if !exit_at_end
                && idle
                && self.state.partitions.is_empty()
                && last_lake_check.elapsed() >= GROUP_CHECK_INTERVAL
            {
                // A streaming worker without partitions watches the same way (it never
                // gives up: it rejoins and keeps saying what it sees).
                last_lake_check = Instant::now();
                let answer = self.topic_lag();
                if let Some(lag) = self.broker_may_be_away(answer)? {
                    self.watch_stall(&lag)?;
                }
            }
        }
        self.after_commit();
        self.consumer.unsubscribe();
        // Serve the revocation so the group rebalances promptly.
        let _ = self.consumer.poll(Duration::from_millis(100));
        self.state
            .apply_rebalances(self.consumer.context().take_events());
        Ok(())
    }
}

impl State {
    /// Opens the lake and the bronze writers for a worker of `options`' pipeline, with
    /// nothing assigned yet and no DLQ producer.
    fn open(options: IngestOptions, handle: Handle) -> Result<Self> {
        let config = &options.config;
        config
            .validate()
            .map_err(|problems| Error::Config(problems.join("; ")))?;
        let calendars = config
            .calendars()
            .map_err(|e| Error::Config(e.to_string()))?;
        let lake = Lake::new(&config.lake.url, &config.lake.storage)?;
        let identity = topic_identity(&config.kafka.topic);
        let sink = handle.block_on(async {
            let mut sink = Sink {
                events: OffsetWriter::new(&lake, &POS_EVENTS, &config.pipeline.name).await?,
                dead_letters: OffsetWriter::new(&lake, &DEAD_LETTERS, &config.pipeline.name)
                    .await?,
            };
            // Offsets of another topic would skip this one's records as "replayed".
            for writer in [&mut sink.events, &mut sink.dead_letters] {
                if let Some(recorded) = writer.recorded_source().await?
                    && recorded != identity
                {
                    return Err(Error::Config(format!(
                        "the lake's offsets of pipeline {:?} were recorded from another topic than \
                         {:?} (see pos_events.kafka_topic): a renamed, recreated or failed-over \
                         topic starts at offsets of its own, and reading it on those offsets would \
                         skip its records. Give it a pipeline name of its own ([pipeline] name in \
                         the pipeline file), or read the topic those offsets belong to",
                        config.pipeline.name, config.kafka.topic
                    )));
                }
                writer.set_source(identity);
            }
            Ok::<_, Error>(sink)
        })?;
        Ok(Self {
            topic: config.kafka.topic.clone(),
            appender: RowAppender::new(config.decode_options(), calendars),
            lake,
            dlq: None,
            handle,
            sink: Arc::new(Mutex::new(sink)),
            partitions: BTreeMap::new(),
            buffer: Buffer::default(),
            report: IngestReport::default(),
            failed: None,
            ever_assigned: false,
            assignments: 0,
            gaps: Vec::new(),
            last_after_commit: Instant::now(),
            options,
        })
    }

    fn apply_rebalances(&mut self, events: Vec<RebalanceEvent>) {
        for event in events {
            match event {
                RebalanceEvent::Assigned(assigned) => {
                    tracing::debug!(
                        ?assigned,
                        buffered = self.buffer.records,
                        "assignment applied"
                    );
                    self.intake().assigned(assigned);
                    self.ever_assigned = true;
                    self.assignments += 1;
                }
                RebalanceEvent::Revoked => {
                    tracing::debug!(buffered = self.buffer.records, "revocation applied");
                    self.intake().revoked();
                    self.discard_staged();
                }
                RebalanceEvent::Failed(reason) => self.failed = Some(reason),
            }
        }
    }

    fn discard_staged(&mut self) {
        let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        sink.events.discard();
        sink.dead_letters.discard();
    }

    /// The parts of the state a record or a rebalance updates.
    fn intake(&mut self) -> Intake<'_> {
        Intake {
            topic: &self.topic,
            partitions: &mut self.partitions,
            buffer: &mut self.buffer,
            report: &mut self.report,
            appender: &mut self.appender,
            publish_dlq: self.dlq.is_some(),
            gaps: &mut self.gaps,
        }
    }

    fn on_message(&mut self, message: &BorrowedMessage<'_>) {
        self.intake().take(Record {
            partition: message.partition(),
            offset: message.offset(),
            payload: message.payload(),
            key: message.key(),
            timestamp: kafka_timestamp(message.timestamp()),
        });
    }

    fn flush_due(&self) -> bool {
        self.buffer.flush_due(&self.options.config.flush)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_that_ends_before_the_stored_offsets_is_refused() {
        assert!(check_offsets_continue("t", 0, 99, 100).is_ok()); // caught up
        assert!(check_offsets_continue("t", 0, 99, 5_000).is_ok());
        let error = check_offsets_continue("t", 3, 20_099, 40)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("partition 3") && error.contains("pipeline name"),
            "{error}"
        );
        // Within one record batch of the stored offsets: Tansu's high watermark.
        assert!(check_offsets_continue("t", 0, 99, 99).is_ok());
        assert!(check_offsets_continue("t", 0, 12_000, 2_500).is_ok());
        assert!(check_offsets_continue("t", 0, 12_500, 2_500).is_err());
    }

    #[test]
    fn the_lag_counts_what_the_broker_holds_past_the_lake() {
        let lag = TopicLag {
            partitions: vec![
                // Stored through 9 of 0..20.
                PartitionLag {
                    partition: 0,
                    stored: Some(9),
                    low: 0,
                    end: 20,
                    read_here: false,
                },
                // Nothing stored; retention removed 0..5.
                PartitionLag {
                    partition: 1,
                    stored: None,
                    low: 5,
                    end: 8,
                    read_here: false,
                },
                // Stored past what retention kept, and at the end: nothing waits.
                PartitionLag {
                    partition: 2,
                    stored: Some(30),
                    low: 10,
                    end: 31,
                    read_here: false,
                },
                // The lake holds what retention removed since.
                PartitionLag {
                    partition: 3,
                    stored: Some(3),
                    low: 12,
                    end: 15,
                    read_here: false,
                },
            ],
        };
        assert_eq!(lag.waiting(), 10 + 3 + 3);
        assert_eq!(lag.stored(), 10 + 31 + 4);
        assert_eq!(lag.to_string(), "p0 10/20, p1 none/8, p2 31/31, p3 4/15");
    }

    #[test]
    fn topics_have_distinct_positive_identities() {
        let a = topic_identity("pos.transactions.v1");
        assert_eq!(a, topic_identity("pos.transactions.v1"));
        assert_ne!(a, topic_identity("pos.transactions.v2"));
        assert!(a >= 0 && topic_identity("") >= 0);
    }
}
