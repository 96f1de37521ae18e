//! The Aloft wire contract, shared by the orchestrator, the operator CLI and the device agent:
//! identities, the topic layout, message encodings, signed manifests and the envelope crypto.
//! Nothing here does I/O; PROTOCOL.md is this crate in prose.
#![forbid(unsafe_code)]

pub mod chunkframe;
pub mod crypto;
pub mod delta;
pub mod ids;
pub mod manifest;
pub mod messages;
pub mod origin;
pub mod precondition;
pub mod release;
pub mod topics;
pub mod trust;

pub use ids::{ArtifactId, CampaignId, DeviceId, IdError, OperatorId, SecurityVersion};
pub use messages::{DeviceState, Reason};
