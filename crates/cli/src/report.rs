//! `streetflow report`: a credit officer's page per merchant (`streetflow_report`).

use std::path::PathBuf;

use chrono::NaiveDate;
use clap::Args;
use streetflow_report::write_report;

use crate::runtime::runtime;

/// Options of `streetflow report`.
#[derive(Debug, Args)]
pub(crate) struct ReportArgs {
    /// Lake root.
    #[arg(long, default_value = "./lake")]
    lake: String,
    /// Pipeline file whose `[lake.storage]` options (endpoint, region, …) open an
    /// object-store lake.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Date of the decisions to explain (they must exist: run `streetflow decide` first).
    #[arg(long)]
    as_of: NaiveDate,
    /// Merchants to show (`merchant_id` or `operator_id/merchant_id`); repeatable.
    #[arg(long, conflicts_with = "top")]
    merchant: Vec<String>,
    /// Without --merchant: per product, the N approvals with the largest limits and the
    /// first N referrals and declines.
    #[arg(long, default_value_t = 3)]
    top: usize,
    /// Policy files, for the meaning of each reason code and the features behind it
    /// (default: the shipped policies).
    #[arg(long)]
    policies: Option<PathBuf>,
    /// HTML file to write.
    #[arg(long, default_value = "report.html")]
    out: PathBuf,
}

pub(crate) fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let lake = crate::settings::open_lake(&args.lake, args.config.as_deref())?;
    let policies = match &args.policies {
        Some(dir) => runtime.block_on(streetflow_credit::Policy::load_dir(dir))?,
        None => runtime
            .block_on(streetflow_credit::Policy::shipped())?
            .into_iter()
            .map(|p| (p.product.id.clone(), p))
            .collect(),
    };
    let summary = runtime.block_on(write_report(
        &lake,
        args.as_of,
        &args.merchant,
        args.top,
        &policies,
        &args.out,
    ))?;
    println!(
        "wrote {} ({} merchants)",
        args.out.display(),
        summary.merchants.len()
    );
    Ok(())
}
