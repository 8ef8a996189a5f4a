//! `streetflow serve`: credit decisions over HTTP (the routes, the service and their
//! limits are `streetflow_serve`'s; this reads the options, the tokens and the pipeline
//! file, and runs the server until SIGINT or SIGTERM).
//!
//! Every `/v1` route needs `Authorization: Bearer <token>`, one of the tokens of
//! `STREETFLOW_SERVE_TOKENS` (comma-separated) or `--tokens-file` (one a line); without
//! any, the server starts only with `--no-auth` on a loopback address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{NaiveDate, Utc};
use clap::Args;
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::json;
use streetflow_credit::Policy;
use streetflow_features::LOOKBACK_DAYS;
use streetflow_lake::Lake;
use streetflow_serve::{Access, Limits, Service, router};

use crate::runtime::runtime;
use crate::settings::load_pipeline;

/// Options of `streetflow serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Lake root.
    #[arg(long, default_value = "./lake")]
    lake: String,
    /// Address to listen on (port 0: any free port; the bound address is logged).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Directory of policy files (every *.toml is a product, by its product id).
    #[arg(long, default_value = "pipelines/policies")]
    policies: PathBuf,
    /// Merchant registry (CSV or JSON Lines) for MCC, opening date and rent.
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Pipeline file (operators' calendars, lake storage options).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check this often (seconds) for new versions of the stored decisions and features
    /// (re-reading the latest decisions when there are) and of the daily history
    /// (bringing the evaluation path's cache up to date).
    #[arg(long, default_value_t = 5)]
    refresh_seconds: u64,
    /// Days of daily history (by business date, before today) kept in memory for
    /// evaluations; 0 reads the lake for every evaluation. The default covers the lookback
    /// window of a decision as of any day of the last three months.
    #[arg(long, default_value_t = LOOKBACK_DAYS + 92)]
    cache_days: u64,
    /// File of bearer tokens the `/v1` routes accept: each line, trimmed, is one token
    /// (lines starting with `#` are comments); added
    /// to those of `STREETFLOW_SERVE_TOKENS` (comma-separated).
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Serve `/v1` without credentials: only on a loopback address, for a laptop.
    #[arg(long)]
    no_auth: bool,
    /// Answer 503 to a request not answered within this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Evaluations that run at once; more wait (within the request time limit).
    #[arg(long, default_value_t = 64)]
    max_evaluations: usize,
}

/// The access of `args`: tokens from the environment and the tokens file, or
/// `--no-auth` on a loopback address.
fn access_of(args: &ServeArgs) -> anyhow::Result<Access> {
    let from_env = std::env::var("STREETFLOW_SERVE_TOKENS").unwrap_or_default();
    let from_file = match &args.tokens_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the tokens file {}", path.display()))?,
        None => String::new(),
    };
    let tokens = from_env.split(',').chain(
        from_file
            .lines()
            .filter(|line| !line.trim_start().starts_with('#')),
    );
    Ok(Access::configured(tokens, args.no_auth, args.addr)?)
}

/// Builds the service of `args` (policies, registry, calendars, lake).
async fn service_of(args: &ServeArgs) -> anyhow::Result<Service> {
    let config = load_pipeline(args.config.as_deref(), json!({}))?;
    let inputs = crate::settings::feature_inputs(&config, args.registry.as_deref())?;
    let lake = Lake::new(&args.lake, &config.lake.storage)?;
    let policies = Policy::load_dir(&args.policies).await?;
    // A cache shorter than one lookback would serve no as-of date at all.
    anyhow::ensure!(
        args.cache_days == 0 || args.cache_days >= LOOKBACK_DAYS,
        "--cache-days {} holds no whole lookback of {LOOKBACK_DAYS} days: give at least \
         {LOOKBACK_DAYS}, or 0 to read the lake for every evaluation",
        args.cache_days
    );
    let cache_since = match args.cache_days {
        0 => None,
        days => Some(
            Utc::now()
                .date_naive()
                .checked_sub_days(chrono::Days::new(days))
                .filter(|since| *since >= NaiveDate::default())
                .with_context(|| format!("--cache-days {days} reaches back before 1970"))?,
        ),
    };
    Service::open(
        lake,
        policies,
        inputs,
        Duration::from_secs(args.refresh_seconds),
        cache_since,
    )
    .await
    .context("opening the decision service")
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
}

pub(crate) fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let access = access_of(args)?;
    let limits = Limits {
        request_timeout: Duration::from_millis(args.request_timeout_ms.max(1)),
        max_evaluations: args.max_evaluations.max(1),
    };
    let runtime = runtime()?;
    runtime.block_on(async {
        let service = Arc::new(service_of(args).await?);
        let metrics = PrometheusBuilder::new()
            .install_recorder()
            .context("installing the metrics recorder")?;
        metrics::describe_counter!(
            "streetflow_http_requests_total",
            "HTTP requests answered, by route and status"
        );
        metrics::describe_histogram!(
            "streetflow_http_request_seconds",
            "HTTP request latency by route, seconds"
        );
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        let bound = listener.local_addr().context("the bound address")?;
        tokio::spawn(service.clone().keep_fresh());
        tracing::info!(
            products = ?service.products().collect::<Vec<_>>(),
            "serving decisions: listening on http://{bound}"
        );
        axum::serve(listener, router(service, Some(metrics), access, limits))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving HTTP")?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}
