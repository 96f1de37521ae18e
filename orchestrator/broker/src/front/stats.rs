//! The front's counters: plain atomics that the orchestrator's metrics module reads (this crate
//! knows no metrics library).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

macro_rules! stats {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Counters of the front since it started. All are totals except `connections_active`.
        #[derive(Debug, Default)]
        pub struct FrontStats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A copy of [`FrontStats`] at one moment.
        #[derive(Debug, Default, Clone, PartialEq, Eq)]
        pub struct FrontStatsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl FrontStats {
            /// Reads every counter (each individually; the set is not one atomic snapshot).
            pub fn snapshot(&self) -> FrontStatsSnapshot {
                FrontStatsSnapshot {
                    $( $name: self.$name.load(Ordering::Relaxed), )*
                }
            }
        }
    };
}

stats! {
    /// Gauge: sockets the front holds open, from accept to close (handshaking ones included).
    connections_active,
    /// Sockets closed at once because `max_connections` were already open.
    connections_over_limit,
    /// TLS handshakes that completed with a verified client certificate.
    handshakes_ok,
    /// TLS handshakes that failed (no, untrusted, expired or revoked certificate; not TLS).
    handshakes_failed,
    /// Unauthenticated sockets closed because they sent nothing within `first_byte_timeout_ms`
    /// or did not finish the TLS handshake within `handshake_timeout_ms`.
    handshakes_timed_out,
    /// New sockets closed at once because their source address already held
    /// `max_handshakes_per_source` unfinished handshakes that had all sent something.
    handshakes_refused_per_source,
    /// Unfinished handshakes closed to make room for a new socket: the oldest silent one (else
    /// the oldest) of a full table, or of a source address at its limit.
    handshakes_evicted,
    /// Verified certificates whose identity we refuse (server role, unparsable subject).
    certificates_refused,
    /// Connections that sent no CONNECT in time, or something else first.
    connects_timed_out,
    /// CONNECTs refused because the client id is not the certificate's identity.
    refused_bad_client_id,
    /// CONNECTs refused because the same identity is already connected.
    refused_duplicate_identity,
    /// CONNECTs refused for a protocol other than MQTT 5.
    refused_protocol,
    /// CONNECTs (or first packets) that were malformed.
    refused_malformed,
    /// CONNECTs refused because their Will is not allowed by the ACL.
    refused_not_authorized,
    /// CONNECTs the backend did not accept or could not be reached for.
    refused_backend,
    /// Sessions established (CONNACK success): devices served by the front, operators relayed.
    sessions_established,
    /// PUBLISHes refused by the ACL (the connection is closed).
    acl_denied_publish,
    /// SUBSCRIBEs refused by the ACL (the connection is closed).
    acl_denied_subscribe,
    /// Topic filters refused with SUBACK 0x97 because their session had used its
    /// `max_subscriptions_per_session` (the connection stays up).
    subscriptions_over_quota,
    /// Packets larger than the peer's limit (the connection is closed).
    oversized_packets,
    /// Malformed packets after CONNECT (the connection is closed).
    malformed_packets,
    /// Sessions closed because the client was silent for 1.5 × its keep-alive.
    keep_alive_timeouts,
    /// Live sessions ended because a new CRL revoked their certificate.
    sessions_revoked,
    /// CRLs applied while running (`FrontContext::apply_crl`).
    crl_reloads,
    /// PUBLISHes devices sent on their own topics, handed to the orchestrator (device road).
    device_messages,
    /// Device QoS 0 PUBLISHes (heartbeats) and Wills dropped because the orchestrator's inbox
    /// was full.
    device_inbox_full,
    /// Packets not sent to a device because they exceed the Maximum Packet Size it declared.
    device_packets_over_client_max,
    /// Bytes of complete MQTT packets received from clients.
    bytes_in,
    /// Bytes written to clients.
    bytes_out,
}

impl FrontStats {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Holds one `connections_active` slot for as long as it lives.
pub(crate) struct ActiveGuard(Arc<FrontStats>);

impl ActiveGuard {
    pub(crate) fn new(stats: Arc<FrontStats>) -> Self {
        FrontStats::inc(&stats.connections_active);
        Self(stats)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}
