//! Whether partitions hold records from given offsets on, asked through the fetch path.
//!
//! ListOffsets is not always right (Tansu 0.6 on S3 answers "latest" far below the end),
//! and it counts offsets that hold no record (transaction markers, aborted records). A
//! fetch is what consumers live by: one short-lived consumer outside the worker's group
//! is positioned at each offset and reports what the fetches show. A delivered record
//! proves that records follow; an end of partition proves that none do, once a later
//! statistics sample shows it came from a successful response (librdkafka also signals
//! one for an error response whose end equals the fetch position).
//!
//! Tansu 0.6 answers some fetches with neither: one that starts inside the last record
//! batch, or past the partition's end, gets no records and no error. There the ends its
//! fetch responses carry decide: an end past the offset that stays without an end of
//! partition for [`END_GRACE`] means records follow (a transaction marker would have
//! been skipped to the end within that time), and a high watermark below the offset
//! means the partition is shorter. Anything else is [`ProbeAnswer::Unknown`], and
//! callers must not read it as either.
//!
//! The judgement ([`EndJudge`]) is kept apart from the consumer that feeds it, so its
//! rules are tested without a broker: evidence that records follow must stand while the
//! fetch position stays put (a client still skipping markers moves it), and a shorter
//! partition must stand for the grace and be confirmed by the broker's queried end (one
//! statistics sample taken from an error response during a restart says 0).

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

/// How long the evidence must stand before it counts: an end past the offset, from the
/// fetch responses, without an end of partition and with the fetch position unmoved
/// (records follow); or a fetched end below the offset (a shorter partition, then also
/// asked of the broker).
pub const END_GRACE: Duration = Duration::from_secs(1);

/// What one partition's fetch responses carried, from librdkafka's statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchedEnds {
    /// Last stable offset: where a `read_committed` reader's records end (highest seen).
    pub last_stable: i64,
    /// High watermark (highest seen).
    pub high: i64,
    /// Where the client fetches next (latest sample): it moves while the client skips
    /// offsets without records (transaction markers, aborted records).
    pub next_fetch: i64,
}

impl FetchedEnds {
    /// One statistics sample of a partition, if it comes from a fetch response that
    /// succeeded: before the first response the ends are negative, and an error response
    /// (Tansu answers "unknown topic" while it restarts) carries a high watermark of 0
    /// with a log start of -1, which a successful response never has.
    pub fn from_sample(
        log_start: i64,
        high: i64,
        last_stable: i64,
        next_fetch: i64,
    ) -> Option<Self> {
        (log_start >= 0 && high >= 0).then_some(Self {
            last_stable,
            high,
            next_fetch,
        })
    }

    /// Folds a newer sample in: the ends only grow (a sample from an error response
    /// says less, not that the partition shrank), the fetch position is the latest.
    fn merge(&mut self, newer: FetchedEnds) {
        self.last_stable = self.last_stable.max(newer.last_stable);
        self.high = self.high.max(newer.high);
        self.next_fetch = newer.next_fetch;
    }
}

/// The latest statistics sample of one partition, whatever response it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatestSample {
    /// Which statistics callback it came with (counted from 1).
    pub number: u64,
    /// The log start: negative before the first response and on error responses.
    pub log_start: i64,
    /// The last stable offset (the end a `read_committed` reader's fetch stops at).
    pub last_stable: i64,
    /// Where the client fetches next.
    pub next_fetch: i64,
    /// The client fetches the partition no more (librdkafka's fetch state `none`): after
    /// an offset out of range, with `auto.offset.reset=error`, on this partition.
    pub fetch_stopped: bool,
}

/// Statistics callbacks after an end of partition before its sample is trusted to have
/// been taken after it (one may have been under way when the end came).
const SAMPLES_AFTER_END: u64 = 2;

/// The rules of one probe, fed with what the consumer reports. It answers a partition
/// once the evidence holds and never from a single sample.
#[derive(Debug)]
pub struct EndJudge {
    /// The offset asked about, per partition (never negative: librdkafka reads negative
    /// offsets as logical ones, -1 being the end).
    from: BTreeMap<i32, i64>,
    answers: BTreeMap<i32, ProbeAnswer>,
    /// Since when the fetched end has stood past the offset, and at which fetch position.
    follow_since: BTreeMap<i32, (Instant, i64)>,
    /// Since when the fetched end has stood below the offset.
    shorter_since: BTreeMap<i32, Instant>,
    /// The queried end of a partition below its offset after the broker called an offset
    /// out of range, and the statistics callbacks counted then: a shorter partition once
    /// a later sample shows the client stopped fetching it (the error was about this
    /// partition), or its fetched end agrees for the grace.
    out_of_range_end: BTreeMap<i32, (i64, u64)>,
    /// Ends of partition waiting for a statistics sample to show they came from a
    /// successful response: the statistics callbacks counted when each came.
    end_pending: BTreeMap<i32, u64>,
}

impl EndJudge {
    /// A judge for `(partition, offset)` pairs; an offset below 0 is asked as 0.
    pub fn new(partitions: &[(i32, i64)]) -> Self {
        Self {
            from: partitions.iter().map(|&(p, o)| (p, o.max(0))).collect(),
            answers: BTreeMap::new(),
            follow_since: BTreeMap::new(),
            shorter_since: BTreeMap::new(),
            out_of_range_end: BTreeMap::new(),
            end_pending: BTreeMap::new(),
        }
    }

    /// The partitions and the offsets asked about.
    pub fn asked(&self) -> &BTreeMap<i32, i64> {
        &self.from
    }

    /// Whether every partition has its answer.
    pub fn done(&self) -> bool {
        self.answers.len() >= self.from.len()
    }

    /// The partitions still without an answer, with their offsets.
    pub fn open(&self) -> Vec<(i32, i64)> {
        self.from
            .iter()
            .filter(|(p, _)| !self.answers.contains_key(p))
            .map(|(&p, &o)| (p, o))
            .collect()
    }

    /// A record came at `offset`; `true` when it answers the partition (stop fetching it).
    pub fn record(&mut self, partition: i32, offset: i64) -> bool {
        if self.from.get(&partition).is_some_and(|&o| offset >= o) {
            self.answers
                .entry(partition)
                .or_insert(ProbeAnswer::RecordsFollow);
            return true;
        }
        false
    }

    /// An end of partition came when `samples` statistics callbacks had come. It
    /// answers once a later sample shows a successful response that ends where the
    /// client fetches ([`EndJudge::confirm_ends`]): librdkafka signals an end whenever a
    /// response's end equals the fetch position, error responses included (Tansu's
    /// "unknown topic" while it restarts ends at 0). The client may have skipped offsets
    /// without records to get there, so the end need not be the asked offset.
    pub fn end_of_partition(&mut self, partition: i32, samples: u64) {
        if self.from.contains_key(&partition) && !self.answers.contains_key(&partition) {
            self.end_pending.entry(partition).or_insert(samples);
        }
    }

    /// Settles the pending ends of partition by the latest statistics samples taken
    /// after them: one from a successful response ending where the client fetches
    /// confirms the end; one from a successful response ending elsewhere drops it (the
    /// partition is judged on); error responses leave it pending.
    pub fn confirm_ends(&mut self, latest: &BTreeMap<i32, LatestSample>) {
        // A partition the client stopped fetching after an out-of-range error, whose
        // queried end lies below the offset: the error was about it, and it is shorter.
        for (&partition, &(queried, at)) in &self.out_of_range_end {
            if self.answers.contains_key(&partition) {
                continue;
            }
            if latest
                .get(&partition)
                .is_some_and(|s| s.number >= at + SAMPLES_AFTER_END && s.fetch_stopped)
            {
                self.answers
                    .insert(partition, ProbeAnswer::PastEnd { end: queried });
            }
        }
        let answers = &mut self.answers;
        self.end_pending.retain(|partition, &mut at| {
            let Some(sample) = latest
                .get(partition)
                .filter(|s| s.number >= at + SAMPLES_AFTER_END && s.log_start >= 0)
            else {
                return true;
            };
            if sample.last_stable == sample.next_fetch {
                answers.entry(*partition).or_insert(ProbeAnswer::EndReached);
            }
            false
        });
    }

    /// The broker called an offset out of range (its error does not say of which
    /// partition) when `samples` statistics callbacks had come, and answered a watermark
    /// query with `(low, high)` for `partition`. Below the start, every record follows.
    /// Past the end, the partition is shorter once the statistics agree (see
    /// [`EndJudge::confirm_ends`] and [`EndJudge::fetched`]): the query alone can answer
    /// too low, and may be about a partition the error was not.
    pub fn out_of_range(&mut self, partition: i32, low: i64, high: i64, samples: u64) {
        let Some(&offset) = self.from.get(&partition) else {
            return;
        };
        if self.answers.contains_key(&partition) {
            return;
        }
        if offset < low && high > low {
            self.answers.insert(partition, ProbeAnswer::RecordsFollow);
        } else if offset > high {
            self.out_of_range_end.insert(partition, (high, samples));
        }
    }

    /// What the fetch responses carried, at `now`. Returns the partitions whose fetched
    /// end has stood below the offset for the grace: ask the broker for their end and
    /// pass it to [`EndJudge::confirm_shorter`].
    pub fn fetched(&mut self, ends: &BTreeMap<i32, FetchedEnds>, now: Instant) -> Vec<i32> {
        let mut to_confirm = Vec::new();
        for (&partition, &offset) in &self.from {
            if self.answers.contains_key(&partition) {
                continue;
            }
            let Some(fetched) = ends.get(&partition) else {
                continue;
            };
            if offset > fetched.high {
                self.follow_since.remove(&partition);
                let since = *self.shorter_since.entry(partition).or_insert(now);
                if now.duration_since(since) < END_GRACE {
                    continue;
                }
                if let Some(&(queried, _)) = self.out_of_range_end.get(&partition) {
                    // The broker's error, its queried end and its fetched end agree.
                    let end = queried.max(fetched.high);
                    self.answers.insert(partition, ProbeAnswer::PastEnd { end });
                } else {
                    to_confirm.push(partition);
                }
            } else if fetched.last_stable > offset.max(fetched.next_fetch) {
                // Records past both the offset and where the client fetches (a client
                // that skipped markers to the end fetches at it: nothing follows).
                self.shorter_since.remove(&partition);
                let (since, position) = self
                    .follow_since
                    .entry(partition)
                    .or_insert((now, fetched.next_fetch));
                if *position != fetched.next_fetch {
                    // Still moving (skipping offsets without records): wait on.
                    *since = now;
                    *position = fetched.next_fetch;
                } else if now.duration_since(*since) >= END_GRACE {
                    self.answers.insert(partition, ProbeAnswer::RecordsFollow);
                }
            } else {
                self.follow_since.remove(&partition);
                self.shorter_since.remove(&partition);
            }
        }
        to_confirm
    }

    /// The broker's queried end of a partition whose fetched end stood below the offset:
    /// both below makes it shorter; a queried end at or past the offset leaves it open
    /// (the fetched sample was wrong), to be judged again after another grace.
    pub fn confirm_shorter(&mut self, partition: i32, queried_high: i64, fetched_high: i64) {
        let Some(&offset) = self.from.get(&partition) else {
            return;
        };
        if self.answers.contains_key(&partition) {
            return;
        }
        self.shorter_since.remove(&partition);
        if offset > queried_high {
            let end = queried_high.max(fetched_high);
            self.answers.insert(partition, ProbeAnswer::PastEnd { end });
        }
    }

    /// The broker did not answer the query for a partition [`EndJudge::fetched`] found
    /// due: it is due again after another grace.
    pub fn confirm_failed(&mut self, partition: i32) {
        self.shorter_since.remove(&partition);
    }

    /// The answers, with `why_unknown` for every partition still open.
    pub fn finish(mut self, why_unknown: &str) -> BTreeMap<i32, ProbeAnswer> {
        for &partition in self.from.keys() {
            self.answers
                .entry(partition)
                .or_insert_with(|| ProbeAnswer::Unknown(why_unknown.to_owned()));
        }
        self.answers
    }
}

/// The probe's client context: collects the ends the fetch responses carry, and keeps
/// quiet about the ends of partitions and offset resets the probe provokes on purpose
/// (rdkafka's default logs each one as an error).
struct ProbeContext {
    topic: String,
    seen: Mutex<Seen>,
}

/// What the statistics callbacks showed so far.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// Callbacks so far.
    samples: u64,
    /// The ends of successful responses, folded together.
    ends: BTreeMap<i32, FetchedEnds>,
    /// The latest sample of every partition.
    latest: BTreeMap<i32, LatestSample>,
}

impl ProbeContext {
    /// What the statistics showed so far.
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Statistics callbacks so far.
    fn samples(&self) -> u64 {
        self.seen().samples
    }
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka (end probe)");
    }

    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut seen = self.seen();
        seen.samples += 1;
        let number = seen.samples;
        for (&partition, p) in &topic.partitions {
            // -1 is librdkafka's "unassigned partition" entry.
            if partition < 0 {
                continue;
            }
            seen.latest.insert(
                partition,
                LatestSample {
                    number,
                    log_start: p.lo_offset,
                    last_stable: p.ls_offset,
                    next_fetch: p.next_offset,
                    fetch_stopped: p.fetch_state == "none",
                },
            );
            if let Some(sample) =
                FetchedEnds::from_sample(p.lo_offset, p.hi_offset, p.ls_offset, p.next_offset)
            {
                seen.ends
                    .entry(partition)
                    .and_modify(|ends| ends.merge(sample))
                    .or_insert(sample);
            }
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// How long one watermark query of the probe may take at most (the deadline may cut it
/// shorter).
const WATERMARK_QUERY: Duration = Duration::from_secs(3);

/// Probes each `(partition, offset)` of `topic` at once; every partition gets an answer
/// within about `timeout`. `base` is the worker's consumer configuration (brokers,
/// security, isolation level); the probe uses a group name of its own derived from the
/// worker's (it only assigns, so it never joins or touches the worker's group) and
/// commits nothing. An offset below 0 is asked as 0.
pub fn probe_ends(
    base: &ClientConfig,
    topic: &str,
    partitions: &[(i32, i64)],
    timeout: Duration,
) -> BTreeMap<i32, ProbeAnswer> {
    let mut judge = EndJudge::new(partitions);
    if partitions.is_empty() {
        return judge.finish("");
    }
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
        seen: Mutex::new(Seen::default()),
    };
    let consumer: BaseConsumer<ProbeContext> = match config.create_with_context(context) {
        Ok(consumer) => consumer,
        Err(error) => return judge.finish(&format!("cannot create the probe consumer: {error}")),
    };
    let mut tpl = TopicPartitionList::new();
    for (&partition, &offset) in judge.asked() {
        if let Err(error) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset)) {
            return judge.finish(&format!("cannot position the probe: {error}"));
        }
    }
    if let Err(error) = consumer.assign(&tpl) {
        return judge.finish(&format!("cannot assign the probe: {error}"));
    }
    let deadline = Instant::now() + timeout;
    // A watermark query bounded by what is left of the probe's time.
    let query_watermarks = |partition: i32| {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        consumer
            .fetch_watermarks(topic, partition, left.min(WATERMARK_QUERY))
            .ok()
    };
    let mut last_error = None;
    while !judge.done() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(50)) {
            // Enough of this partition once it answers: fetch no more of it.
            Some(Ok(message)) if judge.record(message.partition(), message.offset()) => {
                let _ = consumer.pause(&single(topic, message.partition()));
            }
            Some(Ok(_)) => {}
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                let samples = consumer.context().samples();
                judge.end_of_partition(partition, samples);
            }
            // An offset outside the partition (this error does not say which one): the
            // partitions still open are judged by their watermarks. Below the start,
            // every record follows; past the end, the lake holds offsets the broker does
            // not (never "stored").
            Some(Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange,
            ))) => {
                let samples = consumer.context().samples();
                for (partition, _) in judge.open() {
                    if let Some((low, high)) = query_watermarks(partition) {
                        judge.out_of_range(partition, low, high, samples);
                    }
                }
            }
            Some(Err(error)) => last_error = Some(error.to_string()),
            None => {}
        }
        let Seen { ends, latest, .. } = consumer.context().seen().clone();
        judge.confirm_ends(&latest);
        for partition in judge.fetched(&ends, Instant::now()) {
            match query_watermarks(partition) {
                Some((_, queried_high)) => {
                    let fetched_high = ends.get(&partition).map_or(-1, |e| e.high);
                    judge.confirm_shorter(partition, queried_high, fetched_high);
                }
                None => judge.confirm_failed(partition),
            }
        }
    }
    judge.finish(&match &last_error {
        Some(error) => format!("no answer within {timeout:?} (last error: {error})"),
        None => format!("no record and no end of partition within {timeout:?}"),
    })
}

fn single(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(last_stable: i64, high: i64, next_fetch: i64) -> BTreeMap<i32, FetchedEnds> {
        BTreeMap::from([(
            0,
            FetchedEnds {
                last_stable,
                high,
                next_fetch,
            },
        )])
    }

    fn latest(
        partition: i32,
        number: u64,
        log_start: i64,
        last_stable: i64,
        next_fetch: i64,
    ) -> BTreeMap<i32, LatestSample> {
        BTreeMap::from([(
            partition,
            LatestSample {
                number,
                log_start,
                last_stable,
                next_fetch,
                fetch_stopped: false,
            },
        )])
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn records_and_ends_of_partition_answer_at_once() {
        let mut judge = EndJudge::new(&[(0, 10), (1, 5)]);
        assert!(
            !judge.record(0, 9),
            "a record before the offset proves nothing"
        );
        assert!(judge.record(0, 10));
        judge.end_of_partition(1, 3);
        assert!(
            !judge.done(),
            "an end of partition waits for a later sample"
        );
        judge.confirm_ends(&latest(1, 4, 0, 5, 5));
        assert!(
            !judge.done(),
            "a sample that may predate the end confirmed it"
        );
        judge.confirm_ends(&latest(1, 5, 0, 5, 5));
        assert!(judge.done());
        let answers = judge.finish("unused");
        assert_eq!(answers[&0], ProbeAnswer::RecordsFollow);
        assert_eq!(answers[&1], ProbeAnswer::EndReached);
    }

    #[test]
    fn one_sample_of_a_zero_end_is_not_a_shorter_partition() {
        // A statistics sample taken from an error response during a broker restart.
        let t0 = Instant::now();
        let mut judge = EndJudge::new(&[(0, 500)]);
        assert!(judge.fetched(&ends(0, 0, 500), t0).is_empty());
        assert!(!judge.done(), "one sample answered the partition");
        // Standing for the grace, it is asked of the broker, whose end is past the
        // offset: the sample was wrong, and the partition stays open.
        let due = judge.fetched(&ends(0, 0, 500), t0 + END_GRACE);
        assert_eq!(due, vec![0]);
        judge.confirm_shorter(0, 800, 0);
        assert!(!judge.done());
        // It is asked again only after another grace.
        assert!(
            judge
                .fetched(&ends(0, 0, 500), t0 + END_GRACE + ms(100))
                .is_empty()
        );
        assert_eq!(
            judge.finish("silent")[&0],
            ProbeAnswer::Unknown("silent".into())
        );
    }

    #[test]
    fn a_shorter_partition_needs_the_grace_and_the_broker_to_agree() {
        let t0 = Instant::now();
        let mut judge = EndJudge::new(&[(0, 500)]);
        assert!(judge.fetched(&ends(40, 40, 40), t0).is_empty());
        assert!(judge.fetched(&ends(40, 40, 40), t0 + ms(900)).is_empty());
        assert_eq!(judge.fetched(&ends(40, 40, 40), t0 + END_GRACE), vec![0]);
        judge.confirm_shorter(0, 38, 40);
        assert_eq!(
            judge.finish("unused")[&0],
            ProbeAnswer::PastEnd { end: 40 },
            "the higher of the two ends is reported"
        );
    }

    #[test]
    fn a_real_end_after_a_zero_sample_clears_the_doubt() {
        let t0 = Instant::now();
        let mut judge = EndJudge::new(&[(0, 500)]);
        let mut seen = ends(0, 0, 500);
        judge.fetched(&seen, t0);
        // The next sample folds in as the higher end.
        let mut merged = seen[&0];
        merged.merge(FetchedEnds {
            last_stable: 900,
            high: 900,
            next_fetch: 500,
        });
        seen.insert(0, merged);
        assert!(judge.fetched(&seen, t0 + END_GRACE).is_empty());
        assert!(!judge.done(), "the records-follow grace starts only now");
        judge.fetched(&seen, t0 + END_GRACE + END_GRACE);
        assert_eq!(judge.finish("unused")[&0], ProbeAnswer::RecordsFollow);
    }

    #[test]
    fn records_follow_only_once_the_fetch_position_stands_still_for_the_grace() {
        // The client skips offsets without records (markers): its fetch position moves,
        // and an end of partition may still come.
        let t0 = Instant::now();
        let mut judge = EndJudge::new(&[(0, 500)]);
        judge.fetched(&ends(900, 900, 500), t0);
        judge.fetched(&ends(900, 900, 700), t0 + ms(800));
        judge.fetched(&ends(900, 900, 850), t0 + ms(1600));
        judge.fetched(&ends(900, 900, 850), t0 + ms(2400));
        assert!(
            !judge.done(),
            "a moving client was taken for a silent broker"
        );
        // The client reached the end past the markers, not at the asked offset.
        judge.end_of_partition(0, 30);
        judge.confirm_ends(&latest(0, 32, 0, 900, 900));
        assert_eq!(judge.finish("unused")[&0], ProbeAnswer::EndReached);

        // A broker that sends nothing (Tansu inside the last batch): the position
        // stands, and after the grace records follow.
        let mut judge = EndJudge::new(&[(0, 500)]);
        judge.fetched(&ends(900, 900, 500), t0);
        judge.fetched(&ends(900, 900, 500), t0 + ms(999));
        assert!(!judge.done());
        judge.fetched(&ends(900, 900, 500), t0 + END_GRACE);
        assert_eq!(judge.finish("unused")[&0], ProbeAnswer::RecordsFollow);
    }

    #[test]
    fn out_of_range_is_judged_by_the_watermarks() {
        let t0 = Instant::now();
        let mut judge = EndJudge::new(&[(0, 5), (1, 90), (2, 50)]);
        judge.out_of_range(0, 10, 20, 0);
        judge.out_of_range(1, 10, 60, 0);
        // Inside the range: the error was about another partition.
        judge.out_of_range(2, 10, 60, 0);
        // Past the end once the fetched end agrees for the grace.
        assert!(!judge.done());
        let fetched = BTreeMap::from([(
            1,
            FetchedEnds {
                last_stable: 60,
                high: 60,
                next_fetch: 90,
            },
        )]);
        judge.fetched(&fetched, t0);
        assert!(!judge.done(), "past the end without the grace");
        judge.fetched(&fetched, t0 + END_GRACE);
        let answers = judge.finish("open");
        assert_eq!(answers[&0], ProbeAnswer::RecordsFollow);
        assert_eq!(answers[&1], ProbeAnswer::PastEnd { end: 60 });
        assert_eq!(answers[&2], ProbeAnswer::Unknown("open".into()));
    }

    #[test]
    fn a_negative_offset_is_asked_as_the_partition_start() {
        // A low watermark of -1 (a broker that has no answer) must not become offset -1,
        // which librdkafka reads as "the end".
        let judge = EndJudge::new(&[(0, -1), (1, -2)]);
        assert_eq!(judge.asked(), &BTreeMap::from([(0, 0), (1, 0)]));
    }

    #[test]
    fn an_end_of_partition_from_an_error_response_is_no_end() {
        // Tansu answers "unknown topic" while it restarts, with an end of 0 and a log
        // start of -1; librdkafka turns that into an end of partition at offset 0.
        let mut judge = EndJudge::new(&[(0, 0)]);
        judge.end_of_partition(0, 7);
        judge.confirm_ends(&latest(0, 9, -1, 0, 0));
        assert!(!judge.done(), "an error response confirmed an end");
        // Back up, the broker's successful answer shows records after the position.
        judge.confirm_ends(&latest(0, 10, 0, 500, 0));
        assert!(!judge.done(), "an end contradicted by the broker stood");
        assert_eq!(
            judge.finish("open")[&0],
            ProbeAnswer::Unknown("open".into())
        );
    }

    #[test]
    fn the_ends_of_successful_responses_alone_are_folded() {
        assert_eq!(FetchedEnds::from_sample(-1001, -1001, -1001, -1001), None);
        assert_eq!(
            FetchedEnds::from_sample(-1, 0, 0, 0),
            None,
            "an error response's end was taken"
        );
        assert_eq!(
            FetchedEnds::from_sample(0, 40, 38, 12),
            Some(FetchedEnds {
                last_stable: 38,
                high: 40,
                next_fetch: 12
            })
        );
    }

    #[test]
    fn out_of_range_needs_the_fetched_end_to_agree_before_past_end() {
        let t0 = Instant::now();
        // The broker's error does not name its partition: both open partitions get a
        // watermark query, and partition 1's answer is too low (Tansu on S3).
        let mut judge = EndJudge::new(&[(0, 90), (1, 90)]);
        judge.out_of_range(0, 10, 60, 0);
        judge.out_of_range(1, 10, 60, 0);
        assert!(!judge.done(), "one query made a partition shorter");
        let mut seen = ends(60, 60, 90);
        seen.insert(
            1,
            FetchedEnds {
                last_stable: 200,
                high: 200,
                next_fetch: 90,
            },
        );
        judge.fetched(&seen, t0);
        judge.fetched(&seen, t0 + END_GRACE);
        let answers = judge.finish("open");
        assert_eq!(answers[&0], ProbeAnswer::PastEnd { end: 60 });
        assert_eq!(
            answers[&1],
            ProbeAnswer::RecordsFollow,
            "its fetched end, past the offset for the grace, is what counts"
        );
    }

    #[test]
    fn out_of_range_on_a_partition_the_client_stopped_fetching_is_past_the_end() {
        // Apache Kafka answers a fetch past the end with OFFSET_OUT_OF_RANGE (high
        // watermark and log start -1: no fetched end), and with auto.offset.reset=error
        // librdkafka stops fetching that partition: its fetch state tells which one the
        // error was about.
        let mut judge = EndJudge::new(&[(0, 90), (1, 90)]);
        judge.out_of_range(0, 10, 60, 4);
        judge.out_of_range(1, 10, 60, 4);
        let stopped = |partition, number, fetch_stopped| {
            (
                partition,
                LatestSample {
                    number,
                    log_start: -1,
                    last_stable: -1,
                    next_fetch: -1001,
                    fetch_stopped,
                },
            )
        };
        judge.confirm_ends(&BTreeMap::from([stopped(0, 5, true), stopped(1, 5, false)]));
        assert!(!judge.done(), "a sample that may predate the error decided");
        judge.confirm_ends(&BTreeMap::from([stopped(0, 6, true), stopped(1, 6, false)]));
        let answers = judge.finish("open");
        assert_eq!(answers[&0], ProbeAnswer::PastEnd { end: 60 });
        assert_eq!(
            answers[&1],
            ProbeAnswer::Unknown("open".into()),
            "a partition still fetched was taken for the one out of range"
        );
    }

    #[test]
    fn a_client_at_the_end_after_markers_builds_no_records_follow_grace() {
        // Markers up to 900 skipped: the client fetches at the end, and its end of
        // partition is about to be confirmed; the fetched end is no evidence of records.
        let t0 = Instant::now();
        let mut judge = EndJudge::new(&[(0, 500)]);
        for step in 0..30 {
            judge.fetched(&ends(900, 900, 900), t0 + ms(100) * step);
        }
        assert!(!judge.done(), "records follow a client at the end");
    }

    #[test]
    fn an_unanswered_confirmation_waits_another_grace() {
        let t0 = Instant::now();
        let mut judge = EndJudge::new(&[(0, 500)]);
        judge.fetched(&ends(40, 40, 40), t0);
        assert_eq!(judge.fetched(&ends(40, 40, 40), t0 + END_GRACE), vec![0]);
        judge.confirm_failed(0);
        assert!(
            judge
                .fetched(&ends(40, 40, 40), t0 + END_GRACE + ms(50))
                .is_empty(),
            "asked again at once"
        );
        assert_eq!(
            judge.fetched(&ends(40, 40, 40), t0 + END_GRACE * 2 + ms(50)),
            vec![0]
        );
    }
}
