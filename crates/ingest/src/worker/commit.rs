//! The commit protocol: a flush commits dead letters, then events, each fenced by the
//! offsets the worker started from; then the DLQ topic and the group offsets.

use super::*;

/// What the commit protocol asks of the Kafka consumer; a recording double stands in for
/// it in the tests, which drive the protocol against a real lake without a broker.
pub(super) trait GroupPositions {
    /// Records `next` (partition, next offset to read) as the group's offsets: for lag
    /// monitoring only, the lake holds the truth.
    fn commit_next(&self, topic: &str, next: &[(i32, i64)]) -> Result<()>;
    /// Reads the partitions again from these offsets (`None`: from their start).
    fn restart_at(&self, topic: &str, starts: &[(i32, Option<i64>)]) -> Result<()>;
}

impl GroupPositions for BaseConsumer<IngestContext> {
    fn commit_next(&self, topic: &str, next: &[(i32, i64)]) -> Result<()> {
        let mut offsets = TopicPartitionList::new();
        for &(partition, offset) in next {
            offsets
                .add_partition_offset(topic, partition, Offset::Offset(offset))
                .map_err(Error::kafka("build group offsets"))?;
        }
        self.commit(&offsets, CommitMode::Async)
            .map_err(Error::kafka("commit group offsets"))
    }

    fn restart_at(&self, topic: &str, starts: &[(i32, Option<i64>)]) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for &(partition, start) in starts {
            let start = start.map_or(Offset::Beginning, Offset::Offset);
            tpl.add_partition_offset(topic, partition, start)
                .map_err(Error::kafka("build assignment"))?;
        }
        self.assign(&tpl)
            .map_err(Error::kafka("reassign after fence"))
    }
}

/// What a flush did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flushed {
    /// Nothing was buffered.
    Nothing,
    /// The buffer is in the lake.
    Committed,
    /// Another worker owned a partition: the buffer was dropped and the partitions
    /// restart from the lake.
    Fenced,
}

impl Worker {
    /// [`State::flush`] with this worker's consumer; a fence also drops the probes of
    /// the old positions.
    pub(super) fn flush(&mut self) -> Result<()> {
        if self.state.flush(&self.consumer)? == Flushed::Fenced {
            self.moved_back_probe.clear();
        }
        Ok(())
    }

    /// Runs the after-commit hook (see [`State::after_commit`]).
    pub(super) fn after_commit(&mut self) {
        self.state.after_commit();
    }
}

impl State {
    /// Writes the buffer: dead letters, then events, then group offsets. An error names
    /// the partitions and offset ranges the buffer held.
    pub(super) fn flush(&mut self, positions: &dyn GroupPositions) -> Result<Flushed> {
        let ranges: Vec<String> = self
            .partitions
            .iter()
            .filter_map(|(partition, s)| {
                Some(format!(
                    "p{partition} {}..={}",
                    s.first_buffered?, s.last_buffered?
                ))
            })
            .collect();
        self.flush_buffer(positions).map_err(|source| Error::Flush {
            ranges: format!("{} {}", self.topic, ranges.join(", ")),
            source: Box::new(source),
        })
    }

    /// [`State::flush`] without the ranges in its error.
    fn flush_buffer(&mut self, positions: &dyn GroupPositions) -> Result<Flushed> {
        let progress = |bases: fn(&Bases) -> Option<i64>| -> Vec<PartitionProgress> {
            self.partitions
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
            return Ok(Flushed::Nothing);
        }
        // A replay may cover offsets the dead-letter table already holds; its version
        // must never move back, so such partitions are not part of its commit.
        let dead_progress: Vec<PartitionProgress> = progress(|b| b.dead_letters)
            .into_iter()
            .filter(|p| p.expected.is_none_or(|stored| p.last_offset > stored))
            .collect();
        let records = self.buffer.records;
        let accepted = self.buffer.events.len() as u64;
        let dead_batch = (!self.buffer.dead_letters.is_empty())
            .then(|| self.buffer.dead_letters.finish())
            .transpose()
            .map_err(|source| Error::Arrow {
                table: DEAD_LETTERS.name,
                source,
            })?;
        // Observed knowledge: stamped now, just before the rows are written, and stamped
        // again if the commit cannot make the deadline (see `commit_events`).
        let event_batch = (!self.buffer.events.is_empty())
            .then(|| self.buffer.events.finish(Utc::now()))
            .transpose()
            .map_err(|source| Error::Arrow {
                table: POS_EVENTS.name,
                source,
            })?;

        // The DLQ topic first: a crash or a fence after this publishes them again from
        // the replay (at least once); a dead letter the lake holds is always on the topic.
        self.publish_dead_letters()?;
        let sink = self.sink.clone();
        let mut sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(batch) = dead_batch {
            let staged = self.handle.block_on(async {
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
                self.fenced(positions)?;
                return Ok(Flushed::Fenced);
            }
            freeze::point(points::DEAD_LETTER_COMMIT);
            for p in &dead_progress {
                if let Some(state) = self.partitions.get_mut(&p.partition) {
                    state.bases.dead_letters = Some(p.last_offset);
                }
            }
            self.count_dead_letters_committed();
        }
        if !self.commit_events(&mut sink.events, event_batch, &event_progress)? {
            drop(sink);
            self.fenced(positions)?;
            return Ok(Flushed::Fenced);
        }
        drop(sink);
        freeze::point(points::EVENT_COMMIT);

        let mut next = Vec::with_capacity(event_progress.len());
        for p in &event_progress {
            if let Some(state) = self.partitions.get_mut(&p.partition) {
                tracing::debug!(
                    partition = p.partition,
                    expected = ?p.expected,
                    first = ?state.first_buffered,
                    last = p.last_offset,
                    "partition range committed"
                );
                state.bases.events = Some(p.last_offset);
                if let Some(marks) = &self.options.partition_watermarks {
                    marks.advance(p.partition, p.last_offset + 1);
                }
                state.first_buffered = None;
                state.last_buffered = None;
            }
            next.push((p.partition, p.last_offset + 1));
        }
        if let Err(error) = positions.commit_next(&self.topic, &next) {
            // Group offsets only serve lag monitoring; the lake holds the truth.
            tracing::warn!(%error, "committing group offsets failed");
        }
        freeze::point(points::OFFSETS_COMMIT);
        freeze::point(points::AFTER_COMMIT_PENDING);
        self.after_commit();

        metrics::counter!(names::FLUSHES).increment(1);
        metrics::histogram!(names::FLUSH_RECORDS).record(records as f64);
        metrics::counter!(names::RECORDS_ACCEPTED).increment(accepted);
        if let Some(committed) = &self.options.committed {
            committed.fetch_add(accepted, Ordering::Relaxed);
        }
        self.report.accepted += accepted;
        self.report.flushes += 1;
        tracing::debug!(records, accepted, "flushed");
        self.buffer.clear();
        Ok(Flushed::Committed)
    }

    /// Counts the buffered dead letters as stored, once their commit landed. Counted here,
    /// not after the events commit: when that one is fenced, the dead letters stay in
    /// the lake, and whoever reads their records again finds them stored (a replay), so
    /// no one else would ever count them, and the demo's reconciliation (delivered =
    /// accepted + dead-lettered) would miss them.
    fn count_dead_letters_committed(&mut self) {
        let buffer = &mut self.buffer;
        let dead: u64 = buffer.dead_by_reason.values().sum();
        if let Some(committed) = &self.options.committed {
            committed.fetch_add(dead, Ordering::Relaxed);
        }
        for (reason, n) in std::mem::take(&mut buffer.dead_by_reason) {
            metrics::counter!(names::RECORDS_DEAD_LETTERED, "reason" => reason).increment(n);
            *self
                .report
                .dead_lettered
                .entry(reason.to_owned())
                .or_default() += n;
        }
    }

    /// Runs the after-commit hook (the binary uses it to refresh `merchant_daily`).
    pub(super) fn after_commit(&mut self) {
        if let Some(hook) = &self.options.after_commit {
            let started = Instant::now();
            hook(&self.lake, &self.handle);
            metrics::histogram!(names::AFTER_COMMIT_SECONDS)
                .record(started.elapsed().as_secs_f64());
        }
        self.last_after_commit = Instant::now();
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
    pub(super) fn commit_events(
        &self,
        writer: &mut OffsetWriter,
        batch: Option<RecordBatch>,
        progress: &[PartitionProgress],
    ) -> Result<bool> {
        let deadline = self.options.config.knowledge_rules().commit_deadline();
        let stage = |writer: &mut OffsetWriter, batch: &Option<RecordBatch>| {
            self.handle.block_on(async {
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
            match self.handle.block_on(writer.commit(&staged, progress)) {
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
    pub(super) fn commit(
        &self,
        writer: &mut OffsetWriter,
        table: &'static str,
        staged: &StagedFiles,
        progress: &[PartitionProgress],
    ) -> Result<bool> {
        let started = Instant::now();
        let mut attempt = 0;
        let outcome = loop {
            match self.handle.block_on(writer.commit(staged, progress)) {
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
    pub(super) fn outcome(
        &self,
        table: &'static str,
        staged: &StagedFiles,
        outcome: CommitOutcome,
    ) -> bool {
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
    pub(super) fn fenced(&mut self, positions: &dyn GroupPositions) -> Result<()> {
        metrics::counter!(names::FENCED).increment(1);
        self.report.fenced += 1;
        let partitions: Vec<i32> = self.partitions.keys().copied().collect();
        // The partitions start again where the lake says: gaps found under the old
        // positions, and the watch over their probes, no longer apply.
        self.intake().revoked();
        self.discard_staged();
        let bases = {
            let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
            self.handle.block_on(sink.bases(&partitions))?
        };
        let starts: Vec<(i32, Option<i64>)> = partitions
            .iter()
            .zip(&bases)
            .map(|(&p, base)| (p, base.events.map(|last| last + 1)))
            .collect();
        self.intake()
            .assigned(partitions.into_iter().zip(bases).collect());
        positions.restart_at(&self.topic, &starts)
    }

    /// Publishes the buffered dead letters to the DLQ topic and waits until the brokers
    /// acknowledged every one; any failure fails the flush (nothing is committed, and the
    /// restarted worker reads and publishes them again).
    pub(super) fn publish_dead_letters(&mut self) -> Result<()> {
        let Some((producer, topic)) = &self.dlq else {
            return Ok(());
        };
        let letters = self.buffer.dlq.len() as u64;
        if letters == 0 {
            return Ok(());
        }
        let delivered_before = producer.context().delivered.load(Ordering::Relaxed);
        for letter in &self.buffer.dlq {
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
                    value: Some(self.topic.as_str()),
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
        self.buffer.dlq.clear();
        Ok(())
    }
}

/// Counts the DLQ producer's acknowledged deliveries and keeps its first failure.
#[derive(Default)]
pub(super) struct DlqContext {
    pub(super) delivered: AtomicU64,
    pub(super) failure: Mutex<Option<KafkaError>>,
}

impl DlqContext {
    pub(super) fn take_failure(&self) -> Option<KafkaError> {
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

#[cfg(test)]
mod tests {
    //! The commit protocol against a real lake on disk, with a recording double for the
    //! consumer: synthetic records, another worker's commits, rebalances.

    use super::*;
    use std::cell::RefCell;
    use streetflow_core::tables::TableDef;

    /// Where a fence restarted the partitions: (partition, first offset to read).
    type Starts = Vec<(i32, Option<i64>)>;

    /// What the protocol asked of the consumer.
    #[derive(Default)]
    struct Recorded {
        committed: RefCell<Vec<Vec<(i32, i64)>>>,
        restarted: RefCell<Vec<Starts>>,
    }

    impl GroupPositions for Recorded {
        fn commit_next(&self, _topic: &str, next: &[(i32, i64)]) -> Result<()> {
            self.committed.borrow_mut().push(next.to_vec());
            Ok(())
        }

        fn restart_at(&self, _topic: &str, starts: &[(i32, Option<i64>)]) -> Result<()> {
            self.restarted.borrow_mut().push(starts.to_vec());
            Ok(())
        }
    }

    /// A worker's state on a fresh lake (fields drop in order: the state before the
    /// runtime it uses, the lake's directory last).
    struct Harness {
        state: State,
        committed: Arc<AtomicU64>,
        runtime: tokio::runtime::Runtime,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            let mut config = PipelineConfig::defaults();
            config.lake.url = dir.path().display().to_string();
            let committed = Arc::new(AtomicU64::new(0));
            let options = IngestOptions {
                config,
                exit_at_end: true,
                stall_timeout: Duration::from_secs(5),
                after_commit: None,
                committed: Some(committed.clone()),
                partition_watermarks: None,
            };
            let state = State::open(options, runtime.handle().clone()).expect("open state");
            Self {
                state,
                committed,
                runtime,
                _dir: dir,
            }
        }

        fn assign(&mut self, bases: Bases) {
            self.state
                .apply_rebalances(vec![RebalanceEvent::Assigned(vec![(0, bases)])]);
        }

        fn take(&mut self, offset: i64, payload: &[u8]) {
            self.take_on(0, offset, payload);
        }

        fn take_on(&mut self, partition: i32, offset: i64, payload: &[u8]) {
            self.state.intake().take(Record {
                partition,
                offset,
                payload: Some(payload),
                key: Some(b"m1"),
                timestamp: None,
            });
        }

        /// Another worker of the same pipeline and topic commits partition 0 through
        /// `last` of `table`, having found `expected` there.
        fn other_worker_commits(&self, table: &TableDef, expected: Option<i64>, last: i64) {
            self.other_worker_commits_on(0, table, expected, last);
        }

        /// [`Harness::other_worker_commits`] on `partition`.
        fn other_worker_commits_on(
            &self,
            partition: i32,
            table: &TableDef,
            expected: Option<i64>,
            last: i64,
        ) {
            let lake = self.state.lake.clone();
            let name = self.state.options.config.pipeline.name.clone();
            let identity = topic_identity(&self.state.topic);
            let outcome = self.runtime.block_on(async {
                let mut writer = OffsetWriter::new(&lake, table, name).await?;
                writer.set_source(identity);
                let progress = [PartitionProgress {
                    partition,
                    expected,
                    last_offset: last,
                }];
                writer.commit(&StagedFiles::default(), &progress).await
            });
            assert!(
                matches!(outcome, Ok(CommitOutcome::Committed { .. })),
                "{outcome:?}"
            );
        }

        /// What the lake holds for partition 0: (events, dead letters) offsets.
        fn stored(&self) -> (Option<i64>, Option<i64>) {
            let mut sink = self
                .state
                .sink
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let bases = self
                .runtime
                .block_on(sink.bases(&[0]))
                .expect("read offsets");
            (bases[0].events, bases[0].dead_letters)
        }

        /// The Kafka offsets of the rows in `table`, in order.
        fn offsets_in(&self, table: &str) -> Vec<i64> {
            let sql = format!("SELECT kafka_offset FROM {table} ORDER BY kafka_offset");
            let batches = self
                .runtime
                .block_on(self.state.lake.query(&sql))
                .expect("query");
            batches
                .iter()
                .flat_map(|b| {
                    b.column(0)
                        .as_primitive::<streetflow_lake::arrow::datatypes::Int64Type>()
                        .iter()
                        .flatten()
                        .collect::<Vec<_>>()
                })
                .collect()
        }
    }

    fn event(offset: i64) -> Vec<u8> {
        let occurred = (Utc::now() - chrono::Duration::hours(1))
            .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).expect("+08:00"));
        format!(
            r#"{{"event_id":"e{offset}","operator_id":"op","merchant_id":"m1","terminal_id":"t1","kind":"sale","amount_fen":{},"currency":"CNY","occurred_at":"{}","channel":"wechat"}}"#,
            100 + offset,
            occurred.to_rfc3339()
        )
        .into_bytes()
    }

    const BAD: &[u8] = b"{not json";

    #[test]
    fn a_flush_commits_dead_letters_then_events_then_group_offsets() {
        let mut h = Harness::new();
        let consumer = Recorded::default();
        assert_eq!(h.state.flush(&consumer).expect("flush"), Flushed::Nothing);
        h.assign(Bases::default());
        for offset in 0..5 {
            h.take(offset, &event(offset));
        }
        h.take(5, BAD);
        assert_eq!(h.state.flush(&consumer).expect("flush"), Flushed::Committed);

        assert_eq!(h.stored(), (Some(5), Some(5)));
        assert_eq!(h.offsets_in("pos_events"), vec![0, 1, 2, 3, 4]);
        assert_eq!(h.offsets_in("dead_letters"), vec![5]);
        assert_eq!(*consumer.committed.borrow(), vec![vec![(0, 6)]]);
        assert!(consumer.restarted.borrow().is_empty());
        let state = &h.state.partitions[&0];
        assert_eq!(
            state.bases,
            Bases {
                events: Some(5),
                dead_letters: Some(5)
            }
        );
        assert_eq!((state.first_buffered, state.last_buffered), (None, None));
        let report = &h.state.report;
        assert_eq!((report.accepted, report.dead_lettered_total()), (5, 1));
        assert_eq!((report.flushes, report.fenced), (1, 0));
        assert_eq!(h.committed.load(Ordering::Relaxed), 6);
        assert_eq!(h.state.buffer.records, 0);
        // Nothing buffered: nothing to do.
        assert_eq!(h.state.flush(&consumer).expect("flush"), Flushed::Nothing);
        assert_eq!(consumer.committed.borrow().len(), 1);
    }

    #[test]
    fn a_fenced_flush_drops_the_buffer_and_restarts_where_the_lake_is() {
        let mut h = Harness::new();
        let consumer = Recorded::default();
        h.assign(Bases::default());
        for offset in 0..5 {
            h.take(offset, &event(offset));
        }
        // Meanwhile another worker took the partition and stored 0–2.
        h.other_worker_commits(&POS_EVENTS, None, 2);
        assert_eq!(h.state.flush(&consumer).expect("flush"), Flushed::Fenced);

        assert_eq!(h.offsets_in("pos_events"), Vec::<i64>::new());
        assert_eq!(*consumer.restarted.borrow(), vec![vec![(0, Some(3))]]);
        assert!(consumer.committed.borrow().is_empty());
        let report = &h.state.report;
        assert_eq!((report.fenced, report.accepted, report.flushes), (1, 0, 0));
        assert_eq!(report.dropped_on_rebalance, 5);
        assert_eq!(h.committed.load(Ordering::Relaxed), 0);
        assert_eq!(h.state.buffer.records, 0);
        let state = &h.state.partitions[&0];
        assert_eq!(state.bases.events, Some(2));
        assert_eq!(state.expect_first.map(|(offset, _)| offset), Some(3));

        // Read again from 3: only what the other worker did not store is committed.
        h.take(3, &event(3));
        h.take(4, &event(4));
        assert_eq!(h.state.flush(&consumer).expect("flush"), Flushed::Committed);
        assert_eq!(h.offsets_in("pos_events"), vec![3, 4]);
        assert_eq!(h.stored().0, Some(4));
        assert_eq!(*consumer.committed.borrow(), vec![vec![(0, 5)]]);
        assert_eq!(h.state.report.accepted, 2);
    }

    #[test]
    fn dead_letters_stored_before_a_fence_count_once_and_their_replay_is_not_rewritten() {
        let mut h = Harness::new();
        let consumer = Recorded::default();
        h.assign(Bases::default());
        h.take(0, &event(0));
        h.take(1, BAD);
        h.take(2, &event(2));
        // Another worker stored event 0 only: the dead-letter commit lands, the events
        // commit is fenced.
        h.other_worker_commits(&POS_EVENTS, None, 0);
        assert_eq!(h.state.flush(&consumer).expect("flush"), Flushed::Fenced);
        assert_eq!(h.stored(), (Some(0), Some(2)));
        assert_eq!(h.offsets_in("dead_letters"), vec![1]);
        assert_eq!(h.state.report.dead_lettered_total(), 1);
        assert_eq!(h.committed.load(Ordering::Relaxed), 1);
        assert_eq!(*consumer.restarted.borrow(), vec![vec![(0, Some(1))]]);

        // The re-read finds the dead letter stored (a replay, counted no second time)
        // and the dead-letter table is not part of the next commit (its offsets would
        // not move forward).
        h.take(1, BAD);
        h.take(2, &event(2));
        assert_eq!(h.state.report.replayed, 1);
        assert_eq!(h.state.flush(&consumer).expect("flush"), Flushed::Committed);
        assert_eq!(h.offsets_in("dead_letters"), vec![1]);
        assert_eq!(h.offsets_in("pos_events"), vec![2]);
        assert_eq!(h.stored(), (Some(2), Some(2)));
        let report = &h.state.report;
        assert_eq!((report.accepted, report.dead_lettered_total()), (1, 1));
        // Reconciliation: the other worker's 1 + accepted 1 + dead-lettered 1 = 3 read.
        assert_eq!(h.committed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_partition_whose_dead_letters_are_stored_further_is_left_out_of_their_commit() {
        let mut h = Harness::new();
        let consumer = Recorded::default();
        // Partition 0: events stored through 2, dead letters through 5 (a fence after
        // the dead-letter commit); partition 1: nothing yet.
        h.other_worker_commits_on(0, &POS_EVENTS, None, 2);
        h.other_worker_commits_on(0, &DEAD_LETTERS, None, 5);
        let stored = Bases {
            events: Some(2),
            dead_letters: Some(5),
        };
        h.state.apply_rebalances(vec![RebalanceEvent::Assigned(vec![
            (0, stored),
            (1, Bases::default()),
        ])]);
        h.take_on(0, 3, BAD); // stored already: a replay
        h.take_on(0, 4, &event(4));
        h.take_on(1, 0, BAD);
        // Were partition 0 part of the dead-letter commit, its offset would move back
        // from 5 to 4 and the lake would refuse the flush.
        assert_eq!(h.state.flush(&consumer).expect("flush"), Flushed::Committed);
        let mut sink = h.state.sink.lock().unwrap_or_else(PoisonError::into_inner);
        let bases = h.runtime.block_on(sink.bases(&[0, 1])).expect("offsets");
        drop(sink);
        assert_eq!(
            bases,
            vec![
                Bases {
                    events: Some(4),
                    dead_letters: Some(5)
                },
                Bases {
                    events: Some(0),
                    dead_letters: Some(0)
                }
            ]
        );
        assert_eq!(*consumer.committed.borrow(), vec![vec![(0, 5), (1, 1)]]);
        let report = &h.state.report;
        assert_eq!(
            (
                report.accepted,
                report.dead_lettered_total(),
                report.replayed
            ),
            (1, 1, 1)
        );
    }

    #[test]
    fn a_dead_letter_fence_commits_nothing_and_restarts() {
        let mut h = Harness::new();
        let consumer = Recorded::default();
        h.assign(Bases::default());
        h.take(0, BAD);
        h.take(1, &event(1));
        h.other_worker_commits(&DEAD_LETTERS, None, 0);
        assert_eq!(h.state.flush(&consumer).expect("flush"), Flushed::Fenced);
        assert_eq!(h.offsets_in("pos_events"), Vec::<i64>::new());
        assert_eq!(h.offsets_in("dead_letters"), Vec::<i64>::new());
        assert_eq!(h.state.report.dead_lettered_total(), 0);
        // Nothing of pos_events is stored: the partition starts again from its start.
        assert_eq!(*consumer.restarted.borrow(), vec![vec![(0, None)]]);
        assert_eq!(h.state.partitions[&0].bases.dead_letters, Some(0));
    }

    #[test]
    fn a_rebalance_before_the_flush_leaves_the_lake_untouched() {
        let mut h = Harness::new();
        let consumer = Recorded::default();
        h.assign(Bases::default());
        assert!(h.state.ever_assigned);
        assert_eq!(h.state.assignments, 1);
        h.take(0, &event(0));
        h.take(1, BAD);
        h.state.apply_rebalances(vec![RebalanceEvent::Revoked]);
        assert_eq!(h.state.flush(&consumer).expect("flush"), Flushed::Nothing);
        assert_eq!(h.stored(), (None, None));
        assert_eq!(h.state.report.dropped_on_rebalance, 2);
        assert!(consumer.committed.borrow().is_empty());

        // Assigned again mid-buffer: the buffer is dropped too, the new bases hold.
        h.assign(Bases::default());
        h.take(0, &event(0));
        h.assign(Bases {
            events: Some(0),
            dead_letters: None,
        });
        assert_eq!(h.state.report.dropped_on_rebalance, 3);
        assert_eq!(h.state.assignments, 3);
        assert_eq!(h.state.flush(&consumer).expect("flush"), Flushed::Nothing);

        // A failed assignment stops the worker with its error.
        h.state
            .apply_rebalances(vec![RebalanceEvent::Failed(Error::Config(
                "refused".into(),
            ))]);
        assert!(matches!(h.state.failed.take(), Some(Error::Config(_))));
    }

    #[test]
    fn a_failed_commit_names_the_partitions_and_offsets_it_held() {
        let mut h = Harness::new();
        let consumer = Recorded::default();
        h.assign(Bases::default());
        h.take(0, &event(0));
        h.take(1, &event(1));
        // Offsets that move back are refused by the lake: the worker thinks the lake
        // holds 5, the lake holds nothing, and the batch ends at 1.
        h.state
            .partitions
            .get_mut(&0)
            .expect("assigned")
            .bases
            .events = Some(5);
        let error = h.state.flush(&consumer).expect_err("refused").to_string();
        assert!(error.contains("p0 0..=1"), "{error}");
        assert!(error.contains(&h.state.topic), "{error}");
    }
}
