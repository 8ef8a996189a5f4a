//! `streetflow bench decide`: the latency of one-merchant decisions over HTTP and the time
//! of a batch `decide` over every merchant, on a generated district lake.
//!
//! The lake is the one `streetflow bench features` generates (same settings, same
//! `--workdir`, reused when present). Features as of the bench date are written first if
//! the lake has none. Then: a batch decision of every merchant (`credit_decisions`), and
//! `--requests` sequential `POST /v1/decisions:evaluate` and `GET …/decision` requests
//! to a `streetflow serve` router started in this process on a free local port, each
//! timed from the first byte sent to the last byte read.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use streetflow_core::OperatorCalendars;
use streetflow_credit::{Policy, decide};
use streetflow_features::{AsOf, FeatureInputs, LOOKBACK_DAYS, write_features};

use crate::console::{runtime, table, thousands};
use crate::features::{AS_OF, district_args, prepare_lake, registry};
use streetflow_serve::{Access, Limits, Service, router};

/// Options of `streetflow bench decide`.
#[derive(Debug, Args)]
pub struct BenchDecideArgs {
    /// Merchants, dealt to four operators.
    #[arg(long, default_value_t = 10_000)]
    merchants: u32,
    /// Days of history before the as-of date.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Mean sales per merchant and open day.
    #[arg(long, default_value_t = 5)]
    sales_per_day: u32,
    /// Directory of the generated lake (shared with `bench features`; kept).
    #[arg(long)]
    workdir: PathBuf,
    /// Single-merchant requests to time (after 5 warm-up requests).
    #[arg(long, default_value_t = 1_000)]
    requests: usize,
    /// The product's policy file.
    #[arg(long, default_value = "pipelines/policies/district-turnover-loan.toml")]
    policy: PathBuf,
    /// Then this many clients evaluate at once, each request after the last, for
    /// `--load-seconds` (0: no load test).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds of the concurrent load.
    #[arg(long, default_value_t = 10)]
    load_seconds: u64,
}

/// The bearer token the bench's server accepts (its requests pass authentication).
const BENCH_TOKEN: &str = "bench-token";

/// Sends one HTTP/1.1 request (connection closed after it) and returns status and body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).context("connecting to the server")?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {BENCH_TOKEN}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .context("no HTTP status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or_else(String::new, |(_, b)| b.to_owned());
    Ok((status, body))
}

/// The q-quantile of sorted durations, in milliseconds.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

pub(crate) fn bench_decide(args: &BenchDecideArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; measure with `cargo run --release -- bench …`");
    }
    let runtime = runtime()?;
    let district = district_args(
        args.merchants,
        args.days,
        args.sales_per_day,
        args.workdir.clone(),
    );
    std::fs::create_dir_all(&args.workdir)?;
    let (lake, merchants) = prepare_lake(&runtime, &district, &args.workdir)?;
    let inputs = FeatureInputs {
        calendars: OperatorCalendars::default(),
        registry: registry(&merchants),
        ..FeatureInputs::default()
    };
    let stored = runtime
        .block_on(lake.query(&format!(
            "SELECT count(*) FROM merchant_features WHERE as_of_date = DATE '{AS_OF}'"
        )))
        .ok()
        .and_then(|batches| {
            batches.first().and_then(|b| {
                streetflow_lake::arrow::util::display::array_value_to_string(b.column(0), 0).ok()
            })
        })
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    if stored == 0 {
        let started = Instant::now();
        let as_of = AsOf {
            date: AS_OF,
            knowledge_time: None,
        };
        let report = runtime.block_on(write_features(&lake, &as_of, &inputs))?;
        println!(
            "wrote features as of {AS_OF}: {} merchants in {:.1} s",
            thousands(report.rows as u64),
            started.elapsed().as_secs_f64()
        );
    }
    let policy = runtime
        .block_on(Policy::load(&args.policy))
        .map_err(anyhow::Error::msg)?;

    let started = Instant::now();
    let (decisions, _) = runtime.block_on(decide(&lake, AS_OF, &policy))?;
    let batch_seconds = started.elapsed().as_secs_f64();
    println!(
        "batch decide ({} {}): {} merchants in {:.3} s",
        policy.product.id,
        policy.product.version,
        thousands(decisions.len() as u64),
        batch_seconds
    );

    let product = policy.product.id.clone();
    // The evaluation path's history cache holds the lookback window of the bench date.
    crate::features::reset_peak_rss();
    let before = crate::features::current_rss().unwrap_or(0);
    let started = Instant::now();
    let service = Arc::new(runtime.block_on(Service::open(
        lake.clone(),
        BTreeMap::from([(product.clone(), policy)]),
        inputs,
        Duration::from_secs(3600),
        Some(AS_OF - chrono::Days::new(LOOKBACK_DAYS)),
    ))?);
    let cached = crate::features::current_rss().unwrap_or(0);
    println!(
        "serve: history cache of {} days read in {:.1} s; resident memory {:.0} MB more ({:.0} MB in all, peak {:.0} MB)",
        LOOKBACK_DAYS,
        started.elapsed().as_secs_f64(),
        cached.saturating_sub(before) as f64 / 1e6,
        cached as f64 / 1e6,
        crate::features::peak_rss().unwrap_or(0) as f64 / 1e6
    );
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let access = Access::tokens([BENCH_TOKEN]).context("the bench token")?;
    runtime.spawn(async move {
        axum::serve(listener, router(service, None, access, Limits::default())).await
    });

    // The bench's events arrived by the start of the as-of date, so that knowledge time
    // sees them all and every request decides on the same data.
    let knowledge_time = OperatorCalendars::default()
        .for_operator("")
        .day_start(AS_OF)
        .to_rfc3339();
    let pick = |i: usize| &merchants[(i * 7_919) % merchants.len()];
    let evaluate_body = |i: usize| {
        let m = pick(i);
        serde_json::json!({
            "operator_id": m.operator,
            "merchant_id": m.id,
            "product": product,
            "as_of_date": AS_OF.to_string(),
            "knowledge_time": knowledge_time,
        })
        .to_string()
    };
    let mut t = table(&[
        "path",
        "requests",
        "errors",
        "p50 ms",
        "p99 ms",
        "max ms",
        "mean ms / rate",
    ]);
    for (name, is_evaluate) in [
        ("POST /v1/decisions:evaluate", true),
        ("GET /v1/merchants/…/decision", false),
    ] {
        let mut latencies = Vec::with_capacity(args.requests);
        let mut errors = 0_usize;
        for i in 0..args.requests + 5 {
            let started = Instant::now();
            let (status, body) = if is_evaluate {
                http(addr, "POST", "/v1/decisions:evaluate", &evaluate_body(i))?
            } else {
                let m = pick(i);
                let path = format!(
                    "/v1/merchants/{}/{}/decision?product={product}",
                    m.operator, m.id
                );
                http(addr, "GET", &path, "")?
            };
            let took = started.elapsed();
            if status != 200 {
                errors += 1;
                if errors <= 3 {
                    eprintln!("{name}: HTTP {status}: {body}");
                }
            }
            if i >= 5 {
                latencies.push(took);
            }
        }
        latencies.sort();
        let mean = latencies.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0
            / latencies.len().max(1) as f64;
        t.add_row(vec![
            name.to_owned(),
            thousands(latencies.len() as u64),
            errors.to_string(),
            format!("{:.2}", quantile_ms(&latencies, 0.50)),
            format!("{:.2}", quantile_ms(&latencies, 0.99)),
            format!("{:.2}", quantile_ms(&latencies, 1.0)),
            format!("{mean:.2}"),
        ]);
    }
    if args.clients > 0 && args.load_seconds > 0 {
        // Concurrent clients, each sending its next request when the last is answered.
        let until = Instant::now() + Duration::from_secs(args.load_seconds);
        let started = Instant::now();
        let results: Vec<anyhow::Result<(Vec<Duration>, usize)>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..args.clients)
                .map(|client| {
                    let evaluate_body = &evaluate_body;
                    scope.spawn(move || {
                        let mut latencies = Vec::new();
                        let mut errors = 0;
                        let mut i = client * 1_000_003;
                        while Instant::now() < until {
                            let sent = Instant::now();
                            let (status, _) =
                                http(addr, "POST", "/v1/decisions:evaluate", &evaluate_body(i))?;
                            latencies.push(sent.elapsed());
                            errors += usize::from(status != 200);
                            i += 1;
                        }
                        Ok((latencies, errors))
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a client panicked")))
                })
                .collect()
        });
        let seconds = started.elapsed().as_secs_f64();
        let mut latencies = Vec::new();
        let mut errors = 0;
        for result in results {
            let (mine, failed) = result?;
            latencies.extend(mine);
            errors += failed;
        }
        latencies.sort();
        t.add_row(vec![
            format!("POST evaluate, {} clients at once", args.clients),
            thousands(latencies.len() as u64),
            errors.to_string(),
            format!("{:.2}", quantile_ms(&latencies, 0.50)),
            format!("{:.2}", quantile_ms(&latencies, 0.99)),
            format!("{:.2}", quantile_ms(&latencies, 1.0)),
            format!("{:.0}/s", latencies.len() as f64 / seconds),
        ]);
    }
    println!(
        "bench decide: {} merchants, {} days, {} sales/day (goals: evaluate p99 ≤ 5 ms, ≥ 1,000/s with 8 clients, batch ≤ 2 s)",
        thousands(u64::from(args.merchants)),
        args.days,
        args.sales_per_day
    );
    println!("{t}");
    println!("batch decide over all merchants: {batch_seconds:.3} s");
    Ok(())
}
