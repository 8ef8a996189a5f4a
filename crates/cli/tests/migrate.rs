//! `streetflow migrate`: a lake in the first layout (bronze and silver partitioned by
//! operator and business date, dead letters by operator and ingest date) becomes the
//! month layout with every row, and keeps the offsets it had recorded.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use std::path::Path;
use std::sync::{Arc, LazyLock};

use common::*;
use streetflow_core::tables::{DEAD_LETTERS, MERCHANT_DAILY, POS_EVENTS, TableDef};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::Schema;
use streetflow_lake::arrow::record_batch::RecordBatch;
use streetflow_lake::{AppProgress, CommitOutcome, Lake, OffsetWriter};

/// `def` as the first layout had it: no month column, partitioned by `partitions`.
fn first_layout(def: &TableDef, partitions: &'static [&'static str]) -> TableDef {
    let fields: Vec<_> = def
        .schema
        .fields()
        .iter()
        .filter(|f| !f.name().ends_with("_month"))
        .map(|f| f.as_ref().clone())
        .collect();
    TableDef {
        name: def.name,
        description: def.description,
        schema: Arc::new(Schema::new(fields)),
        partition_columns: partitions,
    }
}

static OLD_EVENTS: LazyLock<TableDef> =
    LazyLock::new(|| first_layout(&POS_EVENTS, &["operator_id", "business_date"]));
static OLD_DEAD_LETTERS: LazyLock<TableDef> =
    LazyLock::new(|| first_layout(&DEAD_LETTERS, &["operator_id", "ingest_date"]));
static OLD_DAILY: LazyLock<TableDef> =
    LazyLock::new(|| first_layout(&MERCHANT_DAILY, &["operator_id", "business_date"]));

/// Copies table `old.name` of `from` into `to` in the layout `old`, committing `progress`.
async fn copy_in_first_layout(from: &Lake, to: &Lake, old: &TableDef, progress: &[AppProgress]) {
    let columns: Vec<String> = old
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let batches = from
        .query(&format!("SELECT {} FROM {}", columns.join(", "), old.name))
        .await
        .unwrap();
    let mut writer = OffsetWriter::new(to, old, "copy").await.unwrap();
    for batch in batches {
        let cast_columns = old
            .schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(field, column)| cast(column, field.data_type()).unwrap())
            .collect();
        writer
            .write(RecordBatch::try_new(old.schema.clone(), cast_columns).unwrap())
            .await
            .unwrap();
    }
    let staged = writer.stage().await.unwrap();
    let outcome = writer.commit_appended(&staged, progress).await.unwrap();
    assert!(matches!(outcome, CommitOutcome::Committed { .. }));
}

/// Every row of the tables that hold data, sorted, without the month columns.
fn contents(lake: &Path) -> Vec<String> {
    [
        (
            "pos_events",
            "source_line, operator_id, business_date, event_id, merchant_id, kind, amount_fen, \
             occurred_at, knowledge_time, knowledge_source",
        ),
        (
            "dead_letters",
            "source_line, operator_id, ingest_date, reason, payload_bytes",
        ),
        (
            "merchant_daily",
            "operator_id, business_date, merchant_id, sales_count, net_fen, void_count, \
             distinct_payers, duplicate_deliveries",
        ),
    ]
    .iter()
    .map(|(table, columns)| {
        sql_table(
            lake,
            &format!("SELECT {columns} FROM {table} ORDER BY {columns}"),
        )
    })
    .collect()
}

#[test]
fn a_first_layout_lake_is_migrated_with_every_row_and_its_offsets() {
    let (_guard, dir) = workdir();
    generate(
        &dir,
        &[
            "--merchants",
            "6",
            "--operators",
            "2",
            "--days",
            "40",
            "--seed",
            "5",
            "--duplicate-rate",
            "0.02",
            "--late-rate",
            "0.02",
            "--malformed-rate",
            "0.01",
        ],
    );
    // The reference: the file loaded into the current layout, knowledge asserted from
    // the arrival times so both lakes hold the same knowledge times.
    let current = dir.join("current");
    let loaded = run_json(
        &dir,
        &[
            "backfill",
            "--lake",
            current.to_str().unwrap(),
            "--input",
            "events.jsonl",
            "--knowledge-from-occurred",
            "--json",
        ],
    );
    let lines = loaded["files"][0]["lines"].as_i64().unwrap();
    assert!(lines > 1_000, "{loaded}");

    // The same rows written in the first layout, with the file's offsets.
    let old = dir.join("old");
    let identity = streetflow_ingest::file_identity(&dir.join("events.jsonl")).unwrap();
    let progress = [
        AppProgress {
            app_id: format!("backfill-{identity}-0"),
            expected: None,
            version: lines,
        },
        AppProgress {
            app_id: format!("backfill-{identity}-eof"),
            expected: None,
            version: lines,
        },
    ];
    let runtime = runtime();
    let from = Lake::new(current.to_str().unwrap(), &Default::default()).unwrap();
    let to = Lake::new(old.to_str().unwrap(), &Default::default()).unwrap();
    runtime.block_on(async {
        copy_in_first_layout(&from, &to, &OLD_EVENTS, &progress).await;
        copy_in_first_layout(&from, &to, &OLD_DEAD_LETTERS, &progress[..1]).await;
        copy_in_first_layout(&from, &to, &OLD_DAILY, &[]).await;
    });
    // Today's binary refuses the old layout until it is migrated.
    let refused =
        finish(
            streetflow()
                .current_dir(&dir)
                .args(["aggregate", "--lake", old.to_str().unwrap()]),
        );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("streetflow migrate"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let migrated = run_json(
        &dir,
        &["migrate", "--lake", old.to_str().unwrap(), "--json"],
    );
    let tables: Vec<&str> = migrated["rewritten"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    assert_eq!(
        tables,
        ["pos_events", "dead_letters", "merchant_daily"],
        "{migrated}"
    );

    // Every row, the month layout, and the offsets.
    assert_eq!(contents(&old), contents(&current));
    runtime.block_on(async {
        let lake = Lake::new(old.to_str().unwrap(), &Default::default()).unwrap();
        for (name, month) in [
            ("pos_events", "business_month"),
            ("dead_letters", "ingest_month"),
            ("merchant_daily", "business_month"),
        ] {
            let table = lake.open(name).await.unwrap().unwrap();
            let snapshot = table.snapshot().unwrap();
            assert_eq!(snapshot.metadata().partition_columns(), &[month.to_owned()]);
        }
        for p in &progress {
            assert_eq!(
                lake.app_version("pos_events", &p.app_id).await.unwrap(),
                Some(lines)
            );
        }
    });
    assert_eq!(
        sql_i64(
            &old,
            "SELECT count(*) FROM pos_events WHERE business_month <> CAST(date_trunc('month', business_date) AS DATE)"
        ),
        0
    );
    // The file counts as loaded, and the history matches the reference's.
    let again = run_json(
        &dir,
        &[
            "backfill",
            "--lake",
            old.to_str().unwrap(),
            "--input",
            "events.jsonl",
            "--knowledge-from-occurred",
            "--json",
        ],
    );
    assert_eq!(again["files"][0]["already_loaded"], true, "{again}");
    let history = "SELECT operator_id, merchant_id, business_date, known_from, net_fen, retracted \
                   FROM merchant_daily_history ORDER BY 1, 2, 3, 4";
    assert_eq!(sql_table(&old, history), sql_table(&current, history));
}
