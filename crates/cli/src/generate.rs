//! `streetflow gen`: write a synthetic district.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use chrono::NaiveDate;
use clap::Args;
use streetflow_core::BusinessCalendar;
use streetflow_synth::{
    GenConfig, GenSummary, generate, write_profiles_csv, write_registry_csv, write_truth_csv,
};

use crate::output::{create, table, thousands};

/// Options of `streetflow gen`.
#[derive(Debug, Args)]
pub(crate) struct GenArgs {
    /// Seed of every random choice; the same options give the same bytes.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Merchants across all operators.
    #[arg(long, default_value_t = 120)]
    merchants: u32,
    /// Calendar days of turnover.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// First day (YYYY-MM-DD, local to the time zone).
    #[arg(long, default_value = "2025-01-01")]
    start: NaiveDate,
    /// District operators; merchants are dealt to them in turn.
    #[arg(long, default_value_t = 1)]
    operators: u32,
    /// Scales every merchant's typical daily sales (0.03: a sparse feed of a few a day).
    #[arg(long, default_value_t = 1.0)]
    activity: f64,
    /// Events file (JSON Lines, arrival order); `-` for standard output.
    #[arg(long, default_value = "events.jsonl")]
    out: PathBuf,
    /// Also write the merchant registry (CSV).
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Also write exact expected daily figures per merchant (CSV).
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Also write each merchant's hidden archetype (CSV).
    #[arg(long)]
    profiles: Option<PathBuf>,
    /// Probability that an event is delivered twice (retry or replay).
    #[arg(long, default_value_t = 0.0)]
    duplicate_rate: f64,
    /// Probability that an event arrives 1–10 days after it occurred.
    #[arg(long, default_value_t = 0.0)]
    late_rate: f64,
    /// Probability that an event is followed by a malformed message (every reason code).
    #[arg(long, default_value_t = 0.0)]
    malformed_rate: f64,
    /// Operators' IANA time zone.
    #[arg(long, default_value = "Asia/Shanghai")]
    time_zone: String,
    /// Local time at which a business day starts (HH:MM).
    #[arg(long, default_value = "00:00")]
    day_cutoff: String,
    /// Print the summary as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl GenArgs {
    pub(crate) fn config(&self) -> anyhow::Result<GenConfig> {
        Ok(GenConfig {
            seed: self.seed,
            merchants: self.merchants,
            days: self.days,
            start: self.start,
            operators: self.operators,
            duplicate_rate: self.duplicate_rate,
            late_rate: self.late_rate,
            malformed_rate: self.malformed_rate,
            calendar: BusinessCalendar::parse(&self.time_zone, &self.day_cutoff)?,
            activity: self.activity,
        })
    }
}

pub(crate) fn run(args: &GenArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let started = Instant::now();
    let generated = generate(&config, create(&args.out)?)
        .with_context(|| format!("generating into {}", args.out.display()))?;
    let elapsed = started.elapsed();
    if let Some(path) = &args.registry {
        write_registry_csv(&generated.registry, create(path)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.truth {
        write_truth_csv(&generated.truth, create(path)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.profiles {
        write_profiles_csv(&generated.profiles, create(path)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let summary = &generated.summary;
    if args.json {
        println!("{}", summary_json(summary, elapsed.as_secs_f64()));
    } else if args.out.as_os_str() != "-" {
        print_summary(args, summary, elapsed.as_secs_f64());
    }
    Ok(())
}

pub(crate) fn summary_json(summary: &GenSummary, seconds: f64) -> serde_json::Value {
    let malformed: serde_json::Map<String, serde_json::Value> = summary
        .malformed
        .iter()
        .map(|(reason, n)| (reason.as_str().to_owned(), (*n).into()))
        .collect();
    serde_json::json!({
        "lines": summary.lines,
        "bytes": summary.bytes,
        "unique_events": summary.unique_events,
        "sales": summary.sales,
        "refunds": summary.refunds,
        "voids": summary.voids,
        "orphan_refunds": summary.orphan_refunds,
        "orphan_voids": summary.orphan_voids,
        "duplicates": summary.duplicates,
        "late": summary.late,
        "malformed": summary.malformed_total(),
        "malformed_by_reason": malformed,
        "seconds": seconds,
    })
}

fn print_summary(args: &GenArgs, s: &GenSummary, seconds: f64) {
    let mut t = table(&["generated", "count"]);
    for (label, n) in [
        ("lines written", s.lines),
        ("distinct valid events", s.unique_events),
        ("  sales", s.sales),
        ("  refunds (orphans)", s.refunds),
        ("  voids (orphans)", s.voids),
        ("duplicate deliveries", s.duplicates),
        ("late events (1–10 days)", s.late),
        ("malformed messages", s.malformed_total()),
    ] {
        let shown = match label {
            "  refunds (orphans)" => format!("{} ({})", thousands(n), thousands(s.orphan_refunds)),
            "  voids (orphans)" => format!("{} ({})", thousands(n), thousands(s.orphan_voids)),
            _ => thousands(n),
        };
        t.add_row(vec![label.to_owned(), shown]);
    }
    println!("{t}");
    if !s.malformed.is_empty() {
        let mut by_reason = table(&["injected reason", "count"]);
        for (reason, n) in &s.malformed {
            by_reason.add_row(vec![reason.as_str().to_owned(), thousands(*n)]);
        }
        println!("{by_reason}");
    }
    println!(
        "wrote {} ({:.1} MB) in {:.2} s, {:.0} lines/s",
        args.out.display(),
        s.bytes as f64 / 1e6,
        seconds,
        s.lines as f64 / seconds.max(1e-9)
    );
    for (what, path) in [
        ("registry", &args.registry),
        ("truth", &args.truth),
        ("profiles", &args.profiles),
    ] {
        if let Some(path) = path {
            println!("wrote {what} to {}", path.display());
        }
    }
}
