//! The device's own MQTT 5 session: one mTLS connection, read one packet at a time into one
//! reused buffer and written from another, driven from the device's own task.
//!
//! Why not rumqttc's `EventLoop`: it needs a task of its own to poll it, a queue of events to
//! the device's task, a framed read buffer that the publishes it decodes pin, and per-connection
//! state sized for any client (a 65,536-bit QoS 2 set, an event queue, in-flight slots). A
//! device needs none of that: it speaks to one server, subscribes once, sends a few QoS 1
//! publishes at a time and never QoS 2. Here the bytes go through rumqttc's own v5 codec
//! (`Packet::read` and `write`, so there is no second parser), the session holds only its two
//! buffers, its in-flight packet ids and its keep-alive clock, and it reads only when the device
//! asks for the next packet, so frames it has not reached wait in the kernel's socket buffer
//! (all but the rest of one read of the socket, which the TLS stream takes in steps of 32 KiB).
//! Both buffers drop back to nothing once they are empty, and so do the TLS stream's
//! (`aloft_certs::tls::stream`), so an idle device holds almost no memory for its connection
//! (docs/BENCHMARKS.md, "Simulator memory").

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aloft_certs::tls::stream::{self as tls, TlsStream};
use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter,
    Packet, PingReq, PubAck, PubAckReason, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::Error as CodecError;
pub use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

type Instant = tokio::time::Instant;

/// How many QoS 1 publishes the device lets the server have in flight to it (its Receive
/// Maximum). Each is acknowledged as soon as it is read, so a handful is plenty.
const RECEIVE_MAXIMUM: u16 = 16;
/// A read buffer holds at least this much room for the start of the next packet: room for any
/// fixed header, and for small packets whole.
const MIN_READ: usize = 64;
/// While the rest of a packet has not arrived, the read buffer grows by at most this much, so a
/// device waiting for a chunk frame does not hold room for all of it (rustls holds the
/// incoming record meanwhile); once bytes have come, it grows to the packet's exact size.
const READ_STEP: usize = 4096;
/// An empty write buffer larger than this is given back.
const IDLE_WRITE_BYTES: usize = 1024;
/// Past this many unsent bytes the session stops reading: what it reads may need an answer
/// (PUBACK), and a server that does not read its answers must not make it buffer them.
const WRITE_HIGH_BYTES: usize = 16 * 1024;
/// A publish that would take the unsent bytes past this is dropped (the agent re-sends).
const WRITE_CAP_BYTES: usize = 32 * 1024;

/// Why a session could not be set up, or ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid server name {0:?}")]
    ServerName(String),
    #[error("malformed packet: {0}")]
    Codec(#[from] CodecError),
    #[error("connection refused: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("subscription refused: {0:?}")]
    SubscriptionRefused(SubscribeReasonCode),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("the server sent DISCONNECT ({0:?})")]
    ServerDisconnected(DisconnectReasonCode),
    #[error("the server closed the connection")]
    Closed,
    #[error("no packet from the server within the keep-alive after a ping")]
    KeepAliveTimeout,
}

/// A publish the session would not send: too many QoS 1 publishes in flight, too many unsent
/// bytes, or larger than the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped;

/// What a device asks of its connection.
pub struct Options<'a> {
    pub client_id: &'a str,
    /// Where to connect, and the name the server certificate must carry.
    pub host: &'a str,
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
    pub keep_alive: Duration,
    /// Most QoS 1 publishes of the device unacknowledged at once (the server's Receive Maximum
    /// may lower it).
    pub inflight: u16,
    /// The largest packet the device accepts (its Maximum Packet Size); a larger one ends the
    /// session before its body is read.
    pub max_incoming: u32,
}

/// What the session hands to the device.
#[derive(Debug)]
pub enum Incoming {
    /// The SUBACK of [`Session::subscribe`]: every filter was granted.
    Subscribed,
    /// A publish; a QoS 1 one is already acknowledged. Topic and payload are slices of the read
    /// buffer: drop them before asking for the next packet, so the buffer can be given back.
    Publish { topic: Bytes, payload: Bytes },
}

/// The packet ids of the device's QoS 1 publishes that the server has not acknowledged yet.
#[derive(Debug)]
struct InFlight {
    limit: u16,
    /// At most `limit` ids, so a linear search is the fastest set.
    ids: Vec<u16>,
    next: u16,
    /// PUBACKs matched to a publish of this session.
    acked: u64,
}

impl InFlight {
    fn new(limit: u16) -> Self {
        InFlight {
            limit: limit.max(1),
            ids: Vec::new(),
            next: 0,
            acked: 0,
        }
    }

    /// A packet id for one more publish, or `None` if `limit` are in flight already.
    fn take(&mut self) -> Option<u16> {
        if self.ids.len() >= usize::from(self.limit) {
            return None;
        }
        loop {
            self.next = self.next.wrapping_add(1).max(1);
            if !self.ids.contains(&self.next) {
                self.ids.push(self.next);
                return Some(self.next);
            }
        }
    }

    /// Gives an id back if it was taken and is only now taken back for good (the publish was
    /// never sent).
    fn give_back(&mut self, id: u16) {
        self.ids.retain(|&i| i != id);
    }

    /// A PUBACK for `id`; false if no publish of this session waits for it.
    fn ack(&mut self, id: u16) -> bool {
        match self.ids.iter().position(|&i| i == id) {
            Some(at) => {
                self.ids.swap_remove(at);
                self.acked += 1;
                true
            }
            None => false,
        }
    }
}

/// When the session must ping the server, and when it gives the server up. It pings once
/// either side has been silent for the keep-alive: silence from the device would let the server
/// drop it, and silence from the server may be a half-open connection that only a ping reveals
/// (a device sending QoS 0 heartbeats would otherwise never notice).
#[derive(Debug)]
struct KeepAlive {
    /// Zero: never ping.
    every: Duration,
    last_sent: Instant,
    last_received: Instant,
    /// When the ping now waiting for an answer (any packet) was sent.
    ping_sent: Option<Instant>,
}

/// What the keep-alive clock asks for now.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    Nothing,
    Ping,
    /// The server has not answered a ping within the keep-alive.
    Dead,
}

impl KeepAlive {
    fn new(every: Duration, now: Instant) -> Self {
        KeepAlive {
            every,
            last_sent: now,
            last_received: now,
            ping_sent: None,
        }
    }

    fn deadline(&self) -> Instant {
        // A year stands for never: far enough, and no overflow.
        let every = if self.every.is_zero() {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            self.every
        };
        self.ping_sent
            .unwrap_or(self.last_sent.min(self.last_received))
            + every
    }

    fn sent(&mut self, now: Instant) {
        self.last_sent = now;
    }

    fn received(&mut self, now: Instant) {
        self.last_received = now;
        self.ping_sent = None;
    }

    fn due(&mut self, now: Instant) -> Due {
        if self.every.is_zero() || now < self.deadline() {
            return Due::Nothing;
        }
        if self.ping_sent.is_some() {
            return Due::Dead;
        }
        self.ping_sent = Some(now);
        Due::Ping
    }
}

/// Gives an empty read buffer back. Its allocation would otherwise stay: a decoded packet is
/// split off the buffer's front, and what is left still shares the packet's allocation.
fn relax_read(buf: &mut BytesMut) {
    if buf.is_empty() {
        *buf = BytesMut::new();
    }
}

/// Makes room for `additional` more bytes, growing to exactly that (not doubling).
fn make_room(buf: &mut BytesMut, additional: usize) {
    if buf.capacity() - buf.len() >= additional {
        return;
    }
    let mut bigger = BytesMut::with_capacity(buf.len() + additional);
    bigger.extend_from_slice(buf);
    *buf = bigger;
}

/// How many bytes the next read may take, given what the buffer holds and what the packet at
/// its front still needs (`needed`, from the codec).
fn read_size(buffered: usize, needed: usize) -> usize {
    let needed = needed.max(MIN_READ);
    if buffered < READ_STEP {
        needed.min(READ_STEP)
    } else {
        needed
    }
}

/// The bytes waiting to be written, and how far they have been.
#[derive(Debug, Default)]
struct WriteBuf {
    buf: BytesMut,
    /// Bytes of `buf` already handed to the TLS stream.
    written: usize,
}

impl WriteBuf {
    fn unsent(&self) -> &[u8] {
        &self.buf[self.written..]
    }

    fn advance(&mut self, n: usize) {
        self.written += n;
        if self.written >= self.buf.len() {
            self.written = 0;
            self.buf.clear();
            if self.buf.capacity() > IDLE_WRITE_BYTES {
                self.buf = BytesMut::new();
            }
        }
    }

    /// Encodes `packet` at the end; on an error nothing is added.
    fn put(&mut self, packet: &Packet, max: Option<u32>) -> Result<(), CodecError> {
        let before = self.buf.len();
        packet.write(&mut self.buf, max).inspect_err(|_| {
            self.buf.truncate(before);
        })?;
        Ok(())
    }
}

/// One MQTT 5 session over mTLS (over any byte stream in tests). Keep it boxed: the TLS state
/// is about a kilobyte.
pub struct Session<S = TlsStream<tls::Client>> {
    stream: S,
    read: BytesMut,
    write: WriteBuf,
    /// The write buffer was handed to the stream but not flushed yet.
    unflushed: bool,
    in_flight: InFlight,
    keep_alive: KeepAlive,
    timer: Pin<Box<tokio::time::Sleep>>,
    max_incoming: u32,
    /// The server's Maximum Packet Size, if it set one.
    max_outgoing: Option<u32>,
    /// The packet id of the SUBSCRIBE waiting for its SUBACK.
    subscribing: Option<u16>,
}

impl Session {
    /// Connects (TCP, TLS, CONNECT) and waits for a successful CONNACK. The caller bounds the
    /// time it takes.
    pub async fn connect(opts: Options<'_>) -> Result<Session, SessionError> {
        let tcp = TcpStream::connect((opts.host, opts.port)).await?;
        // Request/response over small packets: Nagle would add delayed-ACK stalls to each one.
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(opts.host.to_owned())
            .map_err(|_| SessionError::ServerName(opts.host.to_owned()))?;
        let stream = tls::connect(tcp, opts.tls, name).await?;
        Session::start(
            stream,
            opts.client_id,
            opts.keep_alive,
            opts.inflight,
            opts.max_incoming,
        )
        .await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Sends CONNECT on an established stream and waits for a successful CONNACK.
    async fn start(
        stream: S,
        client_id: &str,
        keep_alive: Duration,
        inflight: u16,
        max_incoming: u32,
    ) -> Result<Self, SessionError> {
        let now = Instant::now();
        let mut s = Session {
            stream,
            read: BytesMut::new(),
            write: WriteBuf::default(),
            unflushed: false,
            in_flight: InFlight::new(inflight),
            keep_alive: KeepAlive::new(keep_alive, now),
            timer: Box::pin(tokio::time::sleep_until(now)),
            max_incoming,
            max_outgoing: None,
            subscribing: None,
        };
        let keep_alive_secs = u16::try_from(keep_alive.as_secs()).unwrap_or(u16::MAX);
        let connect = Connect {
            keep_alive: keep_alive_secs,
            client_id: client_id.to_owned(),
            clean_start: true,
            properties: Some(ConnectProperties {
                receive_maximum: Some(RECEIVE_MAXIMUM),
                max_packet_size: Some(max_incoming),
                ..ConnectProperties::new()
            }),
        };
        s.queue(&Packet::Connect(connect, None, None))?;
        let ack = match poll_fn(|cx| s.poll_packet(cx)).await? {
            Packet::ConnAck(ack) => ack,
            _ => return Err(SessionError::Protocol("expected CONNACK")),
        };
        if ack.code != ConnectReturnCode::Success {
            return Err(SessionError::Refused(ack.code));
        }
        if let Some(p) = ack.properties {
            if let Some(max) = p.receive_max {
                s.in_flight.limit = s.in_flight.limit.min(max).max(1);
            }
            s.max_outgoing = p.max_packet_size;
            if let Some(k) = p.server_keep_alive {
                s.keep_alive.every = Duration::from_secs(u64::from(k));
            }
        }
        Ok(s)
    }

    /// Subscribes to `filters` at QoS 1; [`Session::next`] says [`Incoming::Subscribed`] once
    /// the server granted every one.
    pub fn subscribe(&mut self, filters: Vec<String>) -> Result<(), SessionError> {
        let Some(pkid) = self.in_flight_free_id() else {
            return Err(SessionError::Protocol("no packet id for SUBSCRIBE"));
        };
        let mut subscribe = Subscribe::new_many(
            filters
                .into_iter()
                .map(|f| Filter::new(f, QoS::AtLeastOnce)),
            None,
        );
        subscribe.pkid = pkid;
        self.queue(&Packet::Subscribe(subscribe))?;
        self.subscribing = Some(pkid);
        Ok(())
    }

    /// A packet id no publish uses (a SUBSCRIBE's comes from the same space).
    fn in_flight_free_id(&mut self) -> Option<u16> {
        let id = self.in_flight.take()?;
        self.in_flight.give_back(id);
        Some(id)
    }

    /// Queues a publish; it leaves while [`Session::next`] runs. QoS 1 takes a packet id.
    pub fn publish(&mut self, topic: &str, qos: QoS, payload: Vec<u8>) -> Result<(), Dropped> {
        let mut p = Publish::new(topic, qos, payload, None);
        if self.write.unsent().len() + p.size() > WRITE_CAP_BYTES {
            return Err(Dropped);
        }
        if qos != QoS::AtMostOnce {
            let pkid = self.in_flight.take().ok_or(Dropped)?;
            if Some(pkid) == self.subscribing {
                self.in_flight.give_back(pkid);
                return Err(Dropped);
            }
            p.pkid = pkid;
        }
        let pkid = p.pkid;
        if self.queue(&Packet::Publish(p)).is_err() {
            if pkid != 0 {
                self.in_flight.give_back(pkid);
            }
            return Err(Dropped);
        }
        Ok(())
    }

    /// How many QoS 1 publishes the server has acknowledged in this session.
    pub fn acknowledged(&self) -> u64 {
        self.in_flight.acked
    }

    /// The next subscription result or publish. Meanwhile it writes what is queued, answers
    /// QoS 1 publishes and pings. Cancel-safe: everything it has read stays in the session.
    pub async fn next(&mut self) -> Result<Incoming, SessionError> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Sends DISCONNECT (normal) and closes the TLS session, giving up after `within`. Boxed,
    /// so that its future does not hold the whole session.
    pub async fn close(mut self: Box<Self>, within: Duration) {
        let disconnect = Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
            properties: None,
        };
        if self.queue(&Packet::Disconnect(disconnect)).is_err() {
            return;
        }
        let _ = tokio::time::timeout(within, async {
            poll_fn(|cx| self.poll_write(cx).map(|_| ())).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }

    fn queue(&mut self, packet: &Packet) -> Result<(), CodecError> {
        self.write.put(packet, self.max_outgoing)?;
        self.keep_alive.sent(Instant::now());
        Ok(())
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Incoming, SessionError>> {
        loop {
            let packet = match self.poll_packet(cx) {
                Poll::Ready(Ok(p)) => p,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            match self.handle(packet) {
                Ok(Some(incoming)) => return Poll::Ready(Ok(incoming)),
                Ok(None) => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// What a packet means for the device; `None` for what the session handles itself.
    fn handle(&mut self, packet: Packet) -> Result<Option<Incoming>, SessionError> {
        match packet {
            Packet::Publish(p) => match p.qos {
                QoS::AtMostOnce => Ok(Some(Incoming::Publish {
                    topic: p.topic,
                    payload: p.payload,
                })),
                QoS::AtLeastOnce => {
                    self.queue(&Packet::PubAck(PubAck::new(p.pkid, None)))?;
                    Ok(Some(Incoming::Publish {
                        topic: p.topic,
                        payload: p.payload,
                    }))
                }
                // Neither the front nor the device's subscriptions (QoS 1) allow it.
                QoS::ExactlyOnce => Err(SessionError::Protocol("QoS 2 publish")),
            },
            Packet::PubAck(ack) => {
                if !self.in_flight.ack(ack.pkid) {
                    return Err(SessionError::Protocol("PUBACK for no publish in flight"));
                }
                if ack.reason != PubAckReason::Success
                    && ack.reason != PubAckReason::NoMatchingSubscribers
                {
                    tracing::debug!(reason = ?ack.reason, "publish refused by the server");
                }
                Ok(None)
            }
            Packet::SubAck(ack) => {
                if self.subscribing != Some(ack.pkid) {
                    return Err(SessionError::Protocol("SUBACK for no SUBSCRIBE"));
                }
                self.subscribing = None;
                if let Some(refused) = ack
                    .return_codes
                    .iter()
                    .find(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                {
                    return Err(SessionError::SubscriptionRefused(*refused));
                }
                Ok(Some(Incoming::Subscribed))
            }
            Packet::PingResp(_) => Ok(None),
            Packet::Disconnect(d) => Err(SessionError::ServerDisconnected(d.reason_code)),
            _ => Err(SessionError::Protocol("unexpected packet from the server")),
        }
    }

    /// Writes what is queued, pings when due, and decodes the next whole packet, reading more
    /// only when the buffer holds none.
    fn poll_packet(&mut self, cx: &mut Context<'_>) -> Poll<Result<Packet, SessionError>> {
        loop {
            if let Poll::Ready(Err(e)) = self.poll_write(cx) {
                return Poll::Ready(Err(e));
            }
            let deadline = self.keep_alive.deadline();
            if self.timer.deadline() != deadline {
                self.timer.as_mut().reset(deadline);
            }
            if self.timer.as_mut().poll(cx).is_ready() {
                match self.keep_alive.due(Instant::now()) {
                    Due::Nothing => {}
                    Due::Ping => {
                        self.queue(&Packet::PingReq(PingReq))?;
                        continue;
                    }
                    Due::Dead => return Poll::Ready(Err(SessionError::KeepAliveTimeout)),
                }
            }
            let needed = match Packet::read(&mut self.read, Some(self.max_incoming)) {
                Ok(packet) => {
                    relax_read(&mut self.read);
                    self.keep_alive.received(Instant::now());
                    return Poll::Ready(Ok(packet));
                }
                Err(CodecError::InsufficientBytes(n)) => n,
                Err(e) => return Poll::Ready(Err(e.into())),
            };
            if self.write.unsent().len() > WRITE_HIGH_BYTES {
                // poll_write registered for the socket becoming writable.
                return Poll::Pending;
            }
            let start = self.read.len();
            let size = read_size(start, needed);
            make_room(&mut self.read, size);
            self.read.resize(start + size, 0);
            let mut dst = ReadBuf::new(&mut self.read[start..]);
            let polled = Pin::new(&mut self.stream).poll_read(cx, &mut dst);
            let got = dst.filled().len();
            self.read.truncate(start + got);
            match polled {
                Poll::Ready(Ok(())) if got == 0 => {
                    return Poll::Ready(Err(SessionError::Closed));
                }
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => {
                    relax_read(&mut self.read);
                    return Poll::Pending;
                }
            }
        }
    }

    /// Hands what is queued to the TLS stream and flushes it. Ready when all is sent (or the
    /// stream failed), pending otherwise.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SessionError>> {
        while !self.write.unsent().is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, self.write.unsent()) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(SessionError::Closed)),
                Poll::Ready(Ok(n)) => {
                    self.write.advance(n);
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.unflushed {
            match Pin::new(&mut self.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
