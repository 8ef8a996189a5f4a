//! Appending to one table with Kafka offsets in the same Delta commit.

use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use streetflow_core::tables::TableDef;

use crate::error::{Error, Result};
use crate::lake::Lake;

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

/// What became of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The files and offsets are in the table at this version.
    Committed {
        /// New table version.
        version: u64,
    },
    /// Another writer advanced a partition first; nothing was committed. The caller
    /// must drop what it buffered for its partitions and resume from the table.
    Fenced {
        /// Partition that moved.
        partition: i32,
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

    async fn stored_version(&self, partition: i32) -> Result<Option<i64>> {
        let snapshot = self
            .table
            .snapshot()
            .map_err(Error::delta(self.name, "read offsets"))?;
        snapshot
            .transaction_version(self.table.log_store().as_ref(), self.app_id(partition))
            .await
            .map_err(Error::delta(self.name, "read offsets"))
    }

    /// The last committed offset of each partition, from the newest table version.
    pub async fn committed_offsets(&mut self, partitions: &[i32]) -> Result<Vec<Option<i64>>> {
        self.refresh().await?;
        let mut versions = Vec::with_capacity(partitions.len());
        for &p in partitions {
            versions.push(self.stored_version(p).await?);
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
        if let Some(p) = progress
            .iter()
            .find(|p| p.expected.is_some_and(|stored| p.last_offset < stored))
        {
            return Err(Error::OffsetWouldMoveBack {
                table: self.name.to_owned(),
                partition: p.partition,
                stored: p.expected.unwrap_or_default(),
                proposed: p.last_offset,
            });
        }
        self.refresh().await?;
        if let Some(fenced) = self.check_expected(progress).await? {
            return Ok(fenced);
        }
        let transactions = progress
            .iter()
            .map(|p| Transaction::new(self.app_id(p.partition), p.last_offset))
            .collect();
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: Some(self.partition_columns.clone()),
            predicate: None,
        };
        let snapshot = self
            .table
            .snapshot()
            .map_err(Error::delta(self.name, "commit"))?;
        let committed = CommitBuilder::from(
            CommitProperties::default().with_application_transactions(transactions),
        )
        .with_actions(staged.adds.iter().cloned().map(Action::Add).collect())
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
                tracing::warn!(table = self.name, %conflict, "commit lost a race for its partitions");
                self.refresh().await?;
                Ok(self
                    .check_expected(progress)
                    .await?
                    .unwrap_or(CommitOutcome::Fenced {
                        partition: progress.first().map_or(-1, |p| p.partition),
                        expected: progress.first().and_then(|p| p.expected),
                        found: None,
                    }))
            }
            Err(source) => Err(Error::delta(self.name, "commit")(source)),
        }
    }

    async fn check_expected(
        &self,
        progress: &[PartitionProgress],
    ) -> Result<Option<CommitOutcome>> {
        for p in progress {
            let found = self.stored_version(p.partition).await?;
            if found != p.expected {
                return Ok(Some(CommitOutcome::Fenced {
                    partition: p.partition,
                    expected: p.expected,
                    found,
                }));
            }
        }
        Ok(None)
    }
}
