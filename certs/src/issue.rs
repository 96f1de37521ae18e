//! Issuing leaf certificates: devices (and optionally operators) from CSRs, so their keys never
//! come here; operators and the orchestrator's server with keys generated on the spot. Every
//! certificate follows the profile in `profile`: a CSR contributes its public key, its CN and,
//! for devices, the X25519 key, and nothing more.

use std::net::IpAddr;

use aloft_proto::{DeviceId, OperatorId};
use rcgen::{CertificateParams, KeyPair, PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::DnsName;

use crate::csr;
use crate::profile::{
    leaf_params, only_x25519_key, operator_subject, x25519_uri, OperatorRole, Role, Validity,
    ORCHESTRATOR_COMMON_NAME, SERVER_COMMON_NAME,
};
use crate::{FleetCa, PkiError};

/// A certificate together with the private key generated for it.
pub struct IssuedKeyPair {
    pub cert_pem: String,
    /// PKCS#8 PEM; whoever receives it must keep it private.
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKeyPair")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

impl FleetCa {
    /// Signs a device's CSR: CN must be a valid device id and the only SAN one well-formed
    /// `urn:aloft:x25519:` URI. Returns the certificate as PEM.
    pub fn issue_device(&self, csr_pem: &str, validity: Validity) -> Result<String, PkiError> {
        let csr = csr::vet(csr_pem)?;
        let id = DeviceId::new(csr.common_name).map_err(PkiError::InvalidDeviceId)?;
        let x25519 = only_x25519_key(&csr.sans)?;
        // Re-encoded from the parsed key rather than copied, so the certificate carries exactly
        // the canonical spelling.
        let uri = x25519_uri(&x25519);
        let san = SanType::URI(
            uri.clone()
                .try_into()
                .map_err(|_| PkiError::MalformedX25519Key(uri))?,
        );
        let params = leaf_params(Role::Device, id.as_str(), vec![san], &validity)?;
        self.sign(&params, &csr.public_key)
    }

    /// [`FleetCa::issue_device`] for a device renewing its certificate: the CSR must also name
    /// `expected`, the device that asked (authenticated by its connection, not by the CSR), and
    /// carry `x25519`, the encryption key of the device's current certificate. The TLS key may
    /// change (that is what renewal is for); the X25519 key may not, since content keys are
    /// wrapped to it and the TLS key alone must never be enough to get them.
    pub fn renew_device(
        &self,
        csr_pem: &str,
        expected: &DeviceId,
        x25519: &[u8; 32],
        validity: Validity,
    ) -> Result<String, PkiError> {
        let (named, key) = read_device_csr(csr_pem)?;
        if &named != expected {
            return Err(PkiError::CertificateMismatch(
                "the csr names another device",
            ));
        }
        if &key != x25519 {
            return Err(PkiError::X25519KeyChanged);
        }
        self.issue_device(csr_pem, validity)
    }

    /// [`FleetCa::issue_device`] for each CSR, results in the same order.
    pub fn issue_devices(
        &self,
        csrs: &[String],
        validity: Validity,
    ) -> Vec<Result<String, PkiError>> {
        csrs.iter()
            .map(|csr| self.issue_device(csr, validity))
            .collect()
    }

    /// A certificate and a fresh key for operator `id` with `role` (1.5), for the CLI on the
    /// operator's machine.
    pub fn issue_operator(
        &self,
        id: &OperatorId,
        role: OperatorRole,
        validity: Validity,
    ) -> Result<IssuedKeyPair, PkiError> {
        self.issue_with_new_key(&operator_params(id, role, &validity)?)
    }

    /// Signs an operator's CSR: CN must be a valid operator id and no SAN may be requested.
    /// The role is the CA's decision, never the CSR's: whatever subject the CSR asks for, only
    /// its CN is copied.
    pub fn issue_operator_from_csr(
        &self,
        csr_pem: &str,
        role: OperatorRole,
        validity: Validity,
    ) -> Result<String, PkiError> {
        let csr = csr::vet(csr_pem)?;
        let id = OperatorId::new(csr.common_name).map_err(PkiError::InvalidOperatorId)?;
        if let Some(san) = csr.sans.first() {
            return Err(PkiError::UnexpectedSan(san.to_string()));
        }
        self.sign(&operator_params(&id, role, &validity)?, &csr.public_key)
    }

    /// The orchestrator's TLS server certificate and a fresh key; each hostname becomes an IP
    /// address SAN if it parses as one, else a DNS name SAN.
    pub fn issue_server(
        &self,
        hostnames: &[String],
        validity: Validity,
    ) -> Result<IssuedKeyPair, PkiError> {
        if hostnames.is_empty() {
            return Err(PkiError::NoHostnames);
        }
        let sans = hostnames
            .iter()
            .map(|host| server_san(host))
            .collect::<Result<_, _>>()?;
        let params = leaf_params(Role::Server, SERVER_COMMON_NAME, sans, &validity)?;
        self.issue_with_new_key(&params)
    }

    /// The orchestrator's client certificate for an external MQTT broker, and a fresh key:
    /// role `orchestrator`, CN [`ORCHESTRATOR_COMMON_NAME`], client authentication only.
    pub fn issue_orchestrator(&self, validity: Validity) -> Result<IssuedKeyPair, PkiError> {
        let params = leaf_params(
            Role::Orchestrator,
            ORCHESTRATOR_COMMON_NAME,
            Vec::new(),
            &validity,
        )?;
        self.issue_with_new_key(&params)
    }

    fn issue_with_new_key(&self, params: &CertificateParams) -> Result<IssuedKeyPair, PkiError> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::KeyGeneration)?;
        let cert_pem = self.sign(params, &key)?;
        Ok(IssuedKeyPair {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<String, PkiError> {
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(PkiError::Signing)?;
        Ok(cert.pem())
    }
}

/// Vets a device CSR as [`FleetCa::issue_device`] would (signature, P-256, a valid device id
/// as the only CN, exactly one x25519 key and no other SAN) without a CA, and returns the device
/// it names: the orchestrator checks this before it looks for its CA key.
pub fn vet_device_csr(csr_pem: &str) -> Result<DeviceId, PkiError> {
    read_device_csr(csr_pem).map(|(id, _)| id)
}

/// [`vet_device_csr`], also returning the X25519 key the CSR carries.
pub fn read_device_csr(csr_pem: &str) -> Result<(DeviceId, [u8; 32]), PkiError> {
    let csr = csr::vet(csr_pem)?;
    let id = DeviceId::new(csr.common_name).map_err(PkiError::InvalidDeviceId)?;
    let key = only_x25519_key(&csr.sans)?;
    Ok((id, key))
}

/// An operator certificate's profile: the common leaf profile with the role attribute added to
/// the subject.
fn operator_params(
    id: &OperatorId,
    role: OperatorRole,
    validity: &Validity,
) -> Result<CertificateParams, PkiError> {
    let mut params = leaf_params(Role::Operator, id.as_str(), Vec::new(), validity)?;
    params.distinguished_name = operator_subject(id.as_str(), role);
    Ok(params)
}

fn server_san(host: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let invalid = || PkiError::InvalidHostname(host.to_owned());
    DnsName::try_from(host).map_err(|_| invalid())?;
    Ok(SanType::DnsName(host.try_into().map_err(|_| invalid())?))
}

#[cfg(test)]
mod tests;
