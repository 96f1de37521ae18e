//! Who a certificate speaks for: its role, id and (for devices) X25519 key, read from a
//! certificate the TLS layer has already verified. Anything missing, doubled or unexpected is an
//! error: the mTLS front and the orchestrator fail closed on it.

use aloft_proto::{DeviceId, OperatorId};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::Oid;

use crate::profile::{
    only_value, only_x25519_key, OperatorRole, Role, SanName, ROLE_ATTRIBUTE_OID,
};
use crate::{pem, PkiError};

/// The identity an Aloft certificate asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub role: Role,
    /// The subject CN: a valid `DeviceId` for devices, a valid `OperatorId` for operators.
    pub id: String,
    /// The device's X25519 encryption public key; `None` for operators and servers.
    pub x25519: Option<[u8; 32]>,
    /// Start of the certificate's validity, in Unix seconds.
    pub not_before: i64,
    /// End of the certificate's validity, in Unix seconds.
    pub not_after: i64,
    /// The serial number, big-endian without leading zero bytes: what a CRL lists, and how the
    /// orchestrator tells two certificates of one device apart.
    pub serial: Vec<u8>,
    /// An operator certificate's role attribute (1.5). `None` for every other role, and for an
    /// operator certificate issued before roles existed, which the orchestrator treats as a
    /// viewer (PROTOCOL.md §11.7).
    pub operator_role: Option<OperatorRole>,
}

impl CertIdentity {
    /// The device id, if this is a device certificate.
    pub fn device_id(&self) -> Option<DeviceId> {
        match self.role {
            Role::Device => DeviceId::new(self.id.as_str()).ok(),
            Role::Operator | Role::Server | Role::Orchestrator => None,
        }
    }

    /// The serial number as lowercase hex (how it is logged, stored and typed by operators).
    pub fn serial_hex(&self) -> String {
        hex::encode(&self.serial)
    }

    /// The operator id, if this is an operator certificate.
    pub fn operator_id(&self) -> Option<OperatorId> {
        match self.role {
            Role::Operator => OperatorId::new(self.id.as_str()).ok(),
            Role::Device | Role::Server | Role::Orchestrator => None,
        }
    }
}

/// Reads the identity of a DER certificate: exactly one CN, exactly one OU naming a role, and
/// for devices a valid device id plus exactly one well-formed x25519 SAN URI and no other SAN.
///
/// This does not verify the certificate's signature or validity; the TLS handshake has.
pub fn parse_identity(cert_der: &[u8]) -> Result<CertIdentity, PkiError> {
    let x509 = parse_x509(cert_der)?;
    let subject = x509.subject();
    let id = only_value(
        subject.iter_common_name(),
        "common name",
        PkiError::CommonNameCount,
    )?;
    let ou = only_value(
        subject.iter_organizational_unit(),
        "organizational unit",
        PkiError::OrganizationalUnitCount,
    )?;
    let role = Role::from_ou(ou)?;
    let operator_role = operator_role(&x509, role)?;
    let x25519 = match role {
        Role::Device => {
            DeviceId::new(id).map_err(PkiError::InvalidDeviceId)?;
            Some(only_x25519_key(&sans(&x509)?)?)
        }
        Role::Operator => {
            OperatorId::new(id).map_err(PkiError::InvalidOperatorId)?;
            None
        }
        Role::Server | Role::Orchestrator => None,
    };
    Ok(CertIdentity {
        role,
        id: id.to_owned(),
        x25519,
        not_before: x509.validity().not_before.timestamp(),
        not_after: x509.validity().not_after.timestamp(),
        serial: normalize_serial(&x509.tbs_certificate.serial.to_bytes_be()),
        operator_role,
    })
}

/// The operator role a subject names: at most one `role` attribute, only on an operator
/// certificate, with a value this version knows. Anything else is an error, so a certificate
/// can never mean more to the orchestrator than its issuer wrote.
fn operator_role(x509: &X509Certificate<'_>, role: Role) -> Result<Option<OperatorRole>, PkiError> {
    let oid = Oid::from(&ROLE_ATTRIBUTE_OID)
        .map_err(|_| PkiError::CertificateParse("role attribute oid".into()))?;
    let values: Vec<_> = x509.subject().iter_by_oid(&oid).collect();
    match (values.as_slice(), role) {
        ([], _) => Ok(None),
        ([value], Role::Operator) => {
            let text = value
                .as_str()
                .map_err(|_| PkiError::SubjectEncoding { attribute: "role" })?;
            text.parse().map(Some)
        }
        (other, _) => Err(PkiError::OperatorRoleCount(other.len())),
    }
}

/// The serial number of a PEM certificate, big-endian, as [`crate::FleetCa::crl`] takes it.
pub fn cert_serial(cert_pem: &str) -> Result<Vec<u8>, PkiError> {
    let der = pem::parse_cert(cert_pem)?;
    Ok(normalize_serial(
        &parse_x509(&der)?.tbs_certificate.serial.to_bytes_be(),
    ))
}

/// Does the certificate `cert_pem` carry the public key of `key_pem`? A device checks this before
/// it replaces its certificate with a renewed one: a certificate for another key would lock it
/// out.
pub fn cert_public_key_matches(cert_pem: &str, key_pem: &str) -> Result<bool, PkiError> {
    let der = pem::parse_cert(cert_pem)?;
    let x509 = parse_x509(&der)?;
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(PkiError::PrivateKey)?;
    Ok(x509.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// A serial number as this crate compares them: big-endian, no leading zero bytes (a DER
/// INTEGER may carry one to stay positive; a CRL entry and a certificate must still match).
pub(crate) fn normalize_serial(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[start..].to_vec()
}

fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    let (rest, x509) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::CertificateParse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::CertificateParse(
            "trailing bytes after the certificate".into(),
        ));
    }
    Ok(x509)
}

fn sans(x509: &X509Certificate<'_>) -> Result<Vec<SanName>, PkiError> {
    // An error here includes a duplicated SAN extension: refuse rather than pick one.
    let ext = x509
        .subject_alternative_name()
        .map_err(|e| PkiError::MalformedSan(e.to_string()))?;
    Ok(ext
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .map(|name| match name {
                    GeneralName::URI(uri) => SanName::Uri((*uri).to_owned()),
                    other => SanName::Other(other.to_string()),
                })
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests;
