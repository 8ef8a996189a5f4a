//! Appending to one table with Kafka offsets in the same Delta commit.

use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use std::collections::HashSet;

use deltalake::kernel::{Action, Add, Remove, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use streetflow_core::tables::TableDef;

use crate::error::{Error, Result};
use crate::lake::Lake;

/// A short pause before attempt `attempt` of a contended commit.
async fn tokio_sleep(attempt: usize) {
    let millis = (10 * attempt as u64).min(500);
    tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
}

/// How far one Kafka partition gets with a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionProgress {
    /// Kafka partition.
    pub partition: i32,
    /// The `txn` version this writer read before consuming: the last offset already in
    /// the table (`None`: nothing yet). The commit is refused if the table moved on.
    pub expected: Option<i64>,
    /// Last offset the commit contains (written or deliberately skipped).
    pub last_offset: i64,
}

/// Parquet files written to the table's storage but not yet committed: invisible to
/// readers until [`OffsetWriter::commit`], removed by `vacuum` if never committed.
#[derive(Debug, Clone, Default)]
pub struct StagedFiles {
    adds: Vec<Add>,
}

impl StagedFiles {
    /// Number of data files.
    pub fn files(&self) -> usize {
        self.adds.len()
    }

    /// Bytes in those files.
    pub fn bytes(&self) -> i64 {
        self.adds.iter().map(|a| a.size).sum()
    }
}

/// How far one source gets with a commit: a Delta `txn` application id, the version this
/// writer read before it worked (`None`: nothing recorded yet) and the new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppProgress {
    /// Delta `txn` application id.
    pub app_id: String,
    /// Version expected in the table; the commit is refused if it moved.
    pub expected: Option<i64>,
    /// Version the commit records.
    pub version: i64,
}

/// What became of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The files and offsets are in the table at this version.
    Committed {
        /// New table version.
        version: u64,
    },
    /// Another writer advanced a source first; nothing was committed. The caller must
    /// drop what it prepared and resume from the table.
    Fenced {
        /// Application id that moved.
        app_id: String,
        /// Version this writer expected.
        expected: Option<i64>,
        /// Version found in the table.
        found: Option<i64>,
    },
}

/// Appends batches to one table and commits them with per-partition `txn` actions
/// whose application id is `<prefix>-<partition>`.
pub struct OffsetWriter {
    name: &'static str,
    app_prefix: String,
    table: DeltaTable,
    writer: RecordBatchWriter,
    partition_columns: Vec<String>,
}

impl std::fmt::Debug for OffsetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffsetWriter")
            .field("table", &self.name)
            .field("app_prefix", &self.app_prefix)
            .finish_non_exhaustive()
    }
}

impl OffsetWriter {
    /// Opens (or creates) the table of `def` in `lake`.
    pub async fn new(lake: &Lake, def: &TableDef, app_prefix: impl Into<String>) -> Result<Self> {
        let table = lake.open_or_create(def).await?;
        let writer = RecordBatchWriter::for_table(&table)
            .map_err(Error::delta(def.name, "create writer"))?;
        Ok(Self {
            name: def.name,
            app_prefix: app_prefix.into(),
            table,
            writer,
            partition_columns: def
                .partition_columns
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
        })
    }

    /// The Delta `txn` application id of a partition.
    pub fn app_id(&self, partition: i32) -> String {
        format!("{}-{partition}", self.app_prefix)
    }

    /// The table as last loaded.
    pub fn table(&self) -> &DeltaTable {
        &self.table
    }

    async fn refresh(&mut self) -> Result<()> {
        self.table
            .update_state()
            .await
            .map_err(Error::delta(self.name, "refresh"))
    }

    async fn stored_app_version(&self, app_id: &str) -> Result<Option<i64>> {
        let snapshot = self
            .table
            .snapshot()
            .map_err(Error::delta(self.name, "read offsets"))?;
        snapshot
            .transaction_version(self.table.log_store().as_ref(), app_id)
            .await
            .map_err(Error::delta(self.name, "read offsets"))
    }

    /// The last committed offset of each partition, from the newest table version.
    pub async fn committed_offsets(&mut self, partitions: &[i32]) -> Result<Vec<Option<i64>>> {
        self.refresh().await?;
        let mut versions = Vec::with_capacity(partitions.len());
        for &p in partitions {
            versions.push(self.stored_app_version(&self.app_id(p)).await?);
        }
        Ok(versions)
    }

    /// Buffers a batch; Parquet is written incrementally, nothing is visible yet.
    pub async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        self.writer
            .write(batch)
            .await
            .map_err(Error::delta(self.name, "write"))
    }

    /// Finishes the Parquet files of everything written since the last stage.
    pub async fn stage(&mut self) -> Result<StagedFiles> {
        let adds = self
            .writer
            .flush()
            .await
            .map_err(Error::delta(self.name, "write files"))?;
        Ok(StagedFiles { adds })
    }

    /// Drops whatever was written but not staged.
    pub fn discard(&mut self) {
        self.writer.reset();
    }

    /// Commits staged files with the partitions' new offsets, if every partition is
    /// still at the version the writer expects. `staged` may be empty: a commit of
    /// offsets alone records that a range held nothing for this table.
    pub async fn commit(
        &mut self,
        staged: &StagedFiles,
        progress: &[PartitionProgress],
    ) -> Result<CommitOutcome> {
        let progress: Vec<AppProgress> = progress
            .iter()
            .map(|p| AppProgress {
                app_id: self.app_id(p.partition),
                expected: p.expected,
                version: p.last_offset,
            })
            .collect();
        self.commit_appended(staged, &progress).await
    }

    /// Appends staged files in one commit that records `progress` (any application
    /// ids, e.g. a backfilled file's), under the same checks as [`OffsetWriter::commit`].
    pub async fn commit_appended(
        &mut self,
        staged: &StagedFiles,
        progress: &[AppProgress],
    ) -> Result<CommitOutcome> {
        self.commit_actions(staged, Vec::new(), progress, SaveMode::Append)
            .await
    }

    /// The version recorded for an application id, from the newest table version.
    pub async fn app_version(&mut self, app_id: &str) -> Result<Option<i64>> {
        self.refresh().await?;
        self.stored_app_version(app_id).await
    }

    /// Replaces every row of `partitions` (values in partition-column order; `None`: the
    /// whole table) by the staged files, in one commit that also records `progress`.
    ///
    /// The files to remove are listed from the snapshot the commit is built on, and the
    /// commit is refused if any other commit landed after that snapshot: a compaction
    /// (whose rewritten files Delta's conflict check ignores) or another writer in
    /// between would otherwise leave its files next to the replacement. The listing and
    /// commit are then repeated on the newer snapshot.
    pub async fn replace_partitions(
        &mut self,
        staged: &StagedFiles,
        partitions: Option<&HashSet<Vec<String>>>,
        progress: &[AppProgress],
    ) -> Result<CommitOutcome> {
        const ATTEMPTS: usize = 20;
        for attempt in 1..=ATTEMPTS {
            self.refresh().await?;
            let snapshot = self
                .table
                .snapshot()
                .map_err(Error::delta(self.name, "list files"))?;
            let removes: Vec<Remove> = snapshot
                .log_data()
                .iter()
                .filter(|file| {
                    partitions.is_none_or(|wanted| {
                        let values = file.partition_values_map();
                        let key: Vec<String> = self
                            .partition_columns
                            .iter()
                            .map(|c| values.get(c).cloned().flatten().unwrap_or_default())
                            .collect();
                        wanted.contains(&key)
                    })
                })
                .map(|file| file.remove_action(true))
                .collect();
            match self
                .commit_on_snapshot(staged, removes, progress, SaveMode::Overwrite)
                .await
            {
                Err(Error::Delta { source, .. })
                    if matches!(
                        source.as_ref(),
                        DeltaTableError::Transaction {
                            source: TransactionError::MaxCommitAttempts(_)
                        } | DeltaTableError::VersionAlreadyExists(_)
                    ) =>
                {
                    tracing::debug!(
                        table = self.name,
                        attempt,
                        "the table moved during a replace; listing again"
                    );
                    tokio_sleep(attempt).await;
                }
                other => return other,
            }
        }
        Err(Error::delta(self.name, "replace partitions")(
            DeltaTableError::Generic(format!(
                "other commits kept landing while the replacement was committed ({ATTEMPTS} attempts)"
            )),
        ))
    }

    /// Commits `staged` and `removes` on the snapshot the writer holds, failing (instead
    /// of rebasing) when another commit landed after it.
    async fn commit_on_snapshot(
        &mut self,
        staged: &StagedFiles,
        removes: Vec<Remove>,
        progress: &[AppProgress],
        mode: SaveMode,
    ) -> Result<CommitOutcome> {
        self.refuse_moving_back(progress)?;
        if let Some(fenced) = self.check_expected(progress).await? {
            return Ok(fenced);
        }
        let transactions = progress
            .iter()
            .map(|p| Transaction::new(&p.app_id, p.version))
            .collect();
        let operation = DeltaOperation::Write {
            mode,
            partition_by: Some(self.partition_columns.clone()),
            predicate: None,
        };
        let mut actions: Vec<Action> = staged.adds.iter().cloned().map(Action::Add).collect();
        actions.extend(removes.into_iter().map(Action::Remove));
        let snapshot = self
            .table
            .snapshot()
            .map_err(Error::delta(self.name, "commit"))?;
        let finalized = CommitBuilder::from(
            CommitProperties::default()
                .with_application_transactions(transactions)
                .with_max_retries(0),
        )
        .with_actions(actions)
        .build(Some(snapshot), self.table.log_store(), operation)
        .await
        .map_err(Error::delta(self.name, "commit"))?;
        Ok(CommitOutcome::Committed {
            version: finalized.version(),
        })
    }

    async fn commit_actions(
        &mut self,
        staged: &StagedFiles,
        removes: Vec<Remove>,
        progress: &[AppProgress],
        mode: SaveMode,
    ) -> Result<CommitOutcome> {
        self.refuse_moving_back(progress)?;
        self.refresh().await?;
        if let Some(fenced) = self.check_expected(progress).await? {
            return Ok(fenced);
        }
        let transactions = progress
            .iter()
            .map(|p| Transaction::new(&p.app_id, p.version))
            .collect();
        let operation = DeltaOperation::Write {
            mode,
            partition_by: Some(self.partition_columns.clone()),
            predicate: None,
        };
        let mut actions: Vec<Action> = staged.adds.iter().cloned().map(Action::Add).collect();
        actions.extend(removes.into_iter().map(Action::Remove));
        let snapshot = self
            .table
            .snapshot()
            .map_err(Error::delta(self.name, "commit"))?;
        let committed = CommitBuilder::from(
            CommitProperties::default().with_application_transactions(transactions),
        )
        .with_actions(actions)
        .build(Some(snapshot), self.table.log_store(), operation)
        .await;
        match committed {
            Ok(finalized) => Ok(CommitOutcome::Committed {
                version: finalized.version(),
            }),
            // Delta refuses a commit whose txn application ids another commit updated
            // meanwhile: the race between our check and our commit.
            Err(DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(conflict),
            }) => {
                tracing::warn!(table = self.name, %conflict, "commit lost a race");
                self.refresh().await?;
                Ok(self
                    .check_expected(progress)
                    .await?
                    .unwrap_or(CommitOutcome::Fenced {
                        app_id: progress
                            .first()
                            .map(|p| p.app_id.clone())
                            .unwrap_or_default(),
                        expected: progress.first().and_then(|p| p.expected),
                        found: None,
                    }))
            }
            Err(source) => Err(Error::delta(self.name, "commit")(source)),
        }
    }

    /// An application version never moves back.
    fn refuse_moving_back(&self, progress: &[AppProgress]) -> Result<()> {
        match progress
            .iter()
            .find(|p| p.expected.is_some_and(|stored| p.version < stored))
        {
            Some(p) => Err(Error::OffsetWouldMoveBack {
                table: self.name.to_owned(),
                app_id: p.app_id.clone(),
                stored: p.expected.unwrap_or_default(),
                proposed: p.version,
            }),
            None => Ok(()),
        }
    }

    async fn check_expected(&self, progress: &[AppProgress]) -> Result<Option<CommitOutcome>> {
        for p in progress {
            let found = self.stored_app_version(&p.app_id).await?;
            if found != p.expected {
                return Ok(Some(CommitOutcome::Fenced {
                    app_id: p.app_id.clone(),
                    expected: p.expected,
                    found,
                }));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;
    use std::sync::{Arc, LazyLock};

    use deltalake::arrow::array::{Int64Array, StringArray};
    use deltalake::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    static TABLE: LazyLock<TableDef> = LazyLock::new(|| TableDef {
        name: "numbers",
        description: "test table",
        schema: Arc::new(Schema::new(vec![
            Field::new("shard", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ])),
        partition_columns: &["shard"],
    });

    fn batch(values: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            TABLE.schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["x"; values.len()])),
                Arc::new(Int64Array::from(values.to_vec())),
            ],
        )
        .unwrap()
    }

    async fn rows(lake: &Lake) -> i64 {
        let table = lake.open("numbers").await.unwrap().unwrap();
        table
            .snapshot()
            .unwrap()
            .log_data()
            .iter()
            .map(|f| f.num_records().unwrap_or(0) as i64)
            .sum()
    }

    /// A compaction that lands between a replace's listing of the files and its commit
    /// would leave its rewritten file (the old rows) next to the replacement, because
    /// Delta's conflict check ignores `dataChange: false` removes. The replace commits
    /// only on the snapshot it listed, and lists again when the table moved.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compaction_between_listing_and_commit_never_doubles_rows() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
        let mut appender = OffsetWriter::new(&lake, &TABLE, "a").await.unwrap();
        for n in 0..3 {
            appender.write(batch(&[n, n + 10])).await.unwrap();
            let staged = appender.stage().await.unwrap();
            appender.commit_appended(&staged, &[]).await.unwrap();
        }
        let mut replacer = OffsetWriter::new(&lake, &TABLE, "r").await.unwrap();
        replacer.write(batch(&[100, 101, 102])).await.unwrap();
        let staged = replacer.stage().await.unwrap();
        // The replacer lists the partition's files...
        replacer.refresh().await.unwrap();
        let removes: Vec<Remove> = replacer
            .table
            .snapshot()
            .unwrap()
            .log_data()
            .iter()
            .map(|file| file.remove_action(true))
            .collect();
        assert_eq!(removes.len(), 3);
        // ...a compaction rewrites them into one...
        let compacted = lake.compact("numbers", &[], None).await.unwrap().unwrap();
        assert_eq!(compacted.files_after, 1);
        // ...and a commit on the listed snapshot is refused rather than rebased.
        let stale = replacer
            .commit_on_snapshot(&staged, removes, &[], SaveMode::Overwrite)
            .await;
        assert!(stale.is_err(), "{stale:?}");
        assert_eq!(rows(&lake).await, 6);
        // The replace lists again and removes the compacted file too.
        let partition = HashSet::from([vec!["x".to_owned()]]);
        let outcome = replacer
            .replace_partitions(&staged, Some(&partition), &[])
            .await
            .unwrap();
        assert!(matches!(outcome, CommitOutcome::Committed { .. }));
        assert_eq!(rows(&lake).await, 3);
    }
}
