//! `streetflow bench …`: throughput measurements, run on a release build.

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use streetflow_synth::{GenConfig, generate};

use crate::output::{create, table, thousands};

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Synthetic generation written to a file: events per second and bytes per event.
    Gen(BenchGenArgs),
}

/// Options of `streetflow bench gen`.
#[derive(Debug, Args)]
pub(crate) struct BenchGenArgs {
    /// Merchants to generate (300 × 365 days ≈ 9 M events, 2.3 GB).
    #[arg(long, default_value_t = 300)]
    merchants: u32,
    /// Days to generate.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Runs; the table shows each and the best.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// File to write (deleted afterwards); default: a file in the temp directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fault rates applied to every run (duplicates, late, malformed), as in `gen`.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
}

pub(crate) fn run(command: &BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Gen(args) => bench_gen(args),
    }
}

fn bench_gen(args: &BenchGenArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; measure with `cargo run --release -- bench …`");
    }
    let path = args.out.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("streetflow-bench-{}.jsonl", std::process::id()))
    });
    let config = GenConfig {
        merchants: args.merchants,
        days: args.days,
        duplicate_rate: args.fault_rate,
        late_rate: args.fault_rate,
        malformed_rate: args.fault_rate,
        ..GenConfig::default()
    };
    let mut t = table(&[
        "run",
        "lines",
        "MB",
        "seconds",
        "lines/s",
        "MB/s",
        "bytes/line",
    ]);
    let mut best = f64::MAX;
    let mut best_rate = 0.0;
    let mut bytes_per_million = 0.0;
    for run in 1..=args.repeat.max(1) {
        let started = Instant::now();
        let generated = generate(&config, create(&path)?)
            .with_context(|| format!("writing {}", path.display()))?;
        let seconds = started.elapsed().as_secs_f64();
        let s = &generated.summary;
        let rate = s.lines as f64 / seconds;
        if seconds < best {
            best = seconds;
            best_rate = rate;
        }
        bytes_per_million = s.bytes as f64 / s.lines as f64 * 1e6;
        t.add_row(vec![
            run.to_string(),
            thousands(s.lines),
            format!("{:.1}", s.bytes as f64 / 1e6),
            format!("{seconds:.2}"),
            thousands(rate as u64),
            format!("{:.0}", s.bytes as f64 / 1e6 / seconds),
            format!("{:.1}", s.bytes as f64 / s.lines as f64),
        ]);
    }
    let _ = fs::remove_file(&path);
    println!(
        "bench gen: {} merchants × {} days, single thread, written to {}",
        args.merchants,
        args.days,
        path.display()
    );
    println!("{t}");
    println!(
        "best: {} events/s; {:.0} MB per million events (goal: ≥ 1,000,000 events/s)",
        thousands(best_rate as u64),
        bytes_per_million / 1e6
    );
    Ok(())
}
