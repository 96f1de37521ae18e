//! Signatures by a certificate's key outside a handshake: an operator signs each admin request
//! with its certificate's P-256 key (ECDSA, SHA-256, ASN.1 DER signature), and the orchestrator
//! verifies it with the public key of that certificate, once the certificate itself has been
//! verified against the fleet CA (PROTOCOL.md §11.1a).

use rcgen::{KeyPair, SigningKey};
use x509_parser::prelude::FromDer;

use crate::PkiError;

/// Largest signature accepted: a DER ECDSA P-256 signature is at most 72 bytes.
pub const MAX_SIGNATURE_BYTES: usize = 80;

/// A P-256 private key (PKCS#8 PEM, as the profiles hold it), parsed once, that signs messages
/// (ECDSA, SHA-256, ASN.1 DER signature).
pub struct MessageKey(KeyPair);

impl MessageKey {
    pub fn from_pem(key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(PkiError::PrivateKey)?;
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(PkiError::BadSignature("the key is not a p-256 ecdsa key"));
        }
        Ok(Self(key))
    }

    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, PkiError> {
        self.0.sign(msg).map_err(PkiError::Signing)
    }
}

/// Checks that `sig` is the signature of `msg` by the key of the DER certificate `cert_der`.
/// Says nothing about the certificate: verify it first.
pub fn verify_with_cert(cert_der: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), PkiError> {
    if sig.len() > MAX_SIGNATURE_BYTES {
        return Err(PkiError::BadSignature("signature too long"));
    }
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(|e| PkiError::CertificateParse(e.to_string()))?;
    let spki = cert.public_key();
    // id-ecPublicKey with the prime256v1 curve: anything else is not an Aloft operator key.
    let ec = x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY;
    let p256 = x509_parser::oid_registry::OID_EC_P256;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != ec || curve != Some(p256) {
        return Err(PkiError::BadSignature("the certificate's key is not p-256"));
    }
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        spki.subject_public_key.data.as_ref(),
    );
    key.verify(msg, sig)
        .map_err(|_| PkiError::BadSignature("the signature does not verify"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FleetCa, OperatorRole, Validity};
    use aloft_proto::OperatorId;

    #[test]
    fn a_signature_verifies_with_its_certificate_and_nothing_else() {
        let ca = FleetCa::create("Test CA", 1).unwrap();
        let ops = OperatorId::new("ops").unwrap();
        let a = ca
            .issue_operator(&ops, OperatorRole::Operator, Validity::days(1))
            .unwrap();
        let b = ca
            .issue_operator(&ops, OperatorRole::Viewer, Validity::days(1))
            .unwrap();
        let a_der = crate::tls::parse_cert(&a.cert_pem).unwrap();
        let b_der = crate::tls::parse_cert(&b.cert_pem).unwrap();
        let sig = MessageKey::from_pem(&a.key_pem)
            .unwrap()
            .sign(b"campaign_abort c-1")
            .unwrap();
        verify_with_cert(a_der.as_ref(), b"campaign_abort c-1", &sig).unwrap();
        // Another message, another certificate of the same name, a mangled signature.
        assert!(verify_with_cert(a_der.as_ref(), b"campaign_abort c-2", &sig).is_err());
        assert!(verify_with_cert(b_der.as_ref(), b"campaign_abort c-1", &sig).is_err());
        let mut bad = sig.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(verify_with_cert(a_der.as_ref(), b"campaign_abort c-1", &bad).is_err());
        assert!(verify_with_cert(a_der.as_ref(), b"x", &[0u8; 200]).is_err());
        assert!(verify_with_cert(b"not a certificate", b"x", &sig).is_err());
    }
}
