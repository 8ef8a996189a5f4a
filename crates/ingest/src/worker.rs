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

/// librdkafka callbacks: assignments start where the lake says, and lag is exported.
struct IngestContext {
    handle: Handle,
    topic: String,
    sink: Arc<Mutex<Sink>>,
    events: Mutex<Vec<RebalanceEvent>>,
    /// Per partition, the highest end (last stable offset) this worker's fetch responses
    /// carried (librdkafka's statistics, every `statistics.interval.ms`): see
    /// [`watermarks`]. A topic recreated under a running worker makes these too high: its
    /// end check then waits, says so and (in a batch run) fails, never skips.
    fetched_high: Mutex<HashMap<i32, i64>>,
    /// The worker's consumer settings, for a probe of a partition's end
    /// ([`crate::end_probe`]).
    probe_config: ClientConfig,
}

impl IngestContext {
    fn push(&self, event: RebalanceEvent) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
    }

    fn fetched_high(&self, partition: i32) -> Option<i64> {
        self.fetched_high
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&partition)
            .copied()
    }

    fn take_events(&self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn assign(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
    ) -> Result<Vec<(i32, Bases)>> {
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let bases = {
            let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
            self.handle.block_on(sink.bases(&partitions))?
        };
        // A partition that ends before the offsets the lake holds is not the one they
        // were read from (a topic recreated under the same name, a failover to a cluster
        // with lower offsets): starting there would skip all of it. (A broker that does
        // not answer now is no evidence: the gap checks after positioning still see
        // where the partition's records start.)
        let mut shorter = Vec::new();
        for (&p, base) in partitions.iter().zip(&bases) {
            if let Some(stored) = base.events.max(base.dead_letters) {
                // Raised to the end this worker's own fetches saw: a broker whose
                // ListOffsets answers too low (Tansu on S3) must not look recreated.
                match watermarks(consumer, &self.topic, p, Duration::from_secs(3)) {
                    Ok((_, high)) => {
                        if let Err(refusal) = check_offsets_continue(&self.topic, p, stored, high) {
                            shorter.push(Shorter {
                                partition: p,
                                stored,
                                high,
                                refusal,
                            });
                        }
                    }
                    Err(error) => tracing::warn!(
                        partition = p,
                        %error,
                        "no watermarks to check the stored offsets against"
                    ),
                }
            }
            let start = base
                .events
                .map_or(Offset::Beginning, |last| Offset::Offset(last + 1));
            tpl.set_partition_offset(&self.topic, p, start)
                .map_err(Error::kafka(format!("set start offset of partition {p}")))?;
        }
        self.confirm_shorter(shorter)?;
        consumer
            .assign(tpl)
            .map_err(Error::kafka("assign partitions"))?;
        tracing::info!(partitions = ?partitions, "assigned; starting after the offsets the lake holds");
        Ok(partitions.into_iter().zip(bases).collect())
    }
}

/// A partition whose queried end fell far short of the offsets the lake holds.
struct Shorter {
    partition: i32,
    stored: i64,
    high: i64,
    refusal: Error,
}

impl IngestContext {
    /// Partitions whose queried end fell far short of the offsets the lake holds: before
    /// calling one recreated, ask through the fetch path whether it holds the last stored
    /// offset (or later), all in one probe (this runs inside the rebalance callback). A
    /// broker whose ListOffsets answers too low serves it, and the worker goes on; a
    /// partition that ends before it is recreated, and its refusal stands. When the
    /// broker does not say, the worker stops with an error that says so (to be run
    /// again), never with the "recreated" advice: acting on that advice reads the topic
    /// again from its start.
    fn confirm_shorter(&self, shorter: Vec<Shorter>) -> Result<()> {
        use crate::end_probe::{ProbeAnswer, probe_ends};
        if shorter.is_empty() {
            return Ok(());
        }
        let asked: Vec<(i32, i64)> = shorter.iter().map(|s| (s.partition, s.stored)).collect();
        let mut answers = probe_ends(
            &self.probe_config,
            &self.topic,
            &asked,
            Duration::from_secs(10),
        );
        let mut unconfirmed = Vec::new();
        for Shorter {
            partition,
            stored,
            high,
            refusal,
        } in shorter
        {
            match answers
                .remove(&partition)
                .unwrap_or_else(|| ProbeAnswer::Unknown("no answer".into()))
            {
                ProbeAnswer::RecordsFollow => tracing::warn!(
                    partition,
                    stored,
                    queried_end = high,
                    "the broker's ListOffsets answer lies below offsets it serves; going on"
                ),
                ProbeAnswer::EndReached | ProbeAnswer::PastEnd { .. } => return Err(refusal),
                ProbeAnswer::Unknown(why) => unconfirmed.push(format!(
                    "partition {partition}: the broker's end {high} lies below offset {stored}, \
                     which the lake holds, and a fetch could not confirm whether the partition \
                     holds it ({why})"
                )),
            }
        }
        if unconfirmed.is_empty() {
            return Ok(());
        }
        Err(Error::Unconfirmed(format!(
            "topic {}: {}; nothing was read. Check the broker and run again; if the topic was \
             really recreated, the next run says so",
            self.topic,
            unconfirmed.join("; ")
        )))
    }
}

impl ClientContext for IngestContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // With enable.partition.eof librdkafka also reports each end of partition here;
        // the worker handles those itself.
        if matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            return;
        }
        tracing::warn!(%error, reason, "librdkafka");
    }

    fn stats(&self, statistics: Statistics) {
        if let Some(topic) = statistics.topics.get(&self.topic) {
            let mut fetched_high = self
                .fetched_high
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (partition, stats) in &topic.partitions {
                // The last stable offset: the end under read_committed (librdkafka's
                // default), as ListOffsets and end-of-partition judge it. Kept across
                // rebalances: a member left without partitions after a broker restart
                // still knows how far the ones it read go.
                if *partition >= 0 && stats.ls_offset >= 0 {
                    let end = fetched_high.entry(*partition).or_insert(stats.ls_offset);
                    *end = (*end).max(stats.ls_offset);
                }
                // librdkafka's own consumer_lag counts from the committed group offset,
                // which this worker commits only after the lake; lag from the position
                // the application has read is what an operator watches.
                let position = if stats.app_offset >= 0 {
                    stats.app_offset
                } else {
                    stats.committed_offset
                };
                if *partition >= 0 && stats.desired && stats.hi_offset >= 0 && position >= 0 {
                    metrics::gauge!(names::CONSUMER_LAG, "partition" => partition.to_string())
                        .set((stats.hi_offset - position).max(0) as f64);
                }
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                match self.assign(consumer, tpl) {
                    Ok(assigned) => self.push(RebalanceEvent::Assigned(assigned)),
                    Err(error) => {
                        tracing::error!(%error, "cannot start the assigned partitions");
                        let _ = consumer.unassign();
                        self.push(RebalanceEvent::Failed(error));
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!("partitions revoked; dropping what was not committed");
                let _ = consumer.unassign();
                self.push(RebalanceEvent::Revoked);
            }
            other => {
                tracing::warn!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
                self.push(RebalanceEvent::Revoked);
            }
        }
    }
}

#[derive(Debug, Default)]
struct PartitionState {
    bases: Bases,
    /// First and last offset in the buffer.
    first_buffered: Option<i64>,
    /// Last offset in the buffer.
    last_buffered: Option<i64>,
    /// Next offset to read (after the last one seen, stored or skipped).
    next: Option<i64>,
    /// librdkafka reported the end of the partition after the last message.
    at_end: bool,
    /// After positioning the consumer: the offset the next record must have, and when
    /// the position was set.
    expect_first: Option<(i64, Instant)>,
    /// A gap in this partition was already repaired once (never loop on it).
    repaired: bool,
    /// Re-positioned one record before a gap (`expected`, `found`) to learn whether the
    /// broker serves exact offsets: it then does, and the gap holds no records.
    probing: Option<(i64, i64)>,
    /// When the partition was positioned or last delivered a record or its end.
    heard_at: Option<Instant>,
}

impl PartitionState {
    fn starting_at(bases: Bases) -> Self {
        let start = bases.events.map(|o| o + 1);
        Self {
            bases,
            next: start,
            expect_first: start.map(|offset| (offset, Instant::now())),
            heard_at: Some(Instant::now()),
            ..Self::default()
        }
    }

    /// librdkafka has reported this partition's end since its last record (from the high
    /// watermark of its fetch responses), and its first record after positioning is not
    /// awaited: it is at its end without asking the broker.
    fn known_at_end(&self) -> bool {
        self.at_end && self.expect_first.is_none()
    }

    /// Records are still coming: the partition delivered within [`QUIET_PARTITION`] and
    /// has not reported its end.
    fn still_reading(&self) -> bool {
        !self.at_end
            && self.expect_first.is_none()
            && self
                .heard_at
                .is_some_and(|at| at.elapsed() < QUIET_PARTITION)
    }
}

/// What [`Worker::position_moved_back`] did.
enum MovedBack {
    /// The partition holds the lake's last offset and is positioned after it again.
    Repositioned,
    /// The broker did not say whether it holds it; why, in words.
    Unanswered(String),
}

/// After positioning, the first record came later than the offset asked for (`found`),
/// or none came although the partition holds more (`found: None`).
#[derive(Debug, Clone, Copy)]
struct Gap {
    partition: i32,
    expected: i64,
    found: Option<i64>,
    /// Not before then: the broker did not answer the last question about it.
    retry_at: Option<Instant>,
}

/// A partition's low and high watermarks: the broker's answer to a query (ListOffsets),
/// its high raised to the highest end this consumer's fetch responses carried
/// ([`IngestContext::fetched_high`]). Both are lower bounds of the partition's end; the query
/// alone is not always right: Tansu 0.6 on S3 answers "latest" with the batch its store
/// stamped last (one-second timestamps), far below the end when many batches share that
/// second, and a worker trusting it took unread partitions for read to their end.
fn watermarks(
    consumer: &BaseConsumer<IngestContext>,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> KafkaResult<(i64, i64)> {
    let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
    let fetched = consumer.context().fetched_high(partition).unwrap_or(-1);
    Ok((low, high.max(fetched)))
}

/// How long a batch worker waits before it probes the partitions of others again after
/// a probe found records after the lake's offsets ([`Worker::topic_stored`]).
const PROBE_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// How long the gap checks wait after the broker did not answer one of their questions.
const GAPS_RETRY_AFTER: Duration = Duration::from_secs(2);

/// How long a positioned partition may stay silent while holding records.
const SILENT_PARTITION: Duration = Duration::from_secs(3);

/// How long a partition that has not reported its end must be silent before the end
/// check asks the broker for its watermarks. Each such query waits behind the pending
/// long-poll fetch on the broker's connection (up to `fetch.wait.max.ms`), so asking
/// about every partition on every idle poll kept a worker blocked most of the time.
const QUIET_PARTITION: Duration = Duration::from_secs(1);

/// A dead letter waiting to be published on the DLQ topic after the lake commit.
struct DlqMessage {
    payload: Vec<u8>,
    key: Option<Vec<u8>>,
    reason: &'static str,
    detail: String,
    partition: i32,
    offset: i64,
}

#[derive(Default)]
struct Buffer {
    events: EventRows,
    dead_letters: DeadLetterRows,
    dead_by_reason: BTreeMap<&'static str, u64>,
    dlq: Vec<DlqMessage>,
    records: usize,
    bytes: usize,
    started: Option<Instant>,
}

impl Buffer {
    fn clear(&mut self) -> usize {
        let dropped = self.records;
        self.events.clear();
        self.dead_letters.clear();
        self.dead_by_reason.clear();
        self.dlq.clear();
        self.records = 0;
        self.bytes = 0;
        self.started = None;
        dropped
    }
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
            dead_letters: OffsetWriter::new(&lake, &DEAD_LETTERS, &config.pipeline.name).await?,
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
    let sink = Arc::new(Mutex::new(sink));
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
    let dlq = match &config.kafka.dlq_topic {
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
        lake = %lake.root(),
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
        state: State {
            topic: config.kafka.topic.clone(),
            appender: RowAppender::new(config.decode_options(), calendars),
            lake,
            dlq,
            handle,
            sink,
            partitions: BTreeMap::new(),
            buffer: Buffer::default(),
            report: IngestReport::default(),
            failed: None,
            ever_assigned: false,
            assignments: 0,
            gaps: Vec::new(),
            last_after_commit: Instant::now(),
            options,
        },
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
    fn apply_rebalances(&mut self, events: Vec<RebalanceEvent>) {
        for event in events {
            match event {
                RebalanceEvent::Assigned(assigned) => {
                    tracing::debug!(
                        ?assigned,
                        buffered = self.buffer.records,
                        "assignment applied"
                    );
                    self.report.dropped_on_rebalance += self.buffer.clear() as u64;
                    // Gaps were found under the old positions; the new ones start where
                    // the lake says.
                    self.gaps.clear();
                    self.partitions = assigned
                        .into_iter()
                        .map(|(p, bases)| (p, PartitionState::starting_at(bases)))
                        .collect();
                    self.ever_assigned = true;
                    self.assignments += 1;
                }
                RebalanceEvent::Revoked => {
                    tracing::debug!(buffered = self.buffer.records, "revocation applied");
                    self.report.dropped_on_rebalance += self.buffer.clear() as u64;
                    self.discard_staged();
                    self.gaps.clear();
                    self.partitions.clear();
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

    fn on_message(&mut self, message: &BorrowedMessage<'_>) {
        let Self {
            topic,
            partitions,
            buffer,
            report,
            appender,
            dlq,
            gaps,
            ..
        } = self;
        let topic = topic.as_str();
        let publish_dlq = dlq.is_some();
        let partition = message.partition();
        let offset = message.offset();
        report.consumed += 1;
        let Some(state) = partitions.get_mut(&partition) else {
            // A message fetched before a revocation took effect; its new owner reads it.
            tracing::debug!(partition, offset, "record of a partition not assigned here");
            report.dropped_on_rebalance += 1;
            return;
        };
        state.at_end = false;
        state.heard_at = Some(Instant::now());
        if gaps.iter().any(|gap| gap.partition == partition) {
            // The partition is positioned again once its gap is handled: records read
            // on from the wrong position would move the lake's offsets past the ones
            // skipped, and the re-read would take those for replays.
            return;
        }
        if let Some((expected, _)) = state.expect_first.take() {
            // Later than asked: records skipped (or offsets without records). Earlier than
            // asked: the broker moved the position back, as `auto.offset.reset` does when
            // the asked offset is out of range, such as in a topic recreated under the
            // worker; taken as replays, its records would be dropped.
            if offset != expected {
                // Not processed: the worker re-positions the partition and reads it again.
                gaps.push(Gap {
                    partition,
                    expected,
                    found: Some(offset),
                    retry_at: None,
                });
                return;
            }
            if let Some((gap_start, gap_end)) = state.probing.take() {
                // The record before the gap came where asked: the broker serves exact
                // offsets from there, so reading on from it skips nothing (the gap was
                // offsets without records, such as transaction markers or compaction,
                // or a fetch that started inside a record batch).
                tracing::info!(
                    partition,
                    gap_start,
                    gap_end,
                    "the record before a gap came where asked; reading on from it"
                );
                metrics::counter!(names::OFFSET_GAPS, "outcome" => "probed").increment(1);
            }
        }
        state.next = Some(offset + 1);
        if state.bases.events.is_some_and(|stored| offset <= stored) {
            report.replayed += 1;
            return;
        }
        // The worker's own clock judges `future_timestamp`; the record's timestamp (the
        // producer's or the broker's clock) is kept, never used as knowledge time.
        let received_at = Utc::now();
        let origin = Origin::Kafka {
            topic,
            partition,
            offset,
            timestamp: kafka_timestamp(message.timestamp()),
        };
        let payload = message.payload();
        let dead_stored = state
            .bases
            .dead_letters
            .is_some_and(|stored| offset <= stored);
        match appender.append(
            &mut buffer.events,
            &mut buffer.dead_letters,
            payload,
            message.key(),
            received_at,
            Knowledge::Observed,
            origin,
            dead_stored,
        ) {
            Appended::Event => {}
            Appended::DeadLetterAlreadyStored(_) => report.replayed += 1,
            Appended::DeadLetter(rejection) => {
                *buffer
                    .dead_by_reason
                    .entry(rejection.reason.as_str())
                    .or_default() += 1;
                if publish_dlq {
                    buffer.dlq.push(DlqMessage {
                        payload: payload
                            .map(|p| streetflow_core::card::mask_card_numbers(p).into_owned())
                            .unwrap_or_default(),
                        key: message.key().map(<[u8]>::to_vec),
                        reason: rejection.reason.as_str(),
                        detail: rejection.detail,
                        partition,
                        offset,
                    });
                }
            }
        }
        state.first_buffered.get_or_insert(offset);
        state.last_buffered = Some(offset);
        buffer.records += 1;
        buffer.bytes += payload.map_or(0, <[u8]>::len);
        buffer.started.get_or_insert_with(Instant::now);
        freeze::point(points::BUFFERED);
    }

    fn flush_due(&self) -> bool {
        let flush = &self.options.config.flush;
        self.buffer.records >= flush.max_records
            || self.buffer.bytes >= flush.max_bytes
            || self
                .buffer
                .started
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(flush.max_age_ms))
    }
}

/// With `exit_at_end`, how often a worker without partitions asks the lake whether the
/// rest of the group has stored the whole topic.
const EMPTY_MEMBER_GRACE: Duration = Duration::from_secs(2);

/// How long a worker without flushes waits before it runs the after-commit hook anyway.
const IDLE_AFTER_COMMIT: Duration = Duration::from_secs(300);

/// How often a worker compares the coordinator's view of the group with its own.
const GROUP_CHECK_INTERVAL: Duration = Duration::from_secs(5);

impl Worker {
    /// See [`crate::group`]: rejoin when the stable group lost members that were there
    /// at this worker's assignment and no rebalance told it (two checks in a row).
    fn check_group(&mut self) -> Result<()> {
        let group_id = self.state.options.config.kafka.group.clone();
        let groups = match self
            .consumer
            .fetch_group_list(Some(&group_id), Duration::from_secs(5))
        {
            Ok(groups) => groups,
            Err(error) => {
                tracing::debug!(%error, "describing the group failed; skipping the check");
                return Ok(());
            }
        };
        let Some(info) = groups.groups().iter().find(|g| g.name() == group_id) else {
            return Ok(());
        };
        if info.state() != "Stable" {
            self.group_suspicions = 0;
            return Ok(());
        }
        let members: BTreeSet<String> = info.members().iter().map(|m| m.id().to_owned()).collect();
        if self.assignments_seen != self.state.assignments {
            // A new assignment: its group is the baseline.
            self.assignments_seen = self.state.assignments;
            self.member_baseline = Some(members);
            self.group_suspicions = 0;
            return Ok(());
        }
        let verdict = crate::group::judge(self.member_baseline.as_ref(), &members, &self.client_id);
        if verdict == crate::group::Verdict::Consistent {
            self.group_suspicions = 0;
            return Ok(());
        }
        self.group_suspicions += 1;
        let cooled_down = self
            .last_rejoin
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(30));
        if self.group_suspicions >= 2 && cooled_down {
            tracing::warn!(
                ?verdict,
                "the group changed without a rebalance reaching this worker; rejoining"
            );
            self.group_suspicions = 0;
            self.rejoin()?;
        }
        Ok(())
    }

    /// Commits what is buffered and joins the group again.
    fn rejoin(&mut self) -> Result<()> {
        self.last_rejoin = Some(Instant::now());
        metrics::counter!(names::GROUP_REJOINS).increment(1);
        self.flush()?;
        let topic = self.state.topic.clone();
        self.consumer.unsubscribe();
        self.consumer
            .subscribe(&[&topic])
            .map_err(Error::kafka(format!("resubscribe to {topic}")))
    }

    /// Partitions positioned a while ago that delivered nothing although the broker
    /// holds records past the position.
    fn find_silent_partitions(&mut self) -> Result<()> {
        let silent: Vec<(i32, i64)> = self
            .state
            .partitions
            .iter()
            .filter_map(|(&p, s)| {
                s.expect_first
                    .filter(|(_, at)| at.elapsed() >= SILENT_PARTITION)
                    .map(|(o, _)| (p, o))
            })
            .collect();
        for (partition, expected) in silent {
            let answer = watermarks(
                &self.consumer,
                &self.state.topic,
                partition,
                Duration::from_secs(10),
            )
            .map_err(Error::kafka(format!("watermarks of partition {partition}")));
            let high = self.broker_may_be_away(answer)?;
            let Some(state) = self.state.partitions.get_mut(&partition) else {
                continue;
            };
            let Some((_, high)) = high else {
                // The broker does not answer (restarting?): look again later.
                state.expect_first = Some((expected, Instant::now()));
                continue;
            };
            if high > expected {
                state.expect_first = None;
                self.state.gaps.push(Gap {
                    partition,
                    expected,
                    found: None,
                    retry_at: None,
                });
            } else {
                // Nothing to read yet: keep watching from now.
                state.expect_first = Some((expected, Instant::now()));
            }
        }
        Ok(())
    }

    /// The first record of `partition` came at `found`, before the `expected` offset the
    /// worker positioned it at. When the partition holds the record before `expected`
    /// (the lake's last), the move back was a passing one: the partition is positioned
    /// again. When it ends before, the partition is shorter than the lake (a topic
    /// recreated under a running worker) and the worker stops, as it does at an
    /// assignment.
    fn position_moved_back(
        &mut self,
        partition: i32,
        expected: i64,
        found: Option<i64>,
    ) -> Result<MovedBack> {
        use crate::end_probe::{ProbeAnswer, probe_ends};
        let last_stored = expected - 1;
        let answer = probe_ends(
            &self.consumer.context().probe_config,
            &self.state.topic,
            &[(partition, last_stored)],
            Duration::from_secs(10),
        )
        .remove(&partition);
        match answer {
            Some(ProbeAnswer::RecordsFollow) => {
                tracing::warn!(
                    partition,
                    expected,
                    ?found,
                    "the broker moved the partition's position back; positioning it again"
                );
                if self.state.partitions.contains_key(&partition) {
                    self.reposition(partition, expected, true)?;
                }
                Ok(MovedBack::Repositioned)
            }
            Some(ProbeAnswer::EndReached) => Err(recreated(
                &self.state.topic,
                partition,
                last_stored,
                last_stored,
            )),
            Some(ProbeAnswer::PastEnd { end }) => {
                Err(recreated(&self.state.topic, partition, end, last_stored))
            }
            unknown => Ok(MovedBack::Unanswered(format!(
                "the broker moved partition {partition}'s position back (first record at \
                 {found:?}, asked {expected}) and does not say whether it holds the lake's \
                 offset {last_stored} ({})",
                match unknown {
                    Some(ProbeAnswer::Unknown(why)) => why,
                    _ => "no answer".to_owned(),
                }
            ))),
        }
    }

    /// A partition's first record after positioning came later than asked, or never
    /// came (earlier: see [`Worker::position_moved_back`]). If the broker still holds
    /// the missing records (its low watermark is not past them) it skipped them: Tansu
    /// 0.6 answers a fetch that starts inside a record batch with the next batch, or with
    /// nothing inside the last one. Re-read the partition from its start once; the lake
    /// offsets make the re-read write nothing twice. If the records are gone
    /// (retention), say so loudly and go on after them.
    fn handle_gaps(&mut self) -> Result<()> {
        // A gap the broker did not answer about waits a while (each question blocks the
        // poll loop for up to its timeout); its partition's records are not processed
        // meanwhile (`State::on_message`).
        let now = Instant::now();
        let (waiting, due): (Vec<Gap>, Vec<Gap>) = std::mem::take(&mut self.state.gaps)
            .into_iter()
            .partition(|gap| gap.retry_at.is_some_and(|at| now < at));
        self.state.gaps = waiting;
        let mut gaps = due.into_iter();
        while let Some(gap) = gaps.next() {
            let Gap {
                partition,
                expected,
                found,
                ..
            } = gap;
            // Set when the gap goes back, after the questions (each may take 10 s).
            let retry_later = |gap: Gap| Gap {
                retry_at: Some(Instant::now() + GAPS_RETRY_AFTER),
                ..gap
            };
            let answer = self
                .consumer
                .fetch_watermarks(&self.state.topic, partition, Duration::from_secs(10))
                .map_err(Error::kafka(format!("watermarks of partition {partition}")));
            let Some((low, _)) = self.broker_may_be_away(answer)? else {
                // The broker does not answer (restarting?): the gaps wait for it.
                self.state.gaps.push(retry_later(gap));
                self.state.gaps.extend(gaps.map(retry_later));
                return Ok(());
            };
            if found.is_some_and(|found| found < expected) {
                let give_up = self.state.options.give_up_after();
                match self.position_moved_back(partition, expected, found)? {
                    MovedBack::Repositioned => {
                        self.moved_back_probe.remove(&partition);
                    }
                    MovedBack::Unanswered(why) => {
                        // Ask again later; a batch run gives up after its stall timeout.
                        self.moved_back_probe
                            .entry(partition)
                            .or_default()
                            .unanswered(&why, give_up)?;
                        self.state.gaps.push(retry_later(gap));
                    }
                }
                continue;
            }
            let Some(state) = self.state.partitions.get_mut(&partition) else {
                continue;
            };
            // A first record later than asked: offsets without records (a transactional
            // producer's markers) look the same as records a broker skipped. Ask for the
            // record before, which the lake holds: a broker that serves it serves exact
            // offsets, and nothing needs re-reading (costs one record, not the partition).
            let before = expected - 1;
            if let Some(found) = found
                && state.probing.is_none()
                && !state.repaired
                && before >= low
            {
                state.probing = Some((expected, found));
                self.reposition(partition, before, true)?;
                continue;
            }
            // The probe's record did not come either: the broker skips records.
            let probed = state.probing.take();
            let restart = if low <= expected && !state.repaired {
                tracing::warn!(
                    partition,
                    expected,
                    ?found,
                    ?probed,
                    low,
                    "the broker skipped records it holds; re-reading the partition from its start"
                );
                state.repaired = true;
                metrics::counter!(names::OFFSET_GAPS, "outcome" => "repaired").increment(1);
                self.state.report.gaps_repaired += 1;
                low
            } else {
                let resume = found.unwrap_or(low).max(low);
                let lost = (resume - expected).max(0);
                tracing::error!(
                    partition,
                    expected,
                    ?found,
                    low,
                    lost,
                    "records are gone from the broker before they were read (retention?); continuing after them"
                );
                metrics::counter!(names::OFFSET_GAPS, "outcome" => "lost").increment(1);
                metrics::counter!(names::RECORDS_LOST).increment(lost as u64);
                self.state.report.records_lost_on_broker += lost as u64;
                resume
            };
            // A re-read from before the asked offset is the worker's own move back: its
            // first records are replays, not a position the broker moved back (taken for
            // that, the partition was positioned at the skipping offset again, and the
            // records after it were given up as lost). Unwatched after records gone too:
            // a watch there made a partition that holds only markers after the resume
            // point a gap every few seconds, and a batch run never ended.
            self.reposition(partition, restart, false)?;
        }
        Ok(())
    }

    /// Positions `partition` at `offset`. It is no longer at its end (until it reports
    /// the end again), and with `watch_first` its first record must come exactly there
    /// (else it is a gap again).
    fn reposition(&mut self, partition: i32, offset: i64, watch_first: bool) -> Result<()> {
        self.consumer
            .seek(
                &self.state.topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )
            .map_err(Error::kafka(format!(
                "seek partition {partition} to {offset}"
            )))?;
        if let Some(state) = self.state.partitions.get_mut(&partition) {
            state.at_end = false;
            state.next = Some(offset);
            state.expect_first = watch_first.then(|| (offset, Instant::now()));
        }
        Ok(())
    }

    /// The lake's stored offsets on every partition of the topic against the broker's
    /// ends.
    fn topic_lag(&self) -> Result<TopicLag> {
        let topic = &self.state.topic;
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(Error::kafka("topic metadata"))?;
        let described = metadata.topics().iter().find(|t| t.name() == topic);
        let partitions: Vec<i32> = described
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        // A topic without partitions, or with an error, is a broker not ready (just
        // restarted, a leader moving), never a topic the lake holds all of.
        if partitions.is_empty() {
            return Err(Error::Kafka {
                context: format!("partitions of topic {topic}"),
                source: KafkaError::MetadataFetch(
                    described
                        .and_then(|t| t.error())
                        .map_or(RDKafkaErrorCode::UnknownTopicOrPartition, Into::into),
                ),
            });
        }
        // The events table's offsets alone: every flush commits its dead letters first,
        // then its events with the same progress, so a dead-letter offset past the events
        // offset is a flush caught between its two commits, not stored data.
        let events = {
            let mut sink = self
                .state
                .sink
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let sink = &mut *sink;
            self.state
                .handle
                .block_on(sink.events.committed_offsets(&partitions))?
        };
        let mut lag = TopicLag::default();
        for (i, &p) in partitions.iter().enumerate() {
            let stored = events[i];
            // A partition of this worker's that it read to its end and flushed: the end
            // is where it stopped reading, no broker query needed.
            let read_to = self
                .state
                .partitions
                .get(&p)
                .filter(|s| s.known_at_end() && s.last_buffered.is_none())
                .and_then(|s| s.next);
            let (low, end) = match read_to {
                // Read to its end here: the lake must hold everything before it.
                Some(end) => (0, end),
                None => watermarks(&self.consumer, topic, p, Duration::from_secs(10))
                    .map_err(Error::kafka(format!("watermarks of partition {p}")))?,
            };
            let end = match (read_to, self.record_seen_at.get(&p)) {
                (None, Some(&seen)) => end.max(seen + 1),
                _ => end,
            };
            lag.partitions.push(PartitionLag {
                partition: p,
                stored,
                low,
                end,
                read_here: read_to.is_some(),
            });
        }
        Ok(lag)
    }

    /// Whether the lake holds the whole topic, for a batch run about to end. The
    /// partitions this worker read to their end count by where it stopped reading; every
    /// other one is asked through the fetch path whether a record follows the stored
    /// offset ([`crate::end_probe`]), whatever the queried end says: a ListOffsets
    /// answer can be too low (Tansu on S3; a batch run then ended with records unread)
    /// or count offsets without records (transaction markers, which would make a batch
    /// run wait for records that never come). After records were found, the next probe
    /// waits [`PROBE_AGAIN_AFTER`]. A partition that ends before the lake's offsets is
    /// refused as recreated, as at an assignment.
    fn topic_stored(&mut self, lag: &TopicLag) -> Result<bool> {
        if lag
            .partitions
            .iter()
            .any(|p| p.read_here && p.waiting() > 0)
        {
            return Ok(false);
        }
        if self
            .records_follow_at
            .is_some_and(|at| at.elapsed() < PROBE_AGAIN_AFTER)
        {
            return Ok(false);
        }
        use crate::end_probe::{ProbeAnswer, probe_ends};
        let unread: Vec<(i32, i64)> = lag
            .partitions
            .iter()
            .filter(|p| !p.read_here)
            .map(|p| {
                (
                    p.partition,
                    p.stored.map_or(p.low, |last| (last + 1).max(p.low)),
                )
            })
            .collect();
        let answers = probe_ends(
            &self.consumer.context().probe_config,
            &self.state.topic,
            &unread,
            Duration::from_secs(10),
        );
        let mut stored = true;
        for (partition, from) in unread {
            match answers.get(&partition) {
                Some(ProbeAnswer::EndReached) => {
                    // What the probe sees now replaces what an earlier probe saw.
                    self.record_seen_at.remove(&partition);
                }
                Some(ProbeAnswer::RecordsFollow) => {
                    let queried_none = lag
                        .partitions
                        .iter()
                        .any(|p| p.partition == partition && p.waiting() == 0);
                    if queried_none {
                        tracing::warn!(
                            partition,
                            from,
                            "records follow the lake's offsets although the broker's queried end says none do; waiting for them"
                        );
                    }
                    // From now on the lag counts them (and the stall watch sees them).
                    self.record_seen_at.insert(partition, from);
                    stored = false;
                }
                Some(ProbeAnswer::PastEnd { end }) => {
                    // The partition ends before offsets the lake holds (the probe's
                    // fetched end stood below them and the broker's queried end agreed):
                    // far before, it is not the one they were read from, refused as at
                    // an assignment. Within a batch of them, or with nothing stored, it
                    // counts as waiting: a batch run then fails after its stall timeout.
                    let lake_offset = lag
                        .partitions
                        .iter()
                        .find(|p| p.partition == partition)
                        .and_then(|p| p.stored);
                    if let Some(last) = lake_offset {
                        check_offsets_continue(&self.state.topic, partition, last, *end)?;
                    }
                    tracing::warn!(
                        partition,
                        from,
                        end,
                        ?lake_offset,
                        "the partition ends before the lake's offsets; counting it as waiting"
                    );
                    self.record_seen_at.insert(partition, from);
                    stored = false;
                }
                unknown => {
                    tracing::warn!(
                        partition,
                        from,
                        why = ?unknown,
                        "cannot confirm that the lake holds the partition's end; counting it as waiting"
                    );
                    // Waiting, so a batch run that never learns fails after its stall
                    // timeout instead of probing forever.
                    self.record_seen_at.insert(partition, from);
                    stored = false;
                }
            }
        }
        if !stored {
            self.records_follow_at = Some(Instant::now());
        }
        Ok(stored)
    }

    /// Acts on a look at the topic while this worker reads none of its waiting records:
    /// after [`crate::group::STALL_REPORT_AFTER`] without progress it says what it sees,
    /// after longer than healthy members take between commits it also rejoins, and a
    /// batch run fails after its stall timeout.
    fn watch_stall(&mut self, lag: &TopicLag) -> Result<()> {
        use crate::group::StallAction;
        let now = Instant::now();
        let give_up = self.state.options.give_up_after();
        // Twice the flush age and half a minute for the commit and silver's refresh: a
        // member that flushes on time has moved the lake by then.
        let flush_age = Duration::from_millis(self.state.options.config.flush.max_age_ms);
        let rejoin_after =
            (2 * flush_age + Duration::from_secs(30)).max(crate::group::STALL_REPORT_AFTER);
        let action = self
            .stall
            .observe(now, lag.waiting(), lag.stored(), rejoin_after, give_up);
        if action == StallAction::Wait {
            return Ok(());
        }
        let group = self.describe_group();
        let own: Vec<i32> = self.state.partitions.keys().copied().collect();
        let stalled_for = self.stall.stalled_for(now);
        if action == StallAction::GiveUp {
            return Err(Error::Stalled(format!(
                "{} records of topic {} have waited {} s with nothing storing them \
                 (this worker's partitions: {own:?}; group {}: {group}; lake vs broker: {lag}); \
                 check the group's members (a crashed worker holds its partitions until its \
                 session expires) and the broker, then run again",
                lag.waiting(),
                self.state.topic,
                stalled_for.as_secs(),
                self.state.options.config.kafka.group,
            )));
        }
        let rejoin = action == StallAction::Rejoin;
        tracing::warn!(
            waiting = lag.waiting(),
            stalled_s = stalled_for.as_secs(),
            own_partitions = ?own,
            group = %group,
            lake_vs_broker = %lag,
            rejoin,
            "records wait in the topic and nothing stores them{}",
            if rejoin { "; rejoining the group" } else { "" }
        );
        if rejoin { self.rejoin() } else { Ok(()) }
    }

    /// See [`BrokerWatch::answer`].
    fn broker_may_be_away<T>(&mut self, answer: Result<T>) -> Result<Option<T>> {
        let give_up = self.state.options.give_up_after();
        self.broker.answer(answer, give_up)
    }

    /// The coordinator's view of the group, for a report.
    fn describe_group(&self) -> String {
        let group_id = &self.state.options.config.kafka.group;
        match self
            .consumer
            .fetch_group_list(Some(group_id), Duration::from_secs(5))
        {
            Err(error) => format!("not described ({error})"),
            Ok(groups) => match groups.groups().iter().find(|g| g.name() == group_id) {
                None => "not listed by the coordinator".to_owned(),
                Some(info) => {
                    let members: Vec<&str> = info.members().iter().map(|m| m.id()).collect();
                    let own = members
                        .iter()
                        .any(|m| crate::group::is_own_member(m, &self.client_id));
                    format!(
                        "state {}, {} members {members:?}, this worker {}",
                        info.state(),
                        members.len(),
                        if own { "among them" } else { "not among them" }
                    )
                }
            },
        }
    }

    /// Whether every assigned partition has been read to its end (buffered records
    /// included: the caller flushes them next).
    fn caught_up(&mut self) -> Result<bool> {
        // A partition with a gap to handle is positioned again first.
        if !self.state.gaps.is_empty() {
            return Ok(false);
        }
        if self
            .state
            .partitions
            .values()
            .any(PartitionState::still_reading)
        {
            return Ok(false);
        }
        let give_up = self.state.options.give_up_after();
        let mut suspicious = Vec::new();
        let mut done = true;
        for (&p, state) in &self.state.partitions {
            if state.known_at_end() {
                continue;
            }
            let answer = watermarks(
                &self.consumer,
                &self.state.topic,
                p,
                Duration::from_secs(10),
            )
            .map_err(Error::kafka(format!("watermarks of partition {p}")));
            let Some((low, high)) = self.broker.answer(answer, give_up)? else {
                return Ok(false);
            };
            let next = state.next.unwrap_or(low);
            // The position is past the broker's high watermark: impossible on a correct
            // broker. Tansu 0.6 reports the last record batch's base offset + 1 and
            // returns nothing for a fetch inside that batch, so a worker restarted in the
            // middle of it would see "the end" with records unread. Re-read the
            // partition once from its start; what the lake holds is skipped as replay.
            // Only before the first record after positioning: a worker that read up to
            // `next` itself has seen those records exist.
            if next > high && state.expect_first.is_some() && !state.repaired {
                tracing::warn!(
                    partition = p,
                    next,
                    high,
                    "position beyond the high watermark; re-reading the partition once to be sure"
                );
                suspicious.push(Gap {
                    partition: p,
                    expected: next,
                    found: None,
                    retry_at: None,
                });
                done = false;
                continue;
            }
            // A partition whose first record after positioning has not come is done
            // only once its end-of-partition came too (a queried end can be too low).
            if next < high || (state.expect_first.is_some() && !state.at_end) {
                done = false;
            }
        }
        if !suspicious.is_empty() {
            self.state.gaps.extend(suspicious);
            self.handle_gaps()?;
        }
        Ok(done)
    }

    /// Writes the buffer: dead letters, then events, then group offsets.
    fn flush(&mut self) -> Result<()> {
        let progress = |bases: fn(&Bases) -> Option<i64>| -> Vec<PartitionProgress> {
            self.state
                .partitions
                .iter()
                .filter_map(|(&partition, s)| {
                    s.last_buffered.map(|last_offset| PartitionProgress {
                        partition,
                        expected: bases(&s.bases),
                        last_offset,
                    })
                })
                .collect()
        };
        let event_progress = progress(|b| b.events);
        if event_progress.is_empty() {
            return Ok(());
        }
        // A replay may cover offsets the dead-letter table already holds; its version
        // must never move back, so such partitions are not part of its commit.
        let dead_progress: Vec<PartitionProgress> = progress(|b| b.dead_letters)
            .into_iter()
            .filter(|p| p.expected.is_none_or(|stored| p.last_offset > stored))
            .collect();
        let records = self.state.buffer.records;
        let accepted = self.state.buffer.events.len() as u64;
        let dead_batch = (!self.state.buffer.dead_letters.is_empty())
            .then(|| self.state.buffer.dead_letters.finish())
            .transpose()
            .map_err(|source| Error::Arrow {
                table: DEAD_LETTERS.name,
                source,
            })?;
        // Observed knowledge: stamped now, just before the rows are written, and stamped
        // again if the commit cannot make the deadline (see `commit_events`).
        let event_batch = (!self.state.buffer.events.is_empty())
            .then(|| self.state.buffer.events.finish(Utc::now()))
            .transpose()
            .map_err(|source| Error::Arrow {
                table: POS_EVENTS.name,
                source,
            })?;

        // The DLQ topic first: a crash or a fence after this publishes them again from
        // the replay (at least once); a dead letter the lake holds is always on the topic.
        self.publish_dead_letters()?;
        let sink = self.state.sink.clone();
        let mut sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(batch) = dead_batch {
            let staged = self.state.handle.block_on(async {
                sink.dead_letters.write(batch).await?;
                sink.dead_letters.stage().await
            })?;
            freeze::point(points::DEAD_LETTER_FILES);
            if !self.commit(
                &mut sink.dead_letters,
                DEAD_LETTERS.name,
                &staged,
                &dead_progress,
            )? {
                drop(sink);
                return self.fenced();
            }
            freeze::point(points::DEAD_LETTER_COMMIT);
            for p in &dead_progress {
                if let Some(state) = self.state.partitions.get_mut(&p.partition) {
                    state.bases.dead_letters = Some(p.last_offset);
                }
            }
        }
        if !self.commit_events(&mut sink.events, event_batch, &event_progress)? {
            drop(sink);
            return self.fenced();
        }
        drop(sink);
        freeze::point(points::EVENT_COMMIT);

        let mut offsets = TopicPartitionList::new();
        for p in &event_progress {
            if let Some(state) = self.state.partitions.get_mut(&p.partition) {
                tracing::debug!(
                    partition = p.partition,
                    expected = ?p.expected,
                    first = ?state.first_buffered,
                    last = p.last_offset,
                    "partition range committed"
                );
                state.bases.events = Some(p.last_offset);
                if let Some(marks) = &self.state.options.partition_watermarks {
                    marks.advance(p.partition, p.last_offset + 1);
                }
                state.first_buffered = None;
                state.last_buffered = None;
            }
            offsets
                .add_partition_offset(
                    &self.state.topic,
                    p.partition,
                    Offset::Offset(p.last_offset + 1),
                )
                .map_err(Error::kafka("build group offsets"))?;
        }
        if let Err(error) = self.consumer.commit(&offsets, CommitMode::Async) {
            // Group offsets only serve lag monitoring; the lake holds the truth.
            tracing::warn!(%error, "committing group offsets failed");
        }
        freeze::point(points::OFFSETS_COMMIT);
        freeze::point(points::AFTER_COMMIT_PENDING);
        self.after_commit();

        metrics::counter!(names::FLUSHES).increment(1);
        metrics::histogram!(names::FLUSH_RECORDS).record(records as f64);
        metrics::counter!(names::RECORDS_ACCEPTED).increment(accepted);
        if let Some(committed) = &self.state.options.committed {
            let dead: u64 = self.state.buffer.dead_by_reason.values().sum();
            committed.fetch_add(accepted + dead, Ordering::Relaxed);
        }
        for (reason, n) in &self.state.buffer.dead_by_reason {
            metrics::counter!(names::RECORDS_DEAD_LETTERED, "reason" => *reason).increment(*n);
            *self
                .state
                .report
                .dead_lettered
                .entry((*reason).to_owned())
                .or_default() += n;
        }
        self.state.report.accepted += accepted;
        self.state.report.flushes += 1;
        tracing::debug!(records, accepted, "flushed");
        self.state.buffer.clear();
        Ok(())
    }

    /// Runs the after-commit hook (the binary uses it to refresh `merchant_daily`).
    fn after_commit(&mut self) {
        if let Some(hook) = &self.state.options.after_commit {
            let started = Instant::now();
            hook(&self.state.lake, &self.state.handle);
            metrics::histogram!(names::AFTER_COMMIT_SECONDS)
                .record(started.elapsed().as_secs_f64());
        }
        self.state.last_after_commit = Instant::now();
    }

    /// Writes and commits the event rows (observed knowledge stamped at `knowledge_time`
    /// by [`EventRows::finish`](crate::EventRows::finish)); `false` when another worker
    /// owns a partition.
    ///
    /// The knowledge rule: the commit must become visible within the deadline of the
    /// stamp its rows carry, or a reader that already settled that instant would miss
    /// rows it should have seen. Before each attempt the worker checks the stamp's age
    /// and, past the deadline, stamps the rows again and writes new files (the old ones
    /// are never committed).
    fn commit_events(
        &self,
        writer: &mut OffsetWriter,
        batch: Option<RecordBatch>,
        progress: &[PartitionProgress],
    ) -> Result<bool> {
        let deadline = self
            .state
            .options
            .config
            .knowledge_rules()
            .commit_deadline();
        let stage = |writer: &mut OffsetWriter, batch: &Option<RecordBatch>| {
            self.state.handle.block_on(async {
                match batch {
                    Some(batch) => {
                        writer.write(batch.clone()).await?;
                        writer.stage().await
                    }
                    None => Ok(StagedFiles::default()),
                }
            })
        };
        let observed = batch.as_ref().is_some_and(|b| observed_stamp(b).is_some());
        let restamp = |batch: &Option<RecordBatch>, at: DateTime<Utc>| {
            batch
                .as_ref()
                .map(|b| crate::batch::restamp_observed(b, at))
                .transpose()
                .map_err(|source| Error::Arrow {
                    table: POS_EVENTS.name,
                    source,
                })
        };
        // Stamped (again) just before the files are written, so the dead-letter commit
        // before does not count against the deadline; its age is taken from both clocks,
        // so a wall-clock step back cannot hide a slow commit.
        let mut stamped = (Utc::now(), Instant::now());
        let mut batch = if observed {
            restamp(&batch, stamped.0)?
        } else {
            batch
        };
        let mut staged = stage(writer, &batch)?;
        freeze::point(points::EVENT_FILES);
        let started = Instant::now();
        let mut attempt = 0;
        let age = |stamped: (DateTime<Utc>, Instant)| {
            let wall = (Utc::now() - stamped.0).to_std().unwrap_or_default();
            wall.max(stamped.1.elapsed())
        };
        loop {
            if observed && age(stamped) > deadline.to_std().unwrap_or_default() {
                tracing::warn!(
                    stamped = %stamped.0,
                    age_ms = age(stamped).as_millis() as u64,
                    "the commit missed the knowledge deadline of its stamp; stamping the rows again"
                );
                metrics::counter!(names::KNOWLEDGE_RESTAMPS).increment(1);
                stamped = (Utc::now(), Instant::now());
                batch = restamp(&batch, stamped.0)?;
                staged = stage(writer, &batch)?;
                // Writing the files again took time too: check again before committing.
                continue;
            }
            match self.state.handle.block_on(writer.commit(&staged, progress)) {
                Ok(outcome) => {
                    metrics::histogram!(names::COMMIT_SECONDS, "table" => POS_EVENTS.name)
                        .record(started.elapsed().as_secs_f64());
                    if observed && age(stamped) > deadline.to_std().unwrap_or_default() {
                        // Visible too late: silver reports it when it finds the rows behind
                        // its horizon, and rebuilds.
                        tracing::error!(
                            stamped = %stamped.0,
                            age_ms = age(stamped).as_millis() as u64,
                            "a commit became visible after the knowledge deadline of its stamp; \
                             readers that settled that instant may have missed it (raise knowledge.settle_ms)"
                        );
                        metrics::counter!(names::KNOWLEDGE_LATE_COMMITS).increment(1);
                    }
                    return Ok(self.outcome(POS_EVENTS.name, &staged, outcome));
                }
                Err(error) if error.is_retryable() && attempt < 5 => {
                    attempt += 1;
                    tracing::warn!(%error, attempt, table = POS_EVENTS.name, "commit failed; retrying");
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Commits one table; `false` when another worker owns a partition.
    fn commit(
        &self,
        writer: &mut OffsetWriter,
        table: &'static str,
        staged: &StagedFiles,
        progress: &[PartitionProgress],
    ) -> Result<bool> {
        let started = Instant::now();
        let mut attempt = 0;
        let outcome = loop {
            match self.state.handle.block_on(writer.commit(staged, progress)) {
                Ok(outcome) => break outcome,
                Err(error) if error.is_retryable() && attempt < 5 => {
                    attempt += 1;
                    tracing::warn!(%error, attempt, table, "commit failed; retrying");
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
                Err(error) => return Err(error.into()),
            }
        };
        metrics::histogram!(names::COMMIT_SECONDS, "table" => table)
            .record(started.elapsed().as_secs_f64());
        Ok(self.outcome(table, staged, outcome))
    }

    /// Logs and counts a commit's outcome; `false` when another worker owns a partition.
    fn outcome(&self, table: &'static str, staged: &StagedFiles, outcome: CommitOutcome) -> bool {
        match outcome {
            CommitOutcome::Committed { version } => {
                metrics::counter!(names::FILES_WRITTEN, "table" => table)
                    .increment(staged.files() as u64);
                tracing::debug!(table, version, files = staged.files(), "committed");
                true
            }
            CommitOutcome::Fenced {
                app_id,
                expected,
                found,
            } => {
                tracing::warn!(
                    table,
                    app_id,
                    ?expected,
                    ?found,
                    "another worker committed this partition; dropping the buffer"
                );
                false
            }
        }
    }

    /// Another worker moved our partitions: drop everything and restart them from the lake.
    fn fenced(&mut self) -> Result<()> {
        metrics::counter!(names::FENCED).increment(1);
        self.state.report.fenced += 1;
        self.state.report.dropped_on_rebalance += self.state.buffer.clear() as u64;
        self.state.discard_staged();
        // The partitions start again where the lake says: gaps found under the old
        // positions, and the watch over their probes, no longer apply.
        self.state.gaps.clear();
        self.moved_back_probe.clear();
        let partitions: Vec<i32> = self.state.partitions.keys().copied().collect();
        let bases = {
            let mut sink = self
                .state
                .sink
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.state.handle.block_on(sink.bases(&partitions))?
        };
        let mut tpl = TopicPartitionList::new();
        for (&p, base) in partitions.iter().zip(&bases) {
            let start = base
                .events
                .map_or(Offset::Beginning, |last| Offset::Offset(last + 1));
            tpl.add_partition_offset(&self.state.topic, p, start)
                .map_err(Error::kafka("build assignment"))?;
            self.state
                .partitions
                .insert(p, PartitionState::starting_at(*base));
        }
        self.consumer
            .assign(&tpl)
            .map_err(Error::kafka("reassign after fence"))?;
        Ok(())
    }

    /// Publishes the buffered dead letters to the DLQ topic and waits until the brokers
    /// acknowledged every one; any failure fails the flush (nothing is committed, and the
    /// restarted worker reads and publishes them again).
    fn publish_dead_letters(&mut self) -> Result<()> {
        let Some((producer, topic)) = &self.state.dlq else {
            return Ok(());
        };
        let letters = self.state.buffer.dlq.len() as u64;
        if letters == 0 {
            return Ok(());
        }
        let delivered_before = producer.context().delivered.load(Ordering::Relaxed);
        for letter in &self.state.buffer.dlq {
            let partition = letter.partition.to_string();
            let offset = letter.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "streetflow.reason",
                    value: Some(letter.reason),
                })
                .insert(Header {
                    key: "streetflow.detail",
                    value: Some(letter.detail.as_str()),
                })
                .insert(Header {
                    key: "streetflow.source.topic",
                    value: Some(self.state.topic.as_str()),
                })
                .insert(Header {
                    key: "streetflow.source.partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "streetflow.source.offset",
                    value: Some(offset.as_str()),
                });
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
                .payload(letter.payload.as_slice())
                .headers(headers);
            if let Some(key) = &letter.key {
                record = record.key(key);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    // The local queue is full: let deliveries drain it, then again.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        producer.poll(Duration::from_millis(100));
                        record = back;
                    }
                    Err((error, _)) => {
                        return Err(Error::Kafka {
                            context: format!("publishing a dead letter to the DLQ topic {topic}"),
                            source: error,
                        });
                    }
                }
            }
        }
        producer
            .flush(Duration::from_secs(60))
            .map_err(Error::kafka(format!(
                "waiting for the DLQ topic {topic} to acknowledge {letters} dead letters"
            )))?;
        if let Some(error) = producer.context().take_failure() {
            return Err(Error::Kafka {
                context: format!("delivering dead letters to the DLQ topic {topic}"),
                source: error,
            });
        }
        let delivered = producer.context().delivered.load(Ordering::Relaxed) - delivered_before;
        if delivered < letters {
            return Err(Error::Config(format!(
                "the DLQ topic {topic} acknowledged {delivered} of {letters} dead letters"
            )));
        }
        self.state.buffer.dlq.clear();
        Ok(())
    }
}

/// Counts the DLQ producer's acknowledged deliveries and keeps its first failure.
#[derive(Default)]
struct DlqContext {
    delivered: AtomicU64,
    failure: Mutex<Option<KafkaError>>,
}

impl DlqContext {
    fn take_failure(&self) -> Option<KafkaError> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl ClientContext for DlqContext {}

impl ProducerContext for DlqContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, _)) => {
                let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
                failure.get_or_insert_with(|| error.clone());
            }
        }
    }
}

/// Whether the broker answers. A broker query that failed is no reason to stop a
/// worker: a broker restarts, a leader moves, and librdkafka reconnects by itself. The
/// failure is logged (at most every ten seconds) and the caller asks again later; a
/// batch run fails once the broker has not answered for its stall timeout. Any other
/// error stands.
#[derive(Debug, Default)]
struct BrokerWatch {
    last_warning: Option<Instant>,
    away_since: Option<Instant>,
}

impl BrokerWatch {
    fn answer<T>(&mut self, answer: Result<T>, give_up: Option<Duration>) -> Result<Option<T>> {
        match answer {
            Ok(value) => {
                self.away_since = None;
                Ok(Some(value))
            }
            Err(error @ Error::Kafka { .. }) => {
                self.unanswered(&error, give_up)?;
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// One more question the broker did not answer (`why`): logged at most every ten
    /// seconds; an error once it has lasted `give_up`.
    fn unanswered(&mut self, why: &dyn std::fmt::Display, give_up: Option<Duration>) -> Result<()> {
        let since = *self.away_since.get_or_insert_with(Instant::now);
        if let Some(limit) = give_up
            && since.elapsed() >= limit
        {
            return Err(Error::Stalled(format!(
                "the broker has not answered for {} s: {why}",
                since.elapsed().as_secs()
            )));
        }
        if self
            .last_warning
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.last_warning = Some(Instant::now());
            tracing::warn!(%why, "the broker does not answer; trying again");
        }
        Ok(())
    }
}

/// Where the lake stands on one partition of the topic.
#[derive(Debug, Clone, Copy)]
struct PartitionLag {
    partition: i32,
    /// Last offset in the lake.
    stored: Option<i64>,
    /// The broker's low watermark (0 for a partition read to its end here).
    low: i64,
    /// The broker's high watermark.
    end: i64,
    /// Read to its end by this worker (`end` is where it stopped reading, not a query).
    read_here: bool,
}

impl PartitionLag {
    /// Records the broker holds that the lake does not.
    fn waiting(&self) -> u64 {
        let next = self
            .stored
            .map_or(self.low, |last| (last + 1).max(self.low));
        u64::try_from(self.end - next).unwrap_or(0)
    }
}

/// Where the lake stands on the whole topic.
#[derive(Debug, Clone, Default)]
struct TopicLag {
    partitions: Vec<PartitionLag>,
}

impl TopicLag {
    /// Records the broker holds that the lake does not.
    fn waiting(&self) -> u64 {
        self.partitions.iter().map(PartitionLag::waiting).sum()
    }

    /// The sum of the stored offsets: it grows whenever any worker commits.
    fn stored(&self) -> i64 {
        self.partitions
            .iter()
            .map(|p| p.stored.map_or(0, |last| last.saturating_add(1)))
            .fold(0, i64::saturating_add)
    }
}

impl std::fmt::Display for TopicLag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for p in &self.partitions {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            match p.stored {
                Some(last) => write!(f, "p{} {}/{}", p.partition, last + 1, p.end)?,
                None => write!(f, "p{} none/{}", p.partition, p.end)?,
            }
        }
        Ok(())
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
