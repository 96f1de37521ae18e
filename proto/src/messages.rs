//! JSON messages of protocol v1 (PROTOCOL.md §Messages): jobs, state reports, acknowledgements
//! and chunk requests. Every decoder is size-limited and strict (unknown fields are refused),
//! and [`decode`] validates semantic rules after parsing.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::crypto::WrappedKey;
use crate::ids::{ArtifactId, CampaignId};
use crate::manifest::SignedManifest;
use crate::trust::{SignedRoot, MAX_ROOT_CHAIN};

/// The message format version carried in every message's `v` field.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest accepted payloads, per topic, in bytes.
pub const MAX_STATUS_BYTES: usize = 4 * 1024;
pub const MAX_ACK_BYTES: usize = 4 * 1024;
pub const MAX_CHUNK_REQUEST_BYTES: usize = 4 * 1024;
pub const MAX_HEARTBEAT_BYTES: usize = 1024;
pub const MAX_JOB_BYTES: usize = 512 * 1024;
/// A certificate renewal request (a P-256 CSR in PEM is about 600 bytes).
pub const MAX_RENEWAL_REQUEST_BYTES: usize = 4 * 1024;
/// A certificate renewal response (a device certificate in PEM is about 900 bytes).
pub const MAX_RENEWAL_RESPONSE_BYTES: usize = 8 * 1024;
/// Longest PEM text inside a renewal message.
pub const MAX_RENEWAL_PEM_LEN: usize = 3 * 1024;
/// Longest free-text `detail` in a report.
pub const MAX_DETAIL_LEN: usize = 256;
/// Most chunks one request may ask for, and most ranges it may list.
pub const MAX_CHUNKS_PER_REQUEST: u32 = 64;
pub const MAX_RANGES_PER_REQUEST: usize = 16;

/// Why a payload was refused. The orchestrator counts these by [`DecodeError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is not valid: {0}")]
    Malformed(String),
    #[error("unsupported message version {0}")]
    UnsupportedVersion(u8),
    #[error("invalid message: {0}")]
    Invalid(&'static str),
}

impl DecodeError {
    /// A stable, low-cardinality label for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::UnsupportedVersion(_) => "unsupported_version",
            DecodeError::Invalid(_) => "invalid",
        }
    }
}

/// A message that checks its own semantic rules after parsing.
pub trait Message: Serialize + DeserializeOwned {
    const MAX_BYTES: usize;
    fn version(&self) -> u8;
    fn validate(&self) -> Result<(), DecodeError> {
        Ok(())
    }
}

/// The limit every free-text `detail` shares.
fn check_detail(detail: Option<&str>) -> Result<(), DecodeError> {
    match detail {
        Some(d) if d.len() > MAX_DETAIL_LEN => Err(DecodeError::Invalid("detail is too long")),
        _ => Ok(()),
    }
}

fn check_running_version(v: &str) -> Result<(), DecodeError> {
    if v.len() > crate::manifest::MAX_LABEL_LEN {
        return Err(DecodeError::Invalid("running_version is too long"));
    }
    Ok(())
}

/// Decodes and validates a message received from the network.
pub fn decode<M: Message>(payload: &[u8]) -> Result<M, DecodeError> {
    if payload.len() > M::MAX_BYTES {
        return Err(DecodeError::TooLarge {
            size: payload.len(),
            limit: M::MAX_BYTES,
        });
    }
    let m: M =
        serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if m.version() != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(m.version()));
    }
    m.validate()?;
    Ok(m)
}

/// Encodes a message. Serializing these plain structs to JSON cannot fail.
pub fn encode<M: Message>(m: &M) -> Vec<u8> {
    serde_json::to_vec(m).unwrap_or_default()
}

/// Orchestrator → device, retained on the device's job topic: what to install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub v: u8,
    pub campaign: CampaignId,
    pub manifest: SignedManifest,
    /// The release's content key, wrapped for this device alone.
    pub wrapped_key: WrappedKey,
    /// Unix seconds.
    pub issued_at: u64,
    /// Root metadata newer than version 1, oldest first (at most [`MAX_ROOT_CHAIN`]): a device
    /// walks forward from the root it trusts before it verifies the manifest (since 1.2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<SignedRoot>,
    /// (1.5) An untrusted HTTPS origin serving the release's sealed chunks as an export
    /// (`crate::origin`): a device that knows it may fetch chunks there and falls back to chunk
    /// requests. Absent unless the campaign names one; a 1.4 device refuses a job carrying it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// (1.5) Delta releases that rebuild `manifest`'s image from a known base, at most
    /// [`MAX_DELTAS_PER_JOB`]; absent when empty, so a job without them is byte-for-byte a 1.4
    /// job. A device may take the one whose base it runs, or ignore them all and download the
    /// full image, which the job always offers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<DeltaOffer>,
}

/// Most delta offers one job may carry.
pub const MAX_DELTAS_PER_JOB: usize = 4;

/// (1.5) One delta a job offers: the delta release's signed manifest and its content key,
/// wrapped for this device and the delta's artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaOffer {
    pub manifest: SignedManifest,
    pub wrapped_key: WrappedKey,
}

impl Message for Job {
    const MAX_BYTES: usize = MAX_JOB_BYTES;
    fn version(&self) -> u8 {
        self.v
    }
    fn validate(&self) -> Result<(), DecodeError> {
        if self.roots.len() > MAX_ROOT_CHAIN {
            return Err(DecodeError::Invalid("too many roots"));
        }
        if let Some(origin) = &self.origin {
            crate::origin::validate_origin(origin)
                .map_err(|_| DecodeError::Invalid("origin is not a valid https URL"))?;
        }
        if self.deltas.len() > MAX_DELTAS_PER_JOB {
            return Err(DecodeError::Invalid("too many deltas"));
        }
        Ok(())
    }
}

/// Largest withdrawal payload on the job topic.
pub const MAX_WITHDRAWAL_BYTES: usize = 1024;

/// Orchestrator → device, retained on the device's job topic in place of a [`Job`]: the device
/// has no job now (PROTOCOL.md §5.2). Unlike the empty payload that clears a retained message
/// (which a device subscribing later never receives), it stays retained, so a device that was
/// offline when its job was withdrawn learns of it when it subscribes again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Withdrawal {
    pub v: u8,
    pub withdrawn: Withdrawn,
}

/// What a [`Withdrawal`] withdraws.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Withdrawn {
    /// The campaign whose job was withdrawn.
    pub campaign: CampaignId,
    /// Why: `timed_out`, `cancelled` or `revoked`.
    pub reason: Reason,
}

impl Message for Withdrawal {
    const MAX_BYTES: usize = MAX_WITHDRAWAL_BYTES;
    fn version(&self) -> u8 {
        self.v
    }
}

/// The per-device update state of one campaign, as the orchestrator tracks it and devices report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Targeted, job not yet published.
    Idle,
    /// Job published to the device.
    Notified,
    Downloading,
    /// Every chunk verified and written, whole image verified.
    Downloaded,
    Installing,
    Rebooting,
    /// Booted the new slot, running its health check.
    Verifying,
    Succeeded,
    Failed,
    RolledBack,
    /// (1.5) The signed manifest's preconditions do not hold on the device (its reason says
    /// which); it keeps what it has downloaded and checks again on its own schedule. Not a
    /// failure, not an end. Last in order so that comparisons along the success path keep their
    /// meaning.
    Deferred,
}

impl DeviceState {
    pub const ALL: [DeviceState; 11] = [
        DeviceState::Idle,
        DeviceState::Notified,
        DeviceState::Downloading,
        DeviceState::Downloaded,
        DeviceState::Installing,
        DeviceState::Rebooting,
        DeviceState::Verifying,
        DeviceState::Succeeded,
        DeviceState::Failed,
        DeviceState::RolledBack,
        DeviceState::Deferred,
    ];

    /// The only way to `succeeded`, one legal step at a time.
    pub const SUCCESS_PATH: [DeviceState; 8] = [
        DeviceState::Idle,
        DeviceState::Notified,
        DeviceState::Downloading,
        DeviceState::Downloaded,
        DeviceState::Installing,
        DeviceState::Rebooting,
        DeviceState::Verifying,
        DeviceState::Succeeded,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            DeviceState::Succeeded | DeviceState::Failed | DeviceState::RolledBack
        )
    }

    /// States a device may report (the others are the orchestrator's own).
    pub fn is_reportable(self) -> bool {
        !matches!(self, DeviceState::Idle | DeviceState::Notified)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Idle => "idle",
            DeviceState::Notified => "notified",
            DeviceState::Downloading => "downloading",
            DeviceState::Downloaded => "downloaded",
            DeviceState::Installing => "installing",
            DeviceState::Rebooting => "rebooting",
            DeviceState::Verifying => "verifying",
            DeviceState::Succeeded => "succeeded",
            DeviceState::Failed => "failed",
            DeviceState::RolledBack => "rolled_back",
            DeviceState::Deferred => "deferred",
        }
    }
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a device failed or rolled back (PROTOCOL.md §Reason codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The job or manifest could not be parsed.
    MalformedJob,
    /// No signature from a release key the device trusts.
    UnknownSigningKey,
    /// A signature from a trusted key did not verify.
    BadSignature,
    /// The manifest is for another hardware model.
    WrongHardware,
    /// The manifest's security version is below the device's anti-rollback floor.
    Downgrade,
    /// The manifest expired.
    ManifestExpired,
    /// The wrapped content key did not unwrap with the device's key.
    KeyUnwrapFailed,
    /// Chunks kept failing their digest after the retry budget.
    ChunkVerificationFailed,
    /// The assembled image did not match the manifest's digest.
    ImageVerificationFailed,
    /// The image does not fit the update slot.
    ImageTooLarge,
    /// Writing the update slot failed.
    InstallFailed,
    /// The new image booted but its health check failed.
    HealthCheckFailed,
    /// The new image did not boot, or did not confirm in time.
    BootFailed,
    /// The orchestrator gave up waiting for the device.
    TimedOut,
    /// The campaign was cancelled.
    Cancelled,
    /// Fewer release keys signed than the root's release threshold requires (since 1.2).
    BelowThreshold,
    /// Signed only by keys a root revoked (since 1.2).
    RevokedKey,
    /// The job's root metadata did not walk forward from the root the device trusts (since 1.2).
    UntrustedRoot,
    /// The newest root the device trusts has expired (a freeze) (since 1.2).
    RootExpired,
    /// The manifest's sequence number is not above the one the device installed last: an old
    /// manifest replayed (since 1.2).
    ReplayedManifest,
    /// The device's current certificate is revoked: the orchestrator publishes it no job and
    /// serves it no chunk (since 1.1; sent only by the orchestrator, to operators).
    Revoked,
    /// (1.5) Deferred: the battery is below the manifest's minimum and the device is not on
    /// external power.
    BatteryLow,
    /// (1.5) Deferred: the device is in active use.
    InUse,
    /// (1.5) Deferred: the device's local time is outside the manifest's install window.
    OutsideInstallWindow,
    /// (1.5) Deferred: less free storage than the manifest asks for.
    StorageLow,
    /// (1.5) Deferred: on a metered link, with more left to download than the manifest allows
    /// there.
    MeteredLink,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedJob => "malformed_job",
            Reason::UnknownSigningKey => "unknown_signing_key",
            Reason::BadSignature => "bad_signature",
            Reason::WrongHardware => "wrong_hardware",
            Reason::Downgrade => "downgrade",
            Reason::ManifestExpired => "manifest_expired",
            Reason::KeyUnwrapFailed => "key_unwrap_failed",
            Reason::ChunkVerificationFailed => "chunk_verification_failed",
            Reason::ImageVerificationFailed => "image_verification_failed",
            Reason::ImageTooLarge => "image_too_large",
            Reason::InstallFailed => "install_failed",
            Reason::HealthCheckFailed => "health_check_failed",
            Reason::BootFailed => "boot_failed",
            Reason::TimedOut => "timed_out",
            Reason::Cancelled => "cancelled",
            Reason::BelowThreshold => "below_threshold",
            Reason::RevokedKey => "revoked_key",
            Reason::UntrustedRoot => "untrusted_root",
            Reason::RootExpired => "root_expired",
            Reason::ReplayedManifest => "replayed_manifest",
            Reason::Revoked => "revoked",
            Reason::BatteryLow => "battery_low",
            Reason::InUse => "in_use",
            Reason::OutsideInstallWindow => "outside_install_window",
            Reason::StorageLow => "storage_low",
            Reason::MeteredLink => "metered_link",
        }
    }

    /// (1.5) Whether this reason explains a deferral (a precondition that does not hold) rather
    /// than a failure. Only `deferred` reports carry these.
    pub fn is_deferral(self) -> bool {
        matches!(
            self,
            Reason::BatteryLow
                | Reason::InUse
                | Reason::OutsideInstallWindow
                | Reason::StorageLow
                | Reason::MeteredLink
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Device → orchestrator: "I am now in `state` for `campaign`". Reports of one campaign carry
/// consecutive `seq` numbers from 1; the device resends unacknowledged reports in order until
/// each is acknowledged, so duplicates are normal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    pub v: u8,
    pub campaign: CampaignId,
    pub seq: u32,
    pub state: DeviceState,
    /// Required with `failed` and `rolled_back` (a failure reason) and with `deferred` (a
    /// deferral reason, [`Reason::is_deferral`]); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Free text for humans, at most [`MAX_DETAIL_LEN`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The firmware version the device runs right now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_version: Option<String>,
}

impl Message for StatusReport {
    const MAX_BYTES: usize = MAX_STATUS_BYTES;
    fn version(&self) -> u8 {
        self.v
    }
    fn validate(&self) -> Result<(), DecodeError> {
        if self.seq == 0 {
            return Err(DecodeError::Invalid("seq starts at 1"));
        }
        if !self.state.is_reportable() {
            return Err(DecodeError::Invalid("state is not reportable by a device"));
        }
        let needs_reason = matches!(
            self.state,
            DeviceState::Failed | DeviceState::RolledBack | DeviceState::Deferred
        );
        if needs_reason != self.reason.is_some() {
            return Err(DecodeError::Invalid(
                "reason is required with failed, rolled_back and deferred, and only then",
            ));
        }
        let deferral = self.state == DeviceState::Deferred;
        if self.reason.is_some_and(|r| r.is_deferral() != deferral) {
            return Err(DecodeError::Invalid(
                "deferred takes a deferral reason, and only deferred does",
            ));
        }
        check_detail(self.detail.as_deref())?;
        if let Some(v) = &self.running_version {
            check_running_version(v)?;
        }
        Ok(())
    }
}

/// What the orchestrator did with a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckOutcome {
    /// The transition is now durable.
    Applied,
    /// Seen before; nothing changed.
    Duplicate,
    /// Refused; `error` says why. The device must not retry this report.
    Rejected,
}

/// Why a report was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckError {
    /// No such campaign, or this device is not in it.
    NotTargeted,
    /// The transition from the orchestrator's recorded state is not allowed.
    IllegalTransition,
    /// `seq` skips ahead of the next expected number.
    SequenceGap,
}

/// Orchestrator → device: acknowledges one report, once it is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusAck {
    pub v: u8,
    pub campaign: CampaignId,
    pub seq: u32,
    pub outcome: AckOutcome,
    /// The orchestrator's recorded state for this device after handling the report.
    pub state: DeviceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AckError>,
}

impl Message for StatusAck {
    const MAX_BYTES: usize = MAX_ACK_BYTES;
    fn version(&self) -> u8 {
        self.v
    }
}

/// Device → orchestrator: send me these chunks. Ranges are half-open `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRequest {
    pub v: u8,
    pub campaign: CampaignId,
    pub artifact: ArtifactId,
    pub ranges: Vec<[u32; 2]>,
}

impl ChunkRequest {
    /// The requested indices, in order. Only meaningful after validation.
    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|[s, e]| *s..*e)
    }
}

impl Message for ChunkRequest {
    const MAX_BYTES: usize = MAX_CHUNK_REQUEST_BYTES;
    fn version(&self) -> u8 {
        self.v
    }
    fn validate(&self) -> Result<(), DecodeError> {
        if self.ranges.is_empty() || self.ranges.len() > MAX_RANGES_PER_REQUEST {
            return Err(DecodeError::Invalid("ranges must list 1 to 16 ranges"));
        }
        let mut total: u64 = 0;
        for [s, e] in &self.ranges {
            if s >= e {
                return Err(DecodeError::Invalid("a range is empty or reversed"));
            }
            total += u64::from(e - s);
        }
        if total > u64::from(MAX_CHUNKS_PER_REQUEST) {
            return Err(DecodeError::Invalid("request asks for too many chunks"));
        }
        Ok(())
    }
}

/// Device → orchestrator, QoS 0, periodic: "the application on the image I run is (not) healthy".
/// Sent from the moment a device confirms a new image, so the orchestrator can hold a wave's
/// verdict until its soak time has passed (PROTOCOL.md §Health). Loss of one heartbeat is
/// harmless: the next one says the same or worse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub v: u8,
    /// The campaign that installed the running image, if the device knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<CampaignId>,
    pub running_version: String,
    pub healthy: bool,
    /// Free text for humans, at most [`MAX_DETAIL_LEN`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Message for Heartbeat {
    const MAX_BYTES: usize = MAX_HEARTBEAT_BYTES;
    fn version(&self) -> u8 {
        self.v
    }
    fn validate(&self) -> Result<(), DecodeError> {
        check_running_version(&self.running_version)?;
        check_detail(self.detail.as_deref())
    }
}

/// Device → orchestrator, on `aloft/v1/d/{id}/csr` (since 1.1): "issue me a new certificate
/// for this CSR". The CSR must name the device itself; the orchestrator answers with a
/// [`RenewalResponse`] on `aloft/v1/d/{id}/cert`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewalRequest {
    pub v: u8,
    /// PKCS#10 request, PEM, at most [`MAX_RENEWAL_PEM_LEN`] bytes.
    pub csr: String,
}

impl Message for RenewalRequest {
    const MAX_BYTES: usize = MAX_RENEWAL_REQUEST_BYTES;
    fn version(&self) -> u8 {
        self.v
    }
    fn validate(&self) -> Result<(), DecodeError> {
        if self.csr.is_empty() || self.csr.len() > MAX_RENEWAL_PEM_LEN {
            return Err(DecodeError::Invalid("csr must be 1 to 3072 bytes"));
        }
        Ok(())
    }
}

/// Why the orchestrator refused to renew a certificate (PROTOCOL.md §12.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RenewalError {
    /// The request or its CSR could not be parsed, or the CSR breaks the device profile.
    InvalidCsr,
    /// The CSR names another device than the one that sent it.
    IdentityMismatch,
    /// The device is not registered with the orchestrator.
    UnknownDevice,
    /// The device's current certificate is revoked.
    Revoked,
    /// The CA key is not on the orchestrator (moved offline): renewal needs the online CA.
    CaOffline,
    /// Issuing failed on the orchestrator's side.
    Internal,
    /// The CSR carries another X25519 key than the device's current certificate: renewal keeps
    /// the encryption key (a new one needs re-enrollment through the operator).
    X25519KeyChanged,
    /// The device renewed (or asked to) too recently; it may ask again later.
    RateLimited,
    /// The certificate is not yet in its renewal window and no operator allowed an early one.
    NotDue,
}

impl RenewalError {
    pub fn as_str(self) -> &'static str {
        match self {
            RenewalError::InvalidCsr => "invalid_csr",
            RenewalError::IdentityMismatch => "identity_mismatch",
            RenewalError::UnknownDevice => "unknown_device",
            RenewalError::Revoked => "revoked",
            RenewalError::CaOffline => "ca_offline",
            RenewalError::Internal => "internal",
            RenewalError::X25519KeyChanged => "x25519_key_changed",
            RenewalError::RateLimited => "rate_limited",
            RenewalError::NotDue => "not_due",
        }
    }
}

impl std::fmt::Display for RenewalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Orchestrator → device, on `aloft/v1/d/{id}/cert`, not retained (since 1.1): the renewed
/// certificate, or why there is none. Exactly one of `cert` and `error` is present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewalResponse {
    pub v: u8,
    /// The new certificate, PEM, at most [`MAX_RENEWAL_PEM_LEN`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RenewalError>,
    /// Free text for humans, at most [`MAX_DETAIL_LEN`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Message for RenewalResponse {
    const MAX_BYTES: usize = MAX_RENEWAL_RESPONSE_BYTES;
    fn version(&self) -> u8 {
        self.v
    }
    fn validate(&self) -> Result<(), DecodeError> {
        match (&self.cert, &self.error) {
            (Some(cert), None) if !cert.is_empty() && cert.len() <= MAX_RENEWAL_PEM_LEN => {}
            (None, Some(_)) => {}
            _ => {
                return Err(DecodeError::Invalid(
                    "exactly one of cert (1 to 3072 bytes) and error",
                ))
            }
        }
        check_detail(self.detail.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(json: &str) -> Result<StatusReport, DecodeError> {
        decode(json.as_bytes())
    }

    #[test]
    fn a_withdrawal_decodes_and_is_no_job() {
        let w: Withdrawal =
            decode(br#"{"v":1,"withdrawn":{"campaign":"c-1","reason":"timed_out"}}"#).unwrap();
        assert_eq!(w.withdrawn.reason, Reason::TimedOut);
        assert_eq!(decode::<Withdrawal>(&encode(&w)), Ok(w.clone()));
        // A device that knows only jobs fails to decode it and finds no campaign to refuse.
        assert!(decode::<Job>(&encode(&w)).is_err());
        assert!(
            serde_json::from_slice::<serde_json::Value>(&encode(&w)).unwrap()["campaign"].is_null()
        );
        assert!(decode::<Withdrawal>(
            br#"{"v":1,"campaign":"c-1","withdrawn":{"campaign":"c-1","reason":"timed_out"}}"#
        )
        .is_err());
    }

    #[test]
    fn valid_report_decodes() {
        let r = report(r#"{"v":1,"campaign":"c-1","seq":1,"state":"downloading"}"#).unwrap();
        assert_eq!(r.state, DeviceState::Downloading);
        let r =
            report(r#"{"v":1,"campaign":"c-1","seq":2,"state":"failed","reason":"bad_signature"}"#)
                .unwrap();
        assert_eq!(r.reason, Some(Reason::BadSignature));
        let r = report(
            r#"{"v":1,"campaign":"c-1","seq":3,"state":"deferred","reason":"outside_install_window"}"#,
        )
        .unwrap();
        assert_eq!(
            (r.state, r.reason),
            (DeviceState::Deferred, Some(Reason::OutsideInstallWindow))
        );
    }

    #[test]
    fn malformed_truncated_and_oversized_reports_are_refused() {
        let cases = [
            "",
            "{",
            r#"{"v":1,"campaign":"c-1","seq":1,"state":"downloading""#,
            r#"{"v":2,"campaign":"c-1","seq":1,"state":"downloading"}"#,
            r#"{"v":1,"campaign":"c/1","seq":1,"state":"downloading"}"#,
            r#"{"v":1,"campaign":"c-1","seq":0,"state":"downloading"}"#,
            r#"{"v":1,"campaign":"c-1","seq":1,"state":"notified"}"#,
            r#"{"v":1,"campaign":"c-1","seq":1,"state":"failed"}"#,
            r#"{"v":1,"campaign":"c-1","seq":1,"state":"downloading","reason":"downgrade"}"#,
            r#"{"v":1,"campaign":"c-1","seq":1,"state":"downloading","extra":1}"#,
            r#"{"v":1,"campaign":"c-1","seq":1,"state":"exploded"}"#,
            r#"{"v":1,"campaign":"c-1","seq":1,"state":"deferred"}"#,
            r#"{"v":1,"campaign":"c-1","seq":1,"state":"deferred","reason":"bad_signature"}"#,
            r#"{"v":1,"campaign":"c-1","seq":1,"state":"failed","reason":"battery_low"}"#,
        ];
        for c in cases {
            assert!(report(c).is_err(), "accepted {c:?}");
        }
        let big = format!(
            r#"{{"v":1,"campaign":"c-1","seq":1,"state":"downloading","detail":"{}"}}"#,
            "x".repeat(MAX_STATUS_BYTES)
        );
        assert!(matches!(report(&big), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn heartbeats_are_strict() {
        let ok = r#"{"v":1,"campaign":"c-1","running_version":"2.0.0","healthy":false}"#;
        let h: Heartbeat = decode(ok.as_bytes()).unwrap();
        assert!(!h.healthy);
        for bad in [
            r#"{"v":1,"running_version":"2.0.0"}"#,
            r#"{"v":1,"running_version":"2.0.0","healthy":true,"x":1}"#,
            r#"{"v":2,"running_version":"2.0.0","healthy":true}"#,
        ] {
            assert!(decode::<Heartbeat>(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn chunk_request_bounds_are_enforced() {
        let ok = r#"{"v":1,"campaign":"c","artifact":"a","ranges":[[0,8],[10,12]]}"#;
        let r: ChunkRequest = decode(ok.as_bytes()).unwrap();
        assert_eq!(
            r.indices().collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5, 6, 7, 10, 11]
        );
        for bad in [
            r#"{"v":1,"campaign":"c","artifact":"a","ranges":[]}"#,
            r#"{"v":1,"campaign":"c","artifact":"a","ranges":[[5,5]]}"#,
            r#"{"v":1,"campaign":"c","artifact":"a","ranges":[[9,2]]}"#,
            r#"{"v":1,"campaign":"c","artifact":"a","ranges":[[0,4294967295]]}"#,
        ] {
            assert!(decode::<ChunkRequest>(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn renewal_messages_are_strict_and_size_limited() {
        let req: RenewalRequest = decode(br#"{"v":1,"csr":"-----BEGIN"}"#).unwrap();
        assert_eq!(req.csr, "-----BEGIN");
        assert!(decode::<RenewalRequest>(br#"{"v":1,"csr":""}"#).is_err());
        assert!(decode::<RenewalRequest>(br#"{"v":1,"csr":"x","extra":1}"#).is_err());
        let big = format!(
            r#"{{"v":1,"csr":"{}"}}"#,
            "x".repeat(MAX_RENEWAL_PEM_LEN + 1)
        );
        assert!(decode::<RenewalRequest>(big.as_bytes()).is_err());
        let huge = format!(
            r#"{{"v":1,"csr":"{}"}}"#,
            "x".repeat(MAX_RENEWAL_REQUEST_BYTES)
        );
        assert!(matches!(
            decode::<RenewalRequest>(huge.as_bytes()),
            Err(DecodeError::TooLarge { .. })
        ));

        let ok: RenewalResponse = decode(br#"{"v":1,"cert":"pem"}"#).unwrap();
        assert_eq!(ok.cert.as_deref(), Some("pem"));
        let refused: RenewalResponse =
            decode(br#"{"v":1,"error":"ca_offline","detail":"renewal needs the online ca"}"#)
                .unwrap();
        assert_eq!(refused.error, Some(RenewalError::CaOffline));
        for bad in [
            r#"{"v":1}"#,
            r#"{"v":1,"cert":"pem","error":"revoked"}"#,
            r#"{"v":1,"error":"no_such_code"}"#,
            r#"{"v":2,"cert":"pem"}"#,
        ] {
            assert!(decode::<RenewalResponse>(bad.as_bytes()).is_err(), "{bad}");
        }
        let round = encode(&ok);
        assert_eq!(decode::<RenewalResponse>(&round).unwrap(), ok);
    }
}
