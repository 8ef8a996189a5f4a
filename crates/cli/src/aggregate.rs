//! `streetflow aggregate`: bring the daily cash-flow table up to date with bronze.

use anyhow::Context;
use clap::Args;
use streetflow_features::{SilverMode, refresh_silver};
use streetflow_lake::Lake;

use crate::output::thousands;
use crate::runtime::runtime;
use crate::settings::load_pipeline;

/// Options of `streetflow aggregate`.
#[derive(Debug, Args)]
pub(crate) struct AggregateArgs {
    /// Lake root.
    #[arg(long, default_value = "./lake")]
    lake: String,
    /// Recompute every day from all of bronze instead of only the days new events touch.
    #[arg(long)]
    full: bool,
    /// Pipeline file: the operators' business calendars, the knowledge settle time and
    /// the lake's storage options.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &AggregateArgs) -> anyhow::Result<()> {
    let config = load_pipeline(args.config.as_deref(), serde_json::json!({}))?;
    let runtime = runtime()?;
    let lake = Lake::new(&args.lake, &config.lake.storage)?;
    let mode = if args.full {
        SilverMode::Full
    } else {
        SilverMode::Incremental
    };
    let report = runtime
        .block_on(refresh_silver(
            &lake,
            mode,
            &streetflow_features::SilverSettings::of(&config)?,
        ))
        .context("refreshing merchant_daily")?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "previous_bronze_version": report.previous_bronze_version,
                "bronze_version": report.bronze_version,
                "new_bronze_files": report.new_bronze_files,
                "days_rewritten": report.days_rewritten,
                "rows_written": report.rows_written,
                "fenced": report.fenced,
                "history": {
                    "previous_horizon": report.history.previous_horizon,
                    "horizon": report.history.horizon,
                    "days_computed": report.history.days_computed,
                    "versions_written": report.history.versions_written,
                    "rebuilt": report.history.rebuilt,
                    "fenced": report.history.fenced,
                },
            })
        );
        return Ok(());
    }
    match (report.bronze_version, report.previous_bronze_version) {
        (None, _) => println!("no pos_events table yet: nothing to aggregate"),
        (Some(now), Some(before)) if now == before && report.rows_written == 0 => {
            println!("merchant_daily already reflects pos_events version {now}")
        }
        (Some(now), _) => println!(
            "merchant_daily now reflects pos_events version {now}: {} rows written, {} ({} new bronze files){}",
            thousands(report.rows_written as u64),
            report.days_rewritten.map_or_else(
                || "every day rewritten".to_owned(),
                |n| format!("{n} operator-days rewritten")
            ),
            report.new_bronze_files,
            if report.fenced {
                "; another process refreshed it first, nothing written"
            } else {
                ""
            }
        ),
    }
    let history = &report.history;
    if let Some(horizon) = history
        .horizon
        .and_then(chrono::DateTime::from_timestamp_micros)
    {
        println!(
            "merchant_daily_history holds what the lake knew up to {}: {} versions written{}{}",
            horizon.to_rfc3339(),
            thousands(history.versions_written as u64),
            if history.rebuilt {
                " (rebuilt from all of bronze)".to_owned()
            } else {
                format!(" for {} days", thousands(history.days_computed as u64))
            },
            if history.fenced {
                "; another process refreshed it first, nothing written"
            } else {
                ""
            }
        );
    }
    Ok(())
}
