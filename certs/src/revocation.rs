//! Revocation, from both ends. The CA side keeps every revocation so far in a state file beside
//! the CA key (`revocations.json`) and signs CRLs from it, each numbered one above the last. The
//! orchestrator side accepts a CRL only once it has checked that the fleet CA signed it
//! ([`VerifiedCrl`]), and learns from it which serial numbers are revoked.
//!
//! Fail closed: a state file or CRL that cannot be read or parsed is an error, never "nothing is
//! revoked".

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls::pki_types::CertificateRevocationListDer;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::identity::normalize_serial;
use crate::{pem, FleetCa, PkiError};

/// File name of the revocation state inside a CA directory, beside `ca.crt` and `ca.key`.
pub const REVOCATIONS_FILE: &str = "revocations.json";

/// Days until a CRL's `nextUpdate` unless the operator says otherwise.
pub const DEFAULT_NEXT_UPDATE_DAYS: u32 = 30;

/// Version of the state file's format.
const STATE_VERSION: u8 = 1;

/// Why a certificate was revoked (RFC 5280 §5.3.1), as the CLI spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationReason {
    Unspecified,
    /// The device's or operator's private key leaked (a stolen device).
    KeyCompromise,
    AffiliationChanged,
    /// Replaced by a newer certificate.
    Superseded,
    /// The device was decommissioned.
    CessationOfOperation,
}

impl RevocationReason {
    pub const ALL: [RevocationReason; 5] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "key-compromise",
            RevocationReason::AffiliationChanged => "affiliation-changed",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessation-of-operation",
        }
    }

    fn to_rcgen(self) -> rcgen::RevocationReason {
        match self {
            RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
            RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
            RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
        }
    }
}

impl FromStr for RevocationReason {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, PkiError> {
        RevocationReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| PkiError::InvalidRevocationReason(s.to_owned()))
    }
}

impl std::fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    /// Serial number, lowercase hex, no leading zero bytes.
    pub serial: String,
    pub reason: RevocationReason,
    /// Unix seconds.
    pub revoked_at: i64,
    /// Who the certificate named, when it was revoked from the certificate file (for humans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// Everything revoked so far and the number of the last CRL signed: what a CA directory keeps in
/// [`REVOCATIONS_FILE`]. A new CRL must list every revocation so far, so the state only grows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationState {
    pub v: u8,
    /// Number of the last CRL signed from this state (0: none yet). The next one gets one more,
    /// so the orchestrator, which refuses to go backwards, takes every new CRL.
    pub crl_number: u64,
    pub revoked: Vec<Revoked>,
}

impl Default for RevocationState {
    fn default() -> Self {
        RevocationState {
            v: STATE_VERSION,
            crl_number: 0,
            revoked: Vec::new(),
        }
    }
}

impl RevocationState {
    /// Reads the state of the CA in `ca_dir`; a CA that never revoked anything has no file yet.
    /// A file that exists but cannot be read or parsed is an error.
    pub fn load(ca_dir: &Path) -> Result<Self, PkiError> {
        let path = ca_dir.join(REVOCATIONS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(PkiError::Read { path, source }),
        };
        let state: RevocationState = serde_json::from_str(&text)
            .map_err(|e| PkiError::RevocationState(format!("{}: {e}", path.display())))?;
        if state.v != STATE_VERSION {
            return Err(PkiError::RevocationState(format!(
                "{}: unsupported version {}",
                path.display(),
                state.v
            )));
        }
        for r in &state.revoked {
            parse_serial_hex(&r.serial)?;
        }
        Ok(state)
    }

    /// Takes in `other`: every revocation it has that this state lacks, and the higher CRL
    /// number (so the next CRL is numbered above both). Returns whether anything changed. A
    /// backup restore merges the surviving state into the restored one with it: a restore never
    /// un-revokes a certificate.
    pub fn merge(&mut self, other: &RevocationState) -> bool {
        let mut changed = false;
        if other.crl_number > self.crl_number {
            self.crl_number = other.crl_number;
            changed = true;
        }
        let ours: std::collections::HashSet<String> =
            self.revoked.iter().map(|r| r.serial.clone()).collect();
        for r in &other.revoked {
            if !ours.contains(&r.serial) {
                self.revoked.push(r.clone());
                changed = true;
            }
        }
        changed
    }

    /// Writes the state into `ca_dir`, atomically: a crash leaves the old state or the new one.
    pub fn save(&self, ca_dir: &Path) -> Result<(), PkiError> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| PkiError::RevocationState(e.to_string()))?;
        write_file_atomically(&ca_dir.join(REVOCATIONS_FILE), &json, 0o600)
    }

    /// Adds `serial` to the revoked set; false if it was already there (the first revocation's
    /// reason and time stand).
    pub fn revoke(
        &mut self,
        serial: &[u8],
        reason: RevocationReason,
        subject: Option<String>,
        now: i64,
    ) -> bool {
        if self.is_revoked(serial) {
            return false;
        }
        self.revoked.push(Revoked {
            serial: hex::encode(normalize_serial(serial)),
            reason,
            revoked_at: now,
            subject,
        });
        true
    }

    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        let hex = hex::encode(normalize_serial(serial));
        self.revoked.iter().any(|r| r.serial == hex)
    }

    /// Signs a CRL listing every revocation so far, numbered one above the last, valid for
    /// `next_update_days`, and returns it as PEM. The state's number moves on only if signing
    /// succeeded; the caller saves the state before handing the CRL out.
    pub fn sign_crl(
        &mut self,
        ca: &FleetCa,
        next_update_days: u32,
        now: OffsetDateTime,
    ) -> Result<String, PkiError> {
        if next_update_days == 0 {
            return Err(PkiError::EmptyValidity);
        }
        let number = self
            .crl_number
            .checked_add(1)
            .ok_or(PkiError::CrlNumberExhausted)?;
        let mut revoked_certs = Vec::with_capacity(self.revoked.len());
        for r in &self.revoked {
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&parse_serial_hex(&r.serial)?),
                revocation_time: OffsetDateTime::from_unix_timestamp(r.revoked_at)
                    .map_err(|e| PkiError::RevocationState(e.to_string()))?,
                reason_code: Some(r.reason.to_rcgen()),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(i64::from(next_update_days)),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&ca.issuer).map_err(PkiError::Signing)?;
        let pem = crl.pem().map_err(PkiError::Signing)?;
        self.crl_number = number;
        Ok(pem)
    }
}

/// What [`revoke_device`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRevocation {
    /// Serials revoked now (hex), in ledger order; the certificate at hand first if it was new.
    pub newly: Vec<String>,
    /// Serials of this device that were already revoked.
    pub already: usize,
    /// Revocations in the state file in all.
    pub total: usize,
}

/// Revokes every certificate the issuance ledger of `ca_dir` records for `device`, and `also`
/// (the serial of the certificate at hand, which the ledger may predate), in one update of
/// `revocations.json` under the CA directory's lock. A renewal that the orchestrator signs
/// after this is refused, because the certificate it would come through is revoked now
/// (see `ledger`). Signs nothing: the next CRL (`aloft pki crl`) carries them.
pub fn revoke_device(
    ca_dir: &Path,
    device: &aloft_proto::DeviceId,
    also: Option<&[u8]>,
    reason: RevocationReason,
    now: i64,
) -> Result<DeviceRevocation, PkiError> {
    let lock = crate::ledger::CaDirLock::acquire(ca_dir)?;
    let mut serials: Vec<Vec<u8>> = also.map(normalize_serial).into_iter().collect();
    for s in crate::ledger::serials_of(ca_dir, device)? {
        if !serials.contains(&s) {
            serials.push(s);
        }
    }
    let mut state = RevocationState::load(ca_dir)?;
    let subject = format!("device {device}");
    let mut newly = Vec::new();
    let mut already = 0;
    for serial in &serials {
        if state.revoke(serial, reason, Some(subject.clone()), now) {
            newly.push(hex::encode(serial));
        } else {
            already += 1;
        }
    }
    if !newly.is_empty() {
        state.save(ca_dir)?;
    }
    drop(lock);
    Ok(DeviceRevocation {
        newly,
        already,
        total: state.revoked.len(),
    })
}

/// Revokes one certificate by serial, under the CA directory's lock; false if it was already
/// revoked. For an operator's certificate, or one certificate of a device that stays trusted.
pub fn revoke_serial(
    ca_dir: &Path,
    serial: &[u8],
    reason: RevocationReason,
    subject: Option<String>,
    now: i64,
) -> Result<(bool, usize), PkiError> {
    let _lock = crate::ledger::CaDirLock::acquire(ca_dir)?;
    let mut state = RevocationState::load(ca_dir)?;
    let added = state.revoke(serial, reason, subject, now);
    if added {
        state.save(ca_dir)?;
    }
    Ok((added, state.revoked.len()))
}

/// Signs the next CRL from the state in `ca_dir` and saves the state, under the CA directory's
/// lock, so that a concurrent `revoke_device` is neither lost nor left out half-done. Returns
/// the CRL (PEM) and the state it was made from.
pub fn sign_next_crl(
    ca_dir: &Path,
    ca: &FleetCa,
    next_update_days: u32,
    now: OffsetDateTime,
) -> Result<(String, RevocationState), PkiError> {
    let _lock = crate::ledger::CaDirLock::acquire(ca_dir)?;
    let mut state = RevocationState::load(ca_dir)?;
    let pem = state.sign_crl(ca, next_update_days, now)?;
    state.save(ca_dir)?;
    Ok((pem, state))
}

/// A serial number typed by an operator: hex, optionally with `:` between bytes (as OpenSSL
/// prints them), either case. Returned big-endian without leading zero bytes.
pub fn parse_serial_hex(s: &str) -> Result<Vec<u8>, PkiError> {
    let digits: String = s.trim().chars().filter(|c| *c != ':').collect();
    let invalid = || PkiError::InvalidSerial(s.to_owned());
    if digits.is_empty() || digits.len() > 40 {
        return Err(invalid());
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes = hex::decode(padded.to_ascii_lowercase()).map_err(|_| invalid())?;
    let serial = normalize_serial(&bytes);
    if serial.is_empty() {
        return Err(invalid());
    }
    Ok(serial)
}

/// A CRL the fleet CA signed, as the orchestrator uses it.
#[derive(Debug, Clone)]
pub struct VerifiedCrl {
    /// The CRL number (RFC 5280 §5.2.3); the orchestrator never takes a lower one.
    pub number: u64,
    /// Revoked serial numbers, big-endian without leading zero bytes.
    pub revoked: BTreeSet<Vec<u8>>,
    /// Unix seconds.
    pub this_update: i64,
    pub next_update: Option<i64>,
    /// The CRL as rustls takes it.
    pub der: CertificateRevocationListDer<'static>,
}

impl VerifiedCrl {
    /// Parses `crl_pem` (exactly one CRL) and checks that the CA in `ca_pem` issued and signed
    /// it and that it carries a CRL number. Anything else is an error.
    pub fn parse(crl_pem: &str, ca_pem: &str) -> Result<Self, PkiError> {
        let der = pem::parse_crl(crl_pem)?;
        let (rest, crl) = CertificateRevocationList::from_der(der.as_ref())
            .map_err(|e| PkiError::InvalidCrl(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PkiError::InvalidCrl("trailing bytes after the crl".into()));
        }
        let ca_der = pem::parse_cert(ca_pem)?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
            .map_err(|e| PkiError::CertificateParse(e.to_string()))?;
        if crl.issuer().as_raw() != ca.subject().as_raw() {
            return Err(PkiError::CrlIssuer);
        }
        // The signature algorithm inside the signed part must be the one outside it, or what was
        // signed is not what is claimed.
        if crl.tbs_cert_list.signature != crl.signature_algorithm {
            return Err(PkiError::InvalidCrl(
                "signature algorithm differs inside and outside the signed part".into(),
            ));
        }
        verify_signature(
            ca.public_key().subject_public_key.data.as_ref(),
            crl.tbs_cert_list.as_ref(),
            crl.signature_value.data.as_ref(),
        )?;
        let number = crl
            .crl_number()
            .ok_or_else(|| PkiError::InvalidCrl("no crl number".into()))?;
        let number = u64_from_be(&number.to_bytes_be())
            .ok_or_else(|| PkiError::InvalidCrl("crl number above 2^64".into()))?;
        let revoked = crl
            .iter_revoked_certificates()
            .map(|r| normalize_serial(&r.serial().to_bytes_be()))
            .collect();
        let this_update = crl.last_update().timestamp();
        let next_update = crl.next_update().map(|t| t.timestamp());
        let der = CertificateRevocationListDer::from(der.as_ref().to_vec());
        Ok(VerifiedCrl {
            number,
            revoked,
            this_update,
            next_update,
            der,
        })
    }

    /// Is the certificate with this serial revoked?
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.revoked.contains(&normalize_serial(serial))
    }
}

/// Checks `signature` over `message` with the CA's public key, trying each algorithm the TLS
/// stack verifies certificates with: the CA key is P-256, but what matters is only that some
/// algorithm proves the CA signed it.
fn verify_signature(public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), PkiError> {
    let algorithms =
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    if algorithms
        .all
        .iter()
        .any(|alg| alg.verify_signature(public_key, message, signature).is_ok())
    {
        Ok(())
    } else {
        Err(PkiError::CrlSignature)
    }
}

fn u64_from_be(bytes: &[u8]) -> Option<u64> {
    let bytes = normalize_serial(bytes);
    if bytes.len() > 8 {
        return None;
    }
    Some(bytes.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)))
}

/// Replaces `path` with `contents` so that a reader, or a crash, sees the old file or the new
/// one and never a mix: write a temporary file beside it, sync it, rename it over, sync the
/// directory. The file gets `mode` (Unix) from creation on.
pub fn write_file_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    aloft_vault::write_atomic(path, contents, mode, true).map_err(|e| match e {
        aloft_vault::VaultError::Io { error, .. } => PkiError::Write {
            path: PathBuf::from(path),
            source: error,
        },
        other => PkiError::Write {
            path: PathBuf::from(path),
            source: std::io::Error::other(other.to_string()),
        },
    })
}

#[cfg(test)]
mod tests;
