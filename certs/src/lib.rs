//! Aloft's PKI: the fleet CA, device certificates issued from CSRs (binding each device's X25519
//! encryption key to its id), operator and server certificates, CRLs, reading the identity out of
//! a verified certificate, revocation (the CA's record of it and the CRLs the orchestrator
//! accepts), and the rustls configurations every TLS endpoint uses.
#![forbid(unsafe_code)]

mod ca;
mod crl_number;
mod csr;
mod device;
mod error;
mod identity;
mod issue;
pub mod ledger;
mod pem;
mod profile;
pub mod renewal;
pub mod revocation;
pub mod signature;
pub mod tls;

#[cfg(test)]
mod testutil;

pub use ca::{FleetCa, CA_CERT_FILE, CA_KEY_FILE};
pub use crl_number::{crl_number, newer_crl_number};
pub use device::{device_csr, device_renewal_csr, DeviceCsr};
pub use error::PkiError;
pub use identity::{cert_public_key_matches, cert_serial, parse_identity, CertIdentity};
pub use issue::{read_device_csr, vet_device_csr, IssuedKeyPair};
pub use profile::{
    parse_x25519_uri, x25519_uri, OperatorRole, Role, Validity, ORCHESTRATOR_COMMON_NAME,
    ROLE_ATTRIBUTE_OID, SERVER_COMMON_NAME, X25519_URI_PREFIX,
};
pub use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
