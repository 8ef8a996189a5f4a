//! The `streetflow` command line.

mod bench;
mod generate;
mod output;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// streetflow: POS turnover from district operators into exactly-once Delta tables,
/// cash-flow features and credit decisions.
#[derive(Debug, Parser)]
#[command(name = "streetflow", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a synthetic district: events (JSON Lines), registry and ground truth.
    Gen(generate::GenArgs),
    /// Decode and validate a JSON Lines file; count accepted and rejected lines by reason.
    Validate(validate::ValidateArgs),
    /// Measure throughput (see each benchmark's help).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Gen(args) => generate::run(&args),
        Command::Validate(args) => validate::run(&args),
        Command::Bench(command) => bench::run(&command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
