//! The admin protocol between operators and the orchestrator: wire types, and the operator-side
//! client the CLI uses.

pub mod client;
pub mod wire;
