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
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::protocol::{DisconnectReasonCode, Packet, QoS};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::timeout;
use tracing::{debug, info, warn};

use super::acl::{self, DeviceTopic};
use super::direct::{publish_qos1, DeviceBound, DeviceMessage, RouteGuard, SessionQueues};
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
                if ctx.direct.inbox().send(message).await.is_err() {
                    warn!(%device, "orchestrator inbox closed; ending the session");
                    return End::Disconnect(Reason::ServerUnavailable);
                }
                Reply::Packet(mqtt::puback(pkid))
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

/// Writes to the client: the reader's replies first, then jobs, acks and certificates (QoS 1,
/// within the client's Receive Maximum), then chunk frames; each packet whole.
async fn write_loop<W: AsyncWrite + Unpin>(
    session: &DeviceSession<'_>,
    client_w: &mut W,
    mut queues: SessionQueues,
    mut replies: queue::Receiver<Reply>,
    mut end: oneshot::Receiver<Option<Reason>>,
    subs: &std::sync::atomic::AtomicU8,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let ctx = session.ctx;
    let device = &session.device;
    let mut in_flight = InFlight {
        max: session.receive_maximum.max(1),
        ids: HashSet::new(),
        next: 0,
    };
    let mut last_job: Option<Bytes> = None;
    loop {
        let room = in_flight.has_room();
        let packet = tokio::select! {
            biased;
            reason = &mut end => {
                if let Ok(Some(reason)) = reason {
                    let _ = write_flush(client_w, &mqtt::disconnect(reason)).await;
                }
                break;
            }
            reply = replies.recv() => match reply {
                Reply::Packet(p) => p,
                Reply::PubAck(pkid) => {
                    in_flight.ids.remove(&pkid);
                    continue;
                }
                Reply::SubAck { packet, then_job } => {
                    if write_out(ctx, client_w, &packet).await.is_err() {
                        break;
                    }
                    if !then_job {
                        continue;
                    }
                    // The retained job, with RETAIN=1 as MQTT delivers retained messages on
                    // subscribe; it waits for room like any QoS 1 PUBLISH would.
                    let Some(job) = ctx.direct.retained_job(device) else {
                        continue;
                    };
                    last_job = Some(job.clone());
                    let pkid = in_flight.take_id();
                    publish_qos1(&topics::job(device), pkid, true, &job)
                }
            },
            () = queues.job.notified(), if room => {
                if !receives(subs.load(Relaxed), DeviceBound::Job) {
                    continue;
                }
                let job = ctx.direct.retained_job(device).unwrap_or_default();
                // A job cleared before this session ever saw one needs no empty message.
                if last_job.as_ref().map_or(job.is_empty(), |l| *l == job) {
                    continue;
                }
                last_job = Some(job.clone());
                let pkid = in_flight.take_id();
                publish_qos1(&topics::job(device), pkid, false, &job)
            }
            (kind, payload) = queues.control.recv(), if room => {
                if !receives(subs.load(Relaxed), kind) {
                    continue;
                }
                let topic = match kind {
                    DeviceBound::Ack => topics::ack(device),
                    DeviceBound::Cert => topics::cert(device),
                    DeviceBound::Job => topics::job(device),
                    DeviceBound::ChunkResponse => topics::chunk_response(device),
                };
                let pkid = in_flight.take_id();
                publish_qos1(&topic, pkid, false, &payload)
            }
            frame = queues.chunks.recv() => {
                if !receives(subs.load(Relaxed), DeviceBound::ChunkResponse) {
                    continue;
                }
                // Head and shared body, written as one packet; the frame's budget is given
                // back when it drops, after the write.
                let len = frame.head.len() + frame.body.len();
                if len > session.client_max_packet {
                    FrontStats::inc(&ctx.stats.device_packets_over_client_max);
                    continue;
                }
                let written = async {
                    client_w.write_all(&frame.head).await?;
                    client_w.write_all(&frame.body).await?;
                    client_w.flush().await
                };
                if written.await.is_err() {
                    break;
                }
                FrontStats::add(&ctx.stats.bytes_out, len);
                continue;
            }
        };
        if packet.len() > session.client_max_packet {
            // MQTT 5 §3.1.2.11.4: a packet over the client's maximum is discarded, not sent.
            FrontStats::inc(&ctx.stats.device_packets_over_client_max);
            debug!(%device, bytes = packet.len(), "packet over the client's maximum size not sent");
            continue;
        }
        if write_out(ctx, client_w, &packet).await.is_err() {
            break;
        }
    }
    let _ = client_w.shutdown().await;
}

async fn write_out<W: AsyncWrite + Unpin>(
    ctx: &FrontContext,
    w: &mut W,
    packet: &[u8],
) -> std::io::Result<()> {
    write_flush(w, packet).await?;
    FrontStats::add(&ctx.stats.bytes_out, packet.len());
    Ok(())
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
