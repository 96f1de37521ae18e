//! What a device checks before it accepts a job, and how it says no. Every refusal carries a
//! protocol reason and a detail clipped to the protocol's limit (PROTOCOL.md §9).

use aloft_proto::crypto::{self, ContentKey, DeviceEncryptionKey};
use aloft_proto::manifest::{Manifest, ManifestError, ReleasePublicKey};
use aloft_proto::messages::{self, Job};
use aloft_proto::{CampaignId, DeviceId, Reason, SecurityVersion};

use super::AgentConfig;

/// Why a job was refused.
pub(super) struct Refusal {
    pub reason: Reason,
    pub detail: String,
}

impl Refusal {
    pub fn new(reason: Reason, detail: impl std::fmt::Display) -> Self {
        Refusal {
            reason,
            detail: clip(detail.to_string()),
        }
    }
}

pub(super) fn clip(mut s: String) -> String {
    if s.len() > messages::MAX_DETAIL_LEN {
        let mut end = messages::MAX_DETAIL_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The checks of a new job, in protocol order: signature by a pinned release key, hardware
/// model, anti-rollback floor, expiry, and whether the image fits a slot.
pub(super) fn verify_job(
    cfg: &AgentConfig,
    floor: SecurityVersion,
    now_ms: u64,
    job: &Job,
    capacity: u64,
) -> Result<Manifest, Refusal> {
    let m = verify_signature(job, &cfg.release_keys)?;
    if m.hardware_model != cfg.hardware_model {
        return Err(Refusal::new(
            Reason::WrongHardware,
            format!("manifest is for {}", m.hardware_model),
        ));
    }
    if m.security_version < floor {
        return Err(Refusal::new(
            Reason::Downgrade,
            format!(
                "security version {} is below the floor {}",
                m.security_version, floor
            ),
        ));
    }
    if m.expires_at < now_ms / 1000 {
        return Err(Refusal::new(
            Reason::ManifestExpired,
            format!("expired at {}", m.expires_at),
        ));
    }
    if m.image_size > capacity {
        return Err(Refusal::new(
            Reason::ImageTooLarge,
            format!("{} bytes do not fit a slot of {capacity}", m.image_size),
        ));
    }
    Ok(m)
}

/// Unwraps the content key the job carries for this device alone.
pub(super) fn unwrap_key(
    key: &DeviceEncryptionKey,
    device: &DeviceId,
    job: &Job,
    manifest: &Manifest,
) -> Result<ContentKey, Refusal> {
    crypto::unwrap_content_key(key, device, &manifest.artifact, &job.wrapped_key)
        .map_err(|e| Refusal::new(Reason::KeyUnwrapFailed, e))
}

pub(super) fn verify_signature(job: &Job, keys: &[ReleasePublicKey]) -> Result<Manifest, Refusal> {
    job.manifest.verify(keys).map_err(|e| {
        let reason = match e {
            ManifestError::UnknownKey => Reason::UnknownSigningKey,
            ManifestError::BadSignature => Reason::BadSignature,
            _ => Reason::MalformedJob,
        };
        Refusal::new(reason, e)
    })
}

/// Reads just the campaign id of a job that failed strict decoding.
pub(super) fn peek_campaign(payload: &[u8]) -> Option<CampaignId> {
    #[derive(serde::Deserialize)]
    struct Head {
        campaign: CampaignId,
    }
    if payload.len() > messages::MAX_JOB_BYTES {
        return None;
    }
    serde_json::from_slice::<Head>(payload)
        .ok()
        .map(|h| h.campaign)
}
