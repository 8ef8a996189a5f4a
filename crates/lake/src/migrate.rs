//! Rewriting a table into a new schema in one commit (`streetflow migrate`).

use deltalake::DeltaTableError;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, StructType};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use futures::StreamExt;
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
