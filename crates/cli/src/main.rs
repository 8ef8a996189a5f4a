//! The `streetflow` command line: each command module parses its options, calls the
//! library crates (ingest, features, credit, serve, report, bench) and prints the outcome.

mod aggregate;
mod backfill;
mod decide;
mod demo;
#[cfg(test)]
mod deploy_check;
mod doctor;
mod features;
mod generate;
mod ingest;
mod maintain;
mod migrate;
mod output;
mod report;
mod runtime;
mod serve;
mod settings;
mod sql;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc rather than the system allocator: the builders of silver and features run on
/// threads of their own, and glibc gave each thread an arena that could not reuse what
/// the bronze phase had freed (a backfill peaked at 2.5 GB instead of 1.7 GB).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// streetflow: POS turnover from district operators into exactly-once Delta tables,
/// cash-flow features and credit decisions.
#[derive(Debug, Parser)]
#[command(name = "streetflow", version, about, long_about = None)]
struct Cli {
    /// Log lines as human-readable text or one JSON object each (on standard error).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole job with nothing installed: an embedded broker, a generated district,
    /// streaming workers, silver, features and decisions for both products.
    Demo(demo::DemoArgs),
    /// Generate a synthetic district: events (JSON Lines), registry and ground truth.
    Gen(generate::GenArgs),
    /// Decode and validate a JSON Lines file; count accepted and rejected lines by reason.
    Validate(validate::ValidateArgs),
    /// Consume POS events from Kafka into the bronze tables, exactly once.
    Ingest(ingest::IngestArgs),
    /// Publish a JSON Lines file to a topic, keyed by merchant, with simulated arrival times.
    Produce(ingest::ProduceArgs),
    /// Load operator exports (JSON Lines, gzip, CSV) into bronze and silver, resumably.
    Backfill(backfill::BackfillArgs),
    /// Bring the daily cash-flow table (merchant_daily) up to date with pos_events.
    Aggregate(aggregate::AggregateArgs),
    /// Compute point-in-time merchant features as of a date into merchant_features.
    Features(features::FeaturesArgs),
    /// Decide every merchant as of a date under a credit policy into credit_decisions.
    Decide(decide::DecideArgs),
    /// Rewrite small files into large ones (optionally Z-ordered); readers are unaffected.
    Compact(maintain::CompactArgs),
    /// Delete files no table version of the retention period needs.
    Vacuum(maintain::VacuumArgs),
    /// A credit officer's HTML page per merchant: cash-flow charts, decisions, reasons.
    Report(report::ReportArgs),
    /// Run a read-only SQL query over the lake's tables.
    Sql(sql::SqlArgs),
    /// Serve credit decisions over HTTP: stored decisions and one-merchant evaluation.
    Serve(serve::ServeArgs),
    /// Check a pipeline's brokers, topic, lake and tables; say what is wrong.
    Doctor(doctor::DoctorArgs),
    /// Rewrite a lake written by an earlier streetflow into the current tables.
    Migrate(migrate::MigrateArgs),
    /// Measure throughput (see each benchmark's help).
    #[command(subcommand)]
    Bench(streetflow_bench::BenchCommand),
}

fn init_logging(format: LogFormat, quiet: bool) {
    // The demo narrates its own steps; its workers' info lines would bury them.
    let level = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The Delta kernel narrates every snapshot at info; keep its warnings only.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!(
                "{level},buoyant_kernel=warn,deltalake_core=warn,deltalake_core::writer::stats=error"
            ))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, matches!(cli.command, Command::Demo(_)));
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Gen(args) => generate::run(&args),
        Command::Validate(args) => validate::run(&args),
        Command::Ingest(args) => ingest::run_ingest(&args),
        Command::Produce(args) => ingest::run_produce(&args),
        Command::Sql(args) => sql::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Compact(args) => maintain::run_compact(&args),
        Command::Vacuum(args) => maintain::run_vacuum(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Aggregate(args) => aggregate::run(&args),
        Command::Backfill(args) => backfill::run(&args),
        Command::Features(args) => features::run(&args),
        Command::Decide(args) => decide::run(&args),
        Command::Doctor(args) => doctor::run(&args),
        Command::Migrate(args) => migrate::run(&args),
        Command::Bench(command) => streetflow_bench::run(&command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
