//! `streetflow bench features`: point-in-time features for a city-sized lake, computed by
//! streetflow (DataFusion) and by DuckDB running the same SQL on the same Parquet files.
//!
//! The lake is generated straight into bronze (no JSON, no broker): merchants spread over
//! four operators, a chosen number of sales per merchant-day with payers, refunds, voids,
//! duplicate deliveries and late arrivals. streetflow's time is one call of the production
//! [`compute_features`] over bitemporal silver; DuckDB's is the feature SQL
//! (`daily_as_of.sql`, `payer_sales_as_of.sql`, `feed_days.sql`,
//! `merchant_features.sql`) over `read_parquet` of the same history table's live files,
//! timed inside the Python process. The two results are compared value by value.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use std::borrow::Cow;

use chrono::{DateTime, Days, FixedOffset, NaiveDate, Offset, TimeZone, Timelike, Utc};
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use streetflow_core::tables::{MERCHANT_DAILY_HISTORY, MERCHANT_FEATURES, POS_EVENTS};
use streetflow_core::{
    Channel, Currency, EventKind, Knowledge, LocalPlace, MerchantRecord, OperatorCalendars,
    PosEvent,
};
use streetflow_features::{
    AsOf, FeatureInputs, SilverMode, SilverSettings, compute_features, reference_tables,
    refresh_silver, sql,
};
use streetflow_ingest::{EventRows, Origin};
use streetflow_lake::arrow::array::{Array, ArrayRef, RecordBatch};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::DataType;
use streetflow_lake::arrow::util::display::array_value_to_string;
use streetflow_lake::deltalake::parquet::arrow::ArrowWriter;
use streetflow_lake::deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use streetflow_lake::{Lake, OffsetWriter};

use crate::console::{runtime, table, thousands};

/// Options of `streetflow bench features`.
#[derive(Debug, Args)]
pub struct BenchFeaturesArgs {
    /// Merchants, dealt to four operators.
    #[arg(long, default_value_t = 10_000)]
    merchants: u32,
    /// Days of history before the as-of date.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Mean sales per merchant and open day (district merchants make 20–300).
    #[arg(long, default_value_t = 20)]
    sales_per_day: u32,
    /// Runs of each engine; the best of each is compared.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Directory for the lake and results, kept and reused by later runs with the same
    /// settings (default: a temporary directory, deleted afterwards).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Python interpreter that has the `duckdb` package.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Measure streetflow only.
    #[arg(long)]
    skip_duckdb: bool,
}

/// The as-of date; the generated days end the day before it.
pub(crate) const AS_OF: NaiveDate = match NaiveDate::from_ymd_opt(2026, 1, 1) {
    Some(date) => date,
    None => panic!("a valid date"),
};

const OPERATORS: [&str; 4] = ["lane-north", "lane-south", "market-east", "market-west"];
const MCCS: [&str; 8] = [
    "5812", "5814", "5411", "5499", "5651", "7230", "5912", "5947",
];
const CHANNELS: [Channel; 5] = [
    Channel::Wechat,
    Channel::Alipay,
    Channel::UnionpayQr,
    Channel::BankCard,
    Channel::Cash,
];

/// One generated merchant.
pub(crate) struct BenchMerchant {
    pub(crate) operator: &'static str,
    pub(crate) id: String,
    mcc: &'static str,
    opened_on: NaiveDate,
    /// Mean sales on an open day.
    daily_sales: f64,
    /// Typical ticket in fen.
    ticket_fen: i64,
    rent_fen: Option<i64>,
}

fn district(args: &BenchFeaturesArgs, rng: &mut Pcg64Mcg) -> Vec<BenchMerchant> {
    let d = AS_OF;
    (0..args.merchants)
        .map(|i| {
            // One in ten opened during the period; the rest before it.
            let opened_days_ago = if rng.random::<f64>() < 0.1 {
                rng.random_range(30..=u64::from(args.days.max(31)))
            } else {
                u64::from(args.days) + rng.random_range(1..2_000)
            };
            BenchMerchant {
                operator: OPERATORS[i as usize % OPERATORS.len()],
                id: format!("m{i:06}"),
                mcc: MCCS[rng.random_range(0..MCCS.len())],
                opened_on: d - Days::new(opened_days_ago),
                daily_sales: f64::from(args.sales_per_day) * (0.3 + 1.4 * rng.random::<f64>()),
                ticket_fen: rng.random_range(1_500..25_000),
                rent_fen: (rng.random::<f64>() < 0.7)
                    .then(|| rng.random_range(2_000..30_000) * 100),
            }
        })
        .collect()
}

/// Bronze rows under construction: ingest's own `pos_events` builder, fed the rows the
/// benchmark draws (asserted knowledge, as a backfill may record it).
#[derive(Default)]
struct Rows {
    events: EventRows,
    rows: u64,
}

/// One bronze row.
struct Row<'a> {
    merchant: &'a BenchMerchant,
    business_date: i32,
    event_id: &'a str,
    kind: EventKind,
    amount_fen: i64,
    occurred_micros: i64,
    utc_offset_seconds: i32,
    minute_of_day: i32,
    channel: Channel,
    ref_event_id: Option<&'a str>,
    payer_ref: Option<&'a str>,
    ingested_micros: i64,
}

impl Rows {
    fn push(&mut self, row: &Row<'_>, offset: i64) -> anyhow::Result<()> {
        let instant = |micros: i64| {
            DateTime::from_timestamp_micros(micros).context("a generated time out of range")
        };
        let zone = FixedOffset::east_opt(row.utc_offset_seconds).context("a UTC offset")?;
        let event = PosEvent {
            event_id: Cow::Borrowed(row.event_id),
            operator_id: Cow::Borrowed(row.merchant.operator),
            merchant_id: Cow::Borrowed(&row.merchant.id),
            terminal_id: Some(Cow::Borrowed("t1")),
            kind: row.kind,
            amount_fen: row.amount_fen,
            currency: Currency::Cny,
            occurred_at: instant(row.occurred_micros)?.with_timezone(&zone),
            channel: row.channel,
            ref_event_id: row.ref_event_id.map(Cow::Borrowed),
            payer_ref: row.payer_ref.map(Cow::Borrowed),
        };
        let place = LocalPlace {
            business_date: NaiveDate::default()
                + Days::new(u64::try_from(row.business_date).context("a date before 1970")?),
            minute_of_day: u16::try_from(row.minute_of_day).context("a minute of the day")?,
        };
        self.events.append(
            &event,
            place,
            Knowledge::Asserted(instant(row.ingested_micros)?),
            &Origin::Kafka {
                topic: "bench.features",
                partition: (offset % 12) as i32,
                offset,
                timestamp: None,
            },
        );
        self.rows += 1;
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<RecordBatch> {
        Ok(self.events.finish(Utc::now())?)
    }
}

const MICROS_PER_MINUTE: i64 = 60_000_000;
const MICROS_PER_DAY: i64 = 1_440 * MICROS_PER_MINUTE;

/// Writes the district's bronze in weekly commits; returns the rows written.
async fn generate_bronze(
    lake: &Lake,
    merchants: &[BenchMerchant],
    args: &BenchFeaturesArgs,
    rng: &mut Pcg64Mcg,
) -> anyhow::Result<u64> {
    let calendars = OperatorCalendars::default();
    let d = AS_OF;
    let mut writer = OffsetWriter::new(lake, &POS_EVENTS, "bench").await?;
    let mut rows = Rows::default();
    let (mut offset, mut written) = (0i64, 0u64);
    let progress = indicatif::ProgressBar::new(u64::from(args.days));
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "generating bronze {bar:30} {pos}/{len} days, {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for n in (1..=u64::from(args.days)).rev() {
        let date = d - Days::new(n);
        let business_date = date.signed_duration_since(NaiveDate::default()).num_days() as i32;
        let weekend = matches!(
            chrono::Datelike::weekday(&date),
            chrono::Weekday::Sat | chrono::Weekday::Sun
        );
        for merchant in merchants.iter().filter(|m| m.opened_on <= date) {
            let calendar = calendars.for_operator(merchant.operator);
            let day_start = calendar.day_start(date);
            let utc_offset_seconds = calendar
                .time_zone()
                .offset_from_utc_datetime(&day_start.naive_utc())
                .fix()
                .local_minus_utc();
            let local_start_minute = {
                let local = calendar.local_time(&day_start);
                (local.hour() * 60 + local.minute()) as i64
            };
            // Closed on about one day in twelve.
            if rng.random::<f64>() < 1.0 / 12.0 {
                continue;
            }
            let boost = if weekend { 1.3 } else { 1.0 };
            let count = (merchant.daily_sales * boost * (0.5 + rng.random::<f64>())).round() as u32;
            for k in 0..count {
                let minute = rng.random_range(8 * 60..24 * 60);
                let occurred = day_start.timestamp_micros() + minute * MICROS_PER_MINUTE;
                let minute_of_day = ((local_start_minute + minute) % 1_440) as i32;
                let amount_fen = if rng.random::<f64>() < 0.03 {
                    rng.random_range(1..6) * 10_000
                } else {
                    ((merchant.ticket_fen as f64 * (0.3 + 1.4 * rng.random::<f64>())) as i64 / 10)
                        .max(1)
                        * 10
                };
                let event_id = format!("{}-{n}-{k}", merchant.id);
                let payer = (rng.random::<f64>() < 0.7)
                    .then(|| format!("{}-p{}", merchant.id, rng.random_range(0..300)));
                // One in a hundred arrives 1–10 days late.
                let ingested = if rng.random::<f64>() < 0.01 {
                    occurred + rng.random_range(1..=10) * MICROS_PER_DAY
                } else {
                    occurred + 2_000_000
                };
                let sale = Row {
                    merchant,
                    business_date,
                    event_id: &event_id,
                    kind: EventKind::Sale,
                    amount_fen,
                    occurred_micros: occurred,
                    utc_offset_seconds,
                    minute_of_day,
                    channel: CHANNELS[rng.random_range(0..CHANNELS.len())],
                    ref_event_id: None,
                    payer_ref: payer.as_deref(),
                    ingested_micros: ingested,
                };
                offset += 1;
                rows.push(&sale, offset)?;
                let draw = rng.random::<f64>();
                if draw < 0.01 {
                    // Delivered again five minutes later (a POS retry).
                    offset += 1;
                    rows.push(
                        &Row {
                            ingested_micros: ingested + 5 * MICROS_PER_MINUTE,
                            ..sale
                        },
                        offset,
                    )?;
                } else if draw < 0.02 {
                    let refund_id = format!("{event_id}-r");
                    let later = (minute + 30).min(24 * 60 - 1) - minute;
                    offset += 1;
                    rows.push(
                        &Row {
                            event_id: &refund_id,
                            kind: EventKind::Refund,
                            amount_fen: (amount_fen / 2).max(1),
                            occurred_micros: occurred + later * MICROS_PER_MINUTE,
                            minute_of_day: minute_of_day + later as i32,
                            ref_event_id: Some(&event_id),
                            ingested_micros: ingested + later * MICROS_PER_MINUTE,
                            ..sale
                        },
                        offset,
                    )?;
                } else if draw < 0.025 {
                    let void_id = format!("{event_id}-v");
                    offset += 1;
                    rows.push(
                        &Row {
                            event_id: &void_id,
                            kind: EventKind::Void,
                            ref_event_id: Some(&event_id),
                            ingested_micros: ingested + MICROS_PER_MINUTE,
                            ..sale
                        },
                        offset,
                    )?;
                }
            }
        }
        progress.inc(1);
        progress.set_message(format!("{} events", thousands(written + rows.rows)));
        if n % 7 == 0 || n == 1 {
            written += rows.rows;
            rows.rows = 0;
            writer.write(rows.finish()?).await?;
            let staged = writer.stage().await?;
            writer.commit(&staged, &[]).await?;
        }
    }
    progress.finish_and_clear();
    Ok(written)
}

pub(crate) fn registry(merchants: &[BenchMerchant]) -> Vec<MerchantRecord> {
    merchants
        .iter()
        .map(|m| MerchantRecord {
            operator_id: m.operator.to_owned(),
            merchant_id: m.id.clone(),
            name: m.id.clone(),
            mcc: m.mcc.to_owned(),
            industry_code: None,
            opened_on: m.opened_on,
            monthly_rent_fen: m.rent_fen,
            lease_end: None,
            valid_from: m.opened_on,
            recorded_at: None,
        })
        .collect()
}

fn write_parquet(path: &Path, batches: &[RecordBatch]) -> anyhow::Result<()> {
    let Some(first) = batches.first() else {
        anyhow::bail!("nothing to write to {}", path.display());
    };
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut writer = ArrowWriter::try_new(file, first.schema(), None)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.close()?;
    Ok(())
}

fn read_parquet(path: &Path) -> anyhow::Result<Vec<RecordBatch>> {
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

/// Peak resident memory of this process since the last reset, in bytes.
pub(crate) fn peak_rss() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident memory of this process now, in bytes.
pub(crate) fn current_rss() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak resident memory counter (Linux), so the peak measures one phase.
pub(crate) fn reset_peak_rss() {
    let _ = fs::write("/proc/self/clear_refs", "5");
}

/// The DuckDB side: the same SQL files over the same Parquet, timed in the process.
const DUCKDB_SCRIPT: &str = include_str!("../scripts/duckdb_features.py");

/// What one DuckDB run reported.
#[derive(Debug, serde::Deserialize)]
struct DuckRun {
    seconds: f64,
    rows: u64,
    version: String,
    peak_rss: u64,
}

fn run_duckdb(python: &str, work: &Path) -> anyhow::Result<DuckRun> {
    let script = work.join("duckdb_features.py");
    fs::write(&script, DUCKDB_SCRIPT)?;
    let output = Command::new(python)
        .arg(&script)
        .arg(work)
        .arg(
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .to_string(),
        )
        .output()
        .with_context(|| format!("starting {python}"))?;
    anyhow::ensure!(
        output.status.success(),
        "DuckDB run failed (is the `duckdb` package installed for {python}?):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("reading DuckDB's report {last:?}"))
}

/// Differences between the two engines' feature rows: (values compared, differences).
fn compare(ours: &[RecordBatch], theirs: &[RecordBatch]) -> anyhow::Result<(u64, Vec<String>)> {
    use std::collections::HashMap;
    type Key = (String, String);
    let index = |batches: &[RecordBatch]| -> anyhow::Result<HashMap<Key, (usize, usize)>> {
        let mut map = HashMap::new();
        for (b, batch) in batches.iter().enumerate() {
            let (op, m) = (
                batch.column_by_name("operator_id").context("operator_id")?,
                batch.column_by_name("merchant_id").context("merchant_id")?,
            );
            for row in 0..batch.num_rows() {
                map.insert(
                    (
                        array_value_to_string(op, row)?,
                        array_value_to_string(m, row)?,
                    ),
                    (b, row),
                );
            }
        }
        Ok(map)
    };
    let (left, right) = (index(ours)?, index(theirs)?);
    let mut differences = Vec::new();
    if left.len() != right.len() {
        differences.push(format!(
            "streetflow has {} rows, DuckDB {}",
            left.len(),
            right.len()
        ));
    }
    let mut compared = 0u64;
    for field in MERCHANT_FEATURES.schema.fields() {
        let kind = field.data_type();
        if !matches!(kind, DataType::Int64 | DataType::Float64 | DataType::Utf8) {
            continue;
        }
        let name = field.name();
        // Columns streetflow adds after the SQL (feature_set, bronze_version).
        let Some(first) = theirs.first() else { break };
        if first.column_by_name(name).is_none() {
            continue;
        }
        let as_type = |batch: &RecordBatch| -> anyhow::Result<ArrayRef> {
            let column = batch.column_by_name(name).context("column")?;
            Ok(cast(column, kind)?)
        };
        let ours_cast: Vec<ArrayRef> = ours.iter().map(as_type).collect::<anyhow::Result<_>>()?;
        let theirs_cast: Vec<ArrayRef> =
            theirs.iter().map(as_type).collect::<anyhow::Result<_>>()?;
        for (key, &(b, row)) in &left {
            let Some(&(tb, trow)) = right.get(key) else {
                continue;
            };
            let (a, t) = (&ours_cast[b], &theirs_cast[tb]);
            compared += 1;
            let same = match (a.is_null(row), t.is_null(trow)) {
                (true, true) => true,
                (false, false) if *kind == DataType::Float64 => {
                    let x: f64 = array_value_to_string(a, row)?.parse()?;
                    let y: f64 = array_value_to_string(t, trow)?.parse()?;
                    (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
                }
                (false, false) => array_value_to_string(a, row)? == array_value_to_string(t, trow)?,
                _ => false,
            };
            if !same && differences.len() < 20 {
                differences.push(format!(
                    "{}/{} {name}: streetflow {} DuckDB {}",
                    key.0,
                    key.1,
                    array_value_to_string(a, row)?,
                    array_value_to_string(t, trow)?
                ));
            }
        }
    }
    Ok((compared, differences))
}

/// The generated district of `args` and its bronze table in `work/lake`, generated unless
/// an earlier run with the same settings left it there.
pub(crate) fn prepare_lake(
    runtime: &tokio::runtime::Runtime,
    args: &BenchFeaturesArgs,
    work: &Path,
) -> anyhow::Result<(Lake, Vec<BenchMerchant>)> {
    let lake_dir = work.join("lake");
    let settings_path = work.join("bench-features.settings");
    let settings = settings_text(args);
    let reuse = fs::read_to_string(&settings_path).is_ok_and(|s| s == settings)
        && lake_dir.join("pos_events/_delta_log").exists();
    let mut rng = Pcg64Mcg::seed_from_u64(20_260_101);
    let merchants = district(args, &mut rng);
    let lake = Lake::new(
        lake_dir.to_str().context("work directory is not UTF-8")?,
        &Default::default(),
    )?;
    if !reuse {
        let _ = fs::remove_dir_all(&lake_dir);
        let _ = fs::remove_file(&settings_path);
        let started = Instant::now();
        let rows = runtime.block_on(generate_bronze(&lake, &merchants, args, &mut rng))?;
        println!(
            "generated bronze: {} rows in {:.1} s",
            thousands(rows),
            started.elapsed().as_secs_f64()
        );
        let started = Instant::now();
        let silver = runtime.block_on(refresh_silver(
            &lake,
            SilverMode::Full,
            &SilverSettings::default(),
        ))?;
        fs::write(&settings_path, &settings)?;
        println!(
            "built silver: {} daily rows and {} versions of bitemporal silver in {:.1} s",
            thousands(silver.rows_written as u64),
            thousands(silver.history.versions_written as u64),
            started.elapsed().as_secs_f64()
        );
    } else {
        println!("reusing the bronze table in {}", lake_dir.display());
    }
    Ok((lake, merchants))
}

/// Settings of a generated bench district (shared with `streetflow bench decide`).
pub(crate) fn district_args(
    merchants: u32,
    days: u32,
    sales_per_day: u32,
    workdir: PathBuf,
) -> BenchFeaturesArgs {
    BenchFeaturesArgs {
        merchants,
        days,
        sales_per_day,
        repeat: 1,
        workdir: Some(workdir),
        python: "python3".to_owned(),
        skip_duckdb: true,
    }
}

fn settings_text(args: &BenchFeaturesArgs) -> String {
    format!(
        "merchants={} days={} sales_per_day={} generator=3",
        args.merchants, args.days, args.sales_per_day
    )
}

pub(crate) fn bench_features(args: &BenchFeaturesArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; measure with `cargo run --release -- bench …`");
    }
    let temp;
    let work: PathBuf = match &args.workdir {
        Some(dir) => {
            fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let runtime = runtime()?;
    let (lake, merchants) = prepare_lake(&runtime, args, &work)?;
    let lake_dir = work.join("lake");
    let bronze_rows = runtime
        .block_on(lake.query("SELECT count(*) FROM pos_events"))?
        .first()
        .map(|b| array_value_to_string(b.column(0), 0))
        .transpose()?
        .unwrap_or_default();
    let parquet_bytes: u64 = walk_parquet(&lake_dir.join("pos_events"))?;

    let d = AS_OF;
    let inputs = FeatureInputs {
        calendars: OperatorCalendars::default(),
        registry: registry(&merchants),
        ..FeatureInputs::default()
    };
    let as_of = AsOf {
        date: d,
        knowledge_time: None,
    };

    // The DuckDB side's inputs: the same reference tables and SQL text.
    let reference = reference_tables(&as_of, &inputs, OPERATORS.map(str::to_owned).as_ref())?;
    fs::create_dir_all(work.join("reference"))?;
    for (name, batch) in &reference.tables {
        write_parquet(
            &work.join("reference").join(format!("{name}.parquet")),
            std::slice::from_ref(batch),
        )?;
    }
    fs::create_dir_all(work.join("sql"))?;
    // DuckDB reads bitemporal silver's live files, as streetflow does, and applies the
    // feature SQL to the rows as known at K.
    let history = runtime
        .block_on(lake.open(MERCHANT_DAILY_HISTORY.name))?
        .context("the bench lake has no merchant_daily_history")?;
    let files: Vec<String> = history
        .snapshot()?
        .log_data()
        .iter()
        .map(|f| {
            lake_dir
                .join(MERCHANT_DAILY_HISTORY.name)
                .join(f.path().as_ref())
                .display()
                .to_string()
        })
        .collect();
    fs::write(work.join("history_files.txt"), files.join("\n"))?;
    let relations = vec![
        ("daily", sql::DAILY_AS_OF.to_owned(), true),
        ("payer_sales", sql::PAYER_SALES_AS_OF.to_owned(), true),
        ("feed_days", sql::FEED_DAYS.to_owned(), true),
        ("features", sql::MERCHANT_FEATURES.to_owned(), true),
    ];
    let mut steps = String::new();
    for (name, text, materialize) in &relations {
        fs::write(work.join("sql").join(format!("{name}.sql")), text)?;
        let kind = if *materialize { "TABLE" } else { "VIEW" };
        steps.push_str(&format!("{name} {kind}\n"));
    }
    fs::write(work.join("sql").join("steps.txt"), steps)?;

    println!(
        "bench features: {} merchants, {} days, {} bronze rows ({:.0} MB of Parquet), as of {d}",
        thousands(u64::from(args.merchants)),
        args.days,
        bronze_rows,
        parquet_bytes as f64 / 1e6
    );
    let mut t = table(&["engine", "run", "seconds", "feature rows", "peak RSS MB"]);
    let mut best_ours = f64::MAX;
    let mut our_batches = Vec::new();
    for run in 1..=args.repeat.max(1) {
        reset_peak_rss();
        let started = Instant::now();
        let (batches, report) = runtime.block_on(compute_features(&lake, &as_of, &inputs))?;
        let seconds = started.elapsed().as_secs_f64();
        best_ours = best_ours.min(seconds);
        t.add_row(vec![
            format!("streetflow {} (DataFusion)", env!("CARGO_PKG_VERSION")),
            run.to_string(),
            format!("{seconds:.2}"),
            thousands(report.rows as u64),
            peak_rss().map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6)),
        ]);
        our_batches = batches;
    }
    let mut best_duck = None;
    if !args.skip_duckdb {
        for run in 1..=args.repeat.max(1) {
            let duck = run_duckdb(&args.python, &work)?;
            t.add_row(vec![
                format!("DuckDB {}", duck.version),
                run.to_string(),
                format!("{:.2}", duck.seconds),
                thousands(duck.rows),
                format!("{:.0}", duck.peak_rss as f64 / 1e6),
            ]);
            best_duck = Some(best_duck.map_or(duck.seconds, |b: f64| b.min(duck.seconds)));
        }
    }
    println!("{t}");
    if let Some(duck) = best_duck {
        let theirs = read_parquet(&work.join("duckdb_features.parquet"))?;
        let (compared, differences) = compare(&our_batches, &theirs)?;
        println!(
            "streetflow ÷ DuckDB time: {:.2} (goal ≤ 1.00); results compared: {} values, {} differ",
            best_ours / duck,
            thousands(compared),
            differences.len()
        );
        for difference in &differences {
            println!("  {difference}");
        }
        anyhow::ensure!(
            differences.is_empty(),
            "the engines disagree on the features"
        );
    }
    Ok(())
}

fn walk_parquet(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            total += walk_parquet(&path)?;
        } else if path.extension().is_some_and(|e| e == "parquet") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// Options of `streetflow bench training`.
#[derive(Debug, Args)]
pub struct BenchTrainingArgs {
    /// Merchants, dealt to four operators.
    #[arg(long, default_value_t = 10_000)]
    merchants: u32,
    /// Days of history before the bench date.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Mean sales per merchant and open day.
    #[arg(long, default_value_t = 5)]
    sales_per_day: u32,
    /// Directory of the generated lake (shared with `bench features`; kept).
    #[arg(long)]
    workdir: PathBuf,
    /// Spine rows.
    #[arg(long, default_value_t = 100_000)]
    rows: usize,
    /// As-of dates, 30 days apart, ending at the bench date.
    #[arg(long, default_value_t = 12)]
    dates: u32,
}

/// Times one training set: `--rows` spine rows over `--dates` as-of dates, half of them
/// at the default knowledge time and half twelve hours later.
pub(crate) fn bench_training(args: &BenchTrainingArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; measure with `cargo run --release -- bench …`");
    }
    let runtime = runtime()?;
    fs::create_dir_all(&args.workdir)?;
    let district = district_args(
        args.merchants,
        args.days,
        args.sales_per_day,
        args.workdir.clone(),
    );
    let (lake, merchants) = prepare_lake(&runtime, &district, &args.workdir)?;
    let inputs = FeatureInputs {
        calendars: OperatorCalendars::default(),
        registry: registry(&merchants),
        ..FeatureInputs::default()
    };
    let calendar = *inputs.calendars.for_operator("");
    let spine: Vec<streetflow_features::SpineRow> = (0..args.rows)
        .map(|r| {
            let merchant = &merchants[(r * 7_919) % merchants.len()];
            let date = AS_OF - Days::new(30 * u64::from(r as u32 % args.dates.max(1)));
            // Every date at both knowledge times: the default and twelve hours later.
            let knowledge_time = ((r / args.dates.max(1) as usize) % 2 == 1)
                .then(|| calendar.day_start(date) + chrono::Duration::hours(12));
            streetflow_features::SpineRow {
                operator_id: merchant.operator.to_owned(),
                merchant_id: merchant.id.clone(),
                as_of_date: date,
                knowledge_time,
            }
        })
        .collect();
    let out = args.workdir.join("training.parquet");
    reset_peak_rss();
    let started = Instant::now();
    let report = runtime.block_on(streetflow_features::write_training_set(
        &lake,
        &spine,
        &inputs,
        &out,
        |_, _| {},
    ))?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "bench training: {} spine rows over {} (as-of date, knowledge time) groups, {} merchants, {} days, {} sales/day",
        thousands(report.rows as u64),
        report.as_of_groups,
        thousands(u64::from(args.merchants)),
        args.days,
        args.sales_per_day
    );
    println!(
        "written in {seconds:.2} s (goal ≤ 60 s for 100,000 rows), peak RSS {:.0} MB, {} rows without history",
        peak_rss().unwrap_or(0) as f64 / 1e6,
        thousands(report.rows_without_history as u64)
    );
    Ok(())
}
