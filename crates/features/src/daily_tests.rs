//! The one-pass daily rows against the SQL definition they replace for silver.

use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use streetflow_core::OperatorCalendars;
use streetflow_core::tables::{MERCHANT_DAILY, POS_EVENTS};
use streetflow_ingest::{DeadLetterRows, EventRows, Origin, RowAppender};
use streetflow_lake::arrow::array::{
    ArrayRef, AsArray, Date32Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use streetflow_lake::arrow::compute::{
    SortColumn, cast, concat_batches, lexsort_to_indices, take_record_batch,
};
use streetflow_lake::arrow::datatypes::{DataType, Int32Type, Int64Type};
use streetflow_lake::arrow::util::pretty::pretty_format_batches;
use streetflow_lake::datafusion::prelude::SessionContext;
use streetflow_synth::{GenConfig, generate};

use super::{DailyBuilder, PayerWindow, payer_sales_schema};
use crate::relations::{mem_table, register_resolved};
use crate::sql;

/// One bronze row, with the fields the edge cases vary.
#[derive(Clone)]
struct Row {
    operator: &'static str,
    date: u32,
    event: &'static str,
    merchant: &'static str,
    terminal: Option<&'static str>,
    kind: &'static str,
    amount: i64,
    minute: i32,
    channel: &'static str,
    reference: Option<&'static str>,
    payer: Option<&'static str>,
    ingested_second: i64,
    partition: Option<i32>,
    offset: Option<i64>,
    file: Option<&'static str>,
    line: Option<i64>,
}

fn sale(event: &'static str, merchant: &'static str, amount: i64) -> Row {
    Row {
        operator: "silverfish",
        date: 1,
        event,
        merchant,
        terminal: Some("t1"),
        kind: "sale",
        amount,
        minute: 600,
        channel: "wechat",
        reference: None,
        payer: Some("p1"),
        ingested_second: 0,
        partition: Some(0),
        offset: None,
        file: None,
        line: None,
    }
}

fn claim(kind: &'static str, event: &'static str, names: Option<&'static str>) -> Row {
    Row {
        kind,
        reference: names,
        payer: None,
        ..sale(event, "m1", 500)
    }
}

fn day(n: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 3, n).unwrap_or_default()
}

fn bronze(rows: &[Row]) -> RecordBatch {
    let base = Utc.with_ymd_and_hms(2026, 3, 1, 2, 0, 0).unwrap();
    let micros = |row: &Row, plus: i64| {
        (base + Duration::days(i64::from(row.date) - 1) + Duration::minutes(plus))
            .timestamp_micros()
    };
    let text = |f: fn(&Row) -> &'static str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let optional = |f: fn(&Row) -> Option<&'static str>| -> ArrayRef {
        Arc::new(StringArray::from_iter(rows.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        text(|r| r.operator),
        Arc::new(Date32Array::from_iter_values(rows.iter().map(|r| {
            (day(r.date) - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() as i32
        }))),
        text(|r| r.event),
        text(|r| r.merchant),
        optional(|r| r.terminal),
        text(|r| r.kind),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.amount))),
        text(|_| "CNY"),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                rows.iter().map(|r| micros(r, i64::from(r.minute))),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|_| 28_800))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.minute))),
        text(|r| r.channel),
        optional(|r| r.reference),
        optional(|r| r.payer),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                rows.iter()
                    .map(|r| base.timestamp_micros() + r.ingested_second * 1_000_000),
            )
            .with_timezone("UTC"),
        ),
        text(|_| "asserted"),
        optional(|r| r.partition.map(|_| "pos")),
        Arc::new(Int32Array::from_iter(rows.iter().map(|r| r.partition))),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.offset))),
        Arc::new(
            TimestampMicrosecondArray::from_iter(rows.iter().map(|_| None::<i64>))
                .with_timezone("UTC"),
        ),
        optional(|_| None),
        optional(|r| r.file),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.line))),
        Arc::new(Date32Array::from_iter_values(rows.iter().map(|r| {
            streetflow_core::tables::month_of(
                (day(r.date) - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() as i32,
            )
        }))),
    ];
    RecordBatch::try_new(POS_EVENTS.schema.clone(), columns).unwrap()
}

/// `daily.sql` over the resolution steps, in `merchant_daily`'s types and row order.
async fn daily_by_sql(batches: &[RecordBatch]) -> String {
    text(&daily_rows_by_sql(batches).await)
}

/// The rows of `daily.sql` over the resolution steps of bronze `batches`, in
/// `merchant_daily`'s types, ordered by operator, date and merchant: the raw-event
/// reference the one-pass builders are held to.
pub(crate) async fn daily_rows_by_sql(batches: &[RecordBatch]) -> Vec<RecordBatch> {
    let ctx = SessionContext::new();
    mem_table(&ctx, "events", POS_EVENTS.schema.clone(), batches.to_vec()).unwrap();
    register_resolved(&ctx).await.unwrap();
    let query = format!("SELECT * FROM ({}) d ORDER BY 1, 2, 3", sql::DAILY);
    let rows = ctx.sql(&query).await.unwrap().collect().await.unwrap();
    rows.iter()
        .map(|batch| {
            let columns = MERCHANT_DAILY
                .schema
                .fields()
                .iter()
                .map(|field| {
                    cast(
                        batch.column_by_name(field.name()).unwrap(),
                        field.data_type(),
                    )
                    .unwrap()
                })
                .collect();
            RecordBatch::try_new(MERCHANT_DAILY.schema.clone(), columns).unwrap()
        })
        .collect()
}

/// Each (operator, date, merchant)'s live sales per payer key in bronze `batches`, by
/// the SQL resolution steps: the raw-event reference of the history's payer entries.
pub(crate) async fn payer_days_by_sql(
    batches: &[RecordBatch],
) -> std::collections::BTreeMap<(String, i32, String), Vec<(i64, i64, i64)>> {
    let ctx = SessionContext::new();
    mem_table(&ctx, "events", POS_EVENTS.schema.clone(), batches.to_vec()).unwrap();
    register_resolved(&ctx).await.unwrap();
    let rows = ctx
        .sql(
            "SELECT operator_id, CAST(business_date AS INT) AS day, merchant_id, payer_ref, \
             count(*) AS visits, sum(amount_fen) AS fen FROM resolved \
             WHERE kind = 'sale' AND NOT voided AND payer_ref IS NOT NULL \
             GROUP BY 1, 2, 3, 4",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut days: std::collections::BTreeMap<_, Vec<(i64, i64, i64)>> = Default::default();
    for batch in &rows {
        let strings = |i: usize| cast(batch.column(i), &DataType::Utf8).unwrap();
        let (operators, merchants, payers) = (strings(0), strings(2), strings(3));
        let (operators, merchants, payers) = (
            operators.as_string::<i32>(),
            merchants.as_string::<i32>(),
            payers.as_string::<i32>(),
        );
        let dates = cast(batch.column(1), &DataType::Int32).unwrap();
        let dates = dates.as_primitive::<Int32Type>();
        let visits = batch.column(4).as_primitive::<Int64Type>();
        let fen = batch.column(5).as_primitive::<Int64Type>();
        for row in 0..batch.num_rows() {
            days.entry((
                operators.value(row).to_owned(),
                dates.value(row),
                merchants.value(row).to_owned(),
            ))
            .or_default()
            .push((
                streetflow_core::payer_key(payers.value(row)),
                visits.value(row),
                fen.value(row),
            ));
        }
    }
    for payers in days.values_mut() {
        payers.sort_unstable();
    }
    days
}

/// `payer_sales.sql` over the resolution steps as of `as_of`, sorted, as text.
async fn payer_sales_by_sql(batches: &[RecordBatch], as_of: NaiveDate) -> String {
    let ctx = SessionContext::new();
    mem_table(&ctx, "events", POS_EVENTS.schema.clone(), batches.to_vec()).unwrap();
    register_resolved(&ctx).await.unwrap();
    ctx.sql(&format!(
        "CREATE VIEW params AS SELECT DATE '{as_of}' AS as_of_date"
    ))
    .await
    .unwrap();
    let query = format!("SELECT * FROM ({}) p ORDER BY 1, 2, 3", sql::PAYER_SALES);
    let rows = ctx.sql(&query).await.unwrap().collect().await.unwrap();
    let columns = ["operator_id", "merchant_id", "payer_ref", "visits", "fen"];
    let schema = payer_sales_schema();
    let conformed: Vec<RecordBatch> = rows
        .iter()
        .map(|batch| {
            let columns = schema
                .fields()
                .iter()
                .zip(columns)
                .map(|(field, name)| {
                    cast(batch.column_by_name(name).unwrap(), field.data_type()).unwrap()
                })
                .collect();
            RecordBatch::try_new(schema.clone(), columns).unwrap()
        })
        .collect();
    pretty_format_batches(&[concat_batches(&schema, &conformed).unwrap()])
        .unwrap()
        .to_string()
}

/// The builder's `payer_sales` for the 90 days before `as_of`, sorted, as text.
fn payer_sales_native(batches: &[RecordBatch], as_of: NaiveDate) -> String {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
    let until = (as_of - epoch).num_days() as i32;
    let mut builder = DailyBuilder::with_payer_window(PayerWindow {
        from: until - 90,
        until,
    });
    for batch in batches.iter().rev() {
        builder.push(batch).unwrap();
    }
    let (_, payers) = builder.finish_with_payer_sales(|_, _| true).unwrap();
    let schema = payer_sales_schema();
    let all = concat_batches(&schema, &payers).unwrap();
    let order = lexsort_to_indices(
        &[0, 1, 2].map(|i| SortColumn {
            values: all.column(i).clone(),
            options: None,
        }),
        None,
    )
    .unwrap();
    let sorted = take_record_batch(&all, &order).unwrap();
    pretty_format_batches(&[sorted]).unwrap().to_string()
}

pub(crate) fn text(batches: &[RecordBatch]) -> String {
    let all = concat_batches(&MERCHANT_DAILY.schema, batches).unwrap();
    pretty_format_batches(&[all]).unwrap().to_string()
}

fn daily_native(batches: &[RecordBatch]) -> String {
    let mut builder = DailyBuilder::new();
    // Pushed newest batch first: the first arrival must not depend on the scan order.
    for batch in batches.iter().rev() {
        builder.push(batch).unwrap();
    }
    text(&builder.finish(|_, _| true).unwrap())
}

fn edge_cases() -> Vec<Row> {
    vec![
        // A plain sale, and one delivered twice with the same content.
        sale("s1", "m1", 1_000),
        sale("s2", "m1", 2_000),
        Row {
            ingested_second: 5,
            ..sale("s2", "m1", 2_000)
        },
        // Three deliveries that disagree; the earliest arrival (not the first row) wins,
        // ties broken by partition, then offset.
        Row {
            ingested_second: 9,
            ..sale("s3", "m1", 9_999)
        },
        Row {
            ingested_second: 3,
            partition: Some(2),
            offset: Some(1),
            ..sale("s3", "m1", 3_000)
        },
        Row {
            ingested_second: 3,
            partition: Some(1),
            offset: Some(7),
            ..sale("s3", "m1", 3_100)
        },
        // Backfilled deliveries: file, then line; NULLs last.
        Row {
            ingested_second: 4,
            partition: None,
            file: Some("b.jsonl"),
            line: Some(1),
            ..sale("s4", "m2", 4_000)
        },
        Row {
            ingested_second: 4,
            partition: None,
            file: Some("a.jsonl"),
            line: Some(9),
            ..sale("s4", "m2", 4_100)
        },
        Row {
            ingested_second: 4,
            partition: None,
            file: None,
            line: None,
            ..sale("s4", "m2", 4_200)
        },
        // NULL and '' payer / terminal are the same content; '' is still a payer.
        Row {
            payer: Some(""),
            terminal: None,
            ..sale("s5", "m2", 5_000)
        },
        Row {
            payer: None,
            terminal: Some(""),
            ingested_second: 1,
            ..sale("s5", "m2", 5_000)
        },
        // A refund of a known sale, one of an unknown sale, one naming nothing.
        claim("refund", "r1", Some("s1")),
        claim("refund", "r2", Some("missing")),
        claim("refund", "r3", None),
        // A void on day 2 cancels a day-1 sale delivered twice (same merchant, same
        // amount, as the contract asks); the void has no row.
        Row {
            date: 2,
            amount: 2_000,
            ..claim("void", "v1", Some("s2"))
        },
        // An orphan void on its own day: that day has a row.
        Row {
            date: 3,
            ..claim("void", "v2", Some("nowhere"))
        },
        // A void of a refund: the refund stays; the void is an orphan.
        claim("void", "v3", Some("r1")),
        // An unknown kind: a claim that counts nowhere but is resolved.
        claim("adjustment", "x1", Some("s1")),
        // Night, round amounts, every channel, payer counts.
        Row {
            minute: 1_330,
            channel: "alipay",
            payer: Some("p2"),
            ..sale("s6", "m3", 20_000)
        },
        Row {
            minute: 100,
            channel: "cash",
            payer: Some("p2"),
            ..sale("s7", "m3", 7_001)
        },
        Row {
            channel: "unionpay_qr",
            ..sale("s8", "m3", 10)
        },
        Row {
            channel: "bank_card",
            payer: None,
            ..sale("s9", "m3", 11)
        },
        Row {
            channel: "other",
            ..sale("s10", "m3", 12)
        },
        Row {
            channel: "voucher",
            ..sale("s11", "m3", 13)
        },
        // A second operator with the same event ids: different events; its void cannot
        // reach the first operator's sale.
        Row {
            operator: "market-street",
            ..sale("s1", "m1", 777)
        },
        Row {
            operator: "market-street",
            ..claim("void", "v9", Some("s3"))
        },
        // A sale whose merchant differs between deliveries counts for the first arrival's
        // merchant only.
        Row {
            ingested_second: 2,
            ..sale("s12", "m4", 1_200)
        },
        Row {
            ingested_second: 1,
            ..sale("s12", "m5", 1_200)
        },
    ]
}

#[tokio::test]
async fn edge_cases_give_the_rows_of_the_sql_definition() {
    let rows = edge_cases();
    // Split so that deliveries of one event land in different batches.
    let batches = vec![bronze(&rows[..7]), bronze(&rows[7..])];
    let native = daily_native(&batches);
    assert_eq!(native, daily_by_sql(&batches).await);
    // The payer window: day 1 only (as of day 2), and days 1–3 (as of day 4).
    for as_of in [day(2), day(4)] {
        let payers = payer_sales_native(&batches, as_of);
        assert_eq!(payers, payer_sales_by_sql(&batches, as_of).await);
        let has = |expected: [&str; 5]| {
            payers.lines().any(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                cells.len() == 7 && cells[1..6] == expected
            })
        };
        // s4's first arrival (4,100 fen) and '' (s5) at m2; s1 and s3 (not the voided
        // s2) at m1; the second operator's own s1.
        assert!(has(["silverfish", "m2", "p1", "1", "4100"]), "{payers}");
        assert!(has(["silverfish", "m2", "", "1", "5000"]), "{payers}");
        assert!(has(["silverfish", "m1", "p1", "2", "4100"]), "{payers}");
        assert!(has(["market-street", "m1", "p1", "1", "777"]), "{payers}");
    }
    // A window that ends before the events has no payers.
    assert_eq!(payer_sales_native(&batches, day(1)).lines().count(), 4);
    // And a few values checked by hand, so that both cannot be wrong together unseen.
    let builder = {
        let mut b = DailyBuilder::new();
        for batch in &batches {
            b.push(batch).unwrap();
        }
        b
    };
    let daily = concat_batches(
        &MERCHANT_DAILY.schema,
        &builder.finish(|_, _| true).unwrap(),
    )
    .unwrap();
    let find = |operator: &str, date: u32, merchant: &str| -> usize {
        let operators = daily
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let dates = daily
            .column(1)
            .as_any()
            .downcast_ref::<Date32Array>()
            .unwrap();
        let merchants = daily
            .column(2)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let date = (day(date) - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() as i32;
        (0..daily.num_rows())
            .find(|&i| {
                operators.value(i) == operator
                    && dates.value(i) == date
                    && merchants.value(i) == merchant
            })
            .unwrap_or_else(|| panic!("no row for {operator} {date} {merchant}"))
    };
    let value = |row: usize, column: &str| -> i64 {
        daily
            .column_by_name(column)
            .unwrap()
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(row)
    };
    let m1 = find("silverfish", 1, "m1");
    // s1 + s3 (first arrival: second 3, partition 1); s2 voided; refunds of 500 each.
    assert_eq!(value(m1, "sales_fen"), 1_000 + 3_100);
    assert_eq!(value(m1, "void_count"), 1);
    assert_eq!(value(m1, "refund_count"), 3);
    assert_eq!(value(m1, "orphan_refund_count"), 2);
    assert_eq!(value(m1, "orphan_void_count"), 1);
    assert_eq!(value(m1, "duplicate_deliveries"), 1 + 2);
    assert_eq!(value(m1, "conflicting_events"), 1);
    let m2 = find("silverfish", 1, "m2");
    assert_eq!(value(m2, "sales_fen"), 4_100 + 5_000);
    assert_eq!(value(m2, "conflicting_events"), 1);
    // p1 (s4) and '' (s5).
    assert_eq!(value(m2, "distinct_payers"), 2);
    let m3 = find("silverfish", 1, "m3");
    assert_eq!(value(m3, "night_sales_count"), 2);
    assert_eq!(value(m3, "round_sales_fen"), 20_000);
    assert_eq!(value(m3, "distinct_payers"), 2);
    assert_eq!(value(find("silverfish", 3, "m1"), "orphan_void_count"), 1);
    assert_eq!(value(find("silverfish", 1, "m5"), "sales_fen"), 1_200);
    assert_eq!(
        value(find("market-street", 1, "m1"), "orphan_void_count"),
        1
    );
}

/// Bronze batches of a generated district of `operators` operators with duplicates, late
/// events and malformed lines (rejected), in batches of about 500 rows.
pub(crate) fn district(operators: u32) -> Vec<RecordBatch> {
    let config = GenConfig {
        merchants: 12,
        days: 45,
        operators,
        duplicate_rate: 0.05,
        late_rate: 0.05,
        malformed_rate: 0.01,
        ..GenConfig::default()
    };
    let mut lines = Vec::new();
    generate(&config, &mut lines).unwrap();
    let mut appender = RowAppender::new(Default::default(), OperatorCalendars::default());
    let base: DateTime<Utc> = Utc.with_ymd_and_hms(2025, 3, 1, 0, 0, 0).unwrap();
    let mut batches = Vec::new();
    let (mut rows, mut dead) = (EventRows::default(), DeadLetterRows::default());
    for (i, line) in lines.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let i = i as i64;
        // Coarse arrival times, so that ties fall to partition and offset.
        let origin = if i % 5 == 0 {
            Origin::File {
                path: "export.jsonl",
                line: i + 1,
            }
        } else {
            Origin::Kafka {
                topic: "pos",
                partition: (i % 3) as i32,
                offset: i,
                timestamp: None,
            }
        };
        let ingested = base + Duration::seconds(i / 4);
        appender.append(
            &mut rows,
            &mut dead,
            Some(line),
            None,
            ingested,
            streetflow_core::Knowledge::Asserted(ingested),
            origin,
            false,
        );
        if rows.len() >= 500 {
            batches.push(rows.finish(chrono::Utc::now()).unwrap());
        }
    }
    batches.push(rows.finish(chrono::Utc::now()).unwrap());
    assert!(
        !dead.is_empty(),
        "the generator's malformed lines are rejected"
    );
    batches
}

#[tokio::test]
async fn a_generated_district_with_faults_gives_the_rows_of_the_sql_definition() {
    let batches = district(2);
    let native = daily_native(&batches);
    assert!(native.lines().count() > 100, "a district's worth of days");
    assert_eq!(native, daily_by_sql(&batches).await);
    // Payers of the last 90 days, and of a window that ends mid-history.
    for as_of in [
        NaiveDate::from_ymd_opt(2025, 2, 15).unwrap(),
        NaiveDate::from_ymd_opt(2025, 1, 20).unwrap(),
    ] {
        let payers = payer_sales_native(&batches, as_of);
        assert!(payers.lines().count() > 50, "payers as of {as_of}");
        assert_eq!(payers, payer_sales_by_sql(&batches, as_of).await);
    }
}
