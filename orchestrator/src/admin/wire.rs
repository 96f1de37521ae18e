//! The admin protocol between the operator CLI and the orchestrator (PROTOCOL.md §Admin):
//! JSON requests on `aloft/v1/admin/{operator}/request`, replies on `aloft/v1/o/{operator}/reply`
//! matched by `id`. The correlation id travels in the body, not in MQTT 5 properties, so the
//! protocol works unchanged through any broker.

use std::collections::BTreeMap;

use aloft_certs::OperatorRole;
use aloft_proto::manifest::SignedManifest;
use aloft_proto::messages::{DecodeError, Message, PROTOCOL_VERSION};
use aloft_proto::{ArtifactId, CampaignId, DeviceId, Reason};
use serde::{Deserialize, Serialize};

use crate::rollout::{RolloutPolicy, WaveCounts};
use crate::store::Target;

/// The admin op name in the request topic.
pub const REQUEST_OP: &str = "request";
/// Largest admin request: a release chunk (up to 1 MiB, base64) plus envelope.
pub const MAX_ADMIN_BYTES: usize = 1536 * 1024;
/// Largest admin reply.
pub const MAX_REPLY_BYTES: usize = 8 * 1024 * 1024;
/// Most devices in one `device_list` page: well inside [`MAX_REPLY_BYTES`] (an entry is under
/// 1 KiB).
pub const MAX_DEVICE_PAGE: u32 = 2000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminRequest {
    pub v: u8,
    /// Chosen by the client, echoed in the reply; 1 to 64 bytes.
    pub id: String,
    pub body: AdminBody,
    /// (1.5) The operator's signature over the request, with its certificate
    /// (`super::auth`); absent from older clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<super::auth::RequestAuth>,
}

impl Message for AdminRequest {
    const MAX_BYTES: usize = MAX_ADMIN_BYTES;
    fn version(&self) -> u8 {
        self.v
    }
    fn validate(&self) -> Result<(), DecodeError> {
        if self.id.is_empty() || self.id.len() > 64 {
            return Err(DecodeError::Invalid("id must be 1 to 64 bytes"));
        }
        Ok(())
    }
}

/// One admin operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminBody {
    /// Offer a release: its signed manifest and content key (hex). The orchestrator verifies the
    /// signature against its trusted release keys before storing anything.
    ReleasePut {
        manifest: SignedManifest,
        content_key: String,
    },
    /// One sealed chunk of an offered release, base64.
    ReleaseChunk {
        artifact: ArtifactId,
        index: u32,
        data: String,
    },
    ReleaseList {},
    /// New root metadata (one or more versions, any order): accepted only if it walks forward
    /// from the root the orchestrator trusts.
    TrustUpdate {
        roots: Vec<aloft_proto::trust::SignedRoot>,
    },
    /// The root the orchestrator trusts now.
    TrustStatus {},
    /// Register devices from their certificates (PEM), optionally into groups.
    DeviceRegister {
        certs: Vec<String>,
        #[serde(default)]
        groups: Vec<String>,
    },
    /// Registered devices in id order. Without `limit`, all of them (a reply beyond
    /// [`MAX_REPLY_BYTES`] cannot be sent: some 15,000 devices); with it (1.5), a page.
    DeviceList {
        /// (1.5) Only devices whose id sorts after this one: the page after the one ending there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<DeviceId>,
        /// (1.5) At most this many devices (at most [`MAX_DEVICE_PAGE`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// How many devices are registered (1.4): what a script polls while a fleet connects,
    /// instead of the whole list.
    DeviceCount {},
    /// Replace the CRL in force (PEM, signed by the fleet CA, numbered above the one in force),
    /// at once and without a restart (since 1.1).
    CrlUpdate {
        crl: String,
    },
    /// Let one registered device renew its certificate once, now, though it is not yet in its
    /// renewal window or renewed within the hour (one-shot; forgotten at restart).
    DeviceRenewAllow {
        device: DeviceId,
    },
    /// Set and remove labels on devices.
    DeviceLabel {
        devices: Vec<DeviceId>,
        #[serde(default)]
        set: BTreeMap<String, String>,
        #[serde(default)]
        remove: Vec<String>,
    },
    /// Create a campaign; membership is fixed now. `dry_run` returns the wave plan and touches
    /// nothing.
    CampaignCreate {
        artifact: ArtifactId,
        target: Target,
        #[serde(default)]
        include: Vec<DeviceId>,
        #[serde(default)]
        exclude: Vec<DeviceId>,
        #[serde(default)]
        policy: RolloutPolicy,
        #[serde(default)]
        dry_run: bool,
        /// (1.5) An HTTPS origin serving the release's export; carried in every member's job.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
    },
    CampaignPause {
        campaign: CampaignId,
    },
    CampaignResume {
        campaign: CampaignId,
    },
    CampaignAbort {
        campaign: CampaignId,
    },
    /// A new campaign returning `campaign`'s succeeded devices to the release `to`; aborts
    /// `campaign` first if it still runs.
    CampaignRollback {
        campaign: CampaignId,
        to: ArtifactId,
        #[serde(default)]
        policy: RolloutPolicy,
        #[serde(default)]
        dry_run: bool,
    },
    CampaignStatus {
        campaign: CampaignId,
        /// Also list every device's state.
        #[serde(default)]
        devices: bool,
    },
    CampaignList {},
    /// Entries of the audit log from `since` (default 1), at most `limit` (default 100, at most
    /// 1,000), and whether the whole hash chain verifies.
    AuditList {
        #[serde(default)]
        since: Option<u64>,
        #[serde(default)]
        limit: Option<u32>,
    },
}

/// A reply: `ok` with a `result`, or an `error`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminReply {
    pub v: u8,
    pub id: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AdminError>,
}

impl Message for AdminReply {
    const MAX_BYTES: usize = MAX_REPLY_BYTES;
    fn version(&self) -> u8 {
        self.v
    }
}

impl AdminReply {
    pub fn ok(id: String, result: serde_json::Value) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn err(id: String, error: AdminError) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id,
            ok: false,
            result: None,
            error: Some(error),
        }
    }
}

/// A refused admin request: a stable code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{code}: {message}")]
pub struct AdminError {
    pub code: String,
    pub message: String,
}

impl AdminError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// `campaign_status` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignSummary {
    pub campaign: CampaignId,
    pub artifact: ArtifactId,
    pub status: crate::store::CampaignStatus,
    pub total: u32,
    /// Devices per state (states with zero devices omitted).
    pub counts: BTreeMap<String, u32>,
    /// Failed and rolled-back devices per reason.
    pub reasons: BTreeMap<String, u32>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    /// Why the campaign is paused, aborted or expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub policy: RolloutPolicy,
    #[serde(default)]
    pub waves: Vec<WaveSummary>,
    /// Succeeded devices that reported themselves unhealthy during their wave's soak.
    #[serde(default)]
    pub unhealthy: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolls_back: Option<CampaignId>,
    /// (1.5) Members by delivery path (`full`, `delta`, `delta_then_full`) since this
    /// orchestrator started; absent when no member asked for chunks.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub paths: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceSummary>,
}

/// One wave of a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveSummary {
    pub wave: u32,
    #[serde(flatten)]
    pub counts: WaveCounts,
    /// When it opened (Unix ms), if it has.
    pub opened_ms: Option<u64>,
    /// When `advance_at` of it had finished (its soak started).
    pub finished_ms: Option<u64>,
}

/// `campaign_create` / `campaign_rollback` with `dry_run`: who would get the release in which
/// wave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DryRun {
    pub artifact: ArtifactId,
    pub total: u32,
    pub policy: RolloutPolicy,
    pub waves: Vec<Vec<DeviceId>>,
}

impl CampaignSummary {
    pub fn count(&self, state: aloft_proto::DeviceState) -> u32 {
        self.counts.get(state.as_str()).copied().unwrap_or(0)
    }

    /// Devices in a terminal state (succeeded, failed or rolled back).
    pub fn terminal(&self) -> u32 {
        aloft_proto::DeviceState::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| self.count(*s))
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSummary {
    pub device: DeviceId,
    pub state: aloft_proto::DeviceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The wave the device belongs to (0-based).
    #[serde(default)]
    pub wave: u32,
    /// Reported itself unhealthy during its wave's soak.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unhealthy: bool,
}

impl AdminBody {
    /// What the audit log records of this request: its operation and subject, or `None` for
    /// requests that change nothing (and for release chunks, which `release_put` already
    /// stands for).
    /// The `op` name of this operation, as on the wire; bounded, so also a metric label.
    pub fn op(&self) -> &'static str {
        match self {
            AdminBody::ReleasePut { .. } => "release_put",
            AdminBody::ReleaseChunk { .. } => "release_chunk",
            AdminBody::ReleaseList {} => "release_list",
            AdminBody::TrustUpdate { .. } => "trust_update",
            AdminBody::TrustStatus {} => "trust_status",
            AdminBody::DeviceRegister { .. } => "device_register",
            AdminBody::DeviceList { .. } => "device_list",
            AdminBody::DeviceCount {} => "device_count",
            AdminBody::CrlUpdate { .. } => "crl_update",
            AdminBody::DeviceRenewAllow { .. } => "device_renew_allow",
            AdminBody::DeviceLabel { .. } => "device_label",
            AdminBody::CampaignCreate { .. } => "campaign_create",
            AdminBody::CampaignPause { .. } => "campaign_pause",
            AdminBody::CampaignResume { .. } => "campaign_resume",
            AdminBody::CampaignAbort { .. } => "campaign_abort",
            AdminBody::CampaignRollback { .. } => "campaign_rollback",
            AdminBody::CampaignStatus { .. } => "campaign_status",
            AdminBody::CampaignList {} => "campaign_list",
            AdminBody::AuditList { .. } => "audit_list",
        }
    }

    /// The least operator role allowed to carry this operation out (1.5, PROTOCOL.md §11.7).
    /// Reading needs a viewer; changing what the fleet runs (releases, campaigns, labels) an
    /// operator; changing who and what the fleet trusts (roots, CRLs, registrations, early
    /// renewals) a security admin. A release is still installed only if the root's release
    /// role signed it, whatever the uploader's role.
    pub fn required_role(&self) -> OperatorRole {
        match self {
            AdminBody::ReleaseList {}
            | AdminBody::TrustStatus {}
            | AdminBody::DeviceList { .. }
            | AdminBody::DeviceCount {}
            | AdminBody::CampaignStatus { .. }
            | AdminBody::CampaignList {}
            | AdminBody::AuditList { .. } => OperatorRole::Viewer,
            AdminBody::ReleasePut { .. }
            | AdminBody::ReleaseChunk { .. }
            | AdminBody::DeviceLabel { .. }
            | AdminBody::CampaignCreate { .. }
            | AdminBody::CampaignPause { .. }
            | AdminBody::CampaignResume { .. }
            | AdminBody::CampaignAbort { .. }
            | AdminBody::CampaignRollback { .. } => OperatorRole::Operator,
            AdminBody::TrustUpdate { .. }
            | AdminBody::CrlUpdate { .. }
            | AdminBody::DeviceRegister { .. }
            | AdminBody::DeviceRenewAllow { .. } => OperatorRole::SecurityAdmin,
        }
    }

    pub fn audit(&self) -> Option<(&'static str, String)> {
        Some(match self {
            AdminBody::ReleasePut { manifest, .. } => (
                "release_put",
                manifest
                    .peek_unverified()
                    .map(|m| m.artifact.to_string())
                    .unwrap_or_default(),
            ),
            AdminBody::TrustUpdate { roots } => ("trust_update", format!("{} roots", roots.len())),
            AdminBody::DeviceRegister { certs, .. } => {
                ("device_register", format!("{} certificates", certs.len()))
            }
            AdminBody::CrlUpdate { .. } => ("crl_update", String::new()),
            AdminBody::DeviceRenewAllow { device } => ("device_renew_allow", device.to_string()),
            AdminBody::DeviceLabel { devices, .. } => {
                ("device_label", format!("{} devices", devices.len()))
            }
            AdminBody::CampaignCreate { artifact, .. } => ("campaign_create", artifact.to_string()),
            AdminBody::CampaignPause { campaign } => ("campaign_pause", campaign.to_string()),
            AdminBody::CampaignResume { campaign } => ("campaign_resume", campaign.to_string()),
            AdminBody::CampaignAbort { campaign } => ("campaign_abort", campaign.to_string()),
            AdminBody::CampaignRollback { campaign, to, .. } => {
                ("campaign_rollback", format!("{campaign} to {to}"))
            }
            AdminBody::ReleaseChunk { .. }
            | AdminBody::ReleaseList {}
            | AdminBody::TrustStatus {}
            | AdminBody::DeviceList { .. }
            | AdminBody::DeviceCount {}
            | AdminBody::CampaignStatus { .. }
            | AdminBody::CampaignList {}
            | AdminBody::AuditList { .. } => return None,
        })
    }
}
