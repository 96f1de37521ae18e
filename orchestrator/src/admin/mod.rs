//! The admin protocol between operators and the orchestrator: wire types, and the operator-side
//! client the CLI uses, and the signatures that tell the orchestrator who sent a request.

pub mod auth;
pub mod client;
pub mod wire;
