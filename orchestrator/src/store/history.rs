//! Each device's recent transitions, for the console's device page: a bounded log per device
//! (at most [`HISTORY_PER_DEVICE`] entries, the oldest dropped), written by
//! [`Store::put_progress`] whenever a member's state changes, read a page at a time.
//!
//! Key: device id, a NUL, then a per-device counter (big-endian u64), so one device's entries
//! sort together and in order, and the newest is found by one reverse step (no scan). Appending
//! costs one read of the newest key, one insert, and at most one removal: O(log n), whatever the
//! device's past.

use aloft_proto::{CampaignId, DeviceId, DeviceState, Reason};
use serde::{Deserialize, Serialize};

use super::kv::{Scan, Tree};
use super::{encode, Store, StoreError};

/// The tree of the per-device history.
pub const HISTORY_TREE: &str = "history";

/// Entries kept per device; older ones are dropped as new ones arrive.
pub const HISTORY_PER_DEVICE: u64 = 64;

/// One transition of one device in one campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub campaign: CampaignId,
    pub from: DeviceState,
    pub to: DeviceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Unix milliseconds (the progress record's `updated_ms`).
    pub at_ms: u64,
}

fn prefix(device: &DeviceId) -> Vec<u8> {
    let mut k = device.as_str().as_bytes().to_vec();
    k.push(0);
    k
}

fn key(device: &DeviceId, n: u64) -> Vec<u8> {
    let mut k = prefix(device);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn counter(prefix_len: usize, key: &[u8]) -> Option<u64> {
    let b: [u8; 8] = key.get(prefix_len..)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

impl Store {
    /// Appends a transition to `device`'s history, dropping the oldest beyond the cap.
    pub(super) fn append_history(
        &self,
        device: &DeviceId,
        t: &Transition,
    ) -> Result<(), StoreError> {
        let known = self.history_tips.as_ref().and_then(|tips| {
            let tips = tips.lock().unwrap_or_else(|p| p.into_inner());
            tips.get(device).copied()
        });
        let last = match known {
            Some(n) => n,
            None => self.newest_history(device)?,
        };
        let n = last.saturating_add(1);
        self.kv.insert(Tree::History, &key(device, n), &encode(t))?;
        if let Some(tips) = &self.history_tips {
            let mut tips = tips.lock().unwrap_or_else(|p| p.into_inner());
            tips.insert(device.clone(), n);
        }
        if n > HISTORY_PER_DEVICE {
            self.kv
                .remove(Tree::History, &key(device, n - HISTORY_PER_DEVICE))?;
        }
        Ok(())
    }

    /// The counter of `device`'s newest history entry (0 with none): one reverse step. Sled's
    /// reverse step copies the leaf it lands in, and was a third of the cost of recording a
    /// transition while a 10,000-device campaign's jobs went out (docs/BENCHMARKS.md), so on
    /// sled it is taken once per device and process.
    fn newest_history(&self, device: &DeviceId) -> Result<u64, StoreError> {
        let p = prefix(device);
        let newest = self.kv.scan(
            Tree::History,
            &Scan::prefix(p.clone()).rev().limit(1).keys_only(),
        )?;
        Ok(match newest.first() {
            Some((k, _)) => counter(p.len(), k).unwrap_or(0),
            None => 0,
        })
    }

    /// `device`'s transitions, newest first, at most `limit` (at most the cap).
    pub fn device_history(
        &self,
        device: &DeviceId,
        limit: usize,
    ) -> Result<Vec<Transition>, StoreError> {
        let limit = limit.min(HISTORY_PER_DEVICE as usize);
        self.scan(
            Tree::History,
            &Scan::prefix(prefix(device)).rev().limit(limit),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::state::Progress;
    use aloft_vault::MasterKey;

    fn progress(state: DeviceState, at: u64) -> Progress {
        let mut p = Progress::new(at);
        p.state = state;
        p
    }

    #[test]
    fn a_state_change_is_recorded_and_a_rewrite_of_the_same_state_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::tests::new_store(dir.path());
        let c = CampaignId::new("c-1").unwrap();
        let d = DeviceId::new("dev-1").unwrap();
        let other = DeviceId::new("dev-10").unwrap();
        s.put_progress(&c, &d, &progress(DeviceState::Idle, 1))
            .unwrap();
        s.put_progress(&c, &d, &progress(DeviceState::Notified, 2))
            .unwrap();
        let mut same = progress(DeviceState::Notified, 3);
        same.last_seq = 4;
        s.put_progress(&c, &d, &same).unwrap();
        let mut failed = progress(DeviceState::Failed, 5);
        failed.reason = Some(Reason::TimedOut);
        s.put_progress(&c, &d, &failed).unwrap();
        s.put_progress(&c, &other, &progress(DeviceState::Notified, 6))
            .unwrap();
        let h = s.device_history(&d, 100).unwrap();
        let seen: Vec<_> = h
            .iter()
            .map(|t| (t.from, t.to, t.reason, t.at_ms))
            .collect();
        assert_eq!(
            seen,
            vec![
                (
                    DeviceState::Notified,
                    DeviceState::Failed,
                    Some(Reason::TimedOut),
                    5
                ),
                (DeviceState::Idle, DeviceState::Notified, None, 2),
                (DeviceState::Idle, DeviceState::Idle, None, 1),
            ]
        );
        // dev-10's entries are its own, though its id starts with dev-1's.
        assert_eq!(s.device_history(&other, 100).unwrap().len(), 1);
    }

    #[test]
    fn the_history_keeps_the_newest_entries_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::tests::new_store(dir.path());
        let d = DeviceId::new("dev-1").unwrap();
        for i in 0..(HISTORY_PER_DEVICE + 10) {
            let t = Transition {
                campaign: CampaignId::new("c").unwrap(),
                from: DeviceState::Idle,
                to: DeviceState::Notified,
                reason: None,
                at_ms: i,
            };
            s.append_history(&d, &t).unwrap();
        }
        let h = s.device_history(&d, usize::MAX).unwrap();
        assert_eq!(h.len() as u64, HISTORY_PER_DEVICE);
        assert_eq!(h[0].at_ms, HISTORY_PER_DEVICE + 9);
        assert_eq!(h.last().unwrap().at_ms, 10);
        let all = s.kv.scan(Tree::History, &Scan::all().keys_only()).unwrap();
        assert_eq!(all.len() as u64, HISTORY_PER_DEVICE);
    }

    #[test]
    fn the_history_goes_on_from_its_newest_entry_after_a_reopen_and_through_a_clone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let key = MasterKey::generate().unwrap();
        let d = DeviceId::new("dev-1").unwrap();
        let t = |at_ms| Transition {
            campaign: CampaignId::new("c").unwrap(),
            from: DeviceState::Idle,
            to: DeviceState::Notified,
            reason: None,
            at_ms,
        };
        let s = Store::create(&path, key.clone()).unwrap();
        let other = s.clone();
        for i in 0..HISTORY_PER_DEVICE {
            // Alternately through the store and its clone: they share the newest counter.
            let by = if i % 2 == 0 { &s } else { &other };
            by.append_history(&d, &t(i)).unwrap();
        }
        s.flush().unwrap();
        drop((s, other));
        let s = Store::open(&path, key).unwrap();
        for i in HISTORY_PER_DEVICE..HISTORY_PER_DEVICE + 3 {
            s.append_history(&d, &t(i)).unwrap();
        }
        let h = s.device_history(&d, usize::MAX).unwrap();
        let at: Vec<u64> = h.iter().map(|t| t.at_ms).collect();
        let expected: Vec<u64> = (3..HISTORY_PER_DEVICE + 3).rev().collect();
        assert_eq!(
            at, expected,
            "newest first, none overwritten, the oldest dropped"
        );
    }
}
