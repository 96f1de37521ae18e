//! The records the store keeps, serialized as JSON values in sled trees.

use std::collections::BTreeMap;

use aloft_proto::crypto::WrappedKey;
use aloft_proto::manifest::{Manifest, SignedManifest};
use aloft_proto::{ArtifactId, CampaignId, DeviceId, OperatorId, SecurityVersion};
use serde::{Deserialize, Serialize};

pub use crate::model::CampaignStatus;
use crate::rollout::{RolloutPolicy, RolloutState};

/// A device the orchestrator may target, learned from its CA-signed certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    /// The device's X25519 public key (hex) from its certificate: content keys are wrapped to it.
    pub x25519_public: String,
    /// Certificate expiry, unix seconds.
    pub cert_not_after: i64,
    /// Start of the certificate's validity, unix seconds (0: recorded before 1.1). A renewed
    /// certificate gets the same lifetime.
    #[serde(default)]
    pub cert_not_before: i64,
    /// Serial number of the device's current certificate, lowercase hex (empty: recorded before
    /// 1.1; learned at the device's next connection). Revocation is decided on it.
    #[serde(default)]
    pub cert_serial: String,
    /// The current certificate is revoked by the CRL in force: the device gets no job and no
    /// chunk, and campaigns leave it out.
    #[serde(default)]
    pub revoked: bool,
    /// Operator-assigned groups.
    pub groups: Vec<String>,
    /// Operator-assigned labels (`key=value`), for targeting.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Unix milliseconds of registration.
    pub registered_ms: u64,
    /// Unix milliseconds of the last connection through the front (0 if never seen).
    pub last_seen_ms: u64,
    /// The highest security version this device reported `succeeded` with: its anti-rollback
    /// floor as far as the orchestrator knows. It only rises; a restore keeps the higher of
    /// the backup's and the surviving store's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<SecurityVersion>,
    /// The highest manifest `sequence` this device reported `succeeded` with: it refuses any
    /// manifest whose sequence is not above it (`replayed_manifest`). Only rises, like `floor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_sequence: Option<u64>,
    /// The firmware version the device last said it runs (`running_version` of its status
    /// reports and heartbeats); `None` until it has said. Written only when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_version: Option<String>,
}

/// A release whose signature the orchestrator verified on upload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub artifact: ArtifactId,
    pub signed: SignedManifest,
    pub manifest: Manifest,
    /// The content key (hex), wrapped per device when a campaign publishes jobs. In memory
    /// only: `Store` keeps it sealed under the orchestrator's master key on disk.
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
    /// Devices carrying every one of these labels.
    Labels(BTreeMap<String, String>),
}

/// A campaign: a release, a fixed membership, and its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    #[serde(default)]
    pub policy: RolloutPolicy,
    #[serde(default)]
    pub rollout: RolloutState,
    /// The campaign this one rolls back, if it is a rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolls_back: Option<CampaignId>,
    /// (1.5) The untrusted HTTPS origin serving the release's export, named in every job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// A member's own part of its job: what HPKE made for this device alone, and what else the job
/// carried that may change later (its issue time, the chain of roots). The rest of a job (the
/// signed manifest, the origin, the delta manifests) is the campaign's, built from its release,
/// and never copied here. Made once, when the member is first notified, committed before the
/// job leaves, and every later publication of the job is rebuilt from it byte for byte: a
/// device never receives two different jobs for one campaign, whoever publishes it and however
/// often (a restart, a reconnected broker link).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberJob {
    /// The job's `issued_at` (Unix seconds).
    pub issued_at: u64,
    /// The release's content key, wrapped for this device.
    pub wrapped_key: WrappedKey,
    /// (1.5) Each delta the job offers, in the job's order: its artifact and its content key
    /// wrapped for this device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<(ArtifactId, WrappedKey)>,
    /// The version of the newest root the job's `roots` chain ends at (roots accepted later do
    /// not join it).
    pub root_version: u64,
    /// The device's X25519 public key (hex) the keys were wrapped to. A device registered again
    /// with another key could not open them: only then is the job made anew.
    pub wrapped_to: String,
}
