//! Shared helpers for what commands print and where they write.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

/// A table in the house style.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_style(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    table
}

/// Opens `path` for buffered writing; `-` is standard output.
pub(crate) fn create(path: &Path) -> anyhow::Result<Box<dyn Write>> {
    if path == Path::new("-") {
        return Ok(Box::new(BufWriter::with_capacity(
            1 << 20,
            io::stdout().lock(),
        )));
    }
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(Box::new(BufWriter::with_capacity(1 << 20, file)))
}

pub(crate) use streetflow_core::money::{grouped_yuan as yuan, thousands};

/// Prints a decision run's counts, limits and top reasons as tables.
pub(crate) fn print_decision_summary(
    policy: &streetflow_credit::Policy,
    summary: &streetflow_credit::DecisionSummary,
) {
    println!(
        "credit_decisions: {} {} as of {} — {} merchants (merchant_features version {})",
        summary.product,
        summary.policy_version,
        summary.as_of_date,
        thousands(summary.merchants as u64),
        summary.feature_table_version
    );
    let mut t = table(&["decision", "merchants", "total limit (yuan)"]);
    for outcome in [
        streetflow_credit::Outcome::Approve,
        streetflow_credit::Outcome::Refer,
        streetflow_credit::Outcome::Decline,
    ] {
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
