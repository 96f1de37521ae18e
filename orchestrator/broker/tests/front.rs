//! End-to-end tests of the device-facing edge: the real mTLS front serving devices on its
//! device road and relaying operators to a real embedded rumqttd, real certificates from a
//! fresh fleet CA per test, real rumqttc v5 clients (and raw TLS sockets where a test needs to
//! send bytes no client library would). The orchestrator's side of the device road is the
//! road itself: its inbox and `DirectRoutes::publish`.
//!
//! Every refusal test ends by showing that a valid device still works: a rejection must never
//! wedge anything.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aloft_broker::front::acl::device_filters;
use aloft_broker::{
    serve, serve_plain_insecure, BrokerConfig, DeviceBound, DeviceMessage, DeviceTopic,
    EmbeddedBroker, FrontConfig, FrontContext, FrontStatsSnapshot,
};
use aloft_certs::tls::{
    client_config, client_config_without_cert, install_crypto_provider, server_config,
};
use aloft_certs::{device_csr, FleetCa, Validity};
use aloft_proto::{DeviceId, OperatorId};
use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    Connect, Filter, Packet as WirePacket, Protocol, QoS as WireQoS, RetainForwardRule, Subscribe,
};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

// ---------------------------------------------------------------- harness

/// Upper bound for every test; nothing inside is timed, this only stops a hang.
const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test exceeded its time bound");
}

/// An embedded broker with the front before it, and the CA that issues everyone's certificates.
struct Edge {
    ca: FleetCa,
    broker: EmbeddedBroker,
    ctx: Arc<FrontContext>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    /// What devices sent the orchestrator on the device road.
    inbox: tokio::sync::Mutex<mpsc::Receiver<DeviceMessage>>,
}

impl Edge {
    async fn start() -> Edge {
        Edge::with(FrontConfig::default()).await
    }

    async fn with(cfg: FrontConfig) -> Edge {
        install_crypto_provider();
        let ca = FleetCa::create("Aloft Broker Test CA", 30).unwrap();
        let hosts = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let server = ca.issue_server(&hosts, Validity::days(1)).unwrap();
        let tls = server_config(ca.cert_pem(), &server.cert_pem, &server.key_pem, vec![]).unwrap();
        let broker = tokio::task::spawn_blocking(|| EmbeddedBroker::start(BrokerConfig::default()))
            .await
            .unwrap()
            .unwrap();
        let ctx = Arc::new(FrontContext::new(Arc::new(tls), broker.backend(), cfg).unwrap());
        let inbox = tokio::sync::Mutex::new(ctx.direct.take_inbox().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, Arc::clone(&ctx), async {
            let _ = stopped.await;
        }));
        Edge {
            ca,
            broker,
            ctx,
            addr,
            stop: Some(stop),
            inbox,
        }
    }

    /// The orchestrator sends `device` a message on the device road.
    fn send(&self, device: &str, kind: DeviceBound, payload: &[u8], retain: bool) {
        let id = DeviceId::new(device).unwrap();
        self.ctx
            .direct
            .publish(&id, kind, bytes::Bytes::copy_from_slice(payload), retain)
            .unwrap();
    }

    /// The next message any device sent the orchestrator: its topic and payload.
    async fn received(&self) -> (String, Vec<u8>) {
        let m = self.inbox.lock().await.recv().await.expect("inbox open");
        let leaf = match m.topic {
            DeviceTopic::Status => "status",
            DeviceTopic::ChunkRequest => "chunk/req",
            DeviceTopic::Health => "health",
            DeviceTopic::Csr => "csr",
        };
        (
            format!("aloft/v1/d/{}/{leaf}", m.device),
            m.payload.to_vec(),
        )
    }

    fn stats(&self) -> FrontStatsSnapshot {
        self.ctx.stats.snapshot()
    }

    /// Enrolls device `id` (CSR, key stays here) and returns its TLS client config.
    fn device_tls(&self, id: &str, validity: Validity) -> Arc<ClientConfig> {
        let csr = device_csr(&DeviceId::new(id).unwrap(), &[7; 32]).unwrap();
        let cert = self.ca.issue_device(&csr.csr_pem, validity).unwrap();
        Arc::new(client_config(self.ca.cert_pem(), &cert, &csr.key_pem).unwrap())
    }

    fn operator_tls(&self, id: &str) -> Arc<ClientConfig> {
        let op = self
            .ca
            .issue_operator(
                &OperatorId::new(id).unwrap(),
                aloft_certs::OperatorRole::Operator,
                Validity::days(1),
            )
            .unwrap();
        Arc::new(client_config(self.ca.cert_pem(), &op.cert_pem, &op.key_pem).unwrap())
    }

    fn options(&self, client_id: &str, tls: Arc<ClientConfig>) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, "localhost", self.addr.port());
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        o.set_outgoing_inflight_upper_limit(100);
        o
    }

    async fn device(&self, id: &str) -> Mqtt {
        let tls = self.device_tls(id, Validity::days(1));
        Mqtt::connect(self.options(id, tls)).await.unwrap()
    }

    /// The orchestrator's side: a client connected straight to the backend.
    async fn backend_client(&self, id: &str) -> Mqtt {
        let addr = self.broker.addr();
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        let (user, pass) = self.broker.credentials_for(id);
        o.set_credentials(user, pass);
        o.set_outgoing_inflight_upper_limit(100);
        Mqtt::connect(o).await.unwrap()
    }

    /// A TLS connection as device `id`, for writing raw bytes.
    async fn raw_tls(&self, id: &str) -> TlsStream<TcpStream> {
        let connector = TlsConnector::from(self.device_tls(id, Validity::days(1)));
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        connector.connect(name, tcp).await.unwrap()
    }

    /// The project rule after every refusal: a fresh, valid device connects, subscribes to its
    /// own subtree and receives what the orchestrator sends it.
    async fn assert_valid_device_works(&self, id: &str) {
        let mut dev = self.device(id).await;
        dev.subscribe(&format!("aloft/v1/d/{id}/#")).await;
        assert!(dev
            .suback()
            .await
            .iter()
            .all(|c| matches!(c, SubscribeReasonCode::Success(_))));
        self.send(id, DeviceBound::Ack, b"ack", false);
        assert_eq!(dev.next_publish().await.0, format!("aloft/v1/d/{id}/ack"));
        dev.publish(&format!("aloft/v1/d/{id}/status"), b"ok", false)
            .await;
        assert_eq!(
            self.received().await,
            (format!("aloft/v1/d/{id}/status"), b"ok".to_vec())
        );
    }
}

#[derive(Debug)]
enum Ev {
    Publish(String, Vec<u8>, bool),
    SubAck(Vec<SubscribeReasonCode>),
    PubAck,
    Closed(String),
}

/// A connected rumqttc v5 client whose event loop runs in a task, reporting events in order.
/// The loop stops at the first error, so a refused client is never silently reconnected.
struct Mqtt {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Ev>,
}

impl Mqtt {
    async fn connect(opts: MqttOptions) -> Result<Mqtt, ConnectionError> {
        let (client, mut el) = AsyncClient::new(opts, 32);
        loop {
            match el.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => break,
                _ => continue,
            }
        }
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let ev = match el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        Ev::Publish(topic, p.payload.to_vec(), p.retain)
                    }
                    Ok(Event::Incoming(Packet::SubAck(s))) => Ev::SubAck(s.return_codes),
                    Ok(Event::Incoming(Packet::PubAck(_))) => Ev::PubAck,
                    Ok(Event::Incoming(Packet::Disconnect(d))) => {
                        Ev::Closed(format!("disconnect {:?}", d.reason_code))
                    }
                    Ok(_) => continue,
                    Err(e) => Ev::Closed(e.to_string()),
                };
                let closed = matches!(ev, Ev::Closed(_));
                if tx.send(ev).is_err() || closed {
                    break;
                }
            }
        });
        Ok(Mqtt { client, events })
    }

    async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
    }

    async fn publish(&self, topic: &str, payload: &[u8], retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .await
            .unwrap();
    }

    async fn next(&mut self) -> Ev {
        self.events
            .recv()
            .await
            .unwrap_or(Ev::Closed("event loop gone".into()))
    }

    async fn suback(&mut self) -> Vec<SubscribeReasonCode> {
        loop {
            match self.next().await {
                Ev::SubAck(codes) => return codes,
                Ev::Closed(why) => panic!("closed while waiting for SUBACK: {why}"),
                _ => {}
            }
        }
    }

    async fn next_publish(&mut self) -> (String, Vec<u8>, bool) {
        loop {
            match self.next().await {
                Ev::Publish(t, p, r) => return (t, p, r),
                Ev::Closed(why) => panic!("closed while waiting for a PUBLISH: {why}"),
                _ => {}
            }
        }
    }

    /// Waits until the connection is closed and returns why; panics if a PUBLISH arrives.
    async fn closed(&mut self) -> String {
        loop {
            match self.next().await {
                Ev::Closed(why) => return why,
                Ev::Publish(t, ..) => panic!("unexpected PUBLISH on {t}"),
                _ => {}
            }
        }
    }
}

fn connect_bytes(client_id: &str, keep_alive: u16) -> BytesMut {
    let connect = Connect {
        keep_alive,
        client_id: client_id.into(),
        clean_session: true,
    };
    let mut buf = BytesMut::new();
    V5.write(
        WirePacket::Connect(connect, None, None, None, None),
        &mut buf,
    )
    .unwrap();
    buf
}

/// Reads until the peer closes (EOF or error) and returns what arrived.
async fn read_to_close<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n @ 1..) = s.read(&mut buf).await {
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// The server refuses the client's certificate with `alert`. Under TLS 1.3 the client learns
/// it only after its own half of the handshake, so the alert surfaces on the first read.
async fn refused_at_tls(edge: &Edge, id: &str, tls: Arc<ClientConfig>, alert: &str) {
    let err = Mqtt::connect(edge.options(id, tls))
        .await
        .err()
        .expect("connection must fail");
    let err = format!("{err:?}");
    assert!(
        err.contains(&format!("AlertReceived({alert})")),
        "expected alert {alert}, got {err}"
    );
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_with_valid_cert_can_subscribe_and_receive_its_own_topics() {
    bounded(async {
        let edge = Edge::start().await;
        // A retained job published before the device connects is delivered on subscribe.
        edge.send("dev-1", DeviceBound::Job, b"job-1", true);

        let mut dev = edge.device("dev-1").await;
        dev.subscribe("aloft/v1/d/dev-1/#").await;
        dev.subscribe("aloft/v1/manifests/#").await;
        let (topic, payload, retained) = dev.next_publish().await;
        assert_eq!(
            (topic.as_str(), payload.as_slice(), retained),
            ("aloft/v1/d/dev-1/job", &b"job-1"[..], true)
        );
        // A new job reaches the subscribed device at once; a cleared one as an empty message.
        edge.send("dev-1", DeviceBound::Job, b"job-2", true);
        assert_eq!(dev.next_publish().await.1, b"job-2");
        edge.send("dev-1", DeviceBound::Job, b"", true);
        assert_eq!(dev.next_publish().await.1, b"");
        edge.send("dev-1", DeviceBound::ChunkResponse, b"frame", false);
        assert_eq!(
            dev.next_publish().await,
            (
                "aloft/v1/d/dev-1/chunk/resp".to_owned(),
                b"frame".to_vec(),
                false
            )
        );

        dev.publish("aloft/v1/d/dev-1/status", b"{\"state\":\"idle\"}", false)
            .await;
        let (topic, payload) = edge.received().await;
        assert_eq!(topic, "aloft/v1/d/dev-1/status");
        assert_eq!(payload, b"{\"state\":\"idle\"}");
        dev.publish("aloft/v1/d/dev-1/chunk/req", b"0-3", false)
            .await;
        assert_eq!(edge.received().await.0, "aloft/v1/d/dev-1/chunk/req");
        let s = edge.stats();
        assert_eq!((s.handshakes_ok, s.sessions_established), (1, 1));
        assert!(edge
            .ctx
            .registry
            .is_connected(&aloft_broker::Peer::Device(DeviceId::new("dev-1").unwrap())));
    })
    .await;
}

/// The PUBACK of a chunk request or a status report may wait for what answers it, to leave in
/// the same write (`session::ACK_HOLD`): it still comes first, and it comes when nothing answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_puback_comes_before_its_answer_and_without_one() {
    bounded(async {
        let edge = Edge::start().await;
        let mut dev = edge.device("dev-1").await;
        dev.subscribe("aloft/v1/d/dev-1/#").await;
        assert_eq!(dev.suback().await.len(), 1);
        let mut next_two = async |answer: Option<(DeviceBound, &[u8])>, topic: &str| {
            dev.publish(topic, b"{}", false).await;
            assert_eq!(edge.received().await.0, topic);
            if let Some((kind, payload)) = answer {
                edge.send("dev-1", kind, payload, false);
            }
            assert!(matches!(dev.next().await, Ev::PubAck), "the PUBACK first");
            if let Some((_, payload)) = answer {
                assert_eq!(dev.next_publish().await.1, payload);
            }
        };
        let (req, status) = ("aloft/v1/d/dev-1/chunk/req", "aloft/v1/d/dev-1/status");
        next_two(Some((DeviceBound::ChunkResponse, b"frame")), req).await;
        next_two(Some((DeviceBound::Ack, b"ack")), status).await;
        next_two(None, req).await;
        next_two(None, status).await;
        // A health report's PUBACK is not held; all are acknowledged.
        next_two(None, "aloft/v1/d/dev-1/health").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_publishes_admin_requests_and_receives_replies_only_on_its_own_topics() {
    bounded(async {
        let edge = Edge::start().await;
        let mut orch = edge.backend_client("aloft-orchestrator").await;
        orch.subscribe("aloft/v1/admin/+/+").await;
        orch.suback().await;
        let mut alice = Mqtt::connect(edge.options("alice", edge.operator_tls("alice")))
            .await
            .unwrap();
        alice.subscribe("aloft/v1/o/alice/reply").await;
        alice.suback().await;
        alice
            .publish("aloft/v1/admin/alice/campaign.list", b"{}", false)
            .await;
        assert_eq!(
            orch.next_publish().await.0,
            "aloft/v1/admin/alice/campaign.list"
        );
        orch.publish("aloft/v1/o/alice/reply", b"[]", false).await;
        assert_eq!(alice.next_publish().await.1, b"[]");
        // An operator is not a device: device topics are off limits.
        alice.subscribe("aloft/v1/d/dev-1/#").await;
        alice.closed().await;
        assert_eq!(edge.stats().acl_denied_subscribe, 1);
        edge.assert_valid_device_works("dev-after-operator").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_client_certificate_is_refused_at_tls() {
    bounded(async {
        let edge = Edge::start().await;
        let tls = Arc::new(client_config_without_cert(edge.ca.cert_pem()).unwrap());
        refused_at_tls(&edge, "dev-1", tls, "CertificateRequired").await;
        edge.assert_valid_device_works("dev-ok").await;
        assert_eq!(edge.stats().handshakes_failed, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused_at_tls() {
    bounded(async {
        let edge = Edge::start().await;
        let rogue = FleetCa::create("Rogue CA", 30).unwrap();
        let csr = device_csr(&DeviceId::new("dev-1").unwrap(), &[7; 32]).unwrap();
        let cert = rogue.issue_device(&csr.csr_pem, Validity::days(1)).unwrap();
        // The client trusts our server (so the failure is the server refusing the client).
        let tls = Arc::new(client_config(edge.ca.cert_pem(), &cert, &csr.key_pem).unwrap());
        refused_at_tls(&edge, "dev-1", tls, "UnknownCA").await;
        edge.assert_valid_device_works("dev-1").await;
        assert_eq!(edge.stats().handshakes_failed, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_is_refused_at_tls() {
    bounded(async {
        let edge = Edge::start().await;
        let now = time::OffsetDateTime::now_utc();
        let expired = Validity {
            not_before: now - time::Duration::days(10),
            not_after: now - time::Duration::days(1),
        };
        let tls = edge.device_tls("dev-1", expired);
        refused_at_tls(&edge, "dev-1", tls, "CertificateExpired").await;
        edge.assert_valid_device_works("dev-1").await;
        assert_eq!(edge.stats().handshakes_failed, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_different_from_certificate_is_refused() {
    bounded(async {
        let edge = Edge::start().await;
        let tls = edge.device_tls("dev-1", Validity::days(1));
        let err = Mqtt::connect(edge.options("dev-2", tls))
            .await
            .err()
            .expect("must be refused");
        assert!(
            matches!(
                err,
                ConnectionError::ConnectionRefused(ConnectReturnCode::ClientIdentifierNotValid)
            ),
            "{err:?}"
        );
        assert_eq!(edge.stats().refused_bad_client_id, 1);
        edge.assert_valid_device_works("dev-2").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_another_devices_topic_is_refused_and_not_delivered() {
    bounded(async {
        let edge = Edge::start().await;
        let mut a = edge.device("dev-a").await;
        a.publish("aloft/v1/d/dev-b/status", b"forged", false).await;
        assert!(a.closed().await.contains("NotAuthorized"));
        assert_eq!(edge.stats().acl_denied_publish, 1);
        // Had the forged report been forwarded it would have reached the inbox before A's
        // DISCONNECT; the first report the orchestrator sees is B's genuine one.
        let b = edge.device("dev-b").await;
        b.publish("aloft/v1/d/dev-b/status", b"genuine", false)
            .await;
        assert_eq!(edge.received().await.1, b"genuine");
        edge.assert_valid_device_works("dev-a").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_to_hash_wildcard_is_refused() {
    bounded(async {
        let edge = Edge::start().await;
        for (n, filter) in ["#", "aloft/v1/d/+/job", "$share/g/aloft/v1/d/dev-1/#"]
            .iter()
            .enumerate()
        {
            let mut dev = edge.device("dev-1").await;
            dev.subscribe(filter).await;
            assert!(dev.closed().await.contains("NotAuthorized"), "{filter}");
            assert_eq!(edge.stats().acl_denied_subscribe, n as u64 + 1);
        }
        edge.assert_valid_device_works("dev-1").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_publish_from_device_is_refused() {
    bounded(async {
        let edge = Edge::start().await;
        let mut dev = edge.device("dev-1").await;
        dev.publish("aloft/v1/d/dev-1/status", b"sticky", true)
            .await;
        assert!(dev.closed().await.contains("NotAuthorized"));
        assert_eq!(edge.stats().acl_denied_publish, 1);
        // Nothing was passed on: the first report the orchestrator sees is the fresh one.
        let dev = edge.device("dev-1").await;
        dev.publish("aloft/v1/d/dev-1/status", b"fresh", false)
            .await;
        assert_eq!(edge.received().await.1, b"fresh");
        edge.assert_valid_device_works("dev-2").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_with_same_identity_does_not_hijack_the_first() {
    bounded(async {
        let edge = Edge::start().await;
        let mut first = edge.device("dev-1").await;
        first.subscribe("aloft/v1/d/dev-1/#").await;
        first.suback().await;

        let tls = edge.device_tls("dev-1", Validity::days(1));
        let err = Mqtt::connect(edge.options("dev-1", tls))
            .await
            .err()
            .expect("must be refused");
        assert!(
            matches!(
                err,
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
            ),
            "{err:?}"
        );
        assert_eq!(edge.stats().refused_duplicate_identity, 1);

        edge.send("dev-1", DeviceBound::Job, b"still yours", true);
        assert_eq!(first.next_publish().await.1, b"still yours");
        first
            .publish("aloft/v1/d/dev-1/status", b"alive", false)
            .await;
        assert_eq!(edge.received().await.1, b"alive");
        edge.assert_valid_device_works("dev-2").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_closed_after_one_and_a_half_keep_alives_and_its_identity_freed() {
    bounded(async {
        let edge = Edge::start().await;
        let mut raw = edge.raw_tls("dev-1").await;
        raw.write_all(&connect_bytes("dev-1", 1)).await.unwrap();
        // CONNACK success, then silence until the front gives up with DISCONNECT 0x8D.
        let got = read_to_close(&mut raw).await;
        assert_eq!(
            (got[0], got[3]),
            (0x20, 0x00),
            "CONNACK must be success: {got:02x?}"
        );
        assert!(got.ends_with(&[0xE0, 0x02, 0x8D, 0x00]), "{got:02x?}");
        assert_eq!(edge.stats().keep_alive_timeouts, 1);
        edge.assert_valid_device_works("dev-1").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_connect_is_refused_with_unsupported_protocol_version() {
    bounded(async {
        let edge = Edge::start().await;
        let mut raw = edge.raw_tls("dev-1").await;
        raw.write_all(b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05dev-1")
            .await
            .unwrap();
        let got = read_to_close(&mut raw).await;
        assert_eq!((got[0], got[3]), (0x20, 0x84), "{got:02x?}");
        assert_eq!(edge.stats().refused_protocol, 1);
        edge.assert_valid_device_works("dev-1").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_open_sockets_do_not_delay_other_devices() {
    bounded(async {
        let cfg = FrontConfig {
            handshake_timeout_ms: 3_000,
            ..FrontConfig::default()
        };
        let edge = Edge::with(cfg).await;
        let mut idle = Vec::new();
        for _ in 0..50 {
            idle.push(TcpStream::connect(edge.addr).await.unwrap());
        }
        // Half a real ClientHello, then nothing.
        let tls = edge.device_tls("dev-x", Validity::days(1));
        let mut hello = Vec::new();
        let mut conn =
            rustls::ClientConnection::new(tls, ServerName::try_from("localhost").unwrap()).unwrap();
        conn.write_tls(&mut hello).unwrap();
        for _ in 0..10 {
            let mut s = TcpStream::connect(edge.addr).await.unwrap();
            s.write_all(&hello[..hello.len() / 2]).await.unwrap();
            idle.push(s);
        }
        // While all 60 are open and stuck, a real device connects and is served.
        edge.assert_valid_device_works("dev-1").await;
        assert_eq!(
            edge.stats().handshakes_timed_out,
            0,
            "dev-1 was served while all 60 were still open and stuck"
        );
        // Then the handshake timeout closes every one of them.
        for s in &mut idle {
            read_to_close(s).await;
        }
        let stats = edge.stats();
        assert_eq!(stats.handshakes_timed_out, 60, "{stats:?}");
        edge.assert_valid_device_works("dev-2").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_packets_close_the_connection_without_harm() {
    bounded(async {
        let edge = Edge::start().await;
        // Garbage instead of CONNECT.
        let mut raw = edge.raw_tls("dev-1").await;
        raw.write_all(b"\x10\x05\xde\xad\xbe\xef\x00")
            .await
            .unwrap();
        let got = read_to_close(&mut raw).await;
        assert_eq!((got[0], got[3]), (0x20, 0x81), "{got:02x?}");
        // A server-only packet type first: malformed too.
        let mut raw = edge.raw_tls("dev-1").await;
        raw.write_all(b"\x20\x03\x00\x00\x00").await.unwrap();
        let got = read_to_close(&mut raw).await;
        assert_eq!((got[0], got[3]), (0x20, 0x81), "{got:02x?}");
        // After a good CONNECT: a PUBLISH header claiming 100 MB.
        let mut raw = edge.raw_tls("dev-1").await;
        raw.write_all(&connect_bytes("dev-1", 30)).await.unwrap();
        raw.write_all(b"\x30\x80\xde\xe1\x2f").await.unwrap();
        let got = read_to_close(&mut raw).await;
        assert!(got.ends_with(&[0xE0, 0x02, 0x95, 0x00]), "{got:02x?}");
        // After a good CONNECT: a malformed SUBSCRIBE and then a CONNACK (server-only type).
        for junk in [
            &b"\x82\x03\x00\x01\x00"[..],
            b"\x20\x03\x00\x00\x00",
            b"\x30\xff\xff\xff\xff\x7f",
        ] {
            let mut raw = edge.raw_tls("dev-1").await;
            raw.write_all(&connect_bytes("dev-1", 30)).await.unwrap();
            raw.write_all(junk).await.unwrap();
            let got = read_to_close(&mut raw).await;
            assert!(
                got.ends_with(&[0xE0, 0x02, 0x81, 0x00]),
                "{junk:02x?} -> {got:02x?}"
            );
        }
        let s = edge.stats();
        assert_eq!(
            (
                s.oversized_packets,
                s.malformed_packets,
                s.refused_malformed
            ),
            (1, 3, 2)
        );
        edge.assert_valid_device_works("dev-1").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_plain_listener_takes_the_device_id_from_the_client_id_only_when_enabled() {
    bounded(async {
        let edge = Edge::start().await;
        for enabled in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let (_stop, stopped) = oneshot::channel::<()>();
            let ctx = Arc::clone(&edge.ctx);
            tokio::spawn(serve_plain_insecure(listener, ctx, enabled, async {
                let _ = stopped.await;
            }));
            let connected = Mqtt::connect(MqttOptions::new("dev-plain", "127.0.0.1", port)).await;
            if !enabled {
                let err = connected.err().expect("a closed plain listener refuses");
                assert!(
                    matches!(
                        err,
                        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
                    ),
                    "{err:?}"
                );
                continue;
            }
            // Even here the ACL holds for the claimed identity.
            let mut dev = connected.unwrap();
            dev.publish("aloft/v1/d/dev-other/status", b"x", false)
                .await;
            assert!(dev.closed().await.contains("NotAuthorized"));
        }
        edge.assert_valid_device_works("dev-plain").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_drops_relayed_sessions() {
    bounded(async {
        let mut edge = Edge::start().await;
        let mut dev = edge.device("dev-1").await;
        dev.subscribe("aloft/v1/d/dev-1/#").await;
        dev.suback().await;
        drop(edge.stop.take());
        dev.closed().await;
        assert!(TcpStream::connect(edge.addr).await.is_err());
        assert!(edge.ctx.registry.is_empty());
    })
    .await;
}

/// One SUBSCRIBE packet (QoS 1 filters, no properties) as raw bytes.
fn subscribe_bytes(pkid: u16, filters: &[String]) -> BytesMut {
    let filters = filters
        .iter()
        .map(|path| Filter {
            path: path.clone(),
            qos: WireQoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        })
        .collect();
    let mut buf = BytesMut::new();
    V5.write(
        WirePacket::Subscribe(Subscribe { pkid, filters }, None),
        &mut buf,
    )
    .unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_distinct_filters_inside_a_devices_own_tree_are_all_refused() {
    bounded(async {
        let edge = Edge::start().await;
        // Each made-up filter would have cost the broker ~6 KiB for as long as it runs. In
        // packets of 100 (under the device's 16 KiB packet limit), one connection each: the
        // first disallowed filter ends the connection before anything reaches the broker.
        let filters: Vec<String> = (0..1_000)
            .map(|i| format!("aloft/v1/d/dev-1/x{i:04}/#"))
            .collect();
        for (n, batch) in filters.chunks(100).enumerate() {
            let mut raw = edge.raw_tls("dev-1").await;
            raw.write_all(&connect_bytes("dev-1", 30)).await.unwrap();
            raw.write_all(&subscribe_bytes(1, batch)).await.unwrap();
            let got = read_to_close(&mut raw).await;
            assert_eq!((got[0], got[3]), (0x20, 0x00), "CONNACK: {got:02x?}");
            assert!(
                got.ends_with(&[0xE0, 0x02, 0x87, 0x00]),
                "batch {n}: {got:02x?}"
            );
            assert!(!got.contains(&0x90), "no SUBACK may come back: {got:02x?}");
        }
        assert_eq!(edge.stats().acl_denied_subscribe, 10);
        edge.assert_valid_device_works("dev-1").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_beyond_the_session_quota_are_refused_with_quota_exceeded_and_the_session_keeps_working(
) {
    bounded(async {
        let edge = Edge::start().await;
        let quota = FrontConfig::default().max_subscriptions_per_session;
        let mut dev = edge.device("dev-1").await;
        let allowed = device_filters(&DeviceId::new("dev-1").unwrap());
        // 1,000 SUBSCRIBEs of allowed filters: the first `quota` are granted, the rest
        // refused for quota.
        let mut codes = Vec::new();
        for i in 0..1_000 {
            dev.subscribe(&allowed[i % allowed.len()]).await;
            codes.extend(dev.suback().await);
        }
        let granted = codes
            .iter()
            .filter(|c| matches!(c, SubscribeReasonCode::Success(_)))
            .count();
        let over = codes
            .iter()
            .filter(|c| matches!(c, SubscribeReasonCode::QuotaExceeded))
            .count();
        assert_eq!((granted, over), (quota, 1_000 - quota), "{codes:?}");
        assert!(codes[..quota]
            .iter()
            .all(|c| matches!(c, SubscribeReasonCode::Success(_))));
        assert_eq!(
            edge.stats().subscriptions_over_quota,
            (1_000 - quota) as u64
        );
        assert_eq!(edge.stats().acl_denied_subscribe, 0);
        // The session is still up, and what it was granted still delivers.
        edge.send("dev-1", DeviceBound::Job, b"job-1", true);
        assert_eq!(dev.next_publish().await.1, b"job-1");
        dev.publish("aloft/v1/d/dev-1/status", b"alive", false)
            .await;
        assert_eq!(edge.received().await.1, b"alive");
        edge.assert_valid_device_works("dev-2").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_filter_the_reference_device_subscribes_to_is_allowed_and_within_quota() {
    bounded(async {
        let edge = Edge::start().await;
        let id = DeviceId::new("dev-1").unwrap();
        let allowed = device_filters(&id);
        for renewing in [false, true] {
            let honest = aloft_device::transport::subscriptions(&id, renewing);
            for f in &honest {
                assert!(allowed.contains(f), "{f} is not in {allowed:?}");
            }
            let mut dev = edge.device("dev-1").await;
            let filters = honest
                .iter()
                .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(f, QoS::AtLeastOnce));
            dev.client.subscribe_many(filters).await.unwrap();
            let codes = dev.suback().await;
            assert_eq!(codes.len(), honest.len());
            assert!(
                codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
                "{codes:?}"
            );
            dev.client.disconnect().await.unwrap();
            dev.closed().await;
        }
        let s = edge.stats();
        assert_eq!((s.acl_denied_subscribe, s.subscriptions_over_quota), (0, 0));
    })
    .await;
}

/// A TCP connection to the front from `source` (any 127.0.0.0/8 address reaches it).
async fn tcp_from(source: [u8; 4], edge: &Edge) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(edge.addr).await.unwrap()
}

/// Timeouts long enough that nothing in these tests is closed for time.
fn patient(cfg: FrontConfig) -> FrontConfig {
    FrontConfig {
        first_byte_timeout_ms: 60_000,
        handshake_timeout_ms: 60_000,
        ..cfg
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_address_at_its_handshake_limit_is_refused_and_counted() {
    bounded(async {
        let edge = Edge::with(patient(FrontConfig {
            max_handshakes_per_source: 4,
            ..FrontConfig::default()
        }))
        .await;
        // Four handshakes from 127.0.0.2 under way (half a ClientHello each), then stuck.
        let tls = edge.device_tls("dev-x", Validity::days(1));
        let mut hello = Vec::new();
        let mut conn =
            rustls::ClientConnection::new(tls, ServerName::try_from("localhost").unwrap()).unwrap();
        conn.write_tls(&mut hello).unwrap();
        let mut stuck = Vec::new();
        for _ in 0..4 {
            let mut s = tcp_from([127, 0, 0, 2], &edge).await;
            s.write_all(&hello[..hello.len() / 2]).await.unwrap();
            stuck.push(s);
        }
        // The front has seen their first bytes (a readiness poll, not a guess at a delay).
        while edge.ctx.pending_handshakes().in_handshake < 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A fifth socket from that address is closed at once: none of the four is silent.
        let mut fifth = tcp_from([127, 0, 0, 2], &edge).await;
        assert!(read_to_close(&mut fifth).await.is_empty());
        let s = edge.stats();
        assert_eq!(
            (s.handshakes_refused_per_source, s.handshakes_evicted),
            (1, 0)
        );
        // Other addresses are not affected.
        edge.assert_valid_device_works("dev-1").await;
        assert_eq!(edge.stats().handshakes_timed_out, 0);
        drop(stuck);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_beyond_the_table_are_evicted_and_a_device_from_their_address_still_connects(
) {
    bounded(async {
        let edge = Edge::with(patient(FrontConfig {
            max_concurrent_handshakes: 8,
            ..FrontConfig::default()
        }))
        .await;
        // 20 silent sockets from the devices' own address: a per-source limit cannot tell
        // them apart, so a full table must give up its oldest silent socket for each new one.
        let mut silent = Vec::new();
        for _ in 0..20 {
            silent.push(tcp_from([127, 0, 0, 1], &edge).await);
        }
        let (oldest, held) = silent.split_at_mut(12);
        for s in oldest.iter_mut() {
            assert!(read_to_close(s).await.is_empty());
        }
        assert_eq!(edge.stats().handshakes_evicted, 12);
        assert_eq!(
            edge.ctx.pending_handshakes(),
            aloft_broker::PendingHandshakes {
                silent: 8,
                in_handshake: 0
            }
        );
        // A device is served while the table is full of silent sockets: its socket takes the
        // slot of the oldest of them, and nobody waits for a timeout.
        edge.assert_valid_device_works("dev-1").await;
        let s = edge.stats();
        assert_eq!((s.handshakes_evicted, s.handshakes_timed_out), (13, 0));
        assert_eq!(s.handshakes_ok, 1);
        // The eight still held were never closed for time.
        assert_eq!(held.len(), 8);
        drop(silent);
    })
    .await;
}

// ------------------------------------------------- device sessions served by the front (1.4)

/// A raw device connection: CONNECT with `props` and `will`, CONNACK read, then SUBSCRIBE to
/// the device's subtree and its SUBACK read. Returns the stream and its packet reader.
async fn raw_device_session(
    edge: &Edge,
    id: &str,
    props: Option<rumqttd::protocol::ConnectProperties>,
    will: Option<rumqttd::protocol::LastWill>,
) -> (TlsStream<TcpStream>, PacketReader) {
    let mut raw = edge.raw_tls(id).await;
    let connect = Connect {
        keep_alive: 30,
        client_id: id.into(),
        clean_session: true,
    };
    let mut buf = BytesMut::new();
    V5.write(
        WirePacket::Connect(connect, props, will, None, None),
        &mut buf,
    )
    .unwrap();
    raw.write_all(&buf).await.unwrap();
    let mut reader = PacketReader::default();
    assert!(matches!(reader.next(&mut raw).await, Packet::ConnAck(..)));
    raw.write_all(&subscribe_bytes(1, &[format!("aloft/v1/d/{id}/#")]))
        .await
        .unwrap();
    assert!(matches!(reader.next(&mut raw).await, Packet::SubAck(..)));
    (raw, reader)
}

/// Reads whole MQTT 5 packets as a client sees them (rumqttc's codec) from a stream.
#[derive(Default)]
struct PacketReader {
    buf: BytesMut,
}

impl PacketReader {
    async fn next<S: tokio::io::AsyncRead + Unpin>(&mut self, s: &mut S) -> Packet {
        loop {
            if !self.buf.is_empty() {
                let mut copy = self.buf.clone();
                if let Ok(p) = Packet::read(&mut copy, None) {
                    self.buf = copy;
                    return p;
                }
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed while waiting for a packet");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn puback_bytes(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [0x40, 0x02, hi, lo]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_1_publishes_to_a_device_stay_within_its_receive_maximum() {
    bounded(async {
        let edge = Edge::start().await;
        let props = rumqttd::protocol::ConnectProperties {
            session_expiry_interval: None,
            receive_maximum: Some(1),
            max_packet_size: None,
            topic_alias_max: None,
            request_response_info: None,
            request_problem_info: None,
            user_properties: Vec::new(),
            authentication_method: None,
            authentication_data: None,
        };
        let (mut raw, mut reader) = raw_device_session(&edge, "dev-1", Some(props), None).await;
        for n in 0..3u8 {
            edge.send("dev-1", DeviceBound::Ack, &[b'0' + n], false);
        }
        // One at a time: the next leaves only after the device acknowledged the last. A
        // second one sent early would be read here instead of the PINGRESP.
        for n in 0..3u8 {
            let Packet::Publish(p) = reader.next(&mut raw).await else {
                panic!("expected an ack publish")
            };
            assert_eq!(&p.payload[..], &[b'0' + n]);
            assert_eq!(p.qos, QoS::AtLeastOnce);
            raw.write_all(&[0xC0, 0x00]).await.unwrap(); // PINGREQ
            assert!(matches!(reader.next(&mut raw).await, Packet::PingResp(_)));
            raw.write_all(&puback_bytes(p.pkid)).await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_2_publish_is_refused_and_a_will_reaches_the_orchestrator() {
    bounded(async {
        let edge = Edge::start().await;
        let will = rumqttd::protocol::LastWill {
            topic: "aloft/v1/d/dev-1/health".into(),
            message: bytes::Bytes::from_static(b"gone"),
            qos: WireQoS::AtMostOnce,
            retain: false,
        };
        let (mut raw, _) = raw_device_session(&edge, "dev-1", None, Some(will)).await;
        // QoS 2 PUBLISH on the device's own status topic: flags 0b0100.
        let mut publish = BytesMut::new();
        let topic = b"aloft/v1/d/dev-1/status";
        publish.extend_from_slice(&[0x34, (2 + topic.len() + 2 + 1 + 1) as u8]);
        publish.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        publish.extend_from_slice(topic);
        publish.extend_from_slice(&[0x00, 0x01, 0x00, b'x']);
        raw.write_all(&publish).await.unwrap();
        let got = read_to_close(&mut raw).await;
        assert!(got.ends_with(&[0xE0, 0x02, 0x9B, 0x00]), "{got:02x?}");
        // Ended by the front, not by a DISCONNECT of its own: the Will is the first (and only)
        // thing the orchestrator hears of dev-1.
        assert_eq!(
            edge.received().await,
            ("aloft/v1/d/dev-1/health".to_owned(), b"gone".to_vec())
        );
        edge.assert_valid_device_works("dev-1").await;
    })
    .await;
}
