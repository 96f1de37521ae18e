//! The root of trust (PROTOCOL.md §Root of trust), after TUF and Uptane: signed root metadata
//! names the keys of each role and how many of them must sign (k of n), carries a version and an
//! expiry, and lists revoked keys. Devices pin root version 1 at provisioning and walk forward:
//! root N+1 counts only if a threshold of root N's root keys *and* a threshold of its own root
//! keys signed it, so neither a lost old key set nor a stolen new key alone can move the root.
//!
//! Roles:
//! - `root`: signs root metadata (offline keys).
//! - `release`: signs manifests (offline, in the operator CLI); k of n lets a release require two
//!   people.
//!
//! Revocation is sticky: a key revoked by any accepted root is never trusted again, even if a
//! later root forgets it ([`TrustedRoot::update`] refuses such a root).

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::manifest::{
    context_input, verify_signatures, Manifest, ManifestError, ManifestSignature, ReleasePublicKey,
    ReleaseSigningKey, SignedManifest, MAX_SIGNATURES,
};

/// Root metadata format version.
pub const ROOT_FORMAT: u8 = 1;
/// Most roots walked in one update: a device further behind than this must be re-provisioned,
/// and a forged endless chain costs a device at most this many signature checks.
pub const MAX_ROOT_CHAIN: usize = 16;
/// Most keys one root may name.
pub const MAX_ROOT_KEYS: usize = 32;
/// Largest signed root, in bytes of JSON.
pub const MAX_ROOT_BYTES: usize = 16 * 1024;

const ROOT_CONTEXT: &[u8] = b"aloft-root-v1\0";

/// Why root metadata was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("root metadata is malformed: {0}")]
    Malformed(String),
    #[error("root metadata is inconsistent: {0}")]
    Inconsistent(&'static str),
    #[error("root version {got} does not follow version {have}")]
    NotNext { have: u64, got: u64 },
    #[error("root version {version} is not signed by a threshold of {by}: {why}")]
    Signatures {
        version: u64,
        by: &'static str,
        why: ManifestError,
    },
    #[error("root version {version} un-revokes key {keyid}")]
    Unrevoked { version: u64, keyid: String },
    #[error("root version {version} expired at {expires_at}; the device's time is {now}")]
    Expired {
        version: u64,
        expires_at: u64,
        now: u64,
    },
    #[error("the chain skips past {MAX_ROOT_CHAIN} roots; re-provision the device")]
    TooLong,
}

/// Keys allowed to act for a role, and how many must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub keyids: Vec<String>,
    pub threshold: u32,
}

/// Root metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// [`ROOT_FORMAT`].
    pub v: u8,
    /// 1 for the root pinned at provisioning, then +1 per rotation.
    pub version: u64,
    /// Unix seconds when it was made; a device without a clock takes its time from here.
    pub issued_at: u64,
    /// Unix seconds after which a device refuses it (and anything it would verify) until it
    /// learns a newer root: the defence against a freeze.
    pub expires_at: u64,
    /// Key id → Ed25519 public key (hex).
    pub keys: BTreeMap<String, String>,
    pub root: Role,
    pub release: Role,
    /// Key ids never trusted again, for any role.
    #[serde(default)]
    pub revoked: Vec<String>,
}

impl Root {
    /// Checks internal consistency: keys parse and match their ids, roles name known keys with a
    /// reachable threshold, no role uses a revoked key.
    pub fn validate(&self) -> Result<(), TrustError> {
        use TrustError::Inconsistent;
        if self.v != ROOT_FORMAT {
            return Err(TrustError::Malformed(format!("format {}", self.v)));
        }
        if self.version == 0 {
            return Err(Inconsistent("version starts at 1"));
        }
        if self.expires_at <= self.issued_at {
            return Err(Inconsistent("expires_at is not after issued_at"));
        }
        if self.keys.is_empty() || self.keys.len() > MAX_ROOT_KEYS {
            return Err(Inconsistent("1 to 32 keys"));
        }
        for (id, hex) in &self.keys {
            let key = ReleasePublicKey::from_hex(hex)
                .map_err(|_| Inconsistent("a key is not an Ed25519 public key"))?;
            if &key.key_id() != id {
                return Err(Inconsistent("a key id does not match its key"));
            }
        }
        for role in [&self.root, &self.release] {
            let mut ids = role.keyids.clone();
            ids.sort();
            ids.dedup();
            if ids.len() != role.keyids.len() || ids.len() > MAX_SIGNATURES {
                return Err(Inconsistent("a role lists 1 to 8 distinct keys"));
            }
            if role.threshold == 0 || role.threshold as usize > role.keyids.len() {
                return Err(Inconsistent(
                    "a role's threshold is 1 to its number of keys",
                ));
            }
            if role.keyids.iter().any(|k| !self.keys.contains_key(k)) {
                return Err(Inconsistent("a role names an unknown key"));
            }
            if role.keyids.iter().any(|k| self.revoked.contains(k)) {
                return Err(Inconsistent("a role uses a revoked key"));
            }
        }
        Ok(())
    }

    /// The public keys of a role.
    pub fn role_keys(&self, role: &Role) -> Vec<ReleasePublicKey> {
        role.keyids
            .iter()
            .filter_map(|id| self.keys.get(id))
            .filter_map(|hex| ReleasePublicKey::from_hex(hex).ok())
            .collect()
    }
}

/// Root metadata as it travels: its exact JSON bytes (base64) and the signatures over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRoot {
    pub payload: String,
    pub signatures: Vec<ManifestSignature>,
}

impl SignedRoot {
    /// Serializes `root`, unsigned; approvers add signatures with [`Self::sign`].
    pub fn new(root: &Root) -> Self {
        // Serializing a struct of strings, integers and maps cannot fail.
        let bytes = serde_json::to_vec(root).unwrap_or_default();
        SignedRoot {
            payload: B64.encode(bytes),
            signatures: Vec::new(),
        }
    }

    /// Adds `key`'s signature (once per key).
    pub fn sign(&mut self, key: &ReleaseSigningKey) -> Result<(), TrustError> {
        let payload = B64
            .decode(&self.payload)
            .map_err(|_| TrustError::Malformed("payload is not base64".into()))?;
        let keyid = key.public().key_id();
        if self.signatures.iter().any(|s| s.keyid == keyid) {
            return Ok(());
        }
        if self.signatures.len() >= MAX_SIGNATURES {
            return Err(TrustError::Malformed("too many signatures".into()));
        }
        let sig = key.sign_raw(&context_input(ROOT_CONTEXT, &payload));
        self.signatures.push(ManifestSignature {
            keyid,
            sig: B64.encode(sig),
        });
        Ok(())
    }

    /// Parses the payload without checking signatures: for display, or to learn which keys must
    /// sign it.
    pub fn peek_unverified(&self) -> Result<Root, TrustError> {
        let bytes = B64
            .decode(&self.payload)
            .map_err(|_| TrustError::Malformed("payload is not base64".into()))?;
        if bytes.len() > MAX_ROOT_BYTES {
            return Err(TrustError::Malformed("too large".into()));
        }
        let root: Root =
            serde_json::from_slice(&bytes).map_err(|e| TrustError::Malformed(e.to_string()))?;
        root.validate()?;
        Ok(root)
    }

    /// Verifies that a threshold of `role` (keys looked up in `keys_of`) signed this root, then
    /// parses it. `revoked` keys do not count.
    fn verify_by(
        &self,
        keys_of: &Root,
        role: &Role,
        revoked: &[String],
        by: &'static str,
        version: u64,
    ) -> Result<(), TrustError> {
        verify_signatures(
            &self.payload,
            &self.signatures,
            ROOT_CONTEXT,
            &keys_of.role_keys(role),
            role.threshold,
            revoked,
        )
        .map(|_| ())
        .map_err(|why| TrustError::Signatures { version, by, why })
    }
}

/// The newest root a device or the orchestrator has accepted, and every key revoked so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedRoot {
    pub signed: SignedRoot,
    #[serde(skip)]
    root: Option<Root>,
    /// Every key revoked by any root accepted so far (revocation is sticky).
    #[serde(default)]
    pub revoked: Vec<String>,
}

impl TrustedRoot {
    /// Pins root metadata at provisioning: it must be version 1... or any version an operator
    /// chooses to pin, signed by a threshold of its own root keys.
    pub fn pin(signed: SignedRoot) -> Result<Self, TrustError> {
        let root = signed.peek_unverified()?;
        signed.verify_by(
            &root,
            &root.root,
            &root.revoked,
            "its own root keys",
            root.version,
        )?;
        Ok(TrustedRoot {
            revoked: root.revoked.clone(),
            root: Some(root),
            signed,
        })
    }

    /// Re-reads a stored trusted root (its signatures were checked when it was accepted; they
    /// are checked again, so a tampered record is refused rather than trusted).
    pub fn restore(stored: TrustedRoot) -> Result<Self, TrustError> {
        let mut t = Self::pin(stored.signed)?;
        for k in stored.revoked {
            if !t.revoked.contains(&k) {
                t.revoked.push(k);
            }
        }
        Ok(t)
    }

    pub fn root(&self) -> &Root {
        // `root` is set by every constructor; the fallback only exists because serde skips it.
        self.root.as_ref().unwrap_or(&EMPTY)
    }

    pub fn version(&self) -> u64 {
        self.root().version
    }

    /// Walks forward through `chain` (any order, any versions; older ones are ignored): each next
    /// version must be signed by a threshold of the current root's root keys and of its own, and
    /// must keep every revocation. At most [`MAX_ROOT_CHAIN`] steps. Returns how many roots were
    /// accepted. On error nothing changes.
    pub fn update(&mut self, chain: &[SignedRoot]) -> Result<usize, TrustError> {
        let mut candidates: Vec<(Root, &SignedRoot)> = Vec::new();
        for s in chain {
            let r = s.peek_unverified()?;
            if r.version > self.version() {
                candidates.push((r, s));
            }
        }
        candidates.sort_by_key(|(r, _)| r.version);
        if candidates.len() > MAX_ROOT_CHAIN {
            return Err(TrustError::TooLong);
        }
        let mut next = self.clone();
        let mut steps = 0;
        for (root, signed) in candidates {
            let have = next.version();
            if root.version != have + 1 {
                return Err(TrustError::NotNext {
                    have,
                    got: root.version,
                });
            }
            let current = next.root().clone();
            signed.verify_by(
                &current,
                &current.root,
                &next.revoked,
                "the previous root",
                root.version,
            )?;
            signed.verify_by(
                &root,
                &root.root,
                &next.revoked,
                "its own root keys",
                root.version,
            )?;
            if let Some(k) = next.revoked.iter().find(|k| !root.revoked.contains(k)) {
                return Err(TrustError::Unrevoked {
                    version: root.version,
                    keyid: k.clone(),
                });
            }
            next.revoked.clone_from(&root.revoked);
            next.signed = signed.clone();
            next.root = Some(root);
            steps += 1;
        }
        *self = next;
        Ok(steps)
    }

    /// Refuses an expired root: until it learns a newer one, a device verifies nothing with it.
    pub fn check_fresh(&self, now_secs: u64) -> Result<(), TrustError> {
        let r = self.root();
        if now_secs > r.expires_at {
            return Err(TrustError::Expired {
                version: r.version,
                expires_at: r.expires_at,
                now: now_secs,
            });
        }
        Ok(())
    }

    /// Verifies a manifest against the release role: a threshold of its keys, none revoked.
    pub fn verify_manifest(&self, signed: &SignedManifest) -> Result<Manifest, ManifestError> {
        let r = self.root();
        match signed.verify_threshold(&r.role_keys(&r.release), r.release.threshold, &self.revoked)
        {
            // A revoked key has usually left the role too; say why it does not count.
            Err(ManifestError::UnknownKey)
                if signed
                    .signatures
                    .iter()
                    .any(|s| self.revoked.contains(&s.keyid)) =>
            {
                Err(ManifestError::RevokedKey)
            }
            other => other,
        }
    }
}

static EMPTY: Root = Root {
    v: ROOT_FORMAT,
    version: 0,
    issued_at: 0,
    expires_at: 0,
    keys: BTreeMap::new(),
    root: Role {
        keyids: Vec::new(),
        threshold: 1,
    },
    release: Role {
        keyids: Vec::new(),
        threshold: 1,
    },
    revoked: Vec::new(),
};

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ReleaseSigningKey {
        ReleaseSigningKey::generate().unwrap()
    }

    fn root(
        version: u64,
        root_keys: &[&ReleaseSigningKey],
        threshold: u32,
        release: &[&ReleaseSigningKey],
    ) -> Root {
        let mut keys = BTreeMap::new();
        for k in root_keys.iter().chain(release) {
            keys.insert(k.public().key_id(), k.public().to_hex());
        }
        Root {
            v: ROOT_FORMAT,
            version,
            issued_at: 1_000,
            expires_at: 10_000,
            keys,
            root: Role {
                keyids: root_keys.iter().map(|k| k.public().key_id()).collect(),
                threshold,
            },
            release: Role {
                keyids: release.iter().map(|k| k.public().key_id()).collect(),
                threshold: 1,
            },
            revoked: Vec::new(),
        }
    }

    fn signed(r: &Root, by: &[&ReleaseSigningKey]) -> SignedRoot {
        let mut s = SignedRoot::new(r);
        for k in by {
            s.sign(k).unwrap();
        }
        s
    }

    #[test]
    fn a_rotation_needs_the_old_and_the_new_thresholds() {
        let (a, b, c, d, rel) = (key(), key(), key(), key(), key());
        let v1 = root(1, &[&a, &b], 2, &[&rel]);
        let mut t = TrustedRoot::pin(signed(&v1, &[&a, &b])).unwrap();
        // v2 moves root to {c, d}, 2 of 2.
        let v2 = root(2, &[&c, &d], 2, &[&rel]);
        for (by, ok) in [
            (vec![&a, &b], false),     // old keys only
            (vec![&c, &d], false),     // new keys only
            (vec![&a, &c, &d], false), // 1 of 2 old
            (vec![&a, &b, &c], false), // 1 of 2 new
            (vec![&a, &b, &c, &d], true),
        ] {
            let mut probe = t.clone();
            assert_eq!(
                probe.update(&[signed(&v2, &by)]).is_ok(),
                ok,
                "{}",
                by.len()
            );
        }
        assert_eq!(t.update(&[signed(&v2, &[&a, &b, &c, &d])]).unwrap(), 1);
        assert_eq!(t.version(), 2);
        // An old root again changes nothing.
        assert_eq!(t.update(&[signed(&v1, &[&a, &b])]).unwrap(), 0);
    }

    #[test]
    fn a_chain_is_walked_in_order_without_gaps_and_bounded() {
        let (a, rel) = (key(), key());
        let mut t = TrustedRoot::pin(signed(&root(1, &[&a], 1, &[&rel]), &[&a])).unwrap();
        let chain: Vec<SignedRoot> = (2..=5)
            .rev()
            .map(|v| signed(&root(v, &[&a], 1, &[&rel]), &[&a]))
            .collect();
        assert_eq!(t.update(&chain).unwrap(), 4);
        assert_eq!(t.version(), 5);
        let gap = signed(&root(7, &[&a], 1, &[&rel]), &[&a]);
        assert_eq!(
            t.update(&[gap]),
            Err(TrustError::NotNext { have: 5, got: 7 })
        );
        let long: Vec<SignedRoot> = (6..6 + MAX_ROOT_CHAIN as u64 + 1)
            .map(|v| signed(&root(v, &[&a], 1, &[&rel]), &[&a]))
            .collect();
        assert_eq!(t.update(&long), Err(TrustError::TooLong));
        assert_eq!(t.version(), 5, "nothing changes on error");
    }

    #[test]
    fn revocation_is_sticky_and_stops_manifests() {
        let (a, rel, rel2) = (key(), key(), key());
        let mut t = TrustedRoot::pin(signed(&root(1, &[&a], 1, &[&rel]), &[&a])).unwrap();
        let m = crate::manifest::tests::sample(2);
        assert!(t.verify_manifest(&SignedManifest::sign(&m, &rel)).is_ok());
        let mut v2 = root(2, &[&a], 1, &[&rel2]);
        v2.keys.insert(rel.public().key_id(), rel.public().to_hex());
        v2.revoked = vec![rel.public().key_id()];
        t.update(&[signed(&v2, &[&a])]).unwrap();
        assert_eq!(
            t.verify_manifest(&SignedManifest::sign(&m, &rel)),
            Err(ManifestError::RevokedKey),
            "a revoked release key no longer counts"
        );
        assert!(t.verify_manifest(&SignedManifest::sign(&m, &rel2)).is_ok());
        // v3 forgets the revocation: refused.
        let v3 = root(3, &[&a], 1, &[&rel2]);
        assert!(matches!(
            t.update(&[signed(&v3, &[&a])]),
            Err(TrustError::Unrevoked { .. })
        ));
    }

    #[test]
    fn expiry_and_malformed_roots_are_refused() {
        let (a, rel) = (key(), key());
        let t = TrustedRoot::pin(signed(&root(1, &[&a], 1, &[&rel]), &[&a])).unwrap();
        assert!(t.check_fresh(10_000).is_ok());
        assert!(matches!(
            t.check_fresh(10_001),
            Err(TrustError::Expired { .. })
        ));
        let mut bad = root(1, &[&a], 2, &[&rel]);
        assert!(bad.validate().is_err(), "threshold above the key count");
        bad.root.threshold = 1;
        bad.revoked = vec![a.public().key_id()];
        assert!(bad.validate().is_err(), "a role uses a revoked key");
        let tampered = SignedRoot {
            payload: B64.encode(br#"{"v":1}"#),
            signatures: Vec::new(),
        };
        assert!(TrustedRoot::pin(tampered).is_err());
        let unsigned = SignedRoot::new(&root(1, &[&a], 1, &[&rel]));
        assert!(TrustedRoot::pin(unsigned).is_err());
    }
}
