//! `aloft serve`: wires the store, the embedded broker, the mTLS front, the orchestrator's MQTT
//! link, the engine and the metrics endpoint together, and runs them until shutdown.

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

use crate::config::{layout, ServeConfig};
use crate::engine::{Engine, EngineConfig, EngineError, Inbound, SeenDevice};
use crate::metrics::{self, Metrics};
use crate::mqtt::{self, LinkConfig};
use crate::store::{Store, StoreError};

/// The client id of the orchestrator's own broker connection.
pub const ORCHESTRATOR_CLIENT_ID: &str = "aloft-orchestrator";

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
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("engine task ended abnormally")]
    EngineTask,
    #[error("starting the renewal signer: {0}")]
    Signer(std::io::Error),
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
    /// Where devices and operators connect (mTLS).
    pub device_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub insecure_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    /// The embedded broker's loopback listener and secret (operator traffic). Exposed for
    /// tests that play a compromised server.
    pub backend: aloft_broker::BackendAddr,
    /// The front's device road: whoever holds it can send anything to any device and speak for
    /// any device, as the orchestrator and the front do. Exposed for tests that play a
    /// compromised server.
    pub devices: Arc<aloft_broker::DirectRoutes>,
    shutdown: watch::Sender<bool>,
    engine: JoinHandle<Result<(), EngineError>>,
}

impl Running {
    /// Stops accepting connections and ends the engine after its current batch.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let _ = self.shutdown.send(true);
        self.engine.abort();
        match self.engine.await {
            Ok(r) => Ok(r?),
            Err(e) if e.is_cancelled() => Ok(()),
            Err(_) => Err(ServeError::EngineTask),
        }
    }

    /// Waits until the engine stops by itself (it only does on a fatal error).
    pub async fn wait(&mut self) -> Result<(), ServeError> {
        match (&mut self.engine).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ServeError::EngineTask),
        }
    }
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
    let store = Store::open(&cfg.data_dir.join(layout::STORE_DIR), store_key)?;
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
    // No root, no orchestrator: every upload is verified against it (fail closed).
    let trust_dir = cfg.data_dir.join(layout::TRUST_DIR);
    let trust = crate::trust::TrustState::load(&trust_dir)?;
    info!(version = trust.trusted.version(), "root of trust loaded");

    let broker_cfg = BrokerConfig::from(&cfg.file.broker);
    let broker = tokio::task::spawn_blocking(move || EmbeddedBroker::start(broker_cfg))
        .await
        .map_err(|_| ServeError::EngineTask)??;

    let (tx, rx) = mpsc::channel(8192);
    let ctx = Arc::new(
        FrontContext::new(Arc::new(tls), broker.backend(), cfg.file.front.clone())?
            .with_session_hook(device_seen_hook(tx.clone()))
            .with_reloadable_verifier(verifier),
    );
    let metrics = Metrics::new(Some(ctx.stats.clone()), Some(ctx.direct.clone()));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

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
    let metrics_addr = match cfg.file.metrics_listen {
        Some(addr) => {
            let l = bind(addr).await?;
            let a = l.local_addr().ok();
            tokio::spawn(metrics::serve(l, metrics.clone()));
            a
        }
        None => None,
    };

    let (username, password) = broker.credentials_for(ORCHESTRATOR_CLIENT_ID);
    let link_cfg = LinkConfig {
        host: broker.addr().ip().to_string(),
        port: broker.addr().port(),
        client_id: ORCHESTRATOR_CLIENT_ID.into(),
        username,
        password,
        max_packet_bytes: 2 * 1024 * 1024,
    };
    // Started before the link: the CA key is unsealed on the signer's thread while the rest
    // comes up, never on the engine's.
    let signer = crate::signer::Signer::start(pki.clone(), Some(cfg.unlock.clone()), tx.clone())
        .map_err(ServeError::Signer)?;
    let m = metrics.clone();
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
    let (publisher, mut ready) =
        mqtt::connect(&link_cfg, tx, move |reason| m.rejected("topic", reason));
    let publisher = publisher.with_device_road(ctx.direct.clone());
    let up = tokio::time::timeout(std::time::Duration::from_secs(10), ready.wait_for(|r| *r)).await;
    if !matches!(up, Ok(Ok(_))) {
        return Err(ServeError::LinkDown);
    }
    drop(up);
    let link_metrics = metrics.clone();
    tokio::spawn(async move {
        loop {
            link_metrics.broker_link(*ready.borrow_and_update());
            if ready.changed().await.is_err() {
                break;
            }
        }
    });
    let engine = Engine::new(
        store,
        EngineConfig {
            trust,
            trust_dir: Some(trust_dir),
            ca_pem,
            direct: Some(ctx.direct.clone()),
            front: Some(ctx.clone()),
            crl,
            crl_path: Some(crl_path),
            signer: Some(signer),
        },
        metrics.clone(),
    );
    let engine = tokio::spawn(engine.run(rx, publisher));
    info!(%device_addr, ?metrics_addr, "orchestrator listening");
    Ok(Running {
        device_addr,
        metrics_addr,
        insecure_addr,
        metrics,
        backend: broker.backend(),
        devices: ctx.direct.clone(),
        shutdown: shutdown_tx,
        engine,
    })
    // `broker` is dropped here: rumqttd runs on its own threads for the life of the process.
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
