//! The orchestrator's MQTT client: one rumqttc v5 connection to the broker (the embedded one on
//! loopback, or an external one), turning subscribed publishes into engine [`Inbound`] events and
//! engine output into publishes. The admin client (`admin::client`) is the only other user of rumqttc.

use std::sync::Arc;
use std::time::Duration;

use aloft_broker::{DeviceBound, DeviceMessage, DeviceTopic, DirectRoutes};
use aloft_proto::topics::{self, Inbound as Topic};
use aloft_proto::DeviceId;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::inbound::Inbound;

/// Most QoS 1 publishes the link keeps unacknowledged.
const INFLIGHT: u16 = 1000;

/// Where and as whom the orchestrator connects.
#[derive(Clone)]
pub struct LinkConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// The embedded broker's secret; `None` for an external broker, where the certificate
    /// (in `tls`) is the identity.
    pub credentials: Option<(String, String)>,
    /// TLS with the orchestrator's client certificate (external broker); `None` is plain TCP
    /// to the embedded broker on loopback.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Subscribe to device topics through this MQTT 5 shared-subscription group
    /// (`$share/<group>/...`), so that replicas of the orchestrator could split the load.
    pub share_group: Option<String>,
    /// Largest packet accepted from the broker (admin uploads carry chunks).
    pub max_packet_bytes: u32,
    /// Checks the signatures of admin requests as they arrive, off the engine's task.
    pub admin_auth: Arc<crate::admin::auth::Authenticator>,
    /// One replica among several (`replica`): chunk requests are handed on as usual, every
    /// other publish as received ([`Inbound::Received`]), for the replicas' inbox; the leader
    /// routes it when it applies the row.
    pub replica: bool,
}

/// Publishes on behalf of the engine: device-bound topics on the front's device road when
/// there is one (the embedded default), everything else through the broker.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    devices: Option<Arc<DirectRoutes>>,
    /// Retained publishes (jobs and withdrawals, one per member) go through a writer task of
    /// their own, so that a campaign's thousands of them never hold the engine's task, nor the
    /// replies, acks and chunk frames published after them, while the broker acknowledges
    /// them a few at a time.
    retained: mpsc::Sender<(String, Vec<u8>)>,
}

/// Most retained publishes waiting for the link: a campaign's jobs for a large fleet, and all
/// of them again after a reconnect, fit; beyond it the engine waits.
const RETAINED_QUEUE: usize = 1 << 16;
/// The link's own request queue. Short, so that what the engine publishes directly waits
/// behind at most this many retained publishes, not behind a whole campaign's.
const REQUEST_QUEUE: usize = 256;

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
        if retain {
            return self
                .retained
                .send((topic, payload))
                .await
                .map_err(|_| LinkClosed);
        }
        // Chunk frames carry no state and the device asks again for what it misses: QoS 0, so
        // a broker never stores or redelivers them (PROTOCOL.md §4).
        let qos = match device_bound(&topic) {
            Some((_, DeviceBound::ChunkResponse)) => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        };
        self.client
            .publish(topic, qos, retain, payload)
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

/// The filters the orchestrator subscribes to, each under `$share/<group>/` when it shares.
fn subscriptions(share_group: Option<&str>) -> Vec<String> {
    [
        format!("{}/d/+/status", topics::ROOT),
        format!("{}/d/+/chunk/req", topics::ROOT),
        format!("{}/d/+/health", topics::ROOT),
        format!("{}/d/+/csr", topics::ROOT),
        format!("{}/admin/#", topics::ROOT),
    ]
    .into_iter()
    .map(|f| match share_group {
        Some(g) => format!("$share/{g}/{f}"),
        None => f,
    })
    .collect()
}

/// Exponential backoff with full jitter: a random wait in `[base/2, base]`, so that replicas
/// (and the fleet) do not reconnect in lockstep after a broker restart.
fn jittered(base: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if aloft_proto::crypto::random_bytes(&mut b).is_ok() {
        f64::from(u16::from_be_bytes(b)) / f64::from(u16::MAX)
    } else {
        1.0
    };
    base.mul_f64(0.5 + 0.5 * r)
}

/// Connects and spawns the event loop, which forwards inbound publishes to `tx` and
/// resubscribes after every reconnect. The returned `watch` is true while the link is up: from
/// each SUBACK until the next link error.
pub fn connect(
    cfg: &LinkConfig,
    tx: mpsc::Sender<Inbound>,
    on_reject: impl Fn(&'static str) + Send + 'static,
    on_link: impl Fn(bool) + Send + 'static,
) -> (Publisher, tokio::sync::watch::Receiver<bool>) {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    // Request/response over small packets: Nagle would add delayed-ACK stalls to each one.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    opts.set_network_options(net);
    if let Some((user, password)) = &cfg.credentials {
        opts.set_credentials(user.clone(), password.clone());
    }
    if let Some(tls) = &cfg.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    let share_group = cfg.share_group.clone();
    let admin_auth = cfg.admin_auth.clone();
    let replica = cfg.replica;
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true)
        .set_max_packet_size(Some(cfg.max_packet_bytes))
        .set_outgoing_inflight_upper_limit(INFLIGHT);
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_QUEUE);
    let (retained, mut retained_rx) = mpsc::channel::<(String, Vec<u8>)>(RETAINED_QUEUE);
    let writer = client.clone();
    tokio::spawn(async move {
        while let Some((topic, payload)) = retained_rx.recv().await {
            if writer
                .publish(topic, QoS::AtLeastOnce, true, payload)
                .await
                .is_err()
            {
                // The link is gone for good: the engine's next retained publish fails too.
                break;
            }
        }
    });
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let sub_client = client.clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        let mut connected_before = false;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    info!("orchestrator link connected");
                    backoff = Duration::from_millis(100);
                    // One SUBSCRIBE for every filter, so its SUBACK says the link is usable.
                    // From a task of its own: the request queue may be full of the engine's
                    // publishes from while the link was down, and only this loop drains it.
                    let filters: Vec<Filter> = subscriptions(share_group.as_deref())
                        .into_iter()
                        .map(|f| Filter::new(f, QoS::AtLeastOnce))
                        .collect();
                    let client = sub_client.clone();
                    tokio::spawn(async move {
                        let _ = client.subscribe_many(filters).await;
                    });
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    on_link(true);
                    let _ = ready_tx.send(true);
                    // A broker that restarted may have lost retained jobs: the engine
                    // publishes them again, now that devices' requests reach it too.
                    if std::mem::replace(&mut connected_before, true)
                        && tx.send(Inbound::LinkRestored).await.is_err()
                    {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let routed = match std::str::from_utf8(&p.topic) {
                        Ok(topic) if replica => as_received(topic, p.payload),
                        Ok(topic) => route(topic, p.payload, &admin_auth),
                        Err(_) => None,
                    };
                    let Some(event) = routed else {
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
                    // Down until the next SUBACK: what `aloft_broker_link_up` reports.
                    let _ = ready_tx.send(false);
                    warn!(error = %e, "orchestrator link error; reconnecting");
                    on_link(false);
                    // Design: the session starts clean, so nothing of the old one may survive.
                    // rumqttc keeps a packet-id collision across a reconnect, and then never
                    // sends another request (its ack will not come on a new session): reset.
                    eventloop.state = rumqttc::v5::MqttState::new(INFLIGHT, false);
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    (
        Publisher {
            client,
            devices: None,
            retained,
        },
        ready_rx,
    )
}

/// A replica's routing: a chunk request as usual, any other inbound topic as received.
fn as_received(topic: &str, payload: Bytes) -> Option<Inbound> {
    match topics::parse_inbound(topic) {
        Ok(Topic::ChunkRequest(device)) => Some(Inbound::ChunkRequest { device, payload }),
        Ok(_) => Some(Inbound::Received {
            topic: topic.to_owned(),
            payload,
        }),
        Err(e) => {
            warn!(topic, error = %e, "publish on an unexpected topic refused");
            None
        }
    }
}

/// The event a publish on `topic` is; `None` (logged) for a topic no one may publish on.
/// Admin requests' signatures are checked here, off the engine's task.
pub fn route(
    topic: &str,
    payload: Bytes,
    admin_auth: &crate::admin::auth::Authenticator,
) -> Option<Inbound> {
    match topics::parse_inbound(topic) {
        Ok(Topic::Status(device)) => Some(Inbound::Status { device, payload }),
        Ok(Topic::ChunkRequest(device)) => Some(Inbound::ChunkRequest { device, payload }),
        Ok(Topic::Health(device)) => Some(Inbound::Health { device, payload }),
        Ok(Topic::Csr(device)) => Some(Inbound::Csr { device, payload }),
        Ok(Topic::Admin { operator, op: _ }) => {
            let auth = admin_auth.check(&operator, &payload, crate::clock::now_ms());
            Some(Inbound::Admin {
                operator,
                payload,
                auth,
            })
        }
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
    fn shared_subscriptions_wrap_every_filter() {
        let plain = subscriptions(None);
        let shared = subscriptions(Some("aloft"));
        assert_eq!(plain.len(), shared.len());
        for (p, s) in plain.iter().zip(&shared) {
            assert_eq!(s, &format!("$share/aloft/{p}"));
        }
    }

    #[test]
    fn jittered_waits_stay_between_half_and_the_whole_base() {
        let base = Duration::from_millis(800);
        for _ in 0..100 {
            let w = jittered(base);
            assert!(w >= base / 2 && w <= base, "{w:?}");
        }
    }

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
