//! The generator against an independent reading of its own output.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{Datelike, NaiveDate, Timelike, Utc, Weekday};
use streetflow_core::{
    BusinessCalendar, Channel, DecodeOptions, EventKind, PosEvent, ReasonCode, decode,
};
use streetflow_synth::{GenConfig, Generated, TruthRow, generate};

fn run(config: &GenConfig) -> (Vec<u8>, Generated) {
    let mut bytes = Vec::new();
    let generated = generate(config, &mut bytes).unwrap();
    (bytes, generated)
}

fn small(seed: u64) -> GenConfig {
    GenConfig {
        seed,
        merchants: 24,
        days: 75,
        start: NaiveDate::from_ymd_opt(2025, 1, 10).unwrap(),
        ..GenConfig::default()
    }
}

fn faulty(seed: u64) -> GenConfig {
    GenConfig {
        duplicate_rate: 0.02,
        late_rate: 0.02,
        malformed_rate: 0.01,
        ..small(seed)
    }
}

/// JSON Lines as `streetflow validate` reads them: split on `\n`, a trailing `\r`
/// dropped, no phantom line after the final newline.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    body.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

fn decoded(bytes: &[u8]) -> Vec<PosEvent<'static>> {
    let now = Utc::now();
    lines(bytes)
        .filter_map(|l| decode(l, now, &DecodeOptions::default()).ok())
        .map(PosEvent::into_owned)
        .collect()
}

type DayKey = (String, String, NaiveDate);

fn day<'a>(
    days: &'a mut BTreeMap<DayKey, TruthRow>,
    op: &str,
    merchant: &str,
    date: NaiveDate,
) -> &'a mut TruthRow {
    days.entry((op.to_owned(), merchant.to_owned(), date))
        .or_insert_with(|| TruthRow {
            operator_id: op.to_owned(),
            merchant_id: merchant.to_owned(),
            business_date: date,
            sales_count: 0,
            sales_fen: 0,
            refund_count: 0,
            refund_fen: 0,
            void_count: 0,
            net_fen: 0,
            orphan_refund_count: 0,
            orphan_void_count: 0,
        })
}

/// Silver semantics, written independently of the generator: the first arrival of an
/// (operator, event_id) wins; a void cancels its sale on the sale's date; a refund is an
/// outflow on its own date; a reference to a sale not in the feed is an orphan.
fn recompute_truth(bytes: &[u8], calendar: &BusinessCalendar) -> Vec<TruthRow> {
    let mut seen = HashSet::new();
    let events: Vec<PosEvent<'static>> = decoded(bytes)
        .into_iter()
        .filter(|e| seen.insert((e.operator_id.to_string(), e.event_id.to_string())))
        .collect();
    let sales: HashMap<(String, String), &PosEvent<'static>> = events
        .iter()
        .filter(|e| e.kind == EventKind::Sale)
        .map(|e| ((e.operator_id.to_string(), e.event_id.to_string()), e))
        .collect();
    let mut days = BTreeMap::new();
    // Sales first, so a void that arrived before its (late) sale still finds it counted.
    let (sales_only, others): (Vec<_>, Vec<_>) =
        events.iter().partition(|e| e.kind == EventKind::Sale);
    for e in sales_only.into_iter().chain(others) {
        let op = e.operator_id.as_ref();
        let own_date = calendar.business_date(&e.occurred_at);
        let sale = e
            .ref_event_id
            .as_ref()
            .and_then(|r| sales.get(&(op.to_owned(), r.to_string())));
        match (e.kind, sale) {
            (EventKind::Sale, _) => {
                let r = day(&mut days, op, &e.merchant_id, own_date);
                r.sales_count += 1;
                r.sales_fen += e.amount_fen;
            }
            (EventKind::Refund, sale) => {
                let r = day(&mut days, op, &e.merchant_id, own_date);
                r.refund_count += 1;
                r.refund_fen += e.amount_fen;
                r.orphan_refund_count += u32::from(sale.is_none());
            }
            (EventKind::Void, Some(sale)) => {
                let sale_date = calendar.business_date(&sale.occurred_at);
                let r = day(&mut days, op, &sale.merchant_id, sale_date);
                r.sales_count -= 1;
                r.sales_fen -= sale.amount_fen;
                r.void_count += 1;
            }
            (EventKind::Void, None) => {
                day(&mut days, op, &e.merchant_id, own_date).orphan_void_count += 1
            }
        }
    }
    days.into_values()
        .map(|mut r| {
            r.net_fen = r.sales_fen - r.refund_fen;
            r
        })
        .collect()
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let (a, ga) = run(&faulty(11));
    let (b, gb) = run(&faulty(11));
    let (c, _) = run(&faulty(12));
    assert_eq!(a, b);
    assert_eq!(ga.truth, gb.truth);
    assert_ne!(a, c);
}

#[test]
fn truth_equals_an_independent_reading_of_the_output() {
    let config = faulty(3);
    let (bytes, generated) = run(&config);
    let recomputed = recompute_truth(&bytes, &config.calendar);
    assert_eq!(recomputed.len(), generated.truth.len());
    for (want, got) in generated.truth.iter().zip(&recomputed) {
        assert_eq!(want, got);
    }
    // The story has all its parts: refunds, voids, orphans, late and repeated delivery.
    let s = &generated.summary;
    assert!(
        s.refunds > 0 && s.voids > 0 && s.orphan_refunds > 0 && s.orphan_voids > 0,
        "{s:?}"
    );
    assert!(s.late > 0 && s.duplicates > 0);
}

#[test]
fn faults_change_delivery_not_the_district() {
    let (clean_bytes, clean) = run(&small(5));
    let (faulty_bytes, faulty_run) = run(&faulty(5));
    assert_eq!(clean.truth, faulty_run.truth);
    assert_eq!(clean.registry, faulty_run.registry);
    assert!(faulty_bytes.len() > clean_bytes.len());
    assert_eq!(
        clean.summary.unique_events,
        faulty_run.summary.unique_events
    );
}

#[test]
fn injected_faults_are_exactly_what_the_decoder_finds() {
    let config = GenConfig {
        malformed_rate: 0.05,
        ..faulty(9)
    };
    let (bytes, generated) = run(&config);
    let now = Utc::now();
    let mut accepted = 0u64;
    let mut rejected: BTreeMap<ReasonCode, u64> = BTreeMap::new();
    for line in lines(&bytes) {
        match decode(line, now, &DecodeOptions::default()) {
            Ok(_) => accepted += 1,
            Err(r) => *rejected.entry(r.reason).or_default() += 1,
        }
    }
    let s = &generated.summary;
    assert_eq!(rejected, s.malformed);
    assert_eq!(accepted, s.unique_events + s.duplicates);
    assert_eq!(accepted + s.malformed_total(), s.lines);
    // A mix of every reason code (oversized is rare by design, so check the rest).
    let missing: Vec<ReasonCode> = ReasonCode::all()
        .into_iter()
        .filter(|r| *r != ReasonCode::Oversized && !rejected.contains_key(r))
        .collect();
    assert!(missing.is_empty(), "never injected: {missing:?}");
}

#[test]
fn events_arrive_in_order_except_the_late_ones() {
    let config = faulty(4);
    let (bytes, generated) = run(&config);
    let events = decoded(&bytes);
    // A stream clock (the latest occurred_at so far) is what `produce` will use as the
    // arrival time; a late event is one far behind that clock.
    let mut clock = events[0].occurred_at.timestamp_millis();
    let mut behind_a_day = 0u64;
    for e in &events {
        let t = e.occurred_at.timestamp_millis();
        if t < clock - 86_400_000 {
            behind_a_day += 1;
        }
        clock = clock.max(t);
    }
    let late = generated.summary.late;
    assert!(
        behind_a_day > 0 && behind_a_day <= late + generated.summary.duplicates,
        "{behind_a_day} vs {late}"
    );
}

#[test]
fn archetypes_behave_like_their_story() {
    let config = GenConfig {
        merchants: 24,
        days: 365,
        start: NaiveDate::from_ymd_opt(2025, 1, 1).unwrap(),
        ..GenConfig::default()
    };
    let (bytes, generated) = run(&config);
    let events = decoded(&bytes);
    let archetype: HashMap<&str, &str> = generated
        .profiles
        .iter()
        .map(|p| (p.merchant_id.as_str(), p.archetype))
        .collect();
    let of = |kind: &str| -> Vec<&PosEvent<'static>> {
        events
            .iter()
            .filter(|e| e.kind == EventKind::Sale && archetype[e.merchant_id.as_ref()] == kind)
            .collect()
    };
    let cal = config.calendar;

    // Night bars sell after midnight.
    let bar = of("night_bar");
    assert!(
        bar.iter()
            .any(|e| cal.local_time(&e.occurred_at).hour() < 4)
    );

    // Declining merchants stop selling on their closing day.
    for p in generated
        .profiles
        .iter()
        .filter(|p| p.archetype == "declining")
    {
        let closes = p.closes_on.unwrap();
        let last = events
            .iter()
            .filter(|e| e.merchant_id == p.merchant_id && e.kind == EventKind::Sale)
            .map(|e| cal.business_date(&e.occurred_at))
            .max()
            .unwrap();
        assert!(
            last <= closes,
            "{} sold on {last} after closing {closes}",
            p.merchant_id
        );
    }

    // Pumping merchants take many round amounts once pumping starts.
    for p in generated
        .profiles
        .iter()
        .filter(|p| p.archetype == "pumping")
    {
        let from = p.pumping_from.unwrap();
        let share = |after: bool| {
            let sales: Vec<_> = events
                .iter()
                .filter(|e| e.merchant_id == p.merchant_id && e.kind == EventKind::Sale)
                .filter(|e| (cal.business_date(&e.occurred_at) >= from) == after)
                .collect();
            sales.iter().filter(|e| e.amount_fen % 10_000 == 0).count() as f64 / sales.len() as f64
        };
        assert!(
            share(true) > share(false) + 0.1,
            "{}: {} vs {}",
            p.merchant_id,
            share(true),
            share(false)
        );
    }

    // Boutiques sell more at weekends; everyone dips over the Spring Festival (2025-01-29).
    let boutique = of("boutique");
    let weekend = boutique
        .iter()
        .filter(|e| {
            matches!(
                cal.business_date(&e.occurred_at).weekday(),
                Weekday::Sat | Weekday::Sun
            )
        })
        .count() as f64;
    assert!(weekend / 2.0 > (boutique.len() as f64 - weekend) / 5.0);
    let on = |m: u32, d: u32| NaiveDate::from_ymd_opt(2025, m, d).unwrap();
    let festival = of("cafe")
        .iter()
        .filter(|e| {
            let d = cal.business_date(&e.occurred_at);
            d >= on(1, 29) && d <= on(2, 4)
        })
        .count();
    let march = of("cafe")
        .iter()
        .filter(|e| {
            let d = cal.business_date(&e.occurred_at);
            d >= on(3, 5) && d <= on(3, 11)
        })
        .count();
    assert!(festival * 2 < march, "festival {festival} vs march {march}");

    // WeChat and Alipay dominate; regulars come back.
    let all_sales: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::Sale)
        .collect();
    let qr = all_sales
        .iter()
        .filter(|e| matches!(e.channel, Channel::Wechat | Channel::Alipay))
        .count();
    assert!(qr as f64 / all_sales.len() as f64 > 0.75);
    let mut payer_visits: HashMap<&str, u32> = HashMap::new();
    for e in &all_sales {
        if let Some(p) = &e.payer_ref {
            *payer_visits.entry(p.as_ref()).or_default() += 1;
        }
    }
    // Share of visits made by payers seen more than once.
    let repeat_visits: u32 = payer_visits.values().filter(|&&n| n > 1).sum();
    let visits: u32 = payer_visits.values().sum();
    assert!(
        f64::from(repeat_visits) / f64::from(visits) > 0.2,
        "{repeat_visits} of {visits}"
    );
    // Registry covers every merchant, with a plausible MCC.
    assert_eq!(generated.registry.len(), 24);
    assert!(
        generated
            .registry
            .iter()
            .all(|r| r.mcc.len() == 4 && r.opened_on <= r.valid_from)
    );
    assert!(generated.registry.iter().all(|r| {
        r.lease_end
            .is_some_and(|end| end > r.opened_on && end > config.start)
    }));
}

#[test]
fn night_market_cutoff_moves_small_hours_to_the_previous_date() {
    let config = GenConfig {
        calendar: BusinessCalendar::parse("Asia/Shanghai", "04:00").unwrap(),
        ..small(21)
    };
    let (bytes, generated) = run(&config);
    let recomputed = recompute_truth(&bytes, &config.calendar);
    assert_eq!(recomputed, generated.truth);
    let default_cal = GenConfig { ..small(21) };
    let (_, midnight) = run(&default_cal);
    // Same events, different dates for the small hours: the daily rows differ.
    assert_ne!(midnight.truth, generated.truth);
}

#[test]
fn bad_settings_are_all_reported() {
    let config = GenConfig {
        merchants: 0,
        days: 0,
        duplicate_rate: 1.5,
        ..GenConfig::default()
    };
    let err = generate(&config, Vec::new()).unwrap_err().to_string();
    for expected in ["merchants", "days", "duplicate-rate"] {
        assert!(err.contains(expected), "{err}");
    }
}
