//! Appending to one table with Kafka offsets in the same Delta commit.

use deltalake::arrow::array::UInt32Array;
use deltalake::arrow::compute::take_record_batch;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use std::collections::HashSet;

use deltalake::kernel::{Action, Add, Remove, Transaction};
use deltalake::parquet::basic::Compression;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use streetflow_core::tables::TableDef;

use crate::error::{Error, Result};
use crate::lake::Lake;

/// `YYYY-MM-DD` of a day number (days since 1970-01-01), as Delta writes a date partition.
fn date_text(day: i32) -> String {
    chrono::NaiveDate::default()
        .checked_add_signed(chrono::Duration::days(i64::from(day)))
        .map(|date| date.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

/// Whether a file whose Delta statistics are `stats` may hold a row of one of `dates`:
/// its `business_date` range meets one of them, or it has no usable statistics.
fn may_hold_dates(stats: Option<&str>, dates: &std::collections::BTreeSet<i32>) -> bool {
    let day_of = |value: &serde_json::Value| {
        value
            .as_str()
            .and_then(|text| chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok())
            .map(|date| {
                date.signed_duration_since(chrono::NaiveDate::default())
                    .num_days() as i32
            })
    };
    let Some(stats) = stats.and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
    else {
        return true;
    };
    match (
        day_of(&stats["minValues"]["business_date"]),
        day_of(&stats["maxValues"]["business_date"]),
    ) {
        (Some(first), Some(last)) if first <= last => dates.range(first..=last).next().is_some(),
        _ => true,
    }
}

/// The `operator_id` (as UTF-8) and `business_date` columns of `batch`.
fn day_columns(
    batch: &RecordBatch,
    table: &'static str,
) -> Result<(
    deltalake::arrow::array::StringArray,
    deltalake::arrow::array::Date32Array,
)> {
    use deltalake::arrow::array::AsArray;
    use deltalake::arrow::datatypes::{DataType, Date32Type};
    let missing = |name: &str| {
        Error::delta(table, "group rows by day")(DeltaTableError::Generic(format!(
            "the rows have no {name} column"
        )))
    };
    let operators = batch
        .column_by_name("operator_id")
        .ok_or_else(|| missing("operator_id"))?;
    let operators = deltalake::arrow::compute::cast(operators, &DataType::Utf8)
        .map_err(|e| Error::Query(e.to_string()))?;
    let dates = batch
        .column_by_name("business_date")
        .ok_or_else(|| missing("business_date"))?;
    let dates = dates
        .as_primitive_opt::<Date32Type>()
        .ok_or_else(|| missing("business_date (a date)"))?;
    Ok((operators.as_string::<i32>().clone(), dates.clone()))
}

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

/// Columns that hold a different value in almost every row (event ids, instants,
/// offsets and line numbers): a dictionary never pays for itself there, and building
/// one until Parquet gives up on it cost about 3 % of a load's CPU (measured).
///
/// Not `knowledge_time`: an observed load or a worker stamps one instant per commit, and a
/// dictionary stores that almost for free.
const UNIQUE_COLUMNS: [&str; 5] = [
    "event_id",
    "occurred_at",
    "kafka_offset",
    "kafka_timestamp",
    "source_line",
];

/// The same for nested columns, by their Parquet path: the payer keys of the history's
/// payer-day entries are hashes.
const UNIQUE_NESTED_COLUMNS: [&[&str]; 1] = [&["payers", "list", "element", "payer_key"]];

/// Parquet settings of the rows the writers append: Snappy and `created_by` as delta-rs
/// sets them by default, and no dictionary for [`UNIQUE_COLUMNS`] and [`UNIQUE_NESTED_COLUMNS`] (a
/// table without them is unaffected).
fn writer_properties() -> WriterProperties {
    let paths =
        UNIQUE_COLUMNS
            .iter()
            .map(|column| ColumnPath::from(*column))
            .chain(UNIQUE_NESTED_COLUMNS.iter().map(|parts| {
                ColumnPath::new(parts.iter().map(|part| (*part).to_owned()).collect())
            }));
    paths
        .fold(
            WriterProperties::builder()
                .set_created_by(format!("delta-rs version {}", deltalake::crate_version()))
                .set_compression(Compression::SNAPPY),
            |builder, path| builder.set_column_dictionary_enabled(path, false),
        )
        .build()
}

/// Appends batches to one table and commits them with per-partition `txn` actions
/// whose application id is `<prefix>-<partition>`.
pub struct OffsetWriter {
    name: &'static str,
    app_prefix: String,
    table: DeltaTable,
    writer: RecordBatchWriter,
    partition_columns: Vec<String>,
    /// The identity of the source the offsets belong to ([`OffsetWriter::set_source`]).
    source: Option<i64>,
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
            .map_err(Error::delta(def.name, "create writer"))?
            .with_writer_properties(writer_properties());
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
            source: None,
        })
    }

    /// The Delta `txn` application id of a partition.
    pub fn app_id(&self, partition: i32) -> String {
        format!("{}-{partition}", self.app_prefix)
    }

    /// The Delta `txn` application id that records which source (topic) the partition
    /// offsets of this prefix belong to.
    pub fn source_app_id(&self) -> String {
        format!("{}-source", self.app_prefix)
    }

    /// The source identity the table records for this prefix, from the newest version.
    pub async fn recorded_source(&mut self) -> Result<Option<i64>> {
        self.refresh().await?;
        self.stored_app_version(&self.source_app_id()).await
    }

    /// Ties every later offset commit to `identity` (a number standing for the topic):
    /// the first commit records it, and every commit is refused with
    /// [`Error::SourceChanged`] when the table holds another, so offsets of one topic never decide what is skipped in
    /// another (a renamed, recreated or failed-over topic starts at offsets of its own).
    pub fn set_source(&mut self, identity: i64) {
        self.source = Some(identity);
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

    /// Replaces every row whose (`operator_id`, `business_date`) is in `days` (dates as
    /// days since 1970-01-01) by the staged files, in one commit that also records
    /// `progress`: for tables partitioned by `business_month`, whose rows of one day are
    /// spread over files that hold other days too.
    ///
    /// The files that may hold such rows (in the days' months, with a `business_date`
    /// range that meets one of the days, or without statistics) are removed, and their
    /// other rows written again, one file per business date, so a day rewritten often
    /// never drags the rest of its month along. As in [`OffsetWriter::replace_partitions`],
    /// the listing, the rows carried over and the commit all belong to one snapshot; when
    /// another commit (a compaction) landed meanwhile, the carried files are deleted and
    /// all of it is done again on the newer snapshot.
    pub async fn replace_days(
        &mut self,
        staged: &StagedFiles,
        days: &HashSet<(String, i32)>,
        progress: &[AppProgress],
    ) -> Result<CommitOutcome> {
        const ATTEMPTS: usize = 20;
        let dates: std::collections::BTreeSet<i32> = days.iter().map(|(_, d)| *d).collect();
        let months: HashSet<String> = dates
            .iter()
            .map(|&d| date_text(streetflow_core::tables::month_of(d)))
            .collect();
        for attempt in 1..=ATTEMPTS {
            self.refresh().await?;
            let snapshot = self
                .table
                .snapshot()
                .map_err(Error::delta(self.name, "list files"))?;
            let mut candidates = Vec::new();
            let mut removes = Vec::new();
            for file in snapshot.log_data().iter() {
                let in_month = file
                    .partition_values_map()
                    .get("business_month")
                    .cloned()
                    .flatten()
                    .is_none_or(|month| months.contains(&month));
                if in_month && may_hold_dates(file.stats().as_deref(), &dates) {
                    candidates.push(file.path().to_string());
                    removes.push(file.remove_action(true));
                }
            }
            let carried = if candidates.is_empty() {
                StagedFiles::default()
            } else {
                self.carry_over(candidates, days).await?
            };
            let mut all = staged.clone();
            all.adds.extend(carried.adds.iter().cloned());
            match self
                .commit_on_snapshot(&all, removes, progress, SaveMode::Overwrite)
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
                    self.delete_unreferenced(&carried).await?;
                    tracing::debug!(
                        table = self.name,
                        attempt,
                        "the table moved during a replace; listing again"
                    );
                    tokio_sleep(attempt).await;
                }
                Ok(fenced @ CommitOutcome::Fenced { .. }) => {
                    self.delete_unreferenced(&carried).await?;
                    return Ok(fenced);
                }
                other => return other,
            }
        }
        Err(Error::delta(self.name, "replace days")(
            DeltaTableError::Generic(format!(
                "other commits kept landing while the replacement was committed ({ATTEMPTS} attempts)"
            )),
        ))
    }

    /// Writes the rows of `files` (paths in the writer's snapshot) whose day is not in
    /// `days`, one file per business date, and stages them. The rows are streamed in
    /// date order, so memory holds one date's rows being written, not the files'.
    async fn carry_over(
        &mut self,
        files: Vec<String>,
        days: &HashSet<(String, i32)>,
    ) -> Result<StagedFiles> {
        use deltalake::datafusion::prelude::{SessionContext, col};
        use futures::StreamExt;
        let query_error =
            |e: deltalake::datafusion::error::DataFusionError| Error::Query(e.to_string());
        let ctx = SessionContext::new();
        self.table
            .update_datafusion_session(&ctx.state())
            .map_err(Error::delta(self.name, "register object store"))?;
        let provider = self
            .table
            .table_provider()
            .with_file_paths(files)
            .await
            .map_err(query_error)?;
        let mut rows = ctx
            .read_table(provider)
            .and_then(|frame| frame.sort(vec![col("business_date").sort(true, false)]))
            .map_err(query_error)?
            .execute_stream()
            .await
            .map_err(query_error)?;
        let touched: HashSet<(&str, i32)> = days.iter().map(|(o, d)| (o.as_str(), *d)).collect();
        let mut carried = StagedFiles::default();
        let mut open_date = None;
        while let Some(batch) = rows.next().await {
            let batch = self.in_table_order(batch.map_err(query_error)?)?;
            let (operators, business_dates) = day_columns(&batch, self.name)?;
            let mut row = 0;
            while row < batch.num_rows() {
                let date = business_dates.value(row);
                let run_end = (row..batch.num_rows())
                    .find(|&r| business_dates.value(r) != date)
                    .unwrap_or(batch.num_rows());
                if open_date.is_some_and(|open| open != date) {
                    carried.adds.extend(self.stage().await?.adds);
                }
                open_date = Some(date);
                let kept: Vec<u32> = (row..run_end)
                    .filter(|&r| !touched.contains(&(operators.value(r), date)))
                    .map(|r| r as u32)
                    .collect();
                if !kept.is_empty() {
                    let kept = take_record_batch(&batch, &UInt32Array::from(kept))
                        .map_err(|e| Error::Query(e.to_string()))?;
                    self.write(kept).await?;
                }
                row = run_end;
            }
        }
        carried.adds.extend(self.stage().await?.adds);
        Ok(carried)
    }

    /// Writes `batches` (rows with `operator_id` and `business_date`) one file per
    /// business date, and stages them: the files [`OffsetWriter::replace_days`] removes
    /// when it rewrites one of those days then hold that day alone.
    pub async fn stage_days(&mut self, batches: Vec<RecordBatch>) -> Result<StagedFiles> {
        let mut by_date: std::collections::BTreeMap<i32, Vec<RecordBatch>> = Default::default();
        for batch in batches {
            let (_, business_dates) = day_columns(&batch, self.name)?;
            let mut rows_of: std::collections::BTreeMap<i32, Vec<u32>> = Default::default();
            for row in 0..batch.num_rows() {
                rows_of
                    .entry(business_dates.value(row))
                    .or_default()
                    .push(row as u32);
            }
            for (date, rows) in rows_of {
                let rows = take_record_batch(&batch, &UInt32Array::from(rows))
                    .map_err(|e| Error::Query(e.to_string()))?;
                by_date.entry(date).or_default().push(rows);
            }
        }
        let mut staged = StagedFiles::default();
        for (_, batches) in by_date {
            for batch in batches {
                self.write(batch).await?;
            }
            staged.adds.extend(self.stage().await?.adds);
        }
        Ok(staged)
    }

    /// `batch`'s columns in the table's schema order and types (a scan puts partition
    /// columns last and may read strings as views).
    fn in_table_order(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let schema = self.writer.arrow_schema();
        let columns = schema
            .fields()
            .iter()
            .map(|field| {
                let column = batch.column_by_name(field.name()).ok_or_else(|| {
                    Error::delta(self.name, "carry rows over")(DeltaTableError::Generic(format!(
                        "a scan lacks column {}",
                        field.name()
                    )))
                })?;
                deltalake::arrow::compute::cast(column, field.data_type())
                    .map_err(|e| Error::Query(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        RecordBatch::try_new(schema, columns).map_err(|e| Error::Query(e.to_string()))
    }

    /// Deletes the files of `staged` that the newest table version does not reference:
    /// written for a commit that did not happen. A commit reported as failed may still
    /// have landed (a conditional write retried by the store), so the table is asked
    /// first; the deletion is best effort, since a file left behind is never read.
    async fn delete_unreferenced(&mut self, staged: &StagedFiles) -> Result<()> {
        use futures::StreamExt;
        if staged.adds.is_empty() {
            return Ok(());
        }
        self.refresh().await?;
        let referenced: HashSet<String> = self
            .table
            .snapshot()
            .map_err(Error::delta(self.name, "list files"))?
            .log_data()
            .iter()
            .map(|file| file.path().to_string())
            .collect();
        let paths: Vec<Result<deltalake::Path, deltalake::ObjectStoreError>> = staged
            .adds
            .iter()
            .filter(|add| !referenced.contains(add.path.as_str()))
            .map(|add| Ok(deltalake::Path::from(add.path.as_str())))
            .collect();
        let mut deleted = self
            .table
            .object_store()
            .delete_stream(futures::stream::iter(paths).boxed());
        while let Some(result) = deleted.next().await {
            if let Err(error) = result {
                tracing::warn!(table = self.name, %error, "could not delete an uncommitted file");
            }
        }
        Ok(())
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
        if let Some(settled) = self.check_expected(staged, progress).await? {
            return Ok(settled);
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
        let mut progress = progress.to_vec();
        if let Some(identity) = self.source.filter(|_| !progress.is_empty()) {
            let recorded = self.stored_app_version(&self.source_app_id()).await?;
            match recorded {
                Some(recorded) if recorded != identity => {
                    return Err(Error::SourceChanged {
                        table: self.name,
                        app_prefix: self.app_prefix.clone(),
                        recorded,
                        identity,
                    });
                }
                Some(_) => {}
                // Recorded once, by the first commit: a txn id every commit set would make
                // the workers of one group conflict with each other on every overlap.
                None => progress.push(AppProgress {
                    app_id: self.source_app_id(),
                    expected: None,
                    version: identity,
                }),
            }
        }
        let progress = progress.as_slice();
        if let Some(settled) = self.check_expected(staged, progress).await? {
            return Ok(settled);
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
                    .check_expected(staged, progress)
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

    /// Whether the commit must not be made: `Fenced` when a source is not at the version
    /// this writer expects, or `Committed` when the table already holds this very commit
    /// (every source at the version it proposes, and every staged file in the table): an
    /// earlier attempt landed although its caller saw an error, and the retry must not
    /// take the writer's own commit for another writer's. `None`: commit.
    async fn check_expected(
        &self,
        staged: &StagedFiles,
        progress: &[AppProgress],
    ) -> Result<Option<CommitOutcome>> {
        let mut fenced = None;
        let mut all_at_proposed = true;
        for p in progress {
            let found = self.stored_app_version(&p.app_id).await?;
            all_at_proposed &= found == Some(p.version);
            if found != p.expected && fenced.is_none() {
                fenced = Some(CommitOutcome::Fenced {
                    app_id: p.app_id.clone(),
                    expected: p.expected,
                    found,
                });
            }
        }
        if fenced.is_some() && all_at_proposed && self.holds_files(staged)? {
            let version = self.table.version().unwrap_or_default();
            tracing::info!(
                table = self.name,
                version,
                "an earlier attempt of this commit landed; taking it as committed"
            );
            return Ok(Some(CommitOutcome::Committed { version }));
        }
        Ok(fenced)
    }

    /// Whether the newest snapshot the writer holds references every staged file (staged
    /// file names are unique to one writer's one stage). An offsets-only commit holds no
    /// files, and a table at its proposed offsets holds what that commit would have made.
    fn holds_files(&self, staged: &StagedFiles) -> Result<bool> {
        if staged.adds.is_empty() {
            return Ok(true);
        }
        let wanted: HashSet<&str> = staged.adds.iter().map(|add| add.path.as_str()).collect();
        let snapshot = self
            .table
            .snapshot()
            .map_err(Error::delta(self.name, "list files"))?;
        let found = snapshot
            .log_data()
            .iter()
            .filter(|file| wanted.contains(file.path().as_ref()))
            .count();
        Ok(found == wanted.len())
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

    static DAYS: LazyLock<TableDef> = LazyLock::new(|| TableDef {
        name: "days",
        description: "test table of days",
        schema: Arc::new(Schema::new(vec![
            Field::new("operator_id", DataType::Utf8, false),
            Field::new("business_date", DataType::Date32, false),
            Field::new("n", DataType::Int64, false),
            Field::new("business_month", DataType::Date32, false),
        ])),
        partition_columns: &["business_month"],
    });

    /// Rows of (operator, day number, n).
    fn day_rows(rows: &[(&str, i32, i64)]) -> RecordBatch {
        use deltalake::arrow::array::Date32Array;
        RecordBatch::try_new(
            DAYS.schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Date32Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
                Arc::new(Date32Array::from_iter_values(
                    rows.iter().map(|r| streetflow_core::tables::month_of(r.1)),
                )),
            ],
        )
        .unwrap()
    }

    /// Every (operator, day, n) of the days table, sorted.
    async fn day_table(lake: &Lake) -> Vec<(String, i32, i64)> {
        use deltalake::arrow::array::AsArray;
        use deltalake::arrow::datatypes::{Date32Type, Int64Type};
        let table = lake.open("days").await.unwrap().unwrap();
        let ctx = lake.pinned_session("days", &table).await.unwrap();
        let batches = ctx
            .sql("SELECT operator_id, business_date, n FROM days")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut rows = Vec::new();
        for batch in batches {
            let operators = deltalake::arrow::compute::cast(
                batch.column(0),
                &deltalake::arrow::datatypes::DataType::Utf8,
            )
            .unwrap();
            for row in 0..batch.num_rows() {
                rows.push((
                    operators.as_string::<i32>().value(row).to_owned(),
                    batch.column(1).as_primitive::<Date32Type>().value(row),
                    batch.column(2).as_primitive::<Int64Type>().value(row),
                ));
            }
        }
        rows.sort();
        rows
    }

    /// Defect 9 of issue 20: files of a writer fenced or killed before its commit are in
    /// no version; vacuum deletes them once they are a day old (it used to keep them
    /// forever), and never a younger one, which may be a running writer's next commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vacuum_deletes_day_old_files_no_commit_added_and_spares_younger_ones() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
        let mut writer = OffsetWriter::new(&lake, &TABLE, "w").await.unwrap();
        writer.write(batch(&[1, 2, 3])).await.unwrap();
        let staged = writer.stage().await.unwrap();
        writer.commit_appended(&staged, &[]).await.unwrap();
        let partition = dir.path().join("numbers").join("shard=x");
        let committed = std::fs::read_dir(&partition)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "parquet"))
            .unwrap();
        // Two files no commit added, as a fenced or crashed writer leaves them.
        let stale = partition.join("part-00000-stale-orphan.c000.zstd.parquet");
        let fresh = partition.join("part-00000-fresh-orphan.c000.zstd.parquet");
        std::fs::copy(&committed, &stale).unwrap();
        std::fs::copy(&committed, &fresh).unwrap();
        let two_days_ago =
            std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 24 * 3600);
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(two_days_ago)
            .unwrap();

        let dry = lake.vacuum("numbers", 0, true).await.unwrap().unwrap();
        assert_eq!(dry.files_deleted, 1, "{dry:?}");
        assert!(stale.exists(), "a dry run deletes nothing");
        let report = lake.vacuum("numbers", 0, false).await.unwrap().unwrap();
        assert_eq!(report.files_deleted, 1, "{report:?}");
        assert!(!stale.exists(), "the day-old orphan is gone");
        assert!(
            fresh.exists(),
            "an hour-old file may be a running writer's: kept"
        );
        assert!(committed.exists());
        assert_eq!(rows(&lake).await, 3);
        let report = lake.vacuum("numbers", 168, false).await.unwrap().unwrap();
        assert_eq!(report.files_deleted, 0, "{report:?}");
        assert!(fresh.exists());

        // Files a compaction just replaced are judged by their removal, not their age:
        // old files removed a moment ago stay for the week's retention.
        writer.write(batch(&[4])).await.unwrap();
        let staged = writer.stage().await.unwrap();
        writer.commit_appended(&staged, &[]).await.unwrap();
        let before: Vec<_> = std::fs::read_dir(&partition)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "parquet") && *p != fresh)
            .collect();
        lake.compact("numbers", &[], None).await.unwrap();
        for file in &before {
            std::fs::File::options()
                .write(true)
                .open(file)
                .unwrap()
                .set_modified(two_days_ago)
                .unwrap();
        }
        let report = lake.vacuum("numbers", 168, false).await.unwrap().unwrap();
        assert_eq!(report.files_deleted, 0, "{report:?}");
        assert!(before.iter().all(|f| f.exists()));
        assert_eq!(rows(&lake).await, 4);
    }

    /// Days 20000..20002 are in one month (2024-10-04..06); day 20030 in the next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replacing_days_keeps_every_other_row_once_even_across_a_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
        let mut writer = OffsetWriter::new(&lake, &DAYS, "d").await.unwrap();
        // Two commits, each a file spanning several days and operators of one month,
        // and one file of the next month.
        for rows in [
            vec![("a", 20000, 1), ("b", 20000, 2), ("a", 20001, 3)],
            vec![("a", 20002, 4), ("b", 20001, 5), ("a", 20030, 6)],
        ] {
            writer.write(day_rows(&rows)).await.unwrap();
            let staged = writer.stage().await.unwrap();
            writer.commit_appended(&staged, &[]).await.unwrap();
        }
        // A compaction merges the month's two files into one.
        lake.compact("days", &[], None).await.unwrap();
        // Replace day 20001 of operator a (once 3) and day 20000 of b (once 2, now gone).
        let mut replacer = OffsetWriter::new(&lake, &DAYS, "r").await.unwrap();
        let staged = replacer
            .stage_days(vec![day_rows(&[("a", 20001, 30)])])
            .await
            .unwrap();
        let days = HashSet::from([("a".to_owned(), 20001), ("b".to_owned(), 20000)]);
        let outcome = replacer.replace_days(&staged, &days, &[]).await.unwrap();
        assert!(matches!(outcome, CommitOutcome::Committed { .. }));
        assert_eq!(
            day_table(&lake).await,
            vec![
                ("a".to_owned(), 20000, 1),
                ("a".to_owned(), 20001, 30),
                ("a".to_owned(), 20002, 4),
                ("a".to_owned(), 20030, 6),
                ("b".to_owned(), 20001, 5),
            ]
        );
        // The carried rows are written one file per date; the other month is untouched.
        let table = lake.open("days").await.unwrap().unwrap();
        let snapshot = table.snapshot().unwrap();
        let mut dates_per_file: Vec<(i32, i32)> = snapshot
            .log_data()
            .iter()
            .map(|file| {
                let stats: serde_json::Value =
                    serde_json::from_str(&file.stats().unwrap()).unwrap();
                let day = |v: &serde_json::Value| {
                    (chrono::NaiveDate::parse_from_str(v.as_str().unwrap(), "%Y-%m-%d").unwrap()
                        - chrono::NaiveDate::default())
                    .num_days() as i32
                };
                (
                    day(&stats["minValues"]["business_date"]),
                    day(&stats["maxValues"]["business_date"]),
                )
            })
            .collect();
        dates_per_file.sort();
        assert_eq!(
            dates_per_file,
            vec![
                (20000, 20000),
                (20001, 20001),
                (20001, 20001),
                (20002, 20002),
                (20030, 20030)
            ]
        );

        // A compaction landing between a replace's listing and its commit: the replace
        // lists again, carries the rows again, and deletes the files it carried first.
        let staged = replacer
            .stage_days(vec![day_rows(&[("a", 20002, 40)])])
            .await
            .unwrap();
        let days = HashSet::from([("a".to_owned(), 20002)]);
        replacer.refresh().await.unwrap();
        let stale_removes: Vec<Remove> = replacer
            .table
            .snapshot()
            .unwrap()
            .log_data()
            .iter()
            .filter(|f| {
                may_hold_dates(
                    f.stats().as_deref(),
                    &std::collections::BTreeSet::from([20002]),
                )
            })
            .map(|f| f.remove_action(true))
            .collect();
        lake.compact("days", &[], None).await.unwrap();
        let stale = replacer
            .commit_on_snapshot(&staged, stale_removes, &[], SaveMode::Overwrite)
            .await;
        assert!(stale.is_err(), "{stale:?}");
        let outcome = replacer.replace_days(&staged, &days, &[]).await.unwrap();
        assert!(matches!(outcome, CommitOutcome::Committed { .. }));
        assert_eq!(
            day_table(&lake).await,
            vec![
                ("a".to_owned(), 20000, 1),
                ("a".to_owned(), 20001, 30),
                ("a".to_owned(), 20002, 40),
                ("a".to_owned(), 20030, 6),
                ("b".to_owned(), 20001, 5),
            ]
        );
    }

    #[test]
    fn a_file_without_date_statistics_may_hold_any_day() {
        let days = std::collections::BTreeSet::from([20001]);
        assert!(may_hold_dates(None, &days));
        assert!(may_hold_dates(Some(r#"{"numRecords":3}"#), &days));
        let stats = |min: &str, max: &str| {
            format!(
                r#"{{"numRecords":3,"minValues":{{"business_date":"{min}"}},"maxValues":{{"business_date":"{max}"}}}}"#
            )
        };
        // 20001 is 2024-10-05.
        assert!(may_hold_dates(
            Some(&stats("2024-10-04", "2024-10-06")),
            &days
        ));
        assert!(may_hold_dates(
            Some(&stats("2024-10-05", "2024-10-05")),
            &days
        ));
        assert!(!may_hold_dates(
            Some(&stats("2024-10-06", "2024-10-31")),
            &days
        ));
        assert!(!may_hold_dates(
            Some(&stats("2024-10-01", "2024-10-04")),
            &days
        ));
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
