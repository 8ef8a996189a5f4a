//! `streetflow doctor`: checks a pipeline's brokers, topic, lake and tables, and says in
//! plain words what is wrong.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use streetflow_core::PipelineConfig;
use streetflow_core::health::{Checks, Status};
use streetflow_features::check_silver_freshness;
use streetflow_ingest::{TopicEnds, check_broker, check_ingest_progress};
use streetflow_lake::Lake;

use crate::output::table;
use crate::runtime::runtime;
use crate::settings::{load_pipeline, set_override};

/// Options of `streetflow doctor`.
#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Pipeline file to check (flags override it, as for `ingest`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long)]
    brokers: Option<String>,
    /// Topic of pos_transaction/v1 events.
    #[arg(long)]
    topic: Option<String>,
    /// Lake root.
    #[arg(long)]
    lake: Option<String>,
    /// How long to wait for the brokers.
    #[arg(long, default_value_t = 10)]
    timeout_seconds: u64,
    /// Print the checks as JSON.
    #[arg(long)]
    json: bool,
}

/// The lake's checks, then the ingest progress against the topic's ends and the
/// silver freshness.
async fn check_lake(
    config: &PipelineConfig,
    ends: Option<&TopicEnds>,
    checks: &mut Checks,
) -> anyhow::Result<()> {
    let lake = match Lake::new(&config.lake.url, &config.lake.storage) {
        Ok(lake) => lake,
        Err(error) => {
            checks.add(
                "lake",
                Status::Fail,
                format!("{}: {error}", config.lake.url),
            );
            return Ok(());
        }
    };
    checks.add("lake", Status::Ok, lake.root().to_string());
    let Some(bronze_version) = lake.check_tables(checks).await else {
        return Ok(());
    };
    if let Some(ends) = ends {
        check_ingest_progress(config, &lake, ends, checks).await?;
    }
    check_silver_freshness(&lake, bronze_version, checks).await?;
    Ok(())
}

pub(crate) fn run(args: &DoctorArgs) -> anyhow::Result<()> {
    let mut overrides = json!({});
    for (path, value) in [
        ("kafka.brokers", args.brokers.clone()),
        ("kafka.topic", args.topic.clone()),
        ("lake.url", args.lake.clone()),
    ] {
        set_override(&mut overrides, path, value.map(Into::into));
    }
    let mut checks = Checks::default();
    let config = match load_pipeline(args.config.as_deref(), overrides) {
        Ok(config) => {
            checks.add(
                "pipeline",
                Status::Ok,
                format!(
                    "{} (pipeline {}, topic {}, lake {})",
                    args.config.as_ref().map_or_else(
                        || "built-in defaults".to_owned(),
                        |p| p.display().to_string()
                    ),
                    config.pipeline.name,
                    config.kafka.topic,
                    config.lake.url
                ),
            );
            Some(config)
        }
        Err(error) => {
            checks.add("pipeline", Status::Fail, format!("{error:#}"));
            None
        }
    };
    if let Some(config) = &config {
        let ends = check_broker(
            config,
            Duration::from_secs(args.timeout_seconds),
            &mut checks,
        );
        runtime()?.block_on(check_lake(config, ends.as_ref(), &mut checks))?;
    }

    let problems = checks.problems();
    if args.json {
        println!(
            "{}",
            json!({
                "problems": problems,
                "checks": checks.0.iter().map(|c| json!({
                    "check": c.name, "status": c.status.as_str(), "detail": c.detail,
                })).collect::<Vec<_>>(),
            })
        );
    } else {
        let mut t = table(&["check", "status", "detail"]);
        for c in &checks.0 {
            t.add_row(vec![
                c.name.clone(),
                c.status.as_str().to_owned(),
                c.detail.clone(),
            ]);
        }
        println!("{t}");
    }
    anyhow::ensure!(problems == 0, "{problems} problem(s) found");
    Ok(())
}
