//! The embedded rumqttd: started on a private loopback port, usable only by the front and the
//! orchestrator.
//!
//! rumqttd authenticates nothing we could use (see DESIGN.md), so its only listener is a
//! plain-TCP one on 127.0.0.1 guarded by rumqttd's external-auth hook: a connection is accepted
//! only if its password is this broker's random secret and its username equals its client id.
//! The front presents that secret for every device it relays; the orchestrator's own client gets
//! it from [`EmbeddedBroker::credentials_for`].
//!
//! Lifetime: rumqttd has no shutdown. Its router and server threads live as long as the process;
//! dropping an [`EmbeddedBroker`] only drops the handle. Tests start one broker per test, which
//! costs a few idle threads each.

use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{Connect, Login, Packet, Protocol};
use rumqttd::{Config, ConnectionSettings, RouterConfig, SegmentConfig, ServerSettings};
use subtle::ConstantTimeEq;

use crate::BrokerError;

/// Room on top of [`BrokerConfig::max_payload_bytes`] for the topic, properties and headers of
/// a PUBLISH: rumqttd compares its `max_payload_size` with the whole remaining length, and the
/// front's operator limit (1 MiB + 4 KiB packets) must fit under it.
pub const PACKET_OVERHEAD_BYTES: usize = 16 * 1024;

/// Connections the backend accepts beyond [`BrokerConfig::max_connections`]: the orchestrator's
/// own clients and the readiness probe must never be locked out by a full fleet.
const RESERVED_CONNECTIONS: usize = 64;

/// How often a port is re-picked when another process took it between our probe and rumqttd's
/// bind.
const START_ATTEMPTS: u32 = 5;

/// How long one attempt waits for rumqttd to answer a CONNECT.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The client id of the readiness probe's backend connection.
const PROBE_CLIENT_ID: &str = "aloft-broker-probe";

/// Settings of the embedded rumqttd.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Most MQTT connections the fleet may hold open through the front.
    pub max_connections: usize,
    /// Largest PUBLISH payload that must pass (manifests, firmware chunks, release uploads).
    pub max_payload_bytes: usize,
    /// Packets rumqttd reads from one connection in a batch before handing them to its router.
    pub max_inflight_count: usize,
    /// Size of one in-memory log segment of an ordinary filter (a device's own subtree, a
    /// manifest). rumqttd keeps `segment_count` of them per filter for as long as the process
    /// lives, so this times the number of devices bounds broker memory; a subscriber that falls
    /// further behind than `segment_bytes × segment_count` loses the oldest messages.
    pub segment_bytes: usize,
    /// Segments kept per ordinary filter.
    pub segment_count: usize,
    /// Filters that aggregate the whole fleet (the orchestrator's own subscriptions). They get
    /// bigger logs so that a burst of reports from thousands of devices is not overwritten
    /// before the orchestrator reads it. Matched by rumqttd's filter-against-pattern rule.
    pub wide_filters: Vec<String>,
    /// Segment size of a wide filter.
    pub wide_segment_bytes: usize,
    /// Segments kept per wide filter.
    pub wide_segment_count: usize,
    /// Most packets rumqttd moves to one connection per scheduling round.
    pub max_outgoing_packet_count: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        let root = aloft_proto::topics::ROOT;
        Self {
            max_connections: 20_000,
            max_payload_bytes: 1024 * 1024,
            max_inflight_count: 100,
            // A device's log sees its job, acks and chunk responses. 128 KiB × 2 holds a window
            // of several 16 KiB chunks while keeping 20,000 devices under ~5 GiB worst case
            // (rumqttd never frees a filter's last segments).
            segment_bytes: 128 * 1024,
            segment_count: 2,
            wide_filters: vec![
                format!("{root}/d/+/status"),
                format!("{root}/d/+/chunk/req"),
                format!("{root}/admin/#"),
            ],
            wide_segment_bytes: 4 * 1024 * 1024,
            wide_segment_count: 4,
            max_outgoing_packet_count: 200,
        }
    }
}

impl BrokerConfig {
    /// Refuses settings rumqttd would panic on or that make the broker useless.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let bad = |m: &str| Err(BrokerError::Config(m.to_owned()));
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1");
        }
        if self.max_payload_bytes < 1024 {
            return bad("max_payload_bytes must be at least 1024");
        }
        if self.max_payload_bytes + PACKET_OVERHEAD_BYTES > 256 * 1024 * 1024 {
            return bad("max_payload_bytes exceeds what MQTT can frame");
        }
        if self.max_inflight_count == 0 || self.max_outgoing_packet_count == 0 {
            return bad("max_inflight_count and max_outgoing_packet_count must be at least 1");
        }
        // rumqttd's CommitLog::new panics below these values.
        if self.segment_bytes < 1024 || self.wide_segment_bytes < 1024 {
            return bad("segment sizes must be at least 1024 bytes");
        }
        if self.segment_count == 0 || self.wide_segment_count == 0 {
            return bad("segment counts must be at least 1");
        }
        Ok(())
    }

    fn to_rumqttd(&self, listen: SocketAddr, secret: &BackendSecret) -> Config {
        let custom_segment: HashMap<String, SegmentConfig> = self
            .wide_filters
            .iter()
            .map(|f| {
                let seg = SegmentConfig {
                    max_segment_size: self.wide_segment_bytes,
                    max_segment_count: self.wide_segment_count,
                };
                (f.clone(), seg)
            })
            .collect();
        let router = RouterConfig {
            max_connections: self.max_connections + RESERVED_CONNECTIONS,
            max_outgoing_packet_count: self.max_outgoing_packet_count,
            max_segment_size: self.segment_bytes,
            max_segment_count: self.segment_count,
            custom_segment: Some(custom_segment),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let mut connections = ConnectionSettings {
            // The front sends CONNECT as soon as it has validated the device's, and the
            // orchestrator connects directly: nobody legitimate is slow here.
            connection_timeout_ms: 5_000,
            max_payload_size: self.max_payload_bytes + PACKET_OVERHEAD_BYTES,
            max_inflight_count: self.max_inflight_count,
            auth: None,
            external_auth: None,
            // Without dynamic filters rumqttd disconnects any client that publishes to a topic
            // nobody has subscribed to yet (a device's first status, a job retained before the
            // device is online): with them it opens a log for that topic instead.
            dynamic_filters: true,
        };
        let secret = secret.clone();
        connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
            let ok = secret.matches(&pass) && user == client_id;
            async move { ok }
        });
        let server = ServerSettings {
            name: "aloft-backend".to_owned(),
            listen,
            tls: None,
            // The front already rate-limits handshakes; rumqttd's per-accept sleep would only
            // cap the fleet's reconnect rate.
            next_connection_delay_ms: 0,
            connections,
        };
        Config {
            id: 0,
            router,
            v5: Some(HashMap::from([("aloft".to_owned(), server)])),
            ..Config::default()
        }
    }
}

/// The backend's shared secret (64 hex digits). Its `Debug` never shows it.
#[derive(Clone)]
pub struct BackendSecret(Arc<str>);

impl BackendSecret {
    fn generate() -> Result<Self, BrokerError> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| BrokerError::Random(e.to_string()))?;
        Ok(Self(hex::encode(raw).into()))
    }

    /// The secret, for a CONNECT password.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison, so that timing does not leak how much of a guess was right.
    pub fn matches(&self, candidate: &str) -> bool {
        self.0.as_bytes().ct_eq(candidate.as_bytes()).into()
    }
}

impl fmt::Debug for BackendSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackendSecret(..)")
    }
}

/// Where the front relays to, and with what secret.
#[derive(Debug, Clone)]
pub struct BackendAddr {
    /// The embedded broker's loopback listener.
    pub addr: SocketAddr,
    /// The password every backend connection must present.
    pub secret: BackendSecret,
}

/// A running embedded rumqttd. See the module docs for its lifetime.
pub struct EmbeddedBroker {
    backend: BackendAddr,
    /// rumqttd's server thread; it never returns while the broker serves.
    _thread: JoinHandle<()>,
}

impl fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("backend", &self.backend)
            .finish()
    }
}

impl EmbeddedBroker {
    /// Starts rumqttd on a free loopback port and returns once it answers a CONNECT.
    ///
    /// Blocks for up to a few seconds (a real connect handshake is the readiness signal): from
    /// async code call it through `tokio::task::spawn_blocking`.
    pub fn start(cfg: BrokerConfig) -> Result<EmbeddedBroker, BrokerError> {
        cfg.validate()?;
        let secret = BackendSecret::generate()?;
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS {
            // rumqttd binds its own listener and cannot report its port, so we find a free one
            // and release it. Another process may take it in between: the probe notices (our
            // server thread exits, or the CONNECT is not answered as ours) and we try again.
            let addr = StdListener::bind("127.0.0.1:0")?.local_addr()?;
            let config = cfg.to_rumqttd(addr, &secret);
            let thread = std::thread::Builder::new()
                .name(format!("rumqttd-{}", addr.port()))
                .spawn(move || {
                    let mut broker = rumqttd::Broker::new(config);
                    if let Err(e) = broker.start() {
                        tracing::error!(error = %e, "embedded broker stopped");
                    }
                })?;
            match wait_ready(addr, &secret, &thread) {
                Ok(()) => {
                    tracing::info!(%addr, "embedded broker ready");
                    return Ok(EmbeddedBroker {
                        backend: BackendAddr { addr, secret },
                        _thread: thread,
                    });
                }
                Err(e) => {
                    tracing::warn!(%addr, attempt, error = %e, "embedded broker not ready; retrying on another port");
                    last = e;
                }
            }
        }
        Err(BrokerError::NotReady {
            attempts: START_ATTEMPTS,
            last,
        })
    }

    /// The backend's loopback address.
    pub fn addr(&self) -> SocketAddr {
        self.backend.addr
    }

    /// Address and secret, for the front.
    pub fn backend(&self) -> BackendAddr {
        self.backend.clone()
    }

    /// The username and password a direct backend client (the orchestrator's own) must use
    /// with `client_id`.
    pub fn credentials_for(&self, client_id: &str) -> (String, String) {
        (
            client_id.to_owned(),
            self.backend.secret.as_str().to_owned(),
        )
    }
}

/// Connects to `addr` as a backend client until rumqttd answers with a successful CONNACK.
fn wait_ready(
    addr: SocketAddr,
    secret: &BackendSecret,
    thread: &JoinHandle<()>,
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = "no attempt".to_owned();
    while Instant::now() < deadline {
        if thread.is_finished() {
            return Err("broker thread exited (port taken?)".to_owned());
        }
        match probe(addr, secret) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("timed out: {last}"))
}

fn probe(addr: SocketAddr, secret: &BackendSecret) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    let mut stream = StdStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(io)?;
    let connect = Packet::Connect(
        Connect {
            keep_alive: 10,
            client_id: PROBE_CLIENT_ID.to_owned(),
            clean_session: true,
        },
        None,
        None,
        None,
        Some(Login {
            username: PROBE_CLIENT_ID.to_owned(),
            password: secret.as_str().to_owned(),
        }),
    );
    let mut buf = BytesMut::new();
    V5.write(connect, &mut buf).map_err(|e| e.to_string())?;
    stream.write_all(&buf).map_err(io)?;
    // CONNACK: type 0x20, remaining length, session-present flags, reason code, properties.
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).map_err(io)?;
    if head[0] != 0x20 || head[3] != 0 {
        return Err(format!("unexpected answer {head:02x?}"));
    }
    // Leave like a client that went away, which rumqttd logs at info: FIN, then read until it
    // closes too. A DISCONNECT would be logged as an error ("router-drop"), and closing with
    // the CONNACK's properties unread would reset the connection (logged as an error too).
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut rest = [0u8; 256];
    while matches!(stream.read(&mut rest), Ok(1..)) {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_comparison_accepts_only_the_exact_secret() {
        let s = BackendSecret::generate().unwrap();
        assert_eq!(s.as_str().len(), 64);
        assert!(s.matches(s.as_str()));
        assert!(!s.matches(""));
        assert!(!s.matches(&s.as_str()[..63]));
        assert!(!format!("{s:?}").contains(s.as_str()));
    }

    #[test]
    fn configs_rumqttd_would_panic_on_are_refused() {
        let mut c = BrokerConfig {
            segment_bytes: 512,
            ..BrokerConfig::default()
        };
        assert!(c.validate().is_err());
        c.segment_bytes = 1024;
        c.wide_segment_count = 0;
        assert!(c.validate().is_err());
        assert!(BrokerConfig::default().validate().is_ok());
    }

    #[test]
    fn backend_accepts_only_the_secret_with_username_equal_to_client_id() {
        let broker = EmbeddedBroker::start(BrokerConfig::default()).unwrap();
        let secret = broker.backend().secret;
        assert!(probe(broker.addr(), &secret).is_ok());
        let wrong = BackendSecret("0".repeat(64).into());
        assert!(probe(broker.addr(), &wrong).is_err());
        let (user, pass) = broker.credentials_for("aloft-orchestrator");
        assert_eq!(user, "aloft-orchestrator");
        assert_eq!(pass, secret.as_str());
    }
}
