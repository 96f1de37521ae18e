//! The CRL number of a CRL (RFC 5280 §5.2.3): it grows with every CRL the CA issues, so it
//! tells which of two CRLs is newer (a backup restore keeps the newer one).

use crate::{pem, PkiError};

/// The CRL number of a PEM CRL as a big-endian unsigned integer without leading zeros, or
/// `None` if the CRL has none. Compare two with [`newer_crl_number`].
pub fn crl_number(crl_pem: &str) -> Result<Option<Vec<u8>>, PkiError> {
    let der = pem::parse_crl(crl_pem)?;
    let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
        .map_err(|e| PkiError::CertificateParse(e.to_string()))?;
    Ok(crl.crl_number().map(|n| n.to_bytes_be()).map(|b| {
        let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
        b[first..].to_vec()
    }))
}

/// Whether CRL number `a` is greater than `b` (both from [`crl_number`]).
pub fn newer_crl_number(a: &[u8], b: &[u8]) -> bool {
    (a.len(), a) > (b.len(), b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn pem(der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN X509 CRL-----\n{b64}\n-----END X509 CRL-----\n")
    }

    #[test]
    fn a_higher_crl_number_is_newer() {
        let ca = crate::FleetCa::create("t", 10).unwrap();
        let pem_of = |n| {
            let der = ca.crl(&[], n, 30).unwrap();
            pem(der.as_ref())
        };
        let a = crl_number(&pem_of(7)).unwrap().unwrap();
        let b = crl_number(&pem_of(300)).unwrap().unwrap();
        assert!(newer_crl_number(&b, &a));
        assert!(!newer_crl_number(&a, &b));
        assert!(!newer_crl_number(&a, &a));
    }
}
