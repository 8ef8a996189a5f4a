//! `streetflow backfill`: files into bronze and silver, the same rows as streaming, and
//! exactly once across crashes and re-runs.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn backfill_args(lake: &Path, input: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "backfill",
        "--lake",
        lake.to_str().unwrap(),
        "--input",
        input,
        "--json",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

fn faulty_district(dir: &Path, merchants: &str, days: &str) -> serde_json::Value {
    generate(
        dir,
        &[
            "--merchants",
            merchants,
            "--days",
            days,
            "--seed",
            "29",
            "--truth",
            "truth.csv",
            "--duplicate-rate",
            "0.02",
            "--late-rate",
            "0.02",
            "--malformed-rate",
            "0.01",
        ],
    )
}

/// Every bronze row with its file coordinates, in a stable order.
fn bronze_rows(lake: &Path) -> (String, String) {
    (
        sql_table(
            lake,
            "SELECT source_file, source_line, operator_id, business_date, event_id, merchant_id, kind, amount_fen, \
             occurred_at, channel, ref_event_id, payer_ref, knowledge_time, knowledge_source FROM pos_events ORDER BY source_line",
        ),
        // `ingested_at` of a dead letter is the loader's clock when it read the line.
        sql_table(
            lake,
            "SELECT source_file, source_line, operator_id, reason, detail, payload \
             FROM dead_letters ORDER BY source_line",
        ),
    )
}

#[test]
fn a_backfill_killed_at_each_commit_resumes_to_the_truth_and_a_rerun_adds_nothing() {
    let (_guard, dir) = workdir();
    let summary = faulty_district(&dir, "10", "45");
    let lines = summary["lines"].as_i64().unwrap();
    let truth = std::fs::read_to_string(dir.join("truth.csv")).unwrap();
    let knowledge = ["--knowledge-time", "2026-01-01T00:00:00+08:00"];

    // Reference: one uninterrupted load.
    let reference = dir.join("reference-lake");
    let report = run_json(
        &dir,
        &backfill_args(&reference, "events.jsonl", &knowledge)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        report["accepted"].as_i64().unwrap() + report["dead_lettered"].as_i64().unwrap(),
        lines
    );
    assert_eq!(silver_as_truth(&dir, &reference), truth);

    // Killed right after a dead-letter commit (before its events), then right after an
    // events commit, then finished: the same rows, none twice.
    let crashed = dir.join("crashed-lake");
    let mut chunked = knowledge.to_vec();
    chunked.extend(["--commit-every", "7000"]);
    for point in ["dead_letters_committed:2", "events_committed:3"] {
        let mut worker = Worker::start(
            &dir,
            &backfill_args(&crashed, "events.jsonl", &chunked),
            &[("STREETFLOW_FREEZE_AT", point)],
        );
        worker.wait_for("FROZEN AT", Duration::from_secs(120));
        worker.kill();
    }
    let resumed = run_json(
        &dir,
        &backfill_args(&crashed, "events.jsonl", &chunked)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(resumed["files"][0]["resumed_after_line"].as_i64().unwrap() >= 3 * 7000);
    assert_eq!(bronze_rows(&crashed), bronze_rows(&reference));
    assert_eq!(
        row_count(&crashed, "pos_events") + row_count(&crashed, "dead_letters"),
        lines
    );
    assert_eq!(silver_as_truth(&dir, &crashed), truth);

    // The same file again, under another name: recognised by content, nothing added.
    std::fs::copy(dir.join("events.jsonl"), dir.join("copy.jsonl")).unwrap();
    let rerun = run_json(
        &dir,
        &backfill_args(&crashed, "copy.jsonl", &chunked)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(rerun["files"][0]["already_loaded"], true);
    assert_eq!(rerun["accepted"], 0);
    assert_eq!(
        row_count(&crashed, "pos_events") + row_count(&crashed, "dead_letters"),
        lines
    );
}

#[test]
fn gzip_folders_and_csv_exports_load_through_the_same_decoder() {
    let (_guard, dir) = workdir();
    let summary = faulty_district(&dir, "6", "30");
    let lines = summary["lines"].as_i64().unwrap();
    let truth = std::fs::read_to_string(dir.join("truth.csv")).unwrap();

    // A folder holding the export split in two, gzipped.
    // (split on bytes: the malformed lines include invalid UTF-8)
    let bytes = std::fs::read(dir.join("events.jsonl")).unwrap();
    let mut middle = bytes.len() / 2;
    while bytes[middle - 1] != b'\n' {
        middle += 1;
    }
    let (first, second) = bytes.split_at(middle);
    std::fs::create_dir_all(dir.join("exports/2025")).unwrap();
    for (name, part) in [("a.jsonl.gz", first), ("b.jsonl.gz", second)] {
        let file = std::fs::File::create(dir.join("exports/2025").join(name)).unwrap();
        let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, part).unwrap();
        encoder.finish().unwrap();
    }
    std::fs::write(dir.join("exports/README.txt"), "not an export").unwrap();
    let lake = dir.join("lake");
    let report = run_json(
        &dir,
        &backfill_args(&lake, "exports", &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(report["files"].as_array().unwrap().len(), 2);
    assert_eq!(
        report["accepted"].as_i64().unwrap() + report["dead_lettered"].as_i64().unwrap(),
        lines
    );
    assert_eq!(silver_as_truth(&dir, &lake), truth);

    // A CSV export in yuan and local time, with the operator's own codes.
    std::fs::write(
        dir.join("mapping.toml"),
        r#"
amount_unit = "yuan"
timezone = "Asia/Shanghai"
[columns]
event_id = "txn"
merchant_id = "shop"
occurred_at = "time"
amount = "amount"
kind = "type"
channel = "pay"
ref_event_id = "orig"
[constants]
operator_id = "csv-lane"
currency = "CNY"
[values.kind]
S = "sale"
R = "refund"
V = "void"
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("shop.csv"),
        "txn,shop,time,amount,type,pay,orig\n\
         c1,m1,2025-03-01 12:00:00,12.50,S,wechat,\n\
         c2,m1,2025-03-01 13:00:00,100,S,cash,\n\
         c3,m1,2025-03-01 23:30:00,3.5,R,cash,c2\n\
         c4,m1,2025-03-02 00:10:00,8,S,alipay,\n\
         c5,m1,2025-03-02 09:00:00,8,V,alipay,c4\n\
         c6,m1,2025-03-02 10:00:00,1.234,S,cash,\n\
         c7,m1,2025-03-02 10:00:00,5,X,cash,\n\
         c1,m1,2025-03-01 12:00:00,12.50,S,wechat,\n",
    )
    .unwrap();
    let csv_lake = dir.join("csv-lake");
    let report = run_json(
        &dir,
        &backfill_args(&csv_lake, "shop.csv", &["--csv-mapping", "mapping.toml"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(report["accepted"], 6);
    assert_eq!(report["dead_lettered"], 2);
    assert_eq!(
        sql_table(
            &csv_lake,
            "SELECT business_date, sales_count, sales_fen, refund_fen, void_count, net_fen, duplicate_deliveries \
             FROM merchant_daily ORDER BY business_date"
        ),
        sql_table(
            &csv_lake,
            "SELECT * FROM (VALUES (DATE '2025-03-01', 2, 11250, 350, 0, 10900, 1), \
             (DATE '2025-03-02', 0, 0, 0, 1, 0, 0)) AS t(business_date, sales_count, sales_fen, refund_fen, void_count, net_fen, duplicate_deliveries)"
        )
    );
    // Rejected rows keep the operator's CSV line and say why.
    assert_eq!(
        sql_table(
            &csv_lake,
            "SELECT source_line, reason, CAST(payload AS VARCHAR) AS payload FROM dead_letters ORDER BY source_line"
        ),
        sql_table(
            &csv_lake,
            "SELECT * FROM (VALUES (7, 'bad_amount', 'c6,m1,2025-03-02 10:00:00,1.234,S,cash,'), \
             (8, 'bad_kind', 'c7,m1,2025-03-02 10:00:00,5,X,cash,')) AS t(source_line, reason, payload)"
        )
    );
}

#[test]
fn streamed_and_backfilled_events_give_the_same_silver() {
    let (_guard, dir) = workdir();
    faulty_district(&dir, "8", "40");
    let topic = unique("backfill");
    produce(&dir, &topic, 3);
    let streamed = dir.join("streamed-lake");
    let mut args = ingest_args_with_silver(&topic, &unique("g"), &streamed);
    args.extend([
        "--max-records".into(),
        "5000".into(),
        "--exit-at-end".into(),
    ]);
    run(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());

    let backfilled = dir.join("backfilled-lake");
    run_json(
        &dir,
        &backfill_args(&backfilled, "events.jsonl", &["--knowledge-from-occurred"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let silver = "SELECT * FROM merchant_daily ORDER BY operator_id, merchant_id, business_date";
    let expected = sql_table(&streamed, silver);
    assert_eq!(sql_table(&backfilled, silver), expected);
    // With arrival times from the file, the backfill asserts for each event the arrival
    // time the stream's producer stamped on its record (the stream itself knows the
    // events only from its workers' commits).
    let asserted = "SELECT operator_id, event_id, min(knowledge_time) AS known FROM pos_events \
                    WHERE knowledge_source = 'asserted' GROUP BY 1, 2 ORDER BY 1, 2";
    let produced = "SELECT operator_id, event_id, min(kafka_timestamp) AS known FROM pos_events \
                    WHERE kafka_timestamp_type = 'create_time' GROUP BY 1, 2 ORDER BY 1, 2";
    assert_eq!(
        sql_table(&backfilled, asserted),
        sql_table(&streamed, produced)
    );
    assert_eq!(
        sql_i64(
            &streamed,
            "SELECT count(*) FROM pos_events WHERE knowledge_source <> 'observed'"
        ),
        0
    );

    // Backfilling what was streamed over the streamed lake changes no daily figure: the
    // events are duplicates, counted once (and reported as extra deliveries).
    run_json(
        &dir,
        &backfill_args(
            &streamed,
            "events.jsonl",
            &["--knowledge-from-occurred", "--revise-settled-knowledge"],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    let truth = std::fs::read_to_string(dir.join("truth.csv")).unwrap();
    assert_eq!(silver_as_truth(&dir, &streamed), truth);
}

/// Every row of both silver tables, in a stable order (payers as their entries).
fn both_silver_tables(dir: &Path, lake: &Path) -> (String, String) {
    let lake = lake.to_str().unwrap();
    // JSON: the history's payer entries are a nested column.
    let csv = |query: &str| {
        String::from_utf8(run(dir, &["sql", "--lake", lake, "--format", "json", query]).stdout)
            .unwrap()
    };
    (
        csv("SELECT * FROM merchant_daily ORDER BY operator_id, merchant_id, business_date"),
        csv("SELECT * FROM merchant_daily_history \
             ORDER BY operator_id, merchant_id, business_date, known_from"),
    )
}

/// A first load builds silver from the rows it commits instead of reading bronze back;
/// that must be exactly what a rebuild from bronze gives, history versions included.
#[test]
fn a_first_load_builds_the_silver_a_rebuild_from_bronze_builds() {
    let (_guard, dir) = workdir();
    faulty_district(&dir, "10", "60");
    let lake = dir.join("lake");
    // Arrival times asserted, so the history has versions to build (late data, late
    // voids, re-deliveries); small commits, so many of them feed the builders.
    let loaded = run_json(
        &dir,
        &backfill_args(
            &lake,
            "events.jsonl",
            &["--knowledge-from-occurred", "--commit-every", "5000"],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert!(
        loaded["files"][0]["commits"].as_u64().unwrap() > 5,
        "{loaded}"
    );
    assert_eq!(loaded["silver_built_from_the_load"], true, "{loaded}");
    let (daily, history) = both_silver_tables(&dir, &lake);
    assert!(daily.lines().count() > 300, "{daily}");
    assert!(history.lines().count() > daily.lines().count(), "{history}");
    run(
        &dir,
        &["aggregate", "--lake", lake.to_str().unwrap(), "--full"],
    );
    let (rebuilt_daily, rebuilt_history) = both_silver_tables(&dir, &lake);
    assert_eq!(daily, rebuilt_daily);
    assert_eq!(history, rebuilt_history);
}

/// `--knowledge-from-occurred` gives each line the arrival time a stream would have
/// given, from the file's lines alone: an old first line and forty days without data
/// never pin the clock (no row known before it happened), a late line arrives at the
/// clock, and a load killed after its first commit resumes to the same rows.
#[test]
fn the_clock_from_occurred_survives_an_old_line_a_gap_and_a_resume() {
    let (_guard, dir) = workdir();
    let base = chrono::DateTime::parse_from_rfc3339("2025-03-01T08:00:00+08:00").unwrap();
    let line = |n: usize, occurred: chrono::DateTime<chrono::FixedOffset>| {
        serde_json::json!({
            "event_id": format!("e{n}"), "operator_id": "lane", "merchant_id": "cafe",
            "kind": "sale", "amount_fen": 1000 + n as i64, "currency": "CNY",
            "occurred_at": occurred.to_rfc3339(), "channel": "cash",
        })
        .to_string()
    };
    let mut lines = vec![line(1, base - chrono::Duration::days(5 * 365))];
    for n in 2..=8000 {
        let mut occurred = base + chrono::Duration::minutes(n as i64);
        if n > 4000 {
            occurred += chrono::Duration::days(40);
        }
        if n == 7001 {
            // Three hours late: its arrival is the clock, line 7000's time.
            occurred -= chrono::Duration::hours(3);
        }
        lines.push(line(n, occurred));
    }
    std::fs::write(dir.join("events.jsonl"), lines.join("\n") + "\n").unwrap();
    let args = [
        "--knowledge-from-occurred",
        "--commit-every",
        "7000",
        "--no-silver",
    ];

    let reference = dir.join("reference-lake");
    let report = run_json(
        &dir,
        &backfill_args(&reference, "events.jsonl", &args)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(report["accepted"], 8000);
    assert_eq!(
        sql_i64(
            &reference,
            "SELECT count(*) FROM pos_events WHERE knowledge_time < occurred_at"
        ),
        0,
        "rows known before they happened"
    );
    assert_eq!(
        sql_i64(
            &reference,
            "SELECT CAST(to_unixtime(knowledge_time) AS BIGINT) - CAST(to_unixtime(occurred_at) AS BIGINT) \
             FROM pos_events WHERE event_id = 'e7001'"
        ),
        3 * 3600 - 60,
        "a late line arrives at the clock"
    );

    let crashed = dir.join("crashed-lake");
    let mut worker = Worker::start(
        &dir,
        &backfill_args(&crashed, "events.jsonl", &args),
        &[("STREETFLOW_FREEZE_AT", "events_committed:1")],
    );
    worker.wait_for("FROZEN AT", Duration::from_secs(120));
    worker.kill();
    let resumed = run_json(
        &dir,
        &backfill_args(&crashed, "events.jsonl", &args)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(resumed["files"][0]["resumed_after_line"], 7000);
    assert_eq!(bronze_rows(&crashed), bronze_rows(&reference));
}

/// Defect 9 of issue 20: a correction of the same length in the middle of a large export
/// (one amount changed) is a new file, not "already loaded" (the identity used to hash
/// only the size and the first and last MiB).
#[test]
fn a_same_length_correction_in_the_middle_of_a_large_export_is_loaded() {
    let (_guard, dir) = workdir();
    generate(&dir, &["--merchants", "8", "--days", "30", "--seed", "53"]);
    let original = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    assert!(original.len() > 3 << 20, "the export must exceed 3 MiB");
    let lake = dir.join("lake");
    let first = run_json(
        &dir,
        &backfill_args(&lake, "events.jsonl", &["--no-silver"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let accepted = first["accepted"].as_i64().unwrap();
    assert!(accepted > 0);

    // One digit of one amount in the middle of the file, bytes before and after equal.
    let middle = original.len() / 2;
    let key = "\"amount_fen\":";
    let at = original[middle..]
        .match_indices(key)
        .map(|(i, _)| middle + i + key.len())
        .find(|&i| original.as_bytes()[i].is_ascii_digit())
        .unwrap();
    let mut corrected = original.clone().into_bytes();
    corrected[at] = if corrected[at] == b'9' {
        b'1'
    } else {
        corrected[at] + 1
    };
    assert_eq!(corrected.len(), original.len());
    std::fs::write(dir.join("corrected.jsonl"), &corrected).unwrap();

    let second = run_json(
        &dir,
        &backfill_args(&lake, "corrected.jsonl", &["--no-silver"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(second["files"][0]["already_loaded"], false, "{second}");
    assert_eq!(second["accepted"].as_i64().unwrap(), accepted, "{second}");
    assert_ne!(
        first["files"][0]["identity"],
        second["files"][0]["identity"]
    );
    // And the corrected file again: now it is recognised.
    let third = run_json(
        &dir,
        &backfill_args(&lake, "corrected.jsonl", &["--no-silver"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(third["files"][0]["already_loaded"], true, "{third}");
}

/// Loads an earlier streetflow recorded under the legacy identity (size and first and
/// last MiB): a small file that identity hashed whole is recognised as loaded; a large
/// one, which could be a same-length correction, stops the load and says why.
#[test]
fn loads_recorded_under_the_legacy_identity_are_recognised_or_refused() {
    let (_guard, dir) = workdir();
    generate(&dir, &["--merchants", "1", "--days", "3", "--seed", "54"]);
    run_json(
        &dir,
        &[
            "gen",
            "--out",
            "large.jsonl",
            "--json",
            "--merchants",
            "8",
            "--days",
            "30",
            "--seed",
            "55",
        ],
    );
    let small = dir.join("events.jsonl");
    let large = dir.join("large.jsonl");
    assert!(std::fs::metadata(&small).unwrap().len() <= 2 << 20);
    assert!(std::fs::metadata(&large).unwrap().len() > 2 << 20);
    let lake = dir.join("lake");
    let runtime = runtime();
    runtime.block_on(async {
        let lake = streetflow_lake::Lake::new(lake.to_str().unwrap(), &Default::default()).unwrap();
        let mut table = streetflow_lake::OffsetWriter::new(
            &lake,
            &streetflow_core::tables::POS_EVENTS,
            "legacy",
        )
        .await
        .unwrap();
        let progress: Vec<streetflow_lake::AppProgress> = [&small, &large]
            .iter()
            .map(|file| streetflow_lake::AppProgress {
                app_id: format!(
                    "backfill-{}-eof",
                    streetflow_ingest::legacy_file_identity(file).unwrap()
                ),
                expected: None,
                version: 1,
            })
            .collect();
        table
            .commit_appended(&Default::default(), &progress)
            .await
            .unwrap();
    });
    let loaded = run_json(
        &dir,
        &backfill_args(&lake, "events.jsonl", &["--no-silver"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(loaded["files"][0]["already_loaded"], true, "{loaded}");
    let mut command = streetflow();
    command
        .args(backfill_args(&lake, "large.jsonl", &["--no-silver"]))
        .current_dir(&dir);
    let refused = finish(&mut command);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("same length"), "{stderr}");
    assert_eq!(row_count(&lake, "pos_events"), 0);
}
