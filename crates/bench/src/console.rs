//! What the benchmarks print and where they write.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::Context;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

pub(crate) use streetflow_core::money::thousands;
pub(crate) use streetflow_lake::runtime;

/// A result table in the style of the `streetflow` commands.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_style(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    table
}

/// Opens `path` for buffered writing (the benchmarks' generated inputs).
pub(crate) fn create(path: &Path) -> anyhow::Result<BufWriter<File>> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(BufWriter::with_capacity(1 << 20, file))
}
