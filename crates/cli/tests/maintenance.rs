//! `streetflow compact` and `streetflow vacuum` on a lake written by streaming workers:
//! fewer files, the same rows, and silver rebuilt from the compacted bronze still equals
//! the generator's truth.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use std::path::Path;

use common::*;
use streetflow_lake::Lake;

fn live_files(lake: &Path, table: &str) -> usize {
    let lake = Lake::new(lake.to_str().unwrap(), &Default::default()).unwrap();
    let table = runtime().block_on(lake.open(table)).unwrap().unwrap();
    table.snapshot().unwrap().log_data().iter().count()
}

fn parquet_files(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            count += parquet_files(&path);
        } else if path.extension().is_some_and(|e| e == "parquet") {
            count += 1;
        }
    }
    count
}

fn fingerprint(lake: &Path) -> Vec<i64> {
    sql_i64s(
        lake,
        "SELECT count(*) FROM pos_events UNION ALL SELECT sum(amount_fen) FROM pos_events \
         UNION ALL SELECT count(DISTINCT event_id) FROM pos_events",
    )
}

#[test]
fn compaction_and_vacuum_keep_every_row_and_remove_small_files() {
    let (_guard, dir) = workdir();
    run(
        &dir,
        &[
            "demo",
            "--merchants",
            "12",
            "--days",
            "45",
            "--workers",
            "2",
            "--out",
            "demo",
        ],
    );
    let demo = dir.join("demo");
    let lake = demo.join("lake");
    let lake_arg = lake.to_str().unwrap();
    let before = fingerprint(&lake);
    let files_before = live_files(&lake, "pos_events");

    let output = run(
        &dir,
        &[
            "compact",
            "--lake",
            lake_arg,
            "--table",
            "pos_events",
            "--zorder-by",
            "merchant_id",
        ],
    );
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("pos_events"), "{printed}");
    let files_after = live_files(&lake, "pos_events");
    assert!(
        files_after < files_before,
        "{files_before} files before, {files_after} after:\n{printed}"
    );
    // Z-order rewrites every partition (a month) into one file at this size.
    let partitions = sql_i64(
        &lake,
        "SELECT count(*) FROM (SELECT DISTINCT business_month FROM pos_events)",
    ) as usize;
    assert_eq!(files_after, partitions);
    assert_eq!(fingerprint(&lake), before);
    // The replaced files are still there for readers of older versions.
    assert_eq!(
        parquet_files(&lake.join("pos_events")),
        files_before + files_after
    );

    let dry = run(
        &dir,
        &[
            "vacuum",
            "--lake",
            lake_arg,
            "--retain-hours",
            "0",
            "--dry-run",
        ],
    );
    assert!(
        String::from_utf8(dry.stdout)
            .unwrap()
            .contains("files to delete")
    );
    assert_eq!(
        parquet_files(&lake.join("pos_events")),
        files_before + files_after
    );
    run(&dir, &["vacuum", "--lake", lake_arg, "--retain-hours", "0"]);
    assert_eq!(parquet_files(&lake.join("pos_events")), files_after);
    assert_eq!(fingerprint(&lake), before);

    // Silver rebuilt from the compacted bronze is still exactly the generator's truth.
    run(&dir, &["aggregate", "--lake", lake_arg, "--full"]);
    let truth = std::fs::read_to_string(demo.join("truth.csv")).unwrap();
    assert_eq!(silver_as_truth(&dir, &lake), truth);

    let unknown = streetflow()
        .args(["compact", "--lake", lake_arg, "--table", "nope"])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no table \"nope\""));
}
