//! The commit protocol: a flush commits dead letters, then events, each fenced by the
//! offsets the worker started from; then the DLQ topic and the group offsets.

use super::*;

impl Worker {
    /// Writes the buffer: dead letters, then events, then group offsets. An error names
    /// the partitions and offset ranges the buffer held.
    pub(super) fn flush(&mut self) -> Result<()> {
        let ranges: Vec<String> = self
            .state
            .partitions
            .iter()
            .filter_map(|(partition, s)| {
                Some(format!(
                    "p{partition} {}..={}",
                    s.first_buffered?, s.last_buffered?
                ))
            })
            .collect();
        self.flush_buffer().map_err(|source| Error::Flush {
            ranges: format!("{} {}", self.state.topic, ranges.join(", ")),
            source: Box::new(source),
        })
    }

    /// [`Worker::flush`] without the ranges in its error.
    fn flush_buffer(&mut self) -> Result<()> {
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
            self.count_dead_letters_committed();
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
            committed.fetch_add(accepted, Ordering::Relaxed);
        }
        self.state.report.accepted += accepted;
        self.state.report.flushes += 1;
        tracing::debug!(records, accepted, "flushed");
        self.state.buffer.clear();
        Ok(())
    }

    /// Counts the buffered dead letters as stored, once their commit landed. Counted here,
    /// not after the events commit: when that one is fenced, the dead letters stay in
    /// the lake, and whoever reads their records again finds them stored (a replay), so
    /// no one else would ever count them and `consumed = accepted + dead-lettered`
    /// would miss them.
    fn count_dead_letters_committed(&mut self) {
        let buffer = &mut self.state.buffer;
        let dead: u64 = buffer.dead_by_reason.values().sum();
        if let Some(committed) = &self.state.options.committed {
            committed.fetch_add(dead, Ordering::Relaxed);
        }
        for (reason, n) in std::mem::take(&mut buffer.dead_by_reason) {
            metrics::counter!(names::RECORDS_DEAD_LETTERED, "reason" => reason).increment(n);
            *self
                .state
                .report
                .dead_lettered
                .entry(reason.to_owned())
                .or_default() += n;
        }
    }

    /// Runs the after-commit hook (the binary uses it to refresh `merchant_daily`).
    pub(super) fn after_commit(&mut self) {
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
    pub(super) fn commit_events(
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
    pub(super) fn fenced(&mut self) -> Result<()> {
        metrics::counter!(names::FENCED).increment(1);
        self.state.report.fenced += 1;
        let partitions: Vec<i32> = self.state.partitions.keys().copied().collect();
        // The partitions start again where the lake says: gaps found under the old
        // positions, and the watch over their probes, no longer apply.
        self.state.intake().revoked();
        self.state.discard_staged();
        self.moved_back_probe.clear();
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
        }
        self.state
            .intake()
            .assigned(partitions.into_iter().zip(bases).collect());
        self.consumer
            .assign(&tpl)
            .map_err(Error::kafka("reassign after fence"))?;
        Ok(())
    }

    /// Publishes the buffered dead letters to the DLQ topic and waits until the brokers
    /// acknowledged every one; any failure fails the flush (nothing is committed, and the
    /// restarted worker reads and publishes them again).
    pub(super) fn publish_dead_letters(&mut self) -> Result<()> {
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
