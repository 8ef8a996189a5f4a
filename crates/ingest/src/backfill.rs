//! Batch loads of operator exports into bronze: the streaming path's decoder and row
//! builders, with a file's identity and line numbers in place of Kafka offsets.
//!
//! A file is known by a hash of its whole content, so a renamed or copied export is
//! recognised and a changed one, by however little, is not. Its progress lives in the same
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
use std::time::Instant;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use streetflow_core::PipelineConfig;
use streetflow_core::tables::{DEAD_LETTERS, POS_EVENTS};
use streetflow_lake::arrow::record_batch::RecordBatch;
use streetflow_lake::{AppProgress, CommitOutcome, Lake, OffsetWriter};
use tokio::sync::mpsc;

use crate::batch::restamp_observed;
use crate::error::{Error, Result};
use crate::line_decoding::{
    CHUNK_LINES, ChunkMark, DecodedRows, DecoderPool, LineChunk, LoadPosition,
};
use streetflow_core::csv_mapping::{CsvMapping, row_as_csv};
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
    /// seen so far in the file (never moving back, never before the line's own
    /// `occurred_at`; the first time and a jump of more than 30 days count once two more
    /// lines near them confirm them), as `streetflow produce` stamps Kafka records. It
    /// depends only on the file's lines, so a resumed load stamps what an uninterrupted
    /// one would. For history the bank really held at the time, e.g. a re-load of what
    /// was streamed.
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

/// Bytes of lines a chunk holds at most, for exports with very long lines.
const CHUNK_BYTES: usize = 8 << 20;

/// Hashes a file's whole content: any changed byte, even in a correction of the same
/// length in the middle of a large export, makes a new identity.
pub fn file_identity(path: &Path) -> Result<String> {
    let io = io_error(path);
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(short_hex(&hasher.finalize()))
}

/// Files up to this size were hashed whole by the legacy identity too.
const LEGACY_WHOLE_FILE_BYTES: u64 = 2 << 20;

/// The identity streetflow gave files before it hashed them whole: size and first and
/// last MiB. Kept only to recognise loads recorded under it.
pub fn legacy_file_identity(path: &Path) -> Result<String> {
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
    Ok(short_hex(&hasher.finalize()))
}

/// The first 10 bytes of a digest in hex (80 bits: no two exports of a lake collide).
fn short_hex(digest: &[u8]) -> String {
    digest.iter().take(10).map(|b| format!("{b:02x}")).collect()
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
    /// Rows to write; every line up to and including `last_line` has been sent, so the
    /// writer may commit here (it does when observed rows near their deadline).
    Rows {
        events: RecordBatch,
        dead_letters: RecordBatch,
        last_line: i64,
    },
    /// Everything up to and including `last_line` has been sent: commit it.
    Checkpoint { last_line: i64, end_of_file: bool },
}

/// The reader half: cuts lines into chunks for the decoder threads on a blocking
/// thread, and hands their rows to the writer in file order.
struct Reader {
    pool: DecoderPool,
    /// Lines read since the last chunk was given out.
    chunk: LineChunk,
    knowledge: KnowledgeTime,
    /// Lines at or below this are in `pos_events` already.
    events_done: i64,
    commit_every: u64,
    since_checkpoint: u64,
    /// Lines read in this run (skipped ones included).
    lines: u64,
    /// The number of the last line read.
    last_line: i64,
    sender: mpsc::Sender<Piece>,
}

impl Reader {
    /// Whether a line the lake holds already can be left out of the chunks. The stream
    /// clock runs over such lines too, so a resumed load stamps the rest as an
    /// uninterrupted one would: under that clock they go to the decoders, which read
    /// their times and decode nothing else.
    fn skips(&self, line: i64) -> bool {
        line <= self.events_done && self.knowledge != KnowledgeTime::FromOccurred
    }

    /// Counts a line just added to the chunk (or skipped); gives the chunk out at a
    /// commit point or once it is full.
    fn after_line(&mut self, line: i64) -> Result<()> {
        if line > self.events_done {
            self.since_checkpoint += 1;
        }
        if self.since_checkpoint >= self.commit_every {
            self.since_checkpoint = 0;
            self.give_chunk(Some((line, false)))
        } else if self.chunk.len() >= CHUNK_LINES || self.chunk.byte_len() >= CHUNK_BYTES {
            self.give_chunk(None)
        } else {
            Ok(())
        }
    }

    /// Gives the lines read so far to the decoders (first waiting for the oldest rows
    /// when every decoder is busy), then hands on whatever rows are ready.
    fn give_chunk(&mut self, checkpoint: Option<(i64, bool)>) -> Result<()> {
        if self.pool.is_full()
            && let Some(rows) = self.pool.take()?
        {
            self.hand_on(rows)?;
        }
        let mark = ChunkMark {
            last_line: self.last_line,
            checkpoint,
        };
        self.pool.give(std::mem::take(&mut self.chunk), mark)?;
        while let Some(rows) = self.pool.take_ready()? {
            self.hand_on(rows)?;
        }
        Ok(())
    }

    /// Sends a chunk's rows to the writer, then its commit.
    fn hand_on(&mut self, rows: DecodedRows) -> Result<()> {
        self.send(Piece::Rows {
            events: rows.events,
            dead_letters: rows.dead_letters,
            last_line: rows.mark.last_line,
        })?;
        if let Some((last_line, end_of_file)) = rows.mark.checkpoint {
            self.send(Piece::Checkpoint {
                last_line,
                end_of_file,
            })?;
        }
        Ok(())
    }

    /// Hands on every chunk given out, in order.
    fn drain(&mut self) -> Result<()> {
        while let Some(rows) = self.pool.take()? {
            self.hand_on(rows)?;
        }
        Ok(())
    }

    /// The end of the file: commit everything through `last_line`.
    fn finish(&mut self, last_line: i64) -> Result<()> {
        self.give_chunk(Some((last_line, true)))?;
        self.drain()
    }

    /// Reads the file; on a read error, what was cut before it is still committed (as
    /// one thread reading it would have), then the error is returned.
    fn read(
        &mut self,
        input: Box<dyn Read + Send>,
        format: &InputFormat,
        path: &Path,
    ) -> Result<()> {
        let read = match format {
            InputFormat::JsonLines => self.read_json_lines(input, path),
            InputFormat::Csv(mapping) => self.read_csv(input, mapping, path),
        };
        if read.is_err() {
            let _ = self.drain();
        }
        read
    }

    fn send(&self, piece: Piece) -> Result<()> {
        self.sender
            .blocking_send(piece)
            .map_err(|_| Error::Backfill("the lake writer stopped".to_owned()))
    }

    fn read_json_lines(&mut self, input: Box<dyn Read + Send>, path: &Path) -> Result<()> {
        let mut reader = BufReader::with_capacity(1 << 20, input);
        let mut line_number = 0_i64;
        loop {
            // Read straight into the chunk: a line is copied once, by the read.
            let start = self.chunk.byte_len();
            if reader
                .read_until(b'\n', self.chunk.buffer())
                .map_err(io_error(path))?
                == 0
            {
                break;
            }
            line_number += 1;
            self.lines += 1;
            self.last_line = line_number;
            if self.skips(line_number) {
                self.chunk.buffer().truncate(start);
            } else {
                self.chunk.push_read_line(line_number, start);
            }
            self.after_line(line_number)?;
        }
        self.finish(line_number)
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
        let from_occurred = self.knowledge == KnowledgeTime::FromOccurred;
        let mut record = csv::StringRecord::new();
        let mut last_line = 0_i64;
        loop {
            match reader.read_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {
                    let line = record.position().map_or(last_line + 1, |p| p.line() as i64);
                    last_line = line;
                    self.lines += 1;
                    self.last_line = line;
                    if !self.skips(line) {
                        let (message, occurred) = bound.to_event_json(&record);
                        let occurred = occurred
                            .filter(|_| from_occurred)
                            .as_deref()
                            .and_then(streetflow_core::time::parse_rfc3339)
                            .map(|at| at.timestamp_millis());
                        let raw = row_as_csv(&record, delimiter);
                        self.chunk.push_converted(line, &message, &raw, occurred);
                    }
                    self.after_line(line)?;
                }
                Err(error) if matches!(error.kind(), csv::ErrorKind::Io(_)) => {
                    return Err(Error::Backfill(format!("{}: {error}", path.display())));
                }
                // A row that is not CSV (bad UTF-8, broken quoting) is a dead letter too.
                Err(error) => {
                    let line = error.position().map_or(last_line + 1, |p| p.line() as i64);
                    last_line = line;
                    self.lines += 1;
                    self.last_line = line;
                    if !self.skips(line) {
                        let detail = format!("not a CSV row: {error}");
                        let message =
                            serde_json::to_vec(&serde_json::json!({ "csv_error": detail }))
                                .unwrap_or_default();
                        self.chunk
                            .push_converted(line, &message, detail.as_bytes(), None);
                    }
                    self.after_line(line)?;
                }
            }
        }
        self.finish(last_line)
    }
}

/// Loads one file into `pos_events` and `dead_letters` (silver is left to the caller).
pub async fn backfill_file(
    lake: &Lake,
    path: &Path,
    options: &BackfillOptions,
    format: &InputFormat,
) -> Result<FileReport> {
    let (identity, (legacy, size)) = {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let size = std::fs::metadata(&path).map_err(io_error(&path))?.len();
            Ok::<_, Error>((file_identity(&path)?, (legacy_file_identity(&path)?, size)))
        })
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
    // A load recorded under the old identity: of a file of at most 2 MiB that identity
    // hashed all of it, so this is the same file; of a larger one it may be this file or
    // a same-length correction, which cannot be told, and guessing either way loses or
    // doubles rows.
    let legacy_prefix = format!("backfill-{legacy}");
    let legacy_eof = format!("{legacy_prefix}-eof");
    if size <= LEGACY_WHOLE_FILE_BYTES && events.app_version(&legacy_eof).await?.is_some() {
        report.already_loaded = true;
        return Ok(report);
    }
    for legacy_id in [legacy_eof, format!("{legacy_prefix}-0")] {
        if let Some(line) = events.app_version(&legacy_id).await? {
            return Err(Error::Backfill(format!(
                "{} matches a load an earlier streetflow recorded by the file's size and first \
                 and last MiB only ({legacy_id}, line {line}); it cannot tell whether this is the \
                 same file or a correction of the same length. Compare the file with the one \
                 loaded then: if it is the same, nothing needs loading",
                report.path
            )));
        }
    }
    let events_done = events.app_version(&app_id).await?;
    let dead_done = dead_letters.app_version(&app_id).await?;
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
    let position = LoadPosition {
        path: report.path.clone(),
        events_done: events_done.unwrap_or(0),
        dead_letters_done: dead_done.unwrap_or(0),
    };
    let input = open_input(path, options.bytes_read.clone())?;
    let mut reader = Reader {
        pool: DecoderPool::per_core(decode_options, &calendars, options.knowledge, &position)?,
        chunk: LineChunk::default(),
        knowledge: options.knowledge,
        events_done: position.events_done,
        commit_every: options.commit_every_lines.max(1),
        since_checkpoint: 0,
        lines: 0,
        last_line: 0,
        sender,
    };
    let format = format.clone();
    let owned_path = path.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        reader
            .read(input, &format, &owned_path)
            .map(|()| reader.lines)
    });

    let mut writer = LoadWriter {
        observed: options.knowledge == KnowledgeTime::Observed,
        deadline: options
            .config
            .knowledge_rules()
            .commit_deadline()
            .to_std()
            .unwrap_or_default(),
        events,
        dead_letters,
        app_id,
        eof_id,
        events_done,
        dead_done,
        staged_rows: (0, 0),
        waiting: Vec::new(),
        first_stamp: None,
        sink: options.committed_rows.clone(),
        report,
    };
    let written = async {
        // The last line of the last piece written: a commit may end there.
        let mut written_through = writer.events_done.unwrap_or(0);
        loop {
            // Observed rows must be visible within the deadline of their first stamp:
            // commit what is written once half of it has gone, when the next piece comes
            // or, with a slow reader, when the time comes, rather than stamp and write
            // the whole interval again at the checkpoint.
            let due = writer
                .first_stamp
                .map(|(_, at)| tokio::time::Instant::from_std(at + writer.deadline / 2));
            let piece = match due {
                Some(due) => tokio::select! {
                    piece = receiver.recv() => piece,
                    () = tokio::time::sleep_until(due) => {
                        writer.checkpoint(written_through, false).await?;
                        continue;
                    }
                },
                None => receiver.recv().await,
            };
            let Some(piece) = piece else { break };
            match piece {
                Piece::Rows {
                    events,
                    dead_letters,
                    last_line,
                } => {
                    if writer
                        .first_stamp
                        .is_some_and(|at| age(at) > writer.deadline / 2)
                    {
                        writer.checkpoint(written_through, false).await?;
                    }
                    writer.rows(events, dead_letters).await?;
                    written_through = last_line;
                }
                Piece::Checkpoint {
                    last_line,
                    end_of_file,
                } => writer.checkpoint(last_line, end_of_file).await?,
            }
        }
        Ok::<(), Error>(())
    };
    let written = written.await;
    // The reader stops at its next send once the receiver is gone.
    drop(receiver);
    let mut report = writer.report;
    if let Err(error) = written {
        let _ = read.await;
        return Err(error);
    }
    let lines = read
        .await
        .map_err(|e| Error::Backfill(format!("the file reader failed: {e}")))??;
    report.lines = lines;
    Ok(report)
}

/// How long ago a stamp was taken, by the wall clock and the monotonic one: a wall-clock
/// step back cannot hide a slow commit.
fn age(stamped: (DateTime<Utc>, Instant)) -> std::time::Duration {
    let wall = (Utc::now() - stamped.0).to_std().unwrap_or_default();
    wall.max(stamped.1.elapsed())
}

/// Times observed rows may be stamped and written again before a load gives up.
const RESTAMP_ATTEMPTS: u32 = 3;

/// The writer half of a load: writes pieces as they come, commits at checkpoints.
struct LoadWriter {
    observed: bool,
    /// `knowledge.settle_ms / 2`: from stamp to visible commit.
    deadline: std::time::Duration,
    events: OffsetWriter,
    dead_letters: OffsetWriter,
    app_id: String,
    eof_id: String,
    events_done: Option<i64>,
    dead_done: Option<i64>,
    /// Events and dead letters written since the last commit.
    staged_rows: (u64, u64),
    /// The `pos_events` batches written since the last commit, as written: observed
    /// ones always (to stamp again), asserted ones when a caller wants them.
    waiting: Vec<RecordBatch>,
    /// When the first observed rows since the last commit were stamped.
    first_stamp: Option<(DateTime<Utc>, Instant)>,
    sink: Option<mpsc::Sender<RecordBatch>>,
    report: FileReport,
}

impl LoadWriter {
    /// Writes one piece: observed rows are stamped now, so Parquet encoding runs while
    /// the reader decodes the next lines.
    async fn rows(&mut self, event_rows: RecordBatch, dead_rows: RecordBatch) -> Result<()> {
        self.staged_rows.0 += event_rows.num_rows() as u64;
        self.staged_rows.1 += dead_rows.num_rows() as u64;
        if event_rows.num_rows() > 0 {
            let written = if self.observed {
                let stamp = *self.first_stamp.get_or_insert((Utc::now(), Instant::now()));
                // Every piece of one commit carries the commit's first stamp: the rows
                // of one commit share one knowledge time, as a worker's do (a later
                // piece's lines were read at most half the deadline after it).
                restamp_observed(&event_rows, stamp.0).map_err(|source| Error::Arrow {
                    table: POS_EVENTS.name,
                    source,
                })?
            } else {
                event_rows
            };
            self.events.write(written.clone()).await?;
            if self.observed || self.sink.is_some() {
                self.waiting.push(written);
            }
        }
        if dead_rows.num_rows() > 0 {
            self.dead_letters.write(dead_rows).await?;
        }
        Ok(())
    }

    /// Commits everything written, as lines up to `last_line`.
    async fn checkpoint(&mut self, last_line: i64, end_of_file: bool) -> Result<()> {
        // Dead letters first: a crash before the events commit replays the lines, and
        // the dead letters already stored are recognised by line number.
        let staged = self.dead_letters.stage().await?;
        if last_line > self.dead_done.unwrap_or(0) || self.dead_done.is_none() {
            let progress = [AppProgress {
                app_id: self.app_id.clone(),
                expected: self.dead_done,
                version: last_line,
            }];
            committed(
                self.dead_letters
                    .commit_appended(&staged, &progress)
                    .await?,
                &self.report.path,
            )?;
            self.dead_done = Some(last_line);
            freeze::point(points::DEAD_LETTER_COMMIT);
        }
        let mut staged = self.events.stage().await?;
        let mut stamp = self.first_stamp.take();
        let mut progress = Vec::new();
        if last_line > self.events_done.unwrap_or(0) || self.events_done.is_none() {
            progress.push(AppProgress {
                app_id: self.app_id.clone(),
                expected: self.events_done,
                version: last_line,
            });
        }
        if end_of_file {
            progress.push(AppProgress {
                app_id: self.eof_id.clone(),
                expected: None,
                version: last_line.max(self.events_done.unwrap_or(0)),
            });
        }
        if !progress.is_empty() {
            // Stamped too long ago (slow storage): stamp again, write again (the files
            // of the first stamp are never committed).
            let mut attempts = 0;
            while let Some(at) = stamp.filter(|&at| age(at) > self.deadline) {
                attempts += 1;
                if attempts > RESTAMP_ATTEMPTS {
                    return Err(Error::Backfill(format!(
                        "{}: writing and committing the rows of one commit took longer than \
                         the knowledge deadline ({} ms, half of knowledge.settle_ms) \
                         {RESTAMP_ATTEMPTS} times over: the lake's storage is too slow for \
                         that setting; raise knowledge.settle_ms",
                        self.report.path,
                        self.deadline.as_millis()
                    )));
                }
                tracing::warn!(
                    path = %self.report.path,
                    age_ms = age(at).as_millis() as u64,
                    "a commit missed the knowledge deadline of its stamp; stamping again"
                );
                metrics::counter!(crate::metrics::KNOWLEDGE_RESTAMPS).increment(1);
                (staged, stamp) = self.stage_again().await?;
            }
            committed(
                self.events.commit_appended(&staged, &progress).await?,
                &self.report.path,
            )?;
            if let Some(at) = stamp.filter(|&at| age(at) > self.deadline) {
                // Visible too late: silver reports it when it finds the rows behind its
                // horizon, and rebuilds.
                tracing::error!(
                    path = %self.report.path,
                    stamped = %at.0,
                    age_ms = age(at).as_millis() as u64,
                    "a commit became visible after the knowledge deadline of its stamp; \
                     readers that settled that instant may have missed it (raise knowledge.settle_ms)"
                );
                metrics::counter!(crate::metrics::KNOWLEDGE_LATE_COMMITS).increment(1);
            }
            if let Some(receiver) = &self.sink {
                for batch in self.waiting.drain(..) {
                    if receiver.send(batch).await.is_err() {
                        self.sink = None;
                        break;
                    }
                }
            }
            self.events_done = Some(last_line.max(self.events_done.unwrap_or(0)));
            self.report.commits += 1;
            freeze::point(points::EVENT_COMMIT);
            self.report.accepted += self.staged_rows.0;
            self.report.dead_lettered += self.staged_rows.1;
        }
        self.staged_rows = (0, 0);
        self.waiting.clear();
        tracing::debug!(path = %self.report.path, last_line, "backfill committed");
        Ok(())
    }

    /// Stamps the waiting observed rows again, now, writes them and stages everything
    /// written since the last stage; the stamp, when there were observed rows.
    async fn stage_again(
        &mut self,
    ) -> Result<(
        streetflow_lake::StagedFiles,
        Option<(DateTime<Utc>, Instant)>,
    )> {
        let stamp = (!self.waiting.is_empty()).then(|| (Utc::now(), Instant::now()));
        if let Some(at) = stamp {
            for batch in self.waiting.iter_mut() {
                *batch = restamp_observed(batch, at.0).map_err(|source| Error::Arrow {
                    table: POS_EVENTS.name,
                    source,
                })?;
                self.events.write(batch.clone()).await?;
            }
        }
        Ok((self.events.stage().await?, stamp))
    }
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
