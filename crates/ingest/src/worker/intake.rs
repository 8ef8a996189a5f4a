//! What a worker holds between flushes, free of rdkafka: each assigned partition's
//! offsets and positions, and the buffered rows, dead letters and DLQ messages.

use super::*;

#[derive(Debug, Default)]
pub(super) struct PartitionState {
    pub(super) bases: Bases,
    /// First and last offset in the buffer.
    pub(super) first_buffered: Option<i64>,
    /// Last offset in the buffer.
    pub(super) last_buffered: Option<i64>,
    /// Next offset to read (after the last one seen, stored or skipped).
    pub(super) next: Option<i64>,
    /// librdkafka reported the end of the partition after the last message.
    pub(super) at_end: bool,
    /// After positioning the consumer: the offset the next record must have, and when
    /// the position was set.
    pub(super) expect_first: Option<(i64, Instant)>,
    /// A gap in this partition was already repaired once (never loop on it).
    pub(super) repaired: bool,
    /// Re-positioned one record before a gap (`expected`, `found`) to learn whether the
    /// broker serves exact offsets: it then does, and the gap holds no records.
    pub(super) probing: Option<(i64, i64)>,
    /// When the partition was positioned or last delivered a record or its end.
    pub(super) heard_at: Option<Instant>,
}

impl PartitionState {
    pub(super) fn starting_at(bases: Bases) -> Self {
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
    pub(super) fn known_at_end(&self) -> bool {
        self.at_end && self.expect_first.is_none()
    }

    /// Records are still coming: the partition delivered within [`QUIET_PARTITION`] and
    /// has not reported its end.
    pub(super) fn still_reading(&self) -> bool {
        !self.at_end
            && self.expect_first.is_none()
            && self
                .heard_at
                .is_some_and(|at| at.elapsed() < QUIET_PARTITION)
    }
}

/// After positioning, the first record came later than the offset asked for (`found`),
/// or none came although the partition holds more (`found: None`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Gap {
    pub(super) partition: i32,
    pub(super) expected: i64,
    pub(super) found: Option<i64>,
    /// Not before then: the broker did not answer the last question about it.
    pub(super) retry_at: Option<Instant>,
}

/// What to do about a gap whose first record came later than asked (or not at all),
/// decided by [`PartitionState::plan_gap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GapPlan {
    /// Read the record before the gap again (the lake holds it): a broker that serves it
    /// where asked serves exact offsets, and the gap is offsets without records
    /// (transaction markers, compaction). Costs one record, not the partition.
    Probe { before: i64 },
    /// The broker skipped records it holds: read the partition again from its start
    /// (once; what the lake holds comes back as replays).
    Reread { from: i64 },
    /// The records are gone from the broker (retention) or a re-read did not help:
    /// continue after them, reporting `lost` records.
    GiveUp { resume: i64, lost: i64 },
}

impl PartitionState {
    /// Decides the next step for a gap after `expected` (first record at `found`, if
    /// any came) when the broker's log starts at `low`; records the probe or the
    /// re-read so that neither is tried twice.
    pub(super) fn plan_gap(&mut self, expected: i64, found: Option<i64>, low: i64) -> GapPlan {
        let before = expected - 1;
        if found.is_some() && self.probing.is_none() && !self.repaired && before >= low {
            self.probing = found.map(|found| (expected, found));
            return GapPlan::Probe { before };
        }
        // The probe's record did not come either: the broker skips records.
        self.probing = None;
        if low <= expected && !self.repaired {
            self.repaired = true;
            return GapPlan::Reread { from: low };
        }
        let resume = found.unwrap_or(low).max(low);
        GapPlan::GiveUp {
            resume,
            lost: (resume - expected).max(0),
        }
    }
}

/// How long a partition that has not reported its end must be silent before the end
/// check asks the broker for its watermarks. Each such query waits behind the pending
/// long-poll fetch on the broker's connection (up to `fetch.wait.max.ms`), so asking
/// about every partition on every idle poll kept a worker blocked most of the time.
pub(super) const QUIET_PARTITION: Duration = Duration::from_secs(1);

/// A dead letter waiting to be published on the DLQ topic after the lake commit.
pub(super) struct DlqMessage {
    pub(super) payload: Vec<u8>,
    pub(super) key: Option<Vec<u8>>,
    pub(super) reason: &'static str,
    pub(super) detail: String,
    pub(super) partition: i32,
    pub(super) offset: i64,
}

#[derive(Default)]
pub(super) struct Buffer {
    pub(super) events: EventRows,
    pub(super) dead_letters: DeadLetterRows,
    pub(super) dead_by_reason: BTreeMap<&'static str, u64>,
    pub(super) dlq: Vec<DlqMessage>,
    pub(super) records: usize,
    pub(super) bytes: usize,
    pub(super) started: Option<Instant>,
}

impl Buffer {
    /// Whether the flush rules call for a flush: enough records or bytes, or the oldest
    /// buffered record is old enough.
    pub(super) fn flush_due(&self, flush: &streetflow_core::config::FlushSection) -> bool {
        self.records >= flush.max_records
            || self.bytes >= flush.max_bytes
            || self
                .started
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(flush.max_age_ms))
    }

    pub(super) fn clear(&mut self) -> usize {
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

/// A record as the intake sees it: where it came from, its bytes and its broker
/// timestamp (from rdkafka's message, or a test's).
#[derive(Debug, Clone, Copy)]
pub(super) struct Record<'a> {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) payload: Option<&'a [u8]>,
    pub(super) key: Option<&'a [u8]>,
    pub(super) timestamp: Option<KafkaTimestamp>,
}

/// The parts of a worker's state one record updates: the positions, the buffer and the
/// counts. It decides whether a record is taken (buffered as an event or a dead letter),
/// skipped as a replay of what the lake holds, or held back behind a gap.
pub(super) struct Intake<'a> {
    pub(super) topic: &'a str,
    pub(super) partitions: &'a mut BTreeMap<i32, PartitionState>,
    pub(super) buffer: &'a mut Buffer,
    pub(super) report: &'a mut IngestReport,
    pub(super) appender: &'a mut RowAppender,
    /// Dead letters are also published to a DLQ topic.
    pub(super) publish_dlq: bool,
    pub(super) gaps: &'a mut Vec<Gap>,
}

impl Intake<'_> {
    /// A new assignment: what was buffered is dropped (counted; its new owners read it
    /// again), and each partition starts after the offsets the lake holds.
    pub(super) fn assigned(&mut self, assigned: Vec<(i32, Bases)>) {
        self.report.dropped_on_rebalance += self.buffer.clear() as u64;
        // Gaps were found under the old positions; the new ones start where the lake
        // says.
        self.gaps.clear();
        *self.partitions = assigned
            .into_iter()
            .map(|(p, bases)| (p, PartitionState::starting_at(bases)))
            .collect();
    }

    /// The partitions were taken away: what was buffered is dropped (counted).
    pub(super) fn revoked(&mut self) {
        self.report.dropped_on_rebalance += self.buffer.clear() as u64;
        self.gaps.clear();
        self.partitions.clear();
    }

    pub(super) fn take(&mut self, record: Record<'_>) {
        let Self {
            topic,
            partitions,
            buffer,
            report,
            appender,
            publish_dlq,
            gaps,
        } = self;
        let topic: &str = topic;
        let publish_dlq = *publish_dlq;
        let Record {
            partition,
            offset,
            payload,
            key,
            timestamp,
        } = record;
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
            timestamp,
        };
        let dead_stored = state
            .bases
            .dead_letters
            .is_some_and(|stored| offset <= stored);
        match appender.append(
            &mut buffer.events,
            &mut buffer.dead_letters,
            payload,
            key,
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
                        key: key.map(<[u8]>::to_vec),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use streetflow_core::OperatorCalendars;
    use streetflow_core::config::FlushSection;
    use streetflow_core::decode::DecodeOptions;

    fn event(offset: i64) -> Vec<u8> {
        format!(
            r#"{{"event_id":"e{offset}","operator_id":"op","merchant_id":"m1","terminal_id":"t1","kind":"sale","amount_fen":{},"currency":"CNY","occurred_at":"2025-03-01T10:00:00+08:00","channel":"wechat"}}"#,
            100 + offset
        )
        .into_bytes()
    }

    /// A worker's intake parts, owned, for driving with synthetic records.
    struct Parts {
        partitions: BTreeMap<i32, PartitionState>,
        buffer: Buffer,
        report: IngestReport,
        appender: RowAppender,
        gaps: Vec<Gap>,
        publish_dlq: bool,
    }

    impl Parts {
        fn new() -> Self {
            Self {
                partitions: BTreeMap::new(),
                buffer: Buffer::default(),
                report: IngestReport::default(),
                appender: RowAppender::new(DecodeOptions::default(), OperatorCalendars::default()),
                gaps: Vec::new(),
                publish_dlq: true,
            }
        }

        fn intake(&mut self) -> Intake<'_> {
            Intake {
                topic: "pos",
                partitions: &mut self.partitions,
                buffer: &mut self.buffer,
                report: &mut self.report,
                appender: &mut self.appender,
                publish_dlq: self.publish_dlq,
                gaps: &mut self.gaps,
            }
        }

        /// Assigns partition 0 with the lake holding events through `events` and dead
        /// letters through `dead_letters`.
        fn assign(&mut self, events: Option<i64>, dead_letters: Option<i64>) {
            self.intake().assigned(vec![(
                0,
                Bases {
                    events,
                    dead_letters,
                },
            )]);
        }

        /// The first record after positioning partition 0 has come where asked.
        fn positioned(&mut self) {
            if let Some(state) = self.partitions.get_mut(&0) {
                state.expect_first = None;
            }
        }

        fn take(&mut self, partition: i32, offset: i64, payload: &[u8]) {
            self.intake().take(Record {
                partition,
                offset,
                payload: Some(payload),
                key: Some(b"m1"),
                timestamp: None,
            });
        }

        fn buffered(&self) -> (usize, usize) {
            (self.buffer.events.len(), self.buffer.dead_letters.len())
        }
    }

    #[test]
    fn records_the_lake_holds_are_replays_and_the_rest_are_buffered() {
        let mut parts = Parts::new();
        parts.assign(Some(4), Some(4));
        // The consumer was positioned at 5 but a replay after a crash delivers from 3:
        // a first record earlier than asked is a position moved back, not a replay.
        parts.take(0, 3, &event(3));
        assert_eq!(parts.gaps.len(), 1);
        assert_eq!((parts.gaps[0].expected, parts.gaps[0].found), (5, Some(3)));
        assert_eq!(parts.buffered(), (0, 0));

        // Positioned again (as the gap handling does), the records at or below the
        // lake's offset are replays, the others are buffered.
        parts.assign(Some(4), Some(4));
        parts.positioned();
        for offset in 2..=8 {
            parts.take(0, offset, &event(offset));
        }
        assert_eq!(parts.report.replayed, 3);
        assert_eq!(parts.buffered(), (4, 0));
        let state = &parts.partitions[&0];
        assert_eq!(
            (state.first_buffered, state.last_buffered, state.next),
            (Some(5), Some(8), Some(9))
        );
        assert_eq!(parts.buffer.records, 4);
        // consumed = replayed + buffered + held back behind the gap
        assert_eq!(parts.report.consumed, 3 + 4 + 1);
    }

    #[test]
    fn a_gap_after_positioning_holds_the_partition_back_until_it_is_handled() {
        let mut parts = Parts::new();
        parts.assign(Some(9), Some(9));
        // Asked for 10, the broker delivered 14: records 10–13 may be lost.
        parts.take(0, 14, &event(14));
        parts.take(0, 15, &event(15));
        assert_eq!(parts.gaps.len(), 1);
        assert_eq!(
            (parts.gaps[0].expected, parts.gaps[0].found),
            (10, Some(14))
        );
        // Nothing read past the gap: committing 15 would make the re-read of 10–13
        // look like replays.
        assert_eq!(parts.buffered(), (0, 0));
        assert_eq!(parts.partitions[&0].next, Some(10));
    }

    #[test]
    fn the_first_record_where_asked_is_taken() {
        let mut parts = Parts::new();
        parts.assign(None, None);
        parts.take(0, 0, &event(0));
        parts.take(0, 1, &event(1));
        assert!(parts.gaps.is_empty());
        assert_eq!(parts.buffered(), (2, 0));
        assert_eq!(parts.report.replayed, 0);
    }

    #[test]
    fn bad_records_become_dead_letters_once_and_their_dlq_copy_is_masked() {
        let mut parts = Parts::new();
        parts.assign(Some(9), Some(11));
        parts.positioned();
        // 10 and 11 are dead letters the lake already holds (their events commit
        // failed after the dead letters committed); 12 is new.
        parts.take(0, 10, b"not json");
        parts.take(0, 11, b"{\"card\":\"4111 1111 1111 1111\"}");
        parts.take(0, 12, b"{\"card\":\"4111 1111 1111 1111\"}");
        assert_eq!(parts.report.replayed, 2);
        assert_eq!(parts.buffered(), (0, 1));
        assert_eq!(parts.buffer.dlq.len(), 1);
        let dlq = &parts.buffer.dlq[0];
        assert_eq!((dlq.partition, dlq.offset), (0, 12));
        assert!(
            !String::from_utf8_lossy(&dlq.payload).contains("4111 1111 1111 1111"),
            "the DLQ copy keeps the card number"
        );
        assert_eq!(parts.buffer.dead_by_reason.values().sum::<u64>(), 1);
    }

    #[test]
    fn a_rebalance_mid_flush_drops_the_buffer_and_counts_it() {
        let mut parts = Parts::new();
        parts.assign(Some(-1), Some(-1));
        for offset in 0..5 {
            parts.take(0, offset, &event(offset));
        }
        // A record of a partition this worker no longer holds is not taken.
        parts.take(7, 0, &event(0));
        assert_eq!(parts.report.dropped_on_rebalance, 1);
        parts.intake().revoked();
        assert_eq!(parts.report.dropped_on_rebalance, 1 + 5);
        assert_eq!(parts.buffered(), (0, 0));
        assert!(parts.partitions.is_empty());
        // Assigned again after the lake moved on (another worker committed 0–2): it
        // starts after what the lake holds.
        parts.assign(Some(2), Some(2));
        let state = &parts.partitions[&0];
        assert_eq!(state.next, Some(3));
        assert_eq!(state.expect_first.map(|(offset, _)| offset), Some(3));
        assert_eq!(parts.report.consumed, 6);
    }

    #[test]
    fn a_flush_is_due_by_records_bytes_or_age() {
        let flush = FlushSection {
            max_records: 3,
            max_bytes: 1_000,
            max_age_ms: 60_000,
        };
        let mut parts = Parts::new();
        parts.assign(Some(-1), Some(-1));
        assert!(!parts.buffer.flush_due(&flush));
        parts.take(0, 0, &event(0));
        parts.take(0, 1, &event(1));
        assert!(!parts.buffer.flush_due(&flush));
        parts.take(0, 2, &event(2));
        assert!(parts.buffer.flush_due(&flush), "by records");
        let by_bytes = FlushSection {
            max_records: 100,
            max_bytes: 200,
            ..flush
        };
        assert!(parts.buffer.flush_due(&by_bytes), "by bytes");
        let by_age = FlushSection {
            max_records: 100,
            max_bytes: 1 << 20,
            max_age_ms: 0,
        };
        assert!(parts.buffer.flush_due(&by_age), "by age");
        parts.buffer.clear();
        assert!(!parts.buffer.flush_due(&by_age));
    }

    /// Positions partition 0 at `offset` as the gap handling does.
    fn reposition(parts: &mut Parts, offset: i64, watch_first: bool) {
        let state = parts.partitions.get_mut(&0).expect("partition 0 assigned");
        state.next = Some(offset);
        state.expect_first = watch_first.then(|| (offset, Instant::now()));
    }

    #[test]
    fn a_gap_of_offsets_without_records_is_probed_once_and_read_on() {
        let mut parts = Parts::new();
        parts.assign(Some(9), Some(9));
        // Asked for 10, came 14 (10–13 are transaction markers).
        parts.take(0, 14, &event(14));
        let gap = parts.gaps.remove(0);
        let state = parts.partitions.get_mut(&0).expect("assigned");
        let plan = state.plan_gap(gap.expected, gap.found, 0);
        assert_eq!(plan, GapPlan::Probe { before: 9 });
        assert_eq!(state.probing, Some((10, 14)));
        reposition(&mut parts, 9, true);
        // The record before the gap comes where asked: a replay, and the broker serves
        // exact offsets, so reading on from it loses nothing.
        parts.take(0, 9, &event(9));
        parts.take(0, 14, &event(14));
        assert!(parts.gaps.is_empty());
        assert_eq!(parts.partitions[&0].probing, None);
        assert_eq!(parts.report.replayed, 1);
        assert_eq!(parts.buffered(), (1, 0));
        assert_eq!(parts.partitions[&0].first_buffered, Some(14));
    }

    #[test]
    fn a_broker_that_skips_records_is_read_again_from_the_start_once() {
        let mut parts = Parts::new();
        parts.assign(Some(9), Some(9));
        parts.take(0, 14, &event(14));
        let gap = parts.gaps.remove(0);
        let state = parts.partitions.get_mut(&0).expect("assigned");
        assert_eq!(
            state.plan_gap(gap.expected, gap.found, 0),
            GapPlan::Probe { before: 9 }
        );
        reposition(&mut parts, 9, true);
        // The probe's record does not come either: the broker skips records it holds.
        parts.take(0, 14, &event(14));
        let gap = parts.gaps.remove(0);
        assert_eq!((gap.expected, gap.found), (9, Some(14)));
        let state = parts.partitions.get_mut(&0).expect("assigned");
        assert_eq!(
            state.plan_gap(gap.expected, gap.found, 0),
            GapPlan::Reread { from: 0 }
        );
        assert!(state.repaired && state.probing.is_none());
        // Re-read from the start, unwatched: what the lake holds are replays, the rest
        // (10–13 included) is buffered.
        reposition(&mut parts, 0, false);
        for offset in 0..=14 {
            parts.take(0, offset, &event(offset));
        }
        assert!(parts.gaps.is_empty());
        assert_eq!(parts.report.replayed, 10);
        assert_eq!(parts.buffered(), (5, 0));
        // A later gap in the same partition is not re-read again (never loop on it).
        let state = parts.partitions.get_mut(&0).expect("assigned");
        assert_eq!(
            state.plan_gap(20, Some(25), 0),
            GapPlan::GiveUp {
                resume: 25,
                lost: 5
            }
        );
    }

    #[test]
    fn records_gone_from_the_broker_are_given_up_and_counted() {
        let mut parts = Parts::new();
        parts.assign(Some(9), Some(9));
        // Retention removed everything before 30: asked for 10, came 30.
        parts.take(0, 30, &event(30));
        let gap = parts.gaps.remove(0);
        let state = parts.partitions.get_mut(&0).expect("assigned");
        // No probe (the record before the gap is gone too) and no re-read (the start
        // is past the gap): 20 records are lost, reported, and reading goes on at 30.
        assert_eq!(
            state.plan_gap(gap.expected, gap.found, 30),
            GapPlan::GiveUp {
                resume: 30,
                lost: 20
            }
        );
        // Nothing came at all after the asked offset, and the log starts past it.
        assert_eq!(
            state.plan_gap(10, None, 12),
            GapPlan::GiveUp {
                resume: 12,
                lost: 2
            }
        );
        // With the start exactly at the asked offset, there is no record before it to
        // probe: the partition is read again from its start.
        let mut fresh = PartitionState::starting_at(Bases::default());
        assert_eq!(fresh.plan_gap(0, Some(4), 0), GapPlan::Reread { from: 0 });
    }
}
