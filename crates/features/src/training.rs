//! Training sets: a point-in-time join of a spine of (merchant, as-of date) rows with
//! the feature vectors each row would have seen.
//!
//! Bitemporal silver for every date any spine row reads is read once into a
//! [`HistoryStore`]. Spine rows are then grouped by (as-of date, knowledge time); each
//! group computes the vectors of every merchant from the store (percentiles among peers
//! need the whole population), keeps the rows the spine asks for and appends them to the
//! output file. Each row's vector is exactly what the batch job computes as of its own
//! (D, K).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use streetflow_core::tables::MERCHANT_FEATURES;
use streetflow_lake::Lake;
use streetflow_lake::arrow::array::{
    Array, ArrayRef, Date32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt32Array,
};
use streetflow_lake::arrow::compute::take;
use streetflow_lake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use streetflow_lake::deltalake::parquet::arrow::ArrowWriter;
use streetflow_lake::deltalake::parquet::basic::{Compression, ZstdLevel};
use streetflow_lake::deltalake::parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};
use crate::gold::{AsOf, FeatureInputs, Population, ranges_for, vectors_as_of};
use crate::store::{DayRange, HistoryStore};
use crate::vector::vector_batch;

/// One row of a training spine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpineRow {
    /// District operator.
    pub operator_id: String,
    /// Merchant, scoped by the operator.
    pub merchant_id: String,
    /// The row's features are computed as of this date.
    pub as_of_date: NaiveDate,
    /// Events ingested after this are ignored; `None`: the start of the as-of date in the
    /// operator's calendar.
    pub knowledge_time: Option<DateTime<Utc>>,
}

/// What a training-set run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingReport {
    /// Spine rows read (= rows written).
    pub rows: usize,
    /// Spine rows for which the lake knew nothing about the merchant by then (their
    /// feature columns are NULL).
    pub rows_without_history: usize,
    /// Distinct (as-of date, knowledge time) pairs computed.
    pub as_of_groups: usize,
}

/// Reads a spine: CSV with a header naming `operator_id`, `merchant_id`, `as_of_date`
/// and optionally `knowledge_time` (RFC 3339; empty for the default).
pub fn load_spine(path: &Path) -> std::result::Result<Vec<SpineRow>, String> {
    let mut reader =
        csv::Reader::from_path(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let headers = reader
        .headers()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h.trim() == name);
    let (Some(op), Some(merchant), Some(date)) = (
        column("operator_id"),
        column("merchant_id"),
        column("as_of_date"),
    ) else {
        return Err(format!(
            "{}: the header must name operator_id, merchant_id and as_of_date (found: {})",
            path.display(),
            headers.iter().collect::<Vec<_>>().join(", ")
        ));
    };
    let knowledge = column("knowledge_time");
    let mut rows = Vec::new();
    for (index, record) in reader.records().enumerate() {
        let line = index + 2;
        let record = record.map_err(|e| format!("{} line {line}: {e}", path.display()))?;
        let cell = |i: usize| record.get(i).map(str::trim).unwrap_or_default();
        let as_of_date = NaiveDate::parse_from_str(cell(date), "%Y-%m-%d").map_err(|e| {
            format!(
                "{} line {line}: as_of_date {:?}: {e}",
                path.display(),
                cell(date)
            )
        })?;
        let knowledge_time = match knowledge.map(cell).filter(|c| !c.is_empty()) {
            Some(text) => Some(
                DateTime::parse_from_rfc3339(text)
                    .map_err(|e| {
                        format!(
                            "{} line {line}: knowledge_time {text:?}: {e}",
                            path.display()
                        )
                    })?
                    .with_timezone(&Utc),
            ),
            None => None,
        };
        if cell(op).is_empty() || cell(merchant).is_empty() {
            return Err(format!(
                "{} line {line}: operator_id and merchant_id must not be empty",
                path.display()
            ));
        }
        rows.push(SpineRow {
            operator_id: cell(op).to_owned(),
            merchant_id: cell(merchant).to_owned(),
            as_of_date,
            knowledge_time,
        });
    }
    Ok(rows)
}

/// The output schema: `spine_row` (1-based position in the spine) and the columns of
/// `merchant_features`, all nullable (a merchant unknown at a row's date has NULLs).
pub fn training_schema() -> SchemaRef {
    let mut fields = vec![Arc::new(Field::new("spine_row", DataType::Int64, false))];
    for field in MERCHANT_FEATURES.schema.fields() {
        let keyed = matches!(
            field.name().as_str(),
            "operator_id" | "merchant_id" | "as_of_date" | "knowledge_time"
        );
        fields.push(Arc::new(field.as_ref().clone().with_nullable(!keyed)));
    }
    Arc::new(Schema::new(fields))
}

fn arrow_error(
    context: &'static str,
) -> impl FnOnce(streetflow_lake::arrow::error::ArrowError) -> Error {
    move |source| Error::Arrow {
        context: context.to_owned(),
        source,
    }
}

/// Computes one output row per spine row, each as of its own date, and writes them to
/// `out` as Parquet (rows grouped by as-of date; `spine_row` gives the spine order).
/// `progress` is called with (groups done, groups in all).
pub async fn write_training_set(
    lake: &Lake,
    spine: &[SpineRow],
    inputs: &FeatureInputs,
    out: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<TrainingReport> {
    let mut groups: BTreeMap<(NaiveDate, Option<DateTime<Utc>>), Vec<usize>> = BTreeMap::new();
    for (index, row) in spine.iter().enumerate() {
        groups
            .entry((row.as_of_date, row.knowledge_time))
            .or_default()
            .push(index);
    }
    let schema = training_schema();
    let file = File::create(out).map_err(|source| Error::Io {
        context: format!("creating {}", out.display()),
        source,
    })?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), Some(properties)).map_err(|source| {
            Error::Parquet {
                context: format!("writing {}", out.display()),
                source,
            }
        })?;
    let mut report = TrainingReport {
        rows: 0,
        rows_without_history: 0,
        as_of_groups: groups.len(),
    };
    let total = groups.len();
    // Every date any group reads, and every date whose payers it reads.
    let mut ranges: Option<(DayRange, DayRange)> = None;
    for (date, _) in groups.keys() {
        let (range, payers) = ranges_for(*date);
        ranges = Some(match ranges {
            None => (range, payers),
            Some((r, p)) => (r.union(range), p.union(payers)),
        });
    }
    let store = match ranges {
        Some((range, payers)) => HistoryStore::load(lake, range, payers, None).await?,
        None => HistoryStore::default(),
    };
    let population = Population::of(&store, inputs, None);
    for (done, ((date, knowledge_time), members)) in groups.into_iter().enumerate() {
        let as_of = AsOf {
            date,
            knowledge_time,
        };
        let (vectors, computed) = vectors_as_of(&store, &as_of, inputs, &population, true)?;
        let features = vector_batch(&vectors)?;
        let operators = string_column(&features, "operator_id")?;
        let merchants = string_column(&features, "merchant_id")?;
        let position: HashMap<(&str, &str), u32> = (0..features.num_rows())
            .map(|i| ((operators.value(i), merchants.value(i)), i as u32))
            .collect();
        let picks: UInt32Array = members
            .iter()
            .map(|&i| {
                position
                    .get(&(spine[i].operator_id.as_str(), spine[i].merchant_id.as_str()))
                    .copied()
            })
            .collect();
        report.rows_without_history += picks.null_count();
        let known_at = |row: &SpineRow| {
            knowledge_time
                .or_else(|| computed.knowledge_times.get(&row.operator_id).copied())
                .unwrap_or_else(|| {
                    inputs
                        .calendars
                        .for_operator(&row.operator_id)
                        .day_start(date)
                })
        };
        let mut columns: Vec<ArrayRef> = vec![Arc::new(Int64Array::from_iter_values(
            members.iter().map(|&i| i as i64 + 1),
        ))];
        for field in MERCHANT_FEATURES.schema.fields() {
            let column: ArrayRef = match field.name().as_str() {
                "operator_id" => Arc::new(StringArray::from_iter_values(
                    members.iter().map(|&i| spine[i].operator_id.as_str()),
                )),
                "merchant_id" => Arc::new(StringArray::from_iter_values(
                    members.iter().map(|&i| spine[i].merchant_id.as_str()),
                )),
                "as_of_date" => Arc::new(Date32Array::from_value(
                    date.signed_duration_since(NaiveDate::default()).num_days() as i32,
                    members.len(),
                )),
                "knowledge_time" => Arc::new(
                    TimestampMicrosecondArray::from_iter_values(
                        members
                            .iter()
                            .map(|&i| known_at(&spine[i]).timestamp_micros()),
                    )
                    .with_timezone("UTC"),
                ),
                name => {
                    let source = features.column_by_name(name).ok_or_else(|| Error::Arrow {
                        context: format!("feature rows have no column {name}"),
                        source: streetflow_lake::arrow::error::ArrowError::SchemaError(
                            name.to_owned(),
                        ),
                    })?;
                    take(source.as_ref(), &picks, None)
                        .map_err(arrow_error("picking spine rows"))?
                }
            };
            columns.push(column);
        }
        let batch =
            RecordBatch::try_new(schema.clone(), columns).map_err(arrow_error("training rows"))?;
        writer.write(&batch).map_err(|source| Error::Parquet {
            context: format!("writing {}", out.display()),
            source,
        })?;
        report.rows += batch.num_rows();
        progress(done + 1, total);
    }
    writer.close().map_err(|source| Error::Parquet {
        context: format!("closing {}", out.display()),
        source,
    })?;
    Ok(report)
}

fn string_column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| Error::Arrow {
            context: format!("feature rows: {name} is not a string column"),
            source: streetflow_lake::arrow::error::ArrowError::SchemaError(name.to_owned()),
        })
}
