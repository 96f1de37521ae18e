//! The identities connected through the front right now: at most one live connection each,
//! with the serial number of the certificate each connected with, so that a new CRL can end the
//! sessions of the certificates it revokes, and (1.5) the role of each operator's certificate, so
//! that the orchestrator checks an admin request against the certificate it came in under.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use aloft_certs::OperatorRole;
use tokio::sync::Notify;

use super::identity::Peer;

#[derive(Debug, Clone)]
struct Entry {
    serial: u64,
    peer_addr: SocketAddr,
    /// Serial number of the client certificate (big-endian); `None` on the insecure listener.
    cert_serial: Option<Vec<u8>>,
    /// The operator role the certificate names (`None`: not an operator, or an operator
    /// certificate issued before roles existed).
    operator_role: Option<OperatorRole>,
    /// Woken to end the connection (its certificate was revoked).
    kill: Arc<Notify>,
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
        cert_serial: Option<Vec<u8>>,
        operator_role: Option<OperatorRole>,
    ) -> Result<Claim, SocketAddr> {
        let mut live = self.lock();
        if let Some(existing) = live.get(peer) {
            return Err(existing.peer_addr);
        }
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let kill = Arc::new(Notify::new());
        live.insert(
            peer.clone(),
            Entry {
                serial,
                peer_addr,
                cert_serial,
                operator_role,
                kill: kill.clone(),
            },
        );
        Ok(Claim {
            registry: Arc::clone(self),
            peer: peer.clone(),
            serial,
            kill,
        })
    }

    /// Ends every live connection whose certificate serial `revoked` says is revoked; returns
    /// who was told to go. Each connection closes itself (DISCONNECT, then frees its identity).
    pub fn disconnect_revoked(&self, revoked: impl Fn(&[u8]) -> bool) -> Vec<Peer> {
        let live = self.lock();
        let mut dropped = Vec::new();
        for (peer, entry) in live.iter() {
            if entry.cert_serial.as_deref().is_some_and(&revoked) {
                // `notify_one` keeps a permit if the connection is not waiting yet, so a session
                // between its claim and its relay loop is still ended.
                entry.kill.notify_one();
                dropped.push(peer.clone());
            }
        }
        dropped
    }

    /// The role of the certificate `peer` is connected with: `None` if it is not connected,
    /// `Some(None)` if its certificate names no operator role.
    pub fn operator_role(&self, peer: &Peer) -> Option<Option<OperatorRole>> {
        self.lock().get(peer).map(|e| e.operator_role)
    }

    /// The serial number of the certificate `peer` is connected with, if it is connected.
    pub fn cert_serial(&self, peer: &Peer) -> Option<Vec<u8>> {
        self.lock().get(peer).and_then(|e| e.cert_serial.clone())
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
    kill: Arc<Notify>,
}

impl Claim {
    /// Notified when the registry ends this connection ([`Registry::disconnect_revoked`]).
    pub(crate) fn kill_signal(&self) -> Arc<Notify> {
        self.kill.clone()
    }
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
        let claim = reg.claim(&p, a, None, None).unwrap();
        assert_eq!(reg.claim(&p, b, None, None).unwrap_err(), a);
        assert!(reg.is_connected(&p));
        assert_eq!(reg.peer_addr(&p), Some(a));
        drop(claim);
        assert!(reg.is_empty());
        let _again = reg.claim(&p, b, None, None).unwrap();
        assert_eq!(reg.connected(), vec![p]);
    }

    #[test]
    fn an_operators_role_is_the_role_of_the_certificate_it_is_connected_with() {
        let reg = Arc::new(Registry::default());
        let addr: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let alice = Peer::Operator(aloft_proto::OperatorId::new("alice").unwrap());
        assert_eq!(reg.operator_role(&alice), None);
        let claim = reg
            .claim(&alice, addr, Some(vec![1]), Some(OperatorRole::Viewer))
            .unwrap();
        assert_eq!(reg.operator_role(&alice), Some(Some(OperatorRole::Viewer)));
        drop(claim);
        let _legacy = reg.claim(&alice, addr, Some(vec![2]), None).unwrap();
        assert_eq!(reg.operator_role(&alice), Some(None));
    }

    #[tokio::test]
    async fn only_connections_of_revoked_serials_are_told_to_go() {
        let reg = Arc::new(Registry::default());
        let addr: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let revoked = Peer::Device(DeviceId::new("dev-1").unwrap());
        let kept = Peer::Device(DeviceId::new("dev-2").unwrap());
        let plain = Peer::Device(DeviceId::new("dev-3").unwrap());
        let a = reg.claim(&revoked, addr, Some(vec![1]), None).unwrap();
        let b = reg.claim(&kept, addr, Some(vec![2]), None).unwrap();
        let _c = reg.claim(&plain, addr, None, None).unwrap();
        assert_eq!(reg.cert_serial(&revoked), Some(vec![1]));
        assert_eq!(reg.disconnect_revoked(|s| s == [1]), vec![revoked]);
        // The notice waits for the connection even if it was not listening yet.
        let (a, b) = (a.kill_signal(), b.kill_signal());
        tokio::time::timeout(std::time::Duration::from_secs(5), a.notified())
            .await
            .unwrap();
        let not_killed =
            tokio::time::timeout(std::time::Duration::from_millis(50), b.notified()).await;
        assert!(not_killed.is_err());
    }
}
