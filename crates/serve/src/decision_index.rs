//! The latest stored decision of every (product, operator, merchant), with the feature
//! row it was decided on, in memory: what `GET /v1/merchants/{operator}/{merchant}/decision`
//! answers from.
//!
//! Asking the lake per request (the latest decision, then its feature row) planned two
//! DataFusion queries over the Delta tables and read every `as_of_date` partition of the
//! merchant, growing with the history (figures in `deploy/SCALING.md`, "Why the
//! designs"). The
//! index is read once, and again whenever either table has a new version; rows stay
//! columnar (a few hundred bytes a merchant) and become JSON only when asked for.

use std::collections::HashMap;

use serde_json::{Map, Value};
use streetflow_core::tables::{CREDIT_DECISIONS, MERCHANT_FEATURES};
use streetflow_lake::Lake;
use streetflow_lake::arrow::array::{AsArray, RecordBatch};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::{DataType, Date32Type};

use crate::error::{Error, Result};

/// Where a row is: (batch, row).
type Position = (usize, usize);

/// A JSON object of one row's columns.
type Row = Map<String, Value>;

/// The latest decisions and their feature rows; see the module documentation.
#[derive(Debug, Default)]
pub struct DecisionIndex {
    /// Versions of `credit_decisions` and `merchant_features` read (-1: no table).
    versions: (i64, i64),
    decisions: Vec<RecordBatch>,
    features: Vec<RecordBatch>,
    /// (product, operator, merchant) → its latest decision.
    latest: HashMap<(String, String, String), Position>,
    /// (as-of day, operator, merchant) → its feature row.
    feature_rows: HashMap<(i32, String, String), Position>,
}

/// The latest decision of each (product, operator, merchant); `recency` 1 is the latest.
const RANKED: &str = "SELECT *, row_number() OVER (PARTITION BY product, operator_id, merchant_id \
                      ORDER BY as_of_date DESC) AS recency FROM credit_decisions";

/// A table's version, -1 without the table.
async fn version(lake: &Lake, table: &str) -> Result<i64> {
    Ok(lake
        .open(table)
        .await?
        .and_then(|t| t.version())
        .map_or(-1, |v| v as i64))
}

/// The versions the index would be read from now.
pub async fn table_versions(lake: &Lake) -> Result<(i64, i64)> {
    Ok((
        version(lake, CREDIT_DECISIONS.name).await?,
        version(lake, MERCHANT_FEATURES.name).await?,
    ))
}

fn missing_column(name: &str) -> Error {
    Error::Config(format!(
        "the stored decisions or features have no column {name}"
    ))
}

/// The string values of column `name` of `batch` (any string or dictionary type).
fn strings(batch: &RecordBatch, name: &str) -> Result<Vec<Option<String>>> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| missing_column(name))?;
    let column = cast(column, &DataType::Utf8).map_err(|source| Error::Arrow {
        context: format!("reading column {name} as text"),
        source,
    })?;
    Ok(column
        .as_string::<i32>()
        .iter()
        .map(|v| v.map(str::to_owned))
        .collect())
}

/// The `as_of_date` values of `batch` as days since 1970-01-01.
fn as_of_days(batch: &RecordBatch) -> Result<Vec<Option<i32>>> {
    let column = batch
        .column_by_name("as_of_date")
        .ok_or_else(|| missing_column("as_of_date"))?;
    let column = cast(column, &DataType::Date32).map_err(|source| Error::Arrow {
        context: "reading column as_of_date as a date".into(),
        source,
    })?;
    Ok(column.as_primitive::<Date32Type>().iter().collect())
}

impl DecisionIndex {
    /// The versions it was read from.
    pub fn versions(&self) -> (i64, i64) {
        self.versions
    }

    /// Reads the latest decisions and their feature rows.
    pub async fn load(lake: &Lake) -> Result<Self> {
        let versions = table_versions(lake).await?;
        let mut index = Self {
            versions,
            ..Self::default()
        };
        if versions.0 < 0 {
            return Ok(index);
        }
        let decisions = lake
            .query(&format!(
                "SELECT * FROM ({RANKED}) ranked WHERE recency = 1"
            ))
            .await?;
        for batch in decisions {
            let mut batch = batch;
            if let Ok(recency) = batch.schema().index_of("recency") {
                batch.remove_column(recency);
            }
            let batch_index = index.decisions.len();
            let (products, operators, merchants) = (
                strings(&batch, "product")?,
                strings(&batch, "operator_id")?,
                strings(&batch, "merchant_id")?,
            );
            for (row, ((product, operator), merchant)) in products
                .into_iter()
                .zip(operators)
                .zip(merchants)
                .enumerate()
            {
                if let (Some(product), Some(operator), Some(merchant)) =
                    (product, operator, merchant)
                {
                    index
                        .latest
                        .insert((product, operator, merchant), (batch_index, row));
                }
            }
            index.decisions.push(batch);
        }
        if versions.1 < 0 {
            return Ok(index);
        }
        let features = lake
            .query(&format!(
                "SELECT f.* FROM merchant_features f \
                 JOIN (SELECT DISTINCT as_of_date, operator_id, merchant_id FROM ({RANKED}) ranked \
                       WHERE recency = 1) latest \
                 ON f.as_of_date = latest.as_of_date AND f.operator_id = latest.operator_id \
                 AND f.merchant_id = latest.merchant_id"
            ))
            .await?;
        for batch in features {
            let batch_index = index.features.len();
            let (dates, operators, merchants) = (
                as_of_days(&batch)?,
                strings(&batch, "operator_id")?,
                strings(&batch, "merchant_id")?,
            );
            for (row, ((day, operator), merchant)) in
                dates.into_iter().zip(operators).zip(merchants).enumerate()
            {
                if let (Some(day), Some(operator), Some(merchant)) = (day, operator, merchant) {
                    index
                        .feature_rows
                        .insert((day, operator, merchant), (batch_index, row));
                }
            }
            index.features.push(batch);
        }
        Ok(index)
    }

    /// Decisions indexed.
    pub fn len(&self) -> usize {
        self.latest.len()
    }

    /// Whether no decision is indexed.
    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }

    /// The latest decision of a merchant for a product as JSON, and the feature row it
    /// was decided on (empty when that row is gone).
    pub fn lookup(
        &self,
        product: &str,
        operator_id: &str,
        merchant_id: &str,
    ) -> Result<Option<(Row, Row)>> {
        let key = (
            product.to_owned(),
            operator_id.to_owned(),
            merchant_id.to_owned(),
        );
        let Some(&(batch, row)) = self.latest.get(&key) else {
            return Ok(None);
        };
        let Some(decision_batch) = self.decisions.get(batch) else {
            return Ok(None);
        };
        let decision_row = decision_batch.slice(row, 1);
        let day = as_of_days(&decision_row)?.into_iter().next().flatten();
        let features = day
            .and_then(|day| {
                self.feature_rows
                    .get(&(day, operator_id.to_owned(), merchant_id.to_owned()))
            })
            .and_then(|&(batch, row)| self.features.get(batch).map(|b| b.slice(row, 1)));
        let json = |batch: RecordBatch| {
            streetflow_lake::rows_json(&[batch])
                .map(|mut rows| rows.pop().unwrap_or_default())
                .map_err(Error::from)
        };
        let decision = json(decision_row)?;
        let features = match features {
            Some(features) => json(features)?,
            None => Map::new(),
        };
        Ok(Some((decision, features)))
    }
}
