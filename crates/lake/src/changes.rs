//! What a table's commits changed between two versions, from its Delta log.
//!
//! Incremental readers (silver after each bronze commit) need the rows that commits
//! added as new data. Comparing two snapshots' file lists is not that: a compaction
//! (OPTIMIZE, Z-order) rewrites files without changing data (`dataChange: false`), and
//! its new files would read as new rows. The commits themselves say which adds carry
//! new data.

use deltalake::DeltaTable;

use crate::error::{Error, Result};

/// What the commits after one version up to another did to a table's data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataChanges {
    /// Files added as new data (`dataChange: true`), paths relative to the table.
    pub added: Vec<String>,
    /// Whether a commit removed data (a delete or overwrite, not a compaction): readers
    /// that only append cannot follow it and must start over.
    pub removed_data: bool,
    /// Whether some of `added` is no longer in the table's snapshot (a compaction in the
    /// range rewrote it): its rows now live in files that read as no change, so a reader
    /// of `added` would miss them and must read everything instead.
    pub rewritten: bool,
}

impl DataChanges {
    /// Whether a reader can follow these changes by reading `added` alone.
    pub fn appends_only(&self) -> bool {
        !self.removed_data && !self.rewritten
    }
}

/// `%XX` escapes of a Delta log path decoded (partition values may be escaped).
fn percent_decoded(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(value) = u8::from_str_radix(&path[i + 1..i + 3], 16)
        {
            out.push(value);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The data changes of `table`'s commits `from + 1 ..= to`; `None` when one of those
/// commits is no longer in the log (cleaned up after its retention), so the caller must
/// read everything instead.
pub async fn data_changes(table: &DeltaTable, from: u64, to: u64) -> Result<Option<DataChanges>> {
    let name = table.table_url().to_string();
    let store = table.log_store();
    let mut changes = DataChanges::default();
    for version in from + 1..=to {
        let Some(bytes) = store
            .read_commit_entry(version)
            .await
            .map_err(Error::delta(&name, "read commit"))?
        else {
            return Ok(None);
        };
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let action: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
                Error::delta(&name, "read commit")(deltalake::DeltaTableError::Generic(format!(
                    "commit {version} is not JSON lines: {e}"
                )))
            })?;
            let changes_data = |kind: &str| action[kind]["dataChange"].as_bool().unwrap_or(true);
            if let Some(path) = action["add"]["path"].as_str()
                && changes_data("add")
            {
                changes.added.push(percent_decoded(path));
            }
            if action.get("remove").is_some() && changes_data("remove") {
                changes.removed_data = true;
            }
        }
    }
    let active: std::collections::HashSet<String> = table
        .snapshot()
        .map_err(Error::delta(&name, "list files"))?
        .log_data()
        .iter()
        .map(|file| file.path().to_string())
        .collect();
    changes.rewritten = changes.added.iter().any(|path| !active.contains(path));
    Ok(Some(changes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_partition_values_are_decoded() {
        assert_eq!(
            percent_decoded("operator_id=a%20b/business_date=2025-01-01/part-0.parquet"),
            "operator_id=a b/business_date=2025-01-01/part-0.parquet"
        );
        assert_eq!(
            percent_decoded("plain/part%2.parquet"),
            "plain/part%2.parquet"
        );
    }
}
