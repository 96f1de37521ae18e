//! The device's side of enrollment: a fresh P-256 key that never leaves the device, and a CSR
//! naming the device and carrying its X25519 encryption key for the CA to bind to that name.

use aloft_proto::DeviceId;
use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};

use crate::profile::{subject, x25519_uri, Role};
use crate::PkiError;

/// A device's enrollment request and the private key it was signed with.
pub struct DeviceCsr {
    /// The device's TLS private key (PKCS#8 PEM); stays on the device.
    pub key_pem: String,
    /// The request to send to the CA.
    pub csr_pem: String,
}

impl std::fmt::Debug for DeviceCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCsr")
            .field("key_pem", &"[elided]")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

/// Generates a device key and a CSR with CN = `id`, OU = device and the SAN URI
/// `urn:aloft:x25519:<hex>` carrying `x25519_public`.
pub fn device_csr(id: &DeviceId, x25519_public: &[u8; 32]) -> Result<DeviceCsr, PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::KeyGeneration)?;
    csr_for(id, x25519_public, key)
}

/// A CSR like [`device_csr`], signed with the key the device already has (`key_pem`, PKCS#8):
/// how a device renews its certificate without replacing a key that may live in a secure
/// element. The returned `key_pem` is that same key.
pub fn device_renewal_csr(
    id: &DeviceId,
    x25519_public: &[u8; 32],
    key_pem: &str,
) -> Result<DeviceCsr, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(PkiError::PrivateKey)?;
    if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(PkiError::KeyAlgorithm { what: "device" });
    }
    csr_for(id, x25519_public, key)
}

fn csr_for(id: &DeviceId, x25519_public: &[u8; 32], key: KeyPair) -> Result<DeviceCsr, PkiError> {
    let uri = x25519_uri(x25519_public);
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(id.as_str(), Role::Device);
    params.subject_alt_names = vec![SanType::URI(
        uri.clone()
            .try_into()
            .map_err(|_| PkiError::MalformedX25519Key(uri))?,
    )];
    let csr = params.serialize_request(&key).map_err(PkiError::Signing)?;
    Ok(DeviceCsr {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem().map_err(PkiError::Signing)?,
    })
}
