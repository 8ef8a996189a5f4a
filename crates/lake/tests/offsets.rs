//! Offsets committed with the data come back, and a stale writer is fenced.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use arrow::array::{Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use streetflow_core::tables::TableDef;
use streetflow_lake::{CommitOutcome, Lake, OffsetWriter, PartitionProgress};

static TEST_TABLE: LazyLock<TableDef> = LazyLock::new(|| TableDef {
    name: "numbers",
    description: "test table",
    schema: Arc::new(Schema::new(vec![
        Field::new("shard", DataType::Utf8, false),
        Field::new("n", DataType::Int64, false),
    ])),
    partition_columns: &["shard"],
});

fn batch(shard: &str, values: &[i64]) -> RecordBatch {
    RecordBatch::try_new(
        TEST_TABLE.schema.clone(),
        vec![
            Arc::new(StringArray::from(vec![shard; values.len()])),
            Arc::new(Int64Array::from(values.to_vec())),
        ],
    )
    .unwrap()
}

async fn rows(writer: &OffsetWriter) -> usize {
    writer
        .table()
        .snapshot()
        .unwrap()
        .log_data()
        .iter()
        .map(|f| f.num_records().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_travel_with_the_data_and_stale_writers_are_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
    let mut a = OffsetWriter::new(&lake, &TEST_TABLE, "pipe").await.unwrap();
    let mut b = OffsetWriter::new(&lake, &TEST_TABLE, "pipe").await.unwrap();
    assert_eq!(
        a.committed_offsets(&[0, 1]).await.unwrap(),
        vec![None, None]
    );

    a.write(batch("x", &[1, 2, 3])).await.unwrap();
    let staged = a.stage().await.unwrap();
    assert_eq!(staged.files(), 1);
    let progress = [
        PartitionProgress {
            partition: 0,
            expected: None,
            last_offset: 41,
        },
        PartitionProgress {
            partition: 1,
            expected: None,
            last_offset: 7,
        },
    ];
    assert!(matches!(
        a.commit(&staged, &progress).await.unwrap(),
        CommitOutcome::Committed { .. }
    ));
    assert_eq!(
        b.committed_offsets(&[0, 1, 2]).await.unwrap(),
        vec![Some(41), Some(7), None]
    );

    // b still believes partition 0 is empty: it must not commit over a's offsets.
    b.write(batch("y", &[9])).await.unwrap();
    let staged_b = b.stage().await.unwrap();
    let stale = [PartitionProgress {
        partition: 0,
        expected: None,
        last_offset: 50,
    }];
    assert_eq!(
        b.commit(&staged_b, &stale).await.unwrap(),
        CommitOutcome::Fenced {
            app_id: "pipe-0".to_owned(),
            expected: None,
            found: Some(41)
        }
    );
    // Only a's rows are visible; an offsets-only commit (empty range) still advances.
    let fresh = [PartitionProgress {
        partition: 0,
        expected: Some(41),
        last_offset: 60,
    }];
    assert!(matches!(
        b.commit(&Default::default(), &fresh).await.unwrap(),
        CommitOutcome::Committed { .. }
    ));
    assert_eq!(rows(&b).await, 3);
    assert_eq!(a.committed_offsets(&[0]).await.unwrap(), vec![Some(60)]);

    // Offsets never move back.
    let backwards = [PartitionProgress {
        partition: 0,
        expected: Some(60),
        last_offset: 59,
    }];
    let err = b.commit(&Default::default(), &backwards).await.unwrap_err();
    assert!(err.to_string().contains("move back"), "{err}");

    // Reopening the lake finds the same table and offsets.
    let mut reopened = OffsetWriter::new(&lake, &TEST_TABLE, "pipe").await.unwrap();
    assert_eq!(
        reopened.committed_offsets(&[0, 1]).await.unwrap(),
        vec![Some(60), Some(7)]
    );
    // Another pipeline prefix has its own progress.
    let mut other = OffsetWriter::new(&lake, &TEST_TABLE, "other")
        .await
        .unwrap();
    assert_eq!(other.committed_offsets(&[0]).await.unwrap(), vec![None]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_other_columns_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
    OffsetWriter::new(&lake, &TEST_TABLE, "pipe").await.unwrap();
    let changed = TableDef {
        schema: Arc::new(Schema::new(vec![
            Field::new("shard", DataType::Utf8, false),
            Field::new("n", DataType::Utf8, false),
        ])),
        ..TEST_TABLE.clone()
    };
    let err = OffsetWriter::new(&lake, &changed, "pipe")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("column n is"), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_checkpointed_and_offsets_survive_it() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
    let mut writer = OffsetWriter::new(&lake, &TEST_TABLE, "pipe").await.unwrap();
    let mut last = None;
    for i in 0..55i64 {
        writer.write(batch("x", &[i])).await.unwrap();
        let staged = writer.stage().await.unwrap();
        let progress = [PartitionProgress {
            partition: 3,
            expected: last,
            last_offset: i * 10,
        }];
        assert!(matches!(
            writer.commit(&staged, &progress).await.unwrap(),
            CommitOutcome::Committed { .. }
        ));
        last = Some(i * 10);
    }
    let checkpoints = std::fs::read_dir(dir.path().join("numbers/_delta_log"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".checkpoint")
        })
        .count();
    assert!(checkpoints >= 1, "no checkpoint after 55 commits");
    let mut reopened = OffsetWriter::new(&lake, &TEST_TABLE, "pipe").await.unwrap();
    assert_eq!(
        reopened.committed_offsets(&[3]).await.unwrap(),
        vec![Some(540)]
    );
    assert_eq!(rows(&reopened).await, 55);
}

/// A commit attempt can land while its caller sees an error (the store wrote the log
/// entry, the answer was lost). Retried, it finds its own offsets stored: the writer must
/// recognise its own files instead of taking itself for another worker, or the caller
/// drops a buffer that is in the lake and counts it nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_commit_that_had_landed_is_recognised_not_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
    let mut a = OffsetWriter::new(&lake, &TEST_TABLE, "pipe").await.unwrap();
    a.set_source(77);
    a.write(batch("x", &[1, 2, 3])).await.unwrap();
    let staged = a.stage().await.unwrap();
    let progress = [PartitionProgress {
        partition: 0,
        expected: None,
        last_offset: 9,
    }];
    let first = a.commit(&staged, &progress).await.unwrap();
    assert!(
        matches!(first, CommitOutcome::Committed { .. }),
        "{first:?}"
    );
    // The same attempt again, as the retry after a lost answer makes it.
    let retried = a.commit(&staged, &progress).await.unwrap();
    assert!(
        matches!(retried, CommitOutcome::Committed { .. }),
        "its own landed commit is not a fence: {retried:?}"
    );
    assert_eq!(rows(&a).await, 3, "nothing was added twice");
    assert_eq!(a.committed_offsets(&[0]).await.unwrap(), vec![Some(9)]);

    // Another writer that reached the same offset with files of its own is still fenced:
    // its rows are not in the table.
    let mut b = OffsetWriter::new(&lake, &TEST_TABLE, "pipe").await.unwrap();
    b.set_source(77);
    b.write(batch("x", &[4, 5, 6])).await.unwrap();
    let staged_b = b.stage().await.unwrap();
    assert_eq!(
        b.commit(&staged_b, &progress).await.unwrap(),
        CommitOutcome::Fenced {
            app_id: "pipe-0".to_owned(),
            expected: None,
            found: Some(9)
        }
    );
    assert_eq!(rows(&b).await, 3);
}
