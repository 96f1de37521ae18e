//! Domain types shared by the rollout logic, the engine and the store, so that none of them
//! has to reach into another for a word of the vocabulary (the store only persists them).

use serde::{Deserialize, Serialize};

/// Where a campaign stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignStatus {
    /// Rolling out (possibly waiting for its start time, window or a wave's soak).
    Active,
    /// No new device is notified (an operator or the pause threshold); devices in flight finish.
    Paused,
    /// Stopped for good (an operator or the abort threshold): nobody new is notified and
    /// downloads in flight were withdrawn.
    Aborted,
    /// The deadline passed: devices that never started were timed out.
    Expired,
    /// Every wave ran and every member reached a terminal state.
    Finished,
}

impl CampaignStatus {
    pub const ALL: [CampaignStatus; 5] = [
        CampaignStatus::Active,
        CampaignStatus::Paused,
        CampaignStatus::Aborted,
        CampaignStatus::Expired,
        CampaignStatus::Finished,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStatus::Active => "active",
            CampaignStatus::Paused => "paused",
            CampaignStatus::Aborted => "aborted",
            CampaignStatus::Expired => "expired",
            CampaignStatus::Finished => "finished",
        }
    }

    /// No device will be notified again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CampaignStatus::Aborted | CampaignStatus::Expired | CampaignStatus::Finished
        )
    }
}

impl std::fmt::Display for CampaignStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
