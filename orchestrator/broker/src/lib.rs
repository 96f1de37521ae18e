//! Aloft's device-facing MQTT edge.
//!
//! Two halves: [`embedded`] runs rumqttd on a loopback listener that only holders of a
//! per-broker secret can use, and [`front`] is the mTLS listener devices and operators actually
//! reach. The front binds each connection to the identity in its client certificate and checks
//! every PUBLISH and SUBSCRIBE against that identity's topics; it serves devices' sessions
//! itself on the device road ([`front::direct`]) and relays operators' to the embedded broker.
//! rumqttd alone would do none of this (see DESIGN.md, "Facts about the dependencies").
//!
//! Invariant: only this crate knows rumqttd; nothing here knows the orchestrator's store,
//! rollout engine or metrics registry (the orchestrator reads [`front::FrontStats`]).

#![forbid(unsafe_code)]

pub mod embedded;
pub mod front;

pub use embedded::{BackendAddr, BackendSecret, BrokerConfig, EmbeddedBroker};
pub use front::direct::{DeliverError, DeviceBound, DeviceMessage, DeviceTopic, DirectRoutes};
pub use front::{
    serve, serve_plain_insecure, FrontConfig, FrontContext, FrontStats, FrontStatsSnapshot, Peer,
    PendingHandshakes, Registry, SessionHook,
};

/// What can go wrong while starting the broker or setting up the front.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid broker configuration: {0}")]
    Config(String),
    #[error("could not generate the backend secret: {0}")]
    Random(String),
    #[error("i/o error while starting the broker: {0}")]
    Io(#[from] std::io::Error),
    #[error("embedded broker did not become ready after {attempts} attempts: {last}")]
    NotReady { attempts: u32, last: String },
}
