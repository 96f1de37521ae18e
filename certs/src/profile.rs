//! What an Aloft certificate says about its holder: the role carried in the subject's OU, the
//! `urn:aloft:x25519:` SAN URI binding a device's encryption key, validity windows and random
//! serial numbers. Issuing (`ca`, `issue`) and reading (`identity`) both go through here.

use rcgen::{
    DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::PkiError;

/// Prefix of the SAN URI that carries a device's X25519 public key as 64 lowercase hex digits.
pub const X25519_URI_PREFIX: &str = "urn:aloft:x25519:";

/// Common name of every server certificate.
pub const SERVER_COMMON_NAME: &str = "aloft-orchestrator";

/// Common name of the orchestrator's client certificate for an external broker. The `:` makes
/// it a name no device or operator id can take (ids allow only `[A-Za-z0-9._-]`), so a broker
/// that keys its ACL on the CN alone cannot confuse the orchestrator with a device or operator.
pub const ORCHESTRATOR_COMMON_NAME: &str = "aloft:orchestrator";

/// Slack subtracted from "now" when a window starts now, so a peer whose clock runs a little
/// behind does not see a certificate that is not yet valid.
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// Bytes of randomness in a serial number (RFC 5280 asks for at least 64 bits; we use 127).
const SERIAL_BYTES: usize = 16;

/// The role a certificate grants, written as the subject's organizational unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Device,
    Operator,
    Server,
    /// The orchestrator as a client of an external MQTT broker (TLS client authentication).
    Orchestrator,
}

impl Role {
    /// The organizational unit that names this role.
    pub fn ou(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Operator => "operator",
            Role::Server => "server",
            Role::Orchestrator => "orchestrator",
        }
    }

    /// The role an organizational unit names; anything else is an error (fail closed).
    pub fn from_ou(ou: &str) -> Result<Self, PkiError> {
        match ou {
            "device" => Ok(Role::Device),
            "operator" => Ok(Role::Operator),
            "server" => Ok(Role::Server),
            "orchestrator" => Ok(Role::Orchestrator),
            other => Err(PkiError::UnknownRole(other.to_owned())),
        }
    }

    fn extended_key_usage(self) -> ExtendedKeyUsagePurpose {
        match self {
            Role::Device | Role::Operator | Role::Orchestrator => {
                ExtendedKeyUsagePurpose::ClientAuth
            }
            Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
        }
    }
}

/// What an operator certificate lets its holder do (1.5), written as the subject's X.520 `role`
/// attribute (OID 2.5.4.72) beside OU `operator`. Each role includes the ones before it: a
/// viewer reads; an operator also uploads releases, runs campaigns and labels devices; a
/// security admin also pushes CRLs and roots, registers devices and allows early renewals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OperatorRole {
    Viewer,
    Operator,
    SecurityAdmin,
}

/// The OID of the X.520 `role` attribute (RFC 5280's id-at-role), which carries an operator's
/// [`OperatorRole`].
pub const ROLE_ATTRIBUTE_OID: [u64; 4] = [2, 5, 4, 72];

impl OperatorRole {
    /// Every role, least powerful first.
    pub const ALL: [OperatorRole; 3] = [
        OperatorRole::Viewer,
        OperatorRole::Operator,
        OperatorRole::SecurityAdmin,
    ];

    /// The attribute value (and the CLI's spelling) of this role.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRole::Viewer => "viewer",
            OperatorRole::Operator => "operator",
            OperatorRole::SecurityAdmin => "security-admin",
        }
    }

    /// Does this role include `needed`?
    pub fn allows(self, needed: OperatorRole) -> bool {
        self >= needed
    }
}

impl std::fmt::Display for OperatorRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for OperatorRole {
    type Err = PkiError;

    /// Exactly one of the spellings of [`OperatorRole::as_str`]; anything else is an error (fail
    /// closed: a role this version does not know grants nothing).
    fn from_str(s: &str) -> Result<Self, PkiError> {
        OperatorRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| PkiError::UnknownOperatorRole(s.to_owned()))
    }
}

/// The window in which an issued certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From five minutes ago (clock skew) until `days` days from now.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - CLOCK_SKEW,
            not_after: now + Duration::days(i64::from(days)),
        }
    }

    pub(crate) fn check(&self) -> Result<(), PkiError> {
        if self.not_after <= self.not_before {
            return Err(PkiError::EmptyValidity);
        }
        Ok(())
    }
}

/// The SAN URI carrying a device's X25519 public key.
pub fn x25519_uri(public_key: &[u8; 32]) -> String {
    format!("{X25519_URI_PREFIX}{}", hex::encode(public_key))
}

/// Reads the key out of an `urn:aloft:x25519:` URI. `None` if `uri` is some other URI; an error
/// if it claims to be an x25519 URI but is not exactly 64 lowercase hex digits after the prefix.
pub fn parse_x25519_uri(uri: &str) -> Option<Result<[u8; 32], PkiError>> {
    let digits = uri.strip_prefix(X25519_URI_PREFIX)?;
    let malformed = || PkiError::MalformedX25519Key(uri.to_owned());
    // Lowercase only, so that one key has exactly one spelling.
    if digits.len() != 64
        || !digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Some(Err(malformed()));
    }
    let mut key = [0u8; 32];
    Some(
        hex::decode_to_slice(digits, &mut key)
            .map(|()| key)
            .map_err(|_| malformed()),
    )
}

/// A subject alternative name as read from a CSR or a certificate: URIs are what Aloft uses;
/// anything else is only named, for the error that refuses it.
pub(crate) enum SanName {
    Uri(String),
    Other(String),
}

impl std::fmt::Display for SanName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SanName::Uri(uri) => write!(f, "URI({uri})"),
            SanName::Other(name) => f.write_str(name),
        }
    }
}

/// The one X25519 key among `sans`. Any other name, a second x25519 URI or a malformed one is an
/// error: the CA signs nothing it did not decide on, and a reader trusts nothing unexpected.
pub(crate) fn only_x25519_key(sans: &[SanName]) -> Result<[u8; 32], PkiError> {
    let mut key = None;
    for san in sans {
        match san {
            SanName::Uri(uri) => match parse_x25519_uri(uri) {
                Some(parsed) => {
                    if key.replace(parsed?).is_some() {
                        return Err(PkiError::DuplicateX25519Key);
                    }
                }
                None => return Err(PkiError::UnexpectedSan(san.to_string())),
            },
            SanName::Other(_) => return Err(PkiError::UnexpectedSan(san.to_string())),
        }
    }
    key.ok_or(PkiError::MissingX25519Key)
}

/// A fresh positive serial number with 127 random bits.
pub(crate) fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; SERIAL_BYTES];
    getrandom::fill(&mut bytes).map_err(PkiError::Randomness)?;
    // Clear the sign bit so the DER INTEGER is positive, and set the next one so the encoding
    // never shrinks: every serial is exactly 16 bytes, whatever the dice say.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The subject every Aloft certificate carries: exactly one CN and exactly one OU.
pub(crate) fn subject(common_name: &str, role: Role) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationalUnitName, role.ou());
    dn
}

/// An operator's subject: CN, OU `operator` and the `role` attribute naming what it may do.
pub(crate) fn operator_subject(common_name: &str, role: OperatorRole) -> DistinguishedName {
    let mut dn = subject(common_name, Role::Operator);
    dn.push(
        DnType::CustomDnType(ROLE_ATTRIBUTE_OID.to_vec()),
        DnValue::Utf8String(role.as_str().to_owned()),
    );
    dn
}

/// The full profile of an end-entity certificate for `role`. Everything here is the CA's
/// decision; only `common_name` and `sans` come from the caller, already vetted.
pub(crate) fn leaf_params(
    role: Role,
    common_name: &str,
    sans: Vec<SanType>,
    validity: &Validity,
) -> Result<rcgen::CertificateParams, PkiError> {
    validity.check()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = subject(common_name, role);
    params.subject_alt_names = sans;
    params.serial_number = Some(random_serial()?);
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![role.extended_key_usage()];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// The string value of the one attribute `values` yields; none, several or a non-string value
/// is an error, so a subject can never mean two things to two readers.
pub(crate) fn only_value<'a, 'b: 'a>(
    values: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'b>>,
    attribute: &'static str,
    count_error: fn(usize) -> PkiError,
) -> Result<&'b str, PkiError> {
    let values: Vec<_> = values.collect();
    match values.as_slice() {
        [value] => value
            .as_str()
            .map_err(|_| PkiError::SubjectEncoding { attribute }),
        other => Err(count_error(other.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x25519_uri_round_trips() {
        let key = [0xabu8; 32];
        let uri = x25519_uri(&key);
        assert_eq!(uri, format!("urn:aloft:x25519:{}", "ab".repeat(32)));
        assert_eq!(parse_x25519_uri(&uri).unwrap().unwrap(), key);
    }

    #[test]
    fn x25519_uri_with_uppercase_or_wrong_length_is_malformed() {
        let upper = format!("{X25519_URI_PREFIX}{}", "AB".repeat(32));
        let short = format!("{X25519_URI_PREFIX}{}", "ab".repeat(31));
        let long = format!("{X25519_URI_PREFIX}{}", "ab".repeat(33));
        for uri in [upper, short, long] {
            assert!(matches!(
                parse_x25519_uri(&uri),
                Some(Err(PkiError::MalformedX25519Key(_)))
            ));
        }
    }

    #[test]
    fn other_uris_are_not_x25519_uris() {
        assert!(parse_x25519_uri("https://example.com").is_none());
    }

    #[test]
    fn serials_are_positive_sixteen_bytes_and_distinct() {
        let a = random_serial().unwrap().to_bytes();
        let b = random_serial().unwrap().to_bytes();
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] & 0x40 != 0);
        assert_ne!(a, b);
    }

    #[test]
    fn empty_validity_window_is_refused() {
        let v = Validity::days(1);
        let reversed = Validity {
            not_before: v.not_after,
            not_after: v.not_before,
        };
        assert!(matches!(reversed.check(), Err(PkiError::EmptyValidity)));
        assert!(v.check().is_ok());
    }

    #[test]
    fn roles_round_trip_through_their_ou_and_unknown_ous_fail() {
        for role in [
            Role::Device,
            Role::Operator,
            Role::Server,
            Role::Orchestrator,
        ] {
            assert_eq!(Role::from_ou(role.ou()).unwrap(), role);
        }
        assert!(matches!(
            Role::from_ou("Device"),
            Err(PkiError::UnknownRole(_))
        ));
        assert!(matches!(Role::from_ou(""), Err(PkiError::UnknownRole(_))));
    }
}
