//! The identities connected through the front right now: at most one live connection each.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::identity::Peer;

#[derive(Debug, Clone, Copy)]
struct Entry {
    serial: u64,
    peer_addr: SocketAddr,
}

/// Connected identities and the address each is connected from.
#[derive(Debug, Default)]
pub struct Registry {
    // A std mutex: every critical section is a map lookup or insert with no await inside.
    live: Mutex<HashMap<Peer, Entry>>,
    next_serial: AtomicU64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<Peer, Entry>> {
        // A panic while holding this lock cannot leave the map half-updated (single
        // insert/remove), so a poisoned lock is still safe to use.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `peer` for a connection from `peer_addr`, or returns the address of the
    /// connection that already holds it.
    pub(crate) fn claim(
        self: &Arc<Self>,
        peer: &Peer,
        peer_addr: SocketAddr,
    ) -> Result<Claim, SocketAddr> {
        let mut live = self.lock();
        if let Some(existing) = live.get(peer) {
            return Err(existing.peer_addr);
        }
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        live.insert(peer.clone(), Entry { serial, peer_addr });
        Ok(Claim {
            registry: Arc::clone(self),
            peer: peer.clone(),
            serial,
        })
    }

    /// Is `peer` connected?
    pub fn is_connected(&self, peer: &Peer) -> bool {
        self.lock().contains_key(peer)
    }

    /// Where `peer` is connected from, if it is.
    pub fn peer_addr(&self, peer: &Peer) -> Option<SocketAddr> {
        self.lock().get(peer).map(|e| e.peer_addr)
    }

    /// Number of connected identities.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every connected identity (a copy).
    pub fn connected(&self) -> Vec<Peer> {
        self.lock().keys().cloned().collect()
    }
}

/// A live connection's hold on its identity; dropping it frees the identity.
#[derive(Debug)]
pub(crate) struct Claim {
    registry: Arc<Registry>,
    peer: Peer,
    serial: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut live = self.registry.lock();
        if live.get(&self.peer).map(|e| e.serial) == Some(self.serial) {
            live.remove(&self.peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_proto::DeviceId;

    #[test]
    fn an_identity_is_held_once_and_freed_when_the_claim_drops() {
        let reg = Arc::new(Registry::default());
        let p = Peer::Device(DeviceId::new("dev-1").unwrap());
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let claim = reg.claim(&p, a).unwrap();
        assert_eq!(reg.claim(&p, b).unwrap_err(), a);
        assert!(reg.is_connected(&p));
        assert_eq!(reg.peer_addr(&p), Some(a));
        drop(claim);
        assert!(reg.is_empty());
        let _again = reg.claim(&p, b).unwrap();
        assert_eq!(reg.connected(), vec![p]);
    }
}
