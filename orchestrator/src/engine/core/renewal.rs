//! Certificate renewal in the core (PROTOCOL.md §5.9): the checks a request passes before the
//! signer sees it, the per-device limits ([`RenewalGate`], pure), the operator's leave for an
//! early renewal (`device_renew_allow`), and the answer once the signer is done.
//!
//! Renewal may change a device's TLS key, never its X25519 key: content keys are wrapped to the
//! X25519 key, so whoever holds only the TLS key (a thief) must not be able to swap it for one
//! of their own. A new X25519 key needs re-enrollment through the operator.
//!
//! The cheap checks come first and a device's hourly slot is spent before the CSR is parsed, so
//! a flood of requests from one device costs a JSON decode and a map lookup each, and at most
//! one certificate (and one audit entry) per hour.

use std::collections::{HashMap, HashSet, VecDeque};

use aloft_certs::CA_KEY_FILE;
use aloft_proto::messages::{
    self, RenewalError, RenewalRequest, RenewalResponse, MAX_DETAIL_LEN, PROTOCOL_VERSION,
};
use aloft_proto::{topics, DeviceId};
use serde_json::json;
use tracing::{info, warn};

use super::{AdminResult, CaState, Core, Out, Session};
use crate::admin::wire::AdminError;
use crate::signer::{SignOutcome, SignRequest, Signed};
use crate::store::AuditEvent;

/// Lifetime of a renewed certificate when the old one's is not on record (as `aloft pki
/// issue-device`).
const DEFAULT_DEVICE_CERT_DAYS: u32 = 825;
/// Longest lifetime a renewal carries over (the CA's own default lifetime).
const MAX_DEVICE_CERT_DAYS: u32 = 3650;

/// One renewal per device per this long (unless an operator allows another).
pub const RENEWAL_INTERVAL_MS: u64 = 60 * 60 * 1000;
/// Devices remembered as having renewed within the interval, at most; beyond that every
/// renewal is refused until the oldest age out (`rate_limited`).
pub const MAX_RECENT_RENEWALS: usize = 65_536;
/// Early renewals operators may allow at once.
pub const MAX_ALLOWED_RENEWALS: usize = 4_096;

type Refusal = (RenewalError, String);

/// Who may renew now: at most one renewal per device per [`RENEWAL_INTERVAL_MS`], only inside
/// the certificate's renewal window, unless an operator allowed one (once). Pure: time comes in.
#[derive(Debug, Default)]
pub struct RenewalGate {
    /// When each device last got past the gate (Unix ms).
    last: HashMap<DeviceId, u64>,
    /// The same, oldest first, so entries age out without a pass over the map.
    order: VecDeque<(u64, DeviceId)>,
    /// Devices an operator allowed one renewal regardless of window and interval.
    allowed: HashSet<DeviceId>,
}

impl RenewalGate {
    /// Lets `device` through (and spends its slot) or says why not. `due`: the certificate is
    /// inside its renewal window.
    pub fn admit(&mut self, now_ms: u64, device: &DeviceId, due: bool) -> Result<(), Refusal> {
        self.expire(now_ms);
        let allowed = self.allowed.contains(device);
        if !due && !allowed {
            return Err((
                RenewalError::NotDue,
                "the certificate is not in its renewal window; an operator may allow an early renewal (aloft device renew-allow)".into(),
            ));
        }
        if !allowed {
            if let Some(at) = self.last.get(device) {
                let wait = (at + RENEWAL_INTERVAL_MS).saturating_sub(now_ms) / 1000;
                return Err((
                    RenewalError::RateLimited,
                    format!("one renewal per device per hour; ask again in {wait} s"),
                ));
            }
        }
        let full =
            self.last.len() >= MAX_RECENT_RENEWALS || self.order.len() >= 2 * MAX_RECENT_RENEWALS;
        if full && !self.last.contains_key(device) {
            return Err((
                RenewalError::RateLimited,
                "too many devices renewed within the hour; ask again later".into(),
            ));
        }
        self.allowed.remove(device);
        self.last.insert(device.clone(), now_ms);
        self.order.push_back((now_ms, device.clone()));
        Ok(())
    }

    /// Gives `device` its slot back: its renewal failed on the orchestrator's side.
    pub fn release(&mut self, device: &DeviceId) {
        self.last.remove(device);
    }

    /// An operator allows `device` one renewal now; false if too many are allowed already.
    pub fn allow(&mut self, device: &DeviceId) -> bool {
        if !self.allowed.contains(device) && self.allowed.len() >= MAX_ALLOWED_RENEWALS {
            return false;
        }
        self.allowed.insert(device.clone());
        true
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some((at, _)) = self.order.front() {
            if now_ms.saturating_sub(*at) < RENEWAL_INTERVAL_MS {
                break;
            }
            if let Some((at, device)) = self.order.pop_front() {
                if self.last.get(&device) == Some(&at) {
                    self.last.remove(&device);
                }
            }
        }
    }
}

impl Core {
    /// A device asks for a new certificate. Refusals are answered on its `cert` topic now; a
    /// request that passes goes to the signer, and is answered when it comes back (`on_signed`).
    pub(super) fn on_csr(
        &mut self,
        device: DeviceId,
        payload: &[u8],
        session: Session,
        ca: CaState,
    ) {
        if let Err((error, detail)) = self.renew(&device, payload, session, ca) {
            self.answer_refusal(&device, error, detail);
        }
    }

    /// The signer's queue was full: the device gets its slot back and is told to ask later.
    pub(super) fn on_signer_busy(&mut self, device: DeviceId) {
        self.renewals.release(&device);
        self.answer_refusal(
            &device,
            RenewalError::RateLimited,
            "the orchestrator is signing as many renewals as it queues; ask again later".into(),
        );
    }

    /// The signer's answer.
    pub(super) fn on_signed(&mut self, signed: Signed) {
        let device = signed.device;
        match signed.outcome {
            SignOutcome::Issued { cert, serial } => {
                self.metrics.renewal("issued");
                info!(%device, %serial, "device certificate renewed");
                self.audit_renewal(&device, format!("{device} serial {serial}"), "ok");
                if self.record_follows_issuance {
                    self.follow_issued(&device, &cert);
                }
                let response = RenewalResponse {
                    v: PROTOCOL_VERSION,
                    cert: Some(cert),
                    error: None,
                    detail: None,
                };
                self.send(topics::cert(&device), messages::encode(&response), false);
            }
            SignOutcome::Refused(error, detail) => {
                if matches!(error, RenewalError::CaOffline | RenewalError::Internal) {
                    self.renewals.release(&device);
                }
                if error == RenewalError::X25519KeyChanged {
                    self.audit_renewal(&device, device.to_string(), error.as_str());
                }
                self.answer_refusal(&device, error, detail);
            }
        }
    }

    /// Points the device's record at the certificate just issued to it. Beside an external
    /// broker the orchestrator never sees the device's next handshake, so without this the
    /// record would keep the old serial (and a CRL naming only the new one would not touch
    /// it).
    fn follow_issued(&mut self, device: &DeviceId, cert_pem: &str) {
        let identity = match aloft_certs::tls::verify_client_cert(
            &self.ca_pem,
            cert_pem,
            Vec::new(),
        ) {
            Ok(i) => i,
            Err(e) => {
                warn!(%device, error = %e, "the certificate just issued does not read back; registry unchanged");
                return;
            }
        };
        let Some(mut record) = self.devices.get(device).cloned() else {
            return;
        };
        if identity.device_id().as_ref() != Some(device) {
            return;
        }
        record.cert_serial = identity.serial_hex();
        record.cert_not_before = identity.not_before;
        record.cert_not_after = identity.not_after;
        self.set_revoked(&mut record);
        self.put_device(record, true);
    }

    fn answer_refusal(&mut self, device: &DeviceId, error: RenewalError, mut detail: String) {
        self.metrics.renewal(error.as_str());
        self.metrics.rejected("csr", error.as_str());
        warn!(%device, %error, %detail, "certificate renewal refused");
        if detail.len() > MAX_DETAIL_LEN {
            let mut cut = MAX_DETAIL_LEN;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        let response = RenewalResponse {
            v: PROTOCOL_VERSION,
            cert: None,
            error: Some(error),
            detail: Some(detail),
        };
        self.send(topics::cert(device), messages::encode(&response), false);
    }

    /// A renewal the orchestrator decided on its own goes to the audit log.
    fn audit_renewal(&mut self, device: &DeviceId, subject: String, outcome: &str) {
        self.audit(AuditEvent {
            actor: format!("device {device}"),
            action: "certificate_renewal".into(),
            subject,
            outcome: outcome.into(),
        });
    }

    /// Checks a renewal request and hands it to the signer, or says why not.
    fn renew(
        &mut self,
        device: &DeviceId,
        payload: &[u8],
        session: Session,
        ca: CaState,
    ) -> Result<(), Refusal> {
        let req: RenewalRequest = match messages::decode(payload) {
            Ok(r) => r,
            Err(e) => return Err((RenewalError::InvalidCsr, e.to_string())),
        };
        let Some(record) = self.devices.get(device).cloned() else {
            return Err((
                RenewalError::UnknownDevice,
                format!("device {device} is not registered"),
            ));
        };
        if record.revoked || self.is_revoked(&record) {
            return Err((
                RenewalError::Revoked,
                "the current certificate is revoked".into(),
            ));
        }
        // The certificate of the session the request came through must itself be current: the
        // record could lag behind a reconnect, the live session cannot.
        let session_serial = match session {
            Session::Serial(serial) => {
                if self.crl.as_ref().is_some_and(|c| c.is_revoked(&serial)) {
                    return Err((
                        RenewalError::Revoked,
                        "the session's certificate is revoked".into(),
                    ));
                }
                serial
            }
            Session::Absent => {
                return Err((
                    RenewalError::UnknownDevice,
                    "no live certificate-authenticated session for this device".into(),
                ));
            }
            Session::NoFront => hex::decode(&record.cert_serial).unwrap_or_default(),
        };
        match ca {
            CaState::Ready => {}
            CaState::NoSigner => {
                return Err((
                    RenewalError::CaOffline,
                    "renewal needs the online ca; this orchestrator has none".into(),
                ));
            }
            CaState::KeyAbsent => {
                return Err((
                    RenewalError::CaOffline,
                    format!(
                        "renewal needs the online ca: the ca key is not on the orchestrator ({CA_KEY_FILE})"
                    ),
                ));
            }
        }
        let now = self.now;
        let now_secs = i64::try_from(now / 1000).unwrap_or(i64::MAX);
        let due = aloft_certs::renewal::grantable(
            now_secs,
            record.cert_not_before,
            record.cert_not_after,
        );
        self.renewals.admit(now, device, due)?;
        // From here on the device's slot is spent: a refusal below costs it the hour too.
        let (named, x25519) = match aloft_certs::read_device_csr(&req.csr) {
            Ok(read) => read,
            Err(e) => return Err((RenewalError::InvalidCsr, e.to_string())),
        };
        if &named != device {
            return Err((
                RenewalError::IdentityMismatch,
                format!("the csr names {named}, the request came from {device}"),
            ));
        }
        let current: Option<[u8; 32]> = hex::decode(&record.x25519_public)
            .ok()
            .and_then(|b| b.try_into().ok());
        let Some(current) = current else {
            return Err((
                RenewalError::Internal,
                "the device's recorded x25519 key is unreadable".into(),
            ));
        };
        if x25519 != current {
            warn!(%device, "renewal with another x25519 key refused: whoever asked may hold only the tls key");
            self.audit_renewal(
                device,
                device.to_string(),
                RenewalError::X25519KeyChanged.as_str(),
            );
            return Err((
                RenewalError::X25519KeyChanged,
                "renewal keeps the x25519 key; a new one needs re-enrollment through the operator"
                    .into(),
            ));
        }
        let lifetime_days =
            if record.cert_not_before > 0 && record.cert_not_after > record.cert_not_before {
                let secs = record.cert_not_after - record.cert_not_before;
                u32::try_from((secs + 86_399) / 86_400).unwrap_or(MAX_DEVICE_CERT_DAYS)
            } else {
                DEFAULT_DEVICE_CERT_DAYS
            }
            .clamp(1, MAX_DEVICE_CERT_DAYS);
        let request = SignRequest {
            device: device.clone(),
            csr: req.csr,
            x25519: current,
            session_serial,
            lifetime_days,
        };
        // The shell hands it over at once; a full queue comes back as `Event::SignerBusy`.
        self.fx.now.push(Out::Sign(request));
        Ok(())
    }

    /// `device_renew_allow`: lets one registered device renew once, now, early or not.
    pub(super) fn device_renew_allow(&mut self, device: &DeviceId) -> AdminResult {
        if !self.devices.contains_key(device) {
            return Err(AdminError::new(
                "unknown_device",
                format!("device {device} is not registered"),
            ));
        }
        if !self.renewals.allow(device) {
            return Err(AdminError::new(
                "too_many_allowed",
                format!("{MAX_ALLOWED_RENEWALS} early renewals are allowed already; let some be used first"),
            ));
        }
        info!(%device, "one early renewal allowed");
        Ok(json!({ "device": device, "allowed": true }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn forty_requests_from_one_device_get_one_slot_per_hour() {
        let mut gate = RenewalGate::default();
        let d = dev("dev-1");
        assert!(gate.admit(0, &d, true).is_ok());
        for i in 1..40 {
            assert_eq!(
                gate.admit(i, &d, true).unwrap_err().0,
                RenewalError::RateLimited
            );
        }
        // Another device is not held up by it.
        assert!(gate.admit(40, &dev("dev-2"), true).is_ok());
        assert!(gate.admit(RENEWAL_INTERVAL_MS, &d, true).is_ok());
    }

    #[test]
    fn a_renewal_far_from_expiry_needs_an_operator_and_the_leave_is_used_once() {
        let mut gate = RenewalGate::default();
        let d = dev("dev-1");
        assert_eq!(
            gate.admit(0, &d, false).unwrap_err().0,
            RenewalError::NotDue
        );
        assert!(gate.allow(&d));
        assert!(gate.admit(1, &d, false).is_ok());
        assert_eq!(
            gate.admit(2, &d, false).unwrap_err().0,
            RenewalError::NotDue
        );
        // The leave also lifts the hourly limit, once.
        assert!(gate.allow(&d));
        assert!(gate.admit(3, &d, true).is_ok());
        assert_eq!(
            gate.admit(4, &d, true).unwrap_err().0,
            RenewalError::RateLimited
        );
    }

    #[test]
    fn a_slot_given_back_after_a_failure_can_be_used_again_and_old_slots_age_out() {
        let mut gate = RenewalGate::default();
        let d = dev("dev-1");
        assert!(gate.admit(0, &d, true).is_ok());
        gate.release(&d);
        assert!(gate.admit(1, &d, true).is_ok());
        gate.admit(RENEWAL_INTERVAL_MS + 1, &dev("dev-2"), true)
            .unwrap();
        assert_eq!(gate.last.len(), 1);
        assert_eq!(gate.order.len(), 1);
    }
}
