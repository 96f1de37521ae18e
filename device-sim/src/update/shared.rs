//! One copy of each signed manifest, and of its decoded chunk digests, for all the agents of
//! one process. Every device of a campaign receives the same signed manifest (several KiB of
//! base64 naming every chunk's digest), keeps it in its record for as long as the campaign runs
//! and holds the digests while it downloads; a simulator with 10,000 devices held 10,000 copies
//! of each. Sharing identical bytes changes nothing any device decides: each still verifies the
//! manifest itself, and the digests are decoded from the verified manifest's own text.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use aloft_proto::manifest::{Manifest, SignedManifest};

/// Manifests held at most; past it, those no agent holds any more are dropped first, and a
/// manifest that finds no room is simply not shared.
pub const MAX_SHARED: usize = 64;

/// The manifests shared by a process's agents (see the module doc).
#[derive(Debug, Default)]
pub struct SharedManifests {
    held: Mutex<HashSet<Arc<str>>>,
    /// Decoded digests by the manifest's `chunk_sha256` text, while some download holds them.
    digests: Mutex<HashMap<String, Weak<[[u8; 32]]>>>,
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
