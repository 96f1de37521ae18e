//! PEM in, DER out: certificates, private keys, CSRs and CRLs, each with an error that says
//! what was missing or malformed. rustls and rcgen speak DER; files and the CLI speak PEM.

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, CertificateSigningRequestDer, PrivateKeyDer,
};

use crate::PkiError;

fn malformed(what: &'static str, err: pem::Error) -> PkiError {
    match err {
        pem::Error::NoItemsFound => PkiError::PemMissing { what },
        other => PkiError::PemMalformed {
            what,
            reason: other.to_string(),
        },
    }
}

/// Every certificate in `pem`, in order; at least one.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    const WHAT: &str = "certificate";
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(WHAT, e))?;
    if certs.is_empty() {
        return Err(PkiError::PemMissing { what: WHAT });
    }
    Ok(certs)
}

/// The one certificate in `pem`; more than one is an error, so nobody trusts or presents a
/// certificate they did not mean to.
pub fn parse_cert(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    let mut certs = parse_certs(pem)?;
    match certs.len() {
        1 => Ok(certs.remove(0)),
        count => Err(PkiError::PemCount {
            what: "certificate",
            count,
        }),
    }
}

/// The first private key in `pem` (PKCS#8, SEC1 or PKCS#1).
pub fn parse_private_key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| malformed("private key", e))
}

/// The first certificate signing request in `pem`.
pub fn parse_csr(pem: &str) -> Result<CertificateSigningRequestDer<'static>, PkiError> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| malformed("certificate signing request", e))
}

/// The first certificate revocation list in `pem`.
pub fn parse_crl(pem: &str) -> Result<CertificateRevocationListDer<'static>, PkiError> {
    CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| malformed("certificate revocation list", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_without_pem_blocks_reports_what_was_missing() {
        assert!(matches!(
            parse_cert("hello"),
            Err(PkiError::PemMissing {
                what: "certificate"
            })
        ));
        assert!(matches!(
            parse_private_key(""),
            Err(PkiError::PemMissing {
                what: "private key"
            })
        ));
    }

    #[test]
    fn corrupt_base64_is_malformed_not_missing() {
        let pem = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            parse_cert(pem),
            Err(PkiError::PemMalformed { .. })
        ));
    }

    #[test]
    fn two_certificates_where_one_is_expected_are_refused() {
        let one = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let two = format!("{one}{one}");
        assert_eq!(parse_certs(&two).unwrap().len(), 2);
        assert!(matches!(
            parse_cert(&two),
            Err(PkiError::PemCount { count: 2, .. })
        ));
    }
}
