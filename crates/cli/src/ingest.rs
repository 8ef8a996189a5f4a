//! `streetflow ingest` and `streetflow produce`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use streetflow_features::{SilverMode, SilverSettings, refresh_silver};
use streetflow_ingest::{
    AfterCommit, IngestOptions, IngestReport, ProduceOptions, create_topic_with, produce_file,
    run_worker,
};

use crate::output::thousands;
use crate::runtime::runtime;
use crate::settings::{load_pipeline, set_override};

/// Options of `streetflow ingest`.
#[derive(Debug, Args)]
pub(crate) struct IngestArgs {
    /// Pipeline file (TOML); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long)]
    brokers: Option<String>,
    /// Topic of pos_transaction/v1 events.
    #[arg(long)]
    topic: Option<String>,
    /// Consumer group shared by the workers.
    #[arg(long)]
    group: Option<String>,
    /// Lake root: a directory or an object-store URL.
    #[arg(long)]
    lake: Option<String>,
    /// Pipeline name (prefix of the Delta txn application ids).
    #[arg(long)]
    pipeline: Option<String>,
    /// Also publish dead letters to this topic.
    #[arg(long)]
    dlq_topic: Option<String>,
    /// Flush after this many messages.
    #[arg(long)]
    max_records: Option<usize>,
    /// Flush when the oldest buffered message is this old.
    #[arg(long)]
    max_age_ms: Option<u64>,
    /// Prometheus endpoint, e.g. 127.0.0.1:9464.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Stop once the lake holds every partition of the topic up to its end.
    #[arg(long)]
    exit_at_end: bool,
    /// With --exit-at-end: fail when records wait in the topic this long with nothing
    /// storing them, or the broker does not answer this long. (Any worker says what it
    /// sees after 20 s, and rejoins its group after twice the flush age and 30 s.)
    /// Longer than the group's session timeout (45 s by default), so a worker restarted
    /// after a crash outlasts its dead predecessor's partitions.
    #[arg(long, default_value_t = 180, value_name = "SECONDS")]
    stall_timeout_secs: u64,
    /// Do not refresh merchant_daily after each flush (run `streetflow aggregate` instead).
    #[arg(long)]
    no_silver: bool,
    /// Print the final report as JSON on standard output.
    #[arg(long)]
    json: bool,
}

/// Options of `streetflow produce`.
#[derive(Debug, Args)]
pub(crate) struct ProduceArgs {
    /// Kafka bootstrap servers.
    #[arg(long)]
    brokers: String,
    /// Target topic.
    #[arg(long, default_value = "pos.transactions.v1")]
    topic: String,
    /// JSON Lines file to publish, one record per line.
    #[arg(long)]
    input: PathBuf,
    /// Create the topic with this many partitions if it does not exist.
    #[arg(long)]
    partitions: Option<i32>,
    /// A librdkafka producer property, e.g. `security.protocol=SSL`; repeatable.
    #[arg(long = "property", value_name = "KEY=VALUE", value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn report_json(report: &IngestReport, seconds: f64) -> serde_json::Value {
    json!({
        "consumed": report.consumed,
        "accepted": report.accepted,
        "dead_lettered": report.dead_lettered_total(),
        "dead_lettered_by_reason": report.dead_lettered,
        "replayed": report.replayed,
        "dropped_on_rebalance": report.dropped_on_rebalance,
        "flushes": report.flushes,
        "fenced": report.fenced,
        "gaps_repaired": report.gaps_repaired,
        "records_lost_on_broker": report.records_lost_on_broker,
        "seconds": seconds,
    })
}

/// Keeps `merchant_daily` within one flush of bronze. Silver is a function of bronze
/// that `streetflow aggregate` can always rebuild, so a failure is reported, not fatal.
fn silver_refresh_hook(settings: SilverSettings) -> AfterCommit {
    Arc::new(move |lake, handle| {
        match handle.block_on(refresh_silver(lake, SilverMode::Incremental, &settings)) {
            Ok(report) => tracing::debug!(
                bronze_version = ?report.bronze_version,
                days = ?report.days_rewritten,
                rows = report.rows_written,
                fenced = report.fenced,
                history_versions = report.history.versions_written,
                "merchant_daily refreshed"
            ),
            Err(error) => {
                metrics::counter!("streetflow_silver_refresh_failures_total").increment(1);
                tracing::warn!(%error, "refreshing merchant_daily failed; the next flush or `streetflow aggregate` catches up");
            }
        }
    })
}

pub(crate) fn run_ingest(args: &IngestArgs) -> anyhow::Result<()> {
    let mut overrides = json!({});
    for (path, value) in [
        ("kafka.brokers", args.brokers.clone().map(Into::into)),
        ("kafka.topic", args.topic.clone().map(Into::into)),
        ("kafka.group", args.group.clone().map(Into::into)),
        ("kafka.dlq_topic", args.dlq_topic.clone().map(Into::into)),
        ("lake.url", args.lake.clone().map(Into::into)),
        ("pipeline.name", args.pipeline.clone().map(Into::into)),
        ("flush.max_records", args.max_records.map(Into::into)),
        ("flush.max_age_ms", args.max_age_ms.map(Into::into)),
        ("metrics.addr", args.metrics_addr.clone().map(Into::into)),
        (
            "silver.update_after_flush",
            args.no_silver.then_some(false.into()),
        ),
    ] {
        set_override(&mut overrides, path, value);
    }
    let config = load_pipeline(args.config.as_deref(), overrides)?;
    let runtime = runtime()?;
    if !config.metrics.addr.is_empty() {
        let addr: std::net::SocketAddr = config
            .metrics
            .addr
            .parse()
            .with_context(|| format!("metrics address {:?}", config.metrics.addr))?;
        let _entered = runtime.enter();
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("starting the metrics endpoint on {addr}"))?;
        streetflow_ingest::metrics::describe();
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    let started = Instant::now();
    let after_commit = if config.silver.update_after_flush {
        Some(silver_refresh_hook(
            streetflow_features::SilverSettings::of(&config)?,
        ))
    } else {
        None
    };
    let options = IngestOptions {
        config,
        exit_at_end: args.exit_at_end,
        after_commit,
        committed: None,
        partition_watermarks: None,
        stall_timeout: Duration::from_secs(args.stall_timeout_secs),
    };
    let report = run_worker(options, runtime.handle().clone(), stop)?;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", report_json(&report, seconds));
    } else {
        println!(
            "consumed {} records in {seconds:.1} s: {} to pos_events, {} to dead_letters, {} already in the lake",
            thousands(report.consumed),
            thousands(report.accepted),
            thousands(report.dead_lettered_total()),
            thousands(report.replayed),
        );
    }
    Ok(())
}

pub(crate) fn run_produce(args: &ProduceArgs) -> anyhow::Result<()> {
    let runtime = runtime()?;
    if let Some(partitions) = args.partitions {
        create_topic_with(
            &args.brokers,
            &args.properties,
            &args.topic,
            partitions,
            runtime.handle(),
        )?;
    }
    let started = Instant::now();
    let report = produce_file(
        &args.input,
        &ProduceOptions {
            brokers: args.brokers.clone(),
            topic: args.topic.clone(),
            properties: args.properties.clone(),
            progress: None,
            throttle: None,
            key_partitions: None,
        },
    )?;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            json!({"delivered": report.delivered, "failed": report.failed, "bytes": report.bytes, "unkeyed": report.unkeyed, "seconds": seconds})
        );
    } else {
        println!(
            "published {} records ({:.1} MB) to {} in {seconds:.1} s ({:.0} records/s); {} failed",
            thousands(report.delivered),
            report.bytes as f64 / 1e6,
            args.topic,
            report.delivered as f64 / seconds.max(1e-9),
            report.failed
        );
    }
    anyhow::ensure!(
        report.failed == 0,
        "{} records were not delivered",
        report.failed
    );
    Ok(())
}
