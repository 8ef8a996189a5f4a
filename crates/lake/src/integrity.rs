//! Damage at rest: Delta log entries that do not parse, and data files that are missing,
//! not the size their log entry records, or without a readable Parquet footer. Readers
//! meet such damage as an error deep in a query; this names the file.

use deltalake::DeltaTableBuilder;
use deltalake::logstore::object_store::path::Path;
use deltalake::logstore::object_store::{ObjectStore, ObjectStoreExt};
use deltalake::parquet::file::metadata::ParquetMetaDataReader;
use futures::{StreamExt, TryStreamExt};

use crate::error::{Error, Result};
use crate::lake::Lake;

/// One damaged file of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The file, relative to the table's root (`_delta_log/…json`, `date=…/part-….parquet`).
    pub file: String,
    /// What is wrong with it.
    pub problem: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file, self.problem)
    }
}

/// Data files checked at once (each check asks for the file's size, then reads its end).
const CONCURRENT_FILE_CHECKS: usize = 16;

/// The Parquet trailer: a 4-byte little-endian footer length, then `PAR1`.
const PARQUET_TRAILER: u64 = 8;

impl Lake {
    /// Every damaged file of table `name`: first the log a reader replays (the newest
    /// checkpoint and the JSON commits after it), then, if the log is whole, each data
    /// file of the newest version (present, the size the log records, a Parquet footer
    /// that decodes). Empty when nothing is damaged or the table does not exist. Reads
    /// footers only: damage inside a column chunk is found by reading the rows.
    pub async fn find_damage(&self, name: &str) -> Result<Vec<Damage>> {
        let log_damage = self.find_log_damage(name).await?;
        if !log_damage.is_empty() {
            return Ok(log_damage);
        }
        let Some(table) = self.open(name).await? else {
            return Ok(Vec::new());
        };
        let store = table.object_store();
        let snapshot = table.snapshot().map_err(Error::delta(name, "list files"))?;
        let files: Vec<(String, u64)> = snapshot
            .log_data()
            .iter()
            .map(|file| {
                (
                    file.object_store_path().to_string(),
                    u64::try_from(file.size()).unwrap_or(0),
                )
            })
            .collect();
        let store = &store;
        let found: Vec<Option<Damage>> = futures::stream::iter(files)
            .map(|(file, size)| async move { data_file_damage(store.as_ref(), file, size).await })
            .buffer_unordered(CONCURRENT_FILE_CHECKS)
            .try_collect()
            .await
            .map_err(|e| Error::delta(name, "check data files")(e.into()))?;
        let mut damage: Vec<Damage> = found.into_iter().flatten().collect();
        damage.sort_by(|a, b| a.file.cmp(&b.file));
        Ok(damage)
    }

    /// The table's own object store (paths relative to the table), without loading it.
    fn table_store(&self, name: &str) -> Result<deltalake::logstore::ObjectStoreRef> {
        let url = self.table_url(name)?;
        Ok(DeltaTableBuilder::from_url(url)
            .map(|b| b.with_storage_options(self.storage_options().clone()))
            .and_then(|b| b.build())
            .map_err(Error::delta(name, "open for a damage check"))?
            .object_store())
    }

    /// [`Lake::find_damage`] over every table a query session registers: the damaged
    /// ones, for an error that must say which file a failed read tripped on. Tables that
    /// cannot be checked are left out (the caller reports its own error anyway).
    pub async fn damaged_tables(&self) -> Vec<(&'static str, Vec<Damage>)> {
        let mut damaged = Vec::new();
        for name in crate::query::table_names() {
            if let Ok(damage) = self.find_damage(name).await
                && !damage.is_empty()
            {
                damaged.push((name, damage));
            }
        }
        damaged
    }

    /// The log part of [`Lake::find_damage`] (it never loads the table).
    pub(crate) async fn find_log_damage(&self, name: &str) -> Result<Vec<Damage>> {
        if let Ok(path) = self.table_url(name)?.to_file_path()
            && !path.join("_delta_log").is_dir()
        {
            return Ok(Vec::new());
        }
        let store = self.table_store(name)?;
        log_damage(store.as_ref(), name).await
    }
}

/// The newest checkpoint's files and every JSON commit after it.
async fn log_damage(store: &dyn ObjectStore, table: &str) -> Result<Vec<Damage>> {
    let listed: Vec<String> = match store
        .list(Some(&Path::from("_delta_log")))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
    {
        Ok(listed) => listed,
        // No log at all: no table, nothing damaged.
        Err(deltalake::ObjectStoreError::NotFound { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(Error::delta(table, "list the log")(e.into())),
    };
    let version_of = |file: &str| -> Option<u64> {
        let name = file.rsplit('/').next()?;
        name.get(..20)?.parse().ok()
    };
    let names: Vec<&str> = listed.iter().filter_map(|f| f.rsplit('/').next()).collect();
    let checkpoints = checkpoints(&names);
    // The checkpoint a reader starts from: the newest complete one (an incomplete
    // multi-part one is skipped by readers that follow the protocol).
    let newest_checkpoint = checkpoints
        .iter()
        .filter(|(_, c)| c.missing.is_empty())
        .map(|(&v, _)| v)
        .max();
    let mut damage = Vec::new();
    if let Some((&version, newest)) = checkpoints.iter().next_back()
        && !newest.missing.is_empty()
    {
        for missing in &newest.missing {
            damage.push(Damage {
                file: format!("_delta_log/{missing}"),
                problem: format!(
                    "missing: a part of the newest checkpoint (version {version}), which is \
                     incomplete without it; a reader that trusts _last_checkpoint fails, \
                     others start from {}",
                    newest_checkpoint.map_or("the first commit".to_owned(), |v| format!(
                        "the checkpoint of version {v}"
                    ))
                ),
            });
        }
    }
    for file in &listed {
        let Some(version) = version_of(file) else {
            continue;
        };
        let is_commit = file.ends_with(".json") && !file.contains(".checkpoint.");
        let is_newest_checkpoint = Some(version) == newest_checkpoint
            && file.contains(".checkpoint.")
            && file.ends_with(".parquet");
        let problem = if is_commit && newest_checkpoint.is_none_or(|c| version > c) {
            let bytes = store
                .get(&Path::from(file.as_str()))
                .await
                .map_err(|e| Error::delta(table, "read the log")(e.into()))?
                .bytes()
                .await
                .map_err(|e| Error::delta(table, "read the log")(e.into()))?;
            commit_problem(&bytes)
        } else if is_newest_checkpoint {
            let size = store
                .head(&Path::from(file.as_str()))
                .await
                .map_err(|e| Error::delta(table, "read the log")(e.into()))?
                .size;
            parquet_footer_problem(store, file, size)
                .await
                .map_err(|e| Error::delta(table, "read the log")(e.into()))?
        } else {
            None
        };
        if let Some(problem) = problem {
            damage.push(Damage {
                file: relative(file),
                problem,
            });
        }
    }
    if listed
        .iter()
        .any(|f| f.ends_with("_delta_log/_last_checkpoint"))
    {
        let bytes = store
            .get(&Path::from("_delta_log/_last_checkpoint"))
            .await
            .map_err(|e| Error::delta(table, "read the log")(e.into()))?
            .bytes()
            .await
            .map_err(|e| Error::delta(table, "read the log")(e.into()))?;
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            damage.push(Damage {
                file: "_delta_log/_last_checkpoint".to_owned(),
                problem: format!("not JSON ({e})"),
            });
        }
    }
    Ok(damage)
}

/// One checkpoint version's files, as a reader sees them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Checkpoint {
    /// The parts a reader needs and does not find, by file name; empty when a complete
    /// checkpoint of the version exists (one file, UUID-named, or every part of a
    /// multi-part one).
    missing: Vec<String>,
}

/// The most parts a multi-part checkpoint is believed to have: a stray file name
/// claiming more is not spelled out part by part.
const MAX_CHECKPOINT_PARTS: u32 = 100_000;

/// The checkpoints among the log's file names, by version. Multi-part checkpoints are
/// named `<version>.checkpoint.<part>.<parts>.parquet` (ten digits each), and a reader
/// needs every part of one set.
fn checkpoints(names: &[&str]) -> std::collections::BTreeMap<u64, Checkpoint> {
    use std::collections::{BTreeMap, BTreeSet};
    let numeric = |t: &str, len: usize| t.len() == len && t.bytes().all(|b| b.is_ascii_digit());
    // Per version: whether a single-file checkpoint exists, and the parts of each set.
    let mut found: BTreeMap<u64, (bool, BTreeMap<u32, BTreeSet<u32>>)> = BTreeMap::new();
    for name in names {
        let Some((version, rest)) = name.split_once(".checkpoint") else {
            continue;
        };
        if !numeric(version, 20) || !name.ends_with(".parquet") {
            continue;
        }
        let Ok(version) = version.parse::<u64>() else {
            continue;
        };
        let entry = found.entry(version).or_default();
        let middle = rest
            .strip_prefix('.')
            .and_then(|r| r.strip_suffix(".parquet"))
            .unwrap_or("");
        let parts = middle
            .split_once('.')
            .filter(|(part, parts)| numeric(part, 10) && numeric(parts, 10))
            .and_then(|(part, parts)| {
                Some((part.parse::<u32>().ok()?, parts.parse::<u32>().ok()?))
            });
        match parts {
            Some((part, parts)) if (1..=parts).contains(&part) => {
                entry.1.entry(parts).or_default().insert(part);
            }
            // A classic single file, a UUID-named (V2) one, or a name that is neither:
            // whole as far as parts go.
            _ => entry.0 = true,
        }
    }
    found
        .into_iter()
        .map(|(version, (single, sets))| {
            let complete = single
                || sets
                    .iter()
                    .any(|(&parts, present)| present.len() as u64 == u64::from(parts));
            let mut missing = Vec::new();
            if !complete {
                for (&parts, present) in &sets {
                    if parts > MAX_CHECKPOINT_PARTS {
                        missing.push(format!(
                            "{version:020}.checkpoint.*.{parts:010}.parquet ({} of {parts} parts)",
                            present.len()
                        ));
                        continue;
                    }
                    for part in (1..=parts).filter(|p| !present.contains(p)) {
                        missing.push(format!(
                            "{version:020}.checkpoint.{part:010}.{parts:010}.parquet"
                        ));
                    }
                }
            }
            (version, Checkpoint { missing })
        })
        .collect()
}

/// A Delta commit is newline-delimited JSON actions, each an object.
fn commit_problem(bytes: &[u8]) -> Option<String> {
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(_)) => {}
            Ok(_) => return Some(format!("line {} is JSON but not an action", i + 1)),
            Err(e) => return Some(format!("line {} is not JSON ({e})", i + 1)),
        }
    }
    None
}

async fn data_file_damage(
    store: &dyn ObjectStore,
    file: String,
    recorded_size: u64,
) -> std::result::Result<Option<Damage>, deltalake::ObjectStoreError> {
    let path = Path::from(file.as_str());
    let actual = match store.head(&path).await {
        Ok(meta) => meta.size,
        Err(deltalake::ObjectStoreError::NotFound { .. }) => {
            return Ok(Some(Damage {
                file,
                problem: "missing (the log lists it; deleted by hand or by another tool?)"
                    .to_owned(),
            }));
        }
        Err(e) => return Err(e),
    };
    if actual != recorded_size {
        return Ok(Some(Damage {
            file,
            problem: format!(
                "{actual} bytes, the log records {recorded_size} (truncated or overwritten)"
            ),
        }));
    }
    Ok(parquet_footer_problem(store, &file, actual)
        .await?
        .map(|problem| Damage { file, problem }))
}

/// How much of a file's end the footer check reads at once: the footers of the lake's
/// files (a few row groups of a dozen columns) fit, so one read serves most files.
const FOOTER_READ: u64 = 64 * 1024;

/// Why the file's Parquet footer cannot be read, if it cannot.
async fn parquet_footer_problem(
    store: &dyn ObjectStore,
    file: &str,
    size: u64,
) -> std::result::Result<Option<String>, deltalake::ObjectStoreError> {
    parquet_footer_problem_reading(store, file, size, FOOTER_READ).await
}

/// [`parquet_footer_problem`], reading the last `first_read` bytes first (and the rest of
/// a larger footer after).
async fn parquet_footer_problem_reading(
    store: &dyn ObjectStore,
    file: &str,
    size: u64,
    first_read: u64,
) -> std::result::Result<Option<String>, deltalake::ObjectStoreError> {
    if size < PARQUET_TRAILER + 4 {
        return Ok(Some(format!("{size} bytes: too short for a Parquet file")));
    }
    let path = Path::from(file);
    let tail_start = size - first_read.clamp(PARQUET_TRAILER, size);
    let tail = store.get_range(&path, tail_start..size).await?;
    if tail.len() as u64 != size - tail_start {
        return Ok(Some(format!(
            "{} bytes where {size} were found a moment before (changed while checked?)",
            tail_start + tail.len() as u64
        )));
    }
    let Some(trailer) = tail
        .len()
        .checked_sub(PARQUET_TRAILER as usize)
        .and_then(|at| tail.get(at..))
    else {
        return Ok(Some("no Parquet footer at its end (truncated?)".to_owned()));
    };
    if trailer.get(4..) != Some(b"PAR1".as_slice()) {
        return Ok(Some("no Parquet footer at its end (truncated?)".to_owned()));
    }
    let mut length = [0_u8; 4];
    length.copy_from_slice(&trailer[..4]);
    let footer_length = u64::from(u32::from_le_bytes(length));
    if footer_length + PARQUET_TRAILER + 4 > size {
        return Ok(Some(format!(
            "its footer claims {footer_length} bytes of a {size}-byte file"
        )));
    }
    let footer_start = size - PARQUET_TRAILER - footer_length;
    let footer = if footer_start >= tail_start {
        // Within what was read.
        let from = usize::try_from(footer_start - tail_start).unwrap_or(usize::MAX);
        tail.slice(from..tail.len() - PARQUET_TRAILER as usize)
    } else {
        store
            .get_range(&path, footer_start..size - PARQUET_TRAILER)
            .await?
    };
    Ok(ParquetMetaDataReader::decode_metadata(&footer)
        .err()
        .map(|e| format!("its Parquet footer does not decode ({e})")))
}

/// `_delta_log/…` from a store path that may carry the table's prefix.
fn relative(file: &str) -> String {
    file.find("_delta_log/")
        .map_or(file, |at| &file[at..])
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::{checkpoints, commit_problem, parquet_footer_problem_reading};
    use deltalake::arrow::array::{Int64Array, RecordBatch};
    use deltalake::logstore::object_store::memory::InMemory;
    use deltalake::logstore::object_store::path::Path;
    use deltalake::logstore::object_store::{ObjectStoreExt, PutPayload};
    use deltalake::parquet::arrow::ArrowWriter;

    #[test]
    fn a_multi_part_checkpoint_missing_a_part_is_named() {
        let names = [
            "00000000000000000010.checkpoint.0000000001.0000000003.parquet",
            "00000000000000000010.checkpoint.0000000003.0000000003.parquet",
            "00000000000000000010.json",
            "00000000000000000005.checkpoint.0000000001.0000000002.parquet",
            "00000000000000000005.checkpoint.0000000002.0000000002.parquet",
            "00000000000000000003.checkpoint.parquet",
            "00000000000000000004.checkpoint.80a083e8-7026-4e79-81be-64bd76c43a11.parquet",
        ];
        let found = checkpoints(&names);
        assert_eq!(
            found[&10].missing,
            vec!["00000000000000000010.checkpoint.0000000002.0000000003.parquet".to_owned()]
        );
        for whole in [5, 4, 3] {
            assert!(found[&whole].missing.is_empty(), "version {whole}");
        }
        // A leftover incomplete set beside a complete checkpoint of the same version
        // is not damage: readers take the complete one.
        let leftover = [
            "00000000000000000010.checkpoint.parquet",
            "00000000000000000010.checkpoint.0000000001.0000000003.parquet",
        ];
        assert!(checkpoints(&leftover)[&10].missing.is_empty());
        // A stray name claiming billions of parts is summarised, not spelled out.
        let stray = ["00000000000000000010.checkpoint.0000000001.4000000000.parquet"];
        assert_eq!(checkpoints(&stray)[&10].missing.len(), 1);
    }

    fn parquet_file(columns: usize) -> Vec<u8> {
        let batch = RecordBatch::try_from_iter((0..columns).map(|c| {
            let values: std::sync::Arc<dyn deltalake::arrow::array::Array> =
                std::sync::Arc::new(Int64Array::from_iter_values(0..100));
            (format!("column_{c}"), values)
        }))
        .expect("a batch");
        let mut bytes = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut bytes, batch.schema(), None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        bytes
    }

    #[tokio::test]
    async fn a_footer_is_checked_from_one_read_or_two_and_damage_is_named() {
        let store = InMemory::new();
        let whole = parquet_file(40);
        store
            .put(
                &Path::from("whole.parquet"),
                PutPayload::from(whole.clone()),
            )
            .await
            .expect("put");
        let size = whole.len() as u64;
        // One read of the whole tail, a first read shorter than the footer, and a
        // first read longer than the file: the same answer.
        for first_read in [64 * 1024, 16, size + 100] {
            assert_eq!(
                parquet_footer_problem_reading(&store, "whole.parquet", size, first_read)
                    .await
                    .expect("read"),
                None,
                "first read {first_read}"
            );
        }
        let cut = whole[..whole.len() - 3].to_vec();
        store
            .put(&Path::from("cut.parquet"), PutPayload::from(cut.clone()))
            .await
            .expect("put");
        let problem = parquet_footer_problem_reading(&store, "cut.parquet", cut.len() as u64, 16)
            .await
            .expect("read");
        assert!(
            problem.is_some_and(|p| p.contains("no Parquet footer")),
            "a cut file passed"
        );
        // A footer whose first bytes are damaged (its length and magic intact).
        let mut damaged = whole.clone();
        let mut length = [0_u8; 4];
        length.copy_from_slice(&whole[whole.len() - 8..whole.len() - 4]);
        let footer_start = whole.len() - 8 - u32::from_le_bytes(length) as usize;
        damaged[footer_start..footer_start + 4].fill(0xff);
        store
            .put(&Path::from("damaged.parquet"), PutPayload::from(damaged))
            .await
            .expect("put");
        for first_read in [64 * 1024, 16] {
            let problem =
                parquet_footer_problem_reading(&store, "damaged.parquet", size, first_read)
                    .await
                    .expect("read");
            assert!(
                problem.is_some_and(|p| p.contains("does not decode")),
                "a damaged footer passed (first read {first_read})"
            );
        }
    }

    #[test]
    fn a_commit_must_be_lines_of_json_objects() {
        assert_eq!(commit_problem(b"{\"add\":{}}\n{\"txn\":{}}\n"), None);
        assert!(
            commit_problem(b"{\"add\":{}}\n{\"txn\":{\"ap")
                .is_some_and(|p| p.starts_with("line 2 is not JSON"))
        );
        assert!(commit_problem(b"[1]\n").is_some_and(|p| p.contains("not an action")));
    }
}
