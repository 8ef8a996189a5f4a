//! Knowledge time: when the lake came to hold an event.
//!
//! Point-in-time features as of (D, K) may use only what the bank held at the knowledge
//! time K. That instant belongs to the lake, never to a producer's, a POS gateway's or a
//! broker's clock:
//!
//! - **observed** knowledge: a writer (streaming worker or file load) stamps the rows of
//!   one Delta commit with its own clock just before it writes them, and commits them
//!   within [`KnowledgeRules::commit_deadline`] of that stamp or stamps them again. So a
//!   row stamped at or before K is visible in the lake by K + the deadline;
//! - **asserted** knowledge: a backfill may state when the bank held history it kept
//!   elsewhere (`--knowledge-time`, `--knowledge-from-occurred`); the rows say so.
//!
//! A reader asks for K only once K + [`KnowledgeRules::settle`] has passed (twice the
//! deadline): by then every row stamped at or before K is visible, and no later commit
//! can add one. A vector for (D, K) computed at any time after that is therefore the same.

use chrono::{DateTime, Duration, Utc};

/// How a row's knowledge time was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KnowledgeSource {
    /// The lake writer's stamp at commit: when the lake really came to hold the row.
    Observed,
    /// A time a backfill asserted for history the bank held elsewhere.
    Asserted,
}

impl KnowledgeSource {
    /// The value of the `knowledge_source` column.
    pub fn as_str(self) -> &'static str {
        match self {
            KnowledgeSource::Observed => "observed",
            KnowledgeSource::Asserted => "asserted",
        }
    }
}

/// The knowledge of one row before it is written: observed rows get their commit's
/// stamp when the writer flushes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Knowledge {
    /// Stamped by the writer at commit ([`KnowledgeSource::Observed`]).
    Observed,
    /// Asserted by a backfill ([`KnowledgeSource::Asserted`]).
    Asserted(DateTime<Utc>),
}

/// The writers' and readers' shared timing rule (`[knowledge]` in the pipeline file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnowledgeRules {
    settle: Duration,
}

/// Default [`KnowledgeRules::settle`]: two minutes.
pub const DEFAULT_SETTLE: Duration = Duration::minutes(2);

impl Default for KnowledgeRules {
    fn default() -> Self {
        Self {
            settle: DEFAULT_SETTLE,
        }
    }
}

impl KnowledgeRules {
    /// Rules with the given settle time (at least 2 ms: the deadline is half of it).
    pub fn new(settle: Duration) -> Self {
        Self {
            settle: settle.max(Duration::milliseconds(2)),
        }
    }

    /// How long after K a reader must wait before it may read as of K.
    pub fn settle(&self) -> Duration {
        self.settle
    }

    /// How long a writer may take from stamping rows to their commit becoming visible:
    /// half the settle time, the rest is margin for clocks that differ a little.
    pub fn commit_deadline(&self) -> Duration {
        self.settle / 2
    }

    /// Whether knowledge time `k` may be read at `now`; the error says until when to wait.
    pub fn check_readable(&self, k: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), String> {
        let ready = k + self.settle;
        if ready <= now {
            Ok(())
        } else {
            Err(format!(
                "knowledge time {} is too recent: the lake settles what it knew at an instant \
                 {} s after it (knowledge.settle_ms), so ask again from {}",
                k.to_rfc3339(),
                self.settle.num_milliseconds() as f64 / 1000.0,
                ready.to_rfc3339()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_knowledge_time_is_readable_once_it_settled() {
        let rules = KnowledgeRules::new(Duration::seconds(120));
        assert_eq!(rules.commit_deadline(), Duration::seconds(60));
        let k = DateTime::from_timestamp(1_750_000_000, 0).unwrap_or_default();
        assert!(rules.check_readable(k, k + Duration::seconds(119)).is_err());
        assert!(rules.check_readable(k, k + Duration::seconds(120)).is_ok());
        let message = rules.check_readable(k, k).err().unwrap_or_default();
        assert!(message.contains("knowledge.settle_ms"), "{message}");
    }
}
