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
//!
//! So are the two SHA-256 passes over every chunk ([`ChunkChecks`]): the digest of each sealed
//! chunk against the manifest, and the image digest of what the slot holds (PROTOCOL.md §9.3,
//! steps 5 and 8). Every device of a campaign receives the same sealed chunks and writes the
//! same image; hashing them was a quarter of the simulator's CPU while 10,000 devices
//! downloaded 1 MiB (docs/BENCHMARKS.md, S3b). The first device to find a sealed chunk matching
//! its digest remembers a keyed tag of its bytes ([`Tagger`]: 16 bytes, whatever the chunk's
//! size); a device whose chunk has the same tag has the same bytes, and so the same answer,
//! without hashing (a tag costs a tenth of a hash), and any other byte string is hashed as
//! before. Equal sealed bytes under the same content key, artifact and chunk count open to
//! equal plaintext, so such a chunk is also vouched for as chunk `i` of that key's
//! [`HashChain`], from which the slot takes the image digest's state. Content keys are told
//! apart by a SHA-256 fingerprint, not kept.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use aloft_proto::crypto::{self, ContentKey};
use aloft_proto::manifest::{Manifest, ManifestError, SignedManifest};
use aloft_proto::trust::TrustedRoot;
use aloft_proto::ArtifactId;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::slots::{HashChain, ImageKey};

/// Manifests held at most; past it, those no agent holds any more are dropped first, and a
/// manifest that finds no room is simply not shared.
pub const MAX_SHARED: usize = 64;

/// Signature checks remembered at most; past it, the oldest is forgotten.
pub const MAX_VERIFIED: usize = 16;

/// Content keys a [`ChunkChecks`] keeps a hash chain for at most (a campaign has one).
const MAX_CHAINS: usize = 4;

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
    /// Decoded digests and the tags of known chunks by the manifest's `chunk_sha256` text,
    /// while some download holds them.
    checks: Mutex<HashMap<String, Weak<ChunkChecks>>>,
    /// Answers of [`SharedManifests::verify`], oldest first.
    verified: Mutex<Vec<Verified>>,
}

/// A manifest's chunk digests, the tags of the sealed chunks found to match them and the hash
/// chains of the images they open to (see the module doc). A device alone remembers nothing:
/// it never sees the same chunk twice.
#[derive(Debug)]
pub struct ChunkChecks {
    digests: Vec<[u8; 32]>,
    /// The tag of sealed chunk `i` as some device received it, hashing to `digests[i]`.
    known: Mutex<Vec<Option<Tag>>>,
    /// The hash chain of each content key's image.
    chains: Mutex<Vec<(ChainId, Arc<HashChain>)>>,
    /// `None` when this does not remember (or the system had no randomness for a key).
    tagger: Option<Tagger>,
}

/// A [`Tagger`]'s tag.
type Tag = [u8; 16];

/// A keyed 128-bit tag of byte strings: GMAC, that is AES-256-GCM with the bytes as associated
/// data and nothing encrypted, under a key drawn at random when the [`ChunkChecks`] is made and
/// never written or sent. For whoever does not know the key, two different strings share a
/// tag with a probability of at most (their length in 16-byte blocks + 1) / 2^128 (GHASH is
/// almost-XOR-universal), 2^-118 for a 16 KiB chunk; no tag leaves the process, and a string
/// whose tag differs is hashed, so a sender learns nothing to aim at. Even a collision gives
/// nothing: the sealed chunk must still open under the content key. Measured here at about
/// 20 GB/s on 16 KiB, against 1.8 for SHA-256: keeping the chunks' bytes to compare instead
/// cost a kibibyte per device at 1,000 devices, over S6's budget.
struct Tagger(LessSafeKey);

impl std::fmt::Debug for Tagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tagger")
    }
}

impl Tagger {
    fn new() -> Option<Self> {
        let mut key = [0u8; 32];
        crypto::random_bytes(&mut key).ok()?;
        Some(Tagger(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &key).ok()?,
        )))
    }

    fn tag(&self, data: &[u8]) -> Option<Tag> {
        // One nonce for every tag: nothing is encrypted and the tags are only compared, never
        // shown, so the reuse that undoes GCM for whoever sees its output shows nothing.
        let nonce = Nonce::assume_unique_for_key([0; 12]);
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce, Aad::from(data), &mut [])
            .ok()?;
        tag.as_ref().try_into().ok()
    }
}

/// Whose image a [`HashChain`] hashes: a fingerprint of the content key, the artifact, the
/// chunk count.
type ChainId = ([u8; 32], ArtifactId, u32);

/// How a sealed chunk compared with its digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkMatch {
    /// It does not match (or there is no chunk of that index).
    No,
    /// It matches, by hashing it.
    Hashed,
    /// It matches and has the tag of the chunk remembered, so it is that chunk: it may be
    /// vouched for.
    Known,
}

impl ChunkChecks {
    /// The checks of `digests`; with `remember`, the chunks found to match are remembered
    /// for the other devices (see the module doc).
    pub fn new(digests: Vec<[u8; 32]>, remember: bool) -> Self {
        let tagger = if remember { Tagger::new() } else { None };
        ChunkChecks {
            known: Mutex::new(vec![None; if tagger.is_some() { digests.len() } else { 0 }]),
            digests,
            chains: Mutex::new(Vec::new()),
            tagger,
        }
    }

    /// Whether `sealed` hashes to chunk `index`'s digest; answered by its tag when a device
    /// found bytes with that tag to match before.
    pub fn check(&self, index: u32, sealed: &[u8]) -> ChunkMatch {
        let i = index as usize;
        let Some(expected) = self.digests.get(i) else {
            return ChunkMatch::No;
        };
        let tag = self.tagger.as_ref().and_then(|t| t.tag(sealed));
        if tag.is_some() && lock(&self.known).get(i).copied().flatten() == tag {
            return ChunkMatch::Known;
        }
        if crypto::sha256(sealed) != *expected {
            return ChunkMatch::No;
        }
        let Some(tag) = tag else {
            return ChunkMatch::Hashed;
        };
        match lock(&self.known).get_mut(i) {
            Some(slot @ None) => {
                *slot = Some(tag);
                ChunkMatch::Known
            }
            Some(Some(kept)) if *kept == tag => ChunkMatch::Known,
            _ => ChunkMatch::Hashed,
        }
    }

    /// The hash chain of the image the chunks of `manifest` open to under `key`; `None` when
    /// this does not remember or keeps chains for too many keys already.
    pub fn chain(&self, key: &ContentKey, manifest: &Manifest) -> Option<Arc<HashChain>> {
        self.tagger.as_ref()?;
        let mut tagged = b"aloft-sim hash chain key".to_vec();
        tagged.extend_from_slice(key.as_bytes());
        let (artifact, count) = (&manifest.artifact, manifest.chunk_count);
        let id = (crypto::sha256(&tagged), artifact.clone(), count);
        let mut chains = lock(&self.chains);
        if let Some((_, c)) = chains.iter().find(|(k, _)| *k == id) {
            return Some(c.clone());
        }
        if chains.len() >= MAX_CHAINS {
            return None;
        }
        // The stored image's name: everything that makes its plaintext what it is, and its cut.
        let mut named = b"aloft-sim stored image".to_vec();
        named.extend_from_slice(&id.0);
        named.extend_from_slice(artifact.as_str().as_bytes());
        named.push(0);
        named.extend_from_slice(&count.to_be_bytes());
        named.extend_from_slice(&manifest.chunk_size.to_be_bytes());
        named.extend_from_slice(&manifest.image_size.to_be_bytes());
        let image = ImageKey::new(
            crypto::sha256(&named),
            manifest.chunk_size,
            manifest.image_size,
        )
        .filter(|k| k.count == count);
        let c = Arc::new(HashChain::of_image(image));
        chains.push((id, c.clone()));
        Some(c)
    }
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

    /// The chunk checks of a verified `manifest`: its digests decoded once for every download
    /// of it, and the chunks found to match them.
    pub fn checks(&self, manifest: &Manifest) -> Arc<ChunkChecks> {
        let mut map = lock(&self.checks);
        if let Some(c) = map.get(&manifest.chunk_sha256).and_then(Weak::upgrade) {
            return c;
        }
        let c = Arc::new(ChunkChecks::new(manifest.chunk_digests(), true));
        if map.len() >= MAX_SHARED {
            map.retain(|_, w| w.strong_count() > 0);
        }
        if map.len() < MAX_SHARED {
            map.insert(manifest.chunk_sha256.clone(), Arc::downgrade(&c));
        }
        c
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
    fn every_download_of_a_manifest_shares_its_chunk_checks_while_one_holds_them() {
        let rel = crate::update::testkit::Fixture::new()
            .release(&crate::update::testkit::ReleaseSpec::default());
        let pool = SharedManifests::default();
        let (a, b) = (pool.checks(&rel.manifest), pool.checks(&rel.manifest));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.digests, rel.manifest.chunk_digests());
        drop((a, b));
        let c = pool.checks(&rel.manifest);
        assert_eq!(
            (&c.digests, Arc::strong_count(&c)),
            (&rel.manifest.chunk_digests(), 1)
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

#[cfg(test)]
mod chunk_tests {
    use super::*;
    use aloft_proto::crypto::sha256;

    fn checks(chunks: &[&[u8]], remember: bool) -> ChunkChecks {
        ChunkChecks::new(chunks.iter().map(|c| sha256(c)).collect(), remember)
    }

    #[test]
    fn a_known_chunk_answers_only_for_the_same_bytes() {
        let big = [7u8; 20_000];
        let c = checks(&[b"first chunk", b"second chunk", &big], true);
        assert_eq!(
            c.check(0, b"first chunk"),
            ChunkMatch::Known,
            "hashed, tag kept"
        );
        assert_eq!(c.check(0, b"first chunk"), ChunkMatch::Known, "by its tag");
        // A tampered chunk of the same length, a longer one, another chunk's bytes, an index
        // out of range.
        assert_eq!(c.check(0, b"first chunK"), ChunkMatch::No);
        assert_eq!(c.check(0, b"first chunk\0"), ChunkMatch::No);
        assert_eq!(c.check(0, b"second chunk"), ChunkMatch::No);
        assert_eq!(c.check(3, b"first chunk"), ChunkMatch::No);
        // Nothing bad is remembered: the good bytes still answer.
        assert_eq!(c.check(0, b"first chunk"), ChunkMatch::Known);
        // A tag is 16 bytes whatever the chunk's size: large chunks are remembered too, and
        // one byte changed anywhere is noticed.
        assert_eq!(c.check(2, &big), ChunkMatch::Known);
        let mut flipped = big;
        flipped[12_345] ^= 1;
        assert_eq!(c.check(2, &flipped), ChunkMatch::No);
        assert_eq!(c.check(2, &big), ChunkMatch::Known);
    }

    #[test]
    fn two_checks_tag_with_keys_of_their_own() {
        let (a, b) = (checks(&[b"chunk"], true), checks(&[b"chunk"], true));
        let (ta, tb) = (a.tagger.as_ref().unwrap(), b.tagger.as_ref().unwrap());
        assert_ne!(ta.tag(b"chunk"), tb.tag(b"chunk"));
        assert_eq!(ta.tag(b"chunk"), ta.tag(b"chunk"));
    }

    #[test]
    fn a_device_alone_hashes_every_chunk_and_remembers_nothing() {
        let alone = checks(&[b"chunk"], false);
        assert_eq!(alone.check(0, b"chunk"), ChunkMatch::Hashed);
        assert_eq!(alone.check(0, b"chunk"), ChunkMatch::Hashed);
        assert_eq!(alone.check(0, b"chunK"), ChunkMatch::No);
        assert!(alone
            .chain(&ContentKey::from_bytes([1; 32]), &manifest("fw-2.0", 1))
            .is_none());
    }

    /// A manifest of `artifact` in `count` chunks (of 1,024 bytes).
    fn manifest(artifact: &str, count: usize) -> Manifest {
        use crate::update::testkit::{key, release, ReleaseSpec};
        let spec = ReleaseSpec {
            artifact,
            size: count * 1024,
            ..ReleaseSpec::default()
        };
        release(&key(), &spec).manifest
    }

    #[test]
    fn each_content_key_has_its_own_chain() {
        let c = checks(&[b"chunk"], true);
        let (k1, k2) = (
            ContentKey::from_bytes([1; 32]),
            ContentKey::from_bytes([2; 32]),
        );
        let (one, two) = (manifest("fw-2.0", 1), manifest("fw-2.0", 2));
        let a = c.chain(&k1, &one).unwrap();
        assert!(Arc::ptr_eq(&a, &c.chain(&k1, &one).unwrap()));
        let b = c.chain(&k2, &one).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c.chain(&k1, &two).unwrap()));
        let other = c.chain(&k1, &manifest("fw-3.0", 1)).unwrap();
        assert!(!Arc::ptr_eq(&a, &other));
        // Each names its stored image apart.
        let ids: HashSet<_> = [&a, &b, &other]
            .iter()
            .map(|c| c.image().unwrap().id)
            .collect();
        assert_eq!(ids.len(), 3);
        // Four chains are kept; a fifth key gets none and its device hashes for itself.
        assert!(c.chain(&ContentKey::from_bytes([3; 32]), &one).is_none());
    }
}
