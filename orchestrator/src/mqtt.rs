//! The orchestrator's MQTT client: one rumqttc v5 connection to the broker (the embedded one on
//! loopback, or an external one), turning subscribed publishes into engine [`Inbound`] events and
//! engine output into publishes. The admin client (`admin::client`) is the only other user of rumqttc.

use std::time::Duration;

use aloft_proto::topics::{self, Inbound as Topic};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::inbound::Inbound;

/// Where and as whom the orchestrator connects.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: String,
    pub password: String,
    /// Largest packet accepted from the broker (admin uploads carry chunks).
    pub max_packet_bytes: u32,
}

/// Publishes on behalf of the engine.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
}

/// Why a publish failed: the link's request queue is gone, i.e. the event loop stopped.
#[derive(Debug, thiserror::Error)]
#[error("mqtt link is closed")]
pub struct LinkClosed;

impl Publisher {
    pub async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), LinkClosed> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|_| LinkClosed)
    }
}

/// The filters the orchestrator subscribes to.
fn subscriptions() -> [String; 5] {
    [
        format!("{}/d/+/status", topics::ROOT),
        format!("{}/d/+/chunk/req", topics::ROOT),
        format!("{}/d/+/health", topics::ROOT),
        format!("{}/d/+/csr", topics::ROOT),
        format!("{}/admin/#", topics::ROOT),
    ]
}

/// Connects and spawns the event loop, which forwards inbound publishes to `tx` and
/// resubscribes after every reconnect. The returned `watch` turns true at the first CONNACK.
pub fn connect(
    cfg: &LinkConfig,
    tx: mpsc::Sender<Inbound>,
    on_reject: impl Fn(&'static str) + Send + 'static,
) -> (Publisher, tokio::sync::watch::Receiver<bool>) {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    // Request/response over small packets: Nagle would add delayed-ACK stalls to each one.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    opts.set_network_options(net);
    opts.set_credentials(cfg.username.clone(), cfg.password.clone())
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true)
        .set_max_packet_size(Some(cfg.max_packet_bytes))
        .set_outgoing_inflight_upper_limit(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let sub_client = client.clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    info!("orchestrator link connected");
                    backoff = Duration::from_millis(100);
                    for f in subscriptions() {
                        if sub_client.subscribe(f, QoS::AtLeastOnce).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(true);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some(event) = route(&p.topic, p.payload) else {
                        on_reject("unknown_topic");
                        continue;
                    };
                    if tx.send(event).await.is_err() {
                        debug!("engine stopped; link exits");
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "orchestrator link error; reconnecting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    (Publisher { client }, ready_rx)
}

fn route(topic: &Bytes, payload: Bytes) -> Option<Inbound> {
    let topic = std::str::from_utf8(topic).ok()?;
    match topics::parse_inbound(topic) {
        Ok(Topic::Status(device)) => Some(Inbound::Status { device, payload }),
        Ok(Topic::ChunkRequest(device)) => Some(Inbound::ChunkRequest { device, payload }),
        Ok(Topic::Health(device)) => Some(Inbound::Health { device, payload }),
        Ok(Topic::Csr(device)) => Some(Inbound::Csr { device, payload }),
        Ok(Topic::Admin { operator, op: _ }) => Some(Inbound::Admin { operator, payload }),
        Err(e) => {
            warn!(topic, error = %e, "publish on an unexpected topic refused");
            None
        }
    }
}
