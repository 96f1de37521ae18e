//! The Aloft orchestrator: it authenticates devices at its mTLS front, publishes signed jobs,
//! serves sealed chunks, and tracks every device's update state durably. Devices report, the
//! orchestrator decides, devices obey. The `aloft` binary (server and operator CLI) is a thin
//! `main.rs` over this library.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backup;
pub mod board;
pub mod broker_config;
pub mod broker_rules;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod engine;
pub mod fleet;
pub mod inbound;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod ops;
pub mod replica;
pub mod rollout;
pub mod server;
pub mod signer;
pub mod store;
pub mod trust;

pub use config::ServeConfig;
pub use server::{start, Running, ServeError};
