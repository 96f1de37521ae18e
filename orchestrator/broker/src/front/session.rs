//! A device's MQTT session, served by the front itself on the device road ([`super::direct`]).
//!
//! The device's CONNECT was admitted by `relay` (certificate identity, client id, Will ACL,
//! one connection per identity). From there the front is the device's broker, with exactly
//! the MQTT the protocol needs (PROTOCOL.md §2.3):
//! - PUBLISH on one of the device's four topics goes to the orchestrator's inbox; QoS 1 is
//!   acknowledged once the inbox took it, QoS 2 is refused (CONNACK says Maximum QoS 1);
//! - SUBSCRIBE to the fixed filters of `acl::device_filters` is answered here (granted QoS at
//!   most 1); subscribing to the job topic (or the subtree) delivers the retained job;
//! - UNSUBSCRIBE, PINGREQ, PUBACK and DISCONNECT are answered or taken here;
//! - the orchestrator's acks, certificates and jobs leave as QoS 1 PUBLISHes (at most the
//!   client's Receive Maximum unacknowledged), chunk frames as QoS 0.
//!
//! No session state outlives the connection: Session Present is always 0, and a device
//! subscribes again on every connection (it always had to, §9.6). Every violation ends the
//! connection with a DISCONNECT, as for relayed sessions.

use std::collections::HashSet;
use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::protocol::{DisconnectReasonCode, Packet, QoS};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::timeout;
use tracing::{debug, info, warn};

use super::acl::{self, DeviceTopic};
use super::direct::{publish_qos1, DeviceBound, DeviceMessage, Frame, RouteGuard, SessionQueues};
use super::mqtt::{self, FrameReader, Reason};
use super::queue;
use super::registry::Claim;
use super::{FrontContext, FrontStats};
use aloft_proto::{topics, DeviceId};

/// Time allowed for the last words (a DISCONNECT) to a client that is being closed.
const LAST_WORDS: Duration = Duration::from_secs(2);
/// Packets the reader hands the writer (SUBACKs, PUBACKs, PINGRESPs) at most: when it is full
/// the reader waits, so a client flooding PINGREQs slows itself down.
const REPLY_QUEUE: usize = 16;

/// Subscriptions, as bits indexed like `acl::device_filters`: job, ack, chunk/resp, cert,
/// subtree, manifests/#, manifests/+.
const SUB_JOB: u8 = 1 << 0;
const SUB_ACK: u8 = 1 << 1;
const SUB_CHUNK: u8 = 1 << 2;
const SUB_CERT: u8 = 1 << 3;
const SUB_TREE: u8 = 1 << 4;

/// The subscription bits through which a device receives `kind`.
fn receives(subs: u8, kind: DeviceBound) -> bool {
    let own = match kind {
        DeviceBound::Job => SUB_JOB,
        DeviceBound::Ack => SUB_ACK,
        DeviceBound::Cert => SUB_CERT,
        DeviceBound::ChunkResponse => SUB_CHUNK,
    };
    subs & (own | SUB_TREE) != 0
}

/// What `relay` admitted for a device.
pub(crate) struct DeviceSession<'a> {
    pub device: DeviceId,
    pub addr: SocketAddr,
    /// Silence after which the client is cut off (1.5 × keep-alive).
    pub idle: Duration,
    /// The client's Receive Maximum: QoS 1 PUBLISHes it accepts unacknowledged.
    pub receive_maximum: usize,
    /// The client's Maximum Packet Size: larger packets are not sent to it.
    pub client_max_packet: usize,
    /// The Will, already checked against the ACL: sent to the orchestrator if the connection
    /// ends without a DISCONNECT (or with reason 0x04).
    pub will: Option<DeviceMessage>,
    pub max_subscriptions: usize,
    pub ctx: &'a FrontContext,
}

/// What the reader tells the writer.
enum Reply {
    /// Packet bytes to write as they are.
    Packet(Bytes),
    /// A SUBACK; after it, the retained job if this subscription newly covers the job topic.
    SubAck { packet: Bytes, then_job: bool },
    /// The client acknowledged our QoS 1 PUBLISH with this packet id.
    PubAck(u16),
    /// The PUBACK of a chunk request or a status report: it may wait (at most [`ACK_HOLD`])
    /// for the request's first frame or the report's ack, to leave in the same write.
    Held(Bytes),
}

/// How the reading direction ended.
enum End {
    /// The client went away or said DISCONNECT: nothing more to say.
    Quiet { will: bool },
    /// The front ends the session and tells the client why.
    Disconnect(Reason),
}

/// Runs a device session until either side ends it or its claim's kill signal fires
/// (revocation); the route closes and the claim is released when it ends.
///
/// A plain function returning an `async move` block, not an async fn: an async fn keeps a
/// second copy of every argument it takes by value, and this future lives as long as the
/// device stays connected.
pub(crate) fn run<'a, R, W>(
    session: DeviceSession<'a>,
    (mut reader, mut client_r, mut client_w): (FrameReader, R, W),
    queues: SessionQueues,
    route: RouteGuard,
    claim: Claim,
) -> impl Future<Output = ()> + 'a
where
    R: AsyncRead + Unpin + 'a,
    W: AsyncWrite + Unpin + 'a,
{
    let kill = claim.kill_signal();
    async move {
        let ctx = session.ctx;
        let mut claim = Some(claim);
        let (reply_tx, reply_rx) = queue::bounded(REPLY_QUEUE);
        let (end_tx, end_rx) = oneshot::channel();
        let subs = std::sync::atomic::AtomicU8::new(0);
        let mut quota = Quota {
            cap: session.max_subscriptions,
            used: 0,
            refused: 0,
        };
        let (device, addr) = (&session.device, session.addr);
        let read = async {
            let end = tokio::select! {
                end = read_loop(&session, &mut reader, &mut client_r, &reply_tx, &subs, &mut quota) => end,
                () = kill.notified() => {
                    FrontStats::inc(&ctx.stats.sessions_revoked);
                    info!(%device, %addr, "certificate revoked; ending the session");
                    End::Disconnect(Reason::AdministrativeAction)
                }
            };
            let (reason, will) = match end {
                End::Quiet { will } => (None, will),
                End::Disconnect(r) => (Some(r), true),
            };
            if will {
                if let Some(w) = session.will.clone() {
                    if ctx.direct.inbox().try_send(w).is_err() {
                        FrontStats::inc(&ctx.stats.device_inbox_full);
                    }
                }
            }
            let _ = end_tx.send(reason);
        };
        {
            let write = write_loop(&session, &mut client_w, queues, reply_rx, end_rx, &subs);
            tokio::pin!(read, write);
            tokio::select! {
                () = &mut read => {
                    // The client is gone or being closed: free its identity now so an
                    // immediate reconnect is not refused, then give the DISCONNECT a bounded
                    // chance to leave.
                    drop(claim.take());
                    let _ = timeout(LAST_WORDS, &mut write).await;
                }
                () = &mut write => {}
            }
        }
        drop(route);
        drop(claim);
        if quota.refused > 0 {
            warn!(%device, %addr, refused = quota.refused, cap = quota.cap, "session ended after subscriptions were refused for quota");
        }
        debug!(%device, %addr, "session closed");
    }
}

/// Subscriptions of one session, counted over all its SUBSCRIBEs (UNSUBSCRIBE gives none back).
struct Quota {
    cap: usize,
    used: usize,
    refused: u64,
}

async fn read_loop<R: AsyncRead + Unpin>(
    session: &DeviceSession<'_>,
    reader: &mut FrameReader,
    client_r: &mut R,
    replies: &queue::Sender<Reply>,
    subs: &std::sync::atomic::AtomicU8,
    quota: &mut Quota,
) -> End {
    let ctx = session.ctx;
    let stats = &ctx.stats;
    let device = &session.device;
    loop {
        let frame =
            match super::relay::next_client_frame(reader, client_r, session.idle, device, stats)
                .await
            {
                Ok(frame) => frame,
                Err(None) => return End::Quiet { will: true },
                Err(Some(reason)) => return End::Disconnect(reason),
            };
        // Decided by a plain function: the decoded packet (392 bytes) and what it borrows are
        // gone before anything is awaited, so an idle session keeps no room for them.
        let reply = match step(session, &frame, subs, quota) {
            Step::Reply(reply) => reply,
            Step::Skip => continue,
            Step::End(end) => return end,
            Step::Inbox { message, pkid } => {
                let held = matches!(
                    message.topic,
                    DeviceTopic::ChunkRequest | DeviceTopic::Status
                );
                if ctx.direct.inbox().send(message).await.is_err() {
                    warn!(%device, "orchestrator inbox closed; ending the session");
                    return End::Disconnect(Reason::ServerUnavailable);
                }
                if held {
                    Reply::Held(mqtt::puback(pkid))
                } else {
                    Reply::Packet(mqtt::puback(pkid))
                }
            }
        };
        if replies.send(reply).await.is_err() {
            return End::Quiet { will: true };
        }
    }
}

/// What the reader does with one packet from the client.
enum Step {
    /// Hand the writer this.
    Reply(Reply),
    /// Nothing to answer.
    Skip,
    /// A QoS 1 PUBLISH for the orchestrator: PUBACK it once the inbox took it.
    Inbox { message: DeviceMessage, pkid: u16 },
    /// End the session.
    End(End),
}

/// Decodes one frame from the client and decides what it calls for; no I/O.
fn step(
    session: &DeviceSession<'_>,
    frame: &[u8],
    subs: &std::sync::atomic::AtomicU8,
    quota: &mut Quota,
) -> Step {
    use std::sync::atomic::Ordering::Relaxed;
    let ctx = session.ctx;
    let stats = &ctx.stats;
    let device = &session.device;
    match mqtt::decode_client(frame) {
        Ok(Packet::Publish(publish, props)) => {
            let alias = props.as_ref().is_some_and(|p| p.topic_alias.is_some());
            let topic = if alias || publish.retain {
                None
            } else {
                acl::device_publish_topic(device, &publish.topic)
            };
            let Some(topic) = topic else {
                FrontStats::inc(&stats.acl_denied_publish);
                let denied = acl::check_publish(
                    &super::Peer::Device(device.clone()),
                    &publish.topic,
                    publish.retain,
                    alias,
                )
                .err();
                warn!(%device, topic = %String::from_utf8_lossy(&publish.topic), retain = publish.retain, ?denied, "publish denied; closing");
                return Step::End(End::Disconnect(Reason::NotAuthorized));
            };
            let Some((qos, pkid)) = mqtt::publish_qos_pkid(frame) else {
                FrontStats::inc(&stats.malformed_packets);
                return Step::End(End::Disconnect(Reason::MalformedPacket));
            };
            let message = DeviceMessage {
                device: device.clone(),
                topic,
                payload: publish.payload,
            };
            FrontStats::inc(&stats.device_messages);
            match (qos, pkid) {
                (0, _) => {
                    // At most once: under overload a heartbeat is worth less than the
                    // reports queued before it.
                    if ctx.direct.inbox().try_send(message).is_err() {
                        FrontStats::inc(&stats.device_inbox_full);
                    }
                    Step::Skip
                }
                (1, Some(pkid)) => Step::Inbox { message, pkid },
                _ => {
                    FrontStats::inc(&stats.malformed_packets);
                    info!(%device, "QoS 2 PUBLISH; closing");
                    Step::End(End::Disconnect(Reason::QosNotSupported))
                }
            }
        }
        Ok(Packet::Subscribe(subscribe, _)) => {
            if subscribe.filters.is_empty() {
                FrontStats::inc(&stats.malformed_packets);
                return Step::End(End::Disconnect(Reason::MalformedPacket));
            }
            let mut bits = 0u8;
            let mut codes = Vec::with_capacity(subscribe.filters.len());
            for filter in &subscribe.filters {
                let index = acl::is_valid_filter(&filter.path)
                    .then(|| acl::device_filter_index(device, &filter.path))
                    .flatten();
                let Some(index) = index else {
                    FrontStats::inc(&stats.acl_denied_subscribe);
                    warn!(%device, filter = %filter.path, "subscribe denied; closing");
                    return Step::End(End::Disconnect(Reason::NotAuthorized));
                };
                bits |= 1 << index;
                codes.push(if filter.qos == QoS::AtMostOnce { 0 } else { 1 });
            }
            let n = subscribe.filters.len();
            match quota.used.checked_add(n) {
                Some(total) if total <= quota.cap => quota.used = total,
                _ => {
                    quota.refused += n as u64;
                    FrontStats::add(&stats.subscriptions_over_quota, n);
                    if quota.refused == n as u64 {
                        warn!(%device, cap = quota.cap, "subscription quota reached; refusing further SUBSCRIBEs (0x97)");
                    }
                    let packet = mqtt::suback(subscribe.pkid, n, Reason::QuotaExceeded);
                    return Step::Reply(Reply::Packet(packet));
                }
            }
            let before = subs.fetch_or(bits, Relaxed);
            let then_job =
                !receives(before, DeviceBound::Job) && receives(before | bits, DeviceBound::Job);
            Step::Reply(Reply::SubAck {
                packet: mqtt::suback_codes(subscribe.pkid, &codes),
                then_job,
            })
        }
        Ok(Packet::Unsubscribe(unsubscribe, _)) => {
            let mut codes = Vec::with_capacity(unsubscribe.filters.len());
            for filter in &unsubscribe.filters {
                let bit = acl::device_filter_index(device, filter).map_or(0, |i| 1u8 << i);
                let before = subs.fetch_and(!bit, Relaxed);
                // 0x11: No subscription existed.
                codes.push(if bit != 0 && before & bit != 0 {
                    0
                } else {
                    0x11
                });
            }
            Step::Reply(Reply::Packet(mqtt::unsuback(unsubscribe.pkid, &codes)))
        }
        Ok(Packet::PingReq(_)) => Step::Reply(Reply::Packet(Bytes::from_static(&mqtt::PINGRESP))),
        Ok(Packet::PubAck(ack, _)) => Step::Reply(Reply::PubAck(ack.pkid)),
        Ok(Packet::Disconnect(d, _)) => Step::End(End::Quiet {
            will: d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
        }),
        Ok(Packet::Connect(..)) => {
            FrontStats::inc(&stats.malformed_packets);
            info!(%device, "second CONNECT; closing");
            Step::End(End::Disconnect(Reason::ProtocolError))
        }
        Ok(Packet::PubRec(..) | Packet::PubRel(..) | Packet::PubComp(..)) => {
            // The front never sends QoS 2 and refuses it from clients.
            FrontStats::inc(&stats.malformed_packets);
            info!(%device, "QoS 2 flow packet; closing");
            Step::End(End::Disconnect(Reason::ProtocolError))
        }
        Ok(_) => {
            FrontStats::inc(&stats.malformed_packets);
            Step::End(End::Disconnect(Reason::ProtocolError))
        }
        Err(e) => {
            FrontStats::inc(&stats.malformed_packets);
            info!(%device, error = %e, "malformed packet; closing");
            Step::End(End::Disconnect(Reason::MalformedPacket))
        }
    }
}

/// The QoS 1 PUBLISHes of one session that the client has not acknowledged yet.
struct InFlight {
    max: usize,
    ids: HashSet<u16>,
    next: u16,
}

impl InFlight {
    fn has_room(&self) -> bool {
        self.ids.len() < self.max
    }

    /// A packet id not in flight (MQTT: non-zero, unique among unacknowledged ones).
    fn take_id(&mut self) -> u16 {
        loop {
            self.next = self.next.wrapping_add(1).max(1);
            if self.ids.insert(self.next) {
                return self.next;
            }
        }
    }
}

/// At most this many bytes, and this many parts, gathered for one write to the client.
const COALESCE_BYTES: usize = 64 * 1024;
const COALESCE_PARTS: usize = 32;
/// Longest the PUBACK of a chunk request or a status report waits for what answers it (the
/// request's first frame, the report's ack). Written as soon as the inbox took the PUBLISH,
/// it left alone, before the engine had answered: a write, a TLS record and a wake-up of the
/// device for 4 bytes, a third of the orchestrator's writes while 10,000 devices downloaded.
/// An answer that takes longer, or never comes, leaves the PUBACK this much later.
const ACK_HOLD: Duration = Duration::from_millis(5);

/// Packets gathered for one write to the client. A downloading device has a chunk request
/// acknowledged and a chunk frame sent for every chunk; written one by one, with a flush each,
/// they cost 4.5 system calls per chunk and a TLS record for each frame's 40-byte head
/// (docs/BENCHMARKS.md). Gathered, what is ready leaves in one vectored write and one flush.
/// Made anew for each write, so an idle session holds none of it.
#[derive(Default)]
struct Outgoing {
    parts: Vec<Bytes>,
    /// Chunk frames whose bytes are in `parts`: each gives its bytes back to the fleet budget
    /// when it drops, after the write.
    frames: Vec<Frame>,
    bytes: usize,
    /// A held PUBACK (of a chunk request or a status report) is among the parts.
    held: bool,
}

impl Outgoing {
    fn full(&self) -> bool {
        self.bytes >= COALESCE_BYTES || self.parts.len() + 2 > COALESCE_PARTS
    }

    fn packet(&mut self, packet: Bytes) {
        self.bytes += packet.len();
        self.parts.push(packet);
    }

    fn frame(&mut self, frame: Frame) {
        self.bytes += frame.head.len() + frame.body.len();
        self.parts.push(frame.head.clone());
        self.parts.push(frame.body.clone());
        self.frames.push(frame);
    }

    /// Writes every part, in order, and flushes; returns the bytes written.
    async fn write<W: AsyncWrite + Unpin>(self, w: &mut W) -> std::io::Result<usize> {
        let mut part = 0;
        let mut offset = 0;
        while part < self.parts.len() {
            let slices: Vec<IoSlice<'_>> = self.parts[part..]
                .iter()
                .enumerate()
                .map(|(i, p)| IoSlice::new(if i == 0 { &p[offset..] } else { p }))
                .collect();
            let mut n = w.write_vectored(&slices).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            // Past the parts written whole, into the one written in part.
            while n > 0 {
                let left = self.parts[part].len() - offset;
                if n >= left {
                    n -= left;
                    part += 1;
                    offset = 0;
                } else {
                    offset += n;
                    n = 0;
                }
            }
        }
        w.flush().await?;
        Ok(self.bytes)
    }
}

/// What the writer is to do next.
enum Next {
    End(Option<Reason>),
    Reply(Reply),
    Job,
    Control(DeviceBound, Bytes),
    Chunk(Frame),
}

/// The writer's own state: the QoS 1 PUBLISHes in flight and the last job sent.
struct Writer<'s, 'c> {
    session: &'s DeviceSession<'c>,
    subs: &'s std::sync::atomic::AtomicU8,
    in_flight: InFlight,
    last_job: Option<Bytes>,
}

impl Writer<'_, '_> {
    /// Adds what `next` asks to send to `out`.
    fn take(&mut self, next: Next, out: &mut Outgoing) {
        use std::sync::atomic::Ordering::Relaxed;
        let ctx = self.session.ctx;
        let device = &self.session.device;
        let subs = self.subs.load(Relaxed);
        let packet = match next {
            Next::End(_) => return,
            Next::Reply(Reply::Packet(p)) => p,
            Next::Reply(Reply::Held(p)) => {
                out.held = true;
                p
            }
            Next::Reply(Reply::PubAck(pkid)) => {
                self.in_flight.ids.remove(&pkid);
                return;
            }
            Next::Reply(Reply::SubAck { packet, then_job }) => {
                self.checked(packet, out);
                if !then_job {
                    return;
                }
                // The retained job, with RETAIN=1 as MQTT delivers retained messages on
                // subscribe; it waits for room like any QoS 1 PUBLISH would.
                let Some(job) = ctx.direct.retained_job(device) else {
                    return;
                };
                self.last_job = Some(job.clone());
                let pkid = self.in_flight.take_id();
                publish_qos1(&topics::job(device), pkid, true, &job)
            }
            Next::Job => {
                if !receives(subs, DeviceBound::Job) {
                    return;
                }
                let job = ctx.direct.retained_job(device).unwrap_or_default();
                // A job cleared before this session ever saw one needs no empty message.
                if self.last_job.as_ref().map_or(job.is_empty(), |l| *l == job) {
                    return;
                }
                self.last_job = Some(job.clone());
                let pkid = self.in_flight.take_id();
                publish_qos1(&topics::job(device), pkid, false, &job)
            }
            Next::Control(kind, payload) => {
                if !receives(subs, kind) {
                    return;
                }
                let topic = match kind {
                    DeviceBound::Ack => topics::ack(device),
                    DeviceBound::Cert => topics::cert(device),
                    DeviceBound::Job => topics::job(device),
                    DeviceBound::ChunkResponse => topics::chunk_response(device),
                };
                let pkid = self.in_flight.take_id();
                publish_qos1(&topic, pkid, false, &payload)
            }
            Next::Chunk(frame) => {
                if !receives(subs, DeviceBound::ChunkResponse) {
                    return;
                }
                if frame.head.len() + frame.body.len() > self.session.client_max_packet {
                    FrontStats::inc(&ctx.stats.device_packets_over_client_max);
                    return;
                }
                // Head and shared body, written as one packet.
                out.frame(frame);
                return;
            }
        };
        self.checked(packet, out);
    }

    /// Adds `packet` unless it is over the client's maximum size.
    fn checked(&self, packet: Bytes, out: &mut Outgoing) {
        if packet.len() > self.session.client_max_packet {
            // MQTT 5 §3.1.2.11.4: a packet over the client's maximum is discarded, not sent.
            FrontStats::inc(&self.session.ctx.stats.device_packets_over_client_max);
            debug!(device = %self.session.device, bytes = packet.len(), "packet over the client's maximum size not sent");
            return;
        }
        out.packet(packet);
    }
}

/// Writes to the client: the reader's replies first, then jobs, acks and certificates (QoS 1,
/// within the client's Receive Maximum), then chunk frames; each packet whole. What is ready
/// when the writer wakes (replies and chunk frames, up to [`COALESCE_BYTES`]) leaves together.
async fn write_loop<W: AsyncWrite + Unpin>(
    session: &DeviceSession<'_>,
    client_w: &mut W,
    mut queues: SessionQueues,
    mut replies: queue::Receiver<Reply>,
    mut end: oneshot::Receiver<Option<Reason>>,
    subs: &std::sync::atomic::AtomicU8,
) {
    let ctx = session.ctx;
    let mut w = Writer {
        session,
        subs,
        in_flight: InFlight {
            max: session.receive_maximum.max(1),
            ids: HashSet::new(),
            next: 0,
        },
        last_job: None,
    };
    loop {
        let room = w.in_flight.has_room();
        let next = tokio::select! {
            biased;
            reason = &mut end => Next::End(reason.ok().flatten()),
            reply = replies.recv() => Next::Reply(reply),
            () = queues.job.notified(), if room => Next::Job,
            (kind, payload) = queues.control.recv(), if room => Next::Control(kind, payload),
            frame = queues.chunks.recv() => Next::Chunk(frame),
        };
        if let Next::End(reason) = next {
            if let Some(reason) = reason {
                let _ = write_flush(client_w, &mqtt::disconnect(reason)).await;
            }
            break;
        }
        let mut out = Outgoing::default();
        w.take(next, &mut out);
        gather(&mut w, &mut out, &mut replies, &mut queues);
        if out.held && out.frames.is_empty() && !out.full() {
            // A held PUBACK waits for what its PUBLISH asked for: a chunk request's first
            // frame, a status report's ack. Boxed: in place, the timer would be part of every
            // session's future, idle or not.
            let room = w.in_flight.has_room();
            let answer = Box::pin(timeout(ACK_HOLD, async {
                tokio::select! {
                    biased;
                    frame = queues.chunks.recv() => Next::Chunk(frame),
                    (kind, payload) = queues.control.recv(), if room => Next::Control(kind, payload),
                }
            }));
            if let Ok(next) = answer.await {
                w.take(next, &mut out);
                gather(&mut w, &mut out, &mut replies, &mut queues);
            }
        }
        if out.parts.is_empty() {
            continue;
        }
        match out.write(client_w).await {
            Ok(bytes) => FrontStats::add(&ctx.stats.bytes_out, bytes),
            Err(_) => break,
        }
    }
    let _ = client_w.shutdown().await;
}

/// Adds to `out` whatever else is ready, until it is full: replies first, then chunk frames.
fn gather(
    w: &mut Writer<'_, '_>,
    out: &mut Outgoing,
    replies: &mut queue::Receiver<Reply>,
    queues: &mut SessionQueues,
) {
    while !out.full() {
        if let Some(reply) = replies.try_recv() {
            w.take(Next::Reply(reply), out);
        } else if let Some(frame) = queues.chunks.try_recv() {
            w.take(Next::Chunk(frame), out);
        } else {
            break;
        }
    }
}

async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// The Will of a device's CONNECT as a message for the orchestrator, if its topic is one the
/// device may publish to (relay checked the ACL already; this only maps the topic).
pub(crate) fn will_message(
    device: &DeviceId,
    topic: &[u8],
    payload: Bytes,
) -> Option<DeviceMessage> {
    let topic: DeviceTopic = acl::device_publish_topic(device, topic)?;
    Some(DeviceMessage {
        device: device.clone(),
        topic,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_receives_each_kind_through_its_own_filter_or_its_subtree() {
        for (bit, kind) in [
            (SUB_JOB, DeviceBound::Job),
            (SUB_ACK, DeviceBound::Ack),
            (SUB_CERT, DeviceBound::Cert),
            (SUB_CHUNK, DeviceBound::ChunkResponse),
        ] {
            assert!(receives(bit, kind));
            assert!(receives(SUB_TREE, kind));
            assert!(!receives(0, kind));
            assert!(!receives(!(bit | SUB_TREE), kind));
        }
    }

    /// Takes at most 7 bytes per write, vectored or not.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn gathered_packets_leave_whole_and_in_order_through_short_writes() {
        let mut out = Outgoing::default();
        let packets: Vec<Bytes> = (0u8..5)
            .map(|i| Bytes::from(vec![i; 3 + 4 * usize::from(i)]))
            .collect();
        for p in &packets {
            out.packet(p.clone());
        }
        let mut w = Trickle(Vec::new());
        let written = out.write(&mut w).await.unwrap();
        assert_eq!(w.0, packets.concat());
        assert_eq!(written, w.0.len());
    }

    #[test]
    fn gathering_stops_at_its_byte_and_part_limits() {
        let mut out = Outgoing::default();
        out.packet(Bytes::from(vec![0; COALESCE_BYTES - 1]));
        assert!(!out.full());
        out.packet(Bytes::from_static(b"x"));
        assert!(out.full());
        let mut out = Outgoing::default();
        for _ in 0..COALESCE_PARTS - 2 {
            out.packet(Bytes::from_static(b"x"));
        }
        assert!(!out.full(), "room for one more chunk frame (head and body)");
        out.packet(Bytes::from_static(b"x"));
        assert!(out.full());
    }

    #[test]
    fn packet_ids_in_flight_are_unique_and_never_zero() {
        let mut f = InFlight {
            max: 3,
            ids: HashSet::new(),
            next: u16::MAX - 1,
        };
        let a = f.take_id();
        let b = f.take_id();
        assert_eq!((a, b), (u16::MAX, 1));
        f.ids.remove(&a);
        f.next = u16::MAX - 1;
        assert_eq!(f.take_id(), u16::MAX);
        assert!(f.has_room());
        f.take_id();
        assert!(!f.has_room());
    }
}
