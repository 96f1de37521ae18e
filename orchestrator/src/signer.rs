//! The renewal signer: a thread of its own that holds the fleet CA, unsealed once (at start, or
//! when `ca.key` comes back after being moved offline), and signs the renewals the engine has
//! already checked. Neither the Argon2id derivation that unseals the key nor the signing ever
//! runs on the engine task; each answer comes back to the engine as an [`Inbound::Signed`] event.
//!
//! Under the CA directory's lock (`aloft_certs::ledger`), a renewal is refused if the
//! certificate it came through is revoked in `revocations.json`, and an issued certificate is
//! appended to the issuance ledger before the engine sees it: `aloft pki revoke` then reaches it.

use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use aloft_certs::ledger::{self, CaDirLock, Issued};
use aloft_certs::revocation::RevocationState;
use aloft_certs::{FleetCa, PkiError, Validity, CA_KEY_FILE};
use aloft_proto::messages::RenewalError;
use aloft_proto::DeviceId;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::inbound::Inbound;
pub use crate::inbound::{SignOutcome, Signed};

/// Renewals waiting for the signer at most; the engine refuses more (`rate_limited`). Each
/// device has at most one in flight, so this bounds how many devices renew at once.
pub const QUEUE: usize = 256;

/// After the CA key failed to open, how long renewals answer `ca_offline` before the signer
/// tries again: a key that cannot be opened must not cost an Argon2id derivation per request.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// A renewal the engine checked and hands to the signer.
#[derive(Debug)]
pub struct SignRequest {
    pub device: DeviceId,
    pub csr: String,
    /// The X25519 key of the device's current certificate: the new one must carry it.
    pub x25519: [u8; 32],
    /// Serial of the certificate the request came through (big-endian).
    pub session_serial: Vec<u8>,
    pub lifetime_days: u32,
}

/// The engine's handle on the signer thread; dropping it ends the thread, which drops (and so
/// wipes) the CA key.
#[derive(Debug, Clone)]
pub struct Signer {
    tx: std_mpsc::SyncSender<SignRequest>,
    pki_dir: PathBuf,
}

impl Signer {
    /// Starts the signer for the CA in `pki_dir`, opening `ca.key` with `unlock` (none: an
    /// unsealed PEM key, as tests write it). Answers go to `results`.
    pub fn start(
        pki_dir: PathBuf,
        unlock: Option<aloft_vault::Unlock>,
        results: mpsc::Sender<Inbound>,
    ) -> std::io::Result<Signer> {
        let (tx, rx) = std_mpsc::sync_channel(QUEUE);
        let dir = pki_dir.clone();
        // Weak: the signer must not keep the engine's queue open once everything else is gone.
        let results = results.downgrade();
        std::thread::Builder::new()
            .name("aloft-ca-signer".into())
            .spawn(move || run(dir, unlock, rx, results))?;
        Ok(Signer { tx, pki_dir })
    }

    /// Is `ca.key` on this orchestrator? (The operator may move it offline at any time.)
    pub fn key_present(&self) -> bool {
        self.pki_dir.join(CA_KEY_FILE).exists()
    }

    /// Queues a request; gives it back if the queue is full or the signer is gone.
    pub fn submit(&self, req: SignRequest) -> Result<(), SignRequest> {
        self.tx.try_send(req).map_err(|e| match e {
            std_mpsc::TrySendError::Full(r) | std_mpsc::TrySendError::Disconnected(r) => r,
        })
    }
}

/// The CA as the signer holds it.
struct Ca {
    dir: PathBuf,
    unlock: Option<aloft_vault::Unlock>,
    loaded: Option<FleetCa>,
    failed_at: Option<Instant>,
}

impl Ca {
    fn load(&mut self) -> Result<&FleetCa, (RenewalError, String)> {
        let offline = || {
            (
                RenewalError::CaOffline,
                "renewal needs the online ca: the ca key is not on the orchestrator".to_owned(),
            )
        };
        if !self.dir.join(CA_KEY_FILE).exists() {
            // Moved offline: forget the key too, not only the file.
            self.loaded = None;
            self.failed_at = None;
            return Err(offline());
        }
        if self.loaded.is_none() {
            if self
                .failed_at
                .is_some_and(|t| t.elapsed() < RETRY_AFTER_FAILURE)
            {
                return Err((
                    RenewalError::CaOffline,
                    "the ca key on the orchestrator cannot be opened".into(),
                ));
            }
            let loaded = match &self.unlock {
                Some(unlock) => crate::ops::load_ca(&self.dir, unlock),
                None => FleetCa::load(&self.dir).map_err(anyhow::Error::from),
            };
            match loaded {
                Ok(ca) => {
                    info!("fleet ca unsealed for renewals");
                    self.loaded = Some(ca);
                    self.failed_at = None;
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "the ca key cannot be opened; renewals answer ca_offline");
                    self.failed_at = Some(Instant::now());
                    return Err((
                        RenewalError::CaOffline,
                        "the ca key on the orchestrator cannot be opened".into(),
                    ));
                }
            }
        }
        self.loaded.as_ref().ok_or_else(offline)
    }
}

fn run(
    dir: PathBuf,
    unlock: Option<aloft_vault::Unlock>,
    rx: std_mpsc::Receiver<SignRequest>,
    results: mpsc::WeakSender<Inbound>,
) {
    let mut ca = Ca {
        dir,
        unlock,
        loaded: None,
        failed_at: None,
    };
    // Unsealed now, before the first renewal asks: that one then waits for no Argon2id.
    let _ = ca.load();
    while let Ok(req) = rx.recv() {
        let device = req.device.clone();
        let outcome = match sign(&mut ca, &req) {
            Ok((cert, serial)) => SignOutcome::Issued { cert, serial },
            Err((code, detail)) => SignOutcome::Refused(code, detail),
        };
        let Some(results) = results.upgrade() else {
            break;
        };
        if results
            .blocking_send(Inbound::Signed(Signed { device, outcome }))
            .is_err()
        {
            break;
        }
    }
}

fn sign(ca: &mut Ca, req: &SignRequest) -> Result<(String, String), (RenewalError, String)> {
    let dir = ca.dir.clone();
    let fleet_ca = ca.load()?;
    let internal = |what: &str, e: PkiError| {
        warn!(device = %req.device, error = %e, "{what}");
        (RenewalError::Internal, what.to_owned())
    };
    let lock =
        CaDirLock::acquire(&dir).map_err(|e| internal("locking the ca directory failed", e))?;
    let state =
        RevocationState::load(&dir).map_err(|e| internal("reading revocations.json failed", e))?;
    if state.is_revoked(&req.session_serial) {
        return Err((
            RenewalError::Revoked,
            "the session's certificate is revoked".into(),
        ));
    }
    let cert = fleet_ca
        .renew_device(
            &req.csr,
            &req.device,
            &req.x25519,
            Validity::days(req.lifetime_days),
        )
        .map_err(|e| match e {
            PkiError::CertificateMismatch(why) => (RenewalError::IdentityMismatch, why.to_owned()),
            PkiError::X25519KeyChanged => (RenewalError::X25519KeyChanged, e.to_string()),
            other => (RenewalError::InvalidCsr, other.to_string()),
        })?;
    let issued =
        Issued::of_cert(&cert).map_err(|e| internal("reading the new certificate failed", e))?;
    ledger::append(&dir, std::slice::from_ref(&issued), &lock)
        .map_err(|e| internal("recording the certificate in the issuance ledger failed", e))?;
    Ok((cert, issued.serial))
}
