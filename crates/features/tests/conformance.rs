//! The conformance suite: fixture files a person can check by hand (events with their
//! knowledge times in, expected daily rows and feature values out, at several knowledge
//! times), run against every path that computes them:
//!
//! - bitemporal silver read with the documented as-of query (`schemas/tables.md`);
//! - the batch job (`streetflow features`), training sets (`--spine`) and `serve`'s
//!   evaluation from its in-memory history: the one feature implementation through each
//!   way in;
//! - the SQL definition over the raw events the lake knew (the reference).
//!
//! Each fixture under `tests/conformance/` says, in its comments, how every expected
//! value follows from its events.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, FixedOffset, NaiveDate, Utc};
use serde::Deserialize;
use streetflow_core::tables::POS_EVENTS;
use streetflow_core::{Knowledge, KnowledgeRules, MerchantRecord, OperatorCalendars};
use streetflow_features::{
    AsOf, DayRange, FeatureInputs, HistoryStore, LOOKBACK_DAYS, MerchantAsOf, SilverMode,
    SilverSettings, SpineRow, compute_features, merchant_features, reference_features,
    refresh_silver, write_training_set,
};
use streetflow_ingest::{DeadLetterRows, EventRows, Origin, RowAppender};
use streetflow_lake::arrow::array::RecordBatch;
use streetflow_lake::arrow::util::display::array_value_to_string;
use streetflow_lake::deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use streetflow_lake::{Lake, OffsetWriter};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    operator: String,
    as_of: NaiveDate,
    #[serde(default)]
    registry: Vec<Registered>,
    event: Vec<Event>,
    #[serde(default)]
    daily: Vec<toml::Table>,
    #[serde(default)]
    features: Vec<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registered {
    merchant: String,
    mcc: String,
    opened_on: NaiveDate,
    #[serde(default)]
    monthly_rent_fen: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Event {
    id: String,
    merchant: String,
    kind: String,
    amount: i64,
    occurred: DateTime<FixedOffset>,
    known: DateTime<FixedOffset>,
    #[serde(default)]
    payer: Option<String>,
    #[serde(default, rename = "ref")]
    reference: Option<String>,
}

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    paths
}

fn settings() -> SilverSettings {
    SilverSettings {
        calendars: OperatorCalendars::default(),
        knowledge: KnowledgeRules::new(chrono::Duration::milliseconds(2)),
    }
}

/// The fixture's events in bronze, each known when the fixture says, and silver built.
async fn lake_of(fixture: &Fixture, dir: &Path) -> Lake {
    let lake = Lake::new(dir.to_str().unwrap(), &Default::default()).unwrap();
    let mut appender = RowAppender::new(Default::default(), OperatorCalendars::default());
    let (mut rows, mut dead) = (EventRows::default(), DeadLetterRows::default());
    for (i, e) in fixture.event.iter().enumerate() {
        let mut json = serde_json::json!({
            "event_id": e.id, "operator_id": fixture.operator, "merchant_id": e.merchant,
            "kind": e.kind, "amount_fen": e.amount, "currency": "CNY",
            "occurred_at": e.occurred.to_rfc3339(),
            "channel": if e.payer.is_some() { "wechat" } else { "cash" },
        });
        if let Some(payer) = &e.payer {
            json["payer_ref"] = payer.clone().into();
        }
        if let Some(reference) = &e.reference {
            json["ref_event_id"] = reference.clone().into();
        }
        let known = e.known.with_timezone(&Utc);
        appender.append(
            &mut rows,
            &mut dead,
            Some(json.to_string().as_bytes()),
            None,
            known,
            Knowledge::Asserted(known),
            Origin::File {
                path: "fixture.jsonl",
                line: i as i64 + 1,
            },
            false,
        );
    }
    assert!(dead.is_empty(), "a fixture event was rejected");
    let mut table = OffsetWriter::new(&lake, &POS_EVENTS, "fixture")
        .await
        .unwrap();
    table.write(rows.finish(Utc::now()).unwrap()).await.unwrap();
    let staged = table.stage().await.unwrap();
    table.commit(&staged, &[]).await.unwrap();
    refresh_silver(&lake, SilverMode::Incremental, &settings())
        .await
        .unwrap();
    lake
}

fn inputs(fixture: &Fixture) -> FeatureInputs {
    FeatureInputs {
        calendars: OperatorCalendars::default(),
        registry: fixture
            .registry
            .iter()
            .map(|r| MerchantRecord {
                operator_id: fixture.operator.clone(),
                merchant_id: r.merchant.clone(),
                name: r.merchant.clone(),
                mcc: r.mcc.clone(),
                industry_code: None,
                opened_on: r.opened_on,
                monthly_rent_fen: r.monthly_rent_fen,
                lease_end: None,
                valid_from: r.opened_on,
                recorded_at: None,
            })
            .collect(),
        knowledge: settings().knowledge,
    }
}

/// One row of `batches` as column → text, the one whose `key` columns have `values`.
fn row(batches: &[RecordBatch], key: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    for batch in batches {
        for i in 0..batch.num_rows() {
            let text = |name: &str| {
                let column = batch.column_by_name(name).unwrap();
                if column.is_null(i) {
                    String::new()
                } else {
                    array_value_to_string(column, i).unwrap()
                }
            };
            if key.iter().all(|(name, value)| text(name) == *value) {
                return Some(
                    batch
                        .schema()
                        .fields()
                        .iter()
                        .map(|f| (f.name().clone(), text(f.name())))
                        .collect(),
                );
            }
        }
    }
    None
}

/// Every expected value of `expected` (but `skip`) equals the row's.
fn check(
    expected: &toml::Table,
    skip: &[&str],
    actual: &BTreeMap<String, String>,
    context: &str,
) -> usize {
    let mut checked = 0;
    for (name, value) in expected {
        if skip.contains(&name.as_str()) {
            continue;
        }
        let got = actual
            .get(name)
            .unwrap_or_else(|| panic!("{context}: no column {name}"));
        match value {
            toml::Value::Integer(n) => assert_eq!(got, &n.to_string(), "{context}: {name}"),
            toml::Value::Float(x) => {
                let y: f64 = got
                    .parse()
                    .unwrap_or_else(|_| panic!("{context}: {name} is {got:?}, expected {x}"));
                assert!(
                    (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                    "{context}: {name} is {y}, expected {x}"
                );
            }
            toml::Value::String(s) => assert_eq!(got, s, "{context}: {name}"),
            other => panic!("{context}: {name} = {other:?} is not a value"),
        }
        checked += 1;
    }
    checked
}

fn instant(table: &toml::Table, key: &str) -> Option<DateTime<Utc>> {
    table.get(key).map(|v| {
        DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .with_timezone(&Utc)
    })
}

/// The daily rows as known at `k`, through the as-of query `schemas/tables.md` shows.
async fn daily_as_of(lake: &Lake, k: DateTime<Utc>) -> Vec<RecordBatch> {
    lake.read_only_query(&format!(
        "SELECT * FROM (
           SELECT *, row_number() OVER (PARTITION BY operator_id, merchant_id, business_date
                                        ORDER BY known_from DESC) AS newest
           FROM merchant_daily_history
           WHERE known_from <= TIMESTAMP '{}'
         ) WHERE newest = 1 AND NOT retracted",
        k.to_rfc3339()
    ))
    .await
    .unwrap()
    .collect()
    .await
    .unwrap()
}

/// Every path's row for one merchant as of `as_of`, by path name.
async fn rows_of_every_path(
    lake: &Lake,
    fixture: &Fixture,
    as_of: &AsOf,
    merchant: &str,
    work: &Path,
) -> Vec<(&'static str, Option<BTreeMap<String, String>>)> {
    let inputs = inputs(fixture);
    let key = [
        ("operator_id", fixture.operator.as_str()),
        ("merchant_id", merchant),
    ];
    let (batch, _) = compute_features(lake, as_of, &inputs).await.unwrap();
    let (reference, _) = reference_features(lake, as_of, &inputs, None)
        .await
        .unwrap();
    // A training set of one spine row.
    let out = work.join(format!("spine-{merchant}-{}.parquet", as_of.date));
    write_training_set(
        lake,
        &[SpineRow {
            operator_id: fixture.operator.clone(),
            merchant_id: merchant.to_owned(),
            as_of_date: as_of.date,
            knowledge_time: as_of.knowledge_time,
        }],
        &inputs,
        &out,
        |_, _| {},
    )
    .await
    .unwrap();
    let spine: Vec<RecordBatch> =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&out).unwrap())
            .unwrap()
            .build()
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
    // serve's path: an in-memory history of the lookback.
    let d = as_of
        .date
        .signed_duration_since(NaiveDate::default())
        .num_days() as i32;
    let store = HistoryStore::load(
        lake,
        DayRange {
            first: d - LOOKBACK_DAYS as i32,
            last: d,
        },
        DayRange {
            first: d - 90,
            last: d,
        },
        None,
    )
    .await
    .unwrap();
    let (served, _) = merchant_features(
        &store,
        MerchantAsOf {
            operator_id: &fixture.operator,
            merchant_id: merchant,
            as_of,
            inputs: &inputs,
        },
    )
    .unwrap();
    vec![
        ("batch", row(&batch, &key)),
        ("training set", row(&spine, &key)),
        ("serve", row(&served, &key)),
        ("SQL over raw events", row(&reference, &key)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_gives_the_hand_checked_values_of_every_fixture() {
    let mut checked = 0;
    for path in fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let fixture: Fixture = toml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let dir = tempfile::tempdir().unwrap();
        let lake = lake_of(&fixture, &dir.path().join("lake")).await;

        for expected in &fixture.daily {
            let k = instant(expected, "known_at").unwrap();
            let merchant = expected["merchant"].as_str().unwrap();
            let date = expected["date"].as_str().unwrap();
            let rows = daily_as_of(&lake, k).await;
            let context = format!("{name}: daily {merchant} {date} as known at {k}");
            let actual = row(
                &rows,
                &[
                    ("operator_id", fixture.operator.as_str()),
                    ("merchant_id", merchant),
                    ("business_date", date),
                ],
            )
            .unwrap_or_else(|| panic!("{context}: no row"));
            checked += check(
                expected,
                &["known_at", "merchant", "date"],
                &actual,
                &context,
            );
        }

        for expected in &fixture.features {
            let merchant = expected["merchant"].as_str().unwrap();
            let as_of = AsOf {
                date: fixture.as_of,
                knowledge_time: instant(expected, "knowledge_time"),
            };
            for (path_name, actual) in
                rows_of_every_path(&lake, &fixture, &as_of, merchant, dir.path()).await
            {
                let context = format!(
                    "{name}: {merchant} as of {} ({:?}) through {path_name}",
                    as_of.date, as_of.knowledge_time
                );
                let actual = actual.unwrap_or_else(|| panic!("{context}: no row"));
                checked += check(expected, &["merchant", "knowledge_time"], &actual, &context);
            }
        }
    }
    assert!(checked > 200, "only {checked} values checked");
}
