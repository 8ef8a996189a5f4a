//! Arrow builders for the bronze tables: one row per accepted event or dead letter.

use std::sync::Arc;

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use streetflow_core::card::mask_card_numbers;
use streetflow_core::tables::{
    DEAD_LETTERS, MAX_DEAD_LETTER_PAYLOAD_BYTES, POS_EVENTS, UNKNOWN_OPERATOR, month_of,
};
use streetflow_core::{
    BusinessDateCache, DecodeOptions, LocalPlace, OperatorCalendars, PosEvent, ReasonCode,
    Rejection, decode, operator_hint,
};
use streetflow_core::{Knowledge, KnowledgeSource};
use streetflow_lake::arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Array, Date32Builder, Int32Builder,
    Int64Builder, StringArray, StringBuilder, TimestampMicrosecondArray,
    TimestampMicrosecondBuilder,
};
use streetflow_lake::arrow::error::ArrowError;
use streetflow_lake::arrow::record_batch::RecordBatch;

/// The partition column of a date column: the first day of each row's month.
fn months_of(dates: &Date32Array) -> ArrayRef {
    Arc::new(Date32Array::from_iter_values(
        dates.values().iter().map(|&day| month_of(day)),
    ))
}

/// Which clock set a Kafka record's timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaTimestampKind {
    /// The producer's clock (`CreateTime`).
    CreateTime,
    /// The broker's clock when it appended the record (`LogAppendTime`).
    LogAppendTime,
}

impl KafkaTimestampKind {
    /// The value of the `kafka_timestamp_type` column.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaTimestampKind::CreateTime => "create_time",
            KafkaTimestampKind::LogAppendTime => "log_append_time",
        }
    }
}

/// A Kafka record's timestamp: kept for tracing, never used as knowledge time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaTimestamp {
    /// The instant.
    pub at: DateTime<Utc>,
    /// Whose clock set it.
    pub kind: KafkaTimestampKind,
}

/// Where a message came from.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// A Kafka record.
    Kafka {
        /// Topic.
        topic: &'a str,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// The record's timestamp, when it has one.
        timestamp: Option<KafkaTimestamp>,
    },
    /// A line of a file (backfill).
    File {
        /// Path as given.
        path: &'a str,
        /// 1-based line number.
        line: i64,
    },
}

const EPOCH: NaiveDate = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");

fn days_since_epoch(date: NaiveDate) -> i32 {
    (date - EPOCH).num_days() as i32
}

fn utc_timestamps() -> TimestampMicrosecondBuilder {
    TimestampMicrosecondBuilder::new().with_timezone("UTC")
}

/// Origin columns shared by both tables.
struct OriginColumns {
    kafka_topic: StringBuilder,
    kafka_partition: Int32Builder,
    kafka_offset: Int64Builder,
    kafka_timestamp: TimestampMicrosecondBuilder,
    kafka_timestamp_type: StringBuilder,
    source_file: StringBuilder,
    source_line: Int64Builder,
}

impl OriginColumns {
    fn new() -> Self {
        Self {
            kafka_topic: StringBuilder::new(),
            kafka_partition: Int32Builder::new(),
            kafka_offset: Int64Builder::new(),
            kafka_timestamp: utc_timestamps(),
            kafka_timestamp_type: StringBuilder::new(),
            source_file: StringBuilder::new(),
            source_line: Int64Builder::new(),
        }
    }

    fn append(&mut self, origin: &Origin<'_>) {
        match *origin {
            Origin::Kafka {
                topic,
                partition,
                offset,
                timestamp,
            } => {
                self.kafka_topic.append_value(topic);
                self.kafka_partition.append_value(partition);
                self.kafka_offset.append_value(offset);
                self.kafka_timestamp
                    .append_option(timestamp.map(|t| t.at.timestamp_micros()));
                self.kafka_timestamp_type
                    .append_option(timestamp.map(|t| t.kind.as_str()));
                self.source_file.append_null();
                self.source_line.append_null();
            }
            Origin::File { path, line } => {
                self.kafka_topic.append_null();
                self.kafka_partition.append_null();
                self.kafka_offset.append_null();
                self.kafka_timestamp.append_null();
                self.kafka_timestamp_type.append_null();
                self.source_file.append_value(path);
                self.source_line.append_value(line);
            }
        }
    }

    /// The Kafka columns (topic, partition, offset, timestamp, its type), then the file
    /// columns (file, line).
    fn finish(&mut self) -> ([ArrayRef; 5], [ArrayRef; 2]) {
        (
            [
                Arc::new(self.kafka_topic.finish()),
                Arc::new(self.kafka_partition.finish()),
                Arc::new(self.kafka_offset.finish()),
                Arc::new(self.kafka_timestamp.finish()),
                Arc::new(self.kafka_timestamp_type.finish()),
            ],
            [
                Arc::new(self.source_file.finish()),
                Arc::new(self.source_line.finish()),
            ],
        )
    }
}

/// Rows for `pos_events`.
pub struct EventRows {
    operator_id: StringBuilder,
    business_date: Date32Builder,
    event_id: StringBuilder,
    merchant_id: StringBuilder,
    terminal_id: StringBuilder,
    kind: StringBuilder,
    amount_fen: Int64Builder,
    currency: StringBuilder,
    occurred_at: TimestampMicrosecondBuilder,
    utc_offset_seconds: Int32Builder,
    local_minute_of_day: Int32Builder,
    channel: StringBuilder,
    ref_event_id: StringBuilder,
    payer_ref: StringBuilder,
    /// Asserted knowledge times; `None` for observed rows, stamped at [`EventRows::finish`].
    asserted: Vec<Option<i64>>,
    origin: OriginColumns,
    rows: usize,
}

impl Default for EventRows {
    fn default() -> Self {
        Self {
            operator_id: StringBuilder::new(),
            business_date: Date32Builder::new(),
            event_id: StringBuilder::new(),
            merchant_id: StringBuilder::new(),
            terminal_id: StringBuilder::new(),
            kind: StringBuilder::new(),
            amount_fen: Int64Builder::new(),
            currency: StringBuilder::new(),
            occurred_at: utc_timestamps(),
            utc_offset_seconds: Int32Builder::new(),
            local_minute_of_day: Int32Builder::new(),
            channel: StringBuilder::new(),
            ref_event_id: StringBuilder::new(),
            payer_ref: StringBuilder::new(),
            asserted: Vec::new(),
            origin: OriginColumns::new(),
            rows: 0,
        }
    }
}

/// The `knowledge_time` and `knowledge_source` columns of rows whose asserted times are
/// `asserted` (`None`: observed, stamped `observed_at`).
fn knowledge_columns(asserted: &[Option<i64>], observed_at: DateTime<Utc>) -> [ArrayRef; 2] {
    let stamp = observed_at.timestamp_micros();
    let times = TimestampMicrosecondArray::from_iter_values(
        asserted.iter().map(|known| known.unwrap_or(stamp)),
    )
    .with_timezone("UTC");
    let sources = StringArray::from_iter_values(asserted.iter().map(|known| match known {
        Some(_) => KnowledgeSource::Asserted.as_str(),
        None => KnowledgeSource::Observed.as_str(),
    }));
    [Arc::new(times), Arc::new(sources)]
}

/// `batch` (of `pos_events`) with its observed rows stamped `observed_at` instead: for a
/// writer whose commit missed the deadline of its first stamp.
pub fn restamp_observed(
    batch: &RecordBatch,
    observed_at: DateTime<Utc>,
) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    let time_index = schema.index_of("knowledge_time")?;
    let source_index = schema.index_of("knowledge_source")?;
    let times = batch
        .column(time_index)
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .ok_or_else(|| ArrowError::SchemaError("knowledge_time is not a timestamp".into()))?;
    let sources = batch
        .column(source_index)
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| ArrowError::SchemaError("knowledge_source is not a string".into()))?;
    let asserted: Vec<Option<i64>> = (0..batch.num_rows())
        .map(|row| {
            (sources.value(row) == KnowledgeSource::Asserted.as_str()).then(|| times.value(row))
        })
        .collect();
    let [time_column, source_column] = knowledge_columns(&asserted, observed_at);
    let mut columns = batch.columns().to_vec();
    columns[time_index] = time_column;
    columns[source_index] = source_column;
    RecordBatch::try_new(schema, columns)
}

impl EventRows {
    /// Appends one accepted event placed on its operator's calendar.
    pub fn append(
        &mut self,
        event: &PosEvent<'_>,
        place: LocalPlace,
        knowledge: Knowledge,
        origin: &Origin<'_>,
    ) {
        self.operator_id.append_value(&event.operator_id);
        self.business_date
            .append_value(days_since_epoch(place.business_date));
        self.event_id.append_value(&event.event_id);
        self.merchant_id.append_value(&event.merchant_id);
        self.terminal_id.append_option(event.terminal_id.as_deref());
        self.kind.append_value(event.kind.as_str());
        self.amount_fen.append_value(event.amount_fen);
        self.currency.append_value(event.currency.as_str());
        self.occurred_at
            .append_value(event.occurred_at.timestamp_micros());
        self.utc_offset_seconds
            .append_value(event.occurred_at.offset().local_minus_utc());
        self.local_minute_of_day
            .append_value(i32::from(place.minute_of_day));
        self.channel.append_value(event.channel.as_str());
        self.ref_event_id
            .append_option(event.ref_event_id.as_deref());
        self.payer_ref.append_option(event.payer_ref.as_deref());
        self.asserted.push(match knowledge {
            Knowledge::Observed => None,
            Knowledge::Asserted(at) => Some(at.timestamp_micros()),
        });
        self.origin.append(origin);
        self.rows += 1;
    }

    /// Rows appended since the last [`EventRows::finish`].
    pub fn len(&self) -> usize {
        self.rows
    }

    /// The `occurred_at` (µs UTC) of the row appended last.
    pub(crate) fn last_occurred_micros(&self) -> Option<i64> {
        self.occurred_at.values_slice().last().copied()
    }

    /// Sets the knowledge of every buffered row, in order (`None`: observed): for rows
    /// whose asserted time is known only once the lines before them are (the stream clock
    /// of a file load). Rows beyond `asserted` keep theirs.
    pub(crate) fn set_asserted_micros(&mut self, asserted: Vec<Option<i64>>) {
        for (row, known) in asserted.into_iter().enumerate().take(self.rows) {
            self.asserted[row] = known;
        }
    }

    /// Whether no row is buffered.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The buffered rows as a batch, observed rows stamped `observed_at` (the writer's
    /// clock just before it writes them); the builder starts empty again.
    pub fn finish(&mut self, observed_at: DateTime<Utc>) -> Result<RecordBatch, ArrowError> {
        self.rows = 0;
        let (
            [
                kafka_topic,
                kafka_partition,
                kafka_offset,
                kafka_timestamp,
                kafka_timestamp_type,
            ],
            [source_file, source_line],
        ) = self.origin.finish();
        let [knowledge_time, knowledge_source] =
            knowledge_columns(&std::mem::take(&mut self.asserted), observed_at);
        let business_date = self.business_date.finish();
        let business_month = months_of(&business_date);
        RecordBatch::try_new(
            POS_EVENTS.schema.clone(),
            vec![
                Arc::new(self.operator_id.finish()),
                Arc::new(business_date),
                Arc::new(self.event_id.finish()),
                Arc::new(self.merchant_id.finish()),
                Arc::new(self.terminal_id.finish()),
                Arc::new(self.kind.finish()),
                Arc::new(self.amount_fen.finish()),
                Arc::new(self.currency.finish()),
                Arc::new(self.occurred_at.finish()),
                Arc::new(self.utc_offset_seconds.finish()),
                Arc::new(self.local_minute_of_day.finish()),
                Arc::new(self.channel.finish()),
                Arc::new(self.ref_event_id.finish()),
                Arc::new(self.payer_ref.finish()),
                knowledge_time,
                knowledge_source,
                kafka_topic,
                kafka_partition,
                kafka_offset,
                kafka_timestamp,
                kafka_timestamp_type,
                source_file,
                source_line,
                business_month,
            ],
        )
    }

    /// Drops buffered rows.
    pub fn clear(&mut self) {
        if self.rows > 0 {
            // Finishing resets every builder; the batch is discarded.
            let _ = self.finish(DateTime::UNIX_EPOCH);
        }
    }
}

/// Rows for `dead_letters`.
pub struct DeadLetterRows {
    operator_id: StringBuilder,
    ingest_date: Date32Builder,
    reason: StringBuilder,
    detail: StringBuilder,
    payload: BinaryBuilder,
    payload_bytes: Int64Builder,
    payload_truncated: BooleanBuilder,
    message_key: BinaryBuilder,
    ingested_at: TimestampMicrosecondBuilder,
    origin: OriginColumns,
    rows: usize,
}

impl Default for DeadLetterRows {
    fn default() -> Self {
        Self {
            operator_id: StringBuilder::new(),
            ingest_date: Date32Builder::new(),
            reason: StringBuilder::new(),
            detail: StringBuilder::new(),
            payload: BinaryBuilder::new(),
            payload_bytes: Int64Builder::new(),
            payload_truncated: BooleanBuilder::new(),
            message_key: BinaryBuilder::new(),
            ingested_at: utc_timestamps(),
            origin: OriginColumns::new(),
            rows: 0,
        }
    }
}

/// One rejected message.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    /// The message's operator when it names a valid one, else `unknown`.
    pub operator_id: &'a str,
    /// Partition date of the dead letter (date of receipt in the default zone).
    pub ingest_date: NaiveDate,
    /// Why it was rejected.
    pub rejection: &'a Rejection,
    /// The raw message (`None` for a Kafka tombstone).
    pub payload: Option<&'a [u8]>,
    /// The Kafka key, if any.
    pub key: Option<&'a [u8]>,
    /// When the receiving worker (or file load) read it, by its own clock.
    pub ingested_at: DateTime<Utc>,
    /// Where it came from.
    pub origin: Origin<'a>,
}

impl DeadLetterRows {
    /// Appends one dead letter; card numbers in the payload are masked and payloads over
    /// 1 MiB truncated (the original length is kept).
    pub fn append(&mut self, letter: &DeadLetter<'_>) {
        self.operator_id.append_value(letter.operator_id);
        self.ingest_date
            .append_value(days_since_epoch(letter.ingest_date));
        self.reason.append_value(letter.rejection.reason.as_str());
        self.detail.append_value(&letter.rejection.detail);
        match letter.payload {
            Some(raw) => {
                let kept = &raw[..raw.len().min(MAX_DEAD_LETTER_PAYLOAD_BYTES)];
                self.payload.append_value(mask_card_numbers(kept));
                self.payload_bytes.append_value(raw.len() as i64);
                self.payload_truncated.append_value(kept.len() < raw.len());
            }
            None => {
                self.payload.append_null();
                self.payload_bytes.append_value(0);
                self.payload_truncated.append_value(false);
            }
        }
        self.message_key
            .append_option(letter.key.map(|k| mask_card_numbers(k).into_owned()));
        self.ingested_at
            .append_value(letter.ingested_at.timestamp_micros());
        self.origin.append(&letter.origin);
        self.rows += 1;
    }

    /// Rows appended since the last [`DeadLetterRows::finish`].
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no row is buffered.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The buffered rows as a batch; the builder starts empty again.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        self.rows = 0;
        let (
            [
                kafka_topic,
                kafka_partition,
                kafka_offset,
                kafka_timestamp,
                kafka_timestamp_type,
            ],
            [source_file, source_line],
        ) = self.origin.finish();
        let ingest_date = self.ingest_date.finish();
        let ingest_month = months_of(&ingest_date);
        RecordBatch::try_new(
            DEAD_LETTERS.schema.clone(),
            vec![
                Arc::new(self.operator_id.finish()),
                Arc::new(ingest_date),
                Arc::new(self.reason.finish()),
                Arc::new(self.detail.finish()),
                Arc::new(self.payload.finish()),
                Arc::new(self.payload_bytes.finish()),
                Arc::new(self.payload_truncated.finish()),
                Arc::new(self.message_key.finish()),
                Arc::new(self.ingested_at.finish()),
                kafka_topic,
                kafka_partition,
                kafka_offset,
                kafka_timestamp,
                kafka_timestamp_type,
                source_file,
                source_line,
                ingest_month,
            ],
        )
    }

    /// Drops buffered rows.
    pub fn clear(&mut self) {
        if self.rows > 0 {
            let _ = self.finish();
        }
    }
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// An accepted event row.
    Event,
    /// A dead-letter row with this rejection.
    DeadLetter(Rejection),
    /// Rejected, but the dead-letter table already holds it (a replay): nothing added.
    DeadLetterAlreadyStored(ReasonCode),
}

/// Decodes messages into event and dead-letter rows: the one path shared by the Kafka
/// workers and file loads, so both give the same rows for the same bytes.
#[derive(Debug)]
pub struct RowAppender {
    decode_options: DecodeOptions,
    calendars: OperatorCalendars,
    date_caches: HashMap<String, BusinessDateCache>,
}

impl RowAppender {
    /// An appender with the pipeline's decoder limits and business calendars.
    pub fn new(decode_options: DecodeOptions, calendars: OperatorCalendars) -> Self {
        Self {
            decode_options,
            calendars,
            date_caches: HashMap::new(),
        }
    }

    /// Decodes one message (`None`: a Kafka tombstone) that the worker's own clock read
    /// as `received_at`, and appends its row with `knowledge`. A rejected message is not
    /// appended when `dead_letter_already_stored` says the dead-letter table holds it.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        events: &mut EventRows,
        dead_letters: &mut DeadLetterRows,
        payload: Option<&[u8]>,
        key: Option<&[u8]>,
        received_at: DateTime<Utc>,
        knowledge: Knowledge,
        origin: Origin<'_>,
        dead_letter_already_stored: bool,
    ) -> Appended {
        self.append_with_raw(
            events,
            dead_letters,
            payload,
            payload,
            key,
            received_at,
            knowledge,
            origin,
            dead_letter_already_stored,
        )
    }

    /// Like [`RowAppender::append`] for a message converted from another form (a CSV
    /// row turned into the event JSON): `message` is decoded, and a dead letter keeps
    /// `raw`, the input as the operator wrote it.
    #[allow(clippy::too_many_arguments)]
    pub fn append_with_raw(
        &mut self,
        events: &mut EventRows,
        dead_letters: &mut DeadLetterRows,
        message: Option<&[u8]>,
        raw: Option<&[u8]>,
        key: Option<&[u8]>,
        received_at: DateTime<Utc>,
        knowledge: Knowledge,
        origin: Origin<'_>,
        dead_letter_already_stored: bool,
    ) -> Appended {
        let payload = message;
        let result = match payload {
            Some(bytes) => decode(bytes, received_at, &self.decode_options),
            None => Err(Rejection {
                reason: ReasonCode::EmptyMessage,
                detail: "Kafka tombstone (null value)".to_owned(),
            }),
        };
        match result {
            Ok(event) => {
                let cache = match self.date_caches.get_mut(event.operator_id.as_ref()) {
                    Some(cache) => cache,
                    None => self
                        .date_caches
                        .entry(event.operator_id.to_string())
                        .or_insert_with(|| {
                            BusinessDateCache::new(*self.calendars.for_operator(&event.operator_id))
                        }),
                };
                let place = cache.locate(event.occurred_at.timestamp_micros());
                events.append(&event, place, knowledge, &origin);
                Appended::Event
            }
            Err(rejection) if dead_letter_already_stored => {
                Appended::DeadLetterAlreadyStored(rejection.reason)
            }
            Err(rejection) => {
                let operator = payload.and_then(operator_hint);
                let ingest_date = self
                    .calendars
                    .default_calendar()
                    .local_time(&received_at)
                    .date();
                dead_letters.append(&DeadLetter {
                    operator_id: operator.as_deref().unwrap_or(UNKNOWN_OPERATOR),
                    ingest_date,
                    rejection: &rejection,
                    payload: raw,
                    key,
                    ingested_at: received_at,
                    origin,
                });
                Appended::DeadLetter(rejection)
            }
        }
    }
}
