//! `streetflow demo`: the whole job on a laptop, with nothing installed.
//!
//! A Kafka-protocol broker runs in this process (librdkafka's mock cluster). The demo
//! generates a district with the faults real feeds have (re-deliveries, late events,
//! malformed messages), publishes it with simulated arrival times, runs streaming workers
//! that stop once they have caught up, builds daily cash flow (silver), features as of
//! today (gold) and credit decisions for both shipped products, and says what each step
//! did and where the tables are.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{Days, NaiveDate, Utc};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::mocking::MockCluster;
use serde_json::json;
use streetflow_core::OperatorCalendars;
use streetflow_credit::{Outcome, decide};
use streetflow_features::{AsOf, FeatureInputs, SilverMode, refresh_silver, write_features};
use streetflow_ingest::{
    IngestOptions, IngestReport, PartitionWatermarks, ProduceOptions, Throttle, produce_file,
};
use streetflow_lake::Lake;
use streetflow_synth::{GenConfig, generate, write_registry_csv, write_truth_csv};

use crate::output::thousands;
use crate::output::{print_decision_summary, yuan};
use crate::runtime::runtime;
use crate::settings::load_pipeline;

/// Options of `streetflow demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Merchants of the generated district.
    #[arg(long, default_value_t = 120)]
    merchants: u32,
    /// Days of turnover, ending yesterday (the day before in the first 12 hours of a day).
    #[arg(long, default_value_t = 400)]
    days: u32,
    /// Streaming workers sharing the topic (one consumer group).
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Output directory: events, registry, truth and the lake (replaced if present).
    #[arg(long, default_value = "./demo")]
    out: PathBuf,
    /// Seed of the generator.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// A bar counting to `total`, drawn on standard error when it is a terminal.
fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "  {msg:<11} [{bar:32}] {human_pos}/{human_len} {per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A spinner for a step without a count.
fn spinner(what: &str) -> ProgressBar {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(what.to_owned());
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}

fn step(number: u32, text: impl std::fmt::Display, started: Instant) {
    println!(
        "[{number}/7] {text} ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

pub(crate) fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) && args.merchants * args.days > 20_000 {
        eprintln!(
            "note: this is a debug build; `cargo run --release -- demo` is several times faster"
        );
    }
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    let total = Instant::now();
    let out = args.out.as_path();
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let lake_dir = out.join("lake");
    if lake_dir.exists() {
        fs::remove_dir_all(&lake_dir)
            .with_context(|| format!("removing the previous demo lake {}", lake_dir.display()))?;
    }
    let runtime = runtime()?;

    // 1. A district whose last day is over: yesterday in the operators' zone, or the day
    // before while yesterday's late-night trade (up to a day cutoff, at most 12 hours into
    // today) still lies ahead. An event after the workers' clock would be a dead letter
    // (`future_timestamp`) that the generator's truth counts as a sale.
    let today = OperatorCalendars::default()
        .for_operator("")
        .business_date(&(Utc::now() - chrono::Duration::hours(12)));
    let start = today - Days::new(u64::from(args.days));
    let started = Instant::now();
    let config = GenConfig {
        seed: args.seed,
        merchants: args.merchants,
        days: args.days,
        start,
        duplicate_rate: 0.01,
        late_rate: 0.01,
        malformed_rate: 0.001,
        ..GenConfig::default()
    };
    let events_path = out.join("events.jsonl");
    let working = spinner("generating the district");
    let generated = generate(&config, BufWriter::new(create(&events_path)?))
        .context("generating the district")?;
    working.finish_and_clear();
    write_registry_csv(&generated.registry, create(&out.join("merchants.csv"))?)?;
    write_truth_csv(&generated.truth, create(&out.join("truth.csv"))?)?;
    let summary = &generated.summary;
    step(
        1,
        format_args!(
            "generated {} merchants × {} days ({start} … {}): {} messages — {} re-deliveries, {} late, {} malformed",
            args.merchants,
            args.days,
            today - Days::new(1),
            thousands(summary.lines),
            thousands(summary.duplicates),
            thousands(summary.late),
            thousands(summary.malformed_total()),
        ),
        started,
    );

    // 2–3. The embedded broker, the producer and the streaming workers, all at once: the
    // mock broker keeps only 5 MB per partition, so the producer runs at most
    // MAX_AHEAD_PER_PARTITION records (~2.5 MB) ahead of what the workers have committed
    // from each partition, and MAX_AHEAD in all.
    const MAX_AHEAD: u64 = 100_000;
    const MAX_AHEAD_PER_PARTITION: i64 = 10_000;
    let started = Instant::now();
    let cluster = MockCluster::new(1).context("starting the embedded Kafka broker")?;
    let topic = "pos.transactions.v1";
    let partitions = (args.workers * 2).max(16) as i32;
    cluster
        .create_topic(topic, partitions, 1)
        .context("creating the topic")?;
    let brokers = cluster.bootstrap_servers();
    let lake_url = lake_dir.to_str().context("output path is not UTF-8")?;
    let pipeline = load_pipeline(
        None,
        json!({
            "kafka": {
                "brokers": brokers, "topic": topic, "group": "streetflow-demo",
                // Short sessions: the embedded broker's coordinator can wait for a member
                // it still counts after a join retry, and with the default 45 s a
                // rebalance then outlasted the workers' stall rejoins (30 s) again and
                // again, so nothing was assigned (seen under load, about 1 run in 10).
                "properties": {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"},
            },
            "lake": {"url": lake_url},
            // Commit often: the producer waits for the commits.
            "flush": {"max_age_ms": 1000, "max_records": 50_000},
            // Silver is built once after ingest (step 4) rather than after every flush.
            "silver": {"update_after_flush": false},
            // One process, local disk: commits are visible within milliseconds, so the
            // lake's knowledge of an instant settles after two seconds, not minutes.
            "knowledge": {"settle_ms": 2000},
        }),
    )?;
    // Merchants dealt to partitions in turn (the producer then knows each record's
    // partition, for the per-partition throttle).
    let key_partitions: Arc<HashMap<String, i32>> = Arc::new(
        generated
            .registry
            .iter()
            .enumerate()
            .map(|(i, m)| (m.merchant_id.clone(), (i % partitions as usize) as i32))
            .collect(),
    );
    let watermarks = Arc::new(PartitionWatermarks::new(partitions as usize));
    let committed = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let bars = MultiProgress::new();
    let producing = bars.add(bar(summary.lines, "produced"));
    let ingesting = bars.add(bar(summary.lines, "committed"));
    let (produced, reports) = std::thread::scope(|scope| -> anyhow::Result<_> {
        // However the scope ends (a producer error returns early), the workers stop:
        // the scope waits for them, and they stop only on the flag.
        let _stop_on_exit = StopOnExit(&stop);
        let producer = scope.spawn(|| {
            produce_file(
                &events_path,
                &ProduceOptions {
                    brokers: brokers.clone(),
                    topic: topic.to_owned(),
                    properties: Vec::new(),
                    progress: Some(sent.clone()),
                    throttle: Some(Throttle {
                        done: committed.clone(),
                        max_ahead: MAX_AHEAD,
                        per_partition: Some((watermarks.clone(), MAX_AHEAD_PER_PARTITION)),
                        // Set when the workers stop: a producer waiting on them ends too.
                        stop: Some(stop.clone()),
                    }),
                    key_partitions: Some(key_partitions.clone()),
                },
            )
        });
        let workers: Vec<_> = (0..args.workers)
            .map(|_| {
                let options = IngestOptions {
                    config: pipeline.clone(),
                    exit_at_end: false,
                    stall_timeout: Duration::from_secs(180),
                    after_commit: None,
                    committed: Some(committed.clone()),
                    partition_watermarks: Some(watermarks.clone()),
                };
                let (handle, stop) = (runtime.handle().clone(), stop.clone());
                scope.spawn(move || streetflow_ingest::run_worker(options, handle, stop))
            })
            .collect();
        let mut last_change = (0, Instant::now());
        let mut stalled;
        let mut produced = None;
        let mut producer = Some(producer);
        loop {
            let done = committed.load(Ordering::Relaxed);
            producing.set_position(sent.load(Ordering::Relaxed));
            ingesting.set_position(done);
            if producer.as_ref().is_some_and(|p| p.is_finished())
                && let Some(p) = producer.take()
            {
                let report = p
                    .join()
                    .map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
                producing.set_length(report.delivered + report.failed);
                ingesting.set_length(report.delivered);
                produced = Some(report);
            }
            if done != last_change.0 {
                last_change = (done, Instant::now());
            }
            let caught_up = produced
                .as_ref()
                .is_some_and(|p: &streetflow_ingest::ProduceReport| done >= p.delivered);
            stalled = last_change.1.elapsed() > Duration::from_secs(120);
            let worker_ended = workers.iter().any(|w| w.is_finished());
            if caught_up || stalled || worker_ended {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        let reports = workers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("a worker thread panicked"))?
                    .map_err(anyhow::Error::from)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let produced = match (produced, producer) {
            (Some(report), _) => report,
            (None, Some(p)) => p
                .join()
                .map_err(|_| anyhow::anyhow!("the producer thread panicked"))?
                .with_context(|| {
                    if stalled {
                        "the workers committed nothing for 120 s"
                    } else {
                        "the workers stopped before the producer finished"
                    }
                })?,
            (None, None) => anyhow::bail!("the producer ended without a report"),
        };
        Ok((produced, reports))
    })?;
    producing.finish_and_clear();
    ingesting.finish_and_clear();
    // Every commit of the workers is visible now: the lake knows the whole district.
    let known_at = Utc::now();
    drop(cluster);
    anyhow::ensure!(
        produced.failed == 0,
        "{} records were not delivered",
        produced.failed
    );
    step(
        2,
        format_args!(
            "embedded broker {brokers}: published {} records ({:.0} MB) to {topic} ({partitions} partitions), timestamped with simulated arrival times",
            thousands(produced.delivered),
            produced.bytes as f64 / 1e6
        ),
        started,
    );
    let accepted: u64 = reports.iter().map(|r| r.accepted).sum();
    let dead: u64 = reports.iter().map(IngestReport::dead_lettered_total).sum();
    let again: u64 = reports
        .iter()
        .map(|r| r.replayed + r.dropped_on_rebalance)
        .sum();
    let lost: u64 = reports.iter().map(|r| r.records_lost_on_broker).sum();
    anyhow::ensure!(
        accepted + dead == produced.delivered && lost == 0,
        "counts do not reconcile: published {}, committed {accepted} to pos_events and {dead} to dead_letters, {lost} lost on the broker",
        produced.delivered
    );
    step(
        3,
        format_args!(
            "{} streaming workers: {} into pos_events, {} into dead_letters (each with its reason); published = accepted + dead-lettered{}",
            args.workers,
            thousands(accepted),
            thousands(dead),
            if again > 0 {
                format!(
                    " ({} read twice around a rebalance, kept once)",
                    thousands(again)
                )
            } else {
                String::new()
            },
        ),
        started,
    );

    // 4. Silver. Bitemporal silver holds what the lake knew up to its settled past: wait
    // until the instant the workers stopped has settled, so it holds the whole district.
    let started = Instant::now();
    let settled = known_at + pipeline.knowledge_rules().settle();
    if let Ok(wait) = (settled - Utc::now()).to_std() {
        std::thread::sleep(wait);
    }
    let lake = Lake::new(lake_url, &Default::default())?;
    let working = spinner("building merchant_daily");
    let silver = runtime.block_on(refresh_silver(
        &lake,
        SilverMode::Full,
        &streetflow_features::SilverSettings::of(&pipeline)?,
    ))?;
    working.finish_and_clear();
    step(
        4,
        format_args!(
            "merchant_daily (silver): {} merchant-days of cash flow, from bronze version {}",
            thousands(silver.rows_written as u64),
            silver.bronze_version.unwrap_or(-1)
        ),
        started,
    );

    // 5. Gold: features as of today, from what the lake knew once the workers stopped
    // (the history was streamed today, so at the start of today the lake knew nothing).
    let started = Instant::now();
    let inputs = FeatureInputs {
        calendars: OperatorCalendars::default(),
        registry: generated.registry.clone(),
        knowledge: pipeline.knowledge_rules(),
    };
    let as_of = AsOf {
        date: today,
        knowledge_time: Some(known_at),
    };
    let working = spinner("computing merchant_features");
    let features = runtime.block_on(write_features(&lake, &as_of, &inputs))?;
    working.finish_and_clear();
    step(
        5,
        format_args!(
            "merchant_features (gold) as of {today}: {} merchants × the v1 feature set",
            thousands(features.rows as u64)
        ),
        started,
    );

    // 6. Decisions for both products.
    let started = Instant::now();
    let mut decided = Vec::new();
    let policies = runtime.block_on(streetflow_credit::Policy::shipped())?;
    for policy in &policies {
        let (_, summary) = runtime.block_on(decide(&lake, today, policy))?;
        println!();
        print_decision_summary(policy, &summary);
        decided.push(summary);
    }
    println!();
    // A credit officer's page for a few approved, referred and declined merchants.
    let report_path = out.join("report.html");
    let policies = policies
        .into_iter()
        .map(|p| (p.product.id.clone(), p))
        .collect();
    let report = runtime.block_on(streetflow_report::write_report(
        &lake,
        today,
        &[],
        2,
        &policies,
        &report_path,
    ))?;
    step(
        6,
        format_args!(
            "credit_decisions for {} products; report of {} merchants in {}",
            decided.len(),
            report.merchants.len(),
            report_path.display()
        ),
        started,
    );

    // 7. What happened, in one table, and where to look next.
    let mut t = crate::output::table(&[
        "product",
        "approve",
        "refer",
        "decline",
        "total limit (yuan)",
    ]);
    for summary in &decided {
        let count =
            |o: Outcome| thousands(summary.by_decision.get(&o).copied().unwrap_or(0) as u64);
        let limits: i64 = summary.limit_fen_by_decision.values().sum();
        t.add_row(vec![
            summary.product.clone(),
            count(Outcome::Approve),
            count(Outcome::Refer),
            count(Outcome::Decline),
            yuan(limits),
        ]);
    }
    step(7, "done", total);
    println!("{t}");
    print_next_steps(out, &lake_dir, today);
    Ok(())
}

fn print_next_steps(out: &Path, lake: &Path, today: NaiveDate) {
    let lake = lake.display();
    println!(
        "\nWritten to {}: report.html (open it in a browser), events.jsonl, merchants.csv (registry), truth.csv (the generator's exact daily figures), lake/ (Delta tables pos_events, dead_letters, merchant_daily, merchant_features, credit_decisions).",
        out.display()
    );
    println!("Try:");
    println!(
        "  streetflow sql --lake {lake} \"SELECT decision, count(*), sum(limit_fen) / 100 AS yuan FROM credit_decisions GROUP BY decision\""
    );
    println!(
        "  streetflow sql --lake {lake} \"SELECT reason, count(*) FROM dead_letters GROUP BY reason ORDER BY 2 DESC\""
    );
    println!(
        "  streetflow serve --lake {lake} --registry {}/merchants.csv --no-auth   # then GET /v1/merchants/{{operator}}/{{merchant}}/decision?product=district-turnover-loan",
        out.display()
    );
    println!(
        "  python3 -c \"import polars as pl; print(pl.read_delta('{lake}/merchant_features').filter(pl.col('as_of_date') == pl.date({}, {}, {})))\"",
        today.format("%Y"),
        today.format("%-m"),
        today.format("%-d")
    );
}

fn create(path: &Path) -> anyhow::Result<File> {
    File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// Sets its flag when dropped.
struct StopOnExit<'a>(&'a AtomicBool);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
