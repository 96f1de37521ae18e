//! The orchestrator's MQTT client: one rumqttc v5 connection to the broker (the embedded one on
//! loopback, or an external one), turning subscribed publishes into engine [`Inbound`] events and
//! engine output into publishes. The admin client (`admin::client`) is the only other user of rumqttc.

use std::sync::Arc;
use std::time::Duration;

use aloft_broker::{DeviceBound, DeviceMessage, DeviceTopic, DirectRoutes};
use aloft_proto::topics::{self, Inbound as Topic};
use aloft_proto::DeviceId;
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

/// Publishes on behalf of the engine: device-bound topics on the front's device road when
/// there is one (the embedded default), everything else through the broker.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    devices: Option<Arc<DirectRoutes>>,
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
        if let Some(road) = &self.devices {
            if let Some((device, kind)) = device_bound(&topic) {
                // Not connected or not reading: the device's own timers recover (it resends
                // its report, re-requests chunks); jobs are kept retained whatever happens.
                if let Err(e) = road.publish(&device, kind, Bytes::from(payload), retain) {
                    debug!(%device, ?kind, error = %e, "device-bound message not delivered");
                }
                return Ok(());
            }
        }
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|_| LinkClosed)
    }

    /// Sends device-bound messages on `road` from now on instead of through the broker.
    #[must_use]
    pub fn with_device_road(mut self, road: Arc<DirectRoutes>) -> Self {
        self.devices = Some(road);
        self
    }
}

/// The device and kind of a topic the orchestrator sends devices on (PROTOCOL.md §4.1).
fn device_bound(topic: &str) -> Option<(DeviceId, DeviceBound)> {
    let rest = topic.strip_prefix(topics::ROOT)?.strip_prefix("/d/")?;
    let (id, leaf) = rest.split_once('/')?;
    let kind = match leaf {
        "job" => DeviceBound::Job,
        "ack" => DeviceBound::Ack,
        "cert" => DeviceBound::Cert,
        "chunk/resp" => DeviceBound::ChunkResponse,
        _ => return None,
    };
    Some((DeviceId::new(id).ok()?, kind))
}

/// A device's message from the front's device road, as an engine event.
pub fn from_device(m: DeviceMessage) -> Inbound {
    let (device, payload) = (m.device, m.payload);
    match m.topic {
        DeviceTopic::Status => Inbound::Status { device, payload },
        DeviceTopic::ChunkRequest => Inbound::ChunkRequest { device, payload },
        DeviceTopic::Health => Inbound::Health { device, payload },
        DeviceTopic::Csr => Inbound::Csr { device, payload },
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
/// resubscribes after every reconnect. The returned `watch` is true while the link is up: from
/// each SUBACK until the next link error.
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
                    // Down until the next SUBACK: what `aloft_broker_up` reports.
                    let _ = ready_tx.send(false);
                    warn!(error = %e, "orchestrator link error; reconnecting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    (
        Publisher {
            client,
            devices: None,
        },
        ready_rx,
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_bound_topics_are_recognised_and_nothing_else() {
        let d = DeviceId::new("dev-7").unwrap();
        for (topic, kind) in [
            (topics::job(&d), DeviceBound::Job),
            (topics::ack(&d), DeviceBound::Ack),
            (topics::cert(&d), DeviceBound::Cert),
            (topics::chunk_response(&d), DeviceBound::ChunkResponse),
        ] {
            assert_eq!(device_bound(&topic), Some((d.clone(), kind)));
        }
        for other in [
            topics::status(&d),
            topics::chunk_request(&d),
            "aloft/v1/o/alice/reply".to_owned(),
            "aloft/v1/d/bad id/job".to_owned(),
            "aloft/v1/d/dev-7/job/x".to_owned(),
        ] {
            assert_eq!(device_bound(&other), None, "{other}");
        }
    }
}
