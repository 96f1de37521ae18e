//! The per-device update state machine of one campaign: which transitions are legal and how a
//! device's report is applied. Pure: no I/O, no clock, so it is tested exhaustively.
//!
//! ```text
//! Idle → Notified → Downloading → Downloaded → Installing → Rebooting → Verifying → Succeeded
//!          │             │             │            │            │           │
//!          └──── Failed(reason) ◄──────┴────────────┘            └─► RolledBack(reason)
//! ```
//! (1.5) `Deferred` (the manifest's preconditions do not hold on the device) is entered from
//! `Notified` (checked before the download), `Downloading` (a metered link, or a resumed
//! download) or `Downloaded` (checked before the install), and again from itself when the
//! reason changes; it leaves to `Downloading` or `Installing` once they hold, or to `Failed`.
//! `Failed` is legal from every non-terminal state, so that a later orchestrator decision
//! (timeouts, cancellation: not built yet) fits the same table. Terminal states (`Succeeded`, `Failed`, `RolledBack`) are absorbing.

use aloft_proto::messages::{AckError, StatusReport};
use aloft_proto::{DeviceState, Reason};
use serde::{Deserialize, Serialize};

use DeviceState::*;

/// Whether `from → to` is a legal transition.
pub fn is_legal(from: DeviceState, to: DeviceState) -> bool {
    matches!(
        (from, to),
        (Idle, Notified)
            | (Notified, Downloading)
            | (Downloading, Downloaded)
            | (Downloaded, Installing)
            | (Installing, Rebooting)
            | (Rebooting, Verifying)
            | (Verifying, Succeeded)
            | (Rebooting | Verifying, RolledBack)
            | (Notified | Downloading | Downloaded | Deferred, Deferred)
            | (Deferred, Downloading | Installing)
            | (
                Idle | Notified
                    | Downloading
                    | Downloaded
                    | Installing
                    | Rebooting
                    | Verifying
                    | Deferred,
                Failed
            )
    )
}

/// A device's recorded progress in one campaign: what the store keeps per (campaign, device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub state: DeviceState,
    /// Set with `Failed` and `RolledBack`, and with `Deferred` (its deferral reason).
    pub reason: Option<Reason>,
    /// The last report sequence number handled (applied or rejected); 0 before any report.
    pub last_seq: u32,
    /// Unix milliseconds of the last change.
    pub updated_ms: u64,
    /// Succeeded, then reported itself unhealthy during its wave's soak.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unhealthy: bool,
    /// The orchestrator handed this member at least one chunk of the campaign's image (set
    /// once, never cleared): a `succeeded` without it is flagged (PROTOCOL.md §10).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub served: bool,
}

impl Progress {
    pub fn new(now_ms: u64) -> Self {
        Self {
            state: Idle,
            reason: None,
            last_seq: 0,
            updated_ms: now_ms,
            unhealthy: false,
            served: false,
        }
    }
}

/// What applying a report decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A new progress record to persist before acknowledging.
    Apply(Progress),
    /// Already handled; acknowledge again, change nothing.
    Duplicate,
    /// Refused; persist `Progress` (the sequence moved on) and acknowledge with the error.
    Reject(Progress, AckError),
}

/// Applies a device's report to its recorded progress.
pub fn apply_report(current: &Progress, report: &StatusReport, now_ms: u64) -> Decision {
    if report.seq <= current.last_seq {
        return Decision::Duplicate;
    }
    // A gap is accepted: a device sends one report at a time and moves on only after an ack, so
    // skipped numbers are reports that were answered (rejected) or never sent; order still holds,
    // and legality is checked against the recorded state. Refusing gaps would wedge a device
    // forever after a single lost number.
    let mut next = current.clone();
    next.last_seq = report.seq;
    if !is_legal(current.state, report.state) {
        return Decision::Reject(next, AckError::IllegalTransition);
    }
    next.state = report.state;
    next.reason = report.reason;
    next.updated_ms = now_ms;
    Decision::Apply(next)
}

/// The orchestrator's own transitions (notify, time out, cancel).
pub fn advance(
    current: &Progress,
    to: DeviceState,
    reason: Option<Reason>,
    now_ms: u64,
) -> Option<Progress> {
    if !is_legal(current.state, to) {
        return None;
    }
    Some(Progress {
        state: to,
        reason,
        last_seq: current.last_seq,
        updated_ms: now_ms,
        unhealthy: current.unhealthy,
        served: current.served,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_proto::messages::PROTOCOL_VERSION;
    use aloft_proto::CampaignId;
    use proptest::prelude::*;
    use std::collections::{HashSet, VecDeque};

    fn report(seq: u32, state: DeviceState) -> StatusReport {
        let reason = match state {
            Failed | RolledBack => Some(Reason::HealthCheckFailed),
            Deferred => Some(Reason::BatteryLow),
            _ => None,
        };
        StatusReport {
            v: PROTOCOL_VERSION,
            campaign: CampaignId::new("c-1").unwrap(),
            seq,
            state,
            reason,
            detail: None,
            running_version: None,
        }
    }

    /// States reachable from Idle through legal transitions only.
    fn reachable() -> HashSet<DeviceState> {
        let mut seen = HashSet::from([Idle]);
        let mut queue = VecDeque::from([Idle]);
        while let Some(s) = queue.pop_front() {
            for t in DeviceState::ALL {
                if is_legal(s, t) && seen.insert(t) {
                    queue.push_back(t);
                }
            }
        }
        seen
    }

    #[test]
    fn every_state_is_reachable_and_terminal_states_are_absorbing() {
        assert_eq!(reachable().len(), DeviceState::ALL.len());
        for t in DeviceState::ALL.iter().filter(|s| s.is_terminal()) {
            for to in DeviceState::ALL {
                assert!(!is_legal(*t, to), "{t} -> {to} is legal");
            }
        }
    }

    #[test]
    fn the_happy_path_is_legal_step_by_step() {
        for w in DeviceState::SUCCESS_PATH.windows(2) {
            assert!(is_legal(w[0], w[1]), "{} -> {}", w[0], w[1]);
        }
        // No skipping ahead.
        assert!(!is_legal(Notified, Installing));
        assert!(!is_legal(Downloading, Succeeded));
        assert!(!is_legal(Idle, Downloading));
    }

    #[test]
    fn a_deferral_resumes_where_it_stopped_and_never_skips_the_install() {
        for (from, to) in [
            (Notified, Deferred),
            (Downloading, Deferred),
            (Downloaded, Deferred),
            (Deferred, Deferred),
            (Deferred, Downloading),
            (Deferred, Installing),
            (Deferred, Failed),
        ] {
            assert!(is_legal(from, to), "{from} -> {to}");
        }
        for to in [Rebooting, Verifying, Succeeded, RolledBack, Downloaded] {
            assert!(!is_legal(Deferred, to), "deferred -> {to}");
        }
        assert!(!is_legal(Installing, Deferred));
        assert!(!Deferred.is_terminal());
    }

    #[test]
    fn duplicate_report_changes_nothing() {
        let mut p = Progress::new(0);
        p.state = Notified;
        let Decision::Apply(p1) = apply_report(&p, &report(1, Downloading), 5) else {
            panic!("not applied")
        };
        assert_eq!(
            apply_report(&p1, &report(1, Downloading), 6),
            Decision::Duplicate
        );
    }

    #[test]
    fn a_gap_in_sequence_numbers_is_accepted_in_order() {
        let mut p = Progress::new(0);
        p.state = Notified;
        let Decision::Apply(after) = apply_report(&p, &report(3, Downloading), 5) else {
            panic!("refused")
        };
        assert_eq!((after.state, after.last_seq), (Downloading, 3));
        assert_eq!(
            apply_report(&after, &report(2, Downloaded), 6),
            Decision::Duplicate
        );
    }

    #[test]
    fn an_illegal_report_is_rejected_and_the_state_kept() {
        let mut p = Progress::new(0);
        p.state = Notified;
        let Decision::Reject(after, AckError::IllegalTransition) =
            apply_report(&p, &report(1, Succeeded), 5)
        else {
            panic!("accepted")
        };
        assert_eq!(after.state, Notified);
        assert_eq!(after.last_seq, 1);
    }

    proptest! {
        /// No sequence of reports and orchestrator actions reaches a state that legal transitions
        /// can't, leaves a terminal state, or moves the sequence number backwards.
        #[test]
        fn no_event_sequence_reaches_an_illegal_state(
            events in proptest::collection::vec((0u32..12, 0usize..11, any::<bool>()), 0..64)
        ) {
            let reachable = reachable();
            let mut p = Progress::new(0);
            let mut history = vec![p.state];
            for (seq, state_ix, by_orchestrator) in events {
                let to = DeviceState::ALL[state_ix];
                let before = p.clone();
                if by_orchestrator {
                    if let Some(n) = advance(&p, to, None, 1) {
                        p = n;
                    }
                } else if to.is_reportable() {
                    match apply_report(&p, &report(seq, to), 1) {
                        Decision::Apply(n) | Decision::Reject(n, _) => p = n,
                        Decision::Duplicate => {}
                    }
                }
                prop_assert!(p.last_seq >= before.last_seq);
                if p.state != before.state {
                    prop_assert!(is_legal(before.state, p.state));
                    prop_assert!(!before.state.is_terminal());
                }
                prop_assert!(reachable.contains(&p.state));
                history.push(p.state);
            }
        }
    }
}
