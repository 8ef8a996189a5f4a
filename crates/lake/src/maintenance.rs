//! Batch maintenance of the lake's tables: compaction of small files (optionally
//! clustered by Z-order) and removal of files no version needs any more.
//!
//! Streaming workers commit a few files per partition every flush, so a busy table
//! gathers thousands of small files that slow every scan. Compaction rewrites them into
//! large ones in a commit that changes no data (`dataChange = false`): readers of older
//! versions still find the old files, and concurrent appends do not conflict with it.
//! Vacuum then deletes files that no version within the retention period references.

use std::num::NonZeroU64;

use deltalake::DeltaTable;
use deltalake::operations::optimize::OptimizeType;
use deltalake::operations::vacuum::VacuumMode;

use crate::error::{Error, Result};
use crate::lake::Lake;

/// The age at which vacuum deletes a file no commit added: far beyond any writer's time
/// between writing its files and committing them.
pub const ORPHAN_MIN_HOURS: u64 = 24;

/// The longest retention with which vacuum also collects files no commit added: Delta's
/// default deleted-file retention, 7 days (see [`Lake::vacuum`]).
pub const ORPHAN_MAX_RETAIN_HOURS: u64 = 168;

/// What compacting one table did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// Table name.
    pub table: String,
    /// Data files of the newest version before.
    pub files_before: usize,
    /// Data files of the newest version after.
    pub files_after: usize,
    /// Files written.
    pub files_added: u64,
    /// Files replaced.
    pub files_removed: u64,
    /// Partitions that had files rewritten.
    pub partitions_optimized: u64,
    /// Table version after (unchanged when there was nothing to do).
    pub version: i64,
}

/// What vacuuming one table did (or would do, in a dry run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VacuumReport {
    /// Table name.
    pub table: String,
    /// Files deleted (or, in a dry run, that would be).
    pub files_deleted: usize,
    /// Nothing was deleted: the files are only listed.
    pub dry_run: bool,
    /// Data files of the newest version (unchanged by a vacuum).
    pub live_files: usize,
}

fn live_files(table: &DeltaTable, name: &str) -> Result<usize> {
    Ok(table
        .snapshot()
        .map_err(Error::delta(name, "list files"))?
        .log_data()
        .iter()
        .count())
}

impl Lake {
    /// Rewrites the small files of table `name` into files of about `target_size` bytes
    /// (Delta's default, 100 MB, when `None`), per partition; with `zorder_by`, clusters
    /// rows by those columns (e.g. `merchant_id`) so one merchant's rows sit together.
    /// `None` when the table does not exist.
    pub async fn compact(
        &self,
        name: &str,
        zorder_by: &[String],
        target_size: Option<NonZeroU64>,
    ) -> Result<Option<CompactReport>> {
        let Some(table) = self.open(name).await? else {
            return Ok(None);
        };
        let files_before = live_files(&table, name)?;
        let mut optimize = table.optimize();
        if !zorder_by.is_empty() {
            optimize = optimize.with_type(OptimizeType::ZOrder(zorder_by.to_vec()));
        }
        if let Some(size) = target_size {
            optimize = optimize.with_target_size(size);
        }
        let (table, metrics) = optimize.await.map_err(Error::delta(name, "optimize"))?;
        Ok(Some(CompactReport {
            table: name.to_owned(),
            files_before,
            files_after: live_files(&table, name)?,
            files_added: metrics.num_files_added,
            files_removed: metrics.num_files_removed,
            partitions_optimized: metrics.partitions_optimized,
            version: table.version().map_or(-1, |v| v as i64),
        }))
    }

    /// Deletes the files of table `name` that no version of the last `retain_hours`
    /// references (or lists them, with `dry_run`). Readers of versions older than that
    /// may fail afterwards; the newest version is untouched. Files no commit ever added
    /// (written by a writer that was fenced or crashed before its commit) go too, once
    /// they are [`ORPHAN_MIN_HOURS`] old: younger ones may be a running writer's files
    /// that its next commit adds (only with retentions up to [`ORPHAN_MAX_RETAIN_HOURS`]).
    /// `None` when the table does not exist.
    pub async fn vacuum(
        &self,
        name: &str,
        retain_hours: u64,
        dry_run: bool,
    ) -> Result<Option<VacuumReport>> {
        let Some(mut table) = self.open(name).await? else {
            return Ok(None);
        };
        let hours =
            |h: u64| chrono::Duration::hours(i64::try_from(h).unwrap_or(i64::MAX / 3_600_000));
        // Removed files past the retention, by the log (Delta's "lite" vacuum), then files
        // the log does not know that are old enough to be nobody's (its "full" vacuum,
        // which judges both kinds by one age).
        // The full vacuum protects a removed file only while its removal is in the log's
        // state, which keeps removals for the tables' deleted-file retention (Delta's
        // default of 7 days); past that it would judge a file by its age alone and could
        // delete one a version inside a longer retention still reads. So orphans are
        // collected only with retentions up to 7 days.
        let mut passes = Vec::new();
        if !(ORPHAN_MIN_HOURS..=ORPHAN_MAX_RETAIN_HOURS).contains(&retain_hours) {
            passes.push((VacuumMode::Lite, retain_hours));
        }
        if retain_hours <= ORPHAN_MAX_RETAIN_HOURS {
            passes.push((VacuumMode::Full, retain_hours.max(ORPHAN_MIN_HOURS)));
        } else {
            tracing::info!(
                table = name,
                retain_hours,
                "files no commit added are collected only with --retain-hours of at most 168"
            );
        }
        // A dry run lists a file in both passes; it counts once.
        let mut files_deleted = std::collections::HashSet::new();
        for (mode, retain) in passes {
            let (vacuumed, metrics) = table
                .vacuum()
                .with_mode(mode)
                .with_retention_period(hours(retain))
                // The caller chose the retention; Delta would refuse less than its 7 days.
                .with_enforce_retention_duration(false)
                .with_dry_run(dry_run)
                .await
                .map_err(Error::delta(name, "vacuum"))?;
            files_deleted.extend(metrics.files_deleted);
            table = vacuumed;
        }
        let table = table;
        Ok(Some(VacuumReport {
            table: name.to_owned(),
            files_deleted: files_deleted.len(),
            dry_run,
            live_files: live_files(&table, name)?,
        }))
    }
}
