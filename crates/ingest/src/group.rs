//! A guard against stale group assignments.
//!
//! Kafka's group coordinator makes every member rejoin when a member leaves or dies.
//! Tansu 0.6 (the test broker) does not always: after a member's session expires it may
//! answer the others' heartbeats without error while the group re-forms, so survivors
//! keep their old partitions and the dead member's partitions go to nobody. A worker
//! therefore remembers the group's members when it received its assignment and, when a
//! stable group has since lost one of them without any rebalance reaching this worker,
//! rejoins. On a broker that follows the protocol the rebalance arrives first and resets
//! the baseline, so the check never fires.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// What a group check concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing to compare yet (no baseline) or nothing changed.
    Consistent,
    /// This worker is not a member of the stable group.
    NotAMember,
    /// Members present at this worker's assignment have left without a rebalance.
    MembersVanished(BTreeSet<String>),
}

/// Whether `member_id` (`<client.id>-<uuid>` in Kafka) belongs to this client.
pub(crate) fn is_own_member(member_id: &str, client_id: &str) -> bool {
    member_id == client_id
        || member_id
            .strip_prefix(client_id)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// Compares the stable group's members now with the baseline taken at assignment.
pub(crate) fn judge(
    baseline: Option<&BTreeSet<String>>,
    now: &BTreeSet<String>,
    client_id: &str,
) -> Verdict {
    if !now.iter().any(|m| is_own_member(m, client_id)) {
        return Verdict::NotAMember;
    }
    match baseline {
        None => Verdict::Consistent,
        Some(before) => {
            let vanished: BTreeSet<String> = before.difference(now).cloned().collect();
            if vanished.is_empty() {
                Verdict::Consistent
            } else {
                Verdict::MembersVanished(vanished)
            }
        }
    }
}

/// How long the lake may make no progress on a topic with records waiting before a
/// worker that reads none of them says what it sees.
pub(crate) const STALL_REPORT_AFTER: Duration = Duration::from_secs(20);

/// The least time between two rejoins (or two reports) of a stalled worker: a rebalance
/// needs time to settle, and a crashed member holds its partitions until its session
/// expires.
pub(crate) const STALL_REJOIN_COOLDOWN: Duration = Duration::from_secs(30);

/// What a worker with nothing of its own to read should do about the rest of the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StallAction {
    /// The lake holds the topic, or it is advancing: nothing to do.
    Wait,
    /// Records have waited without progress for a while: say what is seen.
    Report,
    /// Say what is seen and rejoin the group (no live member may own the records).
    Rejoin,
    /// With `--exit-at-end`: no progress for the whole stall timeout; fail.
    GiveUp,
}

/// Watches whether the lake makes progress on a topic while this worker reads none of
/// it (no partitions, or its own caught up). A group that no longer counts this worker,
/// or whose partitions no live member owns, leaves records waiting with nothing moving:
/// the watch turns that into a report, a rejoin and, for a batch run, a clear failure
/// instead of a silent wait.
///
/// Rejoining makes every member of an eagerly rebalanced group drop what it buffered, so
/// it waits longer than healthy members can take between commits (`rejoin_after`, from
/// the flush age); reporting costs nothing and comes first.
#[derive(Debug, Default)]
pub(crate) struct StallWatch {
    /// Since when records have waited with the stored offsets unchanged, and those offsets.
    stalled: Option<(Instant, i64)>,
    last_report: Option<Instant>,
    last_rejoin: Option<Instant>,
}

impl StallWatch {
    /// Judges one look at the topic: `waiting` records not in the lake, `stored` the sum
    /// of the lake's stored offsets (it grows when anyone commits).
    pub(crate) fn observe(
        &mut self,
        now: Instant,
        waiting: u64,
        stored: i64,
        rejoin_after: Duration,
        give_up_after: Option<Duration>,
    ) -> StallAction {
        if waiting == 0 {
            self.stalled = None;
            return StallAction::Wait;
        }
        let since = match self.stalled {
            Some((since, before)) if before == stored => since,
            _ => {
                self.stalled = Some((now, stored));
                return StallAction::Wait;
            }
        };
        let stalled_for = now.saturating_duration_since(since);
        if give_up_after.is_some_and(|limit| stalled_for >= limit) {
            return StallAction::GiveUp;
        }
        let cooled_down = |last: Option<Instant>| {
            last.is_none_or(|t| now.saturating_duration_since(t) >= STALL_REJOIN_COOLDOWN)
        };
        if stalled_for >= rejoin_after && cooled_down(self.last_rejoin) {
            self.last_rejoin = Some(now);
            self.last_report = Some(now);
            return StallAction::Rejoin;
        }
        if stalled_for >= STALL_REPORT_AFTER && cooled_down(self.last_report) {
            self.last_report = Some(now);
            return StallAction::Report;
        }
        StallAction::Wait
    }

    /// How long records have waited without progress.
    pub(crate) fn stalled_for(&self, now: Instant) -> Duration {
        self.stalled.map_or(Duration::ZERO, |(since, _)| {
            now.saturating_duration_since(since)
        })
    }

    /// This worker got partitions or started reading: whatever stalled is its to read.
    pub(crate) fn reset(&mut self) {
        self.stalled = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn recognises_its_own_member_id() {
        assert!(is_own_member("w-1-3f2a", "w-1"));
        assert!(is_own_member("w-1", "w-1"));
        assert!(!is_own_member("w-12-3f2a", "w-1"));
    }

    #[test]
    fn a_vanished_member_without_rebalance_is_reported() {
        let baseline = set(&["me-a", "w2-b", "w3-c"]);
        assert_eq!(judge(Some(&baseline), &baseline, "me"), Verdict::Consistent);
        // Newcomers are announced by the coordinator; only departures go unnoticed.
        assert_eq!(
            judge(
                Some(&baseline),
                &set(&["me-a", "w2-b", "w3-c", "w4-d"]),
                "me"
            ),
            Verdict::Consistent
        );
        assert_eq!(
            judge(Some(&baseline), &set(&["me-a", "w3-c"]), "me"),
            Verdict::MembersVanished(set(&["w2-b"]))
        );
        assert_eq!(
            judge(Some(&baseline), &set(&["w3-c"]), "me"),
            Verdict::NotAMember
        );
        assert_eq!(judge(None, &set(&["me-a"]), "me"), Verdict::Consistent);
    }

    #[test]
    fn waiting_records_without_progress_lead_to_a_report_a_rejoin_then_a_failure() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let rejoin = Duration::from_secs(40);
        let limit = Some(Duration::from_secs(120));
        let mut watch = StallWatch::default();
        // Nothing waiting: never a stall.
        assert_eq!(
            watch.observe(at(0), 0, 10, rejoin, limit),
            StallAction::Wait
        );
        // Records waiting: the clock starts.
        assert_eq!(
            watch.observe(at(1), 500, 10, rejoin, limit),
            StallAction::Wait
        );
        assert_eq!(
            watch.observe(at(15), 500, 10, rejoin, limit),
            StallAction::Wait
        );
        // Another member commits: progress resets the clock.
        assert_eq!(
            watch.observe(at(19), 400, 110, rejoin, limit),
            StallAction::Wait
        );
        assert_eq!(
            watch.observe(at(30), 400, 110, rejoin, limit),
            StallAction::Wait
        );
        assert_eq!(watch.stalled_for(at(30)), Duration::from_secs(11));
        // Twenty seconds without progress: a report; forty: a rejoin, then again after
        // each cool-down.
        assert_eq!(
            watch.observe(at(39), 400, 110, rejoin, limit),
            StallAction::Report
        );
        assert_eq!(
            watch.observe(at(45), 400, 110, rejoin, limit),
            StallAction::Wait
        );
        assert_eq!(
            watch.observe(at(59), 400, 110, rejoin, limit),
            StallAction::Rejoin
        );
        assert_eq!(
            watch.observe(at(70), 400, 110, rejoin, limit),
            StallAction::Wait
        );
        assert_eq!(
            watch.observe(at(89), 400, 110, rejoin, limit),
            StallAction::Rejoin
        );
        // The stall timeout: a batch run fails; a streaming worker keeps trying.
        assert_eq!(
            watch.observe(at(139), 400, 110, rejoin, limit),
            StallAction::GiveUp
        );
        assert_eq!(
            watch.observe(at(139), 400, 110, rejoin, None),
            StallAction::Rejoin
        );
        assert_eq!(
            watch.observe(at(150), 400, 110, rejoin, None),
            StallAction::Wait
        );
        assert_eq!(
            watch.observe(at(169), 400, 110, rejoin, None),
            StallAction::Rejoin
        );
        // A long rejoin threshold (slow flushes): reports only until then.
        let mut patient = StallWatch::default();
        let slow = Duration::from_secs(100);
        assert_eq!(patient.observe(at(0), 5, 0, slow, None), StallAction::Wait);
        assert_eq!(
            patient.observe(at(20), 5, 0, slow, None),
            StallAction::Report
        );
        assert_eq!(
            patient.observe(at(50), 5, 0, slow, None),
            StallAction::Report
        );
        assert_eq!(patient.observe(at(70), 5, 0, slow, None), StallAction::Wait);
        assert_eq!(
            patient.observe(at(100), 5, 0, slow, None),
            StallAction::Rejoin
        );
        // The lake catches up: the stall is over.
        assert_eq!(
            watch.observe(at(170), 0, 510, rejoin, limit),
            StallAction::Wait
        );
        assert_eq!(watch.stalled_for(at(171)), Duration::ZERO);
    }
}
