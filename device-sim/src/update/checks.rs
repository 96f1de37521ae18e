//! What a device checks before it accepts a job, and how it says no. Every refusal carries a
//! protocol reason and a detail clipped to the protocol's limit (PROTOCOL.md §9.2).
//!
//! Trust starts from the root pinned at provisioning: a job may carry newer roots, which the
//! device walks forward through ([`walk_roots`]) before anything the root vouches for is
//! checked ([`verify_job`]). Time comes from the device's clock if it trusts it, and never runs
//! behind the latest signed time the device has seen.

use aloft_proto::crypto::{self, ContentKey, DeviceEncryptionKey};
use aloft_proto::manifest::{Manifest, ManifestError, SignedManifest};
use aloft_proto::messages::{self, Job};
use aloft_proto::trust::{TrustError, TrustedRoot, MAX_ROOT_CHAIN};
use aloft_proto::{CampaignId, DeviceId, Reason};

use super::shared::SharedManifests;
use super::AgentConfig;
use crate::store::DeviceRecord;

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

/// Check a (PROTOCOL.md §9.2 step 6.1): walks `trust` forward through the roots the job carries.
/// Returns the newer root if the chain moved it, `None` if the job taught nothing new; on a
/// refusal `trust` is unchanged.
pub(super) fn walk_roots(trust: &TrustedRoot, job: &Job) -> Result<Option<TrustedRoot>, Refusal> {
    if job.roots.is_empty() {
        return Ok(None);
    }
    let mut next = trust.clone();
    match next.update(&job.roots) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(next)),
        // Every way a chain can fail means the same to the orchestrator: these roots do not
        // lead from what the device trusts. `Expired` is not returned by a walk.
        Err(e) => Err(Refusal::new(Reason::UntrustedRoot, e)),
    }
}

/// The device's idea of now, in Unix seconds: its clock if it trusts it, but never earlier than
/// the latest signed time it has seen (a clock set back cannot revive an expired root); without
/// a trusted clock, that signed time alone (the documented freshness choice: such a device
/// notices a freeze once any signed metadata newer than the root's expiry reaches it).
pub(super) fn device_time(
    cfg: &AgentConfig,
    trust: &TrustedRoot,
    record: &DeviceRecord,
    now_ms: u64,
) -> u64 {
    let signed = record.time_floor.max(trust.root().issued_at);
    if cfg.trusted_clock {
        signed.max(now_ms / 1000)
    } else {
        signed
    }
}

/// Checks 6.2 to 6.7 of a new job against the (already walked) root `trust`, in protocol order:
/// the root is fresh, a threshold of its release role signed the manifest, the hardware model,
/// the anti-rollback floor, expiry, whether the image fits a slot, and that the manifest is not
/// a replay of one older than the image installed.
pub(super) fn verify_job(
    cfg: &AgentConfig,
    trust: &TrustedRoot,
    record: &DeviceRecord,
    now_ms: u64,
    job: &Job,
    capacity: u64,
) -> Result<Manifest, Refusal> {
    let now = device_time(cfg, trust, record, now_ms);
    if let Err(e) = trust.check_fresh(now) {
        return Err(Refusal::new(Reason::RootExpired, e));
    }
    let m = verify_signature(cfg.manifests.as_deref(), trust, &job.manifest)?;
    if m.hardware_model != cfg.hardware_model {
        return Err(Refusal::new(
            Reason::WrongHardware,
            format!("manifest is for {}", m.hardware_model),
        ));
    }
    if m.security_version < record.floor {
        return Err(Refusal::new(
            Reason::Downgrade,
            format!(
                "security version {} is below the floor {}",
                m.security_version, record.floor
            ),
        ));
    }
    if m.expires_at < now {
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
    // A manifest without a sequence (built before sequences existed) passes: the floor and its
    // expiry are then its only replay defences.
    if let (Some(seq), Some(installed)) = (m.sequence, record.installed_sequence) {
        if seq <= installed {
            return Err(Refusal::new(
                Reason::ReplayedManifest,
                format!("sequence {seq} is not above {installed}, installed last"),
            ));
        }
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

/// Verifies a manifest against the release role of `trust`: a threshold of its keys, none
/// revoked. Also what a restarted device checks again of the job it was working on. With the
/// process's `shared` manifests, a check its devices made before is answered from memory
/// ([`SharedManifests::verify`]).
pub(super) fn verify_signature(
    shared: Option<&SharedManifests>,
    trust: &TrustedRoot,
    manifest: &SignedManifest,
) -> Result<Manifest, Refusal> {
    let verified = match shared {
        Some(pool) => pool.verify(trust, manifest),
        None => trust.verify_manifest(manifest),
    };
    verified.map_err(|e| {
        let reason = match e {
            ManifestError::UnknownKey => Reason::UnknownSigningKey,
            ManifestError::BadSignature => Reason::BadSignature,
            ManifestError::BelowThreshold { .. } => Reason::BelowThreshold,
            ManifestError::RevokedKey => Reason::RevokedKey,
            ManifestError::Malformed(_)
            | ManifestError::Inconsistent(_)
            | ManifestError::UnsupportedVersion(_) => Reason::MalformedJob,
        };
        Refusal::new(reason, e)
    })
}

/// What a device can still answer to a job that failed strict decoding: its campaign, if that
/// can be read, and why. A job whose only fault is a root chain longer than the protocol allows
/// is refused as `untrusted_root`, as a device that decoded it would refuse the walk.
pub(super) fn peek_refusal(
    payload: &[u8],
    error: &messages::DecodeError,
) -> Option<(CampaignId, Refusal)> {
    #[derive(serde::Deserialize)]
    struct Roots {
        roots: Vec<serde::de::IgnoredAny>,
    }
    let campaign = peek_campaign(payload)?;
    let too_many_roots =
        serde_json::from_slice::<Roots>(payload).is_ok_and(|r| r.roots.len() > MAX_ROOT_CHAIN);
    let refusal = if too_many_roots {
        Refusal::new(Reason::UntrustedRoot, TrustError::TooLong)
    } else {
        Refusal::new(Reason::MalformedJob, error)
    };
    Some((campaign, refusal))
}

/// Reads just the campaign id of a job that failed strict decoding.
fn peek_campaign(payload: &[u8]) -> Option<CampaignId> {
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
