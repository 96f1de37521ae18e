//! The table of unauthenticated sockets: every socket the TLS listener accepts holds one entry
//! from accept until its handshake ends, and new sockets never wait for room.
//!
//! Room is made instead of waited for: a source address at its limit gives up its own oldest
//! socket that has sent nothing yet (or the new socket is refused, if all of its sockets are
//! mid-handshake), and a full table gives up its oldest silent socket (or, if none is silent,
//! its oldest). So sockets that hold a slot and say nothing, wherever they come from, can delay
//! a device by at most one eviction, never by a queue. Decisions only; the caller closes
//! sockets and counts.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Why a pending socket was closed to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Eviction {
    /// Its source address was at `max_handshakes_per_source`.
    SourceAtLimit,
    /// The table was full.
    TableFull,
}

impl Eviction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Eviction::SourceAtLimit => "source address at its handshake limit",
            Eviction::TableFull => "handshake table full",
        }
    }
}

/// A socket closed to admit another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Evicted {
    pub(crate) addr: SocketAddr,
    /// It had not sent a byte yet.
    pub(crate) silent: bool,
    pub(crate) why: Eviction,
}

/// The new socket was refused: its source holds its limit of sockets that all sent something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused;

#[derive(Debug)]
struct Pending {
    addr: SocketAddr,
    /// Fired (or dropped) to tell the socket's task it was evicted.
    evict: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct Inner {
    next_seq: u64,
    /// Sockets that have sent nothing yet, oldest first (sequence numbers follow accept order).
    silent: BTreeMap<u64, Pending>,
    /// Sockets whose handshake is under way, oldest first.
    spoke: BTreeMap<u64, Pending>,
    /// Entries per source address; an address with none has no key.
    by_source: HashMap<IpAddr, usize>,
}

impl Inner {
    fn remove(&mut self, seq: u64) -> Option<(Pending, bool)> {
        let (pending, silent) = match self.silent.remove(&seq) {
            Some(p) => (p, true),
            None => (self.spoke.remove(&seq)?, false),
        };
        let ip = pending.addr.ip();
        if let Some(n) = self.by_source.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&ip);
            }
        }
        Some((pending, silent))
    }

    fn evict(&mut self, seq: u64, why: Eviction) -> Option<Evicted> {
        let (pending, silent) = self.remove(seq)?;
        let _ = pending.evict.send(());
        Some(Evicted {
            addr: pending.addr,
            silent,
            why,
        })
    }
}

/// Unauthenticated sockets, bounded in total and per source address.
#[derive(Debug)]
pub(crate) struct PendingTable {
    capacity: usize,
    per_source: usize,
    // A std mutex: every critical section is a few map operations over at most `capacity`
    // entries, with no await inside.
    inner: Mutex<Inner>,
}

impl PendingTable {
    pub(crate) fn new(capacity: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            per_source: per_source.max(1),
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the maps consistent before anything that could panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a socket just accepted from `addr`, evicting another if that is what makes room.
    /// The receiver resolves if this socket is evicted in turn.
    pub(crate) fn admit(self: &Arc<Self>, addr: SocketAddr) -> Result<Admitted, Refused> {
        let mut inner = self.lock();
        let ip = addr.ip();
        let mut evicted = None;
        if inner.by_source.get(&ip).copied().unwrap_or(0) >= self.per_source {
            let own_silent = inner
                .silent
                .iter()
                .find(|(_, p)| p.addr.ip() == ip)
                .map(|(seq, _)| *seq);
            let Some(seq) = own_silent else {
                return Err(Refused);
            };
            evicted = inner.evict(seq, Eviction::SourceAtLimit);
        } else if inner.silent.len() + inner.spoke.len() >= self.capacity {
            let oldest = inner
                .silent
                .keys()
                .next()
                .or_else(|| inner.spoke.keys().next())
                .copied();
            if let Some(seq) = oldest {
                evicted = inner.evict(seq, Eviction::TableFull);
            }
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let (evict, evicted_rx) = oneshot::channel();
        inner.silent.insert(seq, Pending { addr, evict });
        *inner.by_source.entry(ip).or_insert(0) += 1;
        let slot = Slot {
            table: Arc::clone(self),
            seq,
        };
        Ok((slot, evicted_rx, evicted))
    }

    /// Sockets held now: (silent, mid-handshake).
    pub(crate) fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.silent.len(), inner.spoke.len())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let (silent, spoke) = self.counts();
        silent + spoke
    }
}

/// An admitted socket's entry, the signal that it was evicted, and whom it displaced.
pub(crate) type Admitted = (Slot, oneshot::Receiver<()>, Option<Evicted>);

/// One socket's entry; dropping it frees the entry (unless it was evicted already).
#[derive(Debug)]
pub(crate) struct Slot {
    table: Arc<PendingTable>,
    seq: u64,
}

impl Slot {
    /// The socket sent its first bytes: from now on it is evicted only after every silent one.
    pub(crate) fn spoke(&self) {
        let mut inner = self.table.lock();
        if let Some(p) = inner.silent.remove(&self.seq) {
            inner.spoke.insert(self.seq, p);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.lock().remove(self.seq);
    }
}

/// Lets through at most one log line per `every`, and says how many were held back.
#[derive(Debug)]
pub(crate) struct LogLimit {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(lines held back since the last one)` if a line may be logged now.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                let held = state.1;
                *state = (Some(now), 0);
                Some(held)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    #[test]
    fn a_full_table_evicts_its_oldest_silent_socket_before_any_that_spoke() {
        let t = PendingTable::new(3, 10);
        let (a, _, _) = t.admit(addr([10, 0, 0, 1], 1)).unwrap();
        let (b, mut b_evicted, _) = t.admit(addr([10, 0, 0, 2], 2)).unwrap();
        let (c, _, _) = t.admit(addr([10, 0, 0, 3], 3)).unwrap();
        a.spoke();
        let (_d, _, ev) = t.admit(addr([10, 0, 0, 4], 4)).unwrap();
        assert_eq!(
            ev,
            Some(Evicted {
                addr: addr([10, 0, 0, 2], 2),
                silent: true,
                why: Eviction::TableFull
            })
        );
        assert!(b_evicted.try_recv().is_ok());
        assert_eq!(t.len(), 3);
        // With nobody silent left but d, d goes next; then the oldest that spoke.
        c.spoke();
        let (_e, _, ev) = t.admit(addr([10, 0, 0, 5], 5)).unwrap();
        assert_eq!(ev.map(|e| e.addr), Some(addr([10, 0, 0, 4], 4)));
        drop(b);
        assert_eq!(t.len(), 3, "dropping an evicted slot frees nothing twice");
    }

    #[test]
    fn a_source_at_its_limit_gives_up_its_own_silent_socket_or_is_refused() {
        let t = PendingTable::new(100, 2);
        let (x, _, _) = t.admit(addr([10, 0, 0, 9], 1)).unwrap();
        let (y, _, _) = t.admit(addr([10, 0, 0, 1], 1)).unwrap();
        let (z, _, _) = t.admit(addr([10, 0, 0, 1], 2)).unwrap();
        let (w, _, ev) = t.admit(addr([10, 0, 0, 1], 3)).unwrap();
        let ev = ev.unwrap();
        assert_eq!(
            (ev.addr, ev.why),
            (addr([10, 0, 0, 1], 1), Eviction::SourceAtLimit)
        );
        drop(y);
        z.spoke();
        w.spoke();
        assert_eq!(t.admit(addr([10, 0, 0, 1], 4)).err(), Some(Refused));
        // Other sources are not affected, and a finished handshake frees its source's room.
        assert!(t.admit(addr([10, 0, 0, 2], 1)).is_ok());
        drop(z);
        assert!(t.admit(addr([10, 0, 0, 1], 5)).is_ok());
        drop(x);
    }

    #[test]
    fn log_limit_lets_one_line_through_per_period_and_counts_the_rest() {
        let l = LogLimit::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        let l = LogLimit::new(Duration::ZERO);
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
    }
}
