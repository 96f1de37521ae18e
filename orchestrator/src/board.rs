//! The board: what the engine publishes for readers off its task (the console). After each
//! batch the engine's core puts a small summary of every campaign it touched here (its status,
//! members per state, each wave's counts: O(states + waves), never O(members)), and bumps a
//! version that readers wait on. Readers take a copy under a short lock and never reach the
//! engine, so no request of theirs costs the engine anything or can block it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use aloft_proto::CampaignId;
use tokio::sync::watch;

use crate::admin::wire::CampaignSummary;

/// Campaigns the board keeps; beyond it the oldest finished one is dropped (the console reads
/// older ones from the store).
pub const MAX_BOARD_CAMPAIGNS: usize = 256;

/// The engine's published campaign summaries. Their `devices`, `reasons` and `paths` are
/// empty: those cost a pass over the members.
pub struct Board {
    campaigns: Mutex<BTreeMap<CampaignId, Arc<CampaignSummary>>>,
    version: watch::Sender<u64>,
}

impl Default for Board {
    fn default() -> Self {
        Self {
            campaigns: Mutex::new(BTreeMap::new()),
            version: watch::channel(0).0,
        }
    }
}

impl Board {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<CampaignId, Arc<CampaignSummary>>> {
        // A panic elsewhere while the lock was held leaves a map that is still whole.
        self.campaigns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine: a campaign's new summary. The same summary again (a tick that moved
    /// nothing) wakes nobody.
    pub fn publish(&self, summary: CampaignSummary) {
        {
            let mut m = self.lock();
            if m.get(&summary.campaign).is_some_and(|old| **old == summary) {
                return;
            }
            m.insert(summary.campaign.clone(), Arc::new(summary));
            if m.len() > MAX_BOARD_CAMPAIGNS {
                let oldest = m
                    .values()
                    .filter(|c| c.finished_ms.is_some())
                    .min_by_key(|c| c.created_ms)
                    .map(|c| c.campaign.clone());
                if let Some(id) = oldest {
                    m.remove(&id);
                }
            }
        }
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Every campaign on the board, newest first.
    pub fn campaigns(&self) -> Vec<Arc<CampaignSummary>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| {
            b.created_ms
                .cmp(&a.created_ms)
                .then(a.campaign.cmp(&b.campaign))
        });
        v
    }

    pub fn campaign(&self, id: &CampaignId) -> Option<Arc<CampaignSummary>> {
        self.lock().get(id).cloned()
    }

    /// Changes with every publish: readers wait on it for live updates.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CampaignStatus;

    fn summary(id: &str, created_ms: u64, finished: bool) -> CampaignSummary {
        CampaignSummary {
            campaign: CampaignId::new(id).unwrap(),
            artifact: aloft_proto::ArtifactId::new("fw").unwrap(),
            status: if finished {
                CampaignStatus::Finished
            } else {
                CampaignStatus::Active
            },
            total: 1,
            counts: BTreeMap::new(),
            reasons: BTreeMap::new(),
            created_ms,
            finished_ms: finished.then_some(created_ms + 1),
            reason: None,
            policy: Default::default(),
            waves: Vec::new(),
            unhealthy: 0,
            rolls_back: None,
            paths: BTreeMap::new(),
            devices: Vec::new(),
        }
    }

    #[test]
    fn a_publish_replaces_the_campaign_and_wakes_readers() {
        let b = Board::default();
        let mut rx = b.subscribe();
        b.publish(summary("c-1", 1, false));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        b.publish(summary("c-1", 1, false));
        assert!(
            !rx.has_changed().unwrap(),
            "the same summary again wakes nobody"
        );
        b.publish(summary("c-1", 1, true));
        assert!(rx.has_changed().unwrap());
        assert_eq!(b.campaigns().len(), 1);
        assert_eq!(
            b.campaign(&CampaignId::new("c-1").unwrap()).unwrap().status,
            CampaignStatus::Finished
        );
    }

    #[test]
    fn the_board_is_bounded_and_drops_the_oldest_finished_campaign() {
        let b = Board::default();
        b.publish(summary("c-live", 0, false));
        for i in 0..MAX_BOARD_CAMPAIGNS as u64 + 5 {
            b.publish(summary(&format!("c-{i}"), i + 1, true));
        }
        let all = b.campaigns();
        assert_eq!(all.len(), MAX_BOARD_CAMPAIGNS);
        // The live campaign, though the oldest, stays; the oldest finished ones went.
        assert!(b.campaign(&CampaignId::new("c-live").unwrap()).is_some());
        assert!(b.campaign(&CampaignId::new("c-0").unwrap()).is_none());
        assert_eq!(
            all[0].campaign.as_str(),
            format!("c-{}", MAX_BOARD_CAMPAIGNS as u64 + 4)
        );
    }
}
