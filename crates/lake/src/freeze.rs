//! Freeze points for crash tests.
//!
//! With `STREETFLOW_FREEZE_AT=<point>[:<n>]` a process that passes `<point>` for the n-th
//! time (default: the first) prints `FROZEN AT <point>` on standard error and stops
//! moving, so a test can kill it with SIGKILL at exactly that step. Without the variable
//! a freeze point is one relaxed atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSES: AtomicU64 = AtomicU64::new(0);

fn plan() -> &'static Option<(String, u64)> {
    PLAN.get_or_init(|| {
        let value = std::env::var("STREETFLOW_FREEZE_AT").ok()?;
        let (point, n) = match value.split_once(':') {
            Some((point, n)) => (point.to_owned(), n.parse().unwrap_or(1)),
            None => (value, 1),
        };
        Some((point, n.max(1)))
    })
}

/// The named steps of the writers, in order.
pub mod points {
    /// Dead-letter Parquet files written, not committed.
    pub const DEAD_LETTER_FILES: &str = "dead_letter_files_written";
    /// Dead letters committed, bronze not yet written.
    pub const DEAD_LETTER_COMMIT: &str = "dead_letters_committed";
    /// Bronze Parquet files written, not committed.
    pub const EVENT_FILES: &str = "event_files_written";
    /// Bronze committed, Kafka group offsets not yet committed.
    pub const EVENT_COMMIT: &str = "events_committed";
    /// Bronze committed, the after-commit hook (silver refresh) not yet run.
    pub const AFTER_COMMIT_PENDING: &str = "after_commit_pending";
    /// Group offsets committed.
    pub const OFFSETS_COMMIT: &str = "group_offsets_committed";
    /// A message buffered, mid-batch.
    pub const BUFFERED: &str = "message_buffered";
    /// `merchant_daily_history` Parquet files written, not committed.
    pub const HISTORY_FILES: &str = "history_files_written";
    /// `merchant_daily_history` committed.
    pub const HISTORY_COMMIT: &str = "history_committed";
}

/// Freezes here if the plan says so.
pub fn point(name: &'static str) {
    let Some((target, n)) = plan() else { return };
    if target != name {
        return;
    }
    if PASSES.fetch_add(1, Ordering::Relaxed) + 1 == *n {
        eprintln!("FROZEN AT {name}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
