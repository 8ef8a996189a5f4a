//! Result rows as JSON objects, for answers and reports.

use deltalake::arrow::record_batch::RecordBatch;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The rows of `batches` as JSON objects, one per row: dates as `YYYY-MM-DD`,
/// timestamps in RFC 3339, nulls kept as `null`.
pub fn rows_json(batches: &[RecordBatch]) -> Result<Vec<Map<String, Value>>> {
    let mut buffer = Vec::new();
    {
        let mut writer = arrow_json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow_json::writer::JsonArray>(&mut buffer);
        for batch in batches {
            writer
                .write(batch)
                .map_err(|e| Error::Json(e.to_string()))?;
        }
        writer.finish().map_err(|e| Error::Json(e.to_string()))?;
    }
    if buffer.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&buffer).map_err(|e| Error::Json(e.to_string()))
}

/// The value of `key` in a row of [`rows_json`] as text: strings as they are, other
/// values in their JSON spelling, null or missing as the empty string.
pub fn json_text(row: &Map<String, Value>, key: &str) -> String {
    match row.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// The value of `key` in a row of [`rows_json`] as an integer, 0 when it is null, missing
/// or not an integer.
pub fn json_int(row: &Map<String, Value>, key: &str) -> i64 {
    row.get(key).and_then(Value::as_i64).unwrap_or(0)
}
