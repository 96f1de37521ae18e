//! One copy of each signed manifest, and of its decoded chunk digests, for all the agents of
//! one process. Every device of a campaign receives the same signed manifest (several KiB of
//! base64 naming every chunk's digest), keeps it in its record for as long as the campaign runs
//! and holds the digests while it downloads; a simulator with 10,000 devices held 10,000 copies
//! of each. Sharing identical bytes changes nothing any device decides: the digests are decoded
//! from the verified manifest's own text.
//!
//! The answer of a signature check is remembered too ([`SharedManifests::verify`]): it is a
//! function of the root a device trusts and of the signed manifest, and every device of a
//! campaign asks it of the same two. Ed25519 verification of the manifest was 16% of the
//! simulator's CPU while a 10,000-device campaign's jobs arrived, on the two cores the
//! orchestrator needed (docs/BENCHMARKS.md, S2). A device whose root or manifest differs in any
//! byte (another root version, a revocation, a tampered payload or signature) misses and
//! verifies for itself; a real device, alone on its hardware, always does.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use aloft_proto::manifest::{Manifest, ManifestError, SignedManifest};
use aloft_proto::trust::TrustedRoot;

/// Manifests held at most; past it, those no agent holds any more are dropped first, and a
/// manifest that finds no room is simply not shared.
pub const MAX_SHARED: usize = 64;

/// Signature checks remembered at most; past it, the oldest is forgotten.
pub const MAX_VERIFIED: usize = 16;

/// One remembered check: what it read, whole, and its answer.
#[derive(Debug)]
struct Verified {
    trust: TrustedRoot,
    signed: SignedManifest,
    answer: Result<Manifest, ManifestError>,
}

/// The manifests shared by a process's agents (see the module doc).
#[derive(Debug, Default)]
pub struct SharedManifests {
    held: Mutex<HashSet<Arc<str>>>,
    /// Decoded digests by the manifest's `chunk_sha256` text, while some download holds them.
    digests: Mutex<HashMap<String, Weak<[[u8; 32]]>>>,
    /// Answers of [`SharedManifests::verify`], oldest first.
    verified: Mutex<Vec<Verified>>,
}

/// A poisoned lock only means another agent panicked mid-insert; the map is still valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SharedManifests {
    /// Makes `signed` hold the shared copy of its payload, adding it if it is new.
    pub fn share(&self, signed: &mut SignedManifest) {
        let mut held = lock(&self.held);
        if let Some(h) = held.get(&*signed.payload) {
            signed.payload = h.clone();
            return;
        }
        if held.len() >= MAX_SHARED {
            held.retain(|p| Arc::strong_count(p) > 1);
        }
        if held.len() < MAX_SHARED {
            held.insert(signed.payload.clone());
        }
    }

    /// The chunk digests of a verified `manifest`, decoded once for every download of it.
    pub fn digests(&self, manifest: &Manifest) -> Arc<[[u8; 32]]> {
        let mut map = lock(&self.digests);
        if let Some(d) = map.get(&manifest.chunk_sha256).and_then(Weak::upgrade) {
            return d;
        }
        let d: Arc<[[u8; 32]]> = manifest.chunk_digests().into();
        if map.len() >= MAX_SHARED {
            map.retain(|_, w| w.strong_count() > 0);
        }
        if map.len() < MAX_SHARED {
            map.insert(manifest.chunk_sha256.clone(), Arc::downgrade(&d));
        }
        d
    }

    /// `trust.verify_manifest(signed)`, answered from memory when the same check was made
    /// before: same root, field for field (its signed bytes, the root they parse to, every
    /// revocation), and the same manifest (payload and signatures). The check reads nothing
    /// else, so the answer is the one verifying again would give.
    pub fn verify(
        &self,
        trust: &TrustedRoot,
        signed: &SignedManifest,
    ) -> Result<Manifest, ManifestError> {
        let same = |v: &&Verified| v.signed == *signed && v.trust == *trust;
        if let Some(v) = lock(&self.verified).iter().find(same) {
            return v.answer.clone();
        }
        let answer = trust.verify_manifest(signed);
        let mut verified = lock(&self.verified);
        // Another agent may have verified the same meanwhile (the lock is not held while
        // verifying): one entry is enough.
        if verified.iter().any(|v| same(&v)) {
            return answer;
        }
        if verified.len() >= MAX_VERIFIED {
            verified.remove(0);
        }
        verified.push(Verified {
            trust: trust.clone(),
            signed: signed.clone(),
            answer: answer.clone(),
        });
        answer
    }

    /// Checks remembered now.
    #[cfg(test)]
    pub(crate) fn verified_len(&self) -> usize {
        lock(&self.verified).len()
    }

    /// Manifests held now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.held).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(payload: &str) -> SignedManifest {
        SignedManifest {
            payload: payload.into(),
            signatures: Vec::new(),
        }
    }

    #[test]
    fn a_remembered_check_answers_only_the_same_root_and_the_same_manifest() {
        use crate::update::testkit::{key, release, root_meta, signed_root, ReleaseSpec};
        let (signing, root_key, stranger) = (key(), key(), key());
        let meta = root_meta(1, &[&root_key], &[&signing], 1);
        let trust = TrustedRoot::pin(signed_root(&meta, &[&root_key])).unwrap();
        let rel = release(&signing, &ReleaseSpec::default());
        let pool = SharedManifests::default();
        let direct = trust.verify_manifest(&rel.signed).unwrap();
        assert_eq!(pool.verify(&trust, &rel.signed).unwrap(), direct);
        assert_eq!(pool.verify(&trust, &rel.signed).unwrap(), direct);
        assert_eq!(pool.verified_len(), 1, "the second answer came from memory");

        // The same payload under a signature by a key the root does not know.
        let mut forged = rel.signed.clone();
        forged.signatures = release(&stranger, &ReleaseSpec::default())
            .signed
            .signatures;
        assert_eq!(forged.payload, rel.signed.payload);
        let refused = pool.verify(&trust, &forged);
        assert!(refused.is_err());
        assert_eq!(refused, trust.verify_manifest(&forged));
        // One signature byte changed.
        let mut flipped = rel.signed.clone();
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut sig = base64::Engine::decode(&b64, &flipped.signatures[0].sig).unwrap();
        sig[10] ^= 1;
        flipped.signatures[0].sig = base64::Engine::encode(&b64, sig);
        assert!(pool.verify(&trust, &flipped).is_err());

        // A root that revokes the signing key: refused, though the first root's Ok is kept.
        let mut revoking = root_meta(1, &[&root_key], &[&stranger], 1);
        revoking.revoked = vec![signing.public().key_id()];
        let revoking = TrustedRoot::pin(signed_root(&revoking, &[&root_key])).unwrap();
        assert!(pool.verify(&revoking, &rel.signed).is_err());
        assert_eq!(pool.verify(&trust, &rel.signed).unwrap(), direct);

        // Bounded: the oldest answers are forgotten.
        for n in 0..MAX_VERIFIED as u64 + 4 {
            let version = format!("3.0.{n}");
            let spec = ReleaseSpec {
                version: &version,
                ..ReleaseSpec::default()
            };
            assert!(pool
                .verify(&trust, &release(&signing, &spec).signed)
                .is_ok());
        }
        assert_eq!(pool.verified_len(), MAX_VERIFIED);
    }

    #[test]
    fn equal_payloads_end_up_as_one_allocation() {
        let pool = SharedManifests::default();
        let (mut a, mut b) = (signed("bWFuaWZlc3Q="), signed("bWFuaWZlc3Q="));
        assert!(!Arc::ptr_eq(&a.payload, &b.payload));
        pool.share(&mut a);
        pool.share(&mut b);
        assert!(Arc::ptr_eq(&a.payload, &b.payload));
        let mut c = signed("b3RoZXI=");
        pool.share(&mut c);
        assert_eq!((pool.len(), &*c.payload), (2, "b3RoZXI="));
    }

    #[test]
    fn every_download_of_a_manifest_shares_its_decoded_digests_while_one_holds_them() {
        let rel = crate::update::testkit::Fixture::new()
            .release(&crate::update::testkit::ReleaseSpec::default());
        let pool = SharedManifests::default();
        let (a, b) = (pool.digests(&rel.manifest), pool.digests(&rel.manifest));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&a[..], &rel.manifest.chunk_digests()[..]);
        drop((a, b));
        let c = pool.digests(&rel.manifest);
        assert_eq!(
            (&c[..], Arc::strong_count(&c)),
            (&rel.manifest.chunk_digests()[..], 1)
        );
    }

    #[test]
    fn a_full_pool_drops_what_no_agent_holds_and_never_grows_past_its_cap() {
        let pool = SharedManifests::default();
        let mut kept = signed("kept");
        pool.share(&mut kept);
        for i in 0..3 * MAX_SHARED {
            let mut m = signed(&format!("m{i}"));
            pool.share(&mut m);
            assert!(pool.len() <= MAX_SHARED);
        }
        let mut again = signed("kept");
        pool.share(&mut again);
        assert!(Arc::ptr_eq(&kept.payload, &again.payload));
    }
}
