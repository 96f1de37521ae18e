//! The mTLS front: the only listener devices and operators reach.
//!
//! It owns accepting sockets, TLS handshakes (in parallel, capped in total and per source
//! address, timed out, never awaited by the accept loop, see [`pending`]), turning the verified
//! client certificate into a [`Peer`], and handing the connection to [`relay`], which binds the
//! MQTT session to that peer and enforces [`acl`]: an operator's session goes on to the embedded
//! broker, a device's is served by [`session`] on the device road ([`direct`]).
//!
//! Invariant: nothing reaches the backend before the peer's certificate was verified, its
//! CONNECT named exactly the certificate's identity, and no other live connection holds it.

pub mod acl;
pub mod direct;
#[doc(hidden)]
pub mod fuzzing;
mod identity;
pub(crate) mod mqtt;
mod pending;
mod queue;
mod registry;
mod relay;
mod session;
mod stats;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aloft_certs::tls::stream::{self as tls, TlsStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::embedded::BackendAddr;
use crate::BrokerError;
pub use direct::{DeliverError, DeviceBound, DeviceMessage, DeviceTopic, DirectRoutes};
pub use identity::{IdentityError, Peer};
use pending::{LogLimit, PendingTable, Slot};
pub use registry::Registry;
use relay::IdentitySource;
use stats::ActiveGuard;
pub use stats::{FrontStats, FrontStatsSnapshot};

/// Limits of the front; also the `[front]` section of the orchestrator's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrontConfig {
    /// Time from accept to the end of the TLS handshake.
    pub handshake_timeout_ms: u64,
    /// Time from accept to the first byte (of the ClientHello).
    pub first_byte_timeout_ms: u64,
    /// Unauthenticated sockets (accepted, handshake unfinished) held at once. A new socket
    /// beyond this closes the oldest one that has sent nothing (else the oldest): none waits.
    pub max_concurrent_handshakes: usize,
    /// Unauthenticated sockets one source address may hold. Beyond it, a new socket from that
    /// address closes that address's oldest silent one, or is refused if none is silent.
    pub max_handshakes_per_source: usize,
    /// Open sockets at once; beyond that new sockets are closed immediately.
    pub max_connections: usize,
    /// Largest MQTT packet a device may send (devices only send small JSON).
    pub device_max_packet_bytes: usize,
    /// Largest MQTT packet an operator may send (release uploads).
    pub operator_max_packet_bytes: usize,
    /// Time between the end of the TLS handshake and the CONNECT packet's arrival.
    pub connect_timeout_ms: u64,
    /// Topic filters one session may subscribe to, over all its SUBSCRIBEs; a SUBSCRIBE beyond
    /// is answered SUBACK 0x97 (Quota exceeded) and not forwarded.
    pub max_subscriptions_per_session: usize,
}

impl Default for FrontConfig {
    fn default() -> Self {
        Self {
            handshake_timeout_ms: 10_000,
            // A ClientHello leaves with the TCP handshake's last ACK: 2 s covers a slow link.
            first_byte_timeout_ms: 2_000,
            max_concurrent_handshakes: 512,
            // Above device-sim's default of 64 connects at once from one address, with room.
            max_handshakes_per_source: 128,
            max_connections: 20_000,
            device_max_packet_bytes: 16 * 1024,
            operator_max_packet_bytes: 1024 * 1024 + 4 * 1024,
            connect_timeout_ms: 10_000,
            // An honest device subscribes to 3 or 4 filters once per connection.
            max_subscriptions_per_session: 16,
        }
    }
}

impl FrontConfig {
    /// Refuses limits that would make the front refuse everything or frame nothing.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let bad = |m: &str| Err(BrokerError::Config(m.to_owned()));
        if self.handshake_timeout_ms == 0
            || self.connect_timeout_ms == 0
            || self.first_byte_timeout_ms == 0
        {
            return bad("front timeouts must be positive");
        }
        if self.first_byte_timeout_ms > self.handshake_timeout_ms {
            return bad("first_byte_timeout_ms must not exceed handshake_timeout_ms");
        }
        if self.max_concurrent_handshakes == 0
            || self.max_handshakes_per_source == 0
            || self.max_connections == 0
            || self.max_subscriptions_per_session == 0
        {
            return bad("max_concurrent_handshakes, max_handshakes_per_source, max_connections and max_subscriptions_per_session must be at least 1");
        }
        // 256 bytes fits any CONNECT Aloft sends; MQTT cannot frame more than 256 MiB.
        let range = 256..=256 * 1024 * 1024;
        if !range.contains(&self.device_max_packet_bytes)
            || !range.contains(&self.operator_max_packet_bytes)
        {
            return bad("max packet sizes must be between 256 bytes and 256 MiB");
        }
        Ok(())
    }

    /// The packet size limit of `peer`.
    pub fn max_packet_bytes(&self, peer: &Peer) -> usize {
        match peer {
            Peer::Device(_) => self.device_max_packet_bytes,
            Peer::Operator(_) => self.operator_max_packet_bytes,
        }
    }
}

/// Called once per relayed session of a certificate-authenticated peer, after CONNACK: how the
/// orchestrator learns (and auto-registers) the devices that connect. It must not block; the
/// orchestrator's hook only queues an event.
#[derive(Clone)]
pub struct SessionHook(pub Arc<dyn Fn(&aloft_certs::CertIdentity) + Send + Sync>);

impl std::fmt::Debug for SessionHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionHook")
    }
}

/// Everything a front connection needs, shared by all of them.
#[derive(Debug)]
pub struct FrontContext {
    /// TLS settings: must require and verify client certificates (and enforce the CRL).
    pub tls: Arc<rustls::ServerConfig>,
    /// The embedded broker every session is relayed to.
    pub backend: BackendAddr,
    pub cfg: FrontConfig,
    pub stats: Arc<FrontStats>,
    /// Identities connected right now.
    pub registry: Arc<Registry>,
    /// Told about every session established with a client certificate.
    pub on_session: Option<SessionHook>,
    /// Device-bound packets the orchestrator delivers past the broker (chunk responses).
    pub direct: Arc<DirectRoutes>,
    /// The client certificate verifier inside `tls`, when its CRLs can be replaced at run time
    /// (see [`FrontContext::apply_crl`]).
    pub client_verifier: Option<Arc<aloft_certs::tls::ReloadableClientVerifier>>,
    /// Unauthenticated sockets (`max_concurrent_handshakes`, `max_handshakes_per_source`).
    pending: Arc<PendingTable>,
    /// Refusals and evictions of unauthenticated sockets are logged at most once a second.
    pending_log: LogLimit,
}

impl FrontContext {
    pub fn new(
        tls: Arc<rustls::ServerConfig>,
        backend: BackendAddr,
        cfg: FrontConfig,
    ) -> Result<FrontContext, BrokerError> {
        cfg.validate()?;
        Ok(FrontContext {
            tls,
            backend,
            pending: PendingTable::new(
                cfg.max_concurrent_handshakes,
                cfg.max_handshakes_per_source,
            ),
            pending_log: LogLimit::new(Duration::from_secs(1)),
            cfg,
            stats: Arc::default(),
            registry: Arc::default(),
            on_session: None,
            direct: Arc::default(),
            client_verifier: None,
        })
    }

    /// Declares `verifier` as the one `tls` verifies clients with, so that
    /// [`FrontContext::apply_crl`] can replace its CRLs.
    #[must_use]
    pub fn with_reloadable_verifier(
        mut self,
        verifier: Arc<aloft_certs::tls::ReloadableClientVerifier>,
    ) -> Self {
        self.client_verifier = Some(verifier);
        self
    }

    /// Enforces `crl` from now on, without a restart: every handshake that starts after this
    /// returns is checked against it, and every live session whose certificate it revokes is
    /// ended (DISCONNECT 0x98). Returns the peers told to go. The caller has verified that the
    /// fleet CA signed `crl`.
    ///
    /// Fails, and changes nothing, if this front's verifier cannot be reloaded: a front that
    /// cannot enforce a CRL must not pretend it does.
    pub fn apply_crl(
        &self,
        crl: &aloft_certs::revocation::VerifiedCrl,
    ) -> Result<Vec<Peer>, BrokerError> {
        let Some(verifier) = &self.client_verifier else {
            return Err(BrokerError::Config(
                "this front's client verifier cannot be reloaded".into(),
            ));
        };
        verifier
            .set_crls(vec![crl.der.clone()])
            .map_err(|e| BrokerError::Config(format!("crl refused by the verifier: {e}")))?;
        FrontStats::inc(&self.stats.crl_reloads);
        // New handshakes see the new CRL before any session is ended, so a dropped device that
        // reconnects at once is refused.
        let dropped = self
            .registry
            .disconnect_revoked(|serial| crl.is_revoked(serial));
        info!(
            crl_number = crl.number,
            revoked = crl.revoked.len(),
            dropped = dropped.len(),
            "crl applied"
        );
        Ok(dropped)
    }

    /// Unauthenticated sockets held right now: those that have sent nothing yet, and those
    /// whose TLS handshake is under way.
    pub fn pending_handshakes(&self) -> PendingHandshakes {
        let (silent, in_handshake) = self.pending.counts();
        PendingHandshakes {
            silent,
            in_handshake,
        }
    }

    /// Sets the hook told about every certificate-authenticated session.
    #[must_use]
    pub fn with_session_hook(mut self, hook: SessionHook) -> Self {
        self.on_session = Some(hook);
        self
    }
}

/// See [`FrontContext::pending_handshakes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingHandshakes {
    pub silent: usize,
    pub in_handshake: usize,
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Tls,
    Plain { identity_from_client_id: bool },
}

/// Serves MQTT over mTLS on `listener` until `shutdown` completes; then stops accepting and
/// drops every connection it relays.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<FrontContext>,
    shutdown: impl Future<Output = ()>,
) {
    accept_loop(listener, ctx, shutdown, Mode::Tls).await;
}

/// INSECURE, for local debugging only: serves MQTT over plain TCP, taking a device's identity
/// from its CONNECT client id, so anyone who can reach the port can be any device.
///
/// With `identity_from_client_id == false` every CONNECT is refused (0x87): the flag is the
/// explicit opt-in. Every connection is logged at warn.
pub async fn serve_plain_insecure(
    listener: TcpListener,
    ctx: Arc<FrontContext>,
    identity_from_client_id: bool,
    shutdown: impl Future<Output = ()>,
) {
    warn!(addr = ?listener.local_addr().ok(), "INSECURE plain-TCP MQTT listener enabled: identity is whatever the client claims");
    let mode = Mode::Plain {
        identity_from_client_id,
    };
    accept_loop(listener, ctx, shutdown, mode).await;
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<FrontContext>,
    shutdown: impl Future<Output = ()>,
    mode: Mode,
) {
    // Dropping the sender when we return ends every connection task (their `changed()`
    // resolves with an error), which is how "existing relays are dropped" on shutdown.
    let (stop_tx, stop_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning on the error.
                    warn!(error = %e, "front accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let active = ctx.stats.connections_active.load(Ordering::Relaxed);
        if active >= ctx.cfg.max_connections as u64 {
            FrontStats::inc(&ctx.stats.connections_over_limit);
            debug!(%addr, active, "front at max_connections; closing new socket");
            continue;
        }
        // Admitted here, in accept order, so that "oldest" means what it says and a refused
        // socket costs no task.
        let slot = match mode {
            Mode::Tls => match admit_pending(&ctx, addr) {
                Some(slot) => Some(slot),
                None => continue,
            },
            Mode::Plain { .. } => None,
        };
        // Counted here rather than in the task so a burst of accepts cannot overshoot the cap.
        let guard = ActiveGuard::new(Arc::clone(&ctx.stats));
        let ctx = Arc::clone(&ctx);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                _ = stop.changed() => {}
                () = handle(tcp, addr, slot, &ctx, mode) => {}
            }
        });
    }
    // Listener first: once any relay sees its connection end, new connects are refused too.
    drop(listener);
    drop(stop_tx);
    info!("front stopped accepting");
}

/// Gives a socket just accepted from `addr` its pending-handshake entry, or refuses it (`None`:
/// drop it). Counts and logs who is refused or evicted.
fn admit_pending(ctx: &FrontContext, addr: SocketAddr) -> Option<(Slot, EvictionSignal)> {
    match ctx.pending.admit(addr) {
        Ok((slot, signal, evicted)) => {
            if let Some(ev) = evicted {
                FrontStats::inc(&ctx.stats.handshakes_evicted);
                if let Some(held_back) = ctx.pending_log.allow() {
                    warn!(victim = %ev.addr, silent = ev.silent, reason = ev.why.as_str(), for_source = %addr, held_back, "unauthenticated socket evicted to admit a new one");
                } else {
                    debug!(victim = %ev.addr, reason = ev.why.as_str(), "unauthenticated socket evicted");
                }
            }
            Some((slot, signal))
        }
        Err(pending::Refused) => {
            FrontStats::inc(&ctx.stats.handshakes_refused_per_source);
            if let Some(held_back) = ctx.pending_log.allow() {
                warn!(%addr, limit = ctx.cfg.max_handshakes_per_source, held_back, "new socket refused: its source address holds its limit of unfinished handshakes");
            } else {
                debug!(%addr, "new socket refused: source at its handshake limit");
            }
            None
        }
    }
}

async fn handle(
    tcp: TcpStream,
    addr: SocketAddr,
    slot: Option<(Slot, EvictionSignal)>,
    ctx: &FrontContext,
    mode: Mode,
) {
    // MQTT is request/response-heavy with small packets: Nagle would only add latency.
    let _ = tcp.set_nodelay(true);
    match mode {
        Mode::Plain {
            identity_from_client_id,
        } => {
            warn!(%addr, "INSECURE plain-TCP MQTT connection");
            let source = IdentitySource::ClaimedClientId {
                allowed: identity_from_client_id,
            };
            Box::pin(relay::run(tcp, addr, source, None, ctx)).await;
        }
        Mode::Tls => {
            let Some((slot, evicted)) = slot else {
                return;
            };
            // Boxed, like the session below: the task keeps room only for what is running.
            let Some(tls) = Box::pin(handshake(tcp, addr, slot, evicted, ctx)).await else {
                return;
            };
            if let Some(session) = tls_session(tls, addr, ctx) {
                session.await;
            }
        }
    }
}

/// The boxed session of a connection whose handshake is done, or `None` if its certificate
/// names no identity we accept.
///
/// A plain function, not part of `handle`: a local of an async fn that is borrowed (here, to
/// read the peer's certificate) keeps its room in the future until its scope ends, and the
/// TLS stream (1.2 KB) then stayed in every connection's task beside the session that owns it.
fn tls_session<'a>(
    tls: TlsStream<tls::Server>,
    addr: SocketAddr,
    ctx: &'a FrontContext,
) -> Option<std::pin::Pin<Box<impl Future<Output = ()> + 'a>>> {
    let cert = tls.peer_certificates().and_then(|chain| chain.first());
    // Fail closed: no certificate (cannot happen with a verifier that requires one, but the
    // config is the caller's) or an identity we do not accept ends it here.
    let Some(cert) = cert else {
        FrontStats::inc(&ctx.stats.certificates_refused);
        info!(%addr, "no client certificate after handshake");
        return None;
    };
    let identity = match aloft_certs::parse_identity(cert.as_ref()) {
        Ok(identity) => identity,
        Err(e) => {
            FrontStats::inc(&ctx.stats.certificates_refused);
            info!(%addr, error = %e, "client certificate identity unparsable");
            return None;
        }
    };
    let peer = match Peer::from_identity(&identity) {
        Ok(peer) => peer,
        Err(e) => {
            FrontStats::inc(&ctx.stats.certificates_refused);
            info!(%addr, error = %e, "client certificate identity refused");
            return None;
        }
    };
    let source = IdentitySource::Certificate(peer);
    Some(Box::pin(relay::run(tls, addr, source, Some(identity), ctx)))
}

/// Runs the TLS handshake of a socket holding `slot`: its first byte within the first-byte
/// timeout, the whole handshake within the handshake timeout, unless it is evicted first.
async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    slot: Slot,
    evicted: EvictionSignal,
    ctx: &FrontContext,
) -> Option<TlsStream<tls::Server>> {
    let started = tokio::time::Instant::now();
    let first_byte = Duration::from_millis(ctx.cfg.first_byte_timeout_ms);
    let whole = Duration::from_millis(ctx.cfg.handshake_timeout_ms);
    let attempt = async {
        let mut probe = [0u8; 1];
        match tokio::time::timeout(first_byte, tcp.peek(&mut probe)).await {
            Ok(Ok(1..)) => slot.spoke(),
            // Closed, or an error, before saying anything: nothing to count.
            Ok(_) => return Outcome::Gone,
            Err(_) => {
                // Counted here, while this block still owns the socket: whoever sees it close
                // also sees the count.
                FrontStats::inc(&ctx.stats.handshakes_timed_out);
                return Outcome::TimedOut("no first byte");
            }
        }
        // Pinned here rather than awaited through `timeout_at`: an awaited future is dropped
        // (closing the socket it owns) as the `.await` ends, before a match on its result
        // runs, and a test watching for the close could then read the count before it moved.
        let accept = tls::accept(tcp, Arc::clone(&ctx.tls));
        tokio::pin!(accept);
        tokio::select! {
            accepted = &mut accept => match accepted {
                Ok(tls) => Outcome::Done(Box::new(tls)),
                Err(e) => Outcome::Failed(e),
            },
            () = tokio::time::sleep_until(started + whole) => {
                // `accept`, which owns the socket, is dropped when this block returns.
                FrontStats::inc(&ctx.stats.handshakes_timed_out);
                Outcome::TimedOut("handshake unfinished")
            }
        }
    };
    // A timed-out socket is counted inside `attempt`, before it is closed: a completed async
    // block drops what it owns as it returns, before the match below runs.
    let outcome = tokio::select! {
        outcome = attempt => outcome,
        _ = evicted => Outcome::Evicted,
    };
    match outcome {
        Outcome::Done(tls) => {
            FrontStats::inc(&ctx.stats.handshakes_ok);
            Some(*tls)
        }
        Outcome::Failed(e) => {
            FrontStats::inc(&ctx.stats.handshakes_failed);
            debug!(%addr, error = %e, "tls handshake failed");
            None
        }
        Outcome::TimedOut(phase) => {
            debug!(%addr, phase, "tls handshake timed out");
            None
        }
        // Counted and logged by whoever evicted it.
        Outcome::Evicted | Outcome::Gone => None,
    }
}

/// Resolves when a pending socket is evicted to make room for another.
type EvictionSignal = tokio::sync::oneshot::Receiver<()>;

/// How a handshake attempt ended.
enum Outcome {
    Done(Box<TlsStream<tls::Server>>),
    Failed(std::io::Error),
    TimedOut(&'static str),
    Evicted,
    Gone,
}
