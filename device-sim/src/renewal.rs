//! Certificate renewal on the device (PROTOCOL.md §5.9): when its certificate nears expiry, or
//! when told to, the device sends the orchestrator a CSR for the keys it already holds (its P-256
//! TLS key and its X25519 key stay, so jobs wrapped to its current key still open), checks the
//! certificate that comes back, saves it atomically, and reconnects with it. The update record
//! (floor, slots, campaign, outbox) is never touched: renewal lives beside the update agent, not
//! in it.
//!
//! A response is believed only if it answers a request this device sent, chains to the fleet
//! CA, names this device, carries this device's X25519 key and certifies this device's TLS key.
//! Anything else is logged and ignored (fail closed: the old certificate stays).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use aloft_proto::messages::{self, RenewalError, RenewalRequest, RenewalResponse};
use aloft_proto::DeviceId;
use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::identity::DeviceIdentity;
use crate::transport::DeviceTls;

/// When a device asks for a new certificate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewalConfig {
    /// Renew once the certificate expires within this many seconds...
    pub before_expiry_secs: u64,
    /// ...or within this fraction of its lifetime, whichever is sooner: a short-lived
    /// certificate is not renewed the moment it is issued.
    pub lifetime_fraction: f64,
    /// How long to wait for an answer (or after a refusal) before asking again.
    pub retry_ms: u64,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        // The orchestrator's window (`aloft_certs::renewal`): asking earlier is refused
        // `not_due` unless an operator allowed it.
        RenewalConfig {
            before_expiry_secs: aloft_certs::renewal::RENEWAL_WINDOW_SECS.unsigned_abs(),
            lifetime_fraction: aloft_certs::renewal::RENEWAL_WINDOW_FRACTION,
            retry_ms: 5 * 60 * 1000,
        }
    }
}

impl RenewalConfig {
    /// Is a certificate valid from `not_before` to `not_after` (Unix seconds) due for renewal
    /// at `now` (Unix seconds)?
    pub fn due(&self, now: i64, not_before: i64, not_after: i64) -> bool {
        let window = aloft_certs::renewal::window_secs(
            not_before,
            not_after,
            i64::try_from(self.before_expiry_secs).unwrap_or(i64::MAX),
            self.lifetime_fraction,
        );
        not_after.saturating_sub(now) <= window
    }
}

/// What a response on the `cert` topic meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new certificate is saved and in use for the next connection: reconnect now.
    Renewed,
    /// The orchestrator said no; the old certificate stays.
    Refused(RenewalError),
    /// Not believed or not asked for; nothing changed.
    Ignored(String),
}

/// The certificate a device connects with now.
struct Current {
    cert_pem: String,
    not_before: i64,
    not_after: i64,
    serial_hex: String,
    tls: Arc<rustls::ClientConfig>,
}

struct State {
    current: Current,
    /// Renew at the next chance, due or not ([`Renewer::force`]).
    forced: bool,
    /// When the outstanding request was sent (Unix ms), if one is.
    asked_at_ms: Option<u64>,
    renewed: u32,
    last_refusal: Option<RenewalError>,
}

/// One device's certificate and its renewal, shared between its transport (which connects with
/// [`Renewer::tls`] and feeds it) and whoever watches it (the simulator).
pub struct Renewer {
    id: DeviceId,
    /// The fleet's TLS settings (CA, provider, server verifier), shared with its other devices.
    fleet_tls: DeviceTls,
    key_pem: String,
    x25519_public: [u8; 32],
    /// Where the certificate is kept; `None` keeps it in memory only (tests).
    cert_path: Option<PathBuf>,
    cfg: RenewalConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for Renewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn current(fleet_tls: &DeviceTls, cert_pem: &str, key_pem: &str) -> Result<Current> {
    let der = aloft_certs::tls::parse_cert(cert_pem)?;
    let identity = aloft_certs::parse_identity(&der)?;
    let tls = fleet_tls.client(cert_pem, key_pem)?;
    Ok(Current {
        cert_pem: cert_pem.to_owned(),
        not_before: identity.not_before,
        not_after: identity.not_after,
        serial_hex: identity.serial_hex(),
        tls: Arc::new(tls),
    })
}

impl Renewer {
    pub fn new(
        identity: &DeviceIdentity,
        ca_pem: &str,
        cert_path: Option<PathBuf>,
        cfg: RenewalConfig,
    ) -> Result<Arc<Renewer>> {
        let fleet_tls = DeviceTls::new(ca_pem).context("the fleet ca")?;
        Renewer::with_fleet_tls(identity, &fleet_tls, cert_path, cfg)
    }

    /// [`Renewer::new`] with TLS settings shared by a fleet (see [`DeviceTls`]).
    pub fn with_fleet_tls(
        identity: &DeviceIdentity,
        fleet_tls: &DeviceTls,
        cert_path: Option<PathBuf>,
        cfg: RenewalConfig,
    ) -> Result<Arc<Renewer>> {
        let current = current(fleet_tls, &identity.cert_pem, &identity.key_pem)
            .with_context(|| format!("certificate of {}", identity.id))?;
        Ok(Arc::new(Renewer {
            id: identity.id.clone(),
            fleet_tls: fleet_tls.clone(),
            key_pem: identity.key_pem.clone(),
            x25519_public: identity.encryption_key.public_bytes()?,
            cert_path,
            cfg,
            state: Mutex::new(State {
                current,
                forced: false,
                asked_at_ms: None,
                renewed: 0,
                last_refusal: None,
            }),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update below replaces whole fields; a panic elsewhere cannot leave a half one.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The TLS settings for the next connection (the newest certificate).
    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        self.state().current.tls.clone()
    }

    pub fn cert_pem(&self) -> String {
        self.state().current.cert_pem.clone()
    }

    /// The current certificate's serial number, hex.
    pub fn serial_hex(&self) -> String {
        self.state().current.serial_hex.clone()
    }

    /// Certificates received and installed since start.
    pub fn renewed(&self) -> u32 {
        self.state().renewed
    }

    pub fn last_refusal(&self) -> Option<RenewalError> {
        self.state().last_refusal
    }

    /// Renew at the next chance, whether or not the certificate is due.
    pub fn force(&self) {
        let mut s = self.state();
        s.forced = true;
        s.asked_at_ms = None;
    }

    /// While connected, on every tick: the request to publish on the `csr` topic now, if the
    /// certificate is due (or renewal was forced) and no request is waiting for its answer.
    pub fn poll(&self, now_ms: u64) -> Option<Vec<u8>> {
        let mut s = self.state();
        if s.asked_at_ms
            .is_some_and(|at| now_ms.saturating_sub(at) < self.cfg.retry_ms)
        {
            return None;
        }
        let now = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        if !s.forced && !self.cfg.due(now, s.current.not_before, s.current.not_after) {
            return None;
        }
        let csr =
            match aloft_certs::device_renewal_csr(&self.id, &self.x25519_public, &self.key_pem) {
                Ok(c) => c,
                Err(e) => {
                    warn!(device = %self.id, error = %e, "cannot make a renewal csr");
                    s.asked_at_ms = Some(now_ms);
                    return None;
                }
            };
        s.asked_at_ms = Some(now_ms);
        info!(device = %self.id, "asking for a new certificate");
        Some(messages::encode(&RenewalRequest {
            v: messages::PROTOCOL_VERSION,
            csr: csr.csr_pem,
        }))
    }

    /// A publish on the device's `cert` topic.
    pub fn on_response(&self, payload: &[u8]) -> Outcome {
        let response: RenewalResponse = match messages::decode(payload) {
            Ok(r) => r,
            Err(e) => return self.ignored(format!("undecodable renewal response: {e}")),
        };
        if self.state().asked_at_ms.is_none() {
            return self.ignored("a renewal response nobody asked for".into());
        }
        if let Some(error) = response.error {
            warn!(device = %self.id, %error, detail = response.detail.as_deref().unwrap_or(""), "certificate renewal refused");
            let mut s = self.state();
            s.last_refusal = Some(error);
            // Asking again at once would be refused again: wait for the retry interval, and
            // let a forced renewal go (the certificate's own schedule still applies).
            s.forced = false;
            return Outcome::Refused(error);
        }
        let Some(cert_pem) = response.cert else {
            return self.ignored("renewal response without a certificate".into());
        };
        match self.install(&cert_pem) {
            Ok(serial) => {
                info!(device = %self.id, serial = %serial, "certificate renewed; reconnecting with it");
                Outcome::Renewed
            }
            Err(e) => self.ignored(format!("renewed certificate refused: {e:#}")),
        }
    }

    fn ignored(&self, why: String) -> Outcome {
        warn!(device = %self.id, %why, "renewal response ignored");
        Outcome::Ignored(why)
    }

    /// Checks `cert_pem` is ours in every respect, saves it, and makes it current.
    fn install(&self, cert_pem: &str) -> Result<String> {
        let identity =
            aloft_certs::tls::verify_client_cert(self.fleet_tls.ca_pem(), cert_pem, Vec::new())?;
        if identity.device_id().as_ref() != Some(&self.id) {
            bail!("it names {} rather than {}", identity.id, self.id);
        }
        if identity.x25519 != Some(self.x25519_public) {
            bail!("it carries another x25519 key");
        }
        if !aloft_certs::cert_public_key_matches(cert_pem, &self.key_pem)? {
            bail!("it certifies another tls key");
        }
        let next = current(&self.fleet_tls, cert_pem, &self.key_pem)?;
        // Saved before it is used: a device that restarts must come back with the certificate
        // the orchestrator may already have seen.
        if let Some(path) = &self.cert_path {
            aloft_certs::revocation::write_file_atomically(path, cert_pem.as_bytes(), 0o644)
                .with_context(|| format!("saving {}", path.display()))?;
        }
        let serial = next.serial_hex.clone();
        let mut s = self.state();
        s.current = next;
        s.forced = false;
        s.asked_at_ms = None;
        s.renewed += 1;
        s.last_refusal = None;
        Ok(serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_certs::{FleetCa, Validity};
    use aloft_proto::crypto::DeviceEncryptionKey;

    fn device(ca: &FleetCa, id: &str, days: u32) -> DeviceIdentity {
        let id = DeviceId::new(id).unwrap();
        let enc = DeviceEncryptionKey::generate().unwrap();
        let csr = aloft_certs::device_csr(&id, &enc.public_bytes().unwrap()).unwrap();
        DeviceIdentity {
            cert_pem: ca.issue_device(&csr.csr_pem, Validity::days(days)).unwrap(),
            key_pem: csr.key_pem,
            id,
            encryption_key: enc,
        }
    }

    fn response(cert: Option<String>, error: Option<RenewalError>) -> Vec<u8> {
        messages::encode(&RenewalResponse {
            v: 1,
            cert,
            error,
            detail: None,
        })
    }

    #[test]
    fn a_certificate_is_due_within_the_window_or_the_fraction_whichever_is_sooner() {
        let cfg = RenewalConfig::default();
        let day = 86_400;
        // 825 days: due in its last 30 days.
        assert!(!cfg.due(0, 0, 825 * day));
        assert!(!cfg.due(794 * day, 0, 825 * day));
        assert!(cfg.due(796 * day, 0, 825 * day));
        // 30 days: due in its last 10, not at once.
        assert!(!cfg.due(day, 0, 30 * day));
        assert!(cfg.due(21 * day, 0, 30 * day));
        // Expired: due.
        assert!(cfg.due(31 * day, 0, 30 * day));
    }

    #[test]
    fn a_renewal_keeps_both_keys_and_installs_only_a_certificate_that_is_ours() {
        let ca = FleetCa::create("t", 30).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev-1.crt");
        let me = device(&ca, "dev-1", 825);
        let r = Renewer::new(
            &me,
            ca.cert_pem(),
            Some(path.clone()),
            RenewalConfig::default(),
        )
        .unwrap();
        // Not due, not asked: nothing to send, and an unsolicited answer changes nothing.
        assert_eq!(r.poll(1_000), None);
        let stranger = device(&ca, "dev-1", 825).cert_pem;
        assert!(matches!(
            r.on_response(&response(Some(stranger.clone()), None)),
            Outcome::Ignored(_)
        ));

        r.force();
        let req: RenewalRequest = messages::decode(&r.poll(1_000).unwrap()).unwrap();
        // Asked once: no second request until the retry interval passes.
        assert_eq!(r.poll(2_000), None);
        // A certificate for the same id but another key is refused: the old one stays.
        assert!(matches!(
            r.on_response(&response(Some(stranger), None)),
            Outcome::Ignored(_)
        ));
        let id = DeviceId::new("dev-1").unwrap();
        let before = r.serial_hex();
        let x25519 = me.encryption_key.public_bytes().unwrap();
        let cert = ca
            .renew_device(&req.csr, &id, &x25519, Validity::days(825))
            .unwrap();
        assert_eq!(
            r.on_response(&response(Some(cert.clone()), None)),
            Outcome::Renewed
        );
        assert_ne!(r.serial_hex(), before);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), cert);
        assert_eq!(r.renewed(), 1);
        assert_eq!(r.poll(10_000_000), None);
    }

    #[test]
    fn a_refusal_keeps_the_old_certificate_and_waits_before_asking_again() {
        let ca = FleetCa::create("t", 30).unwrap();
        let r = Renewer::new(
            &device(&ca, "dev-1", 825),
            ca.cert_pem(),
            None,
            RenewalConfig::default(),
        )
        .unwrap();
        let before = r.cert_pem();
        r.force();
        assert!(r.poll(0).is_some());
        assert_eq!(
            r.on_response(&response(None, Some(RenewalError::CaOffline))),
            Outcome::Refused(RenewalError::CaOffline)
        );
        assert_eq!(r.cert_pem(), before);
        assert_eq!(r.last_refusal(), Some(RenewalError::CaOffline));
        assert!(matches!(r.on_response(b"{garbage"), Outcome::Ignored(_)));
        // Not forced any more and not due: nothing more is asked.
        assert_eq!(r.poll(RenewalConfig::default().retry_ms + 1), None);
    }
}
