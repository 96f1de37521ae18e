//! The agent's MQTT side: one mTLS MQTT 5 session to the orchestrator's front, kept up with
//! jittered exponential backoff, feeding the [`UpdateAgent`] and publishing what it returns.
//!
//! The record is saved before the outputs that depend on it are published (the agent says how
//! urgently, see [`Persist`]); if saving fails nothing is published, and the agent's own timers
//! retry later. The agent's timers run whether or not the link is up: a confirm deadline does
//! not wait for the network. A real Linux device runs one [`run`]; the simulator runs thousands
//! with [`run_controlled`], which also lets it take a link down and cut the power ([`Control`],
//! [`Hooks::after_step`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aloft_proto::{chunkframe, messages, topics, DeviceId};
use bytes::Bytes;
use rand::Rng;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, warn};

use crate::mqtt::{self, Incoming, QoS};
use crate::origin::{OriginClientConfig, OriginFetcher};
use crate::renewal::{Outcome, Renewer};
use crate::slots::Flash;
use crate::store::DeviceStore;
use crate::update::{Input, OutTopic, Output, Persist, UpdateAgent};

type Instant = tokio::time::Instant;

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
    /// Most QoS 1 publishes in flight; one more is dropped (the agent re-sends on its timers).
    /// A device has at most its chunk window of requests, a report and a CSR outstanding at once.
    pub inflight: u16,
    /// How long a `Persist::Soon` change may stay unsaved.
    pub save_every: Duration,
    /// The link stays down this long after start (the device is powered and its timers run).
    pub offline_for: Duration,
    /// Certificate renewal: when set, the device connects with the renewer's current
    /// certificate (not `tls`), asks for a new one when it is due, and reconnects once it has it.
    pub renewal: Option<Arc<Renewer>>,
    /// (1.5) The HTTPS client for a job's download origin; without it chunks come over MQTT.
    pub origin: Option<OriginClientConfig>,
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
            inflight: 16,
            save_every: Duration::from_secs(2),
            offline_for: Duration::ZERO,
            renewal: None,
            origin: None,
        }
    }

    /// The TLS settings for the next connection.
    fn tls(&self) -> Arc<rustls::ClientConfig> {
        match &self.renewal {
            Some(r) => r.tls(),
            None => self.tls.clone(),
        }
    }
}

/// TLS client settings for a device: the fleet CA, the device's certificate and key, and a session
/// cache for the one server a device talks to. (rustls' default cache preallocates room for 256
/// servers, about 14 KiB per device: a tenth of a simulated device's memory.)
pub fn client_tls(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ClientConfig, aloft_certs::PkiError> {
    DeviceTls::new(ca_pem)?.client(cert_pem, key_pem)
}

/// What every device of a fleet has in common in its TLS client settings, built once: the fleet
/// CA (its PEM, to check renewed certificates against), the crypto provider (the suites and
/// groups a device offers, as `aloft_certs::tls::device_client_config`: TLS_AES_128_GCM_SHA256
/// over X25519 or P-256) and the verifier of the server's certificate against the fleet CA.
/// Built per device they were about 2 KiB of each simulated device's heap; each device still
/// has its own certificate, key and session cache ([`DeviceTls::client`]).
#[derive(Clone)]
pub struct DeviceTls {
    ca_pem: Arc<str>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<rustls::client::WebPkiServerVerifier>,
}

impl std::fmt::Debug for DeviceTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTls").finish_non_exhaustive()
    }
}

impl DeviceTls {
    /// Trusts the CA certificate(s) in `ca_pem` and nothing else.
    pub fn new(ca_pem: &str) -> Result<Self, aloft_certs::PkiError> {
        use rustls::crypto::aws_lc_rs;
        let mut provider = aws_lc_rs::default_provider();
        provider.cipher_suites = vec![aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
        provider.kx_groups = vec![aws_lc_rs::kx_group::X25519, aws_lc_rs::kx_group::SECP256R1];
        let provider = Arc::new(provider);
        let mut roots = rustls::RootCertStore::empty();
        for cert in aloft_certs::tls::parse_certs(ca_pem)? {
            roots.add(cert)?;
        }
        // Without CRLs no revocation is checked, as `with_root_certificates` does.
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()?;
        Ok(DeviceTls {
            ca_pem: ca_pem.into(),
            provider,
            verifier,
        })
    }

    /// The fleet CA certificate(s), PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// One device's settings: TLS 1.3, its certificate and key, a session cache for one server.
    pub fn client(
        &self,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<rustls::ClientConfig, aloft_certs::PkiError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_webpki_verifier(self.verifier.clone())
            .with_client_auth_cert(
                aloft_certs::tls::parse_certs(cert_pem)?,
                aloft_certs::tls::parse_private_key(key_pem)?,
            )?;
        tls.resumption = rustls::client::Resumption::store(Arc::new(OneSession::default()));
        Ok(tls)
    }
}

/// A device's TLS session cache: the key-exchange group its one server chose, and the newest
/// TLS 1.3 ticket, as a microcontroller's stack keeps one session (mbedTLS'
/// `mbedtls_ssl_session`). rustls' memory cache keeps up to 8 tickets per server, each with a
/// copy of the server's certificate chain, and preallocates room for them (about 2 KiB per
/// device); a device that resumes uses one.
#[derive(Debug, Default)]
struct OneSession(std::sync::Mutex<SessionSlot>);

#[derive(Debug, Default)]
struct SessionSlot {
    kx_hint: Option<(rustls::pki_types::ServerName<'static>, rustls::NamedGroup)>,
    ticket: Option<(
        rustls::pki_types::ServerName<'static>,
        rustls::client::Tls13ClientSessionValue,
    )>,
}

impl OneSession {
    fn slot(&self) -> std::sync::MutexGuard<'_, SessionSlot> {
        // Every update replaces a whole field; a panic elsewhere cannot leave half of one.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl rustls::client::ClientSessionStore for OneSession {
    fn set_kx_hint(
        &self,
        server: rustls::pki_types::ServerName<'static>,
        group: rustls::NamedGroup,
    ) {
        self.slot().kx_hint = Some((server, group));
    }

    fn kx_hint(&self, server: &rustls::pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        match &self.slot().kx_hint {
            Some((s, g)) if s == server => Some(*g),
            _ => None,
        }
    }

    // Devices speak TLS 1.3 only.
    fn set_tls12_session(
        &self,
        _: rustls::pki_types::ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(
        &self,
        _: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &rustls::pki_types::ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.slot().ticket = Some((server, value));
    }

    fn take_tls13_ticket(
        &self,
        server: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        let mut slot = self.slot();
        match &slot.ticket {
            Some((s, _)) if s == server => slot.ticket.take().map(|(_, t)| t),
            _ => None,
        }
    }
}

/// What a transport's user may watch or change while it runs. Every method has a default.
pub trait Hooks: Send {
    /// After every step of the agent (its record, state and counters are current).
    fn observe(&mut self, _agent: &UpdateAgent, _connected: bool) {}
    /// May alter a chunk frame before the agent sees it (fault injection in the simulator).
    fn inbound_chunk(&mut self, _frame: &mut Vec<u8>) {}
    /// How long to hold a chunk frame of `len` bytes before the agent sees it (a slow link).
    fn chunk_delay(&mut self, _len: usize) -> Duration {
        Duration::ZERO
    }
    /// After every step, once the record is saved as the agent asked and before its outputs are
    /// published: a fault to inject now (the simulator's link drops and power losses).
    fn after_step(&mut self, _agent: &UpdateAgent) -> Intervention {
        Intervention::None
    }
    /// The session came up (true) or went down (false).
    fn connection(&mut self, _up: bool) {}
    /// A publish could not be queued (too many QoS 1 publishes in flight, or too many bytes
    /// waiting to be written).
    fn dropped_publish(&mut self) {}
    /// The record could not be saved.
    fn store_failed(&mut self, _error: &str) {}
}

/// A fault [`Hooks::after_step`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intervention {
    None,
    /// The link breaks (no DISCONNECT is sent); the transport reconnects with its backoff.
    DropLink,
    /// The power goes: the step's outputs are never published and nothing more is saved.
    PowerLoss,
}

/// No hooks.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// Outside control of a running device, through a `watch` channel (see [`run_controlled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    /// While false the link is down and stays down; the device stays powered and its timers
    /// run. Set back to true, it connects at once.
    pub online: bool,
    /// Each increment is a power loss: the run ends at once, without saving.
    pub power_losses: u64,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            online: true,
            power_losses: 0,
        }
    }
}

/// How [`run_controlled`] ended.
pub enum RunEnd {
    /// `stop` became true; the record was saved.
    Stopped(Device),
    /// The power went. The agent's memory is lost: the caller must drop `agent` and start a new
    /// one from what `store` holds (flash and store survive, like hardware).
    PowerLost(Device),
}

/// A device: its agent and where it keeps its firmware and record.
pub struct Device {
    /// Boxed: a device's task holds its `Device` in several states of its future (an async
    /// fn keeps its arguments beside the locals they move into), and the agent is 2 KB.
    pub agent: Box<UpdateAgent>,
    pub flash: Box<dyn Flash>,
    pub store: Box<dyn DeviceStore>,
}

pub(crate) fn now_ms() -> u64 {
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
    health: String,
    csr: String,
    cert: String,
}

impl Topics {
    fn new(id: &DeviceId) -> Self {
        Topics {
            job: topics::job(id),
            ack: topics::ack(id),
            chunks: topics::chunk_response(id),
            status: topics::status(id),
            chunk_request: topics::chunk_request(id),
            health: topics::health(id),
            csr: topics::csr(id),
            cert: topics::cert(id),
        }
    }
}

/// The topic filters a device subscribes to on every connection (one SUBSCRIBE): the front
/// allows a device only a fixed few (PROTOCOL.md §4.2), and its tests check these are among them.
pub fn subscriptions(id: &DeviceId, renewing: bool) -> Vec<String> {
    let mut filters = vec![topics::job(id), topics::chunk_response(id), topics::ack(id)];
    if renewing {
        filters.push(topics::cert(id));
    }
    filters
}

/// Runs the device until `stop` becomes true, saves its record and returns it (for a restart
/// in tests). Nothing but the hooks can cut its power here; if they do, the device is returned
/// as it was when the power went, and the caller must treat its agent as lost.
pub async fn run(
    device: Device,
    cfg: TransportConfig,
    hooks: &mut dyn Hooks,
    stop: watch::Receiver<bool>,
) -> Device {
    let (_control, rx) = watch::channel(Control::default());
    match run_controlled(device, cfg, hooks, stop, rx).await {
        RunEnd::Stopped(d) | RunEnd::PowerLost(d) => d,
    }
}

/// Why a run, or one session of it, ended.
enum End {
    Stopped,
    PowerLost,
    /// The link failed, was dropped by a hook, or was taken down through [`Control::online`].
    Link(String),
}

/// What a change of `stop` or of the [`Control`] channel means.
enum ControlEvent {
    Stop,
    PowerLoss,
    Online(bool),
}

/// What one inbound publish is, by topic.
enum Kind {
    Job,
    Chunk,
    Ack,
    Cert,
}

/// The parts of a run that outlive each session.
struct Runner<'h> {
    device: Device,
    hooks: &'h mut dyn Hooks,
    topics: Topics,
    save_every: Duration,
    unsaved: bool,
    last_save: Instant,
    stop: watch::Receiver<bool>,
    control: watch::Receiver<Control>,
    /// False once every sender of `control` is gone (nothing can change it any more).
    control_open: bool,
    /// `Control::power_losses` when the run started: any other value is a power loss.
    power_base: u64,
    renewal: Option<Arc<Renewer>>,
    /// (1.5) Fetches from a job's origin, which the agent orders; outcomes come back on the
    /// receiver [`Runner::session`] watches.
    origin: Option<OriginFetcher>,
    /// The agent's [`next_wake`](UpdateAgent::next_wake) the tick was last moved to.
    wake_armed: Option<u64>,
}

/// Runs the device like [`run`], under outside [`Control`]: the link can be taken down and
/// brought back, and the power cut. Ends when `stop` becomes true or the power goes.
pub async fn run_controlled(
    device: Device,
    cfg: TransportConfig,
    hooks: &mut dyn Hooks,
    stop: watch::Receiver<bool>,
    mut control: watch::Receiver<Control>,
) -> RunEnd {
    let id = device.agent.device().clone();
    let power_base = control.borrow_and_update().power_losses;
    let (origin, mut origin_rx) = match &cfg.origin {
        Some(o) => {
            let (f, rx) = OriginFetcher::new(o.clone());
            (Some(f), Some(rx))
        }
        None => (None, None),
    };
    let mut r = Runner {
        origin,
        topics: Topics::new(&id),
        device,
        hooks,
        save_every: cfg.save_every,
        unsaved: false,
        last_save: Instant::now(),
        stop,
        control,
        control_open: true,
        power_base,
        renewal: cfg.renewal.clone(),
        wake_armed: None,
    };
    // A new agent may have changed its record at power-on (the bootloader's choice of slot).
    r.persist();
    r.hooks.observe(&r.device.agent, false);
    let mut tick = tokio::time::interval(cfg.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hold_until = Instant::now() + cfg.offline_for;
    let mut backoff = cfg.backoff_min;
    let mut retry_at = Instant::now();
    loop {
        if *r.stop.borrow() {
            return r.end(End::Stopped);
        }
        if let Err(end) = r.idle(&mut tick, hold_until, retry_at).await {
            return r.end(end);
        }
        let connected = {
            // On the heap, and only while connecting: the connect future holds a TLS handshake,
            // which would otherwise size every device's task.
            let mut connecting = Box::pin(connect(&id, &cfg));
            loop {
                tokio::select! {
                    s = &mut connecting => break Ok(s),
                    ev = r.control_event() => match ev {
                        ControlEvent::Stop => break Err(End::Stopped),
                        ControlEvent::PowerLoss => break Err(End::PowerLost),
                        ControlEvent::Online(false) => break Ok(None),
                        ControlEvent::Online(true) => {}
                    },
                    _ = tick.tick() => {
                        if r.tick(None) == Intervention::PowerLoss {
                            break Err(End::PowerLost);
                        }
                    }
                }
            }
        };
        let mut session = match connected {
            Ok(Some(s)) => s,
            Ok(None) => {
                retry_at = Instant::now() + jitter(backoff);
                backoff = (backoff * 2).min(cfg.backoff_max);
                continue;
            }
            Err(end) => return r.end(end),
        };
        let (end, subscribed) = r.session(&mut session, &mut tick, &mut origin_rx).await;
        if subscribed {
            backoff = cfg.backoff_min;
        }
        match end {
            End::PowerLost => {
                // A dead device sends nothing: its link just breaks.
                drop(session);
                if subscribed {
                    r.hooks.connection(false);
                }
                return r.end(End::PowerLost);
            }
            End::Stopped => {
                r.disconnected(subscribed);
                // Give the DISCONNECT a moment to leave.
                session.close(Duration::from_millis(200)).await;
                return r.end(End::Stopped);
            }
            End::Link(reason) => {
                debug!(device = %id, %reason, acknowledged = session.acknowledged(), "session ended");
                r.disconnected(subscribed);
                // Broken without a DISCONNECT, as a failed link would be.
                drop(session);
                retry_at = Instant::now() + jitter(backoff);
                backoff = (backoff * 2).min(cfg.backoff_max);
            }
        }
    }
}

impl Runner<'_> {
    /// Waits with the link down until `retry_at` (which coming back online cuts short) and
    /// `hold_until` have passed and the link may be up, ticking the agent meanwhile.
    async fn idle(
        &mut self,
        tick: &mut tokio::time::Interval,
        hold_until: Instant,
        mut retry_at: Instant,
    ) -> Result<(), End> {
        loop {
            self.arm_wake(tick);
            let online = self.control.borrow().online;
            let ready_at = retry_at.max(hold_until);
            if online && Instant::now() >= ready_at {
                return Ok(());
            }
            tokio::select! {
                ev = self.control_event() => match ev {
                    ControlEvent::Stop => return Err(End::Stopped),
                    ControlEvent::PowerLoss => return Err(End::PowerLost),
                    // Back online: connect now rather than after the rest of a backoff.
                    ControlEvent::Online(true) => retry_at = Instant::now(),
                    ControlEvent::Online(false) => {}
                },
                _ = tick.tick() => {
                    if self.tick(None) == Intervention::PowerLoss {
                        return Err(End::PowerLost);
                    }
                }
                () = tokio::time::sleep_until(ready_at), if online => {}
            }
        }
    }

    /// Ends the run outside a session: saves what is unsaved unless the power went.
    fn end(mut self, end: End) -> RunEnd {
        match end {
            End::PowerLost => RunEnd::PowerLost(self.device),
            End::Stopped | End::Link(_) => {
                if self.unsaved {
                    self.save();
                }
                RunEnd::Stopped(self.device)
            }
        }
    }

    /// The next change of `stop` or of the control channel that matters.
    async fn control_event(&mut self) -> ControlEvent {
        loop {
            tokio::select! {
                changed = self.stop.changed() => {
                    if changed.is_err() || *self.stop.borrow() {
                        return ControlEvent::Stop;
                    }
                }
                changed = self.control.changed(), if self.control_open => {
                    if changed.is_err() {
                        self.control_open = false;
                        continue;
                    }
                    let c = *self.control.borrow_and_update();
                    if c.power_losses != self.power_base {
                        return ControlEvent::PowerLoss;
                    }
                    return ControlEvent::Online(c.online);
                }
            }
        }
    }

    /// Drives one connected session until it ends; also says whether it got as far as the
    /// subscription (the agent saw `Connected`).
    async fn session(
        &mut self,
        session: &mut mqtt::Session,
        tick: &mut tokio::time::Interval,
        origin_rx: &mut Option<mpsc::Receiver<crate::origin::Fetched>>,
    ) -> (End, bool) {
        let mut subscribed = false;
        let end = loop {
            self.arm_wake(tick);
            let (kind, payload): (Kind, Bytes);
            tokio::select! {
                ev = self.control_event() => match ev {
                    ControlEvent::Stop => break End::Stopped,
                    ControlEvent::PowerLoss => break End::PowerLost,
                    ControlEvent::Online(false) => break End::Link("taken offline".into()),
                    ControlEvent::Online(true) => continue,
                },
                _ = tick.tick() => {
                    if subscribed {
                        self.ask_for_certificate(session);
                    }
                    match self.tick(subscribed.then_some(&mut *session)) {
                        Intervention::None => continue,
                        Intervention::DropLink => break End::Link("link dropped (injected)".into()),
                        Intervention::PowerLoss => break End::PowerLost,
                    }
                }
                Some(f) = crate::origin::next(origin_rx) => {
                    let input = Input::Origin {
                        artifact: &f.artifact,
                        index: f.index,
                        body: f.body.as_deref().map_err(|e| *e),
                    };
                    match self.step(subscribed.then_some(&mut *session), input) {
                        Intervention::None => continue,
                        Intervention::DropLink => break End::Link("link dropped (injected)".into()),
                        Intervention::PowerLoss => break End::PowerLost,
                    }
                }
                incoming = session.next() => match incoming {
                    Err(e) => break End::Link(e.to_string()),
                    Ok(Incoming::Subscribed) => {
                        if subscribed {
                            continue;
                        }
                        subscribed = true;
                        self.hooks.connection(true);
                        self.ask_for_certificate(session);
                        match self.step(Some(session), Input::Connected) {
                            Intervention::None => continue,
                            Intervention::DropLink => break End::Link("link dropped (injected)".into()),
                            Intervention::PowerLoss => break End::PowerLost,
                        }
                    }
                    Ok(Incoming::Publish { topic, payload: p }) => {
                        let t = &self.topics;
                        kind = if topic == t.job.as_bytes() {
                            Kind::Job
                        } else if topic == t.chunks.as_bytes() {
                            Kind::Chunk
                        } else if topic == t.ack.as_bytes() {
                            Kind::Ack
                        } else if topic == t.cert.as_bytes() {
                            Kind::Cert
                        } else {
                            debug!(device = %self.device.agent.device(), "publish on an unexpected topic ignored");
                            continue;
                        };
                        payload = p;
                    }
                },
            }
            let frame;
            let input = match kind {
                Kind::Cert => {
                    // Renewal is beside the agent, not in it: the update record is untouched.
                    let Some(renewal) = &self.renewal else {
                        continue;
                    };
                    match renewal.on_response(&payload) {
                        Outcome::Renewed => {
                            break End::Link("certificate renewed; reconnecting with it".into())
                        }
                        Outcome::Refused(_) | Outcome::Ignored(_) => continue,
                    }
                }
                Kind::Job => Input::Job(&payload),
                Kind::Ack => Input::Ack(&payload),
                Kind::Chunk => {
                    // The packet's own allocation when nothing else shares it (the session has
                    // let go of its read buffer), else a copy.
                    let mut f = Vec::from(payload);
                    self.hooks.inbound_chunk(&mut f);
                    let delay = self.hooks.chunk_delay(f.len());
                    if !delay.is_zero() {
                        // A slow link: this frame arrives later, and so does everything behind it.
                        tokio::select! {
                            ev = self.control_event() => match ev {
                                ControlEvent::Stop => break End::Stopped,
                                ControlEvent::PowerLoss => break End::PowerLost,
                                ControlEvent::Online(false) => break End::Link("taken offline".into()),
                                ControlEvent::Online(true) => {}
                            },
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                    frame = f;
                    Input::ChunkFrame(&frame)
                }
            };
            match self.step(Some(session), input) {
                Intervention::None => {}
                Intervention::DropLink => break End::Link("link dropped (injected)".into()),
                Intervention::PowerLoss => break End::PowerLost,
            }
        };
        (end, subscribed)
    }

    /// Publishes a certificate renewal request if one is due (see [`Renewer::poll`]).
    fn ask_for_certificate(&mut self, client: &mut mqtt::Session) {
        let Some(renewal) = &self.renewal else {
            return;
        };
        if let Some(payload) = renewal.poll(now_ms()) {
            if client
                .publish(&self.topics.csr, QoS::AtLeastOnce, payload)
                .is_err()
            {
                // Asked again after the renewer's retry interval.
                self.hooks.dropped_publish();
            }
        }
    }

    /// Moves the next tick to the agent's next wake-up when that is new and less than a tick
    /// period away, so the next tick is never further off than a period from now (a wake-up
    /// further off waits for a later call: every event and tick makes one). One already passed,
    /// or already armed, is left to the regular ticks, so a step that did not move the agent on
    /// cannot make it spin.
    fn arm_wake(&mut self, tick: &mut tokio::time::Interval) {
        let Some(wake) = self.device.agent.next_wake() else {
            return;
        };
        let period = tick.period().as_millis() as u64;
        if let Some(ms) = wake_delay(wake, self.wake_armed, now_ms(), period) {
            self.wake_armed = Some(wake);
            tick.reset_at(Instant::now() + Duration::from_millis(ms));
        }
    }

    /// A timer tick: saves delayed progress when due and lets the agent check its timers.
    fn tick(&mut self, client: Option<&mut mqtt::Session>) -> Intervention {
        if self.unsaved && self.last_save.elapsed() >= self.save_every {
            self.save();
        }
        self.step(client, Input::Tick)
    }

    /// Tells the hooks and the agent that the link is down.
    fn disconnected(&mut self, subscribed: bool) {
        if subscribed {
            self.hooks.connection(false);
        }
        // Faults wait for the next step: the link is already down and the device is stopping
        // or about to reconnect.
        let _ = self.step(None, Input::Disconnected);
    }

    fn save(&mut self) -> bool {
        // The flash first: the record may say chunks are written that only a sync makes
        // survive a restart.
        let saved = self
            .device
            .flash
            .sync()
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                self.device
                    .store
                    .save(self.device.agent.record())
                    .map_err(anyhow::Error::from)
            });
        match saved {
            Ok(()) => {
                self.unsaved = false;
                self.last_save = Instant::now();
                true
            }
            Err(e) => {
                warn!(device = %self.device.agent.device(), error = %e, "saving the device record failed");
                self.hooks.store_failed(&e.to_string());
                false
            }
        }
    }

    /// Saves the record as urgently as the agent asks; false if an urgent save failed.
    fn persist(&mut self) -> bool {
        match self.device.agent.take_persist() {
            Persist::Clean => true,
            Persist::Soon => {
                self.unsaved = true;
                true
            }
            Persist::Now => self.save(),
        }
    }

    /// One agent step: handle, persist as the agent asks, let the hooks intervene, then publish
    /// on `client` (`None` while the session is not up).
    fn step(&mut self, client: Option<&mut mqtt::Session>, input: Input<'_>) -> Intervention {
        let d = &mut self.device;
        let outputs = d.agent.handle(now_ms(), input, d.flash.as_mut());
        // Origin fetches read nothing the record holds: they start at once.
        let fetches = d.agent.take_origin_fetches();
        if let Some(origin) = &mut self.origin {
            for f in fetches {
                origin.start(f);
            }
        }
        let connected = client.is_some();
        if !self.persist() {
            // Publishing a report the record does not hold could lose it on a restart.
            self.hooks.observe(&self.device.agent, connected);
            return Intervention::None;
        }
        self.hooks.observe(&self.device.agent, connected);
        let intervention = self.hooks.after_step(&self.device.agent);
        if intervention != Intervention::None {
            return intervention;
        }
        let Some(client) = client else {
            return Intervention::None;
        };
        for Output::Publish { topic, payload } in outputs {
            let (topic, qos) = match topic {
                OutTopic::Status => (&self.topics.status, QoS::AtLeastOnce),
                OutTopic::ChunkRequest => (&self.topics.chunk_request, QoS::AtLeastOnce),
                // A lost heartbeat is superseded by the next one.
                OutTopic::Health => (&self.topics.health, QoS::AtMostOnce),
            };
            if client.publish(topic, qos, payload).is_err() {
                // The agent re-sends on its timers; nothing is lost but time.
                self.hooks.dropped_publish();
            }
        }
        Intervention::None
    }
}

/// How long from `now` to move the next tick for the agent's wake-up at `wake`, if at all (see
/// `Runner::arm_wake`): not when it is the one already armed, has passed, or is a period or
/// more away. One millisecond late: the agent's clock is the wall clock, the timer's the
/// monotonic one, and a step a hair early would find the wait not over.
fn wake_delay(wake: u64, armed: Option<u64>, now: u64, period_ms: u64) -> Option<u64> {
    if armed == Some(wake) || wake <= now || wake >= now.saturating_add(period_ms) {
        return None;
    }
    Some(wake - now + 1)
}

/// Full jitter: anywhere in `[d/2, d]`, so reconnecting devices spread out.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms.max(1)))
}

/// Connects and subscribes; `None` if the connection could not be made. The caller stops
/// waiting by dropping the future.
async fn connect(id: &DeviceId, cfg: &TransportConfig) -> Option<Box<mqtt::Session>> {
    let _permit = match &cfg.connect_gate {
        Some(gate) => Some(gate.clone().acquire_owned().await.ok()?),
        None => None,
    };
    // Up to the CONNACK under the gate: that is the expensive part (TLS handshake).
    let opts = mqtt::Options {
        client_id: id.as_str(),
        host: &cfg.host,
        port: cfg.port,
        tls: cfg.tls(),
        keep_alive: cfg.keep_alive,
        inflight: cfg.inflight,
        max_incoming: max_incoming_packet(),
    };
    let mut session =
        match tokio::time::timeout(cfg.connect_timeout, mqtt::Session::connect(opts)).await {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                debug!(device = %id, error = %e, "connect failed");
                return None;
            }
            Err(_) => {
                debug!(device = %id, "connect timed out");
                return None;
            }
        };
    drop(_permit);
    if let Err(e) = session.subscribe(subscriptions(id, cfg.renewal.is_some())) {
        debug!(device = %id, error = %e, "subscribe failed");
        return None;
    }
    Some(session)
}

#[cfg(test)]
mod tls_tests {
    use super::*;
    use aloft_certs::{FleetCa, Validity};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, Connection, HandshakeKind, ServerConnection};

    fn device_tls(ca: &FleetCa, fleet: &DeviceTls) -> Arc<rustls::ClientConfig> {
        let id = DeviceId::new("dev-tls-1").unwrap();
        let csr = aloft_certs::device_csr(&id, &[7; 32]).unwrap();
        let cert = ca.issue_device(&csr.csr_pem, Validity::days(1)).unwrap();
        Arc::new(fleet.client(&cert, &csr.key_pem).unwrap())
    }

    fn server(ca: &FleetCa) -> Arc<rustls::ServerConfig> {
        let issued = ca
            .issue_server(&["localhost".to_owned()], Validity::days(1))
            .unwrap();
        Arc::new(
            aloft_certs::tls::server_config(
                ca.cert_pem(),
                &issued.cert_pem,
                &issued.key_pem,
                Vec::new(),
            )
            .unwrap(),
        )
    }

    fn pump(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
        let mut bytes = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut bytes).unwrap();
        }
        let mut slice = bytes.as_slice();
        while !slice.is_empty() {
            to.read_tls(&mut slice).unwrap();
            to.process_new_packets()?;
        }
        Ok(())
    }

    /// A whole handshake in memory, then the server's session tickets delivered to the client.
    fn connect(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> Result<ClientConnection, rustls::Error> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = Connection::Client(ClientConnection::new(client.clone(), name)?);
        let mut s = Connection::Server(ServerConnection::new(server.clone())?);
        for _ in 0..8 {
            pump(&mut c, &mut s)?;
            pump(&mut s, &mut c)?;
        }
        match c {
            Connection::Client(c) if !c.is_handshaking() => Ok(c),
            _ => Err(rustls::Error::General("handshake did not finish".into())),
        }
    }

    #[test]
    fn a_device_offers_aes_128_gcm_and_resumes_its_session_from_the_one_ticket_it_keeps() {
        let ca = FleetCa::create("Aloft Test Fleet CA", 1).unwrap();
        let fleet = DeviceTls::new(ca.cert_pem()).unwrap();
        let (client, server) = (device_tls(&ca, &fleet), server(&ca));
        let first = connect(&client, &server).unwrap();
        assert_eq!(first.handshake_kind(), Some(HandshakeKind::Full));
        assert_eq!(
            first.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        let second = connect(&client, &server).unwrap();
        assert_eq!(second.handshake_kind(), Some(HandshakeKind::Resumed));
    }

    #[test]
    fn devices_sharing_fleet_settings_refuse_a_server_another_ca_certified() {
        let ca = FleetCa::create("Aloft Test Fleet CA", 1).unwrap();
        let other = FleetCa::create("Another CA", 1).unwrap();
        let fleet = DeviceTls::new(ca.cert_pem()).unwrap();
        let client = device_tls(&ca, &fleet);
        assert!(connect(&client, &server(&other)).is_err());
        assert!(connect(&client, &server(&ca)).is_ok());
    }
}

/// The pure rule for when a device's wake-up moves its tick.
#[cfg(test)]
mod wake_tests {
    #[test]
    fn a_wake_up_moves_the_tick_once_only_when_it_comes_before_the_next() {
        let period = 500;
        // Due within the period: the tick moves there, a millisecond late.
        assert_eq!(super::wake_delay(1_200, None, 1_000, period), Some(201));
        // The same wake-up again (the step it brought did not move the agent on): left to
        // the regular ticks, so the device cannot spin on it.
        assert_eq!(super::wake_delay(1_200, Some(1_200), 1_000, period), None);
        // A later one replaces it.
        assert_eq!(
            super::wake_delay(1_300, Some(1_200), 1_000, period),
            Some(301)
        );
        // Passed already, or a period or more away: the regular ticks come first.
        assert_eq!(super::wake_delay(1_000, None, 1_000, period), None);
        assert_eq!(super::wake_delay(900, None, 1_000, period), None);
        assert_eq!(super::wake_delay(1_500, None, 1_000, period), None);
    }
}
