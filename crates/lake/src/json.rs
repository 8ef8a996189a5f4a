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
