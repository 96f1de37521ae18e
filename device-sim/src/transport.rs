//! The agent's MQTT side: one mTLS MQTT 5 session to the orchestrator's front, kept up with
//! jittered exponential backoff, feeding the [`UpdateAgent`] and publishing what it returns.
//!
//! The record is saved before the outputs that depend on it are published (the agent says how
//! urgently, see [`Persist`]); if saving fails nothing is published, and the agent's own timers
//! retry later. A real Linux device runs one [`run`]; the simulator runs thousands.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aloft_proto::{chunkframe, messages, topics, DeviceId};
use bytes::Bytes;
use rand::Rng;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, warn};

use crate::slots::Flash;
use crate::store::DeviceStore;
use crate::update::{Input, OutTopic, Output, Persist, UpdateAgent};

/// How a device reaches the orchestrator.
#[derive(Clone)]
pub struct TransportConfig {
    /// Host name or IP the server certificate names (and where to connect).
    pub host: String,
    pub port: u16,
    /// TLS client settings carrying the device's certificate and key.
    pub tls: Arc<rustls::ClientConfig>,
    pub keep_alive: Duration,
    /// Shared by every device of a process: how many may be connecting at once, so that a fleet
    /// coming back after an outage does not storm the server with handshakes.
    pub connect_gate: Option<Arc<Semaphore>>,
    pub connect_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often the agent's timers are checked.
    pub tick: Duration,
    /// Most QoS 1 publishes in flight; bounds rumqttc's preallocation (see DESIGN.md).
    pub inflight: u16,
    /// How long a `Persist::Soon` change may stay unsaved.
    pub save_every: Duration,
}

impl TransportConfig {
    pub fn new(host: impl Into<String>, port: u16, tls: Arc<rustls::ClientConfig>) -> Self {
        TransportConfig {
            host: host.into(),
            port,
            tls,
            keep_alive: Duration::from_secs(60),
            connect_gate: None,
            connect_timeout: Duration::from_secs(20),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(15),
            tick: Duration::from_millis(500),
            inflight: 32,
            save_every: Duration::from_secs(2),
        }
    }
}

/// What a transport's user may watch or change while it runs. Every method has a default.
pub trait Hooks: Send {
    /// After every step of the agent (its record, state and counters are current).
    fn observe(&mut self, _agent: &UpdateAgent, _connected: bool) {}
    /// May alter a chunk frame before the agent sees it (fault injection in the simulator).
    fn inbound_chunk(&mut self, _frame: &mut Vec<u8>) {}
    /// The session came up (true) or went down (false).
    fn connection(&mut self, _up: bool) {}
    /// A publish could not be queued (the client's request queue was full).
    fn dropped_publish(&mut self) {}
    /// The record could not be saved.
    fn store_failed(&mut self, _error: &str) {}
}

/// No hooks.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// A device: its agent and where it keeps its firmware and record.
pub struct Device {
    pub agent: UpdateAgent,
    pub flash: Box<dyn Flash>,
    pub store: Box<dyn DeviceStore>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The largest packet a device accepts: a chunk frame of the biggest chunk or a job.
fn max_incoming_packet() -> u32 {
    let largest = chunkframe::MAX_FRAME_BYTES.max(messages::MAX_JOB_BYTES) + 4 * 1024;
    u32::try_from(largest).unwrap_or(u32::MAX)
}

struct Topics {
    job: String,
    ack: String,
    chunks: String,
    status: String,
    chunk_request: String,
}

impl Topics {
    fn new(id: &DeviceId) -> Self {
        Topics {
            job: topics::job(id),
            ack: topics::ack(id),
            chunks: topics::chunk_response(id),
            status: topics::status(id),
            chunk_request: topics::chunk_request(id),
        }
    }
}

/// What the poller task forwards: MQTT events until the connection fails.
enum Link {
    Event(Box<Event>),
    Down(String),
}

/// Runs the device until `stop` becomes true. Returns the device (for a restart in tests).
pub async fn run(
    mut device: Device,
    cfg: TransportConfig,
    hooks: &mut dyn Hooks,
    mut stop: watch::Receiver<bool>,
) -> Device {
    let id = device.agent.device().clone();
    let topics = Topics::new(&id);
    let mut backoff = cfg.backoff_min;
    let mut last_save = tokio::time::Instant::now();
    let mut unsaved = false;
    while !*stop.borrow() {
        let session = Session::connect(&id, &cfg, &mut stop).await;
        let Some(mut session) = session else {
            back_off(&mut backoff, cfg.backoff_max, &mut stop).await;
            continue;
        };
        let mut tick = tokio::time::interval(cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut subscribed = false;
        let reason = loop {
            let input_payload: (u8, Bytes);
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break "stopped".to_owned();
                    }
                    continue;
                }
                _ = tick.tick() => {
                    if unsaved && last_save.elapsed() >= cfg.save_every {
                        save(&mut device, hooks, &mut unsaved, &mut last_save);
                    }
                    if subscribed {
                        step(&mut device, &session.client, &topics, Input::Tick, hooks, &mut unsaved, &mut last_save);
                    }
                    continue;
                }
                link = session.events.recv() => match link {
                    None => break "poller ended".to_owned(),
                    Some(Link::Down(e)) => break e,
                    Some(Link::Event(ev)) => match *ev {
                        Event::Incoming(Packet::SubAck(_)) if !subscribed => {
                            subscribed = true;
                            backoff = cfg.backoff_min;
                            hooks.connection(true);
                            step(&mut device, &session.client, &topics, Input::Connected, hooks, &mut unsaved, &mut last_save);
                            continue;
                        }
                        Event::Incoming(Packet::Publish(p)) => {
                            let kind = if p.topic == topics.job.as_bytes() {
                                0
                            } else if p.topic == topics.chunks.as_bytes() {
                                1
                            } else if p.topic == topics.ack.as_bytes() {
                                2
                            } else {
                                debug!(device = %id, "publish on an unexpected topic ignored");
                                continue;
                            };
                            input_payload = (kind, p.payload);
                        }
                        _ => continue,
                    },
                },
            }
            let (kind, payload) = input_payload;
            match kind {
                0 => step(
                    &mut device,
                    &session.client,
                    &topics,
                    Input::Job(&payload),
                    hooks,
                    &mut unsaved,
                    &mut last_save,
                ),
                1 => {
                    let mut frame = payload.to_vec();
                    hooks.inbound_chunk(&mut frame);
                    step(
                        &mut device,
                        &session.client,
                        &topics,
                        Input::ChunkFrame(&frame),
                        hooks,
                        &mut unsaved,
                        &mut last_save,
                    );
                }
                _ => step(
                    &mut device,
                    &session.client,
                    &topics,
                    Input::Ack(&payload),
                    hooks,
                    &mut unsaved,
                    &mut last_save,
                ),
            }
        };
        debug!(device = %id, %reason, "session ended");
        if subscribed {
            hooks.connection(false);
        }
        let _ = device
            .agent
            .handle(now_ms(), Input::Disconnected, device.flash.as_mut());
        hooks.observe(&device.agent, false);
        session.close().await;
        back_off(&mut backoff, cfg.backoff_max, &mut stop).await;
    }
    if unsaved {
        save(&mut device, hooks, &mut unsaved, &mut last_save);
    }
    device
}

/// Waits out one backoff step (unless stopped) and doubles the next, up to `max`.
async fn back_off(backoff: &mut Duration, max: Duration, stop: &mut watch::Receiver<bool>) {
    if *stop.borrow() {
        return;
    }
    let wait = jitter(*backoff);
    *backoff = (*backoff * 2).min(max);
    tokio::select! {
        _ = stop.changed() => {}
        () = tokio::time::sleep(wait) => {}
    }
}

/// Full jitter: anywhere in `[d/2, d]`, so reconnecting devices spread out.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms.max(1)))
}

fn save(
    device: &mut Device,
    hooks: &mut dyn Hooks,
    unsaved: &mut bool,
    last_save: &mut tokio::time::Instant,
) -> bool {
    match device.store.save(device.agent.record()) {
        Ok(()) => {
            *unsaved = false;
            *last_save = tokio::time::Instant::now();
            true
        }
        Err(e) => {
            warn!(device = %device.agent.device(), error = %e, "saving the device record failed");
            hooks.store_failed(&e.to_string());
            false
        }
    }
}

/// One agent step: handle, persist as the agent asks, then publish.
fn step(
    device: &mut Device,
    client: &AsyncClient,
    topics: &Topics,
    input: Input<'_>,
    hooks: &mut dyn Hooks,
    unsaved: &mut bool,
    last_save: &mut tokio::time::Instant,
) {
    let outputs = device.agent.handle(now_ms(), input, device.flash.as_mut());
    match device.agent.take_persist() {
        Persist::Clean => {}
        Persist::Soon => *unsaved = true,
        Persist::Now => {
            if !save(device, hooks, unsaved, last_save) {
                // Publishing a report the record does not hold could lose it on a restart.
                hooks.observe(&device.agent, true);
                return;
            }
        }
    }
    hooks.observe(&device.agent, true);
    for Output::Publish { topic, payload } in outputs {
        let topic = match topic {
            OutTopic::Status => topics.status.clone(),
            OutTopic::ChunkRequest => topics.chunk_request.clone(),
        };
        if client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .is_err()
        {
            // The agent re-sends on its timers; nothing is lost but time.
            hooks.dropped_publish();
        }
    }
}

/// One MQTT connection: the client handle and the events its poller task forwards.
struct Session {
    client: AsyncClient,
    events: mpsc::Receiver<Link>,
    poller: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Connects and subscribes; `None` if the connection could not be made (or `stop`).
    async fn connect(
        id: &DeviceId,
        cfg: &TransportConfig,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Session> {
        let _permit = match &cfg.connect_gate {
            Some(gate) => tokio::select! {
                p = gate.clone().acquire_owned() => Some(p.ok()?),
                _ = stop.changed() => return None,
            },
            None => None,
        };
        let mut opts = MqttOptions::new(id.as_str(), cfg.host.clone(), cfg.port);
        // Request/response over small packets: Nagle would add delayed-ACK stalls to each one.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        opts.set_network_options(net);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            cfg.tls.clone(),
        )))
        .set_keep_alive(cfg.keep_alive)
        .set_clean_start(true)
        .set_connection_timeout(cfg.connect_timeout.as_secs().max(1))
        .set_max_packet_size(Some(max_incoming_packet()))
        .set_outgoing_inflight_upper_limit(cfg.inflight)
        .set_request_channel_capacity(256);
        let (client, mut eventloop) = AsyncClient::new(opts, 256);

        // Up to the CONNACK under the gate: that is the expensive part (TLS handshake).
        let first = tokio::time::timeout(cfg.connect_timeout, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await;
        match first {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(device = %id, error = %e, "connect failed");
                return None;
            }
            Err(_) => {
                debug!(device = %id, "connect timed out");
                return None;
            }
        }
        drop(_permit);
        let topics = Topics::new(id);
        let filters = [&topics.job, &topics.chunks, &topics.ack]
            .into_iter()
            .map(|t| Filter::new(t.clone(), QoS::AtLeastOnce));
        if client.try_subscribe_many(filters).is_err() {
            return None;
        }
        let (tx, events) = mpsc::channel(64);
        let poller = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(ev) => {
                        if tx.send(Link::Event(Box::new(ev))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Link::Down(e.to_string())).await;
                        return;
                    }
                }
            }
        });
        Some(Session {
            client,
            events,
            poller,
        })
    }

    async fn close(self) {
        let _ = self.client.try_disconnect();
        // Give the DISCONNECT a moment to leave, then make sure the poller is gone.
        let mut poller = self.poller;
        if tokio::time::timeout(Duration::from_millis(200), &mut poller)
            .await
            .is_err()
        {
            poller.abort();
        }
    }
}
