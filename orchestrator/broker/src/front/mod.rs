//! The mTLS front: the only listener devices and operators reach.
//!
//! It owns accepting sockets, TLS handshakes (in parallel, capped and timed out, never awaited
//! by the accept loop), turning the verified client certificate into a [`Peer`], and handing the
//! connection to [`relay`], which binds the MQTT session to that peer and enforces [`acl`] on
//! the way to the embedded broker.
//!
//! Invariant: nothing reaches the backend before the peer's certificate was verified, its
//! CONNECT named exactly the certificate's identity, and no other live connection holds it.

pub mod acl;
pub mod direct;
#[doc(hidden)]
pub mod fuzzing;
mod identity;
pub(crate) mod mqtt;
mod registry;
mod relay;
mod stats;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::embedded::BackendAddr;
use crate::BrokerError;
pub use direct::{DeliverError, DirectRoutes};
pub use identity::{IdentityError, Peer};
pub use registry::Registry;
use relay::IdentitySource;
use stats::ActiveGuard;
pub use stats::{FrontStats, FrontStatsSnapshot};

/// Limits of the front; also the `[front]` section of the orchestrator's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrontConfig {
    /// Time a socket gets to wait for a handshake slot and complete its TLS handshake.
    pub handshake_timeout_ms: u64,
    /// TLS handshakes in progress at once; more wait (within their timeout).
    pub max_concurrent_handshakes: usize,
    /// Open sockets at once; beyond that new sockets are closed immediately.
    pub max_connections: usize,
    /// Largest MQTT packet a device may send (devices only send small JSON).
    pub device_max_packet_bytes: usize,
    /// Largest MQTT packet an operator may send (release uploads).
    pub operator_max_packet_bytes: usize,
    /// Time between the end of the TLS handshake and the CONNECT packet's arrival.
    pub connect_timeout_ms: u64,
}

impl Default for FrontConfig {
    fn default() -> Self {
        Self {
            handshake_timeout_ms: 10_000,
            max_concurrent_handshakes: 512,
            max_connections: 20_000,
            device_max_packet_bytes: 16 * 1024,
            operator_max_packet_bytes: 1024 * 1024 + 4 * 1024,
            connect_timeout_ms: 10_000,
        }
    }
}

impl FrontConfig {
    /// Refuses limits that would make the front refuse everything or frame nothing.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let bad = |m: &str| Err(BrokerError::Config(m.to_owned()));
        if self.handshake_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return bad("front timeouts must be positive");
        }
        if self.max_concurrent_handshakes == 0 || self.max_connections == 0 {
            return bad("max_concurrent_handshakes and max_connections must be at least 1");
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
    /// Slots for TLS handshakes in progress (`max_concurrent_handshakes`).
    handshake_slots: Semaphore,
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
            handshake_slots: Semaphore::new(cfg.max_concurrent_handshakes),
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

    /// Sets the hook told about every certificate-authenticated session.
    #[must_use]
    pub fn with_session_hook(mut self, hook: SessionHook) -> Self {
        self.on_session = Some(hook);
        self
    }
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
        // Counted here rather than in the task so a burst of accepts cannot overshoot the cap.
        let guard = ActiveGuard::new(Arc::clone(&ctx.stats));
        let ctx = Arc::clone(&ctx);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                _ = stop.changed() => {}
                () = handle(tcp, addr, &ctx, mode) => {}
            }
        });
    }
    // Listener first: once any relay sees its connection end, new connects are refused too.
    drop(listener);
    drop(stop_tx);
    info!("front stopped accepting");
}

async fn handle(tcp: TcpStream, addr: SocketAddr, ctx: &FrontContext, mode: Mode) {
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
            relay::run(tcp, addr, source, None, ctx).await;
        }
        Mode::Tls => {
            let Some(tls) = handshake(tcp, addr, ctx).await else {
                return;
            };
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first());
            // Fail closed: no certificate (cannot happen with a verifier that requires one,
            // but the config is the caller's) or an identity we do not accept ends it here.
            let Some(cert) = cert else {
                FrontStats::inc(&ctx.stats.certificates_refused);
                info!(%addr, "no client certificate after handshake");
                return;
            };
            let identity = match aloft_certs::parse_identity(cert.as_ref()) {
                Ok(identity) => identity,
                Err(e) => {
                    FrontStats::inc(&ctx.stats.certificates_refused);
                    info!(%addr, error = %e, "client certificate identity unparsable");
                    return;
                }
            };
            let peer = match Peer::from_identity(&identity) {
                Ok(peer) => peer,
                Err(e) => {
                    FrontStats::inc(&ctx.stats.certificates_refused);
                    info!(%addr, error = %e, "client certificate identity refused");
                    return;
                }
            };
            let source = IdentitySource::Certificate(peer);
            relay::run(tls, addr, source, Some(identity), ctx).await;
        }
    }
}

/// Waits for a handshake slot and runs the TLS handshake, both within the handshake timeout.
async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    ctx: &FrontContext,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let acceptor = TlsAcceptor::from(Arc::clone(&ctx.tls));
    let limit = Duration::from_millis(ctx.cfg.handshake_timeout_ms);
    let attempt = tokio::time::timeout(limit, async {
        // The semaphore is never closed, so `acquire` cannot fail; treat it as a refusal
        // anyway rather than unwrap.
        let _slot = ctx.handshake_slots.acquire().await.ok()?;
        Some(acceptor.accept(tcp).into_fallible().await)
    });
    // Pinned here so that on a timeout the socket is dropped (closed) only when this function
    // returns, after the counter moved: whoever sees the close also sees the count.
    tokio::pin!(attempt);
    match (&mut attempt).await {
        Ok(Some(Ok(tls))) => {
            FrontStats::inc(&ctx.stats.handshakes_ok);
            Some(tls)
        }
        Ok(Some(Err((e, tcp)))) => {
            FrontStats::inc(&ctx.stats.handshakes_failed);
            debug!(%addr, error = %e, "tls handshake failed");
            drop(tcp);
            None
        }
        Ok(None) => None,
        Err(_) => {
            FrontStats::inc(&ctx.stats.handshakes_timed_out);
            debug!(%addr, "tls handshake timed out");
            None
        }
    }
}
