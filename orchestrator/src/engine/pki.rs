//! Device certificates in the engine: which registered devices hold a revoked certificate, the
//! `crl_update` admin operation (verify, never go backwards, store, enforce at the front, fail
//! the revoked members), and certificate renewal over MQTT.
//!
//! Fail closed throughout: a device whose record names no readable serial while a CRL is in
//! force counts as revoked; a CRL that cannot be read or verified is an error, never "nothing is
//! revoked"; a renewal that cannot be checked is refused.

use aloft_certs::revocation::{write_file_atomically, VerifiedCrl};
use aloft_certs::{FleetCa, PkiError, Validity, CA_KEY_FILE};
use aloft_proto::messages::{
    self, RenewalError, RenewalRequest, RenewalResponse, MAX_DETAIL_LEN, PROTOCOL_VERSION,
};
use aloft_proto::{topics, DeviceId, DeviceState, OperatorId, Reason};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::json;
use tracing::{info, warn};

use super::{now_ms, Engine};
use crate::admin::wire::AdminError;
use crate::store::{DeviceRecord, StoreError};

type AdminResult = Result<Result<serde_json::Value, AdminError>, StoreError>;

/// Lifetime of a renewed certificate when the old one's is not on record (as `aloft pki
/// issue-device`).
const DEFAULT_DEVICE_CERT_DAYS: u32 = 825;
/// Longest lifetime a renewal carries over (the CA's own default lifetime).
const MAX_DEVICE_CERT_DAYS: u32 = 3650;

fn refuse(code: &str, message: impl Into<String>) -> AdminResult {
    Ok(Err(AdminError::new(code, message)))
}

/// The CRL as PEM, re-encoded from the verified DER so nothing else from the request reaches
/// the file.
fn crl_pem(der: &[u8]) -> String {
    let body = B64.encode(der);
    let mut pem = String::from("-----BEGIN X509 CRL-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END X509 CRL-----\n");
    pem
}

impl Engine {
    /// Does the CRL in force revoke the certificate `record` names? A record whose serial cannot
    /// be read counts as revoked while a CRL is in force. A record from before 1.1 (no serial)
    /// does not: it learns its serial at the device's next connection, which the front checks.
    pub(super) fn is_revoked(&self, record: &DeviceRecord) -> bool {
        let Some(crl) = &self.crl else {
            return false;
        };
        if record.cert_serial.is_empty() {
            return false;
        }
        match hex::decode(&record.cert_serial) {
            Ok(serial) => crl.is_revoked(&serial),
            Err(_) => true,
        }
    }

    /// Brings `record.revoked` and the revoked set in line with the CRL in force.
    pub(super) fn set_revoked(&mut self, record: &mut DeviceRecord) {
        record.revoked = self.is_revoked(record);
        if record.revoked {
            self.revoked_devices.insert(record.id.clone());
        } else {
            self.revoked_devices.remove(&record.id);
        }
    }

    /// Re-judges every registered device against the CRL in force; returns the devices revoked
    /// now that were not before.
    pub(super) fn refresh_revoked(&mut self) -> Result<Vec<DeviceId>, StoreError> {
        let mut newly = Vec::new();
        for mut record in self.store.devices()? {
            let was = record.revoked;
            self.set_revoked(&mut record);
            if record.revoked != was {
                if record.revoked {
                    newly.push(record.id.clone());
                }
                self.store.put_device(&record)?;
                self.dirty = true;
            }
        }
        Ok(newly)
    }

    /// Fails every unfinished member that is a revoked device, in every campaign still running,
    /// and withdraws its job. Returns how many members it failed.
    fn fail_revoked_members(&mut self) -> Result<usize, StoreError> {
        let now = now_ms();
        let mut doomed = Vec::new();
        for (id, live) in &self.campaigns {
            if live.record.status.is_final() {
                continue;
            }
            for (device, p) in &live.progress {
                if !p.state.is_terminal() && self.revoked_devices.contains(device) {
                    doomed.push((id.clone(), device.clone()));
                }
            }
        }
        for (id, device) in &doomed {
            self.move_member(id, device, DeviceState::Failed, Some(Reason::Revoked), now)?;
            self.withdraw_job(device, id, Reason::Revoked);
            self.touched.insert(id.clone());
        }
        Ok(doomed.len())
    }

    /// The CRL `device_register` checks certificates against: the one in force, or the one in
    /// `crl.pem` if that file is newer (someone replaced it by hand). A `crl.pem` that exists
    /// but cannot be read or verified is an error: registration then refuses everything.
    pub(super) fn crl_for_registration(&self) -> Result<Option<VerifiedCrl>, String> {
        let on_disk = match &self.cfg.crl_path {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(pem) => Some(
                    VerifiedCrl::parse(&pem, &self.cfg.ca_pem)
                        .map_err(|e| format!("{}: {e}", path.display()))?,
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(format!("{}: {e}", path.display())),
            },
            None => None,
        };
        Ok(match (self.crl.clone(), on_disk) {
            (Some(a), Some(b)) => Some(if b.number > a.number { b } else { a }),
            (a, b) => a.or(b),
        })
    }

    /// `crl_update`: verifies `pem` against the fleet CA, refuses a CRL numbered below the one in
    /// force (or equal to it with other content), stores it in place of `crl.pem`, enforces it
    /// at the front (new handshakes, and live sessions of revoked certificates are ended), then
    /// marks the revoked devices and fails their unfinished campaign memberships.
    pub(super) fn crl_update(&mut self, operator: &OperatorId, pem: &str) -> AdminResult {
        let crl = match VerifiedCrl::parse(pem, &self.cfg.ca_pem) {
            Ok(c) => c,
            Err(e) => {
                self.metrics.rejected("crl", "invalid");
                return refuse("invalid_crl", e.to_string());
            }
        };
        if let Some(current) = &self.crl {
            if crl.number < current.number
                || (crl.number == current.number && crl.der != current.der)
            {
                self.metrics.rejected("crl", "stale");
                return refuse(
                    "stale_crl",
                    format!(
                        "crl number {} is not newer than the crl in force ({}); never go backwards",
                        crl.number, current.number
                    ),
                );
            }
            if crl.der == current.der {
                return Ok(Ok(json!({
                    "crl_number": crl.number,
                    "revoked_serials": crl.revoked.len(),
                    "unchanged": true,
                })));
            }
        }
        let Some(front) = self.cfg.front.clone() else {
            return refuse(
                "crl_not_applied",
                "this orchestrator has no front whose crl can be replaced",
            );
        };
        // Stored first, so a restart enforces what the front is about to enforce.
        let previous = self.crl.as_ref().map(|c| crl_pem(c.der.as_ref()));
        if let Some(path) = &self.cfg.crl_path {
            if let Err(e) = write_file_atomically(path, crl_pem(crl.der.as_ref()).as_bytes(), 0o600)
            {
                warn!(error = %e, "storing the new crl failed; the old one stays in force");
                return refuse("crl_not_applied", e.to_string());
            }
        }
        let dropped = match front.apply_crl(&crl) {
            Ok(d) => d,
            Err(e) => {
                // Put the file back as it was, so disk and front agree on the old CRL.
                if let Some(path) = &self.cfg.crl_path {
                    let restored = match &previous {
                        Some(old) => write_file_atomically(path, old.as_bytes(), 0o600),
                        None => std::fs::remove_file(path).map_err(|source| PkiError::Write {
                            path: path.clone(),
                            source,
                        }),
                    };
                    if let Err(re) = restored {
                        warn!(error = %re, "restoring the previous crl.pem failed");
                    }
                }
                return refuse("crl_not_applied", e.to_string());
            }
        };
        let number = crl.number;
        let serials = crl.revoked.len();
        self.crl = Some(crl);
        let newly = self.refresh_revoked()?;
        let failed = self.fail_revoked_members()?;
        self.dirty = true;
        let sessions: Vec<String> = dropped.iter().map(ToString::to_string).collect();
        info!(%operator, crl_number = number, revoked_serials = serials, devices_revoked = newly.len(), sessions_dropped = sessions.len(), members_failed = failed, "crl updated");
        Ok(Ok(json!({
            "crl_number": number,
            "revoked_serials": serials,
            "devices_revoked": newly,
            "sessions_dropped": sessions,
            "members_failed": failed,
        })))
    }

    /// A device asks for a new certificate. Answered on its `cert` topic either way.
    pub(super) fn on_csr(&mut self, device: DeviceId, payload: &[u8]) -> Result<(), StoreError> {
        let outcome = self.renew(&device, payload)?;
        let response = match outcome {
            Ok(cert) => {
                self.metrics.renewal("issued");
                RenewalResponse {
                    v: PROTOCOL_VERSION,
                    cert: Some(cert),
                    error: None,
                    detail: None,
                }
            }
            Err((error, detail)) => {
                self.metrics.renewal(error.as_str());
                self.metrics.rejected("csr", error.as_str());
                warn!(%device, %error, %detail, "certificate renewal refused");
                let mut detail = detail;
                if detail.len() > MAX_DETAIL_LEN {
                    let mut cut = MAX_DETAIL_LEN;
                    while !detail.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    detail.truncate(cut);
                }
                RenewalResponse {
                    v: PROTOCOL_VERSION,
                    cert: None,
                    error: Some(error),
                    detail: Some(detail),
                }
            }
        };
        self.send(topics::cert(&device), messages::encode(&response), false);
        Ok(())
    }

    /// Checks a renewal request and issues the certificate, or says why not.
    fn renew(
        &mut self,
        device: &DeviceId,
        payload: &[u8],
    ) -> Result<Result<String, (RenewalError, String)>, StoreError> {
        let req: RenewalRequest = match messages::decode(payload) {
            Ok(r) => r,
            Err(e) => return Ok(Err((RenewalError::InvalidCsr, e.to_string()))),
        };
        let Some(record) = self.store.device(device)? else {
            return Ok(Err((
                RenewalError::UnknownDevice,
                format!("device {device} is not registered"),
            )));
        };
        if record.revoked || self.is_revoked(&record) {
            return Ok(Err((
                RenewalError::Revoked,
                "the current certificate is revoked".into(),
            )));
        }
        // The certificate of the session the request came through must itself be current: the
        // record could lag behind a reconnect, the live session cannot.
        if let Some(front) = &self.cfg.front {
            let peer = aloft_broker::Peer::Device(device.clone());
            match front.registry.cert_serial(&peer) {
                Some(serial) => {
                    if self.crl.as_ref().is_some_and(|c| c.is_revoked(&serial)) {
                        return Ok(Err((
                            RenewalError::Revoked,
                            "the session's certificate is revoked".into(),
                        )));
                    }
                }
                None => {
                    return Ok(Err((
                        RenewalError::UnknownDevice,
                        "no live certificate-authenticated session for this device".into(),
                    )));
                }
            }
        }
        match aloft_certs::vet_device_csr(&req.csr) {
            Ok(named) if &named == device => {}
            Ok(named) => {
                return Ok(Err((
                    RenewalError::IdentityMismatch,
                    format!("the csr names {named}, the request came from {device}"),
                )));
            }
            Err(e) => return Ok(Err((RenewalError::InvalidCsr, e.to_string()))),
        }
        let Some(pki) = &self.cfg.pki_dir else {
            return Ok(Err((
                RenewalError::CaOffline,
                "renewal needs the online ca; this orchestrator has none".into(),
            )));
        };
        if !pki.join(CA_KEY_FILE).exists() {
            return Ok(Err((
                RenewalError::CaOffline,
                "renewal needs the online ca: the ca key is not on the orchestrator".into(),
            )));
        }
        // Read per request: renewals are rare, and an operator who moves the key offline (or
        // back) is obeyed at once. The key is sealed; with a passphrase unlock this costs one
        // Argon2id derivation (~0.2 s) of the engine's time per renewal.
        let loaded = match &self.cfg.unlock {
            Some(unlock) => crate::ops::load_ca(pki, unlock),
            None => FleetCa::load(pki).map_err(anyhow::Error::from),
        };
        let ca = match loaded {
            Ok(ca) => ca,
            Err(e) => {
                warn!(error = %e, "loading the ca for a renewal failed");
                return Ok(Err((
                    RenewalError::Internal,
                    "the ca could not be loaded".into(),
                )));
            }
        };
        let lifetime_days =
            if record.cert_not_before > 0 && record.cert_not_after > record.cert_not_before {
                let secs = record.cert_not_after - record.cert_not_before;
                u32::try_from((secs + 86_399) / 86_400).unwrap_or(MAX_DEVICE_CERT_DAYS)
            } else {
                DEFAULT_DEVICE_CERT_DAYS
            }
            .clamp(1, MAX_DEVICE_CERT_DAYS);
        match ca.renew_device(&req.csr, device, Validity::days(lifetime_days)) {
            Ok(cert) => {
                info!(%device, days = lifetime_days, "device certificate renewed");
                Ok(Ok(cert))
            }
            Err(PkiError::CertificateMismatch(why)) => {
                Ok(Err((RenewalError::IdentityMismatch, why.to_owned())))
            }
            Err(e) => Ok(Err((RenewalError::InvalidCsr, e.to_string()))),
        }
    }
}
