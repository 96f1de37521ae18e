use std::fs;

use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use super::*;
use crate::testutil::{ca, enroll, p256_key, params_with_subject};
use crate::{cert_serial, parse_identity, Role};

fn parse(der: &[u8]) -> x509_parser::certificate::X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).expect("parse").1
}

#[test]
fn ca_certificate_is_a_self_signed_ca_for_certs_and_crls() {
    let ca = ca();
    let der = ca.cert_der();
    let x509 = parse(&der);
    assert_eq!(x509.subject(), x509.issuer());
    assert!(x509.verify_signature(None).is_ok());
    let bc = x509.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = x509.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    assert!(!ku.digital_signature());
    assert_eq!(pem::parse_cert(ca.cert_pem()).unwrap(), ca.cert_der());
}

#[test]
fn ca_with_empty_name_is_refused() {
    assert!(matches!(
        FleetCa::create("  ", 30),
        Err(PkiError::EmptyCaName)
    ));
}

#[test]
fn saved_ca_loads_back_and_keeps_issuing_under_the_same_name_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let original = ca();
    original.save(dir.path()).unwrap();
    let loaded = FleetCa::load(dir.path()).unwrap();
    assert_eq!(loaded.cert_pem(), original.cert_pem());

    let device = enroll(&loaded, "dev-001", Validity::days(1));
    let cert_der = pem::parse_cert(&device.cert_pem).unwrap();
    let cert = parse(&cert_der);
    let ca_der = original.cert_der();
    let ca_x509 = parse(&ca_der);
    assert_eq!(cert.issuer(), ca_x509.subject());
    assert!(cert.verify_signature(Some(ca_x509.public_key())).is_ok());
    assert_eq!(parse_identity(&cert_der).unwrap().role, Role::Device);
}

#[cfg(unix)]
#[test]
fn ca_key_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    ca().save(dir.path()).unwrap();
    let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn saving_over_an_existing_ca_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    ca().save(dir.path()).unwrap();
    let before = fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
    let err = ca().save(dir.path()).unwrap_err();
    assert!(matches!(err, PkiError::AlreadyExists(_)), "{err}");
    assert!(err.to_string().contains("refusing to overwrite"));
    assert_eq!(fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), before);

    // A stray certificate alone is enough to refuse, and no key is written next to it.
    let other = tempfile::tempdir().unwrap();
    fs::write(other.path().join(CA_CERT_FILE), "stray").unwrap();
    assert!(matches!(
        ca().save(other.path()),
        Err(PkiError::AlreadyExists(_))
    ));
    assert!(!other.path().join(CA_KEY_FILE).exists());
}

#[test]
fn loading_from_an_empty_directory_names_the_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = FleetCa::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, PkiError::Read { path, .. } if path.ends_with(CA_CERT_FILE)),
        "{err}"
    );
}

#[test]
fn loading_a_key_that_does_not_match_the_certificate_fails() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    ca().save(a.path()).unwrap();
    ca().save(b.path()).unwrap();
    fs::copy(b.path().join(CA_KEY_FILE), a.path().join("other.key")).unwrap();
    fs::rename(a.path().join("other.key"), a.path().join(CA_KEY_FILE)).unwrap();
    assert!(matches!(
        FleetCa::load(a.path()),
        Err(PkiError::CaKeyMismatch)
    ));
}

#[test]
fn loading_a_leaf_certificate_as_the_ca_fails() {
    let dir = tempfile::tempdir().unwrap();
    let key = p256_key();
    let leaf = params_with_subject(&[(rcgen::DnType::CommonName, "not-a-ca")])
        .self_signed(&key)
        .unwrap();
    fs::write(dir.path().join(CA_CERT_FILE), leaf.pem()).unwrap();
    fs::write(dir.path().join(CA_KEY_FILE), key.serialize_pem()).unwrap();
    assert!(matches!(FleetCa::load(dir.path()), Err(PkiError::NotACa)));
}

#[test]
fn loading_garbage_key_fails_with_a_ca_key_error() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(CA_CERT_FILE), ca().cert_pem()).unwrap();
    fs::write(dir.path().join(CA_KEY_FILE), "not a key").unwrap();
    assert!(matches!(FleetCa::load(dir.path()), Err(PkiError::CaKey(_))));
}

#[test]
fn crl_lists_revoked_serials_under_the_ca_name_and_signature() {
    let ca = ca();
    let revoked = enroll(&ca, "dev-revoked", Validity::days(1));
    let serial = cert_serial(&revoked.cert_pem).unwrap();
    let crl_der = ca.crl(std::slice::from_ref(&serial), 7, 1).unwrap();

    let (_, crl) = CertificateRevocationList::from_der(&crl_der).unwrap();
    let ca_der = ca.cert_der();
    let ca_x509 = parse(&ca_der);
    assert_eq!(crl.issuer(), ca_x509.subject());
    assert!(crl.verify_signature(ca_x509.public_key()).is_ok());
    assert_eq!(crl.crl_number().map(|n| n.to_u64_digits()), Some(vec![7]));
    let listed: Vec<Vec<u8>> = crl
        .iter_revoked_certificates()
        .map(|r| r.serial().to_bytes_be())
        .collect();
    assert_eq!(listed, vec![serial]);
}

#[test]
fn crl_whose_next_update_is_now_is_refused() {
    assert!(matches!(ca().crl(&[], 1, 0), Err(PkiError::Signing(_))));
}
