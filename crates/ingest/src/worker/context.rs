//! librdkafka's callbacks: assignments start where the lake says (and are refused when the
//! topic ends before the lake's offsets), fetch ends and lag come from the statistics.

use super::*;

/// librdkafka callbacks: assignments start where the lake says, and lag is exported.
pub(super) struct IngestContext {
    pub(super) handle: Handle,
    pub(super) topic: String,
    pub(super) sink: Arc<Mutex<Sink>>,
    pub(super) events: Mutex<Vec<RebalanceEvent>>,
    /// Per partition, the highest end (last stable offset) this worker's fetch responses
    /// carried (librdkafka's statistics, every `statistics.interval.ms`): see
    /// [`watermarks`]. A topic recreated under a running worker makes these too high: its
    /// end check then waits, says so and (in a batch run) fails, never skips.
    pub(super) fetched_high: Mutex<HashMap<i32, i64>>,
    /// The worker's consumer settings, for a probe of a partition's end
    /// ([`crate::end_probe`]).
    pub(super) probe_config: ClientConfig,
}

impl IngestContext {
    pub(super) fn push(&self, event: RebalanceEvent) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
    }

    pub(super) fn fetched_high(&self, partition: i32) -> Option<i64> {
        self.fetched_high
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&partition)
            .copied()
    }

    pub(super) fn take_events(&self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(super) fn assign(
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
pub(super) struct Shorter {
    pub(super) partition: i32,
    pub(super) stored: i64,
    pub(super) high: i64,
    pub(super) refusal: Error,
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
    pub(super) fn confirm_shorter(&self, shorter: Vec<Shorter>) -> Result<()> {
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

/// A partition's low and high watermarks: the broker's answer to a query (ListOffsets),
/// its high raised to the highest end this consumer's fetch responses carried
/// ([`IngestContext::fetched_high`]). Both are lower bounds of the partition's end; the query
/// alone is not always right: Tansu 0.6 on S3 answers "latest" with the batch its store
/// stamped last (one-second timestamps), far below the end when many batches share that
/// second, and a worker trusting it took unread partitions for read to their end.
pub(super) fn watermarks(
    consumer: &BaseConsumer<IngestContext>,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> KafkaResult<(i64, i64)> {
    let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
    let fetched = consumer.context().fetched_high(partition).unwrap_or(-1);
    Ok((low, high.max(fetched)))
}
