//! Recent bronze rows in memory, indexed by merchant: the source of the one-merchant
//! evaluation path of `streetflow serve`.
//!
//! Reading one merchant's rows from the lake opens a file in every (operator, day)
//! partition of its lookback window — over a thousand files, about half a second even on
//! a small lake. The cache reads the window once and afterwards only the files each new
//! bronze commit adds, so an evaluation starts from rows already in memory. Rows are kept
//! as bronze has them (duplicates, voids and all): the features are computed from them by
//! the same SQL as the batch job.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::NaiveDate;
use streetflow_core::tables::POS_EVENTS;
use streetflow_lake::Lake;
use streetflow_lake::arrow::array::{Array, AsArray, RecordBatch};
use streetflow_lake::arrow::compute::{cast, interleave_record_batch};
use streetflow_lake::arrow::datatypes::{DataType, SchemaRef};
use streetflow_lake::datafusion::prelude::SessionContext;
use streetflow_lake::deltalake::DeltaTable;
use streetflow_lake::deltalake::delta_datafusion::FileSelection;

use crate::error::{Error, Result};

/// A bronze table version's rows with business dates from `since`, by merchant.
#[derive(Debug)]
pub struct BronzeCache {
    since: NaiveDate,
    version: i64,
    files: HashSet<String>,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    /// operator → merchant → (batch, row) of each of its rows.
    rows: HashMap<String, HashMap<String, Vec<(usize, usize)>>>,
}

/// What changed in bronze since a cache's version: rows to append, or a whole new cache
/// when files were removed (a compaction or vacuum rewrote them).
#[derive(Debug)]
pub enum BronzeChanges {
    /// Rows of the files added since the cached version.
    Appended {
        /// The bronze version they bring the cache to.
        version: i64,
        /// Every file of that version.
        files: HashSet<String>,
        /// Rows of the added files within the cached dates.
        batches: Vec<RecordBatch>,
    },
    /// Bronze was rewritten: the cache read again.
    Reloaded(Box<BronzeCache>),
}

/// Every data file of a bronze snapshot (paths relative to the table).
pub(crate) fn file_paths(table: &DeltaTable) -> Result<HashSet<String>> {
    let snapshot = table
        .snapshot()
        .map_err(|e| streetflow_lake::Error::delta(POS_EVENTS.name, "list files")(e))?;
    Ok(snapshot
        .log_data()
        .iter()
        .map(|f| f.path().to_string())
        .collect())
}

/// The rows of `table` (optionally only `files` of it) with business dates from `since`.
async fn read_rows(
    table: &DeltaTable,
    since: NaiveDate,
    files: Option<Vec<String>>,
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let mut provider = table.table_provider();
    if let Some(files) = files {
        provider = provider.with_file_selection(FileSelection::from_file_paths(files));
    }
    let provider = provider
        .await
        .map_err(Error::query("opening bronze for the cache"))?;
    let ctx = SessionContext::new();
    table
        .update_datafusion_session(&ctx.state())
        .map_err(streetflow_lake::Error::delta(
            POS_EVENTS.name,
            "register object store",
        ))?;
    ctx.register_table(POS_EVENTS.name, provider)
        .map_err(Error::query("registering bronze for the cache"))?;
    let frame = ctx
        .sql(&format!(
            "SELECT * FROM pos_events WHERE business_date >= DATE '{since}'"
        ))
        .await
        .map_err(Error::query("planning the bronze rows for the cache"))?;
    let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
    let batches = frame
        .collect()
        .await
        .map_err(Error::query("reading the bronze rows for the cache"))?;
    Ok((
        schema,
        batches.into_iter().filter(|b| b.num_rows() > 0).collect(),
    ))
}

/// The values of string column `name` of `batch` (cast from dictionaries if need be).
fn string_column(batch: &RecordBatch, name: &str) -> Result<Arc<dyn Array>> {
    let column = batch.column_by_name(name).ok_or_else(|| Error::Arrow {
        context: format!("bronze rows have no column {name}"),
        source: streetflow_lake::arrow::error::ArrowError::SchemaError(name.to_owned()),
    })?;
    cast(column, &DataType::Utf8).map_err(|source| Error::Arrow {
        context: format!("reading {name}"),
        source,
    })
}

impl BronzeCache {
    /// Reads the rows of the newest bronze version with business dates from `since`;
    /// `None` when the lake has no bronze table yet.
    pub async fn load(lake: &Lake, since: NaiveDate) -> Result<Option<Self>> {
        let Some(table) = lake.open(POS_EVENTS.name).await? else {
            return Ok(None);
        };
        Self::from_table(&table, since).await.map(Some)
    }

    async fn from_table(table: &DeltaTable, since: NaiveDate) -> Result<Self> {
        let started = std::time::Instant::now();
        let files = file_paths(table)?;
        let (planned, batches) = read_rows(table, since, None).await?;
        // The batches' nullability can be looser than the plan's; use theirs.
        let schema = batches.first().map_or(planned, RecordBatch::schema);
        let mut cache = Self {
            since,
            version: table.version().map_or(-1, |v| v as i64),
            files,
            schema,
            batches: Vec::new(),
            rows: HashMap::new(),
        };
        cache.append(batches)?;
        tracing::info!(
            bronze_version = cache.version,
            since = %since,
            rows = cache.row_count(),
            merchants = cache.merchant_count(),
            seconds = started.elapsed().as_secs_f64(),
            "bronze cache loaded"
        );
        Ok(cache)
    }

    /// What bronze gained since the cached version (`None`: nothing). Reads only the
    /// added files; does not change the cache, so readers can go on meanwhile.
    pub async fn changes(&self, lake: &Lake) -> Result<Option<BronzeChanges>> {
        let Some(table) = lake.open(POS_EVENTS.name).await? else {
            return Ok(None);
        };
        let version = table.version().map_or(-1, |v| v as i64);
        if version == self.version {
            return Ok(None);
        }
        let files = file_paths(&table)?;
        if !self.files.is_subset(&files) {
            let cache = Self::from_table(&table, self.since).await?;
            return Ok(Some(BronzeChanges::Reloaded(Box::new(cache))));
        }
        let added: Vec<String> = files.difference(&self.files).cloned().collect();
        let batches = if added.is_empty() {
            Vec::new()
        } else {
            read_rows(&table, self.since, Some(added)).await?.1
        };
        Ok(Some(BronzeChanges::Appended {
            version,
            files,
            batches,
        }))
    }

    /// Applies [`Self::changes`]; returns how many rows it added.
    pub fn apply(&mut self, changes: BronzeChanges) -> Result<usize> {
        match changes {
            BronzeChanges::Appended {
                version,
                files,
                batches,
            } => {
                let before = self.row_count();
                self.append(batches)?;
                self.version = version;
                self.files = files;
                Ok(self.row_count() - before)
            }
            BronzeChanges::Reloaded(cache) => {
                *self = *cache;
                Ok(self.row_count())
            }
        }
    }

    fn append(&mut self, batches: Vec<RecordBatch>) -> Result<()> {
        for batch in batches {
            let batch = if batch.schema() == self.schema {
                batch
            } else {
                batch
                    .with_schema(self.schema.clone())
                    .map_err(|source| Error::Arrow {
                        context: "new bronze rows do not match the cached schema".to_owned(),
                        source,
                    })?
            };
            let index = self.batches.len();
            let operators = string_column(&batch, "operator_id")?;
            let merchants = string_column(&batch, "merchant_id")?;
            let (operators, merchants) =
                (operators.as_string::<i32>(), merchants.as_string::<i32>());
            for row in 0..batch.num_rows() {
                if operators.is_null(row) || merchants.is_null(row) {
                    continue;
                }
                let (operator, merchant) = (operators.value(row), merchants.value(row));
                // Look up by borrowed strings: most rows belong to a known merchant.
                if !self.rows.contains_key(operator) {
                    self.rows.insert(operator.to_owned(), HashMap::new());
                }
                let Some(of_operator) = self.rows.get_mut(operator) else {
                    continue;
                };
                match of_operator.get_mut(merchant) {
                    Some(positions) => positions.push((index, row)),
                    None => {
                        of_operator.insert(merchant.to_owned(), vec![(index, row)]);
                    }
                }
            }
            self.batches.push(batch);
        }
        Ok(())
    }

    /// The cached rows of one merchant, in arrival order within each file (an empty
    /// batch for a merchant without rows).
    pub fn merchant_rows(&self, operator_id: &str, merchant_id: &str) -> Result<RecordBatch> {
        let Some(rows) = self
            .rows
            .get(operator_id)
            .and_then(|merchants| merchants.get(merchant_id))
        else {
            return Ok(RecordBatch::new_empty(self.schema.clone()));
        };
        let batches: Vec<&RecordBatch> = self.batches.iter().collect();
        interleave_record_batch(&batches, rows).map_err(|source| Error::Arrow {
            context: format!("gathering the rows of merchant {merchant_id}"),
            source,
        })
    }

    /// The bronze version the cache holds.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The first business date cached.
    pub fn since(&self) -> NaiveDate {
        self.since
    }

    /// Rows cached.
    pub fn row_count(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    /// Merchants with cached rows.
    pub fn merchant_count(&self) -> usize {
        self.rows.values().map(HashMap::len).sum()
    }
}
