//! The embedded broker and the front log no ERROR for what is normal: a start, clean connects
//! and disconnects of devices and operators, and a shutdown. Its own test binary, because it
//! installs a process-wide tracing subscriber (rumqttd logs from its own threads).

use std::io::Write;
use std::sync::{Arc, Mutex};

use aloft_broker::{serve, BrokerConfig, EmbeddedBroker, FrontConfig, FrontContext};
use aloft_certs::tls::{client_config, install_crypto_provider, server_config};
use aloft_certs::{device_csr, FleetCa, Validity};
use aloft_proto::{DeviceId, OperatorId};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Every formatted log line, in order.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn connected(opts: MqttOptions) -> (AsyncClient, EventLoop) {
    let (client, mut el) = AsyncClient::new(opts, 16);
    loop {
        match el.poll().await.unwrap() {
            Event::Incoming(Packet::ConnAck(_)) => return (client, el),
            _ => continue,
        }
    }
}

/// Subscribes to `filter`, waits for the SUBACK, then disconnects cleanly and waits for the
/// connection to end.
async fn cycle(opts: MqttOptions, filter: String) {
    let (client, mut el) = connected(opts).await;
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    client.disconnect().await.unwrap();
    while el.poll().await.is_ok() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_clean_disconnects_and_a_shutdown_log_no_error() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || sink.clone())
                .with_filter(tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    install_crypto_provider();
    let ca = FleetCa::create("Aloft Log Test CA", 30).unwrap();
    let hosts = ["localhost".to_owned()];
    let server = ca.issue_server(&hosts, Validity::days(1)).unwrap();
    let tls = server_config(ca.cert_pem(), &server.cert_pem, &server.key_pem, vec![]).unwrap();
    let broker = tokio::task::spawn_blocking(|| EmbeddedBroker::start(BrokerConfig::default()))
        .await
        .unwrap()
        .unwrap();
    let ctx = Arc::new(
        FrontContext::new(Arc::new(tls), broker.backend(), FrontConfig::default()).unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    let front = tokio::spawn(serve(listener, Arc::clone(&ctx), async {
        let _ = stopped.await;
    }));

    // The orchestrator's own client, straight to the backend, as `aloft serve` has one.
    let addr = broker.addr();
    let mut o = MqttOptions::new("orchestrator", addr.ip().to_string(), addr.port());
    let (user, pass) = broker.credentials_for("orchestrator");
    o.set_credentials(user, pass);
    let (orch, orch_el) = connected(o).await;

    let csr = device_csr(&DeviceId::new("dev-1").unwrap(), &[7; 32]).unwrap();
    let cert = ca.issue_device(&csr.csr_pem, Validity::days(1)).unwrap();
    let dev_tls = Arc::new(client_config(ca.cert_pem(), &cert, &csr.key_pem).unwrap());
    let op = ca
        .issue_operator(
            &OperatorId::new("alice").unwrap(),
            aloft_certs::OperatorRole::Operator,
            Validity::days(1),
        )
        .unwrap();
    let op_tls = Arc::new(client_config(ca.cert_pem(), &op.cert_pem, &op.key_pem).unwrap());
    let options = |id: &str, tls: &Arc<rustls::ClientConfig>| {
        let mut o = MqttOptions::new(id, "localhost", port);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::clone(tls),
        )));
        o
    };
    for _ in 0..20 {
        cycle(options("dev-1", &dev_tls), "aloft/v1/d/dev-1/job".into()).await;
        cycle(options("alice", &op_tls), "aloft/v1/o/alice/reply".into()).await;
    }

    // `aloft serve` never disconnects its own client: the process ends.
    drop((orch, orch_el));
    drop(stop);
    front.await.unwrap();
    // rumqttd handles the last disconnects on its own threads. A round trip through its router
    // after them is the barrier: the router handles events in order, so by the time a fresh
    // client receives its own publish, every earlier disconnect was handled (and logged).
    let mut o = MqttOptions::new("barrier", addr.ip().to_string(), addr.port());
    let (user, pass) = broker.credentials_for("barrier");
    o.set_credentials(user, pass);
    let (barrier, mut el) = connected(o).await;
    barrier
        .subscribe("barrier/x", QoS::AtLeastOnce)
        .await
        .unwrap();
    barrier
        .publish("barrier/x", QoS::AtLeastOnce, false, b"x".to_vec())
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::Publish(_)) = el.poll().await.unwrap() {
            break;
        }
    }

    let text = logs.text();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "ERROR lines:\n{}", errors.join("\n"));
    assert!(text.contains("embedded broker ready"), "{text}");
}
