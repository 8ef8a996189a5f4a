//! `streetflow sql` answers queries in every format and refuses everything else: DDL,
//! DML, COPY, SET, several statements, and tables named by file path or URL.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use std::fs::File;
use std::path::Path;

use common::*;
use streetflow_lake::arrow::array::{AsArray, RecordBatch};
use streetflow_lake::arrow::datatypes::Int64Type;
use streetflow_lake::deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// A small bronze table, written straight to Delta by the features benchmark.
fn small_lake(dir: &Path) -> std::path::PathBuf {
    let work = dir.join("bench");
    let work_arg = work.display().to_string();
    run(
        dir,
        &[
            "bench",
            "features",
            "--merchants",
            "8",
            "--days",
            "30",
            "--sales-per-day",
            "3",
            "--skip-duckdb",
            "--workdir",
            &work_arg,
        ],
    );
    work.join("lake")
}

fn stdout_of(dir: &Path, args: &[&str]) -> String {
    String::from_utf8(run(dir, args).stdout).unwrap()
}

#[test]
fn queries_answer_in_every_format_and_everything_else_is_refused() {
    let (_guard, dir) = workdir();
    let lake = small_lake(&dir);
    let lake_arg = lake.display().to_string();
    let rows = row_count(&lake, "pos_events");
    assert!(rows > 100, "{rows}");
    let count = "SELECT count(*) AS n, sum(amount_fen) AS fen FROM pos_events";
    let fen = sql_i64(&lake, "SELECT sum(amount_fen) FROM pos_events");

    let csv = stdout_of(
        &dir,
        &["sql", "--lake", &lake_arg, "--format", "csv", count],
    );
    assert_eq!(csv, format!("n,fen\n{rows},{fen}\n"));
    let json = stdout_of(
        &dir,
        &["sql", "--lake", &lake_arg, "--format", "json", count],
    );
    assert_eq!(json.trim(), format!("{{\"n\":{rows},\"fen\":{fen}}}"));
    let table = stdout_of(&dir, &["sql", "--lake", &lake_arg, count]);
    assert!(table.contains(&rows.to_string()), "{table}");
    // WITH, VALUES and EXPLAIN are queries too.
    let with = stdout_of(
        &dir,
        &[
            "sql",
            "--lake",
            &lake_arg,
            "--format",
            "csv",
            "WITH t AS (SELECT * FROM (VALUES (1), (2)) v(x)) SELECT sum(x) AS s FROM t",
        ],
    );
    assert_eq!(with, "s\n3\n");
    let explain = stdout_of(
        &dir,
        &["sql", "--lake", &lake_arg, &format!("EXPLAIN {count}")],
    );
    assert!(explain.contains("pos_events"), "{explain}");

    // Parquet goes to a file and reads back with the same values.
    let parquet = dir.join("out.parquet");
    let parquet_arg = parquet.display().to_string();
    run(
        &dir,
        &[
            "sql",
            "--lake",
            &lake_arg,
            "--format",
            "parquet",
            "--out",
            &parquet_arg,
            count,
        ],
    );
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&parquet).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    assert_eq!(batches.len(), 1);
    assert_eq!(
        batches[0].column(0).as_primitive::<Int64Type>().value(0),
        rows
    );
    assert_eq!(
        batches[0].column(1).as_primitive::<Int64Type>().value(0),
        fen
    );
    let no_out = streetflow()
        .args(["sql", "--lake", &lake_arg, "--format", "parquet", count])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(!no_out.status.success());
    assert!(String::from_utf8_lossy(&no_out.stderr).contains("--out"));

    let stolen = dir.join("stolen.csv");
    let stolen_arg = stolen.display();
    let refused = [
        "CREATE TABLE copy AS SELECT * FROM pos_events".to_owned(),
        "CREATE EXTERNAL TABLE pw STORED AS CSV LOCATION '/etc/passwd'".to_owned(),
        "CREATE VIEW v AS SELECT 1".to_owned(),
        "DROP TABLE pos_events".to_owned(),
        "INSERT INTO pos_events SELECT * FROM pos_events".to_owned(),
        "DELETE FROM pos_events".to_owned(),
        "UPDATE pos_events SET amount_fen = 0".to_owned(),
        format!("COPY pos_events TO '{stolen_arg}'"),
        format!("COPY (SELECT * FROM pos_events) TO '{stolen_arg}' STORED AS CSV"),
        format!("EXPLAIN COPY pos_events TO '{stolen_arg}'"),
        "SET datafusion.execution.target_partitions = 1".to_owned(),
        "SELECT 1; DROP TABLE pos_events".to_owned(),
        "SELECT * INTO copy FROM pos_events".to_owned(),
    ];
    for statement in &refused {
        let output = streetflow()
            .args(["sql", "--lake", &lake_arg, statement])
            .current_dir(&dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{statement} was accepted");
        assert!(
            stderr.contains("read-only") || stderr.contains("not supported"),
            "{statement}: {stderr}"
        );
    }
    // Tables are the lake's only: no file or URL is read through a query.
    for statement in [
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM 'file:///etc/passwd'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('/etc/passwd')",
    ] {
        let output = streetflow()
            .args(["sql", "--lake", &lake_arg, statement])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{statement} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("root:"), "{statement}: {stderr}");
    }
    assert!(!stolen.exists());
    assert_eq!(row_count(&lake, "pos_events"), rows);
}
