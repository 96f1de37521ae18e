//! Revocation in the engine: which registered devices hold a revoked certificate, and the
//! `crl_update` admin operation (verify, never go backwards, store, enforce at the front, fail
//! the revoked members). Renewal is in `renewal`.
//!
//! Fail closed throughout: a device whose record names no readable serial while a CRL is in
//! force counts as revoked; a CRL that cannot be read or verified is an error, never "nothing is
//! revoked".

use aloft_certs::revocation::{write_file_atomically, VerifiedCrl};
use aloft_certs::PkiError;
use aloft_proto::{DeviceId, DeviceState, OperatorId, Reason};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::json;
use tracing::{info, warn};

use super::{now_ms, Engine};
use crate::admin::wire::AdminError;
use crate::store::{DeviceRecord, StoreError};

pub(super) type AdminResult = Result<Result<serde_json::Value, AdminError>, StoreError>;

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
}
