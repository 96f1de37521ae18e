//! The records the store keeps, serialized as JSON values in sled trees.

use aloft_proto::manifest::{Manifest, SignedManifest};
use aloft_proto::{ArtifactId, CampaignId, DeviceId, OperatorId};
use serde::{Deserialize, Serialize};

/// A device the orchestrator may target, learned from its CA-signed certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    /// The device's X25519 public key (hex) from its certificate: content keys are wrapped to it.
    pub x25519_public: String,
    /// Certificate expiry, unix seconds.
    pub cert_not_after: i64,
    /// Operator-assigned groups.
    pub groups: Vec<String>,
    /// Unix milliseconds of registration.
    pub registered_ms: u64,
    /// Unix milliseconds of the last connection through the front (0 if never seen).
    pub last_seen_ms: u64,
}

/// A release whose signature the orchestrator verified on upload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub artifact: ArtifactId,
    pub signed: SignedManifest,
    pub manifest: Manifest,
    /// The content key (hex), wrapped per device when a campaign publishes jobs.
    pub content_key_hex: String,
    /// True once every chunk is stored and matched its digest.
    pub complete: bool,
    pub uploaded_by: OperatorId,
    pub uploaded_ms: u64,
}

/// Which devices a campaign addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    All,
    Group(String),
    Devices(Vec<DeviceId>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignStatus {
    Active,
    /// Every targeted device reached a terminal state.
    Finished,
}

/// A campaign: a release, a fixed membership, and its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignRecord {
    pub id: CampaignId,
    pub artifact: ArtifactId,
    pub target: Target,
    /// Membership, fixed at creation.
    pub devices: Vec<DeviceId>,
    pub status: CampaignStatus,
    pub created_by: OperatorId,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
}
