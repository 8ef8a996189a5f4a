//! `streetflow decide`: credit decisions for every merchant as of a date under a policy.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use streetflow_credit::{DecisionSummary, Outcome, Policy, decide};
use streetflow_lake::Lake;

use crate::ingest::runtime;
use crate::output::{table, thousands};
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

/// The shipped credit products, embedded so the demo and reports work from any directory.
const SHIPPED_POLICIES: [(&str, &str); 2] = [
    (
        "district-turnover-loan.toml",
        include_str!("../../../pipelines/policies/district-turnover-loan.toml"),
    ),
    (
        "daily-takings-line.toml",
        include_str!("../../../pipelines/policies/daily-takings-line.toml"),
    ),
];

/// The shipped policies, parsed and checked.
pub(crate) async fn shipped_policies() -> anyhow::Result<Vec<Policy>> {
    let mut policies = Vec::with_capacity(SHIPPED_POLICIES.len());
    for (file, text) in SHIPPED_POLICIES {
        policies.push(
            Policy::parse(text, file)
                .await
                .map_err(anyhow::Error::msg)?,
        );
    }
    Ok(policies)
}

/// Yuan with thousands separators, from fen (limits are whole yuan).
pub(crate) fn yuan(fen: i64) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    format!("{sign}{}", thousands(fen.unsigned_abs() / 100))
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
    print_summary(&policy, &summary);
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

/// Prints a decision run's counts, limits and top reasons as tables.
pub(crate) fn print_summary(policy: &Policy, summary: &DecisionSummary) {
    println!(
        "credit_decisions: {} {} as of {} — {} merchants (merchant_features version {})",
        summary.product,
        summary.policy_version,
        summary.as_of_date,
        thousands(summary.merchants as u64),
        summary.feature_table_version
    );
    let mut t = table(&["decision", "merchants", "total limit (yuan)"]);
    for outcome in [Outcome::Approve, Outcome::Refer, Outcome::Decline] {
        let count = summary.by_decision.get(&outcome).copied().unwrap_or(0);
        let limit = summary
            .limit_fen_by_decision
            .get(&outcome)
            .copied()
            .unwrap_or(0);
        t.add_row(vec![
            outcome.as_str().to_owned(),
            thousands(count as u64),
            yuan(limit),
        ]);
    }
    println!("{t}");
    if !summary.top_reasons.is_empty() {
        let explanations: std::collections::BTreeMap<&str, &str> =
            policy.reason_codes().into_iter().collect();
        let mut t = table(&["reason", "merchants", "meaning"]);
        for (code, n) in summary.top_reasons.iter().take(12) {
            t.add_row(vec![
                code.clone(),
                thousands(*n as u64),
                explanations
                    .get(code.as_str())
                    .copied()
                    .unwrap_or("")
                    .to_owned(),
            ]);
        }
        println!("{t}");
    }
    println!(
        "subsidy-eligible (approved or referred in a subsidy sector): {}; policy sha256 {}",
        thousands(summary.subsidy_eligible as u64),
        summary.policy_hash
    );
}
