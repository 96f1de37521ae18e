//! Aloft's device agent and its simulator.
//!
//! The agent has the seam of drogue-iot's embedded-update: the [`transport`] talks MQTT (through
//! the crate's own session, `mqtt`) on one side, [`slots`] store firmware on the other, and between them [`update`] decides, as a sans-I/O
//! state machine that takes the time as a parameter. [`store`] keeps the device's record across
//! restarts (in a simulated fleet, in [`fleet_files`] shared by all devices), [`identity`] its keys and certificate, and [`renewal`] renews that certificate over MQTT
//! before it expires. [`sim`] runs thousands of agents in one
//! process, one tokio task per device.
#![forbid(unsafe_code)]

pub mod fleet_files;
pub mod identity;
mod mqtt;
pub mod origin;
pub mod renewal;
pub mod sim;
pub mod slots;
pub mod store;
pub mod transport;
pub mod update;

pub use identity::DeviceIdentity;
pub use renewal::{RenewalConfig, Renewer};
pub use sim::{ConditionModel, DeviceView, Faults, Fleet, FleetConfig, FleetCounters};
pub use slots::{FileFlash, Flash, FlashError, MemoryFlash, PowerOn, SlotId, SlotState, SlotTable};
pub use store::{
    DeviceRecord, DeviceStore, JsonFileStore, MemoryStore, RecordFileStore, StoreError,
};
pub use transport::{Device, DeviceTls, Hooks, NoHooks, TransportConfig};
pub use update::{
    AgentConfig, AgentStats, AlwaysHealthy, AppHealth, HealthCheck, HealthStatus, Input, OutTopic,
    Output, Persist, UpdateAgent,
};
