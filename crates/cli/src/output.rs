//! Shared helpers for what commands print and where they write.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

/// A table in the house style.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_style(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    table
}

/// Opens `path` for buffered writing; `-` is standard output.
pub(crate) fn create(path: &Path) -> anyhow::Result<Box<dyn Write>> {
    if path == Path::new("-") {
        return Ok(Box::new(BufWriter::with_capacity(
            1 << 20,
            io::stdout().lock(),
        )));
    }
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(Box::new(BufWriter::with_capacity(1 << 20, file)))
}

/// Result rows as JSON objects (dates as `YYYY-MM-DD`, nulls kept).
pub(crate) fn rows_json(
    batches: &[streetflow_lake::arrow::array::RecordBatch],
) -> anyhow::Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let mut buffer = Vec::new();
    {
        let mut writer = arrow_json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow_json::writer::JsonArray>(&mut buffer);
        for batch in batches {
            writer.write(batch)?;
        }
        writer.finish()?;
    }
    if buffer.is_empty() {
        return Ok(Vec::new());
    }
    Ok(serde_json::from_slice(&buffer)?)
}

/// Groups digits in threes: `1234567` → `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
