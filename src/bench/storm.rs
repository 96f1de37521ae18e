//! A bare connect storm and a handshake flood, for the connect scenarios.
//!
//! The storm is N mTLS clients that each send an MQTT 5 CONNECT and one SUBSCRIBE and wait for
//! the CONNACK and the SUBACK, at most `concurrency` handshaking at once, like the simulator's
//! connect gate. It speaks no Aloft protocol, so the same storm runs against the Aloft front and
//! against Mosquitto: the side-by-side row of the bench. The flood holds idle TCP sockets and
//! half-sent TLS ClientHellos open on a port (re-opening each one the server closes), the
//! attacker of S1c.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// One client of the storm: an MQTT client id, the filter it subscribes to, and its TLS settings
/// (its own certificate and key).
pub struct StormClient {
    pub client_id: String,
    pub filter: String,
    pub connector: TlsConnector,
}

/// The sessions of a finished storm; dropping them closes every connection.
pub struct Sessions(#[allow(dead_code)] Vec<TlsStream<TcpStream>>);

/// Connects every client (at most `concurrency` at once, each retrying after a failure until
/// `timeout`) and returns how long it took until every one had its SUBACK.
pub async fn connect_all(
    clients: Arc<Vec<StormClient>>,
    addr: SocketAddr,
    server_name: &str,
    concurrency: usize,
    timeout: Duration,
) -> Result<(Duration, Sessions)> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let name = ServerName::try_from(server_name.to_owned()).context("server name")?;
    let failures = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tasks = JoinSet::new();
    for i in 0..clients.len() {
        let clients = Arc::clone(&clients);
        let gate = Arc::clone(&gate);
        let name = name.clone();
        let failures = Arc::clone(&failures);
        tasks.spawn(async move {
            loop {
                let permit = gate.acquire().await;
                let c = &clients[i];
                let attempt = tokio::time::timeout(
                    Duration::from_secs(10),
                    connect_one(c, addr, name.clone()),
                )
                .await;
                drop(permit);
                match attempt {
                    Ok(Ok(session)) => return session,
                    Ok(Err(_)) | Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        });
    }
    let mut sessions = Vec::with_capacity(clients.len());
    while !tasks.is_empty() {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(s))) => sessions.push(s),
            Ok(Some(Err(e))) => bail!("a storm client panicked: {e}"),
            Ok(None) => break,
            Err(_) => {
                tasks.abort_all();
                bail!(
                    "only {} of {} clients connected and subscribed within {timeout:?} ({} failed attempts)",
                    sessions.len(),
                    clients.len(),
                    failures.load(Ordering::Relaxed)
                );
            }
        }
    }
    Ok((start.elapsed(), Sessions(sessions)))
}

async fn connect_one(
    c: &StormClient,
    addr: SocketAddr,
    name: ServerName<'static>,
) -> Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = c.connector.connect(name, tcp).await?;
    tls.write_all(&connect_packet(&c.client_id, 60)).await?;
    let (kind, body) = read_packet(&mut tls).await?;
    // CONNACK: flags, reason code.
    if kind != 0x20 || body.get(1).copied() != Some(0) {
        bail!("connect refused: packet {kind:#x} {body:?}");
    }
    tls.write_all(&subscribe_packet(1, &c.filter)).await?;
    let (kind, body) = read_packet(&mut tls).await?;
    // SUBACK: packet id, properties (empty here), one reason code per filter.
    let granted = body.last().copied().unwrap_or(0x80);
    if kind != 0x90 || granted >= 0x80 {
        bail!("subscribe refused: packet {kind:#x} reason {granted:#x}");
    }
    Ok(tls)
}

fn push_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    push_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// MQTT 5 CONNECT with a clean start, no properties, no will, no credentials.
pub fn connect_packet(client_id: &str, keep_alive_secs: u16) -> Vec<u8> {
    let mut body = Vec::new();
    push_str(&mut body, "MQTT");
    body.push(5);
    body.push(0x02);
    body.extend_from_slice(&keep_alive_secs.to_be_bytes());
    body.push(0);
    push_str(&mut body, client_id);
    packet(0x10, &body)
}

/// MQTT 5 SUBSCRIBE of one filter at QoS 1.
pub fn subscribe_packet(packet_id: u16, filter: &str) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.push(0);
    push_str(&mut body, filter);
    body.push(0x01);
    packet(0x82, &body)
}

/// Reads one MQTT packet: (type and flags byte, body).
async fn read_packet(s: &mut TlsStream<TcpStream>) -> Result<(u8, Vec<u8>)> {
    let first = s.read_u8().await?;
    let mut len = 0usize;
    for shift in 0..4 {
        let b = s.read_u8().await?;
        len |= usize::from(b & 0x7f) << (7 * shift);
        if b & 0x80 == 0 {
            break;
        }
    }
    if len > 64 * 1024 {
        bail!("packet of {len} bytes");
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok((first, body))
}

/// How long a flood socket the server closed stays closed before the attacker opens it again.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// Sockets an attacker holds open against a port until dropped.
pub struct Flood {
    stop: watch::Sender<bool>,
    /// Connections the server closed and the flood opened again.
    pub reopened: Arc<AtomicU64>,
}

impl Flood {
    /// Opens `idle` TCP connections that never send a byte and `half_hellos` that send the first
    /// half of a real TLS 1.3 ClientHello (from `tls`) and then nothing; each is re-opened when
    /// the server closes it. Returns once every socket has been opened once.
    pub async fn start(
        addr: SocketAddr,
        idle: usize,
        half_hellos: usize,
        tls: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<Flood> {
        let name = ServerName::try_from(server_name.to_owned()).context("server name")?;
        let mut conn = rustls::ClientConnection::new(tls, name).context("client hello")?;
        let mut hello = Vec::new();
        conn.write_tls(&mut hello)?;
        hello.truncate(hello.len() / 2);
        let hello: Arc<[u8]> = hello.into();
        let (stop, stopped) = watch::channel(false);
        let reopened = Arc::new(AtomicU64::new(0));
        let opened = Arc::new(Semaphore::new(0));
        let total = idle + half_hellos;
        for i in 0..total {
            let first: Arc<[u8]> = if i < idle {
                Arc::from(Vec::new())
            } else {
                Arc::clone(&hello)
            };
            let mut stopped = stopped.clone();
            let reopened = Arc::clone(&reopened);
            let opened = Arc::clone(&opened);
            tokio::spawn(async move {
                let mut announced = false;
                loop {
                    let held = async {
                        let mut s = TcpStream::connect(addr).await?;
                        s.write_all(&first).await?;
                        if !announced {
                            announced = true;
                            opened.add_permits(1);
                        }
                        let mut buf = [0u8; 1024];
                        while s.read(&mut buf).await? > 0 {}
                        Ok::<_, std::io::Error>(())
                    };
                    tokio::select! {
                        _ = stopped.changed() => return,
                        _ = held => {}
                    }
                    reopened.fetch_add(1, Ordering::Relaxed);
                    // The attacker holds sockets rather than churning them: at most one re-open
                    // per socket per second (handshake_flood's pace is 100/s in all).
                    tokio::time::sleep(REOPEN_AFTER).await;
                }
            });
        }
        let all = u32::try_from(total).context("too many flood sockets")?;
        tokio::time::timeout(Duration::from_secs(30), opened.acquire_many(all))
            .await
            .context("flood sockets not open within 30 s")??
            .forget();
        Ok(Flood { stop, reopened })
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_packet_carries_the_client_id_after_mqtt_5_headers() {
        let p = connect_packet("dev-1", 60);
        assert_eq!(p[0], 0x10);
        assert_eq!(usize::from(p[1]), p.len() - 2);
        assert_eq!(&p[2..9], b"\0\x04MQTT\x05");
        assert!(p.ends_with(b"\0\x05dev-1"));
    }

    #[test]
    fn a_long_remaining_length_is_a_two_byte_varint() {
        let mut out = Vec::new();
        push_varint(&mut out, 321);
        assert_eq!(out, [0xC1, 0x02]);
    }
}
