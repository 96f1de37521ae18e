//! What reaches the engine from outside: device and operator publishes (from `mqtt`), device
//! sessions the front established (from `server`), and the signer's answers (from `signer`).
//! Its own module so that none of those needs the engine, nor the engine them, to name an event.

use aloft_proto::messages::RenewalError;
use aloft_proto::{DeviceId, OperatorId};
use bytes::Bytes;

/// Something that happened outside the engine.
#[derive(Debug)]
pub enum Inbound {
    Status {
        device: DeviceId,
        payload: Bytes,
    },
    ChunkRequest {
        device: DeviceId,
        payload: Bytes,
    },
    Health {
        device: DeviceId,
        payload: Bytes,
    },
    Admin {
        operator: OperatorId,
        payload: Bytes,
        /// The request's signature, checked on the link's task (`admin::auth`).
        auth: crate::admin::auth::AdminAuth,
    },
    /// A certificate renewal request (since 1.1).
    Csr {
        device: DeviceId,
        payload: Bytes,
    },
    /// A device completed an mTLS handshake and CONNECT through the front.
    DeviceSeen(SeenDevice),
    /// The renewal signer's answer to a renewal this engine handed it.
    Signed(Signed),
    /// The orchestrator's broker link reconnected after a failure.
    LinkRestored,
    /// (Replicas) A publish this replica received on a device's or operator's topic other
    /// than a chunk request, as received: it goes to the replicas' inbox, not to an engine.
    Received {
        topic: String,
        payload: Bytes,
    },
    /// (Replicas, the leader) A row of the replicas' inbox, for the engine to apply once.
    Inbox(InboxRow),
}

/// A row of the replicas' inbox (`replica::inbox`).
#[derive(Debug, Clone)]
pub struct InboxRow {
    pub id: i64,
    /// `replica::inbox::KIND_MESSAGE` or `KIND_SERVED`.
    pub kind: i16,
    pub topic: String,
    pub payload: Bytes,
}

/// A device identity taken from a verified certificate.
#[derive(Debug, Clone)]
pub struct SeenDevice {
    pub id: DeviceId,
    pub x25519_public: [u8; 32],
    pub not_before: i64,
    pub not_after: i64,
    /// The certificate's serial number, big-endian.
    pub serial: Vec<u8>,
}

/// What the signer made of a `crate::signer::SignRequest`.
#[derive(Debug)]
pub enum SignOutcome {
    /// The certificate (PEM), already in the issuance ledger.
    Issued {
        cert: String,
        serial: String,
    },
    Refused(RenewalError, String),
}

/// The signer's answer to the engine.
#[derive(Debug)]
pub struct Signed {
    pub device: DeviceId,
    pub outcome: SignOutcome,
}
