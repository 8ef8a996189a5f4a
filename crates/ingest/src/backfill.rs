//! Batch loads of operator exports into bronze: the streaming path's decoder and row
//! builders, with a file's identity and line numbers in place of Kafka offsets.
//!
//! A file is known by a hash of its size and its first and last MiB, so a renamed or
//! copied export is recognised and a changed one is not. Its progress lives in the same
//! Delta `txn` actions as a Kafka partition's: application id `backfill-<identity>-0`,
//! version = the last line committed, in `dead_letters` and `pos_events`, committed in
//! that order (as the workers do). A load that stops anywhere resumes after the last
//! `pos_events` commit, and the final commit also records `backfill-<identity>-eof`, so a
//! re-run of a loaded file reads nothing and adds nothing.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use streetflow_core::tables::{DEAD_LETTERS, POS_EVENTS};
use streetflow_core::{Knowledge, PipelineConfig};
use streetflow_lake::arrow::record_batch::RecordBatch;
use streetflow_lake::{AppProgress, CommitOutcome, Lake, OffsetWriter};
use tokio::sync::mpsc;

use crate::batch::{DeadLetterRows, EventRows, Origin, RowAppender, restamp_observed};
use crate::csv_input::{CsvMapping, row_as_csv};
use crate::error::{Error, Result};
use crate::produce::StreamClock;
use streetflow_lake::freeze::{self, points};

/// The knowledge time of backfilled rows: when the bank came to hold the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnowledgeTime {
    /// Observed (the default): the lake's own stamp at each commit of the load, as for
    /// streamed events. Features as of an earlier knowledge time never see these rows.
    Observed,
    /// Asserted: one instant for every row, for history the bank says it held then
    /// (recorded as `knowledge_source = 'asserted'`).
    At(DateTime<Utc>),
    /// Asserted: the arrival time a stream would have given, the latest `occurred_at`
    /// seen so far in the file (never moving back, ignoring jumps of more than 30 days),
    /// as `streetflow produce` stamps Kafka records. For history the bank really held at
    /// the time, e.g. a re-load of what was streamed.
    FromOccurred,
}

/// How a file is read.
#[derive(Debug, Clone)]
pub enum InputFormat {
    /// One event JSON object per line; `.gz` files are decompressed.
    JsonLines,
    /// CSV with a mapping onto the event contract.
    Csv(Arc<CsvMapping>),
}

/// How a backfill runs.
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// Pipeline settings (decoder limits, calendars).
    pub config: PipelineConfig,
    /// Knowledge time of the loaded rows.
    pub knowledge: KnowledgeTime,
    /// Commit (and so make resumable) after this many lines.
    pub commit_every_lines: u64,
    /// Bytes of input read so far, across files (for a progress bar).
    pub bytes_read: Option<Arc<AtomicU64>>,
    /// Receives every `pos_events` batch once its commit has landed, as committed
    /// (knowledge stamped): lets a caller build silver from the load itself instead of
    /// reading bronze back. A receiver that hangs up stops nothing.
    pub committed_rows: Option<tokio::sync::mpsc::Sender<RecordBatch>>,
}

/// What became of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileReport {
    /// The path as given.
    pub path: String,
    /// Content identity (see the module documentation).
    pub identity: String,
    /// The file was loaded completely before: nothing was read.
    pub already_loaded: bool,
    /// Lines (CSV: records) read in this run, including skipped ones.
    pub lines: u64,
    /// Rows added to `pos_events`.
    pub accepted: u64,
    /// Rows added to `dead_letters`.
    pub dead_lettered: u64,
    /// Lines a previous, interrupted run had already committed.
    pub resumed_after: u64,
    /// Delta commits made (per table pair).
    pub commits: u64,
}

/// Rows to write between commits.
const ROWS_PER_PIECE: usize = 65_536;

/// Hashes a file's size and first and last MiB.
pub fn file_identity(path: &Path) -> Result<String> {
    const MIB: u64 = 1 << 20;
    let io = io_error(path);
    let mut file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io_error(path))?.len();
    let mut hasher = Sha256::new();
    hasher.update(size.to_le_bytes());
    let mut buffer = Vec::with_capacity(MIB as usize);
    (&mut file)
        .take(MIB)
        .read_to_end(&mut buffer)
        .map_err(io_error(path))?;
    hasher.update(&buffer);
    if size > MIB {
        buffer.clear();
        file.seek(SeekFrom::Start(size.saturating_sub(MIB).max(MIB)))
            .map_err(io_error(path))?;
        file.read_to_end(&mut buffer).map_err(io_error(path))?;
        hasher.update(&buffer);
    }
    Ok(hasher
        .finalize()
        .iter()
        .take(10)
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The files under the given paths: files as given, folders searched (recursively, in
/// name order) for `.jsonl`, `.ndjson`, `.json` and `.csv`, optionally `.gz`.
pub fn expand_inputs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_error(dir))?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .map_err(io_error(dir))?;
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, found)?;
            } else if is_input_name(&path) {
                found.push(path);
            }
        }
        Ok(())
    }
    let mut found = Vec::new();
    for path in paths {
        if path.is_dir() {
            walk(path, &mut found)?;
        } else if path.exists() {
            found.push(path.clone());
        } else {
            return Err(Error::Io {
                path: path.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
    }
    Ok(found)
}

/// The file name in lower case without a `.gz` suffix.
fn plain_name(path: &Path) -> String {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    name.strip_suffix(".gz").map(str::to_owned).unwrap_or(name)
}

fn is_input_name(path: &Path) -> bool {
    let name = plain_name(path);
    [".jsonl", ".ndjson", ".json", ".csv"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Whether a file is a CSV export (`.csv` or `.csv.gz`) rather than JSON Lines.
pub fn is_csv_file(path: &Path) -> bool {
    plain_name(path).ends_with(".csv")
}

/// Counts bytes as they are read (before decompression).
struct CountingReader<R> {
    inner: R,
    counter: Option<Arc<AtomicU64>>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(counter) = &self.counter {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

fn open_input(path: &Path, counter: Option<Arc<AtomicU64>>) -> Result<Box<dyn Read + Send>> {
    let file = File::open(path).map_err(io_error(path))?;
    let counted = CountingReader {
        inner: file,
        counter,
    };
    let gzipped = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    Ok(if gzipped {
        // Multi-member: `cat a.gz b.gz` is a valid export too.
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            1 << 20,
            counted,
        )))
    } else {
        Box::new(counted)
    })
}

/// What the reader thread hands the writer.
enum Piece {
    /// Rows to write.
    Rows {
        events: RecordBatch,
        dead_letters: RecordBatch,
    },
    /// Everything up to and including `last_line` has been sent: commit it.
    Checkpoint { last_line: i64, end_of_file: bool },
}

#[derive(Deserialize)]
struct OccurredProbe<'a> {
    #[serde(borrow, default)]
    occurred_at: Option<std::borrow::Cow<'a, str>>,
}

/// The reader half: decodes lines into rows on a blocking thread.
struct Reader {
    path_text: String,
    appender: RowAppender,
    events: EventRows,
    dead_letters: DeadLetterRows,
    knowledge: KnowledgeTime,
    clock: StreamClock,
    /// Lines at or below this are in `pos_events` already.
    events_done: i64,
    /// Dead letters at or below this are in `dead_letters` already.
    dead_letters_done: i64,
    commit_every: u64,
    since_checkpoint: u64,
    /// Lines read in this run (skipped ones included).
    lines: u64,
    /// The loader's clock, as last read.
    received_at: Option<DateTime<Utc>>,
    sender: mpsc::Sender<Piece>,
}

impl Reader {
    /// The knowledge a line's rows carry.
    fn knowledge(&mut self, occurred_at: Option<&str>) -> Knowledge {
        match self.knowledge {
            KnowledgeTime::Observed => Knowledge::Observed,
            KnowledgeTime::At(at) => Knowledge::Asserted(at),
            KnowledgeTime::FromOccurred => {
                if let Some(at) = occurred_at.and_then(streetflow_core::time::parse_rfc3339) {
                    self.clock.observe(at.timestamp_millis());
                }
                Knowledge::Asserted(
                    DateTime::from_timestamp_millis(self.clock.now_ms()).unwrap_or_else(Utc::now),
                )
            }
        }
    }

    /// The loader's own clock, for `future_timestamp` and dead letters; read every few
    /// thousand lines (it moves little in between, and the tolerance is minutes).
    fn received_at(&mut self) -> DateTime<Utc> {
        if self.lines.is_multiple_of(4096) || self.received_at.is_none() {
            self.received_at = Some(Utc::now());
        }
        self.received_at.unwrap_or_else(Utc::now)
    }

    /// Appends one line (`raw` differs from `message` for converted CSV rows).
    fn line(
        &mut self,
        line: i64,
        message: &[u8],
        raw: &[u8],
        occurred_at: Option<&str>,
    ) -> Result<()> {
        self.lines += 1;
        if line <= self.events_done {
            return Ok(());
        }
        let knowledge = self.knowledge(occurred_at);
        let received_at = self.received_at();
        let origin = Origin::File {
            path: &self.path_text,
            line,
        };
        self.appender.append_with_raw(
            &mut self.events,
            &mut self.dead_letters,
            Some(message),
            Some(raw),
            None,
            received_at,
            knowledge,
            origin,
            line <= self.dead_letters_done,
        );
        if self.events.len() + self.dead_letters.len() >= ROWS_PER_PIECE {
            self.send_rows()?;
        }
        self.since_checkpoint += 1;
        if self.since_checkpoint >= self.commit_every {
            self.checkpoint(line, false)?;
        }
        Ok(())
    }

    fn send_rows(&mut self) -> Result<()> {
        // Observed rows are stamped again by the writer at their commit.
        let events = self
            .events
            .finish(Utc::now())
            .map_err(|source| Error::Arrow {
                table: POS_EVENTS.name,
                source,
            })?;
        let dead_letters = self.dead_letters.finish().map_err(|source| Error::Arrow {
            table: DEAD_LETTERS.name,
            source,
        })?;
        self.send(Piece::Rows {
            events,
            dead_letters,
        })
    }

    fn checkpoint(&mut self, last_line: i64, end_of_file: bool) -> Result<()> {
        self.send_rows()?;
        self.since_checkpoint = 0;
        self.send(Piece::Checkpoint {
            last_line,
            end_of_file,
        })
    }

    fn send(&self, piece: Piece) -> Result<()> {
        self.sender
            .blocking_send(piece)
            .map_err(|_| Error::Backfill("the lake writer stopped".to_owned()))
    }

    fn read_json_lines(&mut self, input: Box<dyn Read + Send>, path: &Path) -> Result<()> {
        let mut reader = BufReader::with_capacity(1 << 20, input);
        let mut buffer = Vec::with_capacity(1024);
        let mut line_number = 0_i64;
        let from_occurred = self.knowledge == KnowledgeTime::FromOccurred;
        loop {
            buffer.clear();
            if reader
                .read_until(b'\n', &mut buffer)
                .map_err(io_error(path))?
                == 0
            {
                break;
            }
            line_number += 1;
            let mut message = buffer.as_slice();
            message = message.strip_suffix(b"\n").unwrap_or(message);
            message = message.strip_suffix(b"\r").unwrap_or(message);
            // The clock needs the line's occurred_at before decoding (the decoder checks
            // it against the arrival time); parsing it twice only costs in this mode.
            let probe: Option<OccurredProbe<'_>> =
                if from_occurred && line_number > self.events_done {
                    serde_json::from_slice(message).ok()
                } else {
                    None
                };
            let occurred = probe.as_ref().and_then(|p| p.occurred_at.as_deref());
            self.line(line_number, message, message, occurred)?;
        }
        self.checkpoint(line_number, true)
    }

    fn read_csv(
        &mut self,
        input: Box<dyn Read + Send>,
        mapping: &CsvMapping,
        path: &Path,
    ) -> Result<()> {
        let mut reader = mapping.reader_builder().from_reader(input);
        let header = if mapping.header {
            Some(
                reader
                    .headers()
                    .map_err(|e| Error::Backfill(format!("{}: CSV header: {e}", path.display())))?
                    .clone(),
            )
        } else {
            None
        };
        let bound = mapping.bind(header.as_ref())?;
        let delimiter = u8::try_from(mapping.delimiter).unwrap_or(b',');
        let mut record = csv::StringRecord::new();
        let mut last_line = 0_i64;
        loop {
            match reader.read_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {
                    let line = record.position().map_or(last_line + 1, |p| p.line() as i64);
                    last_line = line;
                    let (message, occurred) = bound.to_event_json(&record);
                    let raw = row_as_csv(&record, delimiter);
                    self.line(line, &message, &raw, occurred.as_deref())?;
                }
                Err(error) if matches!(error.kind(), csv::ErrorKind::Io(_)) => {
                    return Err(Error::Backfill(format!("{}: {error}", path.display())));
                }
                // A row that is not CSV (bad UTF-8, broken quoting) is a dead letter too.
                Err(error) => {
                    let line = error.position().map_or(last_line + 1, |p| p.line() as i64);
                    last_line = line;
                    let detail = format!("not a CSV row: {error}");
                    let message = serde_json::to_vec(&serde_json::json!({ "csv_error": detail }))
                        .unwrap_or_default();
                    self.line(line, &message, detail.as_bytes(), None)?;
                }
            }
        }
        self.checkpoint(last_line, true)
    }
}

/// Loads one file into `pos_events` and `dead_letters` (silver is left to the caller).
pub async fn backfill_file(
    lake: &Lake,
    path: &Path,
    options: &BackfillOptions,
    format: &InputFormat,
) -> Result<FileReport> {
    let identity = {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || file_identity(&path))
            .await
            .map_err(|e| Error::Backfill(format!("hashing the file: {e}")))??
    };
    let app_prefix = format!("backfill-{identity}");
    let mut events = OffsetWriter::new(lake, &POS_EVENTS, app_prefix.clone()).await?;
    let mut dead_letters = OffsetWriter::new(lake, &DEAD_LETTERS, app_prefix.clone()).await?;
    let app_id = events.app_id(0);
    let eof_id = format!("{app_prefix}-eof");
    let mut report = FileReport {
        path: path.display().to_string(),
        identity,
        ..FileReport::default()
    };
    if events.app_version(&eof_id).await?.is_some() {
        report.already_loaded = true;
        return Ok(report);
    }
    let mut events_done = events.app_version(&app_id).await?;
    let mut dead_done = dead_letters.app_version(&app_id).await?;
    report.resumed_after = events_done.unwrap_or(0).max(0) as u64;
    if report.resumed_after > 0 {
        tracing::info!(path = %report.path, after_line = report.resumed_after, "resuming an interrupted load");
    }

    let (sender, mut receiver) = mpsc::channel::<Piece>(4);
    let decode_options = options.config.decode_options();
    let calendars = options
        .config
        .calendars()
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut reader = Reader {
        path_text: report.path.clone(),
        appender: RowAppender::new(decode_options, calendars),
        events: EventRows::default(),
        dead_letters: DeadLetterRows::default(),
        knowledge: options.knowledge,
        clock: StreamClock::default(),
        events_done: events_done.unwrap_or(0),
        dead_letters_done: dead_done.unwrap_or(0),
        commit_every: options.commit_every_lines.max(1),
        since_checkpoint: 0,
        lines: 0,
        received_at: None,
        sender,
    };
    let input = open_input(path, options.bytes_read.clone())?;
    let format = format.clone();
    let owned_path = path.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        let result = match &format {
            InputFormat::JsonLines => reader.read_json_lines(input, &owned_path),
            InputFormat::Csv(mapping) => reader.read_csv(input, mapping, &owned_path),
        };
        result.map(|()| reader.lines)
    });

    let mut staged_rows = (0_u64, 0_u64);
    // Observed knowledge: each piece is stamped when it is written (so Parquet encoding
    // runs while the reader decodes the next lines) and the commit must follow the
    // first stamp within the deadline. The pieces stay in memory until the commit, so a
    // commit that misses it can stamp and write them again.
    let observed = options.knowledge == KnowledgeTime::Observed;
    let deadline = options.config.knowledge_rules().commit_deadline();
    // The rows written since the last commit, as written: observed ones always (to
    // stamp again), asserted ones when a caller wants the committed rows.
    let mut waiting: Vec<RecordBatch> = Vec::new();
    let mut first_stamp: Option<DateTime<Utc>> = None;
    let mut sink = options.committed_rows.clone();
    while let Some(piece) = receiver.recv().await {
        match piece {
            Piece::Rows {
                events: event_rows,
                dead_letters: dead_rows,
            } => {
                staged_rows.0 += event_rows.num_rows() as u64;
                staged_rows.1 += dead_rows.num_rows() as u64;
                if event_rows.num_rows() > 0 {
                    let written = if observed {
                        let at = Utc::now();
                        first_stamp.get_or_insert(at);
                        restamp_observed(&event_rows, at).map_err(|source| Error::Arrow {
                            table: POS_EVENTS.name,
                            source,
                        })?
                    } else {
                        event_rows
                    };
                    events.write(written.clone()).await?;
                    if observed || sink.is_some() {
                        waiting.push(written);
                    }
                }
                if dead_rows.num_rows() > 0 {
                    dead_letters.write(dead_rows).await?;
                }
            }
            Piece::Checkpoint {
                last_line,
                end_of_file,
            } => {
                // Dead letters first: a crash before the events commit replays the lines,
                // and the dead letters already stored are recognised by line number.
                let staged = dead_letters.stage().await?;
                if last_line > dead_done.unwrap_or(0) || dead_done.is_none() {
                    let progress = [AppProgress {
                        app_id: app_id.clone(),
                        expected: dead_done,
                        version: last_line,
                    }];
                    committed(
                        dead_letters.commit_appended(&staged, &progress).await?,
                        &report.path,
                    )?;
                    dead_done = Some(last_line);
                    freeze::point(points::DEAD_LETTER_COMMIT);
                }
                let mut staged = events.stage().await?;
                let mut stamp = first_stamp.take();
                let mut progress = Vec::new();
                if last_line > events_done.unwrap_or(0) || events_done.is_none() {
                    progress.push(AppProgress {
                        app_id: app_id.clone(),
                        expected: events_done,
                        version: last_line,
                    });
                }
                if end_of_file {
                    progress.push(AppProgress {
                        app_id: eof_id.clone(),
                        expected: None,
                        version: last_line.max(events_done.unwrap_or(0)),
                    });
                }
                if !progress.is_empty() {
                    // Stamped too long ago (slow storage): stamp again, write again (the
                    // files of the first stamp are never committed).
                    while stamp.is_some_and(|at| Utc::now() - at > deadline) {
                        tracing::warn!(path = %report.path, "a commit missed the knowledge deadline of its stamp; stamping again");
                        (staged, stamp) = stage_events(&mut events, &mut waiting).await?;
                    }
                    committed(
                        events.commit_appended(&staged, &progress).await?,
                        &report.path,
                    )?;
                    if let Some(receiver) = &sink {
                        for batch in waiting.drain(..) {
                            if receiver.send(batch).await.is_err() {
                                sink = None;
                                break;
                            }
                        }
                    }
                    events_done = Some(last_line.max(events_done.unwrap_or(0)));
                    report.commits += 1;
                    freeze::point(points::EVENT_COMMIT);
                    report.accepted += staged_rows.0;
                    report.dead_lettered += staged_rows.1;
                }
                staged_rows = (0, 0);
                waiting.clear();
                tracing::debug!(path = %report.path, last_line, "backfill committed");
            }
        }
    }
    let lines = read
        .await
        .map_err(|e| Error::Backfill(format!("the file reader failed: {e}")))??;
    report.lines = lines;
    Ok(report)
}

/// Stamps `waiting` (observed rows) again, now, writes it and stages everything written
/// since the last stage; the stamp, when there were observed rows.
async fn stage_events(
    events: &mut OffsetWriter,
    waiting: &mut [RecordBatch],
) -> Result<(streetflow_lake::StagedFiles, Option<DateTime<Utc>>)> {
    let stamp = (!waiting.is_empty()).then(Utc::now);
    if let Some(at) = stamp {
        for batch in waiting.iter_mut() {
            *batch = restamp_observed(batch, at).map_err(|source| Error::Arrow {
                table: POS_EVENTS.name,
                source,
            })?;
            events.write(batch.clone()).await?;
        }
    }
    Ok((events.stage().await?, stamp))
}

fn committed(outcome: CommitOutcome, path: &str) -> Result<()> {
    match outcome {
        CommitOutcome::Committed { .. } => Ok(()),
        CommitOutcome::Fenced { .. } => Err(Error::Config(format!(
            "another backfill is loading {path} (or a file with the same content) right now; \
             run one at a time, then re-run to pick up where it stopped"
        ))),
    }
}
