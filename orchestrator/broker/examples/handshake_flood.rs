//! Benchmark (not a test): how long 1,000 mTLS devices take to connect through the real front
//! and embedded broker, alone and while 1,000 silent sockets are held open against the same
//! port, from another loopback address (127.0.0.2) and from the devices' own (127.0.0.1).
//!
//! Run it in release mode with room for ~8,000 file descriptors:
//!
//! ```text
//! ulimit -n 20000 && cargo run --release -p aloft-broker --example handshake_flood
//! ```
//!
//! `DEVICES`, `SILENT` and `ROUNDS` in the environment override 1,000, 1,000 and 3 (for a quick
//! smoke run). Each device is a raw TLS 1.3 client with its own certificate from a fresh fleet CA that
//! sends an MQTT 5 CONNECT and waits for the CONNACK; at most `CONNECT_CONCURRENCY` connect at
//! once, like device-sim's default gate. The attacker opens `SILENT` TCP connections that never
//! send a byte, and re-opens each one the server closes at `REOPEN_PER_SEC` in total, so the
//! silent sockets are held for the whole round. Every scenario runs `ROUNDS` times; the median
//! is reported with its ratio to the median of the devices alone.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aloft_broker::{serve, BrokerConfig, EmbeddedBroker, FrontConfig, FrontContext};
use aloft_certs::tls::{client_config, install_crypto_provider, server_config};
use aloft_certs::{device_csr, FleetCa, Validity};
use aloft_proto::DeviceId;
use bytes::BytesMut;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{Connect, Packet, Protocol};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const CONNECT_CONCURRENCY: usize = 64;
const REOPEN_PER_SEC: u64 = 100;

/// `name` from the environment (for a quick smoke run), else `default`.
fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<(), Error> {
    let devices_n = knob("DEVICES", 1_000);
    let silent_n = knob("SILENT", 1_000);
    let rounds = knob("ROUNDS", 3).max(1);
    install_crypto_provider();
    let ca = FleetCa::create("Aloft Bench CA", 30)?;
    let hosts = ["localhost".to_owned(), "127.0.0.1".to_owned()];
    let server = ca.issue_server(&hosts, Validity::days(1))?;
    let tls = server_config(ca.cert_pem(), &server.cert_pem, &server.key_pem, vec![])?;
    let broker =
        tokio::task::spawn_blocking(|| EmbeddedBroker::start(BrokerConfig::default())).await??;
    let ctx = Arc::new(FrontContext::new(
        Arc::new(tls),
        broker.backend(),
        FrontConfig::default(),
    )?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener, Arc::clone(&ctx), std::future::pending()));

    eprintln!("issuing {devices_n} device certificates...");
    let mut devices = Vec::with_capacity(devices_n);
    for i in 0..devices_n {
        let id = format!("dev-{i:05}");
        let csr = device_csr(&DeviceId::new(&id)?, &[7; 32])?;
        let cert = ca.issue_device(&csr.csr_pem, Validity::days(1))?;
        let tls = Arc::new(client_config(ca.cert_pem(), &cert, &csr.key_pem)?);
        devices.push((id, TlsConnector::from(tls)));
    }
    let devices = Arc::new(devices);

    let scenarios: [(&str, Option<IpAddr>); 3] = [
        ("(a) devices alone", None),
        (
            "(b) + silent sockets from 127.0.0.2",
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))),
        ),
        (
            "(c) + silent sockets from 127.0.0.1",
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ),
    ];
    let mut medians = Vec::new();
    for (name, attacker) in scenarios {
        let mut times = Vec::new();
        for round in 1..=rounds {
            let before = ctx.stats.snapshot();
            let flood = match attacker {
                Some(ip) => Some(Flood::start(ip, addr, silent_n).await),
                None => None,
            };
            let took = connect_all(&devices, addr).await?;
            let held = flood.as_ref().map(|f| f.open.load(Ordering::Relaxed));
            let reopened = flood.as_ref().map(|f| f.reopened.load(Ordering::Relaxed));
            drop(flood);
            let after = ctx.stats.snapshot();
            eprintln!(
                "{name}, round {round}: {:.3} s (silent sockets open at the end: {held:?}, \
                 re-opened: {reopened:?}; front: evicted {}, refused per source {}, timed out {})",
                took.as_secs_f64(),
                after.handshakes_evicted - before.handshakes_evicted,
                after.handshakes_refused_per_source - before.handshakes_refused_per_source,
                after.handshakes_timed_out - before.handshakes_timed_out,
            );
            times.push(took);
            // The next round reuses the identities: wait until the front let them all go.
            while !ctx.registry.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        times.sort();
        medians.push((name, times[times.len() / 2]));
    }
    let base = medians[0].1.as_secs_f64();
    println!("{devices_n} devices, {silent_n} silent sockets");
    println!("| scenario | median of {rounds} | ratio to (a) |");
    println!("|---|---|---|");
    for (name, m) in &medians {
        println!(
            "| {name} | {:.3} s | {:.2} |",
            m.as_secs_f64(),
            m.as_secs_f64() / base
        );
    }
    Ok(())
}

/// Connects every device (at most `CONNECT_CONCURRENCY` at once), waits until all have their
/// CONNACK, and returns how long that took. The sessions are closed when it returns.
async fn connect_all(
    devices: &Arc<Vec<(String, TlsConnector)>>,
    addr: SocketAddr,
) -> Result<Duration, Error> {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(devices.len());
    for i in 0..devices.len() {
        let devices = Arc::clone(devices);
        let gate = Arc::clone(&gate);
        tasks.push(tokio::spawn(async move {
            // A device retries until it is in, as the reference device does.
            loop {
                let permit = gate.acquire().await;
                let (id, connector) = &devices[i];
                match connect_device(id, connector, addr).await {
                    Ok(session) => {
                        drop(permit);
                        return Ok::<_, Error>(session);
                    }
                    Err(e) => {
                        drop(permit);
                        eprintln!("{id}: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        }));
    }
    let mut sessions = Vec::with_capacity(tasks.len());
    for t in tasks {
        sessions.push(t.await??);
    }
    let took = start.elapsed();
    drop(sessions);
    Ok(took)
}

async fn connect_device(
    id: &str,
    connector: &TlsConnector,
    addr: SocketAddr,
) -> Result<TlsStream<TcpStream>, Error> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let connect = Packet::Connect(
        Connect {
            keep_alive: 60,
            client_id: id.to_owned(),
            clean_session: true,
        },
        None,
        None,
        None,
        None,
    );
    let mut buf = BytesMut::new();
    V5.write(connect, &mut buf)?;
    tls.write_all(&buf).await?;
    let mut head = [0u8; 4];
    tls.read_exact(&mut head).await?;
    if head[0] != 0x20 || head[3] != 0 {
        return Err(format!("refused: {head:02x?}").into());
    }
    Ok(tls)
}

/// `silent` sockets from one source address that never send a byte, each re-opened when the
/// server closes it (at `REOPEN_PER_SEC` in total). Dropping it closes them all.
struct Flood {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    open: Arc<AtomicU64>,
    reopened: Arc<AtomicU64>,
}

impl Flood {
    /// Returns once every socket was opened (and possibly closed again) once.
    async fn start(source: IpAddr, target: SocketAddr, silent: usize) -> Flood {
        let open = Arc::new(AtomicU64::new(0));
        let reopened = Arc::new(AtomicU64::new(0));
        let tokens = Arc::new(Semaphore::new(0));
        let refill = {
            let tokens = Arc::clone(&tokens);
            tokio::spawn(async move {
                let mut tick =
                    tokio::time::interval(Duration::from_micros(1_000_000 / REOPEN_PER_SEC));
                loop {
                    tick.tick().await;
                    if tokens.available_permits() < REOPEN_PER_SEC as usize {
                        tokens.add_permits(1);
                    }
                }
            })
        };
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(silent.max(1));
        let mut tasks = vec![refill];
        for _ in 0..silent {
            let (open, reopened, tokens) = (
                Arc::clone(&open),
                Arc::clone(&reopened),
                Arc::clone(&tokens),
            );
            let ready = ready_tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut first = true;
                loop {
                    if !first {
                        match tokens.acquire().await {
                            Ok(p) => p.forget(),
                            Err(_) => return,
                        }
                        reopened.fetch_add(1, Ordering::Relaxed);
                    }
                    let stream = silent_socket(source, target).await;
                    if first {
                        first = false;
                        let _ = ready.send(()).await;
                    }
                    let Ok(mut stream) = stream else {
                        continue;
                    };
                    open.fetch_add(1, Ordering::Relaxed);
                    let mut buf = [0u8; 64];
                    // Held until the server closes it.
                    while matches!(stream.read(&mut buf).await, Ok(1..)) {}
                    open.fetch_sub(1, Ordering::Relaxed);
                }
            }));
        }
        drop(ready_tx);
        for _ in 0..silent {
            let _ = ready_rx.recv().await;
        }
        Flood {
            tasks,
            open,
            reopened,
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn silent_socket(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(target).await
}
