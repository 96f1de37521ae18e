use rcgen::{CertificateParams, DnType, SanType};

use super::*;
use crate::testutil::{ca, enroll, params_with_subject, signed_by_ca, x25519};
use crate::{x25519_uri, FleetCa, Validity};

const CN_OID: &[u64] = &[2, 5, 4, 3];
const OU_OID: &[u64] = &[2, 5, 4, 11];

fn x25519_san(n: u8) -> SanType {
    SanType::URI(x25519_uri(&x25519(n)).try_into().unwrap())
}

fn device_params(subject: &[(DnType, &str)], sans: Vec<SanType>) -> CertificateParams {
    let mut params = params_with_subject(subject);
    params.subject_alt_names = sans;
    params
}

fn identity_of(ca: &FleetCa, params: &CertificateParams) -> Result<CertIdentity, PkiError> {
    parse_identity(&signed_by_ca(ca, params))
}

#[test]
fn well_formed_device_cert_yields_its_identity() {
    let ca = ca();
    let params = device_params(
        &[
            (DnType::CommonName, "dev-9"),
            (DnType::OrganizationalUnitName, "device"),
        ],
        vec![x25519_san(9)],
    );
    let identity = identity_of(&ca, &params).unwrap();
    assert_eq!(identity.role, Role::Device);
    assert_eq!(identity.device_id().unwrap().as_str(), "dev-9");
    assert_eq!(identity.x25519, Some(x25519(9)));
}

#[test]
fn cert_without_ou_fails_closed() {
    let params = device_params(&[(DnType::CommonName, "dev-1")], vec![x25519_san(1)]);
    assert!(matches!(
        identity_of(&ca(), &params),
        Err(PkiError::OrganizationalUnitCount(0))
    ));
}

#[test]
fn cert_with_two_ous_fails_closed() {
    let params = device_params(
        &[
            (DnType::CommonName, "alice"),
            (DnType::OrganizationalUnitName, "device"),
            (DnType::CustomDnType(OU_OID.to_vec()), "operator"),
        ],
        vec![x25519_san(1)],
    );
    assert!(matches!(
        identity_of(&ca(), &params),
        Err(PkiError::OrganizationalUnitCount(2))
    ));
}

#[test]
fn cert_without_cn_or_with_two_cns_fails_closed() {
    let ca = ca();
    let none = device_params(
        &[(DnType::OrganizationalUnitName, "device")],
        vec![x25519_san(1)],
    );
    assert!(matches!(
        identity_of(&ca, &none),
        Err(PkiError::CommonNameCount(0))
    ));
    let two = device_params(
        &[
            (DnType::CommonName, "dev-1"),
            (DnType::CustomDnType(CN_OID.to_vec()), "dev-2"),
            (DnType::OrganizationalUnitName, "device"),
        ],
        vec![x25519_san(1)],
    );
    assert!(matches!(
        identity_of(&ca, &two),
        Err(PkiError::CommonNameCount(2))
    ));
}

#[test]
fn cert_with_unknown_role_fails_closed() {
    for ou in ["admin", "Device", "device "] {
        let params = device_params(
            &[
                (DnType::CommonName, "dev-1"),
                (DnType::OrganizationalUnitName, ou),
            ],
            vec![x25519_san(1)],
        );
        assert!(
            matches!(identity_of(&ca(), &params), Err(PkiError::UnknownRole(_))),
            "{ou:?}"
        );
    }
}

#[test]
fn device_cert_with_invalid_device_id_fails_closed() {
    let params = device_params(
        &[
            (DnType::CommonName, "aloft/v1/d/+"),
            (DnType::OrganizationalUnitName, "device"),
        ],
        vec![x25519_san(1)],
    );
    assert!(matches!(
        identity_of(&ca(), &params),
        Err(PkiError::InvalidDeviceId(_))
    ));
}

#[test]
fn device_cert_without_exactly_one_good_x25519_key_fails_closed() {
    let ca = ca();
    let subject = [
        (DnType::CommonName, "dev-1"),
        (DnType::OrganizationalUnitName, "device"),
    ];
    let missing = device_params(&subject, vec![]);
    assert!(matches!(
        identity_of(&ca, &missing),
        Err(PkiError::MissingX25519Key)
    ));
    let two = device_params(&subject, vec![x25519_san(1), x25519_san(2)]);
    assert!(matches!(
        identity_of(&ca, &two),
        Err(PkiError::DuplicateX25519Key)
    ));
    let bad = SanType::URI(
        format!("urn:aloft:x25519:{}", "zz".repeat(32))
            .try_into()
            .unwrap(),
    );
    let malformed = device_params(&subject, vec![bad]);
    assert!(matches!(
        identity_of(&ca, &malformed),
        Err(PkiError::MalformedX25519Key(_))
    ));
    let extra = SanType::DnsName("dev-2".try_into().unwrap());
    let with_extra = device_params(&subject, vec![x25519_san(1), extra]);
    assert!(matches!(
        identity_of(&ca, &with_extra),
        Err(PkiError::UnexpectedSan(_))
    ));
}

#[test]
fn operator_cert_with_invalid_operator_id_fails_closed() {
    let params = device_params(
        &[
            (DnType::CommonName, "#"),
            (DnType::OrganizationalUnitName, "operator"),
        ],
        vec![],
    );
    assert!(matches!(
        identity_of(&ca(), &params),
        Err(PkiError::InvalidOperatorId(_))
    ));
}

#[test]
fn operator_identity_is_not_a_device_identity() {
    let params = device_params(
        &[
            (DnType::CommonName, "dev-1"),
            (DnType::OrganizationalUnitName, "operator"),
        ],
        vec![x25519_san(1)],
    );
    let identity = identity_of(&ca(), &params).unwrap();
    assert_eq!(identity.device_id(), None);
    assert_eq!(identity.operator_id().unwrap().as_str(), "dev-1");
    assert_eq!(identity.x25519, None);
}

#[test]
fn bytes_that_are_not_a_certificate_fail() {
    assert!(matches!(
        parse_identity(b"nonsense"),
        Err(PkiError::CertificateParse(_))
    ));
    let ca = ca();
    let mut trailing = ca.cert_der().to_vec();
    trailing.push(0);
    assert!(matches!(
        parse_identity(&trailing),
        Err(PkiError::CertificateParse(_))
    ));
}

#[test]
fn cert_serial_reads_the_serial_the_ca_chose() {
    let ca = ca();
    let device = enroll(&ca, "dev-1", Validity::days(1));
    let serial = cert_serial(&device.cert_pem).unwrap();
    assert_eq!(serial.len(), 16);
    assert!(matches!(
        cert_serial("nope"),
        Err(PkiError::PemMissing { .. })
    ));
}

const ROLE_OID: &[u64] = &crate::ROLE_ATTRIBUTE_OID;

#[test]
fn operator_cert_without_a_role_attribute_reads_as_no_role() {
    let params = params_with_subject(&[
        (DnType::CommonName, "alice"),
        (DnType::OrganizationalUnitName, "operator"),
    ]);
    let identity = identity_of(&ca(), &params).unwrap();
    assert_eq!(identity.operator_role, None);
}

#[test]
fn unknown_operator_roles_fail_closed() {
    let unknown = params_with_subject(&[
        (DnType::CommonName, "alice"),
        (DnType::OrganizationalUnitName, "operator"),
        (DnType::CustomDnType(ROLE_OID.to_vec()), "root"),
    ]);
    assert!(matches!(
        identity_of(&ca(), &unknown),
        Err(PkiError::UnknownOperatorRole(_))
    ));
    // A doubled role attribute takes the same path as a role on a device certificate (below):
    // rcgen's subject builder keeps one value per attribute type, so it cannot write two.
}

#[test]
fn a_role_attribute_on_a_device_certificate_fails_closed() {
    let params = device_params(
        &[
            (DnType::CommonName, "dev-1"),
            (DnType::OrganizationalUnitName, "device"),
            (DnType::CustomDnType(ROLE_OID.to_vec()), "security-admin"),
        ],
        vec![x25519_san(1)],
    );
    assert!(matches!(
        identity_of(&ca(), &params),
        Err(PkiError::OperatorRoleCount(1))
    ));
}
