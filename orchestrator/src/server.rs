//! `aloft serve`: wires the store, the transport, the orchestrator's MQTT link, the engine and
//! the metrics endpoint together, and runs them until shutdown. The transport is a choice made
//! here: the mTLS front with the embedded broker (default), or an external MQTT 5 broker.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use aloft_broker::{BrokerConfig, EmbeddedBroker, FrontContext, SessionHook};
use aloft_certs::revocation::VerifiedCrl;
use aloft_certs::CertIdentity;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::info;
use zeroize::Zeroizing;

use crate::config::{layout, ExternalBroker, ServeConfig};
use crate::engine::{Engine, EngineConfig, EngineError, Inbound, SeenDevice};
use crate::lease::holder::LeaseHolder;
use crate::lease::LeaseTimes;
use crate::metrics::{self, Metrics};
use crate::mqtt::{self, LinkConfig};
use crate::replica::chunks::ChunkServer;
use crate::replica::inbox::{InboxReader, InboxWriter};
use crate::replica::Router;
use crate::store::pg_lease::PgLease;
use crate::store::{Sharing, Store, StoreError, StoreLocation};

/// The client id of the orchestrator's own broker connection (the brokers' rules name it).
pub use crate::broker_rules::ORCHESTRATOR_CLIENT_ID;

/// The MQTT 5 shared-subscription group the orchestrator reads device topics through on an
/// external broker (`$share/aloft/aloft/v1/d/+/status`, ...).
pub const SHARE_GROUP: &str = "aloft";

/// Why the orchestrator could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("unsealing {path}: {error}")]
    Sealed {
        path: String,
        error: aloft_vault::VaultError,
    },
    #[error("pki: {0}")]
    Pki(#[from] aloft_certs::PkiError),
    #[error("root of trust: {0}")]
    Trust(#[from] crate::trust::TrustStoreError),
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    #[error("broker: {0}")]
    Broker(#[from] aloft_broker::BrokerError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the orchestrator's broker link did not come up")]
    LinkDown,
    #[error("resolving the external broker {0}: no address")]
    Resolve(String),
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("engine task ended abnormally")]
    EngineTask,
    #[error("starting the renewal signer: {0}")]
    Signer(std::io::Error),
    #[error("starting a replica's chunk thread: {0}")]
    Thread(std::io::Error),
    #[error("starting the leader lease's thread: {0}")]
    LeaseThread(std::io::Error),
    #[error("{0}")]
    LeaseLost(String),
}

fn read(path: &Path) -> Result<String, ServeError> {
    std::fs::read_to_string(path).map_err(|source| ServeError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn open_sealed(
    path: &Path,
    unlock: &aloft_vault::Unlock,
) -> Result<Zeroizing<Vec<u8>>, ServeError> {
    aloft_vault::open_file(path, unlock).map_err(|error| ServeError::Sealed {
        path: path.display().to_string(),
        error,
    })
}

/// A running orchestrator.
pub struct Running {
    /// Where devices and operators connect (mTLS): the front, or the external broker.
    pub device_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub insecure_addr: Option<SocketAddr>,
    /// The read-only web console (HTTPS), if configured.
    pub console_addr: Option<SocketAddr>,
    /// Mints the console's viewer tokens (the demo prints a link with one).
    console_key: crate::console::TokenKey,
    pub metrics: Arc<Metrics>,
    /// The embedded broker's loopback listener and secret (operator traffic); `None` with an
    /// external broker. Exposed for tests that play a compromised server.
    pub backend: Option<aloft_broker::BackendAddr>,
    /// The front's device road: whoever holds it can send anything to any device and speak for
    /// any device, as the orchestrator and the front do; `None` with an external broker.
    /// Exposed for tests that play a compromised server.
    pub devices: Option<Arc<aloft_broker::DirectRoutes>>,
    shutdown: watch::Sender<bool>,
    engine: JoinHandle<Result<(), EngineError>>,
    /// The leader lease's thread, on a PostgreSQL store.
    lease: Option<LeaseHolder>,
}

impl Running {
    /// A viewer token for this orchestrator's console, valid for `ttl_secs` (at most 24 h).
    pub fn console_token(&self, ttl_secs: u64) -> Option<String> {
        self.console_key
            .mint(crate::engine::now_ms() / 1000, ttl_secs)
            .ok()
    }

    /// Stops accepting connections and ends the engine after its current batch, then releases
    /// the leader lease (after the engine: nothing is committed once it is released).
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        let _ = self.shutdown.send(true);
        self.engine.abort();
        let ended = match (&mut self.engine).await {
            Ok(r) => r.map_err(ServeError::from),
            Err(e) if e.is_cancelled() => Ok(()),
            Err(_) => Err(ServeError::EngineTask),
        };
        if let Some(lease) = self.lease.take() {
            let _ = tokio::task::spawn_blocking(move || lease.stop()).await;
        }
        ended
    }

    /// Waits until the engine stops by itself (it only does on a fatal error) or the leader
    /// lease is lost (the store is fenced already; the engine is stopped).
    pub async fn wait(&mut self) -> Result<(), ServeError> {
        let lost = lease_lost(self.lease.as_ref().map(LeaseHolder::status));
        tokio::select! {
            r = &mut self.engine => match r {
                Ok(r) => Ok(r?),
                Err(_) => Err(ServeError::EngineTask),
            },
            why = lost => {
                self.engine.abort();
                Err(ServeError::LeaseLost(why))
            }
        }
    }

    /// The leader lease's holder name on a PostgreSQL store (`replica-id#mark`).
    pub fn lease_holder(&self) -> Option<&str> {
        self.lease.as_ref().map(LeaseHolder::holder)
    }
}

/// Resolves with why the lease was lost; never without a lease.
async fn lease_lost(status: Option<watch::Receiver<crate::lease::holder::Status>>) -> String {
    let Some(mut rx) = status else {
        return std::future::pending().await;
    };
    let lost = rx
        .wait_for(|s| s.lost.is_some())
        .await
        .map(|s| s.lost.clone().unwrap_or_default());
    match lost {
        Ok(why) => why,
        // The thread ended without a loss: it was stopped, so the process is shutting down.
        Err(_) => std::future::pending().await,
    }
}

/// This process's replica id: `[lease] replica_id` (`--replica-id`), else hostname-pid.
fn replica_id(cfg: &ServeConfig) -> String {
    cfg.file
        .lease
        .replica_id
        .clone()
        .unwrap_or_else(crate::lease::holder::default_replica_id)
}

/// On a PostgreSQL store: starts the lease thread, whose first grant fences the store.
fn start_lease(cfg: &ServeConfig, store: &Store) -> Result<Option<LeaseHolder>, ServeError> {
    let (Some(fence), crate::store::StoreLocation::Postgres(url)) =
        (store.lease_fence(), cfg.store_location()?)
    else {
        return Ok(None);
    };
    let replica = replica_id(cfg);
    let ttl = std::time::Duration::from_secs(cfg.file.lease.ttl_secs);
    let pg = PgLease::new(&url, crate::lease::holder::holder_name(&replica), ttl)?;
    let times = LeaseTimes::from_ttl_ms(cfg.file.lease.ttl_secs * 1000);
    let holder = LeaseHolder::start(pg, times, fence).map_err(ServeError::LeaseThread)?;
    info!(holder = %holder.holder(), ttl_secs = cfg.file.lease.ttl_secs, "asking for the leader lease");
    Ok(Some(holder))
}

/// Starts everything and returns once the orchestrator accepts devices.
pub async fn start(cfg: ServeConfig) -> Result<Running, ServeError> {
    cfg.validate()?;
    aloft_certs::tls::install_crypto_provider();
    let pki = cfg.pki_dir();
    let ca_pem = read(&pki.join(aloft_certs::CA_CERT_FILE))?;
    let server_cert = read(&pki.join(layout::SERVER_CERT))?;
    // Unlock first: a data directory whose keys do not open never starts, not even empty.
    let server_key = open_sealed(&pki.join(layout::SERVER_KEY), &cfg.unlock)?;
    let server_key = std::str::from_utf8(&server_key).map_err(|_| ServeError::Sealed {
        path: pki.join(layout::SERVER_KEY).display().to_string(),
        error: aloft_vault::VaultError::Malformed("the server key is not PEM"),
    })?;
    let store_key = crate::ops::open_keystore(&cfg.data_dir, &cfg.unlock).map_err(|error| {
        ServeError::Sealed {
            path: cfg.data_dir.join(layout::KEYSTORE).display().to_string(),
            error,
        }
    })?;
    let console_key = crate::console::TokenKey::derive(&store_key);
    let location = cfg.store_location()?;
    // Replicas: a PostgreSQL store beside an external broker. Any number of processes share
    // the store then (`replica`); only the lease's holder writes to it.
    let replicated = location.is_postgres() && cfg.external_broker()?.is_some();
    let (store, reader) = if replicated {
        (
            Store::open_sharing(&location, store_key.clone(), Sharing::Replica)?,
            Some(Store::open_sharing(&location, store_key, Sharing::Reader)?),
        )
    } else {
        (Store::open_at(&location, store_key)?, None)
    };
    let lease = start_lease(&cfg, &store)?;
    let crl_path = cfg.data_dir.join(layout::CRL);
    // Fail closed: a crl.pem that exists must be readable and signed by the fleet CA, or the
    // orchestrator does not start (starting without it would un-revoke certificates).
    let crl = match std::fs::read_to_string(&crl_path) {
        Ok(pem) => Some(VerifiedCrl::parse(&pem, &ca_pem)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(ServeError::Read {
                path: crl_path.display().to_string(),
                source,
            })
        }
    };
    if let Some(c) = &crl {
        info!(
            crl_number = c.number,
            revoked = c.revoked.len(),
            "crl in force"
        );
    }
    let verifier = aloft_certs::tls::ReloadableClientVerifier::new(
        &ca_pem,
        crl.iter().map(|c| c.der.clone()).collect(),
    )?;
    let tls =
        aloft_certs::tls::server_config_reloadable(verifier.clone(), &server_cert, server_key)?;
    let console_tls = match cfg.file.console.listen {
        Some(_) => Some(aloft_certs::tls::console_server_config(
            verifier.clone(),
            &server_cert,
            server_key,
        )?),
        None => None,
    };
    // No root, no orchestrator: every upload is verified against it (fail closed).
    let trust_dir = cfg.data_dir.join(layout::TRUST_DIR);
    let trust = crate::trust::TrustState::load(&trust_dir)?;
    info!(version = trust.trusted.version(), "root of trust loaded");

    let (tx, rx) = mpsc::channel(8192);
    // Started before the link: the CA key is unsealed on the signer's thread while the rest
    // comes up, never on the engine's.
    let signer = crate::signer::Signer::start(pki.clone(), Some(cfg.unlock.clone()), tx.clone())
        .map_err(ServeError::Signer)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // A replica's link hands what it receives to its router, not to the engine.
    let (link_tx, link_rx) = mpsc::channel(8192);
    let link_tx = if replicated { link_tx } else { tx.clone() };
    // Operators' signed requests are checked with the front's own verifier (and CRLs); beside
    // an external broker, which does the handshakes, the engine keeps its CRLs current.
    let admin_auth = Arc::new(crate::admin::auth::Authenticator::new(verifier.clone()));
    let Transport {
        device_addr,
        insecure_addr,
        metrics,
        publisher,
        ctx,
        backend,
        broker_crl,
    } = match cfg.external_broker()? {
        Some(external) => {
            external_transport(
                &cfg,
                &external,
                &ca_pem,
                admin_auth.clone(),
                link_tx,
                replicated,
            )
            .await?
        }
        None => {
            embedded_transport(
                &cfg,
                tls,
                verifier,
                admin_auth.clone(),
                tx.clone(),
                &shutdown_rx,
            )
            .await?
        }
    };
    let metrics_addr = match cfg.file.metrics_listen {
        Some(addr) => {
            let l = bind(addr).await?;
            let a = l.local_addr().ok();
            tokio::spawn(metrics::serve(l, metrics.clone()));
            a
        }
        None => None,
    };
    if let Some(lease) = &lease {
        metrics.watch_lease(Arc::new(lease.view()));
        // The engine loads and commits only under the lease: its first commit is fenced. A
        // replica serves its share of the fleet meanwhile, and starts its engine when granted.
        if !replicated {
            let token = lease.granted().await.map_err(ServeError::LeaseLost)?;
            info!(%token, "leading: the engine starts");
        }
    }
    let console_store = reader.clone().unwrap_or_else(|| store.clone());
    // What a replica brings up to date with the database when it becomes the leader.
    let security = Security {
        store: store.clone(),
        trust_dir: trust_dir.clone(),
        crl_path: crl_path.clone(),
        ca_pem: ca_pem.clone(),
        admin_auth: admin_auth.clone(),
    };
    let engine = Engine::new(
        store,
        EngineConfig {
            trust,
            trust_dir: Some(trust_dir),
            ca_pem,
            direct: ctx.as_ref().map(|c| c.direct.clone()),
            front: ctx.clone(),
            operator_roles: cfg.operator_roles()?,
            crl,
            crl_path: Some(crl_path),
            signer: Some(signer),
            download_slots: cfg.file.downloads.slots,
            broker_crl,
            admin_auth: Some(admin_auth),
            share_security: replicated,
        },
        metrics.clone(),
    );
    let board = engine.board();
    let console_addr = match (cfg.file.console.listen, console_tls) {
        (Some(addr), Some(tls)) => {
            let l = bind(addr).await?;
            let a = l.local_addr().ok();
            tokio::spawn(crate::console::serve(
                l,
                crate::console::Console {
                    store: console_store,
                    board,
                    metrics: metrics.clone(),
                    key: console_key.clone(),
                    tls: Arc::new(tls),
                    file: cfg.file.console.clone(),
                },
                shutdown_rx.clone(),
            ));
            a
        }
        _ => None,
    };
    let engine = match (replicated, reader, &lease, location) {
        (true, Some(reader), Some(lease), StoreLocation::Postgres(url)) => {
            let inbox = InboxWriter::start(&url, replica_id(&cfg), metrics.clone())?;
            let chunks = ChunkServer::start(
                reader,
                publisher.clone(),
                inbox.clone(),
                metrics.clone(),
                cfg.file.downloads.slots,
            )
            .map_err(ServeError::Thread)?;
            let (engine_tx, engine_rx) = watch::channel(None);
            tokio::spawn(
                Router {
                    chunks,
                    inbox,
                    engine: engine_rx,
                }
                .run(link_rx),
            );
            let grant = lease.status();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                // Never granted: the lease was lost, which `Running::wait` reports.
                let Ok(token) = crate::lease::holder::granted(grant).await else {
                    return std::future::pending().await;
                };
                info!(%token, "leading: the engine starts and applies the replicas' inbox");
                let engine = security.sync_into(engine).await;
                // Dropped with this task: the reader stops with the engine.
                let _inbox = InboxReader::start(&url, tx.clone(), metrics)?;
                let _ = engine_tx.send(Some(tx));
                engine.run(rx, publisher).await
            })
        }
        _ => tokio::spawn(engine.run(rx, publisher)),
    };
    info!(%device_addr, ?metrics_addr, ?console_addr, "orchestrator listening");
    Ok(Running {
        device_addr,
        metrics_addr,
        insecure_addr,
        console_addr,
        console_key,
        metrics,
        backend,
        devices: ctx.map(|c| c.direct.clone()),
        shutdown: shutdown_tx,
        engine,
        lease,
    })
}

/// What the engine talks to devices and operators through: the front and the embedded broker,
/// or an external broker.
struct Transport {
    device_addr: SocketAddr,
    insecure_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    publisher: mqtt::Publisher,
    ctx: Option<Arc<FrontContext>>,
    backend: Option<aloft_broker::BackendAddr>,
    broker_crl: Option<crate::engine::BrokerCrl>,
}

/// The default: the mTLS front (devices served on its device road, operators relayed) and the
/// embedded rumqttd the orchestrator's link reaches on loopback.
async fn embedded_transport(
    cfg: &ServeConfig,
    tls: rustls::ServerConfig,
    verifier: Arc<aloft_certs::tls::ReloadableClientVerifier>,
    admin_auth: Arc<crate::admin::auth::Authenticator>,
    tx: mpsc::Sender<Inbound>,
    shutdown_rx: &watch::Receiver<bool>,
) -> Result<Transport, ServeError> {
    let broker_cfg = BrokerConfig::from(&cfg.file.broker);
    let broker = tokio::task::spawn_blocking(move || EmbeddedBroker::start(broker_cfg))
        .await
        .map_err(|_| ServeError::EngineTask)??;
    let ctx = Arc::new(
        FrontContext::new(Arc::new(tls), broker.backend(), cfg.file.front.clone())?
            .with_session_hook(device_seen_hook(tx.clone()))
            .with_reloadable_verifier(verifier),
    );
    let metrics = Metrics::new(Some(ctx.stats.clone()), Some(ctx.direct.clone()));
    metrics.name_replica(&replica_id(cfg));
    let listener = bind(cfg.file.listen).await?;
    let device_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.file.listen,
        source,
    })?;
    tokio::spawn(aloft_broker::serve(
        listener,
        ctx.clone(),
        until(shutdown_rx.clone()),
    ));
    let insecure_addr = match cfg.file.insecure_plain_listen {
        Some(addr) => {
            let l = bind(addr).await?;
            let a = l.local_addr().ok();
            tokio::spawn(aloft_broker::serve_plain_insecure(
                l,
                ctx.clone(),
                true,
                until(shutdown_rx.clone()),
            ));
            a
        }
        None => None,
    };
    let (username, password) = broker.credentials_for(ORCHESTRATOR_CLIENT_ID);
    let link_cfg = LinkConfig {
        host: broker.addr().ip().to_string(),
        port: broker.addr().port(),
        client_id: ORCHESTRATOR_CLIENT_ID.into(),
        credentials: Some((username, password)),
        tls: None,
        share_group: None,
        max_packet_bytes: 2 * 1024 * 1024,
        admin_auth,
        replica: false,
    };
    // Devices' messages come from the front's device road, not through the broker.
    if let Some(mut inbox) = ctx.direct.take_inbox() {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(message) = inbox.recv().await {
                if tx.send(mqtt::from_device(message)).await.is_err() {
                    break;
                }
            }
        });
    }
    let publisher = link_up(&link_cfg, tx, &metrics).await?;
    let publisher = publisher.with_device_road(ctx.direct.clone());
    Ok(Transport {
        device_addr,
        insecure_addr,
        metrics,
        publisher,
        ctx: Some(ctx),
        backend: Some(broker.backend()),
        broker_crl: None,
    })
    // `broker` is dropped here: rumqttd runs on its own threads for the life of the process.
}

/// An external MQTT 5 broker: the orchestrator is one of its clients, authenticated by
/// `pki/orchestrator.crt`; the broker's ACL keeps each device to its own topics, so the topic
/// names the device. No front, no device road, no session hook: devices are registered by an
/// operator (`device_register`).
async fn external_transport(
    cfg: &ServeConfig,
    external: &ExternalBroker,
    ca_pem: &str,
    admin_auth: Arc<crate::admin::auth::Authenticator>,
    tx: mpsc::Sender<Inbound>,
    replicated: bool,
) -> Result<Transport, ServeError> {
    let pki = cfg.pki_dir();
    let cert = read(&pki.join(layout::ORCHESTRATOR_CERT))?;
    let key_path = pki.join(layout::ORCHESTRATOR_KEY);
    let key = open_sealed(&key_path, &cfg.unlock)?;
    let key = std::str::from_utf8(&key).map_err(|_| ServeError::Sealed {
        path: key_path.display().to_string(),
        error: aloft_vault::VaultError::Malformed("the orchestrator key is not PEM"),
    })?;
    // The broker's server certificate is checked against the fleet CA (`aloft broker-config`
    // issues it from there), and its name against the URL's host.
    let tls = aloft_certs::tls::client_config(ca_pem, &cert, key)?;
    let device_addr = tokio::net::lookup_host((external.host.as_str(), external.port))
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ServeError::Resolve(format!("{}:{}", external.host, external.port)))?;
    let metrics = Metrics::new(None, None);
    metrics.name_replica(&replica_id(cfg));
    let link_cfg = LinkConfig {
        host: external.host.clone(),
        port: external.port,
        // Replicas must not take over each other's broker sessions.
        client_id: match replicated {
            true => format!(
                "{ORCHESTRATOR_CLIENT_ID}-{}",
                client_id_part(&replica_id(cfg))
            ),
            false => ORCHESTRATOR_CLIENT_ID.into(),
        },
        credentials: None,
        tls: Some(Arc::new(tls)),
        share_group: Some(SHARE_GROUP.into()),
        max_packet_bytes: 2 * 1024 * 1024,
        admin_auth,
        replica: replicated,
    };
    let publisher = link_up(&link_cfg, tx, &metrics).await?;
    let broker_crl = cfg
        .file
        .external_broker_crl
        .clone()
        .map(|path| crate::engine::BrokerCrl {
            path,
            pid_file: cfg.file.external_broker_pid_file.clone(),
        });
    info!(host = %external.host, port = external.port, "using an external broker");
    Ok(Transport {
        device_addr,
        insecure_addr: None,
        metrics,
        publisher,
        ctx: None,
        backend: None,
        broker_crl,
    })
}

/// (Replicas) The files and the checker a replica brings up to date with the database when it
/// becomes the leader (`replica::security`).
struct Security {
    store: Store,
    trust_dir: std::path::PathBuf,
    crl_path: std::path::PathBuf,
    ca_pem: String,
    admin_auth: Arc<crate::admin::auth::Authenticator>,
}

impl Security {
    /// Syncs, retrying while the database cannot be reached (the engine must not start on
    /// older security state than the last leader's), and hands the result to `engine`.
    async fn sync_into(self, engine: Engine) -> Engine {
        let mut wait = std::time::Duration::from_millis(100);
        loop {
            let s = self.store.clone();
            let (dir, path, ca) = (
                self.trust_dir.clone(),
                self.crl_path.clone(),
                self.ca_pem.clone(),
            );
            let synced = tokio::task::spawn_blocking(move || {
                crate::replica::security::sync(&s, &dir, &path, &ca)
            })
            .await;
            match synced {
                Ok(Ok(synced)) => {
                    if let Some(crl) = &synced.crl {
                        if let Err(e) = self.admin_auth.set_crls(vec![crl.der.clone()]) {
                            tracing::warn!(error = %e, "the admin request checker refused the CRL in force");
                        }
                    }
                    return engine.with_security(synced.trust, synced.crl);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "bringing the root of trust and the CRL up to date failed; trying again")
                }
                Err(e) => tracing::warn!(error = %e, "the security sync task failed; trying again"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(5));
        }
    }
}

/// A replica id as part of an MQTT client id: ASCII letters, digits, `-`, `_` and `.` kept,
/// anything else `_`, at most 64 characters.
fn client_id_part(replica: &str) -> String {
    replica
        .chars()
        .take(64)
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '_',
        })
        .collect()
}

/// Connects the orchestrator's MQTT link and waits for its first SUBACK.
async fn link_up(
    link_cfg: &LinkConfig,
    tx: mpsc::Sender<Inbound>,
    metrics: &Arc<Metrics>,
) -> Result<mqtt::Publisher, ServeError> {
    let (m, up) = (metrics.clone(), metrics.clone());
    let (publisher, mut ready) = mqtt::connect(
        link_cfg,
        tx,
        move |reason| m.rejected("topic", reason),
        move |ok| up.broker_link(ok),
    );
    let up = tokio::time::timeout(std::time::Duration::from_secs(10), ready.wait_for(|r| *r)).await;
    if !matches!(up, Ok(Ok(_))) {
        return Err(ServeError::LinkDown);
    }
    Ok(publisher)
}

/// Turns every device session the front establishes into a `DeviceSeen` event, which registers
/// a device on first contact (its certificate is from the fleet CA, so it is one of ours).
fn device_seen_hook(tx: mpsc::Sender<Inbound>) -> SessionHook {
    SessionHook(Arc::new(move |identity: &CertIdentity| {
        let (Some(id), Some(x25519_public)) = (identity.device_id(), identity.x25519) else {
            return;
        };
        let seen = SeenDevice {
            id,
            x25519_public,
            not_before: identity.not_before,
            not_after: identity.not_after,
            serial: identity.serial.clone(),
        };
        // Queue without blocking the relay; on a full queue wait for room on a task of its own.
        if let Err(mpsc::error::TrySendError::Full(ev)) = tx.try_send(Inbound::DeviceSeen(seen)) {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(ev).await;
            });
        }
    }))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

async fn until(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
