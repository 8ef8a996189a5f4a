//! The broker watchdogs: the group's membership, silent partitions, positions moved back,
//! offset gaps, the topic's lag and stall, and when a batch run is caught up.

use super::*;

/// What [`Worker::position_moved_back`] did.
pub(super) enum MovedBack {
    /// The partition holds the lake's last offset and is positioned after it again.
    Repositioned,
    /// The broker did not say whether it holds it; why, in words.
    Unanswered(String),
}

/// How long a batch worker waits before it probes the partitions of others again after
/// a probe found records after the lake's offsets ([`Worker::topic_stored`]).
pub(super) const PROBE_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// How long the gap checks wait after the broker did not answer one of their questions.
pub(super) const GAPS_RETRY_AFTER: Duration = Duration::from_secs(2);

/// How long a positioned partition may stay silent while holding records.
pub(super) const SILENT_PARTITION: Duration = Duration::from_secs(3);

/// With `exit_at_end`, how often a worker without partitions asks the lake whether the
/// rest of the group has stored the whole topic.
pub(super) const EMPTY_MEMBER_GRACE: Duration = Duration::from_secs(2);

/// How long a worker without flushes waits before it runs the after-commit hook anyway.
pub(super) const IDLE_AFTER_COMMIT: Duration = Duration::from_secs(300);

/// How often a worker compares the coordinator's view of the group with its own.
pub(super) const GROUP_CHECK_INTERVAL: Duration = Duration::from_secs(5);

impl Worker {
    /// See [`crate::group`]: rejoin when the stable group lost members that were there
    /// at this worker's assignment and no rebalance told it (two checks in a row).
    pub(super) fn check_group(&mut self) -> Result<()> {
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
    pub(super) fn rejoin(&mut self) -> Result<()> {
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
    pub(super) fn find_silent_partitions(&mut self) -> Result<()> {
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
    pub(super) fn position_moved_back(
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
    pub(super) fn handle_gaps(&mut self) -> Result<()> {
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
            // producer's markers) look the same as records a broker skipped.
            let probed = state.probing;
            let restart = match state.plan_gap(expected, found, low) {
                GapPlan::Probe { before } => {
                    self.reposition(partition, before, true)?;
                    continue;
                }
                GapPlan::Reread { from } => {
                    tracing::warn!(
                        partition,
                        expected,
                        ?found,
                        ?probed,
                        low,
                        "the broker skipped records it holds; re-reading the partition from its start"
                    );
                    metrics::counter!(names::OFFSET_GAPS, "outcome" => "repaired").increment(1);
                    self.state.report.gaps_repaired += 1;
                    from
                }
                GapPlan::GiveUp { resume, lost } => {
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
                }
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
    pub(super) fn reposition(
        &mut self,
        partition: i32,
        offset: i64,
        watch_first: bool,
    ) -> Result<()> {
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
    pub(super) fn topic_lag(&self) -> Result<TopicLag> {
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
    pub(super) fn topic_stored(&mut self, lag: &TopicLag) -> Result<bool> {
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
    pub(super) fn watch_stall(&mut self, lag: &TopicLag) -> Result<()> {
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
    pub(super) fn broker_may_be_away<T>(&mut self, answer: Result<T>) -> Result<Option<T>> {
        let give_up = self.state.options.give_up_after();
        self.broker.answer(answer, give_up)
    }

    /// The coordinator's view of the group, for a report.
    pub(super) fn describe_group(&self) -> String {
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
    pub(super) fn caught_up(&mut self) -> Result<bool> {
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
}

/// Whether the broker answers. A broker query that failed is no reason to stop a
/// worker: a broker restarts, a leader moves, and librdkafka reconnects by itself. The
/// failure is logged (at most every ten seconds) and the caller asks again later; a
/// batch run fails once the broker has not answered for its stall timeout. Any other
/// error stands.
#[derive(Debug, Default)]
pub(super) struct BrokerWatch {
    pub(super) last_warning: Option<Instant>,
    pub(super) away_since: Option<Instant>,
}

impl BrokerWatch {
    pub(super) fn answer<T>(
        &mut self,
        answer: Result<T>,
        give_up: Option<Duration>,
    ) -> Result<Option<T>> {
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
    pub(super) fn unanswered(
        &mut self,
        why: &dyn std::fmt::Display,
        give_up: Option<Duration>,
    ) -> Result<()> {
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
pub(super) struct PartitionLag {
    pub(super) partition: i32,
    /// Last offset in the lake.
    pub(super) stored: Option<i64>,
    /// The broker's low watermark (0 for a partition read to its end here).
    pub(super) low: i64,
    /// The broker's high watermark.
    pub(super) end: i64,
    /// Read to its end by this worker (`end` is where it stopped reading, not a query).
    pub(super) read_here: bool,
}

impl PartitionLag {
    /// Records the broker holds that the lake does not.
    pub(super) fn waiting(&self) -> u64 {
        let next = self
            .stored
            .map_or(self.low, |last| (last + 1).max(self.low));
        u64::try_from(self.end - next).unwrap_or(0)
    }
}

/// Where the lake stands on the whole topic.
#[derive(Debug, Clone, Default)]
pub(super) struct TopicLag {
    pub(super) partitions: Vec<PartitionLag>,
}

impl TopicLag {
    /// Records the broker holds that the lake does not.
    pub(super) fn waiting(&self) -> u64 {
        self.partitions.iter().map(PartitionLag::waiting).sum()
    }

    /// The sum of the stored offsets: it grows whenever any worker commits.
    pub(super) fn stored(&self) -> i64 {
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
