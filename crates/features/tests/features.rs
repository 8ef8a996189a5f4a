//! Every feature on small fixtures whose expected values are worked out by hand in the
//! comments, plus the point-in-time (bitemporal) rules.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

use chrono::{DateTime, Days, NaiveDate, TimeZone, Utc};
use chrono_tz::Asia::Shanghai;
use streetflow_core::KnowledgeRules;
use streetflow_core::tables::{DEAD_LETTERS, MERCHANT_FEATURES, POS_EVENTS};
use streetflow_core::{MerchantRecord, OperatorCalendars};
use streetflow_features::{
    AsOf, DayRange, FeatureInputs, HistoryChanges, HistoryStore, LOOKBACK_DAYS, MerchantAsOf,
    SilverMode, SilverSettings, compute_features, compute_merchant_features, merchant_features,
    reference_features, refresh_silver,
};
use streetflow_ingest::{
    BackfillOptions, DeadLetterRows, EventRows, InputFormat, KnowledgeTime, Origin, RowAppender,
    backfill_file,
};
use streetflow_lake::arrow::array::RecordBatch;
use streetflow_lake::arrow::util::display::array_value_to_string;
use streetflow_lake::{Lake, OffsetWriter};
use streetflow_synth::{GenConfig, generate};

/// D: Tuesday 2025-04-01. Windows end on Monday 2025-03-31.
fn d() -> NaiveDate {
    NaiveDate::from_ymd_opt(2025, 4, 1).unwrap()
}

fn day(days_before: u64) -> NaiveDate {
    d() - Days::new(days_before)
}

/// Shanghai wall time on `date` as UTC.
fn at(date: NaiveDate, hour: u32, minute: u32) -> DateTime<Utc> {
    Shanghai
        .from_local_datetime(&date.and_hms_opt(hour, minute, 0).unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

struct Event {
    id: String,
    merchant: &'static str,
    kind: &'static str,
    amount: i64,
    occurred: DateTime<Utc>,
    payer: Option<&'static str>,
    reference: Option<String>,
    /// When the lake learned of it (Kafka record timestamp).
    ingested: DateTime<Utc>,
}

fn sale(
    id: &str,
    merchant: &'static str,
    amount: i64,
    occurred: DateTime<Utc>,
    payer: Option<&'static str>,
) -> Event {
    Event {
        id: id.to_owned(),
        merchant,
        kind: "sale",
        amount,
        occurred,
        payer,
        reference: None,
        ingested: occurred + chrono::Duration::seconds(2),
    }
}

fn json(e: &Event) -> String {
    let mut value = serde_json::json!({
        "event_id": e.id, "operator_id": "lane", "merchant_id": e.merchant, "kind": e.kind,
        "amount_fen": e.amount, "currency": "CNY",
        "occurred_at": e.occurred.with_timezone(&Shanghai).to_rfc3339(), "channel": "wechat",
    });
    if let Some(p) = e.payer {
        value["payer_ref"] = p.into();
    }
    if let Some(r) = &e.reference {
        value["ref_event_id"] = r.clone().into();
    }
    value.to_string()
}

/// Writes the events to bronze in one commit, as the ingest path would, then brings
/// silver up to date.
async fn lake_with(dir: &std::path::Path, events: &[Event]) -> Lake {
    let lake = bronze_with(dir, events).await;
    // Bitemporal silver, which every features path reads, up to what is settled now.
    refresh_silver(&lake, SilverMode::Incremental, &settings())
        .await
        .unwrap();
    lake
}

/// Writes the events to bronze in one commit, as the ingest path would.
async fn bronze_with(dir: &std::path::Path, events: &[Event]) -> Lake {
    let lake = Lake::new(dir.to_str().unwrap(), &Default::default()).unwrap();
    let mut appender = RowAppender::new(Default::default(), OperatorCalendars::default());
    let (mut rows, mut dead) = (EventRows::default(), DeadLetterRows::default());
    for (i, e) in events.iter().enumerate() {
        let line = json(e);
        let origin = Origin::File {
            path: "fixture",
            line: i as i64 + 1,
        };
        appender.append(
            &mut rows,
            &mut dead,
            Some(line.as_bytes()),
            None,
            e.ingested,
            streetflow_core::Knowledge::Asserted(e.ingested),
            origin,
            false,
        );
    }
    assert!(dead.is_empty(), "a fixture event was rejected");
    let mut table = OffsetWriter::new(&lake, &POS_EVENTS, "fixture")
        .await
        .unwrap();
    table
        .write(rows.finish(chrono::Utc::now()).unwrap())
        .await
        .unwrap();
    let staged = table.stage().await.unwrap();
    table.commit(&staged, &[]).await.unwrap();
    OffsetWriter::new(&lake, &DEAD_LETTERS, "fixture")
        .await
        .unwrap();
    lake
}

/// Silver settings of the fixtures: Shanghai calendars, knowledge settled at once (the
/// fixtures assert their knowledge times, and nothing else writes the lake).
fn settings() -> SilverSettings {
    SilverSettings {
        calendars: OperatorCalendars::default(),
        knowledge: KnowledgeRules::new(chrono::Duration::milliseconds(2)),
    }
}

fn registry(merchant: &str, mcc: &str, opened: NaiveDate, rent: Option<i64>) -> MerchantRecord {
    MerchantRecord {
        operator_id: "lane".into(),
        merchant_id: merchant.into(),
        name: merchant.into(),
        mcc: mcc.into(),
        industry_code: None,
        opened_on: opened,
        monthly_rent_fen: rent,
        lease_end: None,
        valid_from: opened,
        recorded_at: None,
    }
}

/// A feature value of one merchant as text (NULL as "").
fn value(batches: &[RecordBatch], merchant: &str, column: &str) -> String {
    for batch in batches {
        let merchants = batch.column_by_name("merchant_id").unwrap();
        for row in 0..batch.num_rows() {
            if array_value_to_string(merchants, row).unwrap() == merchant {
                let column = batch
                    .column_by_name(column)
                    .unwrap_or_else(|| panic!("no column {column}"));
                return if column.is_null(row) {
                    String::new()
                } else {
                    array_value_to_string(column, row).unwrap()
                };
            }
        }
    }
    panic!("no row for {merchant}");
}

fn float(batches: &[RecordBatch], merchant: &str, column: &str) -> f64 {
    value(batches, merchant, column)
        .parse()
        .unwrap_or_else(|_| panic!("{column} is not a number"))
}

fn close(actual: f64, expected: f64, column: &str) {
    assert!(
        (actual - expected).abs() < 1e-9,
        "{column}: {actual} != {expected}"
    );
}

/// steady: opened 2025-01-01 (D − 90), one 8,800 fen sale at noon every day from
/// D − 90 to D − 1, payers p1 and p2 alternating. Rent 3,000 yuan a month, MCC 5812.
fn steady() -> Vec<Event> {
    (1..=90)
        .map(|n| {
            sale(
                &format!("s{n}"),
                "steady",
                8_800,
                at(day(n), 12, 0),
                Some(if n % 2 == 0 { "p2" } else { "p1" }),
            )
        })
        .collect()
}

/// irregular: a long-open shop (registry 2020) whose feed starts with the operator's on
/// 2025-01-01. On D − 11: a 20,000 fen sale at 23:30 (night, round) and a 5,000 fen
/// sale at 10:00 that a void cancels. On D − 41: a 30,000 fen sale (round), delivered
/// twice, and a 6,000 fen refund of it the same day. Nothing else.
fn irregular() -> Vec<Event> {
    let mut events = vec![
        sale("i1", "irregular", 20_000, at(day(11), 23, 30), Some("q1")),
        sale("i2", "irregular", 5_000, at(day(11), 10, 0), Some("q2")),
        sale("i3", "irregular", 30_000, at(day(41), 12, 0), Some("q1")),
        sale("i3", "irregular", 30_000, at(day(41), 12, 0), Some("q1")),
    ];
    events.push(Event {
        kind: "void",
        reference: Some("i2".into()),
        ..sale("i4", "irregular", 5_000, at(day(11), 10, 5), None)
    });
    events.push(Event {
        kind: "refund",
        reference: Some("i3".into()),
        ..sale("i5", "irregular", 6_000, at(day(41), 18, 0), Some("q1"))
    });
    events
}

fn inputs() -> FeatureInputs {
    FeatureInputs {
        calendars: OperatorCalendars::default(),
        registry: vec![
            registry("steady", "5812", day(90), Some(300_000)),
            registry(
                "irregular",
                "5651",
                NaiveDate::from_ymd_opt(2020, 6, 15).unwrap(),
                None,
            ),
        ],
        // Settled at once, as the fixtures' silver (`settings`).
        knowledge: settings().knowledge,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_feature_matches_the_hand_computed_value() {
    let dir = tempfile::tempdir().unwrap();
    let mut events = steady();
    events.extend(irregular());
    let lake = lake_with(dir.path(), &events).await;
    let (f, report) = compute_features(
        &lake,
        &AsOf {
            date: d(),
            knowledge_time: None,
        },
        &inputs(),
    )
    .await
    .unwrap();
    assert_eq!(report.rows, 2);
    let v = |m: &str, c: &str| value(&f, m, c);
    let x = |m: &str, c: &str| float(&f, m, c);

    // Default knowledge time: the start of D in Shanghai = 2025-03-31T16:00:00Z.
    assert_eq!(v("steady", "knowledge_time"), "2025-03-31T16:00:00Z");
    assert_eq!(v("steady", "feature_set"), "v1");

    // steady — 90 days on book (history starts 2025-01-01 = D − 90).
    assert_eq!(v("steady", "days_on_book"), "90");
    assert_eq!(v("steady", "net_fen_7d"), "61600"); // 7 × 8,800
    assert_eq!(v("steady", "net_fen_30d"), "264000"); // 30 × 8,800
    assert_eq!(v("steady", "net_fen_90d"), "792000"); // 90 × 8,800
    assert_eq!(v("steady", "net_fen_180d"), "792000"); // only 90 days on book
    assert_eq!(v("steady", "net_fen_365d"), "792000");
    assert_eq!(v("steady", "sales_count_30d"), "30");
    assert_eq!(v("steady", "sales_count_90d"), "90");
    assert_eq!(v("steady", "active_days_30d"), "30");
    assert_eq!(v("steady", "active_days_90d"), "90");
    close(
        x("steady", "active_day_ratio_30d"),
        1.0,
        "active_day_ratio_30d",
    );
    close(
        x("steady", "active_day_ratio_90d"),
        1.0,
        "active_day_ratio_90d",
    );
    assert_eq!(v("steady", "avg_ticket_fen_30d"), "8800");
    assert_eq!(v("steady", "avg_ticket_fen_90d"), "8800");
    close(x("steady", "refund_ratio_90d"), 0.0, "refund_ratio_90d");
    close(x("steady", "daily_net_cv_90d"), 0.0, "daily_net_cv_90d"); // every day the same
    close(x("steady", "growth_mom_30d"), 0.0, "growth_mom_30d"); // 264,000 / 264,000 − 1
    assert_eq!(v("steady", "growth_yoy_90d"), ""); // no history a year ago
    close(x("steady", "trend_slope_26w"), 0.0, "trend_slope_26w"); // 12 equal full weeks
    assert_eq!(v("steady", "max_zero_streak_90d"), "0");
    assert_eq!(v("steady", "days_since_last_sale"), "1");
    // Q1 2025 has 26 Saturdays and Sundays among its 90 days.
    close(
        x("steady", "weekend_share_90d"),
        26.0 / 90.0,
        "weekend_share_90d",
    );
    close(x("steady", "night_share_90d"), 0.0, "night_share_90d");
    close(
        x("steady", "round_amount_share_90d"),
        0.0,
        "round_amount_share_90d",
    ); // 8,800 is not round
    close(
        x("steady", "spike_ratio_30d_180d"),
        1.0,
        "spike_ratio_30d_180d",
    ); // (264,000/30)/(792,000/90)
    assert_eq!(v("steady", "distinct_payers_90d"), "2");
    close(
        x("steady", "repeat_payer_ratio_90d"),
        1.0,
        "repeat_payer_ratio_90d",
    ); // both came 45 times
    close(
        x("steady", "top5_payer_share_90d"),
        1.0,
        "top5_payer_share_90d",
    );
    assert_eq!(v("steady", "months_on_book"), "3"); // 2025-01-01 → 2025-04-01
    close(x("steady", "coverage_ratio_90d"), 1.0, "coverage_ratio_90d");
    close(
        x("steady", "rent_to_turnover_90d"),
        900_000.0 / 792_000.0,
        "rent_to_turnover_90d",
    ); // 3 months of rent
    close(x("steady", "peer_pct_net_90d"), 0.0, "peer_pct_net_90d"); // alone in (lane, 5812)
    assert_eq!(v("steady", "mcc"), "5812");
    assert_eq!(v("steady", "subsidy_sector"), "catering_accommodation");

    // irregular — history from the feed start 2025-01-01, so 90 days on book too.
    assert_eq!(v("irregular", "days_on_book"), "90");
    assert_eq!(v("irregular", "net_fen_7d"), "0");
    assert_eq!(v("irregular", "net_fen_30d"), "20000"); // the night sale; the 5,000 was voided
    assert_eq!(v("irregular", "net_fen_90d"), "44000"); // 20,000 + 30,000 − 6,000 (duplicate counted once)
    assert_eq!(v("irregular", "sales_count_90d"), "2");
    assert_eq!(v("irregular", "active_days_90d"), "2");
    close(
        x("irregular", "active_day_ratio_90d"),
        2.0 / 90.0,
        "active_day_ratio_90d",
    );
    assert_eq!(v("irregular", "avg_ticket_fen_90d"), "25000"); // 50,000 / 2
    close(
        x("irregular", "refund_ratio_90d"),
        6_000.0 / 50_000.0,
        "refund_ratio_90d",
    );
    // mom: 20,000 (days 1–30) over 24,000 (days 31–60) − 1.
    close(
        x("irregular", "growth_mom_30d"),
        20_000.0 / 24_000.0 - 1.0,
        "growth_mom_30d",
    );
    // Zero days: 1–10 (10), 12–40 (29), 42–90 (49).
    assert_eq!(v("irregular", "max_zero_streak_90d"), "49");
    assert_eq!(v("irregular", "days_since_last_sale"), "11");
    close(
        x("irregular", "night_share_90d"),
        20_000.0 / 50_000.0,
        "night_share_90d",
    );
    close(
        x("irregular", "round_amount_share_90d"),
        1.0,
        "round_amount_share_90d",
    );
    // CV of 90 daily nets: one day 20,000, one day 24,000, 88 zeros.
    let mean = 44_000.0 / 90.0;
    let variance = (20_000.0f64.powi(2) + 24_000.0f64.powi(2)) / 90.0 - mean * mean;
    close(
        x("irregular", "daily_net_cv_90d"),
        variance.sqrt() / mean,
        "daily_net_cv_90d",
    );
    // Spike: (20,000/30) / (44,000/90).
    close(
        x("irregular", "spike_ratio_30d_180d"),
        (20_000.0 / 30.0) / (44_000.0 / 90.0),
        "spike_ratio_30d_180d",
    );
    // Payers of live sales: q1 (20,000 and 30,000: 2 visits); q2's sale was voided.
    assert_eq!(v("irregular", "distinct_payers_90d"), "1");
    close(
        x("irregular", "repeat_payer_ratio_90d"),
        1.0,
        "repeat_payer_ratio_90d",
    );
    close(
        x("irregular", "top5_payer_share_90d"),
        1.0,
        "top5_payer_share_90d",
    );
    // Opened 2020-06-15 → 2025-04-01: 57 full months (April 1 is before the 15th).
    assert_eq!(v("irregular", "months_on_book"), "57");
    assert_eq!(v("irregular", "rent_to_turnover_90d"), ""); // no rent known
    assert_eq!(v("irregular", "subsidy_sector"), ""); // 5651 (clothing) is retail only from 2026
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_event_changes_nothing_before_it_arrived() {
    let dir = tempfile::tempdir().unwrap();
    let mut events = steady();
    // A sale of D − 3 that reached the lake only on D + 2.
    let mut late = sale("late", "steady", 100_000, at(day(3), 15, 0), Some("p9"));
    late.ingested = at(d() + Days::new(2), 9, 0);
    events.push(late);
    let lake = lake_with(dir.path(), &events).await;

    let as_of = AsOf {
        date: d(),
        knowledge_time: None,
    };
    let (before, _) = compute_features(&lake, &as_of, &inputs()).await.unwrap();
    assert_eq!(
        value(&before, "steady", "net_fen_7d"),
        "61600",
        "the late sale leaked into the past"
    );
    assert_eq!(value(&before, "steady", "distinct_payers_90d"), "2");

    let later = AsOf {
        date: d(),
        knowledge_time: Some(at(d() + Days::new(3), 0, 0)),
    };
    let (after, report) = compute_features(&lake, &later, &inputs()).await.unwrap();
    assert_eq!(value(&after, "steady", "net_fen_7d"), "161600"); // 61,600 + 100,000
    assert_eq!(value(&after, "steady", "distinct_payers_90d"), "3");
    assert_eq!(report.knowledge_times["lane"], at(d() + Days::new(3), 0, 0));
    // Recomputing as of D with the default knowledge time still gives the first vector.
    let (again, _) = compute_features(&lake, &as_of, &inputs()).await.unwrap();
    assert_eq!(value(&again, "steady", "net_fen_7d"), "61600");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_versions_and_sectors_follow_the_as_of_date() {
    let dir = tempfile::tempdir().unwrap();
    let lake = lake_with(dir.path(), &steady()).await;
    let mut inputs = inputs();
    // From D the shop is registered as a bar-restaurant with a higher rent: not yet
    // visible as of D (versions valid on D − 1 only).
    let mut newer = registry("steady", "5813", d(), Some(900_000));
    newer.valid_from = d();
    inputs.registry.push(newer);
    let (f, _) = compute_features(
        &lake,
        &AsOf {
            date: d(),
            knowledge_time: None,
        },
        &inputs,
    )
    .await
    .unwrap();
    assert_eq!(value(&f, "steady", "mcc"), "5812");
    let next = AsOf {
        date: d() + Days::new(1),
        knowledge_time: None,
    };
    let (g, _) = compute_features(&lake, &next, &inputs).await.unwrap();
    assert_eq!(value(&g, "steady", "mcc"), "5813");
    // Before the 2025 scheme took effect (2025-03-16) there is no subsidy sector.
    let early = AsOf {
        date: NaiveDate::from_ymd_opt(2025, 3, 10).unwrap(),
        knowledge_time: None,
    };
    let (e, _) = compute_features(&lake, &early, &inputs).await.unwrap();
    assert_eq!(value(&e, "steady", "subsidy_sector"), "");
    // A registered industry code decides before the MCC: 8514 (care for the elderly)
    // on a 5813 bar MCC is elderly care.
    let mut registered = registry("steady", "5813", d(), Some(900_000));
    registered.industry_code = Some("8514".into());
    registered.valid_from = d() + Days::new(2);
    inputs.registry.push(registered);
    let (r, _) = compute_features(
        &lake,
        &AsOf {
            date: d() + Days::new(3),
            knowledge_time: None,
        },
        &inputs,
    )
    .await
    .unwrap();
    assert_eq!(value(&r, "steady", "industry_code"), "8514");
    assert_eq!(value(&r, "steady", "subsidy_sector"), "elderly_care");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_set_joins_each_spine_row_as_of_its_own_date() {
    use streetflow_features::{SpineRow, write_training_set};
    use streetflow_lake::deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let dir = tempfile::tempdir().unwrap();
    let mut events = steady();
    let mut late = sale("late", "steady", 100_000, at(day(3), 15, 0), Some("p9"));
    late.ingested = at(d() + Days::new(2), 9, 0);
    events.push(late);
    let lake = lake_with(&dir.path().join("lake"), &events).await;
    let row = |merchant: &str, date: NaiveDate, knowledge_time: Option<DateTime<Utc>>| SpineRow {
        operator_id: "lane".into(),
        merchant_id: merchant.into(),
        as_of_date: date,
        knowledge_time,
    };
    let spine = vec![
        row("steady", d(), None),     // 1: before the late sale arrived
        row("steady", day(30), None), // 2: 60 days on book
        row("nobody", d(), None),     // 3: unknown merchant
        row("steady", d(), Some(at(d() + Days::new(3), 0, 0))), // 4: after it arrived
        row("steady", day(30), None), // 5: same as row 2
    ];
    let out = dir.path().join("train.parquet");
    let mut calls = Vec::new();
    let report = write_training_set(&lake, &spine, &inputs(), &out, |done, total| {
        calls.push((done, total))
    })
    .await
    .unwrap();
    assert_eq!(report.rows, 5);
    assert_eq!(report.rows_without_history, 1);
    assert_eq!(report.as_of_groups, 3);
    assert_eq!(calls, vec![(1, 3), (2, 3), (3, 3)]);

    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&out).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    // Rows by spine position: (merchant, as_of_date, net_fen_7d, days_on_book, net_fen_90d).
    let mut rows = std::collections::BTreeMap::new();
    for batch in &batches {
        for i in 0..batch.num_rows() {
            let cell = |name: &str| {
                let column = batch.column_by_name(name).unwrap();
                if column.is_null(i) {
                    String::new()
                } else {
                    array_value_to_string(column, i).unwrap()
                }
            };
            rows.insert(
                cell("spine_row"),
                (
                    cell("merchant_id"),
                    cell("as_of_date"),
                    cell("net_fen_7d"),
                    cell("days_on_book"),
                    cell("net_fen_90d"),
                ),
            );
        }
    }
    let expect = |m: &str, date: &str, n7: &str, book: &str, n90: &str| {
        (
            m.to_owned(),
            date.to_owned(),
            n7.to_owned(),
            book.to_owned(),
            n90.to_owned(),
        )
    };
    assert_eq!(
        rows["1"],
        expect("steady", "2025-04-01", "61600", "90", "792000")
    );
    // As of 2025-03-02 the shop had 60 days: 60 × 8,800 = 528,000.
    assert_eq!(
        rows["2"],
        expect("steady", "2025-03-02", "61600", "60", "528000")
    );
    assert_eq!(rows["3"], expect("nobody", "2025-04-01", "", "", ""));
    assert_eq!(
        rows["4"],
        expect("steady", "2025-04-01", "161600", "90", "892000")
    );
    assert_eq!(rows["5"], rows["2"]);
}

/// A second district for the features that need a long history, feed gaps and peers.
/// The operator's feed delivers nothing at all on D − 6 … D − 2 (an outage).
///
/// * veteran (MCC 5812, opened 2023): 10,000 fen every day D − 455 … D − 366 (last
///   year's 90-day window) and 15,000 fen every day D − 90 … D − 1 outside the outage.
/// * grower (MCC 5812, opened D − 182): nothing in its first 13 weeks, then one
///   9,900 fen sale (99 yuan) on the first day of each of the last 13 weeks, i.e. on
///   D − 1, D − 8, …, D − 85.
/// * quiet (MCC 5812, opened D − 30): registered, never sold anything.
fn history() -> Vec<Event> {
    let outage = 2..=6;
    let mut events = Vec::new();
    for n in 366..=455 {
        events.push(sale(
            &format!("v{n}"),
            "veteran",
            10_000,
            at(day(n), 12, 0),
            None,
        ));
    }
    for n in (1..=90).filter(|n| !outage.contains(n)) {
        events.push(sale(
            &format!("v{n}"),
            "veteran",
            15_000,
            at(day(n), 12, 0),
            None,
        ));
    }
    for week in 0..13 {
        let n = week * 7 + 1;
        events.push(sale(
            &format!("g{n}"),
            "grower",
            9_900,
            at(day(n), 12, 0),
            None,
        ));
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_features_match_the_hand_computed_value() {
    let dir = tempfile::tempdir().unwrap();
    let lake = lake_with(dir.path(), &history()).await;
    let inputs = FeatureInputs {
        calendars: OperatorCalendars::default(),
        registry: vec![
            registry(
                "veteran",
                "5812",
                NaiveDate::from_ymd_opt(2023, 1, 1).unwrap(),
                None,
            ),
            registry("grower", "5812", day(182), None),
            registry("quiet", "5812", day(30), None),
        ],
        ..FeatureInputs::default()
    };
    let (f, report) = compute_features(
        &lake,
        &AsOf {
            date: d(),
            knowledge_time: None,
        },
        &inputs,
    )
    .await
    .unwrap();
    assert_eq!(report.rows, 3);
    let v = |m: &str, c: &str| value(&f, m, c);
    let x = |m: &str, c: &str| float(&f, m, c);

    // veteran: the operator's feed starts at D − 455, so the whole window is on book.
    assert_eq!(v("veteran", "days_on_book"), "455");
    assert_eq!(v("veteran", "net_fen_90d"), "1275000"); // 85 × 15,000
    assert_eq!(v("veteran", "net_fen_365d"), "1275000"); // nothing on D − 365 … D − 91
    // Year over year: 1,275,000 over last year's 90 × 10,000 = 900,000, minus one.
    close(
        x("veteran", "growth_yoy_90d"),
        1_275_000.0 / 900_000.0 - 1.0,
        "growth_yoy_90d",
    );
    // The feed delivered on 85 of the 90 days.
    close(
        x("veteran", "coverage_ratio_90d"),
        85.0 / 90.0,
        "coverage_ratio_90d",
    );
    assert_eq!(v("veteran", "max_zero_streak_90d"), "5"); // the outage
    assert_eq!(v("veteran", "months_on_book"), "27"); // 2023-01-01 → 2025-04-01

    // grower: 182 days on book = 26 full weeks, numbered 0 (oldest) … 25 (newest).
    // y = ln(1 + weekly yuan) is 0 for weeks 0–12 and ln(100) for weeks 13–25.
    // OLS slope = Σ(x − 12.5)(y − ȳ) / Σ(x − 12.5)²
    //           = ln(100) · (0.5 + 1.5 + … + 12.5) / (2 · (0.5² + 1.5² + … + 12.5²))
    //           = ln(100) · 84.5 / 1462.5.
    close(
        x("grower", "trend_slope_26w"),
        100.0f64.ln() * 84.5 / 1462.5,
        "trend_slope_26w",
    );
    assert_eq!(v("grower", "days_on_book"), "182");
    assert_eq!(v("grower", "net_fen_90d"), "128700"); // 13 × 9,900
    assert_eq!(v("grower", "growth_yoy_90d"), ""); // not on book a year ago
    // Month over month: D − 1, 8, 15, 22, 29 (5 sales) over D − 36, 43, 50, 57 (4), − 1.
    close(
        x("grower", "growth_mom_30d"),
        5.0 / 4.0 - 1.0,
        "growth_mom_30d",
    );
    close(
        x("grower", "coverage_ratio_90d"),
        85.0 / 90.0,
        "coverage_ratio_90d",
    );
    assert_eq!(v("grower", "max_zero_streak_90d"), "6"); // e.g. D − 2 … D − 7

    // quiet: registered 30 days ago, no sales.
    assert_eq!(v("quiet", "days_on_book"), "30");
    assert_eq!(v("quiet", "net_fen_30d"), "0");
    assert_eq!(v("quiet", "days_since_last_sale"), "");
    assert_eq!(v("quiet", "max_zero_streak_90d"), "30");
    close(
        x("quiet", "active_day_ratio_30d"),
        0.0,
        "active_day_ratio_30d",
    );
    close(
        x("quiet", "coverage_ratio_90d"),
        25.0 / 30.0,
        "coverage_ratio_90d",
    ); // the outage is inside its 30 days
    assert_eq!(v("quiet", "avg_ticket_fen_30d"), "");
    // Four full weeks (D − 1 … D − 28) of zeros: a flat trend.
    close(x("quiet", "trend_slope_26w"), 0.0, "trend_slope_26w");

    // Peers within (lane, 5812) ranked by net_fen_90d: quiet 0 < grower 128,700 <
    // veteran 1,275,000; percent rank = (rank − 1) / (3 − 1).
    close(x("quiet", "peer_pct_net_90d"), 0.0, "peer_pct_net_90d");
    close(x("grower", "peer_pct_net_90d"), 0.5, "peer_pct_net_90d");
    close(x("veteran", "peer_pct_net_90d"), 1.0, "peer_pct_net_90d");
}

/// One delivery of a refund or void naming `reference`.
fn claim(
    id: &str,
    kind: &'static str,
    amount: i64,
    reference: &str,
    occurred: DateTime<Utc>,
) -> Event {
    Event {
        reference: Some(reference.to_owned()),
        kind,
        ..sale(id, "m", amount, occurred, None)
    }
}

/// `event` delivered again `seconds` after `occurred` (a POS retry or a replay).
fn redelivered(event: &Event, amount: i64, seconds: i64) -> Event {
    Event {
        id: event.id.clone(),
        merchant: event.merchant,
        kind: event.kind,
        amount,
        occurred: event.occurred,
        payer: event.payer,
        reference: event.reference.clone(),
        ingested: event.occurred + chrono::Duration::seconds(seconds),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_counts_once_and_voids_and_refunds_resolve() {
    let noon = at(day(2), 12, 0);
    let s1 = sale("s1", "m", 1_000, noon, Some("p1"));
    let s2 = sale("s2", "m", 2_000, noon, Some("p2"));
    let s3_late = Event {
        ingested: noon + chrono::Duration::seconds(90),
        ..sale("s3", "m", 7_777, noon, Some("p3"))
    };
    let s3 = sale("s3", "m", 3_000, noon, Some("p3"));
    let events = vec![
        // s1 twice with the same content: one sale, one extra delivery, no conflict.
        redelivered(&s1, 1_000, 60),
        s1,
        // s2 again later with another amount: the first arrival (2,000) wins; a conflict.
        redelivered(&s2, 9_999, 30),
        s2,
        // s3: the line written first arrived last, so 3,000 wins; a conflict.
        s3_late,
        s3,
        // s4 voided (the void arrives before its sale): not a sale, one voided sale.
        claim("v4", "void", 4_000, "s4", noon),
        sale("s4", "m", 4_000, noon, Some("p4")),
        // s5 with a 500 refund: money out on the refund's date.
        sale("s5", "m", 5_000, noon, Some("p5")),
        claim("r5", "refund", 500, "s5", noon),
        // Refund and void of sales that never arrived: orphans (the refund still pays out).
        claim("r9", "refund", 900, "missing", noon),
        claim("v9", "void", 900, "missing-too", noon),
        // A void naming a refund cancels no sale: an orphan void; r5 stays a refund.
        claim("v10", "void", 500, "r5", noon),
        // s6 voided twice: one voided sale, neither void an orphan.
        sale("s6", "m", 6_000, noon, Some("p6")),
        claim("v6a", "void", 6_000, "s6", noon),
        claim("v6b", "void", 6_000, "s6", noon),
    ];
    let dir = tempfile::tempdir().unwrap();
    let lake = lake_with(dir.path(), &events).await;
    refresh_silver(&lake, SilverMode::Full, &settings())
        .await
        .unwrap();
    let daily = lake
        .read_only_query("SELECT * FROM merchant_daily")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(daily.iter().map(RecordBatch::num_rows).sum::<usize>(), 1);
    let v = |column: &str| value(&daily, "m", column);
    assert_eq!(v("business_date"), day(2).to_string());
    assert_eq!(v("sales_count"), "4"); // s1, s2, s3, s5
    assert_eq!(v("sales_fen"), "11000"); // 1,000 + 2,000 + 3,000 + 5,000
    assert_eq!(v("refund_count"), "2"); // r5, r9
    assert_eq!(v("refund_fen"), "1400"); // 500 + 900
    assert_eq!(v("net_fen"), "9600");
    assert_eq!(v("void_count"), "2"); // s4, s6
    assert_eq!(v("orphan_refund_count"), "1"); // r9
    assert_eq!(v("orphan_void_count"), "2"); // v9, v10
    assert_eq!(v("duplicate_deliveries"), "3"); // s1, s2, s3
    assert_eq!(v("conflicting_events"), "2"); // s2, s3
    assert_eq!(v("distinct_payers"), "4"); // p1, p2, p3, p5
    assert_eq!(v("max_ticket_fen"), "5000");
}

/// Every column of each batch row as text, keyed by merchant (NULL as "").
fn rows_by_merchant(batches: &[RecordBatch]) -> std::collections::BTreeMap<String, Vec<String>> {
    rows_keyed(batches, &["merchant_id"])
}

/// Rows as text, keyed by the values of `key` joined with '/'.
fn rows_keyed(
    batches: &[RecordBatch],
    key: &[&str],
) -> std::collections::BTreeMap<String, Vec<String>> {
    let text = |column: &dyn streetflow_lake::arrow::array::Array, row: usize| {
        if column.is_null(row) {
            String::new()
        } else {
            array_value_to_string(column, row).unwrap()
        }
    };
    let mut rows = std::collections::BTreeMap::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            let values = batch.columns().iter().map(|c| text(c, row)).collect();
            let key = key
                .iter()
                .map(|name| text(batch.column_by_name(name).unwrap(), row))
                .collect::<Vec<_>>()
                .join("/");
            rows.insert(key, values);
        }
    }
    rows
}

/// Two feature rows are equal, ratios up to floating-point summation order (the SQL
/// reference adds the same terms in another order).
fn assert_same_row(ours: &[String], reference: &[String], context: &str) {
    assert_eq!(ours.len(), reference.len());
    for (a, b) in ours.iter().zip(reference) {
        let floats = (a.contains('.') || b.contains('.'))
            .then(|| a.parse::<f64>().ok().zip(b.parse::<f64>().ok()))
            .flatten();
        match floats {
            Some((x, y)) => assert!(
                (x - y).abs() <= 1e-12 * x.abs().max(y.abs()).max(1.0),
                "{context}: {ours:?} != {reference:?}"
            ),
            None => assert_eq!(a, b, "{context}: {ours:?} != {reference:?}"),
        }
    }
}

fn day_number(date: NaiveDate) -> i32 {
    date.signed_duration_since(NaiveDate::default()).num_days() as i32
}

/// A history store holding the lookback of every as-of date from `first` to `last`.
async fn store_for(lake: &Lake, first: NaiveDate, last: NaiveDate) -> HistoryStore {
    let range = DayRange {
        first: day_number(first) - LOOKBACK_DAYS as i32,
        last: day_number(last),
    };
    let payers = DayRange {
        first: day_number(first) - 90,
        last: day_number(last),
    };
    HistoryStore::load(lake, range, payers, None).await.unwrap()
}

/// A merchant's row from the serving path, as text.
fn served(
    store: &HistoryStore,
    as_of: &AsOf,
    inputs: &FeatureInputs,
    operator: &str,
    merchant: &str,
) -> Option<Vec<String>> {
    let (rows, _) = merchant_features(
        store,
        MerchantAsOf {
            operator_id: operator,
            merchant_id: merchant,
            as_of,
            inputs,
        },
    )
    .unwrap();
    rows_keyed(&rows, &["operator_id", "merchant_id"]).remove(&format!("{operator}/{merchant}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_cache_gives_the_batch_rows_and_follows_new_commits() {
    let dir = tempfile::tempdir().unwrap();
    let mut events = steady();
    events.extend(irregular());
    let lake = lake_with(dir.path(), &events).await;
    let mut store = store_for(&lake, d() - Days::new(5), d() + Days::new(5)).await;
    assert_eq!(store.merchant_count(), 2);
    let horizon = store.horizon().unwrap();
    let now = AsOf {
        date: d(),
        knowledge_time: Some(horizon),
    };
    let peer = MERCHANT_FEATURES
        .schema
        .index_of("peer_pct_net_90d")
        .unwrap();
    // One merchant alone sees its operator's whole feed, so its row is the batch job's,
    // the peer percentile aside: irregular sold on two days, the feed (steady's sales)
    // delivered on all 90, so its history starts with the feed and is covered.
    let check = |store: &HistoryStore, as_of: &AsOf, batch: &[RecordBatch]| {
        let mut batch_rows = rows_keyed(batch, &["operator_id", "merchant_id"]);
        for merchant in ["steady", "irregular"] {
            let mut expected = batch_rows.remove(&format!("lane/{merchant}")).unwrap();
            expected[peer] = String::new();
            assert_eq!(
                served(store, as_of, &inputs(), "lane", merchant).unwrap(),
                expected
            );
        }
    };
    let (batch, _) = compute_features(&lake, &now, &inputs()).await.unwrap();
    check(&store, &now, &batch);
    let (read, _) = compute_merchant_features(&lake, &now, &inputs(), "lane", "steady")
        .await
        .unwrap();
    let mut expected = rows_by_merchant(&batch).remove("steady").unwrap();
    expected[peer] = String::new();
    assert_eq!(rows_by_merchant(&read).remove("steady").unwrap(), expected);
    assert_eq!(value(&batch, "irregular", "coverage_ratio_90d"), "1.0");
    assert_eq!(value(&batch, "irregular", "days_on_book"), "90");
    assert!(
        store.changes(&lake).await.unwrap().is_none(),
        "no new commit"
    );

    // A late 100,000 fen sale of D − 3 that the lake learns of now: the refresh appends
    // one version of steady's day, and the store reads only that.
    let mut late = sale("late", "steady", 100_000, at(day(3), 15, 0), Some("p9"));
    late.ingested = chrono::Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let lake = lake_with(dir.path(), &[late]).await;
    let changes = store.changes(&lake).await.unwrap().unwrap();
    assert!(matches!(changes, HistoryChanges::Appended { .. }));
    assert_eq!(store.apply(changes).unwrap(), 1);
    let later = AsOf {
        date: d(),
        knowledge_time: store.horizon(),
    };
    let (batch, _) = compute_features(&lake, &later, &inputs()).await.unwrap();
    assert_eq!(value(&batch, "steady", "net_fen_7d"), "161600"); // 61,600 + 100,000
    check(&store, &later, &batch);
    // Before the late sale was known, both still give the earlier vector.
    let (batch, _) = compute_features(&lake, &now, &inputs()).await.unwrap();
    assert_eq!(value(&batch, "steady", "net_fen_7d"), "61600");
    check(&store, &now, &batch);
}

/// Every merchant's vector of the synthetic district from the history, through the
/// batch job and the serving path, equals the SQL definition over the raw events the
/// lake knew, at as-of dates from the feed's second day to two months after it ended,
/// at the day's default knowledge time and at a late one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_from_the_history_equal_the_sql_over_raw_events_across_the_district() {
    let config = GenConfig {
        merchants: 24,
        days: 200,
        operators: 2,
        duplicate_rate: 0.02,
        late_rate: 0.05,
        ..GenConfig::default()
    };
    let mut jsonl = Vec::new();
    let generated = generate(&config, &mut jsonl).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("district.jsonl");
    std::fs::write(&events, &jsonl).unwrap();
    let lake = Lake::new(
        dir.path().join("lake").to_str().unwrap(),
        &Default::default(),
    )
    .unwrap();
    // Knowledge times as a stream would have given them: late events arrive late.
    let options = BackfillOptions {
        config: streetflow_core::PipelineConfig::defaults(),
        knowledge: KnowledgeTime::FromOccurred,
        commit_every_lines: 1_000_000,
        bytes_read: None,
        committed_rows: None,
    };
    backfill_file(&lake, &events, &options, &InputFormat::JsonLines)
        .await
        .unwrap();
    refresh_silver(&lake, SilverMode::Incremental, &settings())
        .await
        .unwrap();

    let start = config.start;
    let operator = generated.registry[0].operator_id.clone();
    let mut registry = generated.registry.clone();
    // A registered shop without a sale, and a second registry version of a merchant
    // that moves it to another MCC (and so another subsidy sector) and rent mid-way.
    registry.push(MerchantRecord {
        merchant_id: "registered-only".into(),
        opened_on: start + Days::new(20),
        valid_from: start + Days::new(20),
        recorded_at: None,
        ..generated.registry[0].clone()
    });
    let mut moved = generated.registry[1].clone();
    moved.mcc = "7230".into();
    moved.industry_code = None;
    moved.monthly_rent_fen = Some(1_234_500);
    moved.valid_from = start + Days::new(100);
    registry.push(moved);
    let inputs = FeatureInputs {
        calendars: OperatorCalendars::default(),
        registry,
        ..FeatureInputs::default()
    };
    let mut merchants: Vec<(String, String)> = inputs
        .registry
        .iter()
        .map(|r| (r.operator_id.clone(), r.merchant_id.clone()))
        .collect();
    merchants.sort();
    merchants.dedup();
    merchants.push((operator.clone(), "nobody".into()));

    let store = store_for(&lake, start, start + Days::new(260)).await;
    let late = at(start + Days::new(400), 0, 0);
    let mut compared = 0;
    let mut sample = Vec::new();
    // (days after the feed's start, with the late knowledge time too)
    for (offset, late_too) in [(1, false), (60, true), (200, true), (260, false)] {
        let date = start + Days::new(offset);
        let knowledge_times = if late_too {
            vec![None, Some(late)]
        } else {
            vec![None]
        };
        for knowledge_time in knowledge_times {
            let as_of = AsOf {
                date,
                knowledge_time,
            };
            let (reference, reference_report) = reference_features(&lake, &as_of, &inputs, None)
                .await
                .unwrap();
            let (batch, batch_report) = compute_features(&lake, &as_of, &inputs).await.unwrap();
            assert_eq!(
                reference_report.knowledge_times,
                batch_report.knowledge_times
            );
            let reference = rows_keyed(&reference, &["operator_id", "merchant_id"]);
            let batch_rows = rows_keyed(&batch, &["operator_id", "merchant_id"]);
            assert_eq!(
                reference.keys().collect::<Vec<_>>(),
                batch_rows.keys().collect::<Vec<_>>(),
                "merchants as of {date} ({knowledge_time:?})"
            );
            let bronze = MERCHANT_FEATURES.schema.index_of("bronze_version").unwrap();
            for (key, expected) in &reference {
                let context = format!("{key} as of {date} ({knowledge_time:?})");
                let mut ours = batch_rows[key].clone();
                // The reference reads bronze; the history records the version it reflects.
                ours[bronze] = expected[bronze].clone();
                assert_same_row(&ours, expected, &context);
                compared += 1;
            }
            let peer = MERCHANT_FEATURES
                .schema
                .index_of("peer_pct_net_90d")
                .unwrap();
            for (operator_id, merchant_id) in &merchants {
                let key = format!("{operator_id}/{merchant_id}");
                let served = served(&store, &as_of, &inputs, operator_id, merchant_id);
                let expected = batch_rows.get(&key).map(|row| {
                    let mut row = row.clone();
                    row[peer] = String::new();
                    row
                });
                assert_eq!(
                    served, expected,
                    "{key} served as of {date} ({knowledge_time:?})"
                );
            }
            if offset == 200 && knowledge_time.is_none() {
                sample = batch;
            }
        }
    }
    assert!(compared > 100, "only {compared} rows compared");
    // The district exercises the definitions: each of these is set for some merchant.
    for feature in [
        "growth_mom_30d",
        "trend_slope_26w",
        "daily_net_cv_90d",
        "top5_payer_share_90d",
        "rent_to_turnover_90d",
        "subsidy_sector",
        "peer_pct_net_90d",
    ] {
        let set = sample
            .iter()
            .filter(|b| b.column_by_name(feature).unwrap().null_count() < b.num_rows())
            .count();
        assert!(set > 0, "no merchant has {feature}");
    }
    assert!(
        rows_keyed(&sample, &["operator_id", "merchant_id"])
            .values()
            .any(|row| row[MERCHANT_FEATURES
                .schema
                .index_of("max_zero_streak_90d")
                .unwrap()]
                != "0"),
        "no merchant has a day without sales"
    );
}

/// A compaction of bronze between two refreshes rewrites the new rows into files that
/// read as no change: silver notices and recomputes instead of missing them (or failing
/// on files that are gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_between_refreshes_loses_no_new_row() {
    let dir = tempfile::tempdir().unwrap();
    let lake = lake_with(dir.path(), &steady()).await;
    let mut late = sale("late", "steady", 100_000, at(day(3), 15, 0), Some("p9"));
    late.ingested = chrono::Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let lake_after = bronze_with(dir.path(), &[late]).await;
    let compacted = lake_after
        .compact("pos_events", &[], None)
        .await
        .unwrap()
        .unwrap();
    assert!(compacted.files_removed > 0, "{compacted:?}");
    let report = refresh_silver(&lake, SilverMode::Incremental, &settings())
        .await
        .unwrap();
    assert!(report.history.versions_written > 0, "{report:?}");
    let later = AsOf {
        date: d(),
        knowledge_time: HistoryStore::load(
            &lake,
            DayRange { first: 0, last: 1 },
            DayRange { first: 0, last: 1 },
            None,
        )
        .await
        .unwrap()
        .horizon(),
    };
    let (batch, _) = compute_features(&lake, &later, &inputs()).await.unwrap();
    assert_eq!(value(&batch, "steady", "net_fen_7d"), "161600"); // 61,600 + 100,000
    let daily = lake
        .read_only_query(&format!(
            "SELECT sum(sales_fen) FROM merchant_daily WHERE business_date = DATE '{}'",
            day(3)
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        array_value_to_string(daily[0].column(0), 0).unwrap(),
        (100_000 + 8_800).to_string()
    );
}

/// Defect 8 of issue 20: a compaction (or Z-order) of bronze that changes no data costs
/// silver nothing: the next refresh reads no file, recomputes no day and writes no
/// version (it used to treat every rewritten file as new data and recompute it all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_alone_makes_silver_recompute_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lake = lake_with(dir.path(), &steady()).await;
    let mut late = sale("late", "steady", 100_000, at(day(3), 15, 0), Some("p9"));
    late.ingested = chrono::Utc::now();
    bronze_with(dir.path(), &[late]).await;
    refresh_silver(&lake, SilverMode::Incremental, &settings())
        .await
        .unwrap();
    let before = daily_rows(&lake).await;
    let compacted = lake
        .compact("pos_events", &[], None)
        .await
        .unwrap()
        .unwrap();
    assert!(compacted.files_removed > 1, "{compacted:?}");
    let report = refresh_silver(&lake, SilverMode::Incremental, &settings())
        .await
        .unwrap();
    assert_eq!(report.new_bronze_files, 0, "{report:?}");
    assert_eq!(report.days_rewritten, Some(0), "{report:?}");
    assert_eq!(report.rows_written, 0, "{report:?}");
    assert!(!report.history.rebuilt, "{report:?}");
    assert_eq!(report.history.days_computed, 0, "{report:?}");
    assert_eq!(report.history.versions_written, 0, "{report:?}");
    assert_eq!(daily_rows(&lake).await, before);
}

/// Defect 9 of issue 20: once the Delta log retention has removed the bronze commits
/// since silver's last refresh, the next refresh cannot diff them; it recomputes instead
/// of failing, and the result equals a full rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_after_the_log_lost_its_commits_recomputes_and_equals_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let lake = lake_with(dir.path(), &steady()).await;
    for (id, fen) in [("late-1", 100_000), ("late-2", 20_000)] {
        let mut late = sale(id, "steady", fen, at(day(3), 15, 0), Some("p9"));
        late.ingested = chrono::Utc::now();
        bronze_with(dir.path(), &[late]).await;
    }
    // A checkpoint at the newest version, then the log's older commits go, as the log
    // retention (`delta.logRetentionDuration`) removes them.
    let bronze = lake.open("pos_events").await.unwrap().unwrap();
    let newest = bronze.version().unwrap();
    streetflow_lake::deltalake::checkpoints::create_checkpoint(&bronze, None)
        .await
        .unwrap();
    for version in 0..newest {
        std::fs::remove_file(
            dir.path()
                .join("pos_events/_delta_log")
                .join(format!("{version:020}.json")),
        )
        .unwrap();
    }
    let report = refresh_silver(&lake, SilverMode::Incremental, &settings())
        .await
        .unwrap();
    assert_eq!(report.days_rewritten, None, "{report:?}");
    let incremental = daily_rows(&lake).await;
    refresh_silver(&lake, SilverMode::Full, &settings())
        .await
        .unwrap();
    assert_eq!(incremental, daily_rows(&lake).await);
    let sales: i64 = lake
        .read_only_query(&format!(
            "SELECT sum(sales_fen) FROM merchant_daily WHERE business_date = DATE '{}'",
            day(3)
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap()[0]
        .column(0)
        .as_any()
        .downcast_ref::<streetflow_lake::arrow::array::Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(sales, 100_000 + 20_000 + 8_800);
}

/// Every column of `merchant_features` is documented in a row of the table in
/// `schemas/merchant_features.md`, and every documented column exists.
#[test]
fn every_feature_column_is_documented() {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/merchant_features.md"),
    )
    .unwrap();
    // The first cell of each row names columns in backticks; `a_{7,30}d` stands for
    // `a_7d` and `a_30d`.
    let expand = |name: &str| -> Vec<String> {
        match (name.find('{'), name.find('}')) {
            (Some(open), Some(close)) => name[open + 1..close]
                .split(',')
                .map(|part| format!("{}{part}{}", &name[..open], &name[close + 1..]))
                .collect(),
            _ => vec![name.to_owned()],
        }
    };
    let documented: std::collections::BTreeSet<String> = doc
        .lines()
        .filter(|line| line.starts_with("| `"))
        .filter_map(|line| line.split('|').nth(1))
        .flat_map(|cell| {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .flat_map(expand)
                .collect::<Vec<_>>()
        })
        .collect();
    let columns: std::collections::BTreeSet<String> = MERCHANT_FEATURES
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let missing: Vec<_> = columns.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "undocumented feature columns: {missing:?}"
    );
    let stale: Vec<_> = documented.difference(&columns).collect();
    assert!(
        stale.is_empty(),
        "documented columns that do not exist: {stale:?}"
    );
}

/// A registry correction recorded after K (the shop's MCC, rent and opening date were
/// wrong all along) does not change the vector for (D, K); asked at a later K it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_correction_recorded_after_k_changes_nothing_at_k() {
    let dir = tempfile::tempdir().unwrap();
    let lake = lake_with(dir.path(), &steady()).await;
    let recorded = at(day(200), 9, 0);
    let corrected_at = at(d() + Days::new(3), 9, 0);
    let mut first = registry("steady", "5812", day(90), Some(300_000));
    first.recorded_at = Some(recorded);
    // The same version (same valid_from), corrected and recorded three days after D.
    let mut correction = registry("steady", "5814", day(200), Some(600_000));
    correction.valid_from = first.valid_from;
    correction.recorded_at = Some(corrected_at);
    let mut inputs = inputs();
    inputs.registry = vec![first, correction];
    let as_of = |k| AsOf {
        date: d(),
        knowledge_time: k,
    };
    let (at_k, _) = compute_features(&lake, &as_of(None), &inputs)
        .await
        .unwrap();
    assert_eq!(value(&at_k, "steady", "mcc"), "5812");
    // Opened D − 90 (2025-01-01): three whole months by 2025-04-01.
    assert_eq!(value(&at_k, "steady", "months_on_book"), "3");
    let rent_ratio = float(&at_k, "steady", "rent_to_turnover_90d");
    // Asked again (any time later), the same vector.
    let (again, _) = compute_features(&lake, &as_of(None), &inputs)
        .await
        .unwrap();
    assert_eq!(rows_by_merchant(&again), rows_by_merchant(&at_k));
    // As of a knowledge time after the correction, the corrected record.
    let (later, _) = compute_features(&lake, &as_of(Some(corrected_at)), &inputs)
        .await
        .unwrap();
    assert_eq!(value(&later, "steady", "mcc"), "5814");
    assert!(float(&later, "steady", "rent_to_turnover_90d") > rent_ratio * 1.9);
    // Opened D − 200 (2024-09-13) after all: six whole months.
    assert_eq!(value(&later, "steady", "months_on_book"), "6");
}

/// An observed load of a few pieces (about 170,000 lines) with the given settle time:
/// the lake, the load's outcome and the batches its sink received.
async fn observed_load(
    settle_ms: i64,
    dir: &std::path::Path,
) -> (
    Lake,
    streetflow_ingest::Result<streetflow_ingest::FileReport>,
    Vec<RecordBatch>,
) {
    let config = GenConfig {
        merchants: 120,
        days: 14,
        malformed_rate: 0.01,
        ..GenConfig::default()
    };
    let mut jsonl = Vec::new();
    generate(&config, &mut jsonl).unwrap();
    let events = dir.join("district.jsonl");
    std::fs::write(&events, &jsonl).unwrap();
    let lake = Lake::new(dir.join("lake").to_str().unwrap(), &Default::default()).unwrap();
    let mut pipeline = streetflow_core::PipelineConfig::defaults();
    // Set directly: the pipeline file refuses less than a second, a test may go lower.
    pipeline.knowledge.settle_ms = settle_ms;
    let (sender, mut receiver) = tokio::sync::mpsc::channel(4);
    let collected = tokio::spawn(async move {
        let mut batches = Vec::new();
        while let Some(batch) = receiver.recv().await {
            batches.push(batch);
        }
        batches
    });
    let options = BackfillOptions {
        config: pipeline,
        knowledge: KnowledgeTime::Observed,
        commit_every_lines: 10_000_000,
        bytes_read: None,
        committed_rows: Some(sender),
    };
    let report = backfill_file(&lake, &events, &options, &InputFormat::JsonLines).await;
    drop(options);
    (lake, report, collected.await.unwrap())
}

/// `(source_line, knowledge_time in µs)` of each row, sorted.
fn lines_and_stamps(batches: &[RecordBatch]) -> Vec<(i64, i64)> {
    use streetflow_lake::arrow::array::{AsArray, Int64Array};
    use streetflow_lake::arrow::datatypes::TimestampMicrosecondType;
    let mut rows = Vec::new();
    for batch in batches {
        let lines = batch.column_by_name("source_line").unwrap();
        let lines = lines.as_any().downcast_ref::<Int64Array>().unwrap();
        let stamps = batch
            .column_by_name("knowledge_time")
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        for i in 0..batch.num_rows() {
            rows.push((lines.value(i), stamps.value(i)));
        }
    }
    rows.sort_unstable();
    rows
}

/// The commit timestamps (ms) of the `pos_events` commits that added files.
fn data_commit_times(lake_dir: &std::path::Path) -> Vec<i64> {
    let log = lake_dir.join("lake/pos_events/_delta_log");
    let mut versions: Vec<_> = std::fs::read_dir(&log)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    versions.sort();
    let mut times = Vec::new();
    for version in versions {
        let text = std::fs::read_to_string(&version).unwrap();
        let actions: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        if actions.iter().any(|a| a.get("add").is_some()) {
            let info = actions.iter().find_map(|a| a.get("commitInfo")).unwrap();
            times.push(info["timestamp"].as_i64().unwrap());
        }
    }
    times
}

/// An observed load stamps each commit's rows once, before that commit and after the
/// one before (so a reader settled at any instant sees whole commits), commits early
/// when its stamp ages, and hands a caller exactly the rows it committed, stamps and
/// all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observed_load_commits_rows_stamped_between_its_commits_and_hands_them_on() {
    let dir = tempfile::tempdir().unwrap();
    // A deadline of 2 s: a debug build decodes the file in several times half of that.
    let (lake, report, received) = observed_load(4_000, dir.path()).await;
    let report = report.unwrap();
    assert!(
        report.accepted > 100_000 && report.dead_lettered > 0,
        "{report:?}"
    );
    assert_eq!(report.accepted + report.dead_lettered, report.lines);

    let stored = lake
        .read_only_query("SELECT source_line, knowledge_time, knowledge_source FROM pos_events")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let stored_rows = lines_and_stamps(&stored);
    assert_eq!(stored_rows.len() as u64, report.accepted);
    assert_eq!(
        lines_and_stamps(&received),
        stored_rows,
        "the sink got other rows"
    );
    for batch in &stored {
        for i in 0..batch.num_rows() {
            assert_eq!(
                array_value_to_string(batch.column(2), i).unwrap(),
                "observed"
            );
        }
    }

    let mut stamps: Vec<i64> = stored_rows.iter().map(|&(_, stamp)| stamp).collect();
    stamps.sort_unstable();
    stamps.dedup();
    let commits = data_commit_times(dir.path());
    assert_eq!(
        stamps.len(),
        commits.len(),
        "one stamp per commit: {stamps:?} {commits:?}"
    );
    // (The end-of-file record may come in a commit of its own, without files.)
    assert!(report.commits >= commits.len() as u64, "{report:?}");
    for (i, (&stamp, &commit)) in stamps.iter().zip(&commits).enumerate() {
        assert!(
            stamp / 1000 <= commit,
            "commit {i} stamped after it was made"
        );
        if let Some(&next) = stamps.get(i + 1) {
            assert!(
                commit <= next / 1000 + 1,
                "commit {i} stamped before the one before"
            );
        }
    }
}

/// A lake too slow for its knowledge deadline stops the load with an error that names
/// the setting, after a few attempts, instead of stamping and writing forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_cannot_meet_its_knowledge_deadline_stops_and_names_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    // A deadline of one millisecond: no piece of 65,536 rows is written that fast.
    let (lake, report, received) = observed_load(2, dir.path()).await;
    let error = report.unwrap_err().to_string();
    assert!(error.contains("knowledge.settle_ms"), "{error}");
    assert!(
        received.is_empty(),
        "rows handed on that were never committed"
    );
    let stored = lake.open(POS_EVENTS.name).await.unwrap();
    if let Some(table) = stored {
        let files = table.snapshot().unwrap().log_data().num_files();
        assert_eq!(files, 0, "rows committed past their deadline");
    }
}

/// Two runs for one as-of date at once (two schedulers, a retry over a slow one) leave
/// one vector per merchant: each replaces the date's rows on the snapshot it listed, and
/// the one that loses the race lists again and replaces the winner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_feature_runs_of_one_date_at_once_store_one_vector_per_merchant() {
    let dir = tempfile::tempdir().unwrap();
    let mut events = steady();
    events.extend(irregular());
    let lake = lake_with(dir.path(), &events).await;
    let as_of = AsOf {
        date: d(),
        knowledge_time: None,
    };
    let inputs = inputs();
    for round in 0..3 {
        let (first, second) = tokio::join!(
            streetflow_features::write_features(&lake, &as_of, &inputs),
            streetflow_features::write_features(&lake, &as_of, &inputs)
        );
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!(first.rows, second.rows);
        let stored = lake
            .read_only_query(&format!(
                "SELECT count(*) AS n, count(DISTINCT operator_id || '/' || merchant_id) AS merchants \
                 FROM merchant_features WHERE as_of_date = DATE '{}'",
                d()
            ))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let n = array_value_to_string(stored[0].column(0), 0).unwrap();
        let merchants = array_value_to_string(stored[0].column(1), 0).unwrap();
        assert_eq!(n, first.rows.to_string(), "round {round}");
        assert_eq!(n, merchants, "round {round}: a merchant stored twice");
    }
}

/// `merchant_daily` as text rows, in key order.
async fn daily_rows(lake: &Lake) -> Vec<String> {
    let batches = lake
        .read_only_query(
            "SELECT * FROM merchant_daily ORDER BY operator_id, business_date, merchant_id",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut rows = Vec::new();
    for batch in &batches {
        for i in 0..batch.num_rows() {
            let cells: Vec<String> = (0..batch.num_columns())
                .map(|c| array_value_to_string(batch.column(c), i).unwrap())
                .collect();
            rows.push(cells.join("|"));
        }
    }
    rows
}

/// An incremental refresh touches every day a new delivery changes: here a first
/// delivery of event x, known before the void that used its id, makes x a sale, so the
/// sale the void cancelled (on another day) counts again; and a bronze row delivered
/// twice byte for byte counts as a duplicate. The incremental rows equal a rebuild's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_refresh_equals_a_rebuild_when_a_delivery_replaces_a_void() {
    let dir = tempfile::tempdir().unwrap();
    let t = || sale("t", "m", 300, at(day(5), 11, 0), None);
    let s = sale("s", "m", 5_000, at(day(3), 15, 0), None);
    let x = claim("x", "void", 5_000, "s", at(day(2), 10, 0));
    let lake = lake_with(dir.path(), &[t(), s, x]).await;
    let before = daily_rows(&lake).await;
    assert!(
        before.iter().any(|r| r.contains("|m|0|0|0|0|1|")),
        "s voided at first: {before:?}"
    );
    // t's bronze row again, byte for byte (same line of the same file, same knowledge),
    // and x as the POS first sent it: a sale on an earlier day, known before the void.
    let first_x = sale("x", "m", 700, at(day(4), 9, 0), None);
    bronze_with(dir.path(), &[t(), first_x]).await;
    refresh_silver(&lake, SilverMode::Incremental, &settings())
        .await
        .unwrap();
    let incremental = daily_rows(&lake).await;
    refresh_silver(&lake, SilverMode::Full, &settings())
        .await
        .unwrap();
    let rebuilt = daily_rows(&lake).await;
    assert_eq!(incremental, rebuilt);
    assert!(
        rebuilt.iter().any(|r| r.contains("|m|1|5000|0|0|0|5000|")),
        "s counts again: {rebuilt:?}"
    );
}
