//! The MQTT topic layout of protocol v1 (PROTOCOL.md §Topics), as builders and a strict parser.
//!
//! Every topic starts with [`ROOT`]. Device topics sit under `aloft/v1/d/{device}/`, operator
//! replies under `aloft/v1/o/{operator}/`, so "a peer may touch only its own subtree" is a prefix
//! test: the broker's ACLs rely on that.

use crate::ids::{ArtifactId, DeviceId, OperatorId};

/// The protocol's topic root; the version in it changes only with an incompatible protocol.
pub const ROOT: &str = "aloft/v1";

/// The topic prefix (with trailing `/`) of everything that belongs to one device.
pub fn device_prefix(id: &DeviceId) -> String {
    format!("{ROOT}/d/{id}/")
}

/// The topic prefix (with trailing `/`) of everything addressed to one operator.
pub fn operator_prefix(id: &OperatorId) -> String {
    format!("{ROOT}/o/{id}/")
}

/// Device → orchestrator: state reports ([`crate::messages::StatusReport`]), QoS 1.
pub fn status(id: &DeviceId) -> String {
    format!("{ROOT}/d/{id}/status")
}

/// Device → orchestrator: application health heartbeats ([`crate::messages::Heartbeat`]), QoS 0.
/// Since protocol 1.1; an orchestrator of 1.0 never subscribed to it.
pub fn health(id: &DeviceId) -> String {
    format!("{ROOT}/d/{id}/health")
}

/// Device → orchestrator: chunk requests ([`crate::messages::ChunkRequest`]), QoS 1.
pub fn chunk_request(id: &DeviceId) -> String {
    format!("{ROOT}/d/{id}/chunk/req")
}

/// Device → orchestrator: certificate renewal requests
/// ([`crate::messages::RenewalRequest`]), QoS 1. Since protocol 1.1.
pub fn csr(id: &DeviceId) -> String {
    format!("{ROOT}/d/{id}/csr")
}

/// Orchestrator → device: renewed certificates or refusals
/// ([`crate::messages::RenewalResponse`]), QoS 1, not retained. Since protocol 1.1.
pub fn cert(id: &DeviceId) -> String {
    format!("{ROOT}/d/{id}/cert")
}

/// Orchestrator → device: the current job ([`crate::messages::Job`]), retained, QoS 1.
pub fn job(id: &DeviceId) -> String {
    format!("{ROOT}/d/{id}/job")
}

/// Orchestrator → device: acknowledgements of state reports, QoS 1.
pub fn ack(id: &DeviceId) -> String {
    format!("{ROOT}/d/{id}/ack")
}

/// Orchestrator → device: chunk frames ([`crate::chunkframe`]), QoS 1.
pub fn chunk_response(id: &DeviceId) -> String {
    format!("{ROOT}/d/{id}/chunk/resp")
}

/// The filter a device subscribes to: its whole subtree.
pub fn device_subscription(id: &DeviceId) -> String {
    format!("{ROOT}/d/{id}/#")
}

/// Orchestrator → everyone: a release's signed manifest, retained.
pub fn manifest(artifact: &ArtifactId) -> String {
    format!("{ROOT}/manifests/{artifact}")
}

/// The prefix (with trailing `/`) of public manifests, readable by every device.
pub fn manifests_prefix() -> String {
    format!("{ROOT}/manifests/")
}

/// Operator → orchestrator: an admin request `op` (MQTT 5 request/response).
pub fn admin_request(operator: &OperatorId, op: &str) -> String {
    format!("{ROOT}/admin/{operator}/{op}")
}

/// The prefix (with trailing `/`) under which `operator` may publish admin requests.
pub fn admin_prefix(operator: &OperatorId) -> String {
    format!("{ROOT}/admin/{operator}/")
}

/// Orchestrator → operator: replies to admin requests (the MQTT 5 response topic).
pub fn operator_reply(operator: &OperatorId) -> String {
    format!("{ROOT}/o/{operator}/reply")
}

/// A topic the orchestrator reads, parsed. Anything else it receives is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Status(DeviceId),
    ChunkRequest(DeviceId),
    Health(DeviceId),
    /// A certificate renewal request (since 1.1).
    Csr(DeviceId),
    Admin {
        operator: OperatorId,
        op: String,
    },
}

/// Why an inbound topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is not under {ROOT}/")]
    NotOurs,
    #[error("unknown topic layout")]
    Unknown,
    #[error("bad identity in topic: {0}")]
    BadId(#[from] crate::ids::IdError),
}

/// Parses a topic the orchestrator subscribes to.
pub fn parse_inbound(topic: &str) -> Result<Inbound, TopicError> {
    let rest = topic
        .strip_prefix(ROOT)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or(TopicError::NotOurs)?;
    let levels: Vec<&str> = rest.split('/').collect();
    match levels.as_slice() {
        ["d", id, "status"] => Ok(Inbound::Status(DeviceId::new(*id)?)),
        ["d", id, "chunk", "req"] => Ok(Inbound::ChunkRequest(DeviceId::new(*id)?)),
        ["d", id, "health"] => Ok(Inbound::Health(DeviceId::new(*id)?)),
        ["d", id, "csr"] => Ok(Inbound::Csr(DeviceId::new(*id)?)),
        ["admin", operator, op] if is_op_name(op) => Ok(Inbound::Admin {
            operator: OperatorId::new(*operator)?,
            op: (*op).to_owned(),
        }),
        _ => Err(TopicError::Unknown),
    }
}

fn is_op_name(op: &str) -> bool {
    !op.is_empty()
        && op.len() <= 32
        && op
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_and_parser_agree() {
        let d = DeviceId::new("dev-1").unwrap();
        assert_eq!(parse_inbound(&status(&d)), Ok(Inbound::Status(d.clone())));
        assert_eq!(
            parse_inbound(&chunk_request(&d)),
            Ok(Inbound::ChunkRequest(d.clone()))
        );
        assert_eq!(parse_inbound(&health(&d)), Ok(Inbound::Health(d.clone())));
        assert_eq!(parse_inbound(&csr(&d)), Ok(Inbound::Csr(d.clone())));
        let o = OperatorId::new("alice").unwrap();
        assert_eq!(
            parse_inbound(&admin_request(&o, "campaign.create")),
            Ok(Inbound::Admin {
                operator: o,
                op: "campaign.create".into()
            })
        );
    }

    #[test]
    fn foreign_and_malformed_topics_are_refused() {
        for t in [
            "x/v1/d/a/status",
            "aloft/v1/d/a/status/extra",
            "aloft/v1/d/+/status",
            "aloft/v1/d//status",
            "aloft/v1/admin/alice/Bad Op",
            "aloft/v1/d/a/job",
            "aloft/v1/d/a/cert",
            "aloft/v1/d/a/csr/x",
        ] {
            assert!(parse_inbound(t).is_err(), "{t} accepted");
        }
    }
}
