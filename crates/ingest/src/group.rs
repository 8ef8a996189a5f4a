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
}
