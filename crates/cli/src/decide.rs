//! `streetflow decide`: credit decisions for every merchant as of a date under a policy.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use streetflow_credit::{DecisionSummary, Outcome, Policy, decide};
use streetflow_lake::Lake;

use crate::output::print_decision_summary;
use crate::runtime::runtime;
use crate::settings::{AsOfArg, load_pipeline};

/// Options of `streetflow decide`.
#[derive(Debug, Args)]
pub(crate) struct DecideArgs {
    /// Lake root.
    #[arg(long, default_value = "./lake")]
    lake: String,
    /// Decide on the features as of this date (run `streetflow features` first), or
    /// `today` / `yesterday` in the pipeline's business calendar.
    #[arg(long)]
    as_of: AsOfArg,
    /// Policy file (pipelines/policies/*.toml).
    #[arg(long)]
    policy: PathBuf,
    /// Check the policy and print it, without deciding.
    #[arg(long)]
    check: bool,
    /// Pipeline file (for the lake's storage options).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &DecideArgs) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let policy = runtime
        .block_on(Policy::load(&args.policy))
        .map_err(anyhow::Error::msg)?;
    if args.check {
        println!(
            "{} {} ({}), sha256 {}: {} eligibility rules, {} refer rules, {} caps — OK",
            policy.product.id,
            policy.product.version,
            policy.product.name,
            policy.content_hash,
            policy.eligibility.len(),
            policy.refer.len(),
            policy.limit.caps.len()
        );
        return Ok(());
    }
    let config = load_pipeline(args.config.as_deref(), serde_json::json!({}))?;
    let as_of = args.as_of.resolve(&config, chrono::Utc::now())?;
    let lake = Lake::new(&args.lake, &config.lake.storage)?;
    let (_, summary) = runtime
        .block_on(decide(&lake, as_of, &policy))
        .with_context(|| format!("deciding {} as of {as_of}", policy.product.id))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary_json(&summary))?);
        return Ok(());
    }
    print_decision_summary(&policy, &summary);
    Ok(())
}

fn summary_json(summary: &DecisionSummary) -> serde_json::Value {
    let by = |outcome: Outcome| summary.by_decision.get(&outcome).copied().unwrap_or(0);
    let limit = |outcome: Outcome| {
        summary
            .limit_fen_by_decision
            .get(&outcome)
            .copied()
            .unwrap_or(0)
    };
    serde_json::json!({
        "product": summary.product,
        "policy_version": summary.policy_version,
        "policy_hash": summary.policy_hash,
        "as_of_date": summary.as_of_date.to_string(),
        "feature_table_version": summary.feature_table_version,
        "merchants": summary.merchants,
        "decisions": {
            "approve": by(Outcome::Approve),
            "refer": by(Outcome::Refer),
            "decline": by(Outcome::Decline),
        },
        "limit_fen": {
            "approve": limit(Outcome::Approve),
            "refer": limit(Outcome::Refer),
        },
        "subsidy_eligible": summary.subsidy_eligible,
        "reasons": summary.top_reasons.iter().map(|(code, n)| serde_json::json!({"code": code, "merchants": n})).collect::<Vec<_>>(),
    })
}
