use aloft_proto::OperatorId;
use rcgen::{
    BasicConstraints, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType, PKCS_ECDSA_P384_SHA384,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{OID_X509_COMMON_NAME, OID_X509_ORGANIZATIONAL_UNIT};

use super::*;
use crate::pem;
use crate::testutil::{ca, csr_pem, der_to_pem, p256_key, params_with_subject, pem_to_der, x25519};
use crate::{device_csr, parse_identity, x25519_uri};

fn der(cert_pem: &str) -> Vec<u8> {
    pem::parse_cert(cert_pem).unwrap().to_vec()
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

fn device_params(cn: &str, sans: Vec<SanType>) -> CertificateParams {
    let mut params = params_with_subject(&[(DnType::CommonName, cn)]);
    params.subject_alt_names = sans;
    params
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn issue_crafted(params: &CertificateParams) -> Result<String, PkiError> {
    ca().issue_device(&csr_pem(params, &p256_key()), Validity::days(1))
}

fn san_names(x509: &X509Certificate<'_>) -> Vec<String> {
    let san = x509.subject_alternative_name().unwrap().unwrap().value;
    san.general_names
        .iter()
        .map(GeneralName::to_string)
        .collect()
}

#[test]
fn device_cert_carries_identity_and_x25519_key() {
    let ca = ca();
    let id = DeviceId::new("dev-001").unwrap();
    let csr = device_csr(&id, &x25519(1)).unwrap();
    let validity = Validity::days(30);
    let cert = ca.issue_device(&csr.csr_pem, validity).unwrap();

    let identity = parse_identity(&der(&cert)).unwrap();
    assert_eq!(identity.role, Role::Device);
    assert_eq!(identity.device_id(), Some(id));
    assert_eq!(identity.operator_id(), None);
    assert_eq!(identity.x25519, Some(x25519(1)));
    assert_eq!(identity.not_after, validity.not_after.unix_timestamp());
}

#[test]
fn device_cert_is_a_client_auth_leaf_signed_by_the_ca() {
    let ca = ca();
    let csr = device_csr(&DeviceId::new("dev-001").unwrap(), &x25519(1)).unwrap();
    let cert_der = der(&ca.issue_device(&csr.csr_pem, Validity::days(1)).unwrap());
    let cert = parse(&cert_der);
    let ca_der = ca.cert_der();
    let ca_x509 = parse(&ca_der);

    assert!(cert.verify_signature(Some(ca_x509.public_key())).is_ok());
    assert_eq!(cert.issuer(), ca_x509.subject());
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.any && eku.other.is_empty());
    assert!(cert.raw_serial().len() >= 8);
    // The certificate holds the device's key, proven by the CSR, not one of the CA's making.
    let device_key = KeyPair::from_pem(&csr.key_pem).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        device_key.public_key_raw()
    );
}

#[test]
fn every_certificate_gets_its_own_serial() {
    let ca = ca();
    let csr = device_csr(&DeviceId::new("dev-001").unwrap(), &x25519(1)).unwrap();
    let a = ca.issue_device(&csr.csr_pem, Validity::days(1)).unwrap();
    let b = ca.issue_device(&csr.csr_pem, Validity::days(1)).unwrap();
    assert_ne!(
        crate::cert_serial(&a).unwrap(),
        crate::cert_serial(&b).unwrap()
    );
}

#[test]
fn csr_with_tampered_signature_is_refused() {
    let csr = device_csr(&DeviceId::new("dev-001").unwrap(), &x25519(1)).unwrap();
    let mut bytes = pem_to_der(&csr.csr_pem);
    // Rename the device after it signed: same length, so the DER stays well-formed.
    let at = bytes.windows(7).position(|w| w == b"dev-001").unwrap();
    bytes[at..at + 7].copy_from_slice(b"dev-666");
    let tampered = der_to_pem("CERTIFICATE REQUEST", &bytes);
    assert!(matches!(
        ca().issue_device(&tampered, Validity::days(1)),
        Err(PkiError::CsrSignature)
    ));
}

#[test]
fn text_that_is_not_a_csr_is_refused() {
    let ca = ca();
    assert!(matches!(
        ca.issue_device("", Validity::days(1)),
        Err(PkiError::PemMissing { .. })
    ));
    let garbage = der_to_pem("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00");
    assert!(matches!(
        ca.issue_device(&garbage, Validity::days(1)),
        Err(PkiError::CsrParse(_))
    ));
}

#[test]
fn issuing_refuses_csr_with_invalid_device_id() {
    for cn in ["dev/1", "+", "", "-dev", &"d".repeat(65)] {
        let params = device_params(cn, vec![uri(&x25519_uri(&x25519(1)))]);
        assert!(
            matches!(issue_crafted(&params), Err(PkiError::InvalidDeviceId(_))),
            "cn {cn:?} was accepted"
        );
    }
}

#[test]
fn issuing_refuses_csr_without_common_name_or_with_two() {
    let mut none = params_with_subject(&[(DnType::OrganizationName, "acme")]);
    none.subject_alt_names = vec![uri(&x25519_uri(&x25519(1)))];
    assert!(matches!(
        issue_crafted(&none),
        Err(PkiError::CommonNameCount(0))
    ));

    let mut two = params_with_subject(&[
        (DnType::CommonName, "dev-001"),
        (DnType::CustomDnType(vec![2, 5, 4, 3]), "dev-002"),
    ]);
    two.subject_alt_names = vec![uri(&x25519_uri(&x25519(1)))];
    assert!(matches!(
        issue_crafted(&two),
        Err(PkiError::CommonNameCount(2))
    ));
}

#[test]
fn issuing_refuses_csr_without_x25519_key() {
    assert!(matches!(
        issue_crafted(&device_params("dev-001", vec![])),
        Err(PkiError::MissingX25519Key)
    ));
}

#[test]
fn issuing_refuses_csr_with_two_x25519_keys() {
    let sans = vec![uri(&x25519_uri(&x25519(1))), uri(&x25519_uri(&x25519(2)))];
    assert!(matches!(
        issue_crafted(&device_params("dev-001", sans)),
        Err(PkiError::DuplicateX25519Key)
    ));
}

#[test]
fn issuing_refuses_csr_with_malformed_x25519_key() {
    let upper = format!("urn:aloft:x25519:{}", "AB".repeat(32));
    let short = format!("urn:aloft:x25519:{}", "ab".repeat(16));
    for bad in [upper, short] {
        assert!(matches!(
            issue_crafted(&device_params("dev-001", vec![uri(&bad)])),
            Err(PkiError::MalformedX25519Key(_))
        ));
    }
}

#[test]
fn issuing_refuses_csr_with_any_other_san() {
    let key = uri(&x25519_uri(&x25519(1)));
    for other in [
        SanType::DnsName("evil.example".try_into().unwrap()),
        SanType::IpAddress("10.0.0.1".parse().unwrap()),
        uri("urn:aloft:operator:root"),
    ] {
        let params = device_params("dev-001", vec![key.clone(), other]);
        assert!(matches!(
            issue_crafted(&params),
            Err(PkiError::UnexpectedSan(_))
        ));
    }
}

#[test]
fn issuing_refuses_csr_with_a_non_p256_key() {
    let params = device_params("dev-001", vec![uri(&x25519_uri(&x25519(1)))]);
    let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let csr = csr_pem(&params, &p384);
    assert!(matches!(
        ca().issue_device(&csr, Validity::days(1)),
        Err(PkiError::KeyAlgorithm { .. })
    ));
}

#[test]
fn issuing_copies_no_requested_extensions_but_cn_and_x25519() {
    let mut params = params_with_subject(&[
        (DnType::CommonName, "dev-001"),
        (DnType::OrganizationalUnitName, "operator"),
        (DnType::OrganizationName, "evil corp"),
    ]);
    params.subject_alt_names = vec![uri(&x25519_uri(&x25519(3)))];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::CodeSigning,
    ];
    params.custom_extensions = vec![CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 4, 1, 99999, 1],
        vec![0x05, 0x00],
    )];

    let cert_der = der(&issue_crafted(&params).unwrap());
    let cert = parse(&cert_der);

    let subject: Vec<_> = cert
        .subject()
        .iter_attributes()
        .map(|a| (a.attr_type().clone(), a.as_str().unwrap()))
        .collect();
    assert_eq!(
        subject,
        vec![
            (OID_X509_COMMON_NAME, "dev-001"),
            (OID_X509_ORGANIZATIONAL_UNIT, "device")
        ]
    );
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.code_signing);
    assert_eq!(
        san_names(&cert),
        vec![format!("URI({})", x25519_uri(&x25519(3)))]
    );
    let custom = x509_parser::der_parser::oid!(1.3.6 .1 .4 .1 .99999 .1);
    assert!(cert.extensions().iter().all(|ext| ext.oid != custom));
}

#[test]
fn issuing_with_an_empty_validity_window_is_refused() {
    let csr = device_csr(&DeviceId::new("dev-001").unwrap(), &x25519(1)).unwrap();
    let v = Validity::days(1);
    let reversed = Validity {
        not_before: v.not_after,
        not_after: v.not_before,
    };
    assert!(matches!(
        ca().issue_device(&csr.csr_pem, reversed),
        Err(PkiError::EmptyValidity)
    ));
}

#[test]
fn issuing_in_bulk_returns_one_result_per_csr_in_order() {
    let ca = ca();
    let mut csrs: Vec<String> = (0..50)
        .map(|i| {
            let id = DeviceId::new(format!("dev-{i:03}")).unwrap();
            device_csr(&id, &x25519(i)).unwrap().csr_pem
        })
        .collect();
    csrs[10] = "garbage".to_owned();
    let results = ca.issue_devices(&csrs, Validity::days(1));
    assert_eq!(results.len(), 50);
    for (i, result) in results.iter().enumerate() {
        if i == 10 {
            assert!(result.is_err());
            continue;
        }
        let identity = parse_identity(&der(result.as_ref().unwrap())).unwrap();
        assert_eq!(identity.id, format!("dev-{i:03}"));
        assert_eq!(identity.x25519, Some(x25519(i as u8)));
    }
}

#[test]
fn operator_cert_carries_the_operator_role_and_a_fresh_key() {
    let id = OperatorId::new("alice").unwrap();
    let issued = ca()
        .issue_operator(&id, OperatorRole::Operator, Validity::days(1))
        .unwrap();
    let cert_der = der(&issued.cert_pem);
    let identity = parse_identity(&cert_der).unwrap();
    assert_eq!(
        (
            identity.role,
            identity.operator_id(),
            identity.x25519,
            identity.operator_role
        ),
        (Role::Operator, Some(id), None, Some(OperatorRole::Operator))
    );
    let cert = parse(&cert_der);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    let key = KeyPair::from_pem(&issued.key_pem).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert!(!format!("{issued:?}").contains("PRIVATE KEY"));
}

#[test]
fn operator_cert_from_csr_keeps_the_operators_key_and_refuses_sans_and_bad_ids() {
    let ca = ca();
    let key = p256_key();
    let cert = ca
        .issue_operator_from_csr(
            &csr_pem(&device_params("alice", vec![]), &key),
            OperatorRole::Viewer,
            Validity::days(1),
        )
        .unwrap();
    let cert_der = der(&cert);
    let identity = parse_identity(&cert_der).unwrap();
    assert_eq!(
        (identity.role, identity.operator_role),
        (Role::Operator, Some(OperatorRole::Viewer))
    );
    assert_eq!(
        parse(&cert_der)
            .public_key()
            .subject_public_key
            .data
            .as_ref(),
        key.public_key_raw()
    );

    let with_san = device_params("alice", vec![uri(&x25519_uri(&x25519(1)))]);
    assert!(matches!(
        ca.issue_operator_from_csr(
            &csr_pem(&with_san, &key),
            OperatorRole::Viewer,
            Validity::days(1)
        ),
        Err(PkiError::UnexpectedSan(_))
    ));
    assert!(matches!(
        ca.issue_operator_from_csr(
            &csr_pem(&device_params("a b", vec![]), &key),
            OperatorRole::Viewer,
            Validity::days(1)
        ),
        Err(PkiError::InvalidOperatorId(_))
    ));
}

#[test]
fn server_cert_names_dns_and_ip_hosts_for_server_auth() {
    let hosts = [
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let issued = ca().issue_server(&hosts, Validity::days(1)).unwrap();
    let cert_der = der(&issued.cert_pem);
    let cert = parse(&cert_der);
    assert_eq!(
        san_names(&cert),
        vec![
            "DNSName(localhost)",
            "IPAddress(7f:00:00:01)",
            "IPAddress(00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:01)"
        ]
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    let identity = parse_identity(&cert_der).unwrap();
    assert_eq!(
        (identity.role, identity.id.as_str()),
        (Role::Server, SERVER_COMMON_NAME)
    );
}

#[test]
fn server_cert_needs_valid_hostnames() {
    let ca = ca();
    assert!(matches!(
        ca.issue_server(&[], Validity::days(1)),
        Err(PkiError::NoHostnames)
    ));
    for bad in ["bad host", "", "a/b"] {
        assert!(matches!(
            ca.issue_server(&[bad.to_owned()], Validity::days(1)),
            Err(PkiError::InvalidHostname(_))
        ));
    }
}

#[test]
fn renewing_refuses_a_csr_that_names_another_device() {
    let ca = ca();
    let me = DeviceId::new("dev-me").unwrap();
    let other = DeviceId::new("dev-other").unwrap();
    let csr = crate::device_csr(&other, &[7; 32]).unwrap();
    assert_eq!(crate::vet_device_csr(&csr.csr_pem).unwrap(), other);
    assert!(matches!(
        ca.renew_device(&csr.csr_pem, &me, &[7; 32], Validity::days(1)),
        Err(PkiError::CertificateMismatch(_))
    ));
    // With its own key kept, the device gets a new certificate for the same key.
    let mine = crate::device_csr(&me, &[7; 32]).unwrap();
    let renewal = crate::device_renewal_csr(&me, &[7; 32], &mine.key_pem).unwrap();
    assert_eq!(renewal.key_pem, mine.key_pem);
    let cert = ca
        .renew_device(&renewal.csr_pem, &me, &[7; 32], Validity::days(1))
        .unwrap();
    assert!(crate::cert_public_key_matches(&cert, &mine.key_pem).unwrap());
    assert!(!crate::cert_public_key_matches(&cert, &csr.key_pem).unwrap());
}

#[test]
fn a_renewal_may_change_the_tls_key_but_never_the_x25519_key() {
    let ca = ca();
    let me = DeviceId::new("dev-me").unwrap();
    // A thief with the TLS key only: a renewal CSR for that key with its own x25519 key.
    let original = crate::device_csr(&me, &[7; 32]).unwrap();
    let thief = crate::device_renewal_csr(&me, &[8; 32], &original.key_pem).unwrap();
    assert!(matches!(
        ca.renew_device(&thief.csr_pem, &me, &[7; 32], Validity::days(1)),
        Err(PkiError::X25519KeyChanged)
    ));
    assert_eq!(crate::read_device_csr(&thief.csr_pem).unwrap().1, [8; 32]);
    // A new TLS key with the same x25519 key is a renewal.
    let fresh = crate::device_csr(&me, &[7; 32]).unwrap();
    let cert = ca
        .renew_device(&fresh.csr_pem, &me, &[7; 32], Validity::days(1))
        .unwrap();
    assert!(crate::cert_public_key_matches(&cert, &fresh.key_pem).unwrap());
}

#[test]
fn every_operator_role_round_trips_through_a_certificate() {
    let ca = ca();
    for role in OperatorRole::ALL {
        let issued = ca
            .issue_operator(&OperatorId::new("bob").unwrap(), role, Validity::days(1))
            .unwrap();
        let identity = parse_identity(&der(&issued.cert_pem)).unwrap();
        assert_eq!(identity.operator_role, Some(role));
        assert_eq!(role.as_str().parse::<OperatorRole>().unwrap(), role);
    }
    assert!("admin".parse::<OperatorRole>().is_err());
    assert!("Viewer".parse::<OperatorRole>().is_err());
}

#[test]
fn the_csr_cannot_choose_the_operator_role() {
    let ca = ca();
    let key = p256_key();
    let mut asks = device_params("mallory", vec![]);
    asks.distinguished_name.push(
        DnType::CustomDnType(crate::ROLE_ATTRIBUTE_OID.to_vec()),
        "security-admin",
    );
    let cert = ca
        .issue_operator_from_csr(
            &csr_pem(&asks, &key),
            OperatorRole::Viewer,
            Validity::days(1),
        )
        .unwrap();
    assert_eq!(
        parse_identity(&der(&cert)).unwrap().operator_role,
        Some(OperatorRole::Viewer)
    );
}
