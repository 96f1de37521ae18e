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
//! its digest keeps its bytes (within [`KNOWN_BYTES_PER_DEVICE`] per device of the fleet); a
//! device whose chunk is *byte for byte* those bytes has the same answer without hashing (a
//! comparison costs a tenth of a hash), and any other byte string is hashed as before. Equal
//! sealed bytes under the same content key, artifact and chunk count open to equal plaintext,
//! so such a chunk is also vouched for as chunk `i` of that key's [`HashChain`], from which the
//! slot takes the image digest's state. Content keys are told apart by a SHA-256 fingerprint,
//! not kept.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use aloft_proto::crypto::{self, ContentKey};
use aloft_proto::manifest::{Manifest, ManifestError, SignedManifest};
use aloft_proto::trust::TrustedRoot;
use aloft_proto::ArtifactId;

use crate::slots::HashChain;

/// Manifests held at most; past it, those no agent holds any more are dropped first, and a
/// manifest that finds no room is simply not shared.
pub const MAX_SHARED: usize = 64;

/// Signature checks remembered at most; past it, the oldest is forgotten.
pub const MAX_VERIFIED: usize = 16;

/// Bytes of sealed chunks a process keeps at most for [`ChunkChecks`], across every manifest;
/// past it, chunks are hashed by every device as before.
pub const MAX_KNOWN_BYTES: usize = 32 * 1024 * 1024;

/// Bytes of sealed chunks kept per device of a fleet ([`SharedManifests::for_fleet`]): the
/// memory is the process's, but a simulator is sized by its memory per device (S6), which
/// this keeps to a quarter of a kibibyte. 10,000 devices keep a 1 MiB image whole; 1,000 keep
/// its first 256 KiB.
pub const KNOWN_BYTES_PER_DEVICE: usize = 256;

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
#[derive(Debug)]
pub struct SharedManifests {
    held: Mutex<HashSet<Arc<str>>>,
    /// Decoded digests and known chunks by the manifest's `chunk_sha256` text, while some
    /// download holds them.
    checks: Mutex<HashMap<String, Weak<ChunkChecks>>>,
    /// Bytes the [`ChunkChecks`] hold now, and how many they may.
    known_bytes: Arc<Budget>,
    /// Answers of [`SharedManifests::verify`], oldest first.
    verified: Mutex<Vec<Verified>>,
}

/// A manifest's chunk digests, the sealed chunks found to match them and the hash chains of
/// the images they open to (see the module doc). Without a budget nothing is remembered: a
/// device alone keeps no copy of what it already wrote.
#[derive(Debug)]
pub struct ChunkChecks {
    digests: Vec<[u8; 32]>,
    /// Sealed chunk `i` as some device received it, hashing to `digests[i]`.
    known: Mutex<Vec<Option<Arc<[u8]>>>>,
    /// The hash chain of each content key's image.
    chains: Mutex<Vec<(ChainId, Arc<HashChain>)>>,
    /// The process's count of bytes held, when this remembers.
    budget: Option<Arc<Budget>>,
    /// Bytes this holds in `known`, given back to the budget when it is dropped.
    held: AtomicUsize,
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
    /// It matches and is byte for byte the chunk remembered: it may be vouched for.
    Known,
}

impl ChunkChecks {
    pub fn new(digests: Vec<[u8; 32]>, budget: Option<Arc<Budget>>) -> Self {
        ChunkChecks {
            known: Mutex::new(vec![None; if budget.is_some() { digests.len() } else { 0 }]),
            digests,
            chains: Mutex::new(Vec::new()),
            budget,
            held: AtomicUsize::new(0),
        }
    }

    /// Whether `sealed` hashes to chunk `index`'s digest; answered by comparing bytes when a
    /// device found these very bytes to match before.
    pub fn check(&self, index: u32, sealed: &[u8]) -> ChunkMatch {
        let i = index as usize;
        let Some(expected) = self.digests.get(i) else {
            return ChunkMatch::No;
        };
        let seen = lock(&self.known).get(i).cloned().flatten();
        if seen.as_deref() == Some(sealed) {
            return ChunkMatch::Known;
        }
        if crypto::sha256(sealed) != *expected {
            return ChunkMatch::No;
        }
        if seen.is_none() && self.remember(i, sealed) {
            ChunkMatch::Known
        } else {
            ChunkMatch::Hashed
        }
    }

    /// Keeps `sealed` as chunk `i`, if the budget allows and no other bytes are kept for it.
    fn remember(&self, i: usize, sealed: &[u8]) -> bool {
        let Some(budget) = &self.budget else {
            return false;
        };
        let mut known = lock(&self.known);
        match known.get(i) {
            Some(Some(k)) => return **k == *sealed,
            Some(None) => {}
            None => return false,
        }
        if !budget.take(sealed.len()) {
            return false;
        }
        self.held.fetch_add(sealed.len(), Ordering::Relaxed);
        known[i] = Some(sealed.into());
        true
    }

    /// The hash chain of the image chunks of `artifact` (`count` of them) open to under `key`;
    /// `None` when this does not remember or keeps chains for too many keys already.
    pub fn chain(
        &self,
        key: &ContentKey,
        artifact: &ArtifactId,
        count: u32,
    ) -> Option<Arc<HashChain>> {
        self.budget.as_ref()?;
        let mut tagged = b"aloft-sim hash chain key".to_vec();
        tagged.extend_from_slice(key.as_bytes());
        let id = (crypto::sha256(&tagged), artifact.clone(), count);
        let mut chains = lock(&self.chains);
        if let Some((_, c)) = chains.iter().find(|(k, _)| *k == id) {
            return Some(c.clone());
        }
        if chains.len() >= MAX_CHAINS {
            return None;
        }
        let c = Arc::new(HashChain::default());
        chains.push((id, c.clone()));
        Some(c)
    }
}

impl Drop for ChunkChecks {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.give_back(*self.held.get_mut());
        }
    }
}

/// A poisoned lock only means another agent panicked mid-insert; the map is still valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes of sealed chunks held, against a limit.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes `n` bytes if they fit.
    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_add(n).filter(|&after| after <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl Default for SharedManifests {
    /// Keeps up to [`MAX_KNOWN_BYTES`] of chunks.
    fn default() -> Self {
        SharedManifests::with_known_bytes(MAX_KNOWN_BYTES)
    }
}

impl SharedManifests {
    /// For a fleet of `devices`: [`KNOWN_BYTES_PER_DEVICE`] each, at most [`MAX_KNOWN_BYTES`].
    pub fn for_fleet(devices: usize) -> Self {
        SharedManifests::with_known_bytes(
            devices
                .saturating_mul(KNOWN_BYTES_PER_DEVICE)
                .min(MAX_KNOWN_BYTES),
        )
    }

    fn with_known_bytes(limit: usize) -> Self {
        SharedManifests {
            held: Mutex::default(),
            checks: Mutex::default(),
            known_bytes: Arc::new(Budget::new(limit)),
            verified: Mutex::default(),
        }
    }

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
        let c = Arc::new(ChunkChecks::new(
            manifest.chunk_digests(),
            Some(self.known_bytes.clone()),
        ));
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

    fn checks(chunks: &[&[u8]], budget: Option<Arc<Budget>>) -> ChunkChecks {
        ChunkChecks::new(chunks.iter().map(|c| sha256(c)).collect(), budget)
    }

    #[test]
    fn a_known_chunk_answers_only_for_the_same_bytes() {
        let budget = Arc::new(Budget::new(MAX_KNOWN_BYTES));
        let c = checks(&[b"first chunk", b"second chunk"], Some(budget.clone()));
        assert_eq!(c.check(0, b"first chunk"), ChunkMatch::Known, "kept");
        assert_eq!(budget.used(), 11);
        assert_eq!(c.check(0, b"first chunk"), ChunkMatch::Known, "compared");
        // A tampered chunk of the same length, another chunk's bytes, an index out of range.
        assert_eq!(c.check(0, b"first chunK"), ChunkMatch::No);
        assert_eq!(c.check(0, b"second chunk"), ChunkMatch::No);
        assert_eq!(c.check(2, b"first chunk"), ChunkMatch::No);
        // Nothing bad is kept: the good bytes still answer, and the budget did not move.
        assert_eq!(c.check(0, b"first chunk"), ChunkMatch::Known);
        assert_eq!(budget.used(), 11);
        drop(c);
        assert_eq!(budget.used(), 0, "given back when dropped");
    }

    #[test]
    fn without_a_budget_or_past_it_chunks_are_hashed_and_not_kept() {
        let alone = checks(&[b"chunk"], None);
        assert_eq!(alone.check(0, b"chunk"), ChunkMatch::Hashed);
        assert_eq!(alone.check(0, b"chunK"), ChunkMatch::No);
        assert!(alone
            .chain(&ContentKey::from_bytes([1; 32]), &art(), 1)
            .is_none());

        // A fleet of 2 devices keeps 512 bytes: not a chunk of 600.
        let pool = SharedManifests::for_fleet(2);
        let big = [7u8; 600];
        let c = checks(&[&big], Some(pool.known_bytes.clone()));
        assert_eq!(c.check(0, &big), ChunkMatch::Hashed);
        assert_eq!(c.check(0, &[8u8; 600]), ChunkMatch::No);
        assert_eq!(pool.known_bytes.used(), 0);
        let small = checks(&[b"chunk"], Some(pool.known_bytes.clone()));
        assert_eq!(
            small.check(0, b"chunk"),
            ChunkMatch::Known,
            "what fits is kept"
        );
    }

    fn art() -> ArtifactId {
        ArtifactId::new("fw-2.0").unwrap()
    }

    #[test]
    fn each_content_key_has_its_own_chain() {
        let c = checks(&[b"chunk"], Some(Arc::new(Budget::new(MAX_KNOWN_BYTES))));
        let (k1, k2) = (
            ContentKey::from_bytes([1; 32]),
            ContentKey::from_bytes([2; 32]),
        );
        let a = c.chain(&k1, &art(), 1).unwrap();
        assert!(Arc::ptr_eq(&a, &c.chain(&k1, &art(), 1).unwrap()));
        assert!(!Arc::ptr_eq(&a, &c.chain(&k2, &art(), 1).unwrap()));
        assert!(!Arc::ptr_eq(&a, &c.chain(&k1, &art(), 2).unwrap()));
        let other = ArtifactId::new("fw-3.0").unwrap();
        assert!(!Arc::ptr_eq(&a, &c.chain(&k1, &other, 1).unwrap()));
        // Four chains are kept; a fifth key gets none and its device hashes for itself.
        assert!(c
            .chain(&ContentKey::from_bytes([3; 32]), &art(), 1)
            .is_none());
    }
}
