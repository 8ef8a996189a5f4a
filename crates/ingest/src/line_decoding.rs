//! A file's lines decoded on several threads, handed back in file order.
//!
//! Decoding and validating a line costs about 0.6 µs of one core, more than reading,
//! encoding or resolving it, so a load that decodes on one thread leaves the other cores
//! idle. The reader cuts the file into chunks of lines, each decoder thread turns whole
//! chunks into rows, and the reader takes the rows back in the order it cut them.
//! Everything that depends on the lines before (the stream clock of
//! [`KnowledgeTime::FromOccurred`], line counts, commit points) stays with the reader,
//! so the rows are those one thread would give, whatever the number of threads.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::thread::JoinHandle;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use streetflow_core::tables::{DEAD_LETTERS, POS_EVENTS};
use streetflow_core::{DecodeOptions, Knowledge, OperatorCalendars};
use streetflow_lake::arrow::record_batch::RecordBatch;

use crate::backfill::KnowledgeTime;
use crate::batch::{Appended, DeadLetterRows, EventRows, Origin, RowAppender};
use crate::error::{Error, Result};
use crate::produce::StreamClock;

/// Lines a decoder takes at a time: large enough that handing chunks around costs
/// nothing next to decoding them, small enough that a commit point is never far.
pub(crate) const CHUNK_LINES: usize = 16_384;

/// Chunks each decoder may hold (queued or being decoded) before the reader waits.
const CHUNKS_PER_DECODER: usize = 2;

/// Decoders a load starts at most: the Parquet writer and the silver builders need cores
/// too, and each decoder holds up to [`CHUNKS_PER_DECODER`] chunks in memory.
const MAX_DECODERS: usize = 8;

/// One line of a chunk: where its bytes are in [`LineChunk::bytes`].
#[derive(Debug, Clone, Copy)]
struct ChunkLine {
    /// 1-based line (CSV: record) number in the file.
    number: i64,
    /// The message to decode.
    message: (usize, usize),
    /// The input as the operator wrote it, for a dead letter (`None`: the message).
    raw: Option<(usize, usize)>,
}

/// Where a chunk was cut, handed back with its rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ChunkMark {
    /// The last line read when it was cut: every line up to here is in it or before it.
    pub(crate) last_line: i64,
    /// Commit here once its rows are written (the line, and whether the file ends).
    pub(crate) checkpoint: Option<(i64, bool)>,
}

/// Lines cut from a file, in order.
#[derive(Debug, Default)]
pub(crate) struct LineChunk {
    bytes: Vec<u8>,
    lines: Vec<ChunkLine>,
    /// The `occurred_at` of each line, when the reader found it itself (CSV); `None`:
    /// the decoder reads it from the line's JSON (only for [`KnowledgeTime::FromOccurred`]).
    occurred: Option<Vec<Option<i64>>>,
    mark: ChunkMark,
}

impl LineChunk {
    /// Lines held.
    pub(crate) fn len(&self) -> usize {
        self.lines.len()
    }

    /// Bytes held.
    pub(crate) fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// Appends a JSON line, read onto the end of [`LineChunk::buffer`] by the caller:
    /// the bytes from `start` on, without the line ending.
    pub(crate) fn push_read_line(&mut self, number: i64, start: usize) {
        let mut end = self.bytes.len();
        if self.bytes[start..end].ends_with(b"\n") {
            end -= 1;
        }
        if self.bytes[start..end].ends_with(b"\r") {
            end -= 1;
        }
        self.lines.push(ChunkLine {
            number,
            message: (start, end),
            raw: None,
        });
    }

    /// Where a caller reads the next line's bytes to (then [`LineChunk::push_read_line`]).
    pub(crate) fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Appends a converted line: `message` is decoded, `raw` kept for a dead letter, and
    /// `occurred` is the line's `occurred_at` as the reader found it.
    pub(crate) fn push_converted(
        &mut self,
        number: i64,
        message: &[u8],
        raw: &[u8],
        occurred: Option<i64>,
    ) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(message);
        let middle = self.bytes.len();
        self.bytes.extend_from_slice(raw);
        self.lines.push(ChunkLine {
            number,
            message: (start, middle),
            raw: Some((middle, self.bytes.len())),
        });
        self.occurred.get_or_insert_with(Vec::new).push(occurred);
    }
}

/// What a decoder made of one chunk.
struct DecodedChunk {
    /// Event rows; under [`KnowledgeTime::FromOccurred`] their knowledge is set by the
    /// reader before they are finished.
    events: EventRows,
    dead_letters: RecordBatch,
    /// The `occurred_at` of every line (only under [`KnowledgeTime::FromOccurred`]).
    occurred: Vec<Option<i64>>,
    /// For each event row, the index of its line in the chunk (same mode only).
    event_lines: Vec<u32>,
    mark: ChunkMark,
}

/// What the reader gets back for a chunk, in the order chunks were given.
pub(crate) struct DecodedRows {
    /// Rows for `pos_events` (observed rows stamped at the writer).
    pub(crate) events: RecordBatch,
    /// Rows for `dead_letters`.
    pub(crate) dead_letters: RecordBatch,
    /// Where the chunk was cut.
    pub(crate) mark: ChunkMark,
}

/// Where a load stands: lines a previous run stored are decoded no more.
#[derive(Debug, Clone)]
pub(crate) struct LoadPosition {
    /// Path as given (the `source_file` column).
    pub(crate) path: String,
    /// Lines at or below this are in `pos_events` already.
    pub(crate) events_done: i64,
    /// Dead letters at or below this are in `dead_letters` already.
    pub(crate) dead_letters_done: i64,
}

#[derive(Deserialize)]
struct OccurredProbe<'a> {
    #[serde(borrow, default)]
    occurred_at: Option<std::borrow::Cow<'a, str>>,
}

/// The `occurred_at` of a JSON line that may not decode as an event.
fn probe_occurred(message: &[u8]) -> Option<i64> {
    let probe: OccurredProbe<'_> = serde_json::from_slice(message).ok()?;
    let occurred = streetflow_core::time::parse_rfc3339(probe.occurred_at.as_deref()?)?;
    Some(occurred.timestamp_millis())
}

/// One decoder thread's state.
struct Decoder {
    appender: RowAppender,
    knowledge: KnowledgeTime,
    position: LoadPosition,
}

impl Decoder {
    fn decode(&mut self, chunk: LineChunk) -> Result<DecodedChunk> {
        let from_occurred = self.knowledge == KnowledgeTime::FromOccurred;
        let knowledge = match self.knowledge {
            KnowledgeTime::Observed => Knowledge::Observed,
            KnowledgeTime::At(at) => Knowledge::Asserted(at),
            // Set by the reader, which runs the clock over the lines in order.
            KnowledgeTime::FromOccurred => Knowledge::Asserted(DateTime::UNIX_EPOCH),
        };
        // The times of JSON lines are read here: an accepted event's from its row (the
        // decoder parsed the same field with the same rules: it rejects repeated keys),
        // any other line's by a lenient parse of its own.
        let probe = from_occurred && chunk.occurred.is_none();
        let mut occurred = match (from_occurred, chunk.occurred) {
            (true, Some(known)) => known,
            (true, None) => Vec::with_capacity(chunk.lines.len()),
            (false, _) => Vec::new(),
        };
        let mut events = EventRows::default();
        let mut dead_letters = DeadLetterRows::default();
        let mut event_lines = Vec::new();
        let mut received_at = Utc::now();
        for (index, line) in chunk.lines.iter().enumerate() {
            if line.number <= self.position.events_done {
                if probe {
                    occurred.push(probe_occurred(&chunk.bytes[line.message.0..line.message.1]));
                }
                continue;
            }
            // The loader's own clock, for `future_timestamp` and dead letters: it moves
            // little within a chunk, and the tolerance is minutes.
            if index % 4096 == 4095 {
                received_at = Utc::now();
            }
            let message = &chunk.bytes[line.message.0..line.message.1];
            let raw = line
                .raw
                .map_or(message, |(start, end)| &chunk.bytes[start..end]);
            let appended = self.appender.append_with_raw(
                &mut events,
                &mut dead_letters,
                Some(message),
                Some(raw),
                None,
                received_at,
                knowledge,
                Origin::File {
                    path: &self.position.path,
                    line: line.number,
                },
                line.number <= self.position.dead_letters_done,
            );
            if from_occurred && appended == Appended::Event {
                event_lines.push(index as u32);
            }
            if probe {
                occurred.push(match appended {
                    Appended::Event => events.last_occurred_micros().map(|at| at.div_euclid(1000)),
                    _ => probe_occurred(message),
                });
            }
        }
        occurred.truncate(chunk.lines.len());
        let dead_letters = dead_letters.finish().map_err(|source| Error::Arrow {
            table: DEAD_LETTERS.name,
            source,
        })?;
        Ok(DecodedChunk {
            events,
            dead_letters,
            occurred,
            event_lines,
            mark: chunk.mark,
        })
    }
}

/// A decoder thread and its two queues.
struct Worker {
    chunks: Option<SyncSender<LineChunk>>,
    decoded: Receiver<Result<DecodedChunk>>,
    thread: Option<JoinHandle<()>>,
}

/// Decoder threads fed chunks in turn, read back in the same turn.
pub(crate) struct DecoderPool {
    workers: Vec<Worker>,
    /// The worker of each chunk given and not yet taken back, oldest first.
    in_flight: VecDeque<usize>,
    next_worker: usize,
    knowledge: KnowledgeTime,
    clock: StreamClock,
}

impl DecoderPool {
    /// `threads` decoders (at least one) for a load at `position`.
    pub(crate) fn new(
        threads: usize,
        decode_options: DecodeOptions,
        calendars: &OperatorCalendars,
        knowledge: KnowledgeTime,
        position: &LoadPosition,
    ) -> Result<Self> {
        let mut workers = Vec::new();
        for index in 0..threads.max(1) {
            let (chunk_sender, chunk_receiver) = sync_channel::<LineChunk>(CHUNKS_PER_DECODER);
            let (decoded_sender, decoded) = sync_channel(CHUNKS_PER_DECODER);
            let mut decoder = Decoder {
                appender: RowAppender::new(decode_options, calendars.clone()),
                knowledge,
                position: position.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("line-decoder-{index}"))
                .spawn(move || {
                    for chunk in chunk_receiver {
                        if decoded_sender.send(decoder.decode(chunk)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| Error::Backfill(format!("starting a line decoder: {e}")))?;
            workers.push(Worker {
                chunks: Some(chunk_sender),
                decoded,
                thread: Some(thread),
            });
        }
        Ok(DecoderPool {
            workers,
            in_flight: VecDeque::new(),
            next_worker: 0,
            knowledge,
            clock: StreamClock::default(),
        })
    }

    /// One decoder per available core, at most [`MAX_DECODERS`].
    pub(crate) fn per_core(
        decode_options: DecodeOptions,
        calendars: &OperatorCalendars,
        knowledge: KnowledgeTime,
        position: &LoadPosition,
    ) -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self::new(
            cores.min(MAX_DECODERS),
            decode_options,
            calendars,
            knowledge,
            position,
        )
    }

    /// Whether every decoder holds as many chunks as it may: take one back first.
    pub(crate) fn is_full(&self) -> bool {
        self.in_flight.len() >= self.workers.len() * CHUNKS_PER_DECODER
    }

    /// Gives the next chunk, cut at `mark`, to the next decoder.
    pub(crate) fn give(&mut self, mut chunk: LineChunk, mark: ChunkMark) -> Result<()> {
        chunk.mark = mark;
        let worker = self.next_worker;
        self.next_worker = (worker + 1) % self.workers.len();
        let sent = match &self.workers[worker].chunks {
            Some(queue) => queue.send(chunk).is_ok(),
            None => false,
        };
        if !sent {
            return Err(self.stopped(worker));
        }
        self.in_flight.push_back(worker);
        Ok(())
    }

    /// Why a decoder thread stopped: its panic, joined.
    fn stopped(&mut self, worker: usize) -> Error {
        self.workers[worker].chunks = None;
        let panic = self.workers[worker]
            .thread
            .take()
            .and_then(|thread| thread.join().err())
            .map(|payload| {
                payload
                    .downcast_ref::<&str>()
                    .map(|text| (*text).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned())
            });
        Error::Backfill(match panic {
            Some(message) => format!("a line decoder thread panicked: {message}"),
            None => "a line decoder thread stopped".to_owned(),
        })
    }

    /// The rows of the oldest chunk given (waits for its decoder), with the knowledge of
    /// [`KnowledgeTime::FromOccurred`] set from the clock run over its lines in order.
    pub(crate) fn take(&mut self) -> Result<Option<DecodedRows>> {
        let Some(&worker) = self.in_flight.front() else {
            return Ok(None);
        };
        let decoded = self.workers[worker].decoded.recv();
        self.in_flight.pop_front();
        match decoded {
            Ok(decoded) => self.finish(decoded?).map(Some),
            Err(_) => Err(self.stopped(worker)),
        }
    }

    /// [`DecoderPool::take`] if the oldest chunk's rows are ready, without waiting.
    pub(crate) fn take_ready(&mut self) -> Result<Option<DecodedRows>> {
        let Some(&worker) = self.in_flight.front() else {
            return Ok(None);
        };
        match self.workers[worker].decoded.try_recv() {
            Ok(decoded) => {
                self.in_flight.pop_front();
                self.finish(decoded?).map(Some)
            }
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => {
                self.in_flight.pop_front();
                Err(self.stopped(worker))
            }
        }
    }

    /// Sets the knowledge of a decoded chunk's rows and finishes them.
    fn finish(&mut self, mut decoded: DecodedChunk) -> Result<DecodedRows> {
        if self.knowledge == KnowledgeTime::FromOccurred {
            // The clock runs over lines a previous run committed too, so a resumed load
            // stamps the rest as an uninterrupted one would.
            let arrivals: Vec<i64> = decoded
                .occurred
                .iter()
                .map(|&occurred| {
                    if let Some(at) = occurred {
                        self.clock.observe(at);
                    }
                    DateTime::from_timestamp_millis(self.clock.arrival_ms(occurred))
                        .unwrap_or_else(Utc::now)
                        .timestamp_micros()
                })
                .collect();
            let asserted = decoded
                .event_lines
                .iter()
                .map(|&line| arrivals.get(line as usize).copied().map(Some))
                .collect::<Option<Vec<_>>>()
                .filter(|asserted| asserted.len() == decoded.events.len())
                .ok_or_else(|| {
                    Error::Backfill("decoded rows and the lines they came from disagree".to_owned())
                })?;
            decoded.events.set_asserted_micros(asserted);
        }
        // Observed rows are stamped again by the writer at their commit.
        let events = decoded
            .events
            .finish(Utc::now())
            .map_err(|source| Error::Arrow {
                table: POS_EVENTS.name,
                source,
            })?;
        Ok(DecodedRows {
            events,
            dead_letters: decoded.dead_letters,
            mark: decoded.mark,
        })
    }
}

impl Drop for DecoderPool {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            // Closing its queue ends the thread once it has handed back what it holds.
            worker.chunks = None;
        }
        for worker in &mut self.workers {
            // Drain so a thread blocked on a full result queue can finish.
            while worker.decoded.recv().is_ok() {}
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streetflow_lake::arrow::array::{Array, ArrayRef, AsArray};
    use streetflow_lake::arrow::compute::concat_batches;
    use streetflow_lake::arrow::datatypes::{Int64Type, TimestampMicrosecondType};

    fn event(line: usize, occurred: &str) -> String {
        format!(
            r#"{{"event_id":"e{line}","operator_id":"op","merchant_id":"m{m}","terminal_id":"t1","kind":"sale","amount_fen":{amount},"currency":"CNY","occurred_at":"{occurred}","channel":"wechat"}}"#,
            m = line % 3,
            amount = 100 + line
        )
    }

    /// A file with good events, a clock that jumps back and forth, and bad lines (one
    /// of them with a time the clock still reads).
    fn lines() -> Vec<String> {
        let mut lines = Vec::new();
        for line in 1..=200 {
            let day = 1 + (line / 20) % 28;
            let hour = (line * 7) % 24;
            let mut text = event(line, &format!("2025-03-{day:02}T{hour:02}:15:00+08:00"));
            if line % 37 == 0 {
                text = format!(r#"{{"occurred_at":"2025-04-01T10:00:00+08:00","oops":{line}}}"#);
            } else if line % 41 == 0 {
                text = "not json".to_owned();
            } else if line == 50 {
                // An old line far behind the clock.
                text = event(line, "2019-01-01T10:00:00+08:00");
            }
            lines.push(text);
        }
        lines
    }

    /// Decodes `lines` as a load at `position` would, in chunks of `chunk_lines`.
    fn decode_all(
        lines: &[String],
        threads: usize,
        chunk_lines: usize,
        knowledge: KnowledgeTime,
        position: &LoadPosition,
    ) -> (RecordBatch, RecordBatch) {
        let mut pool = DecoderPool::new(
            threads,
            DecodeOptions::default(),
            &OperatorCalendars::default(),
            knowledge,
            position,
        )
        .unwrap();
        let mut events = Vec::new();
        let mut dead_letters = Vec::new();
        let mut collect = |rows: DecodedRows| {
            events.push(rows.events);
            dead_letters.push(rows.dead_letters);
        };
        for (chunk_index, piece) in lines.chunks(chunk_lines).enumerate() {
            let mut chunk = LineChunk::default();
            for (offset, text) in piece.iter().enumerate() {
                let start = chunk.byte_len();
                chunk.buffer().extend_from_slice(text.as_bytes());
                chunk.buffer().extend_from_slice(b"\r\n");
                chunk.push_read_line((chunk_index * chunk_lines + offset + 1) as i64, start);
            }
            if pool.is_full() {
                collect(pool.take().unwrap().unwrap());
            }
            pool.give(chunk, ChunkMark::default()).unwrap();
        }
        while let Some(rows) = pool.take().unwrap() {
            collect(rows);
        }
        (
            concat_batches(&POS_EVENTS.schema, &events).unwrap(),
            concat_batches(&DEAD_LETTERS.schema, &dead_letters).unwrap(),
        )
    }

    /// The old reader: one thread, the clock run line by line before each decode.
    fn one_thread_in_order(
        lines: &[String],
        knowledge: KnowledgeTime,
        position: &LoadPosition,
    ) -> (RecordBatch, RecordBatch) {
        let mut appender = RowAppender::new(DecodeOptions::default(), OperatorCalendars::default());
        let mut clock = StreamClock::default();
        let mut events = EventRows::default();
        let mut dead_letters = DeadLetterRows::default();
        for (index, text) in lines.iter().enumerate() {
            let number = index as i64 + 1;
            let known = match knowledge {
                KnowledgeTime::Observed => Knowledge::Observed,
                KnowledgeTime::At(at) => Knowledge::Asserted(at),
                KnowledgeTime::FromOccurred => {
                    let occurred = probe_occurred(text.as_bytes());
                    if let Some(at) = occurred {
                        clock.observe(at);
                    }
                    let arrival = clock.arrival_ms(occurred);
                    Knowledge::Asserted(DateTime::from_timestamp_millis(arrival).unwrap())
                }
            };
            if number <= position.events_done {
                continue;
            }
            appender.append_with_raw(
                &mut events,
                &mut dead_letters,
                Some(text.as_bytes()),
                Some(text.as_bytes()),
                None,
                Utc::now(),
                known,
                Origin::File {
                    path: &position.path,
                    line: number,
                },
                number <= position.dead_letters_done,
            );
        }
        (
            events.finish(Utc::now()).unwrap(),
            dead_letters.finish().unwrap(),
        )
    }

    fn column<'a>(batch: &'a RecordBatch, name: &str) -> &'a ArrayRef {
        batch.column_by_name(name).unwrap()
    }

    /// The columns that do not depend on the wall clock of the run.
    fn stable(events: &RecordBatch, dead_letters: &RecordBatch) -> (RecordBatch, RecordBatch) {
        let without = |batch: &RecordBatch, clocked: &str| {
            let skip = batch.schema().index_of(clocked).unwrap();
            let keep: Vec<usize> = (0..batch.num_columns()).filter(|&c| c != skip).collect();
            batch.project(&keep).unwrap()
        };
        let observed = column(events, "knowledge_source")
            .as_string::<i32>()
            .iter()
            .any(|source| source == Some("observed"));
        let events = if observed {
            // Stamped when the rows are finished.
            without(events, "knowledge_time")
        } else {
            events.clone()
        };
        (events, without(dead_letters, "ingested_at"))
    }

    fn position(events_done: i64, dead_letters_done: i64) -> LoadPosition {
        LoadPosition {
            path: "file.jsonl".to_owned(),
            events_done,
            dead_letters_done,
        }
    }

    #[test]
    fn rows_are_those_of_one_thread_reading_in_order() {
        let lines = lines();
        for knowledge in [
            KnowledgeTime::FromOccurred,
            KnowledgeTime::At(DateTime::from_timestamp(1_750_000_000, 0).unwrap()),
            KnowledgeTime::Observed,
        ] {
            for at in [position(0, 0), position(120, 130)] {
                let (events, dead) = one_thread_in_order(&lines, knowledge, &at);
                let expected = stable(&events, &dead);
                if at.events_done == 0 {
                    assert_eq!(expected.0.num_rows() + expected.1.num_rows(), lines.len());
                    // Lines 37, 74, … and 41, 82, …: the 2019 line is an event.
                    assert_eq!(expected.1.num_rows(), 9);
                }
                for (threads, chunk_lines) in [(1, 1000), (2, 7), (3, 1), (4, 64), (3, 200)] {
                    let (events, dead) = decode_all(&lines, threads, chunk_lines, knowledge, &at);
                    assert_eq!(
                        stable(&events, &dead),
                        expected,
                        "{threads} threads, chunks of {chunk_lines}, {knowledge:?}, {at:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_clock_from_occurred_runs_in_file_order_over_skipped_lines_too() {
        let lines = lines();
        let (whole, _) = decode_all(
            &lines,
            1,
            1000,
            KnowledgeTime::FromOccurred,
            &position(0, 0),
        );
        // A resumed load: the first 120 lines are stored, the dead letters up to 130.
        let (rest, dead) = decode_all(
            &lines,
            3,
            9,
            KnowledgeTime::FromOccurred,
            &position(120, 130),
        );
        let line_of = |batch: &RecordBatch| -> Vec<i64> {
            column(batch, "source_line")
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        };
        assert!(line_of(&rest).iter().all(|&line| line > 120));
        assert!(line_of(&dead).iter().all(|&line| line > 130));
        let skipped = whole.num_rows() - rest.num_rows();
        assert_eq!(whole.slice(skipped, rest.num_rows()), rest);
        // A row is never known before it happened.
        let known = column(&rest, "knowledge_time").as_primitive::<TimestampMicrosecondType>();
        let occurred = column(&rest, "occurred_at").as_primitive::<TimestampMicrosecondType>();
        for row in 0..rest.num_rows() {
            assert!(known.value(row) >= occurred.value(row), "row {row}");
        }
        let sources = column(&rest, "knowledge_source").as_string::<i32>();
        assert!(sources.iter().all(|source| source == Some("asserted")));
        assert_eq!(known.null_count(), 0);
    }
}
