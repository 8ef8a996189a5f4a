//! `streetflow features`: point-in-time merchant features as of a date.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, FixedOffset, Utc};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use streetflow_features::{
    AsOf, FeatureInputs, SilverMode, load_spine, refresh_silver, write_features, write_training_set,
};
use streetflow_lake::Lake;

use crate::output::{table, thousands};
use crate::runtime::runtime;
use crate::settings::{AsOfArg, load_pipeline};

/// Options of `streetflow features`.
#[derive(Debug, Args)]
pub(crate) struct FeaturesArgs {
    /// Lake root.
    #[arg(long, default_value = "./lake")]
    lake: String,
    /// Compute features as of this business date (windows end the day before), or
    /// `today` / `yesterday` in the operators' business calendar, and write them to the
    /// lake's merchant_features table.
    #[arg(long, required_unless_present = "spine", conflicts_with = "spine")]
    as_of: Option<AsOfArg>,
    /// Training spine (CSV: operator_id, merchant_id, as_of_date[, knowledge_time]):
    /// write one row per spine row, each as of its own date, to --out.
    #[arg(long, requires = "out")]
    spine: Option<PathBuf>,
    /// Parquet file for the training set (with --spine).
    #[arg(long, requires = "spine")]
    out: Option<PathBuf>,
    /// Use only what the lake knew at this time: RFC 3339, or `latest` for the latest
    /// settled knowledge bitemporal silver holds (its horizon). Default: the end of the
    /// day before the as-of date in each operator's business calendar.
    #[arg(long, value_parser = parse_knowledge_time)]
    knowledge_time: Option<KnowledgeArg>,
    /// Merchant registry (CSV or JSON Lines) for MCC, opening date and rent.
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Pipeline file whose `[calendar]` section gives the operators' calendars.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &FeaturesArgs) -> anyhow::Result<()> {
    let config = load_pipeline(args.config.as_deref(), serde_json::json!({}))?;
    let inputs = crate::settings::feature_inputs(&config, args.registry.as_deref())?;
    let runtime = runtime()?;
    let lake = Lake::new(&args.lake, &config.lake.storage)?;
    // Bitemporal silver up to the settled present first: a scheduled run must not wait
    // for a worker's next flush to find the day it asks about closed.
    runtime
        .block_on(refresh_silver(
            &lake,
            SilverMode::Incremental,
            &streetflow_features::SilverSettings::of(&config)?,
        ))
        .context("bringing silver up to date")?;
    if let (Some(spine), Some(out)) = (&args.spine, &args.out) {
        return training_set(&runtime, &lake, spine, out, &inputs, args);
    }
    let Some(date) = args.as_of else {
        anyhow::bail!("give --as-of DATE, or --spine FILE --out FILE");
    };
    let date = date.resolve(&config, chrono::Utc::now())?;
    let as_of = AsOf {
        date,
        knowledge_time: resolve(&runtime, &lake, args.knowledge_time)?,
    };
    let report = runtime
        .block_on(write_features(&lake, &as_of, &inputs))
        .with_context(|| format!("computing features as of {date}"))?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "as_of_date": report.as_of_date.to_string(),
                "rows": report.rows,
                "bronze_version": report.bronze_version,
                "knowledge_times": report.knowledge_times.iter().map(|(k, v)| (k.clone(), v.to_rfc3339())).collect::<std::collections::BTreeMap<_, _>>(),
            })
        );
    } else {
        println!(
            "merchant_features as of {}: {} merchants from pos_events version {}",
            report.as_of_date,
            thousands(report.rows as u64),
            report.bronze_version
        );
        let mut t = table(&["operator", "knowledge time (events ingested by)"]);
        for (operator, time) in &report.knowledge_times {
            t.add_row(vec![operator.clone(), time.to_rfc3339()]);
        }
        println!("{t}");
    }
    Ok(())
}

fn training_set(
    runtime: &tokio::runtime::Runtime,
    lake: &Lake,
    spine_path: &Path,
    out: &Path,
    inputs: &FeatureInputs,
    args: &FeaturesArgs,
) -> anyhow::Result<()> {
    let mut spine = load_spine(spine_path).map_err(anyhow::Error::msg)?;
    if let Some(knowledge_time) = resolve(runtime, lake, args.knowledge_time)? {
        // A global knowledge time fills the rows that do not name their own.
        for row in spine.iter_mut().filter(|r| r.knowledge_time.is_none()) {
            row.knowledge_time = Some(knowledge_time);
        }
    }
    let started = Instant::now();
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{spinner} as-of dates {pos}/{len} [{bar:30}] {elapsed} (ETA {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if args.json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let report = runtime
        .block_on(write_training_set(
            lake,
            &spine,
            inputs,
            out,
            |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        ))
        .with_context(|| format!("building the training set for {}", spine_path.display()))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "rows": report.rows,
                "rows_without_history": report.rows_without_history,
                "as_of_groups": report.as_of_groups,
                "out": out.display().to_string(),
                "seconds": seconds,
            })
        );
    } else {
        println!(
            "training set: {} rows ({} as-of dates, {} without history) in {seconds:.1} s → {}",
            thousands(report.rows as u64),
            thousands(report.as_of_groups as u64),
            thousands(report.rows_without_history as u64),
            out.display()
        );
    }
    Ok(())
}

/// `--knowledge-time`: an instant, or the latest settled knowledge.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KnowledgeArg {
    At(DateTime<Utc>),
    Latest,
}

fn parse_knowledge_time(text: &str) -> Result<KnowledgeArg, String> {
    if text == "latest" {
        return Ok(KnowledgeArg::Latest);
    }
    DateTime::<FixedOffset>::parse_from_rfc3339(text)
        .map(|t| KnowledgeArg::At(t.with_timezone(&Utc)))
        .map_err(|e| format!("{e}: give an RFC 3339 instant or `latest`"))
}

/// The instant of `--knowledge-time` (`latest`: the history's horizon).
fn resolve(
    runtime: &tokio::runtime::Runtime,
    lake: &Lake,
    arg: Option<KnowledgeArg>,
) -> anyhow::Result<Option<DateTime<Utc>>> {
    match arg {
        None => Ok(None),
        Some(KnowledgeArg::At(at)) => Ok(Some(at)),
        Some(KnowledgeArg::Latest) => {
            let horizon = runtime.block_on(lake.app_version(
                streetflow_core::tables::MERCHANT_DAILY_HISTORY.name,
                streetflow_features::HORIZON_APP_ID,
            ))?;
            let horizon = horizon
                .and_then(DateTime::from_timestamp_micros)
                .context("merchant_daily_history has not been built: run `streetflow aggregate`")?;
            Ok(Some(horizon))
        }
    }
}
