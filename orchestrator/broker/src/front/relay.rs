//! One front connection after TLS: admit its CONNECT, open its backend session, then relay.
//!
//! Client → broker, every packet is framed under the peer's size cap, decoded, and PUBLISH and
//! SUBSCRIBE are checked by [`super::acl`] before their original bytes are forwarded. Broker →
//! client is a byte copy: the broker only delivers what the client was allowed to subscribe to.
//! Any violation ends the connection with a v5 DISCONNECT and nothing of it reaches the broker.
//! A SUBSCRIBE beyond the session's quota is answered by the front itself (SUBACK 0x97) and
//! never reaches the broker either.
//!
//! However a session ends, the backend connection is closed the way rumqttd expects of a client
//! that simply went away (FIN, then its remaining output read and dropped): a client's own
//! DISCONNECT is forwarded only when it must cancel a Will, because rumqttd logs every
//! DISCONNECT it receives as an error ("router-drop"), and a connection closed with unread bytes
//! as a reset.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{Connect, Login, Packet};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use super::acl;
use super::identity::Peer;
use super::mqtt::{self, ConnAckProps, DecodeError, FrameError, FrameReader, Reason};
use super::registry::Claim;
use super::{FrontContext, FrontStats};
use aloft_proto::DeviceId;

/// Keep-alive assumed for a client that asks for none (0): the front must still notice a dead
/// link to free the identity.
const DEFAULT_KEEP_ALIVE_SECS: u16 = 300;
/// Longest keep-alive the front honours, so a half-open connection holds an identity for at
/// most 1.5 × this.
const MAX_KEEP_ALIVE_SECS: u16 = 1_200;
/// Time allowed for the last words (a DISCONNECT or CONNACK) to a client that is being closed.
const LAST_WORDS: Duration = Duration::from_secs(2);
/// Size cap for frames from the backend during the CONNECT exchange (a CONNACK is tiny).
const BACKEND_CONNACK_MAX: usize = 64 * 1024;
/// Size cap for frames from the backend to a client: above the largest payload the protocol
/// sends anyone (an 8 MiB admin reply; a device gets at most a 512 KiB job).
const BACKEND_TO_CLIENT_MAX: usize = 9 * 1024 * 1024;
/// Packets the front itself answers a client with (quota SUBACKs) waiting to be written: the
/// client → broker direction waits when it is full, so a flood of SUBSCRIBEs slows its sender.
const REPLY_QUEUE: usize = 4;

/// Where the peer's identity comes from.
pub(crate) enum IdentitySource {
    /// A verified client certificate: the CONNECT client id must equal it.
    Certificate(Peer),
    /// The insecure plain listener: the client id *is* the device identity, if `allowed`.
    ClaimedClientId { allowed: bool },
}

/// A CONNECT the front accepted.
struct Admitted {
    peer: Peer,
    /// For an operator, the CONNECT with the backend client id, credentials and effective
    /// keep-alive; a device's session is served by the front itself (`session`).
    backend_connect: Option<Bytes>,
    keep_alive_secs: u16,
    keep_alive_changed: bool,
    claim: Claim,
    /// The CONNECT carried a Will: a clean DISCONNECT must reach the broker to cancel it.
    has_will: bool,
    /// A device's Will, for the orchestrator if its session ends without a DISCONNECT.
    device_will: Option<super::direct::DeviceMessage>,
    /// The client's Receive Maximum (default 65,535).
    receive_maximum: u16,
    /// The client's Maximum Packet Size (default: none).
    client_max_packet: usize,
}

/// How many topic filters a session has subscribed to and how many were refused for quota.
/// UNSUBSCRIBE gives nothing back: the cap bounds the SUBSCRIBE work one session can cause
/// (each one makes the broker redeliver retained jobs), not just what it holds at once.
struct SubscriptionQuota {
    cap: usize,
    used: usize,
    refused: u64,
}

impl SubscriptionQuota {
    /// Takes `filters` from the quota if they all fit; a SUBSCRIBE is admitted or refused whole.
    fn admit(&mut self, filters: usize) -> bool {
        match self.used.checked_add(filters) {
            Some(total) if total <= self.cap => {
                self.used = total;
                true
            }
            _ => {
                self.refused += filters as u64;
                false
            }
        }
    }
}

/// How the front refuses a connection before it is relayed.
enum Refusal {
    /// Just close (the client is gone or never spoke MQTT).
    Close,
    /// Answer with a CONNACK carrying this reason, then close.
    ConnAck(Reason, &'static str),
}

/// How the client → broker direction ended.
enum End {
    /// The client went away or the backend write failed: nothing more to say.
    Quiet,
    /// The front ends the session and tells the client why.
    Disconnect(Reason),
}

/// A session the front serves after admitting its CONNECT.
type Served<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Runs one connection to completion (identity established or to be claimed).
///
/// The stream is split here, before any future exists: an async fn keeps room for its
/// arguments for as long as it runs, and a TLS stream (1.2 KB) kept there beside the halves
/// that own it was dead weight in every connected device's session. The admission and the
/// session are boxed apart, so nothing of the admission (the CONNECT, the certificate's
/// identity, the CONNACK) stays in memory while a device idles.
pub(crate) fn run<'a, S>(
    stream: S,
    addr: SocketAddr,
    source: IdentitySource,
    identity: Option<aloft_certs::CertIdentity>,
    ctx: &'a FrontContext,
) -> impl Future<Output = ()> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'a,
{
    let (client_r, client_w) = tokio::io::split(stream);
    let admission = Box::pin(admission(client_r, client_w, addr, source, identity, ctx));
    async move {
        if let Some(session) = admission.await {
            session.await;
        }
    }
}

/// Admits the connection's CONNECT and returns its session, or `None` once it is refused or
/// gone. A device's CONNACK is sent here: its session starts established.
async fn admission<'a, S>(
    mut client_r: ReadHalf<S>,
    mut client_w: WriteHalf<S>,
    addr: SocketAddr,
    source: IdentitySource,
    identity: Option<aloft_certs::CertIdentity>,
    ctx: &'a FrontContext,
) -> Option<Served<'a>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'a,
{
    let max = match &source {
        IdentitySource::Certificate(peer) => ctx.cfg.max_packet_bytes(peer),
        IdentitySource::ClaimedClientId { .. } => ctx.cfg.device_max_packet_bytes,
    };
    let mut reader = FrameReader::new(max);
    let connect_timeout = Duration::from_millis(ctx.cfg.connect_timeout_ms);

    let cert = identity
        .as_ref()
        .map(|i| (i.serial.clone(), i.operator_role));
    let admitted = match timeout(
        connect_timeout,
        Box::pin(admit(&mut reader, &mut client_r, addr, source, cert, ctx)),
    )
    .await
    {
        Ok(Ok(a)) => a,
        Ok(Err(refusal)) => {
            refuse(&mut client_w, refusal).await;
            return None;
        }
        Err(_) => {
            FrontStats::inc(&ctx.stats.connects_timed_out);
            debug!(%addr, "no CONNECT in time");
            return None;
        }
    };
    // Each kind of session is its own boxed future: a connection's task then holds only the
    // state of the session it serves, not room for the largest of them (an idle device's task
    // was 17.9 KB, mostly room for an operator's relay and a handshake long finished).
    match (&admitted.peer, &admitted.backend_connect) {
        (Peer::Operator(_), Some(connect)) => {
            let connect = connect.clone();
            let streams = (reader, client_r, client_w);
            Some(Box::pin(relay_operator(
                connect, admitted, max, addr, identity, streams, ctx,
            )))
        }
        (Peer::Device(device), _) => {
            let device = device.clone();
            // The route opens before the CONNACK: whatever the orchestrator sends from the
            // moment the device can know it is connected reaches it.
            let (route, queues) = ctx.direct.open(device.clone());
            // Sessions the front serves itself keep nothing across connections and grant QoS
            // 1 at most.
            let connack = success_connack(&admitted, false, max, true);
            if !established(&mut client_w, &connack, identity.as_ref(), ctx).await {
                return None;
            }
            debug!(%device, %addr, "device session served");
            let session = super::session::DeviceSession {
                device,
                addr,
                idle: Duration::from_millis(u64::from(admitted.keep_alive_secs) * 1_500),
                receive_maximum: usize::from(admitted.receive_maximum),
                client_max_packet: admitted.client_max_packet,
                will: admitted.device_will,
                max_subscriptions: ctx.cfg.max_subscriptions_per_session,
                ctx,
            };
            let streams = (reader, client_r, client_w);
            Some(Box::pin(super::session::run(
                session,
                streams,
                queues,
                route,
                admitted.claim,
            )))
        }
        (Peer::Operator(_), None) => None,
    }
}

/// Relays an admitted operator's session to the embedded broker.
async fn relay_operator<S>(
    backend_connect: Bytes,
    admitted: Admitted,
    max: usize,
    addr: SocketAddr,
    identity: Option<aloft_certs::CertIdentity>,
    (mut reader, mut client_r, mut client_w): (FrameReader, ReadHalf<S>, WriteHalf<S>),
    ctx: &FrontContext,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let peer = admitted.peer.clone();
    let connect_timeout = Duration::from_millis(ctx.cfg.connect_timeout_ms);
    let opened = timeout(connect_timeout, open_backend(ctx, &backend_connect))
        .await
        .unwrap_or(Err(BackendError::TimedOut));
    let (backend, session_present, leftover) = match opened {
        Ok(b) => b,
        Err(e) => {
            FrontStats::inc(&ctx.stats.refused_backend);
            warn!(%peer, %addr, error = %e, "backend refused or unreachable");
            let refusal = Refusal::ConnAck(Reason::ServerUnavailable, "broker unavailable");
            return refuse(&mut client_w, refusal).await;
        }
    };
    let connack = success_connack(&admitted, session_present, max, false);
    if !established(&mut client_w, &connack, identity.as_ref(), ctx).await {
        return;
    }
    debug!(%peer, %addr, "session relayed");

    let (mut backend_r, mut backend_w) = backend.into_split();
    let idle = Duration::from_millis(u64::from(admitted.keep_alive_secs) * 1_500);
    let (end_tx, end_rx) = oneshot::channel();
    let (reply_tx, reply_rx) = mpsc::channel(REPLY_QUEUE);
    let kill = admitted.claim.kill_signal();
    let mut claim = Some(admitted.claim);
    let mut quota = SubscriptionQuota {
        cap: ctx.cfg.max_subscriptions_per_session,
        used: 0,
        refused: 0,
    };
    let session = Session {
        peer: &peer,
        idle,
        has_will: admitted.has_will,
        replies: reply_tx,
    };
    {
        let c2b = async {
            let end = tokio::select! {
                end = client_to_broker(&mut reader, &mut client_r, &mut backend_w, &session, &mut quota, ctx) => end,
                () = kill.notified() => {
                    FrontStats::inc(&ctx.stats.sessions_revoked);
                    info!(%peer, %addr, "certificate revoked; ending the session");
                    End::Disconnect(Reason::AdministrativeAction)
                }
            };
            let reason = match end {
                End::Quiet => None,
                End::Disconnect(r) => Some(r),
            };
            let _ = end_tx.send(reason);
        };
        let b2c = broker_to_client(
            &mut backend_r,
            &mut client_w,
            leftover,
            end_rx,
            reply_rx,
            ctx,
        );
        tokio::pin!(c2b, b2c);
        tokio::select! {
            () = &mut c2b => {
                // The client is gone or being closed: free its identity now so an immediate
                // reconnect is not refused, then give the DISCONNECT a bounded chance to leave.
                claim.take();
                let _ = timeout(LAST_WORDS, &mut b2c).await;
            }
            () = &mut b2c => {}
        }
    }
    let _ = timeout(LAST_WORDS, close_backend(&mut backend_w, &mut backend_r)).await;
    drop(claim);
    if quota.refused > 0 {
        warn!(%peer, %addr, refused = quota.refused, cap = quota.cap, "session ended after subscriptions were refused for quota");
    }
    debug!(%peer, %addr, "session closed");
}

/// The CONNACK of an admitted session: the effective keep-alive if the front changed it, the
/// client's packet limit, what the ACL would refuse anyway.
fn success_connack(
    admitted: &Admitted,
    session_present: bool,
    max: usize,
    max_qos_1: bool,
) -> Bytes {
    mqtt::connack(
        session_present,
        Reason::Success,
        &ConnAckProps {
            server_keep_alive: admitted
                .keep_alive_changed
                .then_some(admitted.keep_alive_secs),
            max_packet_size: u32::try_from(max).ok(),
            no_retain_no_shared: true,
            reason_string: None,
            max_qos_1,
        },
    )
}

/// Sends the CONNACK, counts the session and tells the orchestrator who connected; false if the
/// client is already gone.
async fn established<W: AsyncWrite + Unpin>(
    client_w: &mut W,
    connack: &[u8],
    identity: Option<&aloft_certs::CertIdentity>,
    ctx: &FrontContext,
) -> bool {
    if write_flush(client_w, connack).await.is_err() {
        return false;
    }
    FrontStats::inc(&ctx.stats.sessions_established);
    FrontStats::add(&ctx.stats.bytes_out, connack.len());
    if let (Some(hook), Some(identity)) = (&ctx.on_session, identity) {
        (hook.0)(identity);
    }
    true
}

/// Reads the next packet of an established session under the keep-alive: `Err(None)` when the
/// client went away, `Err(Some(reason))` when the front must end the session (counted and
/// logged here).
pub(super) async fn next_client_frame<R: AsyncRead + Unpin>(
    reader: &mut FrameReader,
    client_r: &mut R,
    idle: Duration,
    who: &(dyn std::fmt::Display + Sync),
    stats: &FrontStats,
) -> Result<Bytes, Option<Reason>> {
    match timeout(idle, reader.next(client_r)).await {
        Ok(Ok(frame)) => {
            FrontStats::add(&stats.bytes_in, frame.len());
            Ok(frame)
        }
        Ok(Err(FrameError::Oversized(n))) => {
            FrontStats::inc(&stats.oversized_packets);
            warn!(peer = %who, bytes = n, "oversized packet; closing");
            Err(Some(Reason::PacketTooLarge))
        }
        Ok(Err(FrameError::BadHeader)) => {
            FrontStats::inc(&stats.malformed_packets);
            info!(peer = %who, "malformed fixed header; closing");
            Err(Some(Reason::MalformedPacket))
        }
        Ok(Err(e)) => {
            debug!(peer = %who, error = %e, "client closed");
            Err(None)
        }
        Err(_) => {
            FrontStats::inc(&stats.keep_alive_timeouts);
            info!(peer = %who, idle_secs = idle.as_secs(), "keep-alive expired; closing");
            Err(Some(Reason::KeepAliveTimeout))
        }
    }
}

/// Closes the backend connection like a client that went away: FIN, then whatever the broker
/// still sends is read and dropped until it closes too, so that neither side resets.
async fn close_backend(
    backend_w: &mut tokio::net::tcp::OwnedWriteHalf,
    backend_r: &mut tokio::net::tcp::OwnedReadHalf,
) {
    let _ = backend_w.shutdown().await;
    let mut frames = FrameReader::new(BACKEND_TO_CLIENT_MAX);
    while frames.next(backend_r).await.is_ok() {}
}

/// What the client → broker direction of one session needs besides the streams.
struct Session<'a> {
    peer: &'a Peer,
    /// Silence after which the client is cut off (1.5 × keep-alive).
    idle: Duration,
    has_will: bool,
    /// Packets the front answers the client with itself, written by the other direction.
    replies: mpsc::Sender<Bytes>,
}

/// Reads and checks the CONNECT, claims the identity and rewrites the CONNECT for the backend.
async fn admit<R: AsyncRead + Unpin>(
    reader: &mut FrameReader,
    client_r: &mut R,
    addr: SocketAddr,
    source: IdentitySource,
    cert: Option<(Vec<u8>, Option<aloft_certs::OperatorRole>)>,
    ctx: &FrontContext,
) -> Result<Admitted, Refusal> {
    let stats = &ctx.stats;
    let frame = match reader.next(client_r).await {
        Ok(f) => f,
        Err(FrameError::Oversized(n)) => {
            FrontStats::inc(&stats.oversized_packets);
            info!(%addr, bytes = n, "oversized first packet");
            return Err(Refusal::ConnAck(Reason::PacketTooLarge, "packet too large"));
        }
        Err(FrameError::BadHeader) => {
            FrontStats::inc(&stats.refused_malformed);
            return Err(Refusal::ConnAck(
                Reason::MalformedPacket,
                "malformed packet",
            ));
        }
        Err(e) => {
            debug!(%addr, error = %e, "closed before CONNECT");
            return Err(Refusal::Close);
        }
    };
    FrontStats::add(&stats.bytes_in, frame.len());
    let (connect, props, will, will_props) = match mqtt::decode_client(&frame) {
        Ok(Packet::Connect(connect, props, will, will_props, _login)) => {
            (connect, props, will, will_props)
        }
        Ok(_) => {
            FrontStats::inc(&stats.refused_malformed);
            info!(%addr, "first packet is not CONNECT");
            return Err(Refusal::Close);
        }
        Err(DecodeError::UnsupportedProtocol) => {
            FrontStats::inc(&stats.refused_protocol);
            info!(%addr, "CONNECT is not MQTT 5");
            return Err(Refusal::ConnAck(
                Reason::UnsupportedProtocolVersion,
                "MQTT 5 only",
            ));
        }
        Err(e) => {
            FrontStats::inc(&stats.refused_malformed);
            info!(%addr, error = %e, "malformed CONNECT");
            return Err(Refusal::ConnAck(
                Reason::MalformedPacket,
                "malformed CONNECT",
            ));
        }
    };

    let peer = match source {
        IdentitySource::Certificate(peer) if connect.client_id == peer.id() => peer,
        IdentitySource::Certificate(peer) => {
            FrontStats::inc(&stats.refused_bad_client_id);
            info!(%peer, %addr, client_id = %connect.client_id, "client id differs from certificate");
            return Err(Refusal::ConnAck(
                Reason::ClientIdentifierNotValid,
                "client id must equal the certificate's identity",
            ));
        }
        IdentitySource::ClaimedClientId { allowed: false } => {
            FrontStats::inc(&stats.refused_not_authorized);
            return Err(Refusal::ConnAck(
                Reason::NotAuthorized,
                "plain listener is closed",
            ));
        }
        IdentitySource::ClaimedClientId { allowed: true } => {
            match DeviceId::new(&connect.client_id) {
                Ok(id) => Peer::Device(id),
                Err(_) => {
                    FrontStats::inc(&stats.refused_bad_client_id);
                    return Err(Refusal::ConnAck(
                        Reason::ClientIdentifierNotValid,
                        "invalid device id",
                    ));
                }
            }
        }
    };

    if let Some(w) = &will {
        if let Err(denied) = acl::check_publish(&peer, &w.topic, w.retain, false) {
            FrontStats::inc(&stats.refused_not_authorized);
            warn!(%peer, %addr, topic = %String::from_utf8_lossy(&w.topic), %denied, "will refused");
            return Err(Refusal::ConnAck(Reason::NotAuthorized, "will not allowed"));
        }
    }

    let (cert_serial, operator_role) = match cert {
        Some((serial, role)) => (Some(serial), role),
        None => (None, None),
    };
    let claim = match ctx.registry.claim(&peer, addr, cert_serial, operator_role) {
        Ok(claim) => claim,
        Err(existing) => {
            FrontStats::inc(&stats.refused_duplicate_identity);
            warn!(%peer, new = %addr, existing = %existing, "identity already connected; refusing the new connection");
            return Err(Refusal::ConnAck(
                Reason::NotAuthorized,
                "identity already connected",
            ));
        }
    };

    let has_will = will.is_some();
    let keep_alive_secs = match connect.keep_alive {
        0 => DEFAULT_KEEP_ALIVE_SECS,
        k => k.min(MAX_KEEP_ALIVE_SECS),
    };
    let receive_maximum = props
        .as_ref()
        .and_then(|p| p.receive_maximum)
        .unwrap_or(u16::MAX);
    let client_max_packet = props
        .as_ref()
        .and_then(|p| p.max_packet_size)
        .map_or(usize::MAX, |m| m as usize);
    if let Peer::Device(device) = &peer {
        let device_will = will
            .as_ref()
            .and_then(|w| super::session::will_message(device, &w.topic, w.message.clone()));
        return Ok(Admitted {
            peer,
            backend_connect: None,
            keep_alive_secs,
            keep_alive_changed: keep_alive_secs != connect.keep_alive,
            claim,
            has_will,
            device_will,
            receive_maximum,
            client_max_packet,
        });
    }
    // The device's own username/password are discarded: the backend only knows the secret.
    let backend_id = peer.backend_client_id();
    let rewritten = Packet::Connect(
        Connect {
            // Twice the client's: the front enforces the keep-alive (and says so with a
            // DISCONNECT 0x8D); the backend's own check must not race it and is only a backstop.
            keep_alive: keep_alive_secs.saturating_mul(2),
            client_id: backend_id.clone(),
            clean_session: connect.clean_session,
        },
        props,
        will,
        will_props,
        Some(Login {
            username: backend_id,
            password: ctx.backend.secret.as_str().to_owned(),
        }),
    );
    let backend_connect = mqtt::encode(rewritten).map_err(|e| {
        FrontStats::inc(&stats.refused_malformed);
        info!(%peer, %addr, error = %e, "CONNECT could not be re-encoded");
        Refusal::ConnAck(Reason::MalformedPacket, "malformed CONNECT")
    })?;
    Ok(Admitted {
        peer,
        backend_connect: Some(backend_connect),
        keep_alive_secs,
        keep_alive_changed: keep_alive_secs != connect.keep_alive,
        claim,
        has_will,
        device_will: None,
        receive_maximum,
        client_max_packet,
    })
}

#[derive(Debug, thiserror::Error)]
enum BackendError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("backend closed or sent an unreadable CONNACK: {0}")]
    Frame(#[from] FrameError),
    #[error("backend answered with something other than a CONNACK")]
    NotConnAck,
    #[error("backend refused the session with reason {0:#04x}")]
    Refused(u8),
    #[error("timed out")]
    TimedOut,
}

/// Connects to the backend, sends the CONNECT and waits for a successful CONNACK. Returns the
/// stream, the session-present flag and any bytes that followed the CONNACK.
async fn open_backend(
    ctx: &FrontContext,
    connect: &[u8],
) -> Result<(TcpStream, bool, BytesMut), BackendError> {
    let mut backend = TcpStream::connect(ctx.backend.addr).await?;
    let _ = backend.set_nodelay(true);
    backend.write_all(connect).await?;
    let mut reader = FrameReader::new(BACKEND_CONNACK_MAX);
    let frame = reader.next(&mut backend).await?;
    match mqtt::connack_head(&frame) {
        Some((session_present, 0)) => Ok((backend, session_present, reader.take_buffered())),
        Some((_, code)) => Err(BackendError::Refused(code)),
        None => Err(BackendError::NotConnAck),
    }
}

/// Relays client packets to the backend after checking them; returns how it ended.
async fn client_to_broker<R, W>(
    reader: &mut FrameReader,
    client_r: &mut R,
    backend_w: &mut W,
    session: &Session<'_>,
    quota: &mut SubscriptionQuota,
    ctx: &FrontContext,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let stats = &ctx.stats;
    let (peer, idle) = (session.peer, session.idle);
    loop {
        let frame = match next_client_frame(reader, client_r, idle, peer, stats).await {
            Ok(frame) => frame,
            Err(None) => return End::Quiet,
            Err(Some(reason)) => return End::Disconnect(reason),
        };
        match mqtt::decode_client(&frame) {
            Ok(Packet::Publish(publish, props)) => {
                let alias = props.as_ref().is_some_and(|p| p.topic_alias.is_some());
                if let Err(denied) = acl::check_publish(peer, &publish.topic, publish.retain, alias)
                {
                    FrontStats::inc(&stats.acl_denied_publish);
                    warn!(%peer, topic = %String::from_utf8_lossy(&publish.topic), retain = publish.retain, %denied, "publish denied; closing");
                    return End::Disconnect(Reason::NotAuthorized);
                }
            }
            Ok(Packet::Subscribe(subscribe, _)) => {
                // rumqttd's codec already refuses a SUBSCRIBE without filters; an ACL loop over
                // nothing must not be what lets one through if that ever changes.
                if subscribe.filters.is_empty() {
                    FrontStats::inc(&stats.malformed_packets);
                    return End::Disconnect(Reason::MalformedPacket);
                }
                for filter in &subscribe.filters {
                    if let Err(denied) = acl::check_subscribe(peer, &filter.path) {
                        FrontStats::inc(&stats.acl_denied_subscribe);
                        warn!(%peer, filter = %filter.path, %denied, "subscribe denied; closing");
                        return End::Disconnect(Reason::NotAuthorized);
                    }
                }
                let filters = subscribe.filters.len();
                if !quota.admit(filters) {
                    FrontStats::add(&stats.subscriptions_over_quota, filters);
                    // One warn per session; the total is logged when it ends.
                    if quota.refused == filters as u64 {
                        warn!(%peer, cap = quota.cap, "subscription quota reached; refusing further SUBSCRIBEs (0x97)");
                    } else {
                        debug!(%peer, filters, "SUBSCRIBE over quota refused (0x97)");
                    }
                    let suback = mqtt::suback(subscribe.pkid, filters, Reason::QuotaExceeded);
                    if session.replies.send(suback).await.is_err() {
                        return End::Quiet;
                    }
                    continue;
                }
            }
            Ok(Packet::Disconnect(..)) => {
                // Without a Will, closing the backend connection (which follows) means the
                // same to rumqttd as a DISCONNECT, and it logs only the latter as an error.
                if session.has_will {
                    let _ = backend_w.write_all(&frame).await;
                }
                return End::Quiet;
            }
            Ok(Packet::Connect(..)) => {
                FrontStats::inc(&stats.malformed_packets);
                info!(%peer, "second CONNECT; closing");
                return End::Disconnect(Reason::ProtocolError);
            }
            Ok(_) => {}
            Err(e) => {
                FrontStats::inc(&stats.malformed_packets);
                info!(%peer, error = %e, "malformed packet; closing");
                return End::Disconnect(Reason::MalformedPacket);
            }
        }
        // The original bytes, not a re-encoding: the backend parses exactly what we checked.
        if backend_w.write_all(&frame).await.is_err() {
            return End::Quiet;
        }
    }
}

/// Copies backend packets to the client, frame by frame, until either side closes or the client
/// → broker direction ends; in the latter case it sends that direction's DISCONNECT, if any.
/// Packets from `replies` (the front's own answers) are written between two whole backend
/// packets, never inside one.
async fn broker_to_client<S>(
    backend_r: &mut tokio::net::tcp::OwnedReadHalf,
    client_w: &mut WriteHalf<S>,
    leftover: BytesMut,
    mut end: oneshot::Receiver<Option<Reason>>,
    mut replies: mpsc::Receiver<Bytes>,
    ctx: &FrontContext,
) where
    S: AsyncRead + AsyncWrite,
{
    let mut frames = FrameReader::with_buffered(BACKEND_TO_CLIENT_MAX, leftover);
    loop {
        // `FrameReader::next` is cancel-safe, so losing the race to a direct packet loses no
        // backend bytes.
        let packet = tokio::select! {
            biased;
            reason = &mut end => {
                if let Ok(Some(reason)) = reason {
                    let _ = write_flush(client_w, &mqtt::disconnect(reason)).await;
                }
                break;
            }
            frame = frames.next(backend_r) => match frame {
                Ok(f) => f,
                Err(e) => {
                    if !matches!(e, FrameError::Closed) {
                        warn!(error = %e, "backend stream to a client ended abnormally");
                    }
                    break;
                }
            },
            Some(p) = replies.recv() => p,
        };
        if write_flush(client_w, &packet).await.is_err() {
            break;
        }
        FrontStats::add(&ctx.stats.bytes_out, packet.len());
    }
    let _ = client_w.shutdown().await;
}

/// Answers a refused CONNECT (if there is an answer) and closes, within a bounded time.
async fn refuse<S: AsyncRead + AsyncWrite>(client_w: &mut WriteHalf<S>, refusal: Refusal) {
    if let Refusal::ConnAck(reason, text) = refusal {
        let connack = mqtt::connack(
            false,
            reason,
            &ConnAckProps {
                reason_string: Some(text.to_owned()),
                ..ConnAckProps::default()
            },
        );
        let _ = timeout(LAST_WORDS, async {
            let _ = write_flush(client_w, &connack).await;
            let _ = client_w.shutdown().await;
        })
        .await;
    }
}

async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}
