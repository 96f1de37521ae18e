//! Replicas (issue 12): several `aloft serve` processes on one PostgreSQL store and one
//! external broker, sharing the fleet's traffic through MQTT 5 shared subscriptions.
//!
//! One applier, many intakes. Every replica takes its share of the devices' and operators'
//! messages: chunk requests it answers itself (`chunks`), everything else it writes to the
//! replicas' inbox (`inbox`). The replica holding the leader lease runs the engine, which
//! reads the inbox in order and applies each row once, deleting it in the fenced commit that
//! makes its effects durable; its acknowledgements, jobs and replies then go out through the
//! broker to wherever the device or operator is connected. So per-device order and
//! idempotency hold across replicas by construction (one process applies, under a token that
//! a stale one cannot commit with), the audit chain has one writer, and a leader that dies
//! leaves its unapplied rows to the next.
//!
//! `route` is the dispatch of a replica's broker link (`router`).

pub mod chunks;
pub mod inbox;
pub mod security;

use tokio::sync::mpsc;
use tracing::debug;

use crate::inbound::Inbound;

/// Where a replica's broker link hands what it receives.
pub struct Router {
    pub chunks: chunks::ChunkServer,
    pub inbox: inbox::InboxWriter,
    /// The engine's channel, once this replica leads: the link's own events (a reconnect).
    pub engine: tokio::sync::watch::Receiver<Option<mpsc::Sender<Inbound>>>,
}

impl Router {
    /// Runs until the link stops.
    pub async fn run(self, mut rx: mpsc::Receiver<Inbound>) {
        while let Some(ev) = rx.recv().await {
            match ev {
                Inbound::ChunkRequest { device, payload } => self.chunks.request(device, payload),
                Inbound::Received { topic, payload } => {
                    if !self.inbox.message(topic, payload).await {
                        debug!("inbox writer stopped; the router exits");
                        return;
                    }
                }
                other => {
                    let engine = self.engine.borrow().clone();
                    if let Some(engine) = engine {
                        let _ = engine.send(other).await;
                    }
                }
            }
        }
    }
}
