//! The fleet CA: creating it, keeping it on disk (`ca.crt`, and `ca.key` readable by its owner
//! only), loading it back, and signing CRLs. Issuing leaf certificates is in `issue`.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use time::{Duration, OffsetDateTime};

use crate::profile::{random_serial, Validity};
use crate::{pem, PkiError};

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// The CA's private key. Its DER copy is wiped when it is dropped: the orchestrator keeps the
/// CA in memory for the life of the process to answer renewals, and what it drops must not
/// linger in freed memory (the signing key inside aws-lc is cleansed by aws-lc itself).
pub(crate) struct CaKey(KeyPair);

impl Drop for CaKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl rcgen::PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        rcgen::PublicKeyData::algorithm(&self.0)
    }
}

impl rcgen::SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}

/// The certificate authority every Aloft certificate chains to.
pub struct FleetCa {
    /// Subject, key identifier method and signing key as rcgen signs with them, built once so
    /// that issuing thousands of certificates never re-parses the CA certificate.
    pub(crate) issuer: Issuer<'static, CaKey>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The issuer's Debug already elides the key; say so explicitly anyway.
        f.debug_struct("FleetCa")
            .field("cert_pem", &self.cert_pem)
            .field("key", &"[elided]")
            .finish()
    }
}

impl FleetCa {
    /// A new self-signed CA with a fresh P-256 key, valid for `validity_days` from now.
    pub fn create(common_name: &str, validity_days: u32) -> Result<Self, PkiError> {
        if common_name.trim().is_empty() {
            return Err(PkiError::EmptyCaName);
        }
        let validity = Validity::days(validity_days);
        validity.check()?;
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::KeyGeneration)?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.serial_number = Some(random_serial()?);
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        // Path length 0: the fleet CA signs leaves only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];

        let cert = params.self_signed(&key).map_err(PkiError::Signing)?;
        Ok(FleetCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, CaKey(key)),
        })
    }

    /// Writes `ca.crt` and `ca.key` into `dir`, refusing to replace either if it exists.
    ///
    /// The key file is created with mode 0600 in the same call that creates it, so it is never
    /// readable by anyone else, not even for an instant.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        // Check both first so a refused save leaves no half-written CA behind. `create_new`
        // below still guards against a file appearing in between.
        for path in [&cert_path, &key_path] {
            if path.symlink_metadata().is_ok() {
                return Err(PkiError::AlreadyExists(path.clone()));
            }
        }
        write_new(
            &key_path,
            self.issuer.key().0.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_new(&cert_path, self.cert_pem.as_bytes(), 0o644)
    }

    /// Reads the CA written by [`FleetCa::save`] from `dir`, checking that the key is P-256, that
    /// it belongs to the certificate, and that the certificate is a CA.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert_pem = read(&dir.join(CA_CERT_FILE))?;
        let key_pem = read(&dir.join(CA_KEY_FILE))?;
        Self::from_pem(cert_pem, &key_pem)
    }

    /// The CA from its certificate and key (PKCS#8 PEM), with the checks of [`FleetCa::load`].
    /// For callers that keep the key file sealed and open it themselves.
    pub fn from_pem(cert_pem: String, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der = pem::parse_cert(&cert_pem)?;
        let key = KeyPair::from_pem(key_pem).map_err(PkiError::CaKey)?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(PkiError::KeyAlgorithm { what: "ca" });
        }

        let (rest, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| PkiError::CertificateParse(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PkiError::CertificateParse(
                "trailing bytes after the certificate".into(),
            ));
        }
        match x509.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            _ => return Err(PkiError::NotACa),
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::CaKeyMismatch);
        }

        let issuer = Issuer::from_ca_cert_der(&cert_der, CaKey(key))
            .map_err(|e| PkiError::CertificateParse(e.to_string()))?;
        Ok(FleetCa {
            issuer,
            cert_pem,
            cert_der,
        })
    }

    /// The CA private key, PKCS#8 PEM: a secret, for a caller that seals it before it is
    /// written (the caller should hold it in zeroizing memory).
    pub fn key_pem(&self) -> String {
        self.issuer.key().0.serialize_pem()
    }

    /// The CA certificate, PEM-encoded: what every party puts in its trust store.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER-encoded.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// A CRL revoking `revoked_serials` (as returned by [`crate::cert_serial`]), numbered
    /// `crl_number`, promising the next one within `next_update_days`.
    pub fn crl(
        &self,
        revoked_serials: &[Vec<u8>],
        crl_number: u64,
        next_update_days: u32,
    ) -> Result<CertificateRevocationListDer<'static>, PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(i64::from(next_update_days)),
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked_serials
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(PkiError::Signing)?;
        Ok(crl.der().clone())
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let write_err = |source: std::io::Error| PkiError::Write {
        path: PathBuf::from(path),
        source,
    };
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::AlreadyExists(path.to_owned())
        } else {
            write_err(source)
        }
    })?;
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

#[cfg(test)]
mod tests;
