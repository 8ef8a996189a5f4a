//! `streetflow compact` and `streetflow vacuum`: batch maintenance of the lake's tables.

use std::num::NonZeroU64;

use clap::Args;
use streetflow_core::tables::{
    CREDIT_DECISIONS, DEAD_LETTERS, MERCHANT_DAILY, MERCHANT_DAILY_HISTORY, MERCHANT_FEATURES,
    POS_EVENTS,
};

use crate::output::{table, thousands};
use crate::runtime::runtime;
use crate::settings::open_lake;

fn all_tables() -> Vec<String> {
    [
        POS_EVENTS.name,
        DEAD_LETTERS.name,
        MERCHANT_DAILY.name,
        MERCHANT_DAILY_HISTORY.name,
        MERCHANT_FEATURES.name,
        CREDIT_DECISIONS.name,
    ]
    .map(str::to_owned)
    .to_vec()
}

fn check_tables(tables: &[String]) -> anyhow::Result<Vec<String>> {
    if tables.is_empty() {
        return Ok(all_tables());
    }
    let known = all_tables();
    for name in tables {
        anyhow::ensure!(
            known.contains(name),
            "no table {name:?}; the lake's tables are {}",
            known.join(", ")
        );
    }
    Ok(tables.to_vec())
}

/// Options of `streetflow compact`.
#[derive(Debug, Args)]
pub(crate) struct CompactArgs {
    /// Lake root.
    #[arg(long, default_value = "./lake")]
    lake: String,
    /// Pipeline file whose `[lake.storage]` options (endpoint, region, …) open an
    /// object-store lake.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Tables to compact (repeatable; default: all of them).
    #[arg(long = "table")]
    tables: Vec<String>,
    /// Cluster rows by these columns (Z-order) while rewriting, e.g. merchant_id.
    #[arg(long, value_delimiter = ',')]
    zorder_by: Vec<String>,
    /// Target file size in MB (default: Delta's, 100 MB).
    #[arg(long)]
    target_size_mb: Option<NonZeroU64>,
}

pub(crate) fn run_compact(args: &CompactArgs) -> anyhow::Result<()> {
    let tables = check_tables(&args.tables)?;
    let runtime = runtime()?;
    let lake = open_lake(&args.lake, args.config.as_deref())?;
    let target = args
        .target_size_mb
        .and_then(|mb| NonZeroU64::new(mb.get().saturating_mul(1 << 20)));
    let mut t = table(&[
        "table",
        "files before",
        "files after",
        "written",
        "replaced",
        "partitions",
        "version",
    ]);
    for name in &tables {
        let started = std::time::Instant::now();
        let Some(report) = runtime.block_on(lake.compact(name, &args.zorder_by, target))? else {
            continue;
        };
        tracing::info!(
            table = %name,
            seconds = started.elapsed().as_secs_f64(),
            "compacted"
        );
        t.add_row(vec![
            report.table,
            thousands(report.files_before as u64),
            thousands(report.files_after as u64),
            thousands(report.files_added),
            thousands(report.files_removed),
            thousands(report.partitions_optimized),
            report.version.to_string(),
        ]);
    }
    println!("{t}");
    println!(
        "Replaced files stay on disk for readers of older versions until `streetflow vacuum` deletes them."
    );
    Ok(())
}

/// Options of `streetflow vacuum`.
#[derive(Debug, Args)]
pub(crate) struct VacuumArgs {
    /// Lake root.
    #[arg(long, default_value = "./lake")]
    lake: String,
    /// Pipeline file whose `[lake.storage]` options (endpoint, region, …) open an
    /// object-store lake.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Tables to vacuum (repeatable; default: all of them).
    #[arg(long = "table")]
    tables: Vec<String>,
    /// Keep files that a version of the last N hours still references (queries running
    /// longer than that on an older version may fail).
    #[arg(long, default_value_t = 168)]
    retain_hours: u64,
    /// List what would be deleted without deleting it.
    #[arg(long)]
    dry_run: bool,
}

pub(crate) fn run_vacuum(args: &VacuumArgs) -> anyhow::Result<()> {
    let tables = check_tables(&args.tables)?;
    let runtime = runtime()?;
    let lake = open_lake(&args.lake, args.config.as_deref())?;
    let deleted_header = if args.dry_run {
        "files to delete"
    } else {
        "files deleted"
    };
    let mut t = table(&["table", deleted_header, "live files"]);
    for name in &tables {
        let Some(report) = runtime.block_on(lake.vacuum(name, args.retain_hours, args.dry_run))?
        else {
            continue;
        };
        t.add_row(vec![
            report.table,
            thousands(report.files_deleted as u64),
            thousands(report.live_files as u64),
        ]);
    }
    println!("{t}");
    Ok(())
}
