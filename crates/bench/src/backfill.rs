//! `streetflow bench backfill`: a multi-GB JSON Lines export into bronze + silver, timed
//! against DuckDB reading the same file and writing the same daily aggregates to Parquet.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};
use streetflow_core::PipelineConfig;
use streetflow_core::tables::{MERCHANT_DAILY, MERCHANT_DAILY_HISTORY, POS_EVENTS};
use streetflow_features::{SilverFromLoad, SilverMode, refresh_silver, sql};
use streetflow_ingest::{BackfillOptions, InputFormat, KnowledgeTime, backfill_file};
use streetflow_lake::Lake;
use streetflow_lake::arrow::array::{Array, AsArray};
use streetflow_lake::arrow::datatypes::Int64Type;
use streetflow_synth::{GenConfig, generate};

use crate::console::{create, runtime, table, thousands};
use crate::features::{peak_rss, reset_peak_rss};

/// Options of `streetflow bench backfill`.
#[derive(Debug, Args)]
pub struct BenchBackfillArgs {
    /// Merchants of the generated export (250 × 400 days ≈ 8.4 M lines, 2.1 GB).
    #[arg(long, default_value_t = 250)]
    merchants: u32,
    /// Days of the generated export.
    #[arg(long, default_value_t = 400)]
    days: u32,
    /// District operators the merchants are dealt to (the many-operator sparse shape:
    /// `--merchants 2000 --operators 4 --days 365 --activity 0.03`, about 2 M lines).
    #[arg(long, default_value_t = 1)]
    operators: u32,
    /// Scales every merchant's typical daily sales (0.03: a few sales a day).
    #[arg(long, default_value_t = 1.0)]
    activity: f64,
    /// Working directory; an export generated there with the same settings is reused.
    #[arg(long, default_value = "./bench-backfill")]
    workdir: PathBuf,
    /// Python interpreter that has the `duckdb` package.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Measure streetflow only.
    #[arg(long)]
    skip_duckdb: bool,
    /// Load with observed knowledge (`streetflow backfill`'s default: the lake knows the
    /// rows from the load on, so the history has nothing settled to build yet) instead
    /// of the arrival times asserted (`--knowledge-from-occurred`, every version built).
    #[arg(long)]
    observed: bool,
}

/// What the generator says the daily table must hold (saved beside the export).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Totals {
    days: i64,
    sales_count: i64,
    net_fen: i64,
    refund_fen: i64,
}

/// The export's settings, so a reused file is known to match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Export {
    merchants: u32,
    days: u32,
    #[serde(default)]
    operators: u32,
    #[serde(default)]
    activity: f64,
    lines: u64,
    bytes: u64,
    truth: Totals,
}

const DUCKDB_SCRIPT: &str = include_str!("../scripts/duckdb_backfill.py");

#[derive(Debug, Deserialize)]
struct DuckRun {
    seconds: f64,
    version: String,
    peak_rss: u64,
    totals: Totals,
}

fn prepare_export(args: &BenchBackfillArgs, events: &Path) -> anyhow::Result<Export> {
    let meta = args.workdir.join("events.json");
    if let Ok(text) = fs::read_to_string(&meta)
        && let Ok(export) = serde_json::from_str::<Export>(&text)
        && export.merchants == args.merchants
        && export.days == args.days
        && export.operators == args.operators
        && export.activity == args.activity
        && fs::metadata(events).map(|m| m.len()).ok() == Some(export.bytes)
    {
        return Ok(export);
    }
    println!(
        "generating {} merchants of {} operators × {} days at activity {} (duplicates 1 %, late arrivals 1 %) …",
        args.merchants, args.operators, args.days, args.activity
    );
    let config = GenConfig {
        merchants: args.merchants,
        days: args.days,
        operators: args.operators,
        activity: args.activity,
        duplicate_rate: 0.01,
        late_rate: 0.01,
        ..GenConfig::default()
    };
    let generated = generate(&config, create(events)?)?;
    let truth = generated.truth.iter().fold(
        Totals {
            days: 0,
            sales_count: 0,
            net_fen: 0,
            refund_fen: 0,
        },
        |t, row| Totals {
            days: t.days + 1,
            sales_count: t.sales_count + i64::from(row.sales_count),
            net_fen: t.net_fen + row.sales_fen - row.refund_fen,
            refund_fen: t.refund_fen + row.refund_fen,
        },
    );
    let export = Export {
        merchants: args.merchants,
        days: args.days,
        operators: args.operators,
        activity: args.activity,
        lines: generated.summary.lines,
        bytes: generated.summary.bytes,
        truth,
    };
    fs::write(&meta, serde_json::to_string(&export)?)?;
    Ok(export)
}

async fn silver_totals(lake: &Lake) -> anyhow::Result<Totals> {
    let batches = lake
        .query(
            "SELECT count(*), CAST(sum(sales_count) AS BIGINT), CAST(sum(net_fen) AS BIGINT), \
             CAST(sum(refund_fen) AS BIGINT) FROM merchant_daily",
        )
        .await?;
    let batch = batches.first().context("no totals")?;
    let value = |i: usize| batch.column(i).as_primitive::<Int64Type>().value(0);
    anyhow::ensure!(
        batch.num_rows() == 1 && !batch.column(1).is_null(0),
        "no totals"
    );
    Ok(Totals {
        days: value(0),
        sales_count: value(1),
        net_fen: value(2),
        refund_fen: value(3),
    })
}

fn write_duckdb_sql(work: &Path) -> anyhow::Result<()> {
    let dir = work.join("sql");
    fs::create_dir_all(&dir)?;
    let mut steps = String::new();
    let relations = sql::RESOLVE_STEPS
        .iter()
        .map(|s| (s.name, s.sql, s.materialize))
        .chain([("daily", sql::DAILY, true)]);
    for (name, text, materialize) in relations {
        fs::write(dir.join(format!("{name}.sql")), text)?;
        steps.push_str(&format!(
            "{name} {}\n",
            if materialize { "TABLE" } else { "VIEW" }
        ));
    }
    fs::write(dir.join("steps.txt"), steps)?;
    Ok(())
}

pub(crate) fn bench_backfill(args: &BenchBackfillArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; measure with `cargo run --release -- bench …`");
    }
    fs::create_dir_all(&args.workdir)?;
    let work = fs::canonicalize(&args.workdir)?;
    let events = work.join("events.jsonl");
    let export = prepare_export(args, &events)?;
    println!(
        "bench backfill: {} lines, {:.2} GB of JSON Lines ({} merchants of {} operators × {} days, activity {})",
        thousands(export.lines),
        export.bytes as f64 / 1e9,
        args.merchants,
        args.operators,
        args.days,
        args.activity
    );

    // streetflow: the `streetflow backfill` path, in process.
    let lake_dir = work.join("lake");
    let _ = fs::remove_dir_all(&lake_dir);
    let lake = Lake::new(
        lake_dir.to_str().context("non-UTF-8 path")?,
        &Default::default(),
    )?;
    let options = BackfillOptions {
        config: PipelineConfig::defaults(),
        knowledge: if args.observed {
            KnowledgeTime::Observed
        } else {
            KnowledgeTime::FromOccurred
        },
        commit_every_lines: 2_000_000,
        bytes_read: None,
        committed_rows: None,
    };
    let runtime = runtime()?;
    let settings = streetflow_features::SilverSettings::of(&options.config)?;
    reset_peak_rss();
    let started = Instant::now();
    let (report, bronze_seconds, silver) = runtime.block_on(async {
        let from_load = SilverFromLoad::start(&lake).await?;
        let options = BackfillOptions {
            committed_rows: from_load.as_ref().map(SilverFromLoad::sender),
            ..options.clone()
        };
        let report = backfill_file(&lake, &events, &options, &InputFormat::JsonLines).await?;
        drop(options);
        let bronze_seconds = started.elapsed().as_secs_f64();
        let silver = match from_load {
            Some(from_load) => from_load.finish(&lake, &settings).await?,
            None => None,
        };
        let silver = match silver {
            Some(silver) => silver,
            None => refresh_silver(&lake, SilverMode::Incremental, &settings).await?,
        };
        anyhow::Ok((report, bronze_seconds, silver))
    })?;
    let ours_seconds = started.elapsed().as_secs_f64();
    let ours_peak = peak_rss();
    let ours = runtime.block_on(silver_totals(&lake))?;
    let mut files = Vec::new();
    for name in [
        POS_EVENTS.name,
        MERCHANT_DAILY.name,
        MERCHANT_DAILY_HISTORY.name,
    ] {
        let count = match runtime.block_on(lake.open(name))? {
            Some(table) => table.snapshot()?.log_data().num_files(),
            None => 0,
        };
        files.push(format!("{name} {count}"));
    }
    anyhow::ensure!(
        report.accepted + report.dead_lettered == export.lines,
        "lines do not reconcile: {} accepted + {} dead letters != {} lines",
        report.accepted,
        report.dead_lettered,
        export.lines
    );

    let mut t = table(&[
        "engine",
        "seconds",
        "MB/s",
        "lines/s",
        "peak RSS MB",
        "daily rows",
        "= truth",
    ]);
    let row = |engine: String, seconds: f64, peak: Option<u64>, totals: Totals| {
        vec![
            engine,
            format!("{seconds:.1}"),
            format!("{:.0}", export.bytes as f64 / 1e6 / seconds),
            thousands((export.lines as f64 / seconds) as u64),
            peak.map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6)),
            thousands(totals.days as u64),
            if totals == export.truth { "yes" } else { "NO" }.to_owned(),
        ]
    };
    t.add_row(row(
        format!("streetflow (bronze {bronze_seconds:.1} s + silver)"),
        ours_seconds,
        ours_peak,
        ours,
    ));
    let mut ratio = None;
    if !args.skip_duckdb {
        write_duckdb_sql(&work)?;
        let _ = fs::remove_file(work.join("duck.db"));
        let script = work.join("duckdb_backfill.py");
        fs::write(&script, DUCKDB_SCRIPT)?;
        let output = Command::new(&args.python)
            .arg(&script)
            .arg(&events)
            .arg(&work)
            .arg(
                std::thread::available_parallelism()
                    .map_or(2, |n| n.get())
                    .to_string(),
            )
            .output()
            .with_context(|| format!("starting {}", args.python))?;
        let _ = fs::remove_file(work.join("duck.db"));
        anyhow::ensure!(
            output.status.success(),
            "DuckDB run failed (is the `duckdb` package installed for {}?):\n{}",
            args.python,
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let duck: DuckRun = serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .with_context(|| format!("reading DuckDB's report {stdout:?}"))?;
        t.add_row(row(
            format!("DuckDB {}", duck.version),
            duck.seconds,
            Some(duck.peak_rss),
            duck.totals,
        ));
        ratio = Some(duck.seconds / ours_seconds);
    }
    println!("{t}");
    println!(
        "streetflow: {} events/s end to end, bronze + merchant_daily + merchant_daily_history (goal ≥ 1,000,000); files: {}",
        thousands((export.lines as f64 / ours_seconds) as u64),
        files.join(", ")
    );
    println!(
        "bitemporal silver: {} versions for {} merchant-days ({:.3} versions a day: late data, late voids and re-deliveries make the rest)",
        thousands(silver.history.versions_written as u64),
        thousands(silver.rows_written as u64),
        silver.history.versions_written as f64 / silver.rows_written.max(1) as f64
    );
    if let Some(ratio) = ratio {
        println!("streetflow is {ratio:.2}× DuckDB's speed (goal ≥ 1×)");
    }
    anyhow::ensure!(
        ours == export.truth,
        "streetflow's merchant_daily differs from the generator's truth: {ours:?} vs {:?}",
        export.truth
    );
    Ok(())
}
