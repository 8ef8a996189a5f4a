//! Every version of the history against the raw-event reference (the SQL definition over
//! the events the lake knew at K), at many knowledge times, on a generated district with
//! late events, late voids, voids before their sales, conflicting and replayed
//! deliveries.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use streetflow_core::tables::{MERCHANT_DAILY, MERCHANT_DAILY_HISTORY};
use streetflow_core::{Knowledge, OperatorCalendars};
use streetflow_ingest::{DeadLetterRows, EventRows, Origin, RowAppender};
use streetflow_lake::arrow::array::{Array, AsArray, BooleanArray, RecordBatch, UInt32Array};
use streetflow_lake::arrow::compute::kernels::cmp;
use streetflow_lake::arrow::compute::{
    SortColumn, concat_batches, filter_record_batch, lexsort_to_indices, take_record_batch,
};
use streetflow_lake::arrow::datatypes::{Date32Type, Int64Type, TimestampMicrosecondType};
use streetflow_synth::{GenConfig, generate};

use super::{HistorySpec, runs_of_similar_weight};
use crate::daily::DailyBuilder;
use crate::daily::tests::{daily_rows_by_sql, payer_days_by_sql, text};
use crate::history::day_end;

/// A generated district as a stream would deliver it: each line known at the latest
/// `occurred_at` so far (its arrival order), plus deliveries the generator does not
/// make: conflicting re-deliveries a day later, voids that arrive two days after their
/// sale's day ended, and a delivery of a sale that the lake learns of before its first
/// copy (an earlier knowledge time, later in the file). Returns the bronze batches and
/// the knowledge times of the extra deliveries.
fn streamed_district() -> (Vec<RecordBatch>, Vec<i64>) {
    let config = GenConfig {
        merchants: 6,
        days: 24,
        operators: 2,
        duplicate_rate: 0.05,
        late_rate: 0.08,
        start: NaiveDate::from_ymd_opt(2025, 3, 1).unwrap(),
        ..GenConfig::default()
    };
    let mut lines = Vec::new();
    generate(&config, &mut lines).unwrap();
    let mut appender = RowAppender::new(Default::default(), OperatorCalendars::default());
    let (mut rows, mut dead) = (EventRows::default(), DeadLetterRows::default());
    let mut clock: i64 = 0;
    let mut extra = Vec::new();
    let mut offset = 0_i64;
    let mut append = |rows: &mut EventRows, line: &str, known: i64| {
        offset += 1;
        let at = DateTime::from_timestamp_micros(known).unwrap();
        appender.append(
            rows,
            &mut dead,
            Some(line.as_bytes()),
            None,
            at,
            Knowledge::Asserted(at),
            Origin::Kafka {
                topic: "pos",
                partition: (offset % 3) as i32,
                offset,
                timestamp: None,
            },
            false,
        );
    };
    let mut sales = 0;
    for line in std::str::from_utf8(&lines).unwrap().lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        let occurred = DateTime::parse_from_rfc3339(value["occurred_at"].as_str().unwrap())
            .unwrap()
            .timestamp_micros();
        // Stream-like knowledge, in coarse steps so that ties fall to partition and offset.
        clock = clock.max(occurred + 2_000_000) / 5_000_000 * 5_000_000;
        append(&mut rows, line, clock);
        if value["kind"] != "sale" {
            continue;
        }
        sales += 1;
        if sales % 37 == 0 {
            // A re-delivery with another amount, a day later.
            let mut changed = value.clone();
            changed["amount_fen"] = (value["amount_fen"].as_i64().unwrap() + 100).into();
            let known = clock + Duration::hours(26).num_microseconds().unwrap();
            append(&mut rows, &changed.to_string(), known);
            extra.push(known);
        }
        if sales % 53 == 0 {
            // A void that arrives two days after its sale's day.
            let void = serde_json::json!({
                "event_id": format!("late-void-{sales}"),
                "operator_id": value["operator_id"], "merchant_id": value["merchant_id"],
                "kind": "void", "amount_fen": value["amount_fen"], "currency": "CNY",
                "occurred_at": value["occurred_at"], "channel": value["channel"],
                "ref_event_id": value["event_id"],
            });
            let known = clock + Duration::hours(60).num_microseconds().unwrap();
            append(&mut rows, &void.to_string(), known);
            extra.push(known);
        }
        if sales % 71 == 0 {
            // The same sale through another path the lake heard of a moment earlier,
            // on another terminal: the first arrival moves and the content conflicts.
            let mut other = value.clone();
            other["terminal_id"] = "replay".into();
            append(&mut rows, &other.to_string(), clock - 1);
        }
    }
    // A sale at 23:58 that reaches the lake three days late, and its void at 00:03 the
    // next day, on time: the void's day has a row (an orphan void) until the sale is
    // known, then none.
    let sale_at = Utc.with_ymd_and_hms(2025, 3, 10, 15, 58, 0).unwrap();
    let void_at = sale_at + Duration::minutes(5);
    let line = |id: &str, kind: &str, at: DateTime<Utc>, reference: Option<&str>| {
        let mut event = serde_json::json!({
            "event_id": id, "operator_id": "silverfish-lane", "merchant_id": "night-owl",
            "kind": kind, "amount_fen": 8_800, "currency": "CNY", "channel": "cash",
            "occurred_at": at.with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap()).to_rfc3339(),
        });
        if let Some(reference) = reference {
            event["ref_event_id"] = reference.into();
        }
        event.to_string()
    };
    let sale_known = (sale_at + Duration::days(3)).timestamp_micros();
    append(
        &mut rows,
        &line("owl-sale", "sale", sale_at, None),
        sale_known,
    );
    append(
        &mut rows,
        &line("owl-void", "void", void_at, Some("owl-sale")),
        (void_at + Duration::seconds(3)).timestamp_micros(),
    );
    extra.push(sale_known);
    assert!(dead.is_empty(), "a clean district has no rejects");
    // In arrival-unrelated pieces: the builder must not depend on the order it is fed.
    let all = rows.finish(Utc::now()).unwrap();
    let batches = (0..all.num_rows())
        .step_by(700)
        .rev()
        .map(|start| all.slice(start, 700.min(all.num_rows() - start)))
        .collect();
    (batches, extra)
}

fn calendars() -> OperatorCalendars {
    OperatorCalendars::default()
}

fn history(batches: &[RecordBatch], after: Option<i64>, horizon: i64) -> Vec<RecordBatch> {
    let mut builder = DailyBuilder::new();
    for batch in batches {
        builder.push(batch).unwrap();
    }
    let calendars = calendars();
    let end = |operator: &str, date: i32| day_end(&calendars, operator, date);
    builder
        .finish_history(&HistorySpec {
            after,
            horizon,
            day_end: &end,
            keep: &|_, _| true,
        })
        .unwrap()
}

/// The bronze rows known at `k`.
fn known_at(batches: &[RecordBatch], k: i64) -> Vec<RecordBatch> {
    batches
        .iter()
        .map(|batch| {
            let known = batch
                .column_by_name("knowledge_time")
                .unwrap()
                .as_primitive::<TimestampMicrosecondType>()
                .clone()
                .with_timezone_opt(None::<String>);
            let mask = cmp::lt_eq(
                &known,
                &streetflow_lake::arrow::array::TimestampMicrosecondArray::new_scalar(k),
            )
            .unwrap();
            filter_record_batch(batch, &mask).unwrap()
        })
        .collect()
}

/// The history as of `k`: each key's latest version known by `k`, retractions dropped,
/// in `merchant_daily`'s columns and order, and each key's payer entries.
#[allow(clippy::type_complexity)]
fn as_of(
    history: &[RecordBatch],
    k: i64,
) -> (
    RecordBatch,
    BTreeMap<(String, i32, String), Vec<(i64, i64, i64)>>,
) {
    let all = concat_batches(&MERCHANT_DAILY_HISTORY.schema, history).unwrap();
    let operators = all
        .column_by_name("operator_id")
        .unwrap()
        .as_string::<i32>();
    let merchants = all
        .column_by_name("merchant_id")
        .unwrap()
        .as_string::<i32>();
    let dates = all
        .column_by_name("business_date")
        .unwrap()
        .as_primitive::<Date32Type>();
    let known = all
        .column_by_name("known_from")
        .unwrap()
        .as_primitive::<TimestampMicrosecondType>();
    let retracted = all.column_by_name("retracted").unwrap().as_boolean();
    let mut latest: HashMap<(&str, i32, &str), (i64, usize)> = HashMap::new();
    for row in 0..all.num_rows() {
        if known.value(row) > k {
            continue;
        }
        let key = (operators.value(row), dates.value(row), merchants.value(row));
        let entry = latest.entry(key).or_insert((i64::MIN, row));
        assert_ne!(
            entry.0,
            known.value(row),
            "two versions of {key:?} at one instant"
        );
        if known.value(row) > entry.0 {
            *entry = (known.value(row), row);
        }
    }
    let picks: UInt32Array = latest
        .values()
        .filter(|(_, row)| !retracted.value(*row))
        .map(|(_, row)| *row as u32)
        .collect();
    let picked = take_record_batch(&all, &picks).unwrap();
    let columns = MERCHANT_DAILY
        .schema
        .fields()
        .iter()
        .map(|f| picked.column_by_name(f.name()).unwrap().clone())
        .collect();
    let daily = RecordBatch::try_new(MERCHANT_DAILY.schema.clone(), columns).unwrap();
    let order = lexsort_to_indices(
        &[0, 1, 2].map(|i| SortColumn {
            values: daily.column(i).clone(),
            options: None,
        }),
        None,
    )
    .unwrap();
    let daily = take_record_batch(&daily, &order).unwrap();

    let mut payers = BTreeMap::new();
    let lists = picked.column_by_name("payers").unwrap().as_list::<i32>();
    let (p_operators, p_merchants, p_dates) = (
        picked
            .column_by_name("operator_id")
            .unwrap()
            .as_string::<i32>(),
        picked
            .column_by_name("merchant_id")
            .unwrap()
            .as_string::<i32>(),
        picked
            .column_by_name("business_date")
            .unwrap()
            .as_primitive::<Date32Type>(),
    );
    for row in 0..picked.num_rows() {
        let entries = lists.value(row);
        let entries = entries.as_struct();
        let column = |i: usize| entries.column(i).as_primitive::<Int64Type>().clone();
        let (keys, visits, fen) = (column(0), column(1), column(2));
        let list: Vec<(i64, i64, i64)> = (0..entries.len())
            .map(|i| (keys.value(i), visits.value(i), fen.value(i)))
            .collect();
        if !list.is_empty() {
            payers.insert(
                (
                    p_operators.value(row).to_owned(),
                    p_dates.value(row),
                    p_merchants.value(row).to_owned(),
                ),
                list,
            );
        }
    }
    (daily, payers)
}

/// The reference rows at `k`, of the days over by then.
fn closed_by(reference: &[RecordBatch], k: i64) -> RecordBatch {
    let all = concat_batches(&MERCHANT_DAILY.schema, reference).unwrap();
    let calendars = calendars();
    let operators = all.column(0).as_string::<i32>();
    let dates = all.column(1).as_primitive::<Date32Type>();
    let mask: BooleanArray = (0..all.num_rows())
        .map(|row| Some(day_end(&calendars, operators.value(row), dates.value(row)) <= k))
        .collect();
    filter_record_batch(&all, &mask).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_equals_the_raw_event_reference_at_every_knowledge_time() {
    let (batches, extra) = streamed_district();
    let start = Utc
        .with_ymd_and_hms(2025, 2, 28, 16, 0, 0)
        .unwrap()
        .timestamp_micros();
    let day = Duration::days(1).num_microseconds().unwrap();
    let horizon = start + 40 * day;
    let history = history(&batches, None, horizon);
    let versions: usize = history.iter().map(RecordBatch::num_rows).sum();

    // Knowledge times: every day's end, a moment before and after some of them, the
    // extra deliveries' own instants and a moment before each.
    let mut instants: Vec<i64> = (1..40).step_by(2).map(|n| start + n * day).collect();
    instants.extend((3..30).step_by(4).map(|n| start + n * day - 1));
    instants.extend((5..30).step_by(6).map(|n| start + n * day + 3_600_000_000));
    for &k in extra.iter().step_by(4) {
        instants.extend([k - 1, k]);
    }
    instants.sort_unstable();
    instants.dedup();
    let mut compared = 0;
    for &k in &instants {
        let known = known_at(&batches, k);
        let reference = closed_by(&daily_rows_by_sql(&known).await, k);
        let (daily, payers) = as_of(&history, k);
        assert_eq!(
            text(std::slice::from_ref(&daily)),
            text(&[reference]),
            "the rows as of {}",
            DateTime::from_timestamp_micros(k).unwrap()
        );
        let expected: BTreeMap<_, _> = payer_days_by_sql(&known)
            .await
            .into_iter()
            .filter(|((operator, date, _), _)| day_end(&calendars(), operator, *date) <= k)
            .collect();
        assert_eq!(payers, expected, "payers as of {k}");
        compared += daily.num_rows();
    }
    // The district must exercise what the history is for.
    assert!(compared > 1_000, "{compared} rows compared");
    let all = concat_batches(&MERCHANT_DAILY_HISTORY.schema, &history).unwrap();
    let keys: std::collections::HashSet<String> = (0..all.num_rows())
        .map(|row| {
            format!(
                "{}/{}/{}",
                all.column(0).as_string::<i32>().value(row),
                all.column(2).as_primitive::<Date32Type>().value(row),
                all.column(3).as_string::<i32>().value(row)
            )
        })
        .collect();
    assert!(
        versions > keys.len() + 20,
        "late data gives later versions: {versions} versions of {} rows",
        keys.len()
    );
    assert!(
        all.column_by_name("retracted")
            .unwrap()
            .as_boolean()
            .true_count()
            > 0,
        "an orphan void's row retracted once its sale arrived"
    );
}

#[test]
fn versions_after_a_horizon_continue_those_before_it() {
    let (batches, _) = streamed_district();
    let start = Utc
        .with_ymd_and_hms(2025, 3, 1, 0, 0, 0)
        .unwrap()
        .timestamp_micros();
    let day = Duration::days(1).num_microseconds().unwrap();
    let whole = text_of(&history(&batches, None, start + 40 * day));
    // The same versions computed in steps (as refreshes append them).
    let mut steps = Vec::new();
    let mut after = None;
    for horizon in [
        start + 5 * day,
        start + 12 * day + 7,
        start + 20 * day,
        start + 40 * day,
    ] {
        steps.extend(history(&batches, after, horizon));
        after = Some(horizon);
    }
    assert_eq!(text_of(&steps), whole);
}

/// All rows of history batches, sorted by key and knowledge time, as text.
fn text_of(batches: &[RecordBatch]) -> String {
    let all = concat_batches(&MERCHANT_DAILY_HISTORY.schema, batches).unwrap();
    let order = lexsort_to_indices(
        &[0, 3, 2, 4].map(|i| SortColumn {
            values: all.column(i).clone(),
            options: None,
        }),
        None,
    )
    .unwrap();
    streetflow_lake::arrow::util::pretty::pretty_format_batches(&[
        take_record_batch(&all, &order).unwrap()
    ])
    .unwrap()
    .to_string()
}

#[test]
fn rows_are_cut_into_runs_of_similar_weight_in_order() {
    let items: Vec<u32> = (0..10).collect();
    let weight = |item: u32| if item == 3 { 50 } else { 5 };
    for parts in 1..=12 {
        let runs = runs_of_similar_weight(&items, parts, weight);
        assert!(!runs.is_empty() && runs.len() <= parts, "{parts}: {runs:?}");
        let joined: Vec<u32> = runs.concat();
        assert_eq!(joined, items, "{parts} parts keep every row, in order");
        assert!(runs.iter().all(|run| !run.is_empty()), "{parts}: {runs:?}");
    }
    // Two parts of a total of 95: the heavy row closes the first run.
    assert_eq!(
        runs_of_similar_weight(&items, 2, weight),
        vec![&items[..4], &items[4..]]
    );
    assert_eq!(
        runs_of_similar_weight(&[] as &[u32], 3, weight).concat(),
        Vec::<u32>::new()
    );
}
