//! `streetflow backfill`: load operator exports (JSON Lines, gzip, CSV) into bronze and
//! bring silver up to date, resumably and idempotently.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, FixedOffset, Utc};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use streetflow_features::{SilverFromLoad, SilverMode, refresh_silver};
use streetflow_ingest::{
    BackfillOptions, CsvMapping, FileReport, InputFormat, KnowledgeTime, backfill_file,
    expand_inputs, is_csv_file,
};
use streetflow_lake::Lake;

use crate::output::{table, thousands};
use crate::runtime::runtime;
use crate::settings::{load_pipeline, set_override};

/// Options of `streetflow backfill`.
#[derive(Debug, Args)]
pub(crate) struct BackfillArgs {
    /// Lake root: a directory or an object-store URL (default: the pipeline file's).
    #[arg(long)]
    lake: Option<String>,
    /// Files or folders to load: JSON Lines (`.jsonl`, `.ndjson`, `.json`), CSV (`.csv`,
    /// needs --csv-mapping), each optionally `.gz`. Folders are searched recursively.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Mapping of CSV columns onto the event contract (TOML; see
    /// pipelines/backfill/csv-mapping.example.toml).
    #[arg(long)]
    csv_mapping: Option<PathBuf>,
    /// Pipeline file (decoder limits, business calendars, lake storage options).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Assert that the bank held every loaded row from this time (RFC 3339), for history
    /// it kept elsewhere; recorded as `knowledge_source = 'asserted'`. Default: observed,
    /// the lake's own stamp at each commit of the load, so features as of an earlier
    /// knowledge time never see the rows.
    #[arg(long, conflicts_with = "knowledge_from_occurred")]
    knowledge_time: Option<DateTime<FixedOffset>>,
    /// Assert for each row the arrival time a stream would have given: the latest
    /// occurred_at so far in its file. For history the bank held at the time (e.g.
    /// re-loading a stream); recorded as `knowledge_source = 'asserted'`.
    #[arg(long)]
    knowledge_from_occurred: bool,
    /// Allow asserted knowledge times at or before what the lake's bitemporal silver has
    /// already settled: vectors already computed as of those times change. Without it,
    /// such a load is refused.
    #[arg(long)]
    revise_settled_knowledge: bool,
    /// Commit after this many lines; an interrupted load resumes from the last commit.
    /// An observed load (no asserted knowledge) also commits sooner when the stamp of a
    /// commit's first rows has used half its knowledge deadline (`knowledge.settle_ms`).
    #[arg(long, default_value_t = 2_000_000)]
    commit_every: u64,
    /// Leave merchant_daily alone (run `streetflow aggregate` later).
    #[arg(long)]
    no_silver: bool,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    json: bool,
}

fn format_of(path: &Path, mapping: Option<&Arc<CsvMapping>>) -> anyhow::Result<InputFormat> {
    if is_csv_file(path) {
        let mapping = mapping.with_context(|| {
            format!(
                "{} is CSV: say which column is which with --csv-mapping",
                path.display()
            )
        })?;
        Ok(InputFormat::Csv(mapping.clone()))
    } else {
        Ok(InputFormat::JsonLines)
    }
}

fn bytes_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "  loading [{bar:32}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

pub(crate) fn run(args: &BackfillArgs) -> anyhow::Result<()> {
    let mut overrides = json!({});
    set_override(
        &mut overrides,
        "lake.url",
        args.lake.clone().map(Into::into),
    );
    let config = load_pipeline(args.config.as_deref(), overrides)?;
    let mapping = match &args.csv_mapping {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(Arc::new(CsvMapping::from_toml(&text)?))
        }
        None => None,
    };
    let files = expand_inputs(&args.input)?;
    anyhow::ensure!(
        !files.is_empty(),
        "no .jsonl, .ndjson, .json or .csv files (optionally .gz) under {}",
        args.input
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let formats = files
        .iter()
        .map(|f| format_of(f, mapping.as_ref()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let total_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();

    let knowledge = match (args.knowledge_from_occurred, args.knowledge_time) {
        (true, _) => KnowledgeTime::FromOccurred,
        (false, Some(at)) => KnowledgeTime::At(at.with_timezone(&Utc)),
        (false, None) => KnowledgeTime::Observed,
    };
    let lake = Lake::new(&config.lake.url, &config.lake.storage)?;
    let runtime = runtime()?;
    if knowledge != KnowledgeTime::Observed && !args.revise_settled_knowledge {
        refuse_revising_settled_knowledge(&runtime, &lake, knowledge, &files)?;
    }
    let bytes_read = Arc::new(AtomicU64::new(0));
    // A first load builds silver from the rows it commits, beside the load.
    let from_load = if args.no_silver {
        None
    } else {
        runtime.block_on(SilverFromLoad::start(&lake))?
    };
    let options = BackfillOptions {
        config: config.clone(),
        knowledge,
        commit_every_lines: args.commit_every,
        bytes_read: Some(bytes_read.clone()),
        committed_rows: from_load.as_ref().map(SilverFromLoad::sender),
    };
    let started = Instant::now();
    let bar = bytes_bar(total_bytes);
    let ticker = {
        let bar = bar.clone();
        let bytes_read = bytes_read.clone();
        std::thread::spawn(move || {
            while !bar.is_finished() {
                bar.set_position(bytes_read.load(std::sync::atomic::Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let mut reports: Vec<FileReport> = Vec::with_capacity(files.len());
    let loaded = runtime.block_on(async {
        for (file, format) in files.iter().zip(&formats) {
            bar.set_message(
                file.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            let before = bytes_read.load(std::sync::atomic::Ordering::Relaxed);
            let report = backfill_file(&lake, file, &options, format)
                .await
                .with_context(|| format!("loading {}", file.display()))?;
            if report.already_loaded {
                // Count the skipped file as done so the bar's total stays honest.
                let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
                bytes_read.store(before + size, std::sync::atomic::Ordering::Relaxed);
            }
            reports.push(report);
        }
        anyhow::Ok(())
    });
    bar.finish_and_clear();
    let _ = ticker.join();
    drop(options);
    loaded?;
    let load_seconds = started.elapsed().as_secs_f64();

    let mut silver_from_load = false;
    let silver = if args.no_silver {
        None
    } else {
        let spinner = ProgressBar::new_spinner();
        spinner.set_message("bringing merchant_daily up to date");
        spinner.enable_steady_tick(Duration::from_millis(120));
        let settings = streetflow_features::SilverSettings::of(&config)?;
        let report = runtime
            .block_on(async {
                if let Some(from_load) = from_load
                    && let Some(report) = from_load.finish(&lake, &settings).await?
                {
                    silver_from_load = true;
                    return Ok(report);
                }
                refresh_silver(&lake, SilverMode::Incremental, &settings).await
            })
            .context("refreshing merchant_daily (re-run, or run `streetflow aggregate`)");
        spinner.finish_and_clear();
        Some(report?)
    };
    let seconds = started.elapsed().as_secs_f64();

    let accepted: u64 = reports.iter().map(|r| r.accepted).sum();
    let dead: u64 = reports.iter().map(|r| r.dead_lettered).sum();
    let lines: u64 = reports.iter().map(|r| r.lines).sum();
    if args.json {
        println!(
            "{}",
            json!({
                "files": reports.iter().map(|r| json!({
                    "path": r.path,
                    "identity": r.identity,
                    "already_loaded": r.already_loaded,
                    "lines": r.lines,
                    "resumed_after_line": r.resumed_after,
                    "accepted": r.accepted,
                    "dead_lettered": r.dead_lettered,
                    "commits": r.commits,
                })).collect::<Vec<_>>(),
                "accepted": accepted,
                "dead_lettered": dead,
                "bytes": total_bytes,
                "load_seconds": load_seconds,
                "silver_rows_written": silver.as_ref().map(|s| s.rows_written),
                "silver_built_from_the_load": silver_from_load,
                "bronze_version": silver.as_ref().and_then(|s| s.bronze_version),
                "seconds": seconds,
            })
        );
        return Ok(());
    }
    let mut t = table(&["file", "lines", "to pos_events", "to dead_letters", "note"]);
    for r in &reports {
        let note = if r.already_loaded {
            "loaded before: skipped".to_owned()
        } else if r.resumed_after > 0 {
            format!("resumed after line {}", thousands(r.resumed_after))
        } else {
            String::new()
        };
        t.add_row(vec![
            r.path.clone(),
            thousands(r.lines),
            thousands(r.accepted),
            thousands(r.dead_lettered),
            note,
        ]);
    }
    println!("{t}");
    println!(
        "loaded {} files ({:.1} MB, {} lines) in {load_seconds:.1} s: {} events to pos_events, {} to dead_letters",
        reports.len(),
        total_bytes as f64 / 1e6,
        thousands(lines),
        thousands(accepted),
        thousands(dead),
    );
    if let Some(silver) = silver {
        println!(
            "merchant_daily reflects pos_events version {}: {} daily rows written ({:.1} s in all)",
            silver
                .bronze_version
                .map_or_else(|| "-".to_owned(), |v| v.to_string()),
            thousands(silver.rows_written as u64),
            seconds
        );
    }
    if dead > 0 {
        println!(
            "see why lines were rejected: streetflow sql --lake {} \"SELECT reason, count(*) FROM dead_letters WHERE source_file IS NOT NULL GROUP BY reason\"",
            config.lake.url
        );
    }
    Ok(())
}

/// Refuses asserted knowledge that would change what bitemporal silver has settled: a
/// time at or before its horizon (any time, for `--knowledge-from-occurred`, whose times
/// come from the file).
fn refuse_revising_settled_knowledge(
    runtime: &tokio::runtime::Runtime,
    lake: &Lake,
    knowledge: KnowledgeTime,
    files: &[PathBuf],
) -> anyhow::Result<()> {
    let horizon = runtime
        .block_on(lake.app_version(
            streetflow_core::tables::MERCHANT_DAILY_HISTORY.name,
            streetflow_features::HORIZON_APP_ID,
        ))?
        .and_then(chrono::DateTime::<Utc>::from_timestamp_micros);
    let Some(horizon) = horizon else {
        return Ok(());
    };
    // A re-run of files already loaded adds nothing and revises nothing.
    let mut all_loaded = true;
    for file in files {
        let identity = streetflow_ingest::file_identity(file)?;
        let eof = format!("backfill-{identity}-eof");
        if runtime
            .block_on(lake.app_version(streetflow_core::tables::POS_EVENTS.name, &eof))?
            .is_none()
        {
            all_loaded = false;
        }
    }
    if all_loaded {
        return Ok(());
    }
    let revises = match knowledge {
        KnowledgeTime::At(at) => at <= horizon,
        KnowledgeTime::FromOccurred => true,
        KnowledgeTime::Observed => false,
    };
    anyhow::ensure!(
        !revises,
        "the lake has settled what it knew up to {}: asserting earlier knowledge changes \
         vectors already computed as of those times. Load without --knowledge-time / \
         --knowledge-from-occurred (the lake then knows the rows from now), or add \
         --revise-settled-knowledge to rewrite that history on purpose",
        horizon.to_rfc3339()
    );
    Ok(())
}
