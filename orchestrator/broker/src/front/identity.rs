//! Who is on the other end of a front connection: the identity taken from a verified client
//! certificate (or, on the insecure plain listener, from the CONNECT client id).

use std::fmt;

use aloft_certs::{CertIdentity, Role};
use aloft_proto::{DeviceId, OperatorId};

/// A connected peer's identity. Servers are never peers: a server certificate presented as a
/// client certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Device(DeviceId),
    Operator(OperatorId),
}

/// Why a certificate does not name a peer we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate identity could not be parsed: {0}")]
    Unparsable(String),
    #[error("server and orchestrator certificates cannot connect to the front")]
    ServerRole,
    #[error("certificate names no valid {0} id")]
    BadId(&'static str),
}

impl Peer {
    /// The peer named by a verified client certificate (DER).
    pub fn from_certificate(cert_der: &[u8]) -> Result<Peer, IdentityError> {
        let identity = aloft_certs::parse_identity(cert_der)
            .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        Peer::from_identity(&identity)
    }

    /// The peer named by an already parsed certificate identity.
    pub fn from_identity(identity: &CertIdentity) -> Result<Peer, IdentityError> {
        match identity.role {
            Role::Device => identity
                .device_id()
                .map(Peer::Device)
                .ok_or(IdentityError::BadId("device")),
            Role::Operator => identity
                .operator_id()
                .map(Peer::Operator)
                .ok_or(IdentityError::BadId("operator")),
            // The orchestrator's own client certificate is for external brokers; the front
            // serves devices and operators only.
            Role::Server | Role::Orchestrator => Err(IdentityError::ServerRole),
        }
    }

    /// The identity string: the certificate CN, and the MQTT client id the peer must use.
    pub fn id(&self) -> &str {
        match self {
            Peer::Device(d) => d.as_str(),
            Peer::Operator(o) => o.as_str(),
        }
    }

    /// The client id the front uses for this peer on the backend.
    ///
    /// Namespaced by role with a `:` (which no valid id contains) so that a device certificate
    /// for `aloft-orchestrator`, or a device and an operator sharing a name, can never take over
    /// another backend session: rumqttd drops the older of two connections with one client id.
    pub fn backend_client_id(&self) -> String {
        match self {
            Peer::Device(d) => format!("device:{d}"),
            Peer::Operator(o) => format!("operator:{o}"),
        }
    }

    pub fn role_name(&self) -> &'static str {
        match self {
            Peer::Device(_) => "device",
            Peer::Operator(_) => "operator",
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role_name(), self.id())
    }
}
