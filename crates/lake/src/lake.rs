//! The lake root and its tables.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use deltalake::arrow::datatypes::Schema as ArrowSchema;
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::{TryIntoArrow, TryIntoKernel};
use deltalake::{DeltaTable, DeltaTableError, TableProperty};
use streetflow_core::tables::TableDef;
use url::Url;

use crate::error::{Error, Result};

/// Commits between Delta checkpoints: readers replay at most this many JSON commits.
const CHECKPOINT_INTERVAL: &str = "50";

/// A table's state as [`Lake::inspect`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableState {
    /// Latest Delta version.
    pub version: i64,
    /// Data files in that version.
    pub files: usize,
    /// How the table's columns differ from the contract, if they do.
    pub schema_problem: Option<String>,
}

/// A lake: a root location with one Delta table per directory.
#[derive(Debug, Clone)]
pub struct Lake {
    root: Url,
    storage_options: HashMap<String, String>,
}

impl Lake {
    /// A lake at `location`: a local directory (created if missing) or an object-store
    /// URL such as `s3://bucket/prefix`.
    pub fn new(location: &str, storage_options: &BTreeMap<String, String>) -> Result<Self> {
        // s3:// and s3a:// URLs: deltalake's S3 object and log stores (commits by
        // conditional put, If-None-Match, which S3 and compatible stores support).
        static S3_HANDLERS: std::sync::Once = std::sync::Once::new();
        S3_HANDLERS.call_once(|| deltalake::aws::register_handlers(None));
        let bad = |reason: String| Error::BadLocation {
            location: location.to_owned(),
            reason,
        };
        let root = if location.contains("://") {
            let mut url = Url::parse(location).map_err(|e| bad(e.to_string()))?;
            if !url.path().ends_with('/') {
                url.set_path(&format!("{}/", url.path()));
            }
            url
        } else {
            let path = Path::new(location);
            std::fs::create_dir_all(path)
                .map_err(|e| bad(format!("cannot create directory: {e}")))?;
            let absolute = path
                .canonicalize()
                .map_err(|e| bad(format!("cannot resolve path: {e}")))?;
            Url::from_directory_path(&absolute)
                .map_err(|()| bad("not an absolute path".to_owned()))?
        };
        Ok(Self {
            root,
            storage_options: storage_options
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    /// The object-store options the lake was opened with.
    pub(crate) fn storage_options(&self) -> &HashMap<String, String> {
        &self.storage_options
    }

    /// The root URL (ends with `/`).
    pub fn root(&self) -> &Url {
        &self.root
    }

    /// Where table `name` lives.
    pub fn table_url(&self, name: &str) -> Result<Url> {
        self.root
            .join(&format!("{name}/"))
            .map_err(|e| Error::BadLocation {
                location: self.root.to_string(),
                reason: e.to_string(),
            })
    }

    async fn load(&self, name: &str) -> Result<DeltaTable> {
        let url = self.table_url(name)?;
        // Object stores have no directories; a local table needs its own.
        if let Ok(path) = url.to_file_path() {
            std::fs::create_dir_all(&path).map_err(|e| Error::BadLocation {
                location: path.display().to_string(),
                reason: format!("cannot create table directory: {e}"),
            })?;
        }
        DeltaTable::try_from_url_with_storage_options(url, self.storage_options.clone())
            .await
            .map_err(Error::delta(name, "open"))
    }

    /// Opens table `name` if it exists.
    pub async fn open(&self, name: &str) -> Result<Option<DeltaTable>> {
        // A local table without a log does not exist: say so without asking the Delta
        // kernel, which logs an error for it (and without creating its directory).
        if let Ok(path) = self.table_url(name)?.to_file_path() {
            let has_log = std::fs::read_dir(path.join("_delta_log"))
                .is_ok_and(|mut entries| entries.next().is_some());
            if !has_log {
                return Ok(None);
            }
        }
        match self.load(name).await {
            Ok(table) => Ok(table.version().is_some().then_some(table)),
            // An object store has no directories: a table without a log is just absent.
            Err(Error::Delta { source, .. })
                if matches!(
                    source.as_ref(),
                    DeltaTableError::NotATable(_) | DeltaTableError::InvalidTableLocation(_)
                ) =>
            {
                Ok(None)
            }
            // A log that does not load may be damaged: name the file, not only the
            // kernel's complaint.
            // (Not for errors worth retrying, such as a store that does not answer, and
            // not for a bad `_last_checkpoint`: readers only warn about that hint.)
            Err(other) if other.is_retryable() => Err(other),
            Err(other) => match self.find_log_damage(name).await {
                Ok(damage) => {
                    let damage: Vec<_> = damage
                        .into_iter()
                        .filter(|d| !d.file.ends_with("_last_checkpoint"))
                        .collect();
                    if damage.is_empty() {
                        Err(other)
                    } else {
                        Err(Error::Damaged {
                            table: name.to_owned(),
                            damage,
                        })
                    }
                }
                Err(_) => Err(other),
            },
        }
    }

    /// Opens the table, creating it with the contract's schema if it does not exist yet,
    /// and refuses a table whose columns differ from the contract.
    pub async fn open_or_create(&self, def: &TableDef) -> Result<DeltaTable> {
        let table = match self.open(def.name).await? {
            Some(table) => table,
            // Not there yet: an unloaded handle to create it with (loading would make the
            // Delta kernel log an error for the missing log).
            None => {
                let url = self.table_url(def.name)?;
                if let Ok(path) = url.to_file_path() {
                    std::fs::create_dir_all(&path).map_err(|e| Error::BadLocation {
                        location: path.display().to_string(),
                        reason: format!("cannot create table directory: {e}"),
                    })?;
                }
                deltalake::DeltaTableBuilder::from_url(url)
                    .map(|b| b.with_storage_options(self.storage_options.clone()))
                    .and_then(|b| b.build())
                    .map_err(Error::delta(def.name, "open"))?
            }
        };
        let table = if table.version().is_some() {
            table
        } else {
            let schema: StructType =
                def.schema.as_ref().try_into_kernel().map_err(|e| {
                    Error::delta(def.name, "convert schema")(DeltaTableError::from(e))
                })?;
            let created = table
                .create()
                .with_table_name(def.name)
                .with_comment(def.description)
                .with_columns(schema.fields().cloned())
                .with_partition_columns(def.partition_columns.iter().copied())
                .with_configuration_property(
                    TableProperty::CheckpointInterval,
                    Some(CHECKPOINT_INTERVAL),
                )
                .await;
            match created {
                Ok(table) => {
                    tracing::info!(table = def.name, url = %self.table_url(def.name)?, "created Delta table");
                    table
                }
                // Another worker may have created it first: use theirs.
                Err(create_error) => {
                    let table = self.load(def.name).await?;
                    if table.version().is_none() {
                        return Err(Error::delta(def.name, "create")(create_error));
                    }
                    table
                }
            }
        };
        self.check_schema(&table, def)?;
        Ok(table)
    }

    /// What an operator needs to know about one table: `None` when it does not exist.
    pub async fn inspect(&self, def: &TableDef) -> Result<Option<TableState>> {
        let Some(table) = self.open(def.name).await? else {
            return Ok(None);
        };
        let snapshot = table
            .snapshot()
            .map_err(Error::delta(def.name, "read state"))?;
        let files = snapshot.log_data().iter().count();
        let schema_problem = match self.check_schema(&table, def) {
            Ok(()) => None,
            Err(Error::SchemaMismatch { detail, .. }) => Some(detail),
            Err(other) => return Err(other),
        };
        Ok(Some(TableState {
            version: table.version().unwrap_or_default() as i64,
            files,
            schema_problem,
        }))
    }

    /// The version a Delta `txn` application id recorded in table `name` (`None`: the
    /// table or the id is absent).
    pub async fn app_version(&self, name: &str, app_id: &str) -> Result<Option<i64>> {
        let Some(table) = self.open(name).await? else {
            return Ok(None);
        };
        let snapshot = table
            .snapshot()
            .map_err(Error::delta(name, "read application versions"))?;
        snapshot
            .transaction_version(table.log_store().as_ref(), app_id)
            .await
            .map_err(Error::delta(name, "read application versions"))
    }

    fn check_schema(&self, table: &DeltaTable, def: &TableDef) -> Result<()> {
        let mismatch = |detail: String| Error::SchemaMismatch {
            table: def.name.to_owned(),
            url: table.table_url().to_string(),
            detail,
        };
        let snapshot = table
            .snapshot()
            .map_err(Error::delta(def.name, "read schema"))?;
        let actual: ArrowSchema = snapshot
            .schema()
            .as_ref()
            .try_into_arrow()
            .map_err(|e| mismatch(format!("unreadable schema: {e}")))?;
        for expected in def.schema.fields() {
            let found = actual
                .field_with_name(expected.name())
                .map_err(|_| mismatch(format!("column {} is missing", expected.name())))?;
            if found.data_type() != expected.data_type() {
                return Err(mismatch(format!(
                    "column {} is {}, expected {}",
                    expected.name(),
                    found.data_type(),
                    expected.data_type()
                )));
            }
        }
        let partitions = snapshot.metadata().partition_columns();
        if partitions
            .iter()
            .map(String::as_str)
            .ne(def.partition_columns.iter().copied())
        {
            return Err(mismatch(format!(
                "partitioned by {partitions:?}, expected {:?}",
                def.partition_columns
            )));
        }
        Ok(())
    }
}
