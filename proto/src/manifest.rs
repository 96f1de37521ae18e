//! Release manifests and their Ed25519 signatures (PROTOCOL.md §Manifest).
//!
//! A [`SignedManifest`] carries the manifest's exact JSON bytes (base64) next to the signatures
//! over them, so verifiers never re-serialize: what was signed is what is parsed. Signing needs a
//! [`ReleaseSigningKey`], which lives with the operator's CLI; the orchestrator and devices hold
//! only [`ReleasePublicKey`]s.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::crypto::{self, CryptoError, TAG_LEN};
use crate::delta::DeltaOf;
use crate::ids::{ArtifactId, SecurityVersion};
use crate::precondition::Preconditions;

/// Manifest format version this crate reads and writes.
pub const MANIFEST_VERSION: u8 = 1;
/// Smallest and largest chunk a manifest may declare.
pub const MIN_CHUNK_BYTES: u32 = 1024;
pub const MAX_CHUNK_BYTES: u32 = 1024 * 1024;
/// Default chunk size of the operator CLI.
pub const DEFAULT_CHUNK_BYTES: u32 = 16 * 1024;
/// Most chunks one manifest may list (bounds its size: 32 bytes of digest per chunk).
pub const MAX_CHUNKS: u32 = 8192;
/// Longest `version` and `hardware_model` strings.
pub const MAX_LABEL_LEN: usize = 64;
/// Most signatures a signed manifest may carry.
pub const MAX_SIGNATURES: usize = 8;

const SIGNING_CONTEXT: &[u8] = b"aloft-manifest-v1\0";

/// Why a manifest was refused. Each variant maps to a reason a device reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest envelope is malformed: {0}")]
    Malformed(String),
    #[error("no signature from a trusted release key")]
    UnknownKey,
    #[error("signature does not verify")]
    BadSignature,
    #[error("manifest is inconsistent: {0}")]
    Inconsistent(&'static str),
    #[error("manifest format version {0} is not supported")]
    UnsupportedVersion(u8),
    #[error("{have} valid signatures from release keys, {need} required")]
    BelowThreshold { have: u32, need: u32 },
    #[error("signed only by revoked keys")]
    RevokedKey,
}

/// What a release is: identity, anti-rollback counter, target hardware, and the digests that let
/// a device verify every chunk before decrypting it and the whole image before booting it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version, [`MANIFEST_VERSION`].
    pub v: u8,
    pub artifact: ArtifactId,
    /// Human-facing firmware version, e.g. "2.4.1".
    pub version: String,
    pub security_version: SecurityVersion,
    /// Devices refuse a manifest for any other model.
    pub hardware_model: String,
    /// Plaintext image size in bytes.
    pub image_size: u64,
    /// SHA-256 of the plaintext image, lowercase hex.
    pub image_sha256: String,
    /// Plaintext bytes per chunk; the last chunk may be shorter.
    pub chunk_size: u32,
    pub chunk_count: u32,
    /// SHA-256 of every sealed chunk (ciphertext + tag), concatenated in index order, base64.
    pub chunk_sha256: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds after which devices with a clock refuse the manifest.
    pub expires_at: u64,
    /// A number that grows with every release (the CLI uses the build time in milliseconds),
    /// as IETF SUIT's sequence number: a device refuses a manifest whose sequence is not above
    /// the one it last installed, so an old manifest cannot be replayed at it. Optional for
    /// manifests built before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// (1.5) Present on a delta release only: this manifest's "image" is a patch that rebuilds
    /// the named target from the named base ([`crate::delta`]). A full image never carries it,
    /// so a 1.4 device never sees the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaOf>,
    /// (1.5) What must hold on the device before it installs (and, if they say so, before it
    /// downloads): battery, use, a local-time window, free storage, metered bytes. Signed with
    /// the rest, so no server can strip or forge them. Absent, the manifest is byte-for-byte a
    /// 1.4 manifest; present, a 1.4 device refuses the manifest (it knows no such field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preconditions: Option<Preconditions>,
}

impl Manifest {
    /// Checks internal consistency; [`SignedManifest::verify`] calls it.
    pub fn validate(&self) -> Result<(), ManifestError> {
        use ManifestError::Inconsistent;
        if self.v != MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion(self.v));
        }
        if self.version.is_empty() || self.version.len() > MAX_LABEL_LEN {
            return Err(Inconsistent("version must be 1 to 64 bytes"));
        }
        if self.hardware_model.is_empty() || self.hardware_model.len() > MAX_LABEL_LEN {
            return Err(Inconsistent("hardware_model must be 1 to 64 bytes"));
        }
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&self.chunk_size) {
            return Err(Inconsistent("chunk_size out of range"));
        }
        if self.image_size == 0 {
            return Err(Inconsistent("image is empty"));
        }
        let expected = self.image_size.div_ceil(u64::from(self.chunk_size));
        if expected != u64::from(self.chunk_count) || self.chunk_count > MAX_CHUNKS {
            return Err(Inconsistent("chunk_count does not match image_size"));
        }
        if decode_digest_hex(&self.image_sha256).is_none() {
            return Err(Inconsistent("image_sha256 is not 64 hex digits"));
        }
        match B64.decode(&self.chunk_sha256) {
            Ok(d) if d.len() == 32 * self.chunk_count as usize => {}
            _ => {
                return Err(Inconsistent(
                    "chunk_sha256 does not hold one digest per chunk",
                ))
            }
        }
        if self.expires_at <= self.created_at {
            return Err(Inconsistent("expires_at is not after created_at"));
        }
        if let Some(p) = &self.preconditions {
            p.validate().map_err(Inconsistent)?;
        }
        if let Some(d) = &self.delta {
            if decode_digest_hex(&d.base_sha256).is_none()
                || decode_digest_hex(&d.target_sha256).is_none()
            {
                return Err(Inconsistent("delta digests are not 64 hex digits"));
            }
            if d.base_version.is_empty() || d.base_version.len() > MAX_LABEL_LEN {
                return Err(Inconsistent("delta base_version must be 1 to 64 bytes"));
            }
            let bound = crate::delta::MAX_DELTA_IMAGE_BYTES;
            if d.target_size == 0 || d.target_size > bound || d.base_size > bound {
                return Err(Inconsistent("delta target_size out of range"));
            }
        }
        Ok(())
    }

    /// The expected SHA-256 of sealed chunk `index`.
    pub fn chunk_digest(&self, index: u32) -> Option<[u8; 32]> {
        if index >= self.chunk_count {
            return None;
        }
        let all = B64.decode(&self.chunk_sha256).ok()?;
        let start = index as usize * 32;
        all.get(start..start + 32)?.try_into().ok()
    }

    /// All chunk digests, in index order (decoded once, for callers that check many chunks).
    pub fn chunk_digests(&self) -> Vec<[u8; 32]> {
        B64.decode(&self.chunk_sha256)
            .unwrap_or_default()
            .chunks_exact(32)
            .filter_map(|c| c.try_into().ok())
            .collect()
    }

    /// The plaintext length of chunk `index`.
    pub fn plaintext_len(&self, index: u32) -> Option<u32> {
        if index >= self.chunk_count {
            return None;
        }
        let start = u64::from(index) * u64::from(self.chunk_size);
        // Only a validated manifest has counts that agree; a peeked one may claim more chunks
        // than its image holds.
        let rest = self.image_size.checked_sub(start)?;
        Some(rest.min(u64::from(self.chunk_size)) as u32)
    }

    /// The sealed length of chunk `index` (plaintext + tag).
    pub fn sealed_len(&self, index: u32) -> Option<usize> {
        self.plaintext_len(index).map(|n| n as usize + TAG_LEN)
    }

    pub fn image_digest(&self) -> Option<[u8; 32]> {
        decode_digest_hex(&self.image_sha256)
    }

    /// (1.5) Whether this is a delta release whose patch rebuilds `full`'s image (same model,
    /// security version and target digest and size).
    pub fn is_delta_for(&self, full: &Manifest) -> bool {
        self.delta.as_ref().is_some_and(|d| {
            d.target_sha256 == full.image_sha256
                && d.target_size == full.image_size
                && self.hardware_model == full.hardware_model
                && self.security_version == full.security_version
        })
    }
}

fn decode_digest_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode(s).ok()?.try_into().ok()
}

/// One signature over a manifest's payload bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSignature {
    /// [`ReleasePublicKey::key_id`] of the signer.
    pub keyid: String,
    /// Ed25519 signature, base64.
    pub sig: String,
}

/// A manifest as it travels: its JSON bytes and the signatures over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The manifest's JSON, base64. Shared, not copied: a campaign's jobs all carry the same
    /// manifest, and a simulator holding thousands of them keeps one copy (`Arc` serializes as
    /// the string itself, so the wire form is unchanged).
    pub payload: Arc<str>,
    pub signatures: Vec<ManifestSignature>,
}

impl SignedManifest {
    /// Serializes `manifest` and signs it with `key`.
    pub fn sign(manifest: &Manifest, key: &ReleaseSigningKey) -> Self {
        // Serializing a struct of strings and integers to JSON cannot fail.
        let bytes = serde_json::to_vec(manifest).unwrap_or_default();
        let mut signed = Self {
            payload: B64.encode(&bytes).into(),
            signatures: Vec::new(),
        };
        signed.add_signature(key, &bytes);
        signed
    }

    /// Adds one more signature (threshold signing: each approver adds theirs). A key that
    /// already signed is not added twice.
    pub fn cosign(&mut self, key: &ReleaseSigningKey) -> Result<(), ManifestError> {
        let payload = B64
            .decode(self.payload.as_bytes())
            .map_err(|_| ManifestError::Malformed("payload is not base64".into()))?;
        if self.signatures.len() >= MAX_SIGNATURES {
            return Err(ManifestError::Malformed("signature count".into()));
        }
        if !self
            .signatures
            .iter()
            .any(|s| s.keyid == key.public().key_id())
        {
            self.add_signature(key, &payload);
        }
        Ok(())
    }

    fn add_signature(&mut self, key: &ReleaseSigningKey, payload: &[u8]) {
        let sig = key.0.sign(&signing_input(payload));
        self.signatures.push(ManifestSignature {
            keyid: key.public().key_id(),
            sig: B64.encode(sig.to_bytes()),
        });
    }

    /// Verifies that a key in `trusted` signed the payload, then parses and validates it.
    /// The payload is not parsed before a signature has verified.
    pub fn verify(&self, trusted: &[ReleasePublicKey]) -> Result<Manifest, ManifestError> {
        if self.signatures.is_empty() || self.signatures.len() > MAX_SIGNATURES {
            return Err(ManifestError::Malformed("signature count".into()));
        }
        let payload = B64
            .decode(self.payload.as_bytes())
            .map_err(|_| ManifestError::Malformed("payload is not base64".into()))?;
        let input = signing_input(&payload);
        let mut saw_trusted_key = false;
        let mut verified = false;
        for s in &self.signatures {
            let Some(key) = trusted.iter().find(|k| k.key_id() == s.keyid) else {
                continue;
            };
            saw_trusted_key = true;
            let sig = B64
                .decode(&s.sig)
                .ok()
                .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
                .map(|b| Signature::from_bytes(&b));
            if let Some(sig) = sig {
                if key.0.verify_strict(&input, &sig).is_ok() {
                    verified = true;
                    break;
                }
            }
        }
        if !verified {
            return Err(if saw_trusted_key {
                ManifestError::BadSignature
            } else {
                ManifestError::UnknownKey
            });
        }
        let manifest: Manifest = serde_json::from_slice(&payload)
            .map_err(|e| ManifestError::Malformed(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Verifies that at least `threshold` distinct keys of `role` (none of them revoked) signed
    /// the payload, then parses and validates it. The k-of-n rule of a root's release role.
    pub fn verify_threshold(
        &self,
        role: &[ReleasePublicKey],
        threshold: u32,
        revoked: &[String],
    ) -> Result<Manifest, ManifestError> {
        let payload = verify_signatures(
            &self.payload,
            &self.signatures,
            SIGNING_CONTEXT,
            role,
            threshold,
            revoked,
        )?;
        let manifest: Manifest = serde_json::from_slice(&payload)
            .map_err(|e| ManifestError::Malformed(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Parses the payload without checking signatures: only for displaying or routing a manifest
    /// that some other component will verify.
    pub fn peek_unverified(&self) -> Result<Manifest, ManifestError> {
        let payload = B64
            .decode(self.payload.as_bytes())
            .map_err(|_| ManifestError::Malformed("payload is not base64".into()))?;
        serde_json::from_slice(&payload).map_err(|e| ManifestError::Malformed(e.to_string()))
    }
}

fn signing_input(payload: &[u8]) -> Vec<u8> {
    context_input(SIGNING_CONTEXT, payload)
}

pub(crate) fn context_input(context: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(context.len() + payload.len());
    m.extend_from_slice(context);
    m.extend_from_slice(payload);
    m
}

/// Counts distinct keys of `role`, not revoked, whose signature over `context ‖ payload`
/// verifies; returns the decoded payload if they reach `threshold`. The payload is not parsed
/// here: callers parse it only after this returns.
pub(crate) fn verify_signatures(
    payload_b64: &str,
    signatures: &[ManifestSignature],
    context: &[u8],
    role: &[ReleasePublicKey],
    threshold: u32,
    revoked: &[String],
) -> Result<Vec<u8>, ManifestError> {
    if signatures.is_empty() {
        return Err(ManifestError::Malformed("it carries no signature".into()));
    }
    if signatures.len() > MAX_SIGNATURES {
        return Err(ManifestError::Malformed(format!(
            "more than {MAX_SIGNATURES} signatures"
        )));
    }
    let payload = B64
        .decode(payload_b64)
        .map_err(|_| ManifestError::Malformed("payload is not base64".into()))?;
    let input = context_input(context, &payload);
    let mut good: Vec<String> = Vec::new();
    let (mut known, mut only_revoked) = (false, true);
    for s in signatures {
        if good.contains(&s.keyid) {
            continue; // One key counts once, however often it signed.
        }
        let Some(key) = role.iter().find(|k| k.key_id() == s.keyid) else {
            continue;
        };
        known = true;
        if revoked.contains(&s.keyid) {
            continue;
        }
        only_revoked = false;
        let sig = B64
            .decode(&s.sig)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
            .map(|b| Signature::from_bytes(&b));
        if sig.is_some_and(|sig| key.0.verify_strict(&input, &sig).is_ok()) {
            good.push(s.keyid.clone());
        }
    }
    let need = threshold.max(1);
    let have = good.len() as u32;
    if have >= need {
        return Ok(payload);
    }
    Err(match (known, only_revoked, have) {
        (false, _, _) => ManifestError::UnknownKey,
        (true, true, _) => ManifestError::RevokedKey,
        (true, false, 0) => ManifestError::BadSignature,
        _ => ManifestError::BelowThreshold { have, need },
    })
}

/// An Ed25519 release signing key. Held by the operator CLI only.
pub struct ReleaseSigningKey(SigningKey);

impl ReleaseSigningKey {
    pub fn generate() -> Result<Self, CryptoError> {
        let mut seed = [0u8; 32];
        crypto::random_bytes(&mut seed)?;
        let key = SigningKey::from_bytes(&seed);
        zeroize::Zeroize::zeroize(&mut seed);
        Ok(Self(key))
    }

    /// Parses the 64-hex-digit seed form written by [`Self::to_hex`].
    pub fn from_hex(s: &str) -> Result<Self, CryptoError> {
        let bytes: [u8; 32] = hex::decode(s.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(CryptoError::MalformedPublicKey)?;
        Ok(Self(SigningKey::from_bytes(&bytes)))
    }

    pub fn to_hex(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(hex::encode(self.0.to_bytes()))
    }

    pub fn public(&self) -> ReleasePublicKey {
        ReleasePublicKey(self.0.verifying_key())
    }

    /// Signs `message` as given; callers prepend their domain label.
    pub(crate) fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

/// An Ed25519 release verification key, trusted by the orchestrator and pinned on devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasePublicKey(VerifyingKey);

impl ReleasePublicKey {
    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, CryptoError> {
        let bytes: [u8; 32] = hex::decode(s.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(CryptoError::MalformedPublicKey)?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| CryptoError::MalformedPublicKey)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    /// First 8 bytes of SHA-256 of the raw public key, hex: how signatures name their key.
    pub fn key_id(&self) -> String {
        hex::encode(&crypto::sha256(&self.0.to_bytes())[..8])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(chunk_count: u32) -> Manifest {
        let digests = vec![7u8; 32 * chunk_count as usize];
        Manifest {
            v: MANIFEST_VERSION,
            artifact: ArtifactId::new("fw-1").unwrap(),
            version: "1.0.0".into(),
            security_version: SecurityVersion(1),
            hardware_model: "sim-v1".into(),
            image_size: u64::from(chunk_count) * 1024 - 10,
            image_sha256: "ab".repeat(32),
            chunk_size: 1024,
            chunk_count,
            chunk_sha256: B64.encode(digests),
            created_at: 100,
            expires_at: 200,
            sequence: None,
            delta: None,
            preconditions: None,
        }
    }

    #[test]
    fn a_peeked_manifest_claiming_more_chunks_than_its_image_holds_gives_no_length() {
        // Found while writing the `signed` fuzz target: `aloft release upload` sizes chunks from a bundle's
        // manifest before anything validated it.
        let mut m = sample(4);
        m.image_size = 10;
        assert_eq!(m.plaintext_len(0), Some(10));
        assert_eq!(m.plaintext_len(3), None);
        assert_eq!(m.sealed_len(3), None);
    }

    #[test]
    fn thresholds_count_distinct_unrevoked_keys() {
        let (a, b, c) = (
            ReleaseSigningKey::generate().unwrap(),
            ReleaseSigningKey::generate().unwrap(),
            ReleaseSigningKey::generate().unwrap(),
        );
        let role = [a.public(), b.public(), c.public()];
        let mut s = SignedManifest::sign(&sample(2), &a);
        assert_eq!(
            s.verify_threshold(&role, 2, &[]),
            Err(ManifestError::BelowThreshold { have: 1, need: 2 })
        );
        s.cosign(&a).unwrap();
        assert_eq!(s.signatures.len(), 1, "the same key signs once");
        let mut twice = s.clone();
        twice.signatures.push(s.signatures[0].clone());
        assert!(
            twice.verify_threshold(&role, 2, &[]).is_err(),
            "a copied signature counts once"
        );
        s.cosign(&b).unwrap();
        assert!(s.verify_threshold(&role, 2, &[]).is_ok());
        let revoked = [b.public().key_id()];
        assert_eq!(
            s.verify_threshold(&role, 2, &revoked),
            Err(ManifestError::BelowThreshold { have: 1, need: 2 })
        );
        let only_b = SignedManifest::sign(&sample(2), &b);
        assert_eq!(
            only_b.verify_threshold(&role, 1, &revoked),
            Err(ManifestError::RevokedKey)
        );
        assert_eq!(
            only_b.verify_threshold(&[a.public()], 1, &[]),
            Err(ManifestError::UnknownKey)
        );
    }

    #[test]
    fn signed_manifest_verifies_with_the_trusted_key_only() {
        let key = ReleaseSigningKey::generate().unwrap();
        let m = sample(3);
        let s = SignedManifest::sign(&m, &key);
        assert_eq!(s.verify(&[key.public()]).unwrap(), m);
        let stranger = ReleaseSigningKey::generate().unwrap();
        assert_eq!(
            s.verify(&[stranger.public()]),
            Err(ManifestError::UnknownKey)
        );
    }

    #[test]
    fn altered_payload_fails_signature() {
        let key = ReleaseSigningKey::generate().unwrap();
        let s = SignedManifest::sign(&sample(3), &key);
        let mut m = sample(3);
        m.security_version = SecurityVersion(99);
        let forged = SignedManifest {
            payload: B64.encode(serde_json::to_vec(&m).unwrap()).into(),
            signatures: s.signatures.clone(),
        };
        assert_eq!(
            forged.verify(&[key.public()]),
            Err(ManifestError::BadSignature)
        );
    }

    #[test]
    fn preconditions_are_covered_by_the_signature() {
        use crate::precondition::{InstallWindow, Preconditions};
        let key = ReleaseSigningKey::generate().unwrap();
        let mut m = sample(3);
        m.preconditions = Some(Preconditions {
            min_battery_pct: Some(30),
            install_window: Some(InstallWindow::parse("01:00-05:00").unwrap()),
            ..Default::default()
        });
        let s = SignedManifest::sign(&m, &key);
        assert_eq!(s.verify(&[key.public()]).unwrap(), m);
        // A server that strips the preconditions, or widens the window, breaks the signature.
        let mut stripped = m.clone();
        stripped.preconditions = None;
        let mut widened = m.clone();
        widened.preconditions = Some(Preconditions {
            min_battery_pct: Some(30),
            install_window: Some(InstallWindow::parse("00:00-23:59").unwrap()),
            ..Default::default()
        });
        for forged in [stripped, widened] {
            let f = SignedManifest {
                payload: B64.encode(serde_json::to_vec(&forged).unwrap()).into(),
                signatures: s.signatures.clone(),
            };
            assert_eq!(f.verify(&[key.public()]), Err(ManifestError::BadSignature));
        }
    }

    #[test]
    fn a_manifest_without_preconditions_serializes_as_in_1_4() {
        let json = String::from_utf8(serde_json::to_vec(&sample(2)).unwrap()).unwrap();
        assert!(!json.contains("preconditions"), "{json}");
        let mut m = sample(2);
        m.preconditions = Some(Default::default());
        assert!(matches!(m.validate(), Err(ManifestError::Inconsistent(_))));
    }

    #[test]
    fn inconsistent_manifest_is_refused_even_when_signed() {
        let key = ReleaseSigningKey::generate().unwrap();
        let mut m = sample(3);
        m.chunk_count = 4;
        let s = SignedManifest::sign(&m, &key);
        assert!(matches!(
            s.verify(&[key.public()]),
            Err(ManifestError::Inconsistent(_))
        ));
    }

    #[test]
    fn chunk_lengths_follow_image_size() {
        let m = sample(3);
        assert_eq!(m.plaintext_len(0), Some(1024));
        assert_eq!(m.plaintext_len(2), Some(1014));
        assert_eq!(m.plaintext_len(3), None);
        assert_eq!(m.chunk_digest(2), Some([7u8; 32]));
    }

    #[test]
    fn key_hex_round_trips() {
        let key = ReleaseSigningKey::generate().unwrap();
        let again = ReleaseSigningKey::from_hex(&key.to_hex()).unwrap();
        assert_eq!(again.public(), key.public());
        let p = ReleasePublicKey::from_hex(&key.public().to_hex()).unwrap();
        assert_eq!(p.key_id(), key.public().key_id());
    }
}
