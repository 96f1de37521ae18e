//! Revocation in the core: which registered devices hold a revoked certificate, and the
//! `crl_update` admin operation (verify, never go backwards, store, enforce at the front, fail
//! the revoked members). Renewal is in `renewal`.
//!
//! Fail closed throughout: a device whose record names no readable serial while a CRL is in
//! force counts as revoked; a CRL that cannot be read or verified is an error, never "nothing is
//! revoked".

use aloft_certs::revocation::VerifiedCrl;
use aloft_proto::{DeviceId, DeviceState, OperatorId, Reason};
use serde_json::json;
use tracing::info;

use super::{refuse, AdminResult, Core, Out, Pending};
use crate::store::DeviceRecord;

impl Core {
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
    pub(super) fn refresh_revoked(&mut self) -> Vec<DeviceId> {
        let mut newly = Vec::new();
        let records: Vec<DeviceRecord> = self.devices.values().cloned().collect();
        for mut record in records {
            let was = record.revoked;
            self.set_revoked(&mut record);
            if record.revoked != was {
                if record.revoked {
                    newly.push(record.id.clone());
                }
                self.put_device(record, true);
            }
        }
        newly
    }

    /// Fails every unfinished member that is a revoked device, in every campaign still running,
    /// and withdraws its job. Returns how many members it failed.
    fn fail_revoked_members(&mut self) -> usize {
        let now = self.now;
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
            self.move_member(id, device, DeviceState::Failed, Some(Reason::Revoked), now);
            self.withdraw_job(device, id, Reason::Revoked);
            self.touched.insert(id.clone());
        }
        doomed.len()
    }

    /// The CRL `device_register` checks certificates against: the one in force, or the one in
    /// `crl.pem` if that file is newer (someone replaced it by hand). A `crl.pem` that exists
    /// but cannot be read or verified is an error: registration then refuses everything.
    pub(super) fn crl_for_registration(
        &self,
        on_disk: Result<Option<VerifiedCrl>, String>,
    ) -> Result<Option<VerifiedCrl>, String> {
        let on_disk = on_disk?;
        Ok(match (self.crl.clone(), on_disk) {
            (Some(a), Some(b)) => Some(if b.number > a.number { b } else { a }),
            (a, b) => a.or(b),
        })
    }

    /// `crl_update`: verifies `pem` against the fleet CA, refuses a CRL numbered below the one in
    /// force (or equal to it with other content), stores it in place of `crl.pem`, enforces it
    /// at the front (new handshakes, and live sessions of revoked certificates are ended), then
    /// marks the revoked devices and fails their unfinished campaign memberships.
    pub(super) fn crl_update(
        &mut self,
        operator: &OperatorId,
        pem: &str,
        pending: &Pending,
    ) -> Option<AdminResult> {
        let crl = match VerifiedCrl::parse(pem, &self.ca_pem) {
            Ok(c) => c,
            Err(e) => {
                self.metrics.rejected("crl", "invalid");
                return Some(refuse("invalid_crl", e.to_string()));
            }
        };
        if let Some(current) = &self.crl {
            if crl.number < current.number
                || (crl.number == current.number && crl.der != current.der)
            {
                self.metrics.rejected("crl", "stale");
                return Some(refuse(
                    "stale_crl",
                    format!(
                        "crl number {} is not newer than the crl in force ({}); never go backwards",
                        crl.number, current.number
                    ),
                ));
            }
            if crl.der == current.der {
                return Some(Ok(json!({
                    "crl_number": crl.number,
                    "revoked_serials": crl.revoked.len(),
                    "unchanged": true,
                })));
            }
        }
        info!(%operator, crl_number = crl.number, "crl verified; storing it and applying it at the front");
        self.fx.now.push(Out::ApplyCrl {
            crl: Box::new(crl),
            previous: self.crl.clone().map(Box::new),
            pending: pending.clone(),
        });
        None
    }

    /// The shell stored the CRL and the front enforces it (or neither happened): marks the
    /// revoked devices and fails their unfinished campaign memberships.
    pub(super) fn crl_applied(
        &mut self,
        pending: &Pending,
        crl: VerifiedCrl,
        result: Result<Vec<String>, String>,
    ) -> AdminResult {
        let operator = &pending.operator;
        let dropped = match result {
            Ok(d) => d,
            Err(e) => return refuse("crl_not_applied", e),
        };
        let number = crl.number;
        let serials = crl.revoked.len();
        self.crl = Some(crl);
        let newly = self.refresh_revoked();
        let failed = self.fail_revoked_members();
        self.fx.flush = true;
        let sessions = dropped;
        info!(%operator, crl_number = number, revoked_serials = serials, devices_revoked = newly.len(), sessions_dropped = sessions.len(), members_failed = failed, "crl updated");
        Ok(json!({
            "crl_number": number,
            "revoked_serials": serials,
            "devices_revoked": newly,
            "sessions_dropped": sessions,
            "members_failed": failed,
        }))
    }
}
