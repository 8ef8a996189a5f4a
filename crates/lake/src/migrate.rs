//! Rewriting a table into a new schema in one commit (`streetflow migrate`), and the
//! conversion of a table written by an earlier streetflow into the current contract.
//!
//! Lakes written before knowledge time belonged to the lake have `pos_events.ingested_at`
//! (the Kafka record timestamp, or a file load's time) where `knowledge_time` and
//! `knowledge_source` are now, and no `kafka_timestamp` columns. Lakes written before
//! the month layout partition `pos_events` and `merchant_daily` by (operator, business
//! date) and `dead_letters` by (operator, ingest date). [`Lake::migrate_table`] rewrites
//! such a table in one commit, keeping every row and the ingest offsets and adding the
//! month partition column.
//!
//! What the old times mean afterwards: the lake never recorded when its commits made the
//! old rows visible, so their `ingested_at` is kept as **asserted** knowledge
//! (`knowledge_source = 'asserted'`): every vector computed before the migration is
//! computed again the same, and the rows say that a clock other than the lake's decided
//! their knowledge time. For Kafka rows it is also their `kafka_timestamp` (type
//! unknown: NULL). Rows written after the migration are observed.

use std::sync::Arc;

use deltalake::DeltaTableError;
use deltalake::arrow::array::{ArrayRef, AsArray, Date32Array, StringArray, new_null_array};
use deltalake::arrow::compute::{cast, is_null, nullif};
use deltalake::arrow::datatypes::{DataType, Date32Type, TimeUnit};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, StructType};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use futures::StreamExt;
use streetflow_core::KnowledgeSource;
use streetflow_core::tables::TableDef;

use crate::error::{Error, Result};
use crate::lake::Lake;

/// What a rewrite did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Rows read and written.
    pub rows: u64,
    /// Files the table had before.
    pub files_before: usize,
    /// Files it has now.
    pub files_after: usize,
    /// The version the rewrite committed.
    pub version: u64,
}

impl Lake {
    /// Rewrites table `def` into the current contract when it differs from it (see the
    /// module documentation); `None` when the table is absent or already current.
    pub async fn migrate_table(&self, def: &TableDef) -> Result<Option<Rewritten>> {
        let Some(state) = self.inspect(def).await? else {
            return Ok(None);
        };
        if state.schema_problem.is_none() {
            return Ok(None);
        }
        self.rewrite_table(def, |batch| to_contract(def, batch))
            .await
    }

    /// Reads every row of table `def.name` as it is, passes each batch through `convert`,
    /// and replaces the table's files and schema with the result (`def`'s schema and
    /// partition columns) in one commit. The table keeps its `txn` application versions
    /// (ingest offsets, silver progress). Writers of the table must be stopped: the
    /// commit is refused if another one landed since the rows were read.
    pub async fn rewrite_table(
        &self,
        def: &TableDef,
        mut convert: impl FnMut(RecordBatch) -> Result<RecordBatch>,
    ) -> Result<Option<Rewritten>> {
        let Some(table) = self.open(def.name).await? else {
            return Ok(None);
        };
        let name = def.name;
        let snapshot = table
            .snapshot()
            .map_err(Error::delta(name, "read state"))?
            .clone();
        let files_before = snapshot.log_data().iter().count();
        let ctx = self.pinned_session(name, &table).await?;
        let mut writer = RecordBatchWriter::try_new(
            table.table_url().as_str(),
            def.schema.clone(),
            Some(
                def.partition_columns
                    .iter()
                    .map(|c| (*c).to_owned())
                    .collect(),
            ),
            Some(self.storage_options().clone()),
        )
        .map_err(Error::delta(name, "create writer"))?;
        let mut stream = ctx
            .sql(&format!("SELECT * FROM {name}"))
            .await
            .map_err(|e| Error::Query(e.to_string()))?
            .execute_stream()
            .await
            .map_err(|e| Error::Query(e.to_string()))?;
        let mut rows = 0;
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| Error::Query(e.to_string()))?;
            if batch.num_rows() == 0 {
                continue;
            }
            rows += batch.num_rows() as u64;
            writer
                .write(convert(batch)?)
                .await
                .map_err(Error::delta(name, "write"))?;
        }
        let adds = writer
            .flush()
            .await
            .map_err(Error::delta(name, "write files"))?;
        let files_after = adds.len();
        let schema: StructType = def
            .schema
            .as_ref()
            .try_into_kernel()
            .map_err(|e| Error::delta(name, "convert schema")(DeltaTableError::from(e)))?;
        // The contract's schema and partition columns, the rest of the table's metadata
        // (id, name, configuration) kept.
        let current = snapshot.metadata();
        let metadata: deltalake::kernel::Metadata = serde_json::from_value(serde_json::json!({
            "id": current.id(),
            "name": current.name(),
            "description": current.description(),
            "format": { "provider": "parquet", "options": {} },
            "schemaString": serde_json::to_string(&schema)
                .map_err(|e| Error::delta(name, "new schema")(DeltaTableError::from(e)))?,
            "partitionColumns": def.partition_columns,
            "configuration": current.configuration(),
            "createdTime": current.created_time(),
        }))
        .map_err(|e| Error::delta(name, "new metadata")(DeltaTableError::from(e)))?;
        let mut actions = vec![Action::Metadata(metadata)];
        actions.extend(adds.into_iter().map(Action::Add));
        actions.extend(
            snapshot
                .log_data()
                .iter()
                .map(|file| Action::Remove(file.remove_action(true))),
        );
        let operation = DeltaOperation::Write {
            mode: SaveMode::Overwrite,
            partition_by: Some(
                def.partition_columns
                    .iter()
                    .map(|c| (*c).to_owned())
                    .collect(),
            ),
            predicate: None,
        };
        // Never rebased: a commit that landed after the rows were read (a worker still
        // running) would otherwise stay, in the old layout, beside the rewrite.
        let committed = CommitBuilder::from(CommitProperties::default().with_max_retries(0))
            .with_actions(actions)
            .build(Some(&snapshot), table.log_store(), operation)
            .await
            .map_err(Error::delta(name, "commit the rewrite"))?;
        Ok(Some(Rewritten {
            rows,
            files_before,
            files_after,
            version: committed.version(),
        }))
    }
}

fn migration_error(table: &str) -> impl Fn(ArrowError) -> Error + '_ {
    move |source| Error::Migration {
        table: table.to_owned(),
        detail: source.to_string(),
    }
}

/// The column `name` of `batch`, or an error naming the table.
fn column<'a>(batch: &'a RecordBatch, name: &str, table: &str) -> Result<&'a ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| Error::Migration {
        table: table.to_owned(),
        detail: format!("it has neither {name} nor the current columns"),
    })
}

/// `times` where the row came from Kafka (`kafka_topic` set), NULL for file loads.
fn kafka_times(batch: &RecordBatch, times: &ArrayRef, table: &str) -> Result<ArrayRef> {
    let topics = column(batch, "kafka_topic", table)?;
    let fail = migration_error(table);
    let file_rows = is_null(topics).map_err(&fail)?;
    nullif(times, &file_rows).map_err(fail)
}

/// An old-contract batch of `def` in the current contract: columns the old table has
/// are kept (cast to the contract's type), the new ones derived from `ingested_at`.
pub fn to_contract(def: &TableDef, batch: RecordBatch) -> Result<RecordBatch> {
    let fail = migration_error(def.name);
    let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let ingested = || -> Result<ArrayRef> {
        cast(column(&batch, "ingested_at", def.name)?, &utc).map_err(&fail)
    };
    // The month partition columns of the current layout, from the day columns.
    let months_of = |day_column: &str| -> Result<ArrayRef> {
        let days = cast(column(&batch, day_column, def.name)?, &DataType::Date32).map_err(&fail)?;
        Ok(Arc::new(Date32Array::from_iter(
            days.as_primitive::<Date32Type>()
                .iter()
                .map(|day| day.map(streetflow_core::tables::month_of)),
        )))
    };
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(def.schema.fields().len());
    for field in def.schema.fields() {
        let name = field.name().as_str();
        let value: ArrayRef = match (name, batch.column_by_name(name)) {
            (_, Some(existing)) => cast(existing, field.data_type()).map_err(&fail)?,
            ("business_month", None) => months_of("business_date")?,
            ("ingest_month", None) => months_of("ingest_date")?,
            ("knowledge_time", None) => ingested()?,
            ("knowledge_source", None) => Arc::new(StringArray::from(vec![
                KnowledgeSource::Asserted.as_str();
                batch.num_rows()
            ])),
            ("kafka_timestamp", None) => kafka_times(&batch, &ingested()?, def.name)?,
            ("kafka_timestamp_type", None) => new_null_array(&DataType::Utf8, batch.num_rows()),
            (other, _) => {
                return Err(Error::Migration {
                    table: def.name.to_owned(),
                    detail: format!("it has no column {other} to migrate from"),
                });
            }
        };
        columns.push(value);
    }
    RecordBatch::try_new(def.schema.clone(), columns).map_err(fail)
}
