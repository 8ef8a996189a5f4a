//! streetflow's benchmarks, the `streetflow bench …` commands: throughput and latency of
//! each stage on generated data, beside DuckDB where it computes the same thing.
//!
//! Entry point: [`run`] with a [`BenchCommand`]. Each benchmark generates its input
//! (`streetflow-synth`), runs the library calls the commands run, checks the results
//! against the generator's truth or DuckDB, and prints a table. Figures are kept in
//! `deploy/SCALING.md`; measure on a release build.

mod backfill;
mod console;
mod decide;
mod features;

pub use backfill::BenchBackfillArgs;
pub use decide::BenchDecideArgs;
pub use features::{BenchFeaturesArgs, BenchTrainingArgs};

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use streetflow_core::tables::{DEAD_LETTERS, POS_EVENTS};
use streetflow_core::{OperatorCalendars, PipelineConfig};
use streetflow_ingest::{
    DeadLetterRows, EventRows, IngestOptions, Origin, ProduceOptions, RowAppender,
};
use streetflow_lake::{Lake, OffsetWriter};
use streetflow_synth::{GenConfig, generate};

use crate::console::{create, runtime, table, thousands};

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Synthetic generation written to a file: events per second and bytes per event.
    Gen(BenchGenArgs),
    /// Ingest throughput: bare consumer vs full ingest on one preloaded topic, and the
    /// pipeline without a broker vs bare serde_json parsing of the same bytes.
    Ingest(BenchIngestArgs),
    /// As-of features of a city-sized lake: streetflow vs DuckDB on the same SQL and
    /// Parquet, with the results compared.
    Features(BenchFeaturesArgs),
    /// A multi-GB JSON Lines export into bronze + silver, against DuckDB reading the same
    /// file and writing the same daily aggregates.
    Backfill(BenchBackfillArgs),
    /// Credit decisions on a generated district lake: p50 / p99 latency of one-merchant
    /// evaluation over HTTP, and the time of a batch decide over every merchant.
    Decide(BenchDecideArgs),
    /// A training set of many spine rows across as-of dates and knowledge times, on the
    /// lake `bench features` generates.
    Training(BenchTrainingArgs),
}

/// Options of `streetflow bench ingest`.
#[derive(Debug, Args)]
pub struct BenchIngestArgs {
    /// Events to generate and load (duplicates 1 %, malformed 0.5 % included).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Kafka bootstrap servers; omit to measure only the pipeline without a broker.
    #[arg(long, env = "STREETFLOW_TEST_BROKERS")]
    brokers: Option<String>,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Records per flush (one Delta commit each).
    #[arg(long, default_value_t = 200_000)]
    flush_records: usize,
    /// With a broker: also ingest the topic with this many workers in one group (threads
    /// of this process, a fresh lake) and print the speed-up over one worker.
    #[arg(long, default_value_t = 3)]
    scale_workers: usize,
    /// Working directory for the events file and lakes (default: a temp directory).
    #[arg(long)]
    workdir: Option<PathBuf>,
}

/// Options of `streetflow bench gen`.
#[derive(Debug, Args)]
pub struct BenchGenArgs {
    /// Merchants to generate (300 × 365 days ≈ 9 M events, 2.3 GB).
    #[arg(long, default_value_t = 300)]
    merchants: u32,
    /// Days to generate.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Runs; the table shows each and the best.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// File to write (deleted afterwards); default: a file in the temp directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fault rates applied to every run (duplicates, late, malformed), as in `gen`.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
}

/// Runs one benchmark.
pub fn run(command: &BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Gen(args) => bench_gen(args),
        BenchCommand::Ingest(args) => bench_ingest(args),
        BenchCommand::Features(args) => crate::features::bench_features(args),
        BenchCommand::Decide(args) => crate::decide::bench_decide(args),
        BenchCommand::Training(args) => crate::features::bench_training(args),
        BenchCommand::Backfill(args) => crate::backfill::bench_backfill(args),
    }
}

fn bench_gen(args: &BenchGenArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; measure with `cargo run --release -- bench …`");
    }
    let path = args.out.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("streetflow-bench-{}.jsonl", std::process::id()))
    });
    let config = GenConfig {
        merchants: args.merchants,
        days: args.days,
        duplicate_rate: args.fault_rate,
        late_rate: args.fault_rate,
        malformed_rate: args.fault_rate,
        ..GenConfig::default()
    };
    let mut t = table(&[
        "run",
        "lines",
        "MB",
        "seconds",
        "lines/s",
        "MB/s",
        "bytes/line",
    ]);
    let mut best = f64::MAX;
    let mut best_rate = 0.0;
    let mut bytes_per_million = 0.0;
    for run in 1..=args.repeat.max(1) {
        let started = Instant::now();
        let generated = generate(&config, create(&path)?)
            .with_context(|| format!("writing {}", path.display()))?;
        let seconds = started.elapsed().as_secs_f64();
        let s = &generated.summary;
        let rate = s.lines as f64 / seconds;
        if seconds < best {
            best = seconds;
            best_rate = rate;
        }
        bytes_per_million = s.bytes as f64 / s.lines as f64 * 1e6;
        t.add_row(vec![
            run.to_string(),
            thousands(s.lines),
            format!("{:.1}", s.bytes as f64 / 1e6),
            format!("{seconds:.2}"),
            thousands(rate as u64),
            format!("{:.0}", s.bytes as f64 / 1e6 / seconds),
            format!("{:.1}", s.bytes as f64 / s.lines as f64),
        ]);
    }
    let _ = fs::remove_file(&path);
    println!(
        "bench gen: {} merchants × {} days, single thread, written to {}",
        args.merchants,
        args.days,
        path.display()
    );
    println!("{t}");
    println!(
        "best: {} events/s; {:.0} MB per million events (goal: ≥ 1,000,000 events/s)",
        thousands(best_rate as u64),
        bytes_per_million / 1e6
    );
    Ok(())
}

/// Lines of a JSON Lines buffer, without their line ends.
fn split_lines(bytes: &[u8]) -> Vec<&[u8]> {
    bytes
        .strip_suffix(b"\n")
        .unwrap_or(bytes)
        .split(|&b| b == b'\n')
        .collect()
}

/// CPU seconds this process has used (user + system), from `/proc/self/stat`; `None`
/// where that file does not exist.
fn cpu_seconds() -> Option<f64> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces, so split after ')').
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

/// Wall and CPU seconds of `work`.
fn timed<T>(work: impl FnOnce() -> T) -> (T, f64, Option<f64>) {
    let (cpu, started) = (cpu_seconds(), Instant::now());
    let value = work();
    let cpu = cpu.zip(cpu_seconds()).map(|(a, b)| b - a);
    (value, started.elapsed().as_secs_f64(), cpu)
}

fn cpu_cell(cpu: Option<f64>) -> String {
    cpu.map_or_else(|| "-".to_owned(), |c| format!("{c:.2}"))
}

fn rate(count: u64, seconds: f64) -> String {
    thousands((count as f64 / seconds.max(1e-9)) as u64)
}

fn bench_ingest(args: &BenchIngestArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; measure with `cargo run --release -- bench …`");
    }
    let temp = tempfile_dir(args.workdir.as_deref())?;
    let dir = temp.path();
    let runtime = runtime()?;

    // Data: a district big enough for the requested number of events.
    let merchants = (args.events / 30_000).max(2) as u32;
    let config = GenConfig {
        merchants,
        days: 365,
        duplicate_rate: 0.01,
        malformed_rate: 0.005,
        ..GenConfig::default()
    };
    let events_path = dir.join("events.jsonl");
    let mut all = Vec::new();
    generate(&config, &mut all).context("generating events")?;
    let mut lines = split_lines(&all);
    lines.truncate(args.events as usize);
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    let mut file_bytes = Vec::with_capacity(bytes);
    for line in &lines {
        file_bytes.extend_from_slice(line);
        file_bytes.push(b'\n');
    }
    fs::write(&events_path, &file_bytes)
        .with_context(|| format!("writing {}", events_path.display()))?;
    let n = lines.len() as u64;
    println!(
        "bench ingest: {} events ({:.0} MB) from {merchants} merchants, 1 % duplicates, 0.5 % malformed",
        thousands(n),
        bytes as f64 / 1e6
    );
    let mut t = table(&[
        "measurement",
        "records",
        "wall s",
        "records/s",
        "CPU s",
        "records per CPU s",
    ]);
    let mut row = |label: &str, records: u64, wall: f64, cpu: Option<f64>| {
        t.add_row(vec![
            label.to_owned(),
            thousands(records),
            format!("{wall:.2}"),
            rate(records, wall),
            cpu_cell(cpu),
            cpu.map_or_else(|| "-".to_owned(), |c| rate(records, c)),
        ]);
    };

    // 1. Bare serde_json parses of the same bytes (one core).
    let (parsed, value_wall, value_cpu) = timed(|| {
        lines
            .iter()
            .filter(|l| serde_json::from_slice::<serde_json::Value>(l).is_ok())
            .count() as u64
    });
    let (skimmed, ignored_wall, ignored_cpu) = timed(|| {
        lines
            .iter()
            .filter(|l| serde_json::from_slice::<serde::de::IgnoredAny>(l).is_ok())
            .count() as u64
    });

    // 2. The pipeline without a broker: decode, validate, Arrow, Parquet, Delta commits.
    let lake = Lake::new(
        dir.join("memory-lake").to_str().unwrap_or("memory-lake"),
        &Default::default(),
    )?;
    let (stored, pipeline_wall, pipeline_cpu) =
        timed(|| runtime.block_on(pipeline_from_memory(&lake, &lines, args.flush_records)));
    let stored = stored?;
    anyhow::ensure!(stored == n, "pipeline stored {stored} of {n} records");

    row("serde_json → Value", parsed, value_wall, value_cpu);
    row(
        "serde_json → IgnoredAny (syntax only)",
        skimmed,
        ignored_wall,
        ignored_cpu,
    );
    row(
        "pipeline without broker (decode … Delta commit)",
        stored,
        pipeline_wall,
        pipeline_cpu,
    );
    // Per core: CPU seconds where the platform reports them, else wall time.
    let per_core = |wall: f64, cpu: Option<f64>| cpu.unwrap_or(wall);
    let mut ratios = vec![
        (
            "pipeline ÷ serde_json Value, per CPU second",
            per_core(value_wall, value_cpu) / per_core(pipeline_wall, pipeline_cpu),
        ),
        (
            "pipeline ÷ serde_json IgnoredAny, per CPU second",
            per_core(ignored_wall, ignored_cpu) / per_core(pipeline_wall, pipeline_cpu),
        ),
    ];

    if let Some(brokers) = &args.brokers {
        let topic = format!("bench.ingest.{}", std::process::id());
        streetflow_ingest::create_topic(brokers, &topic, args.partitions, runtime.handle())?;
        let (produced, produce_wall, produce_cpu) = timed(|| {
            streetflow_ingest::produce_file(
                &events_path,
                &ProduceOptions {
                    brokers: brokers.clone(),
                    topic: topic.clone(),
                    properties: Vec::new(),
                    progress: None,
                    throttle: None,
                    key_partitions: None,
                },
            )
        });
        let produced = produced?;
        row(
            "produce (preload the topic)",
            produced.delivered,
            produce_wall,
            produce_cpu,
        );

        let (consumed, consume_seconds, consume_cpu) =
            timed(|| bare_consume(brokers, &topic, args.partitions, n));
        let consumed = consumed?;
        row(
            "bare rdkafka consumer",
            consumed,
            consume_seconds,
            consume_cpu,
        );

        let mut pipeline_template = PipelineConfig::defaults();
        pipeline_template.kafka.brokers = brokers.clone();
        pipeline_template.kafka.topic = topic.clone();
        pipeline_template.flush.max_records = args.flush_records;
        pipeline_template.silver.update_after_flush = false;
        let mut pipeline = pipeline_template.clone();
        pipeline.kafka.brokers = brokers.clone();
        pipeline.kafka.topic = topic.clone();
        pipeline.kafka.group = format!("{topic}.group");
        pipeline.lake.url = dir.join("kafka-lake").display().to_string();
        pipeline.flush.max_records = args.flush_records;
        // Bronze throughput only (no after-commit silver refresh); silver and features
        // have their own benchmark.
        pipeline.silver.update_after_flush = false;
        let (report, ingest_seconds, ingest_cpu) = timed(|| {
            streetflow_ingest::run_worker(
                IngestOptions {
                    config: pipeline,
                    exit_at_end: true,
                    stall_timeout: Duration::from_secs(180),
                    after_commit: None,
                    committed: None,
                    partition_watermarks: None,
                },
                runtime.handle().clone(),
                Arc::new(AtomicBool::new(false)),
            )
        });
        let report = report?;
        let ingested = report.accepted + report.dead_lettered_total();
        anyhow::ensure!(ingested == n, "ingest stored {ingested} of {n} records");
        row(
            "full ingest (one worker, Kafka → Delta)",
            ingested,
            ingest_seconds,
            ingest_cpu,
        );
        ratios.insert(
            0,
            (
                "full ingest ÷ bare consumer",
                consume_seconds / ingest_seconds,
            ),
        );

        // 3. Scale-out: the same topic, N workers sharing its partitions.
        if args.scale_workers > 1 {
            let mut pipeline = pipeline_template.clone();
            pipeline.kafka.group = format!("{topic}.group{}", args.scale_workers);
            pipeline.lake.url = dir.join("kafka-lake-scaled").display().to_string();
            let started = Instant::now();
            // A group that never finishes (a member waiting on partitions nobody
            // serves) is stopped and reported, not waited for forever.
            let stop = Arc::new(AtomicBool::new(false));
            let limit = SCALED_RUN_LIMIT.max(Duration::from_secs_f64(ingest_seconds * 20.0));
            let reports = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..args.scale_workers)
                    .map(|_| {
                        let options = IngestOptions {
                            config: pipeline.clone(),
                            exit_at_end: true,
                            stall_timeout: Duration::from_secs(180),
                            after_commit: None,
                            committed: None,
                            partition_watermarks: None,
                        };
                        let handle = runtime.handle().clone();
                        let stop = stop.clone();
                        scope.spawn(move || streetflow_ingest::run_worker(options, handle, stop))
                    })
                    .collect();
                while !workers.iter().all(|w| w.is_finished()) {
                    if started.elapsed() > limit {
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                workers
                    .into_iter()
                    .map(|w| {
                        w.join()
                            .map_err(|_| anyhow::anyhow!("a worker thread panicked"))?
                            .map_err(anyhow::Error::from)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            let scaled_seconds = started.elapsed().as_secs_f64();
            let stored: u64 = reports
                .iter()
                .map(|r| r.accepted + r.dead_lettered_total())
                .sum();
            anyhow::ensure!(
                stored == n,
                "{} workers stored {stored} of {n} records{}",
                args.scale_workers,
                if stop.load(Ordering::Relaxed) {
                    format!(" and were stopped after {} s", limit.as_secs())
                } else {
                    String::new()
                }
            );
            row(
                &format!(
                    "full ingest ({} workers, one group, {} partitions)",
                    args.scale_workers, args.partitions
                ),
                stored,
                scaled_seconds,
                None,
            );
            ratios.insert(
                1,
                (
                    "speed-up of the workers over one worker",
                    ingest_seconds / scaled_seconds,
                ),
            );
        }
    }
    println!("{t}");
    for (label, ratio) in ratios {
        println!("{label}: {:.0} %", ratio * 100.0);
    }
    println!(
        "goals: full ingest ≥ 80 % of the bare consumer; pipeline ≥ 50 % of bare serde_json, per core"
    );
    Ok(())
}

fn tempfile_dir(under: Option<&Path>) -> anyhow::Result<tempfile::TempDir> {
    match under {
        Some(dir) => {
            fs::create_dir_all(dir)?;
            Ok(tempfile::tempdir_in(dir)?)
        }
        None => Ok(tempfile::tempdir()?),
    }
}

/// Decodes every line into rows and commits them in flushes, as a worker would.
async fn pipeline_from_memory(
    lake: &Lake,
    lines: &[&[u8]],
    flush_records: usize,
) -> anyhow::Result<u64> {
    let mut events_table = OffsetWriter::new(lake, &POS_EVENTS, "bench").await?;
    let mut dead_table = OffsetWriter::new(lake, &DEAD_LETTERS, "bench").await?;
    let mut appender = RowAppender::new(Default::default(), OperatorCalendars::default());
    let mut events = EventRows::default();
    let mut dead = DeadLetterRows::default();
    let received_at = chrono::Utc::now();
    let mut stored = 0u64;
    for (i, chunk) in lines.chunks(flush_records.max(1)).enumerate() {
        for (j, line) in chunk.iter().enumerate() {
            let origin = Origin::File {
                path: "memory",
                line: (i * flush_records + j + 1) as i64,
            };
            appender.append(
                &mut events,
                &mut dead,
                Some(line),
                None,
                received_at,
                streetflow_core::Knowledge::Observed,
                origin,
                false,
            );
        }
        stored += (events.len() + dead.len()) as u64;
        if !dead.is_empty() {
            dead_table.write(dead.finish()?).await?;
            let staged = dead_table.stage().await?;
            dead_table.commit(&staged, &[]).await?;
        }
        events_table
            .write(events.finish(chrono::Utc::now())?)
            .await?;
        let staged = events_table.stage().await?;
        events_table.commit(&staged, &[]).await?;
    }
    Ok(stored)
}

/// The least time the scaled ingest run gets before its workers are stopped.
const SCALED_RUN_LIMIT: Duration = Duration::from_secs(300);

/// How long the benchmark waits for the broker's next record before giving up.
const BROKER_STALL: Duration = Duration::from_secs(60);

/// Reads every record of the topic with a plain consumer, touching each payload.
fn bare_consume(brokers: &str, topic: &str, partitions: i32, expected: u64) -> anyhow::Result<u64> {
    let none: [(&str, &str); 0] = [];
    let consumer: BaseConsumer = streetflow_ingest::client_config(
        brokers,
        none,
        streetflow_ingest::ClientRole::Reader {
            group: &format!("{topic}.bare"),
        },
    )
    .create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let (mut count, mut payload_bytes) = (0u64, 0usize);
    // A broker that stops delivering ends the benchmark with an error, not a hang.
    let mut last_record = Instant::now();
    while count < expected {
        if let Some(message) = consumer.poll(Duration::from_millis(500)) {
            let message = message?;
            payload_bytes += message.payload().map_or(0, <[u8]>::len);
            count += 1;
            last_record = Instant::now();
        } else if last_record.elapsed() > BROKER_STALL {
            anyhow::bail!(
                "the bare consumer read {count} of {expected} records and then nothing for {} s",
                BROKER_STALL.as_secs()
            );
        }
    }
    anyhow::ensure!(payload_bytes > 0 || expected == 0, "no payload read");
    Ok(count)
}
