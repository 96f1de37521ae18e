use super::*;
use crate::testutil::{ca, enroll, handshake, server_cert};
use crate::tls::{client_config, server_config_reloadable, ReloadableClientVerifier};
use crate::{cert_serial, parse_identity, Validity};

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

#[test]
fn revoking_is_idempotent_and_the_state_round_trips_through_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = RevocationState::load(dir.path()).unwrap();
    assert_eq!(state, RevocationState::default());
    assert!(state.revoke(&[0, 0x42, 0x01], RevocationReason::KeyCompromise, None, 7));
    // The same serial spelled with a leading zero byte is the same certificate.
    assert!(!state.revoke(&[0x42, 0x01], RevocationReason::Superseded, None, 8));
    assert_eq!(state.revoked.len(), 1);
    assert_eq!(state.revoked[0].serial, "4201");
    assert_eq!(state.revoked[0].reason, RevocationReason::KeyCompromise);
    state.save(dir.path()).unwrap();
    assert_eq!(RevocationState::load(dir.path()).unwrap(), state);
}

#[test]
fn an_unreadable_state_file_is_an_error_not_an_empty_list() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(REVOCATIONS_FILE), "{not json").unwrap();
    assert!(matches!(
        RevocationState::load(dir.path()),
        Err(PkiError::RevocationState(_))
    ));
    std::fs::write(
        dir.path().join(REVOCATIONS_FILE),
        r#"{"v":1,"crl_number":1,"revoked":[{"serial":"zz","reason":"superseded","revoked_at":0}]}"#,
    )
    .unwrap();
    assert!(RevocationState::load(dir.path()).is_err());
}

#[test]
fn each_signed_crl_is_numbered_one_above_the_last_and_lists_every_revocation() {
    let ca = ca();
    let a = enroll(&ca, "dev-a", Validity::days(1));
    let b = enroll(&ca, "dev-b", Validity::days(1));
    let mut state = RevocationState::default();
    state.revoke(
        &cert_serial(&a.cert_pem).unwrap(),
        RevocationReason::KeyCompromise,
        None,
        1,
    );
    let first = state.sign_crl(&ca, 7, now()).unwrap();
    state.revoke(
        &cert_serial(&b.cert_pem).unwrap(),
        RevocationReason::CessationOfOperation,
        None,
        2,
    );
    let second = state.sign_crl(&ca, 7, now()).unwrap();
    assert_eq!(state.crl_number, 2);

    let first = VerifiedCrl::parse(&first, ca.cert_pem()).unwrap();
    let second = VerifiedCrl::parse(&second, ca.cert_pem()).unwrap();
    assert_eq!((first.number, second.number), (1, 2));
    assert!(first.is_revoked(&cert_serial(&a.cert_pem).unwrap()));
    assert!(!first.is_revoked(&cert_serial(&b.cert_pem).unwrap()));
    assert!(second.is_revoked(&cert_serial(&a.cert_pem).unwrap()));
    assert!(second.is_revoked(&cert_serial(&b.cert_pem).unwrap()));
    assert!(second.next_update.unwrap() > second.this_update);
}

#[test]
fn a_crl_from_another_ca_or_tampered_with_is_refused() {
    let ours = ca();
    let theirs = ca();
    let mut state = RevocationState::default();
    state.revoke(&[1, 2, 3], RevocationReason::Unspecified, None, 0);
    let foreign = state.sign_crl(&theirs, 7, now()).unwrap();
    // Same subject name, other key: the issuer matches, the signature cannot.
    assert!(matches!(
        VerifiedCrl::parse(&foreign, ours.cert_pem()),
        Err(PkiError::CrlSignature)
    ));

    let genuine = state.sign_crl(&ours, 7, now()).unwrap();
    let mut der = crate::testutil::pem_to_der(&genuine);
    // Flip a bit inside the signed part (the revoked serial 01 02 03 → 01 02 02).
    let at = der
        .windows(3)
        .position(|w| w == [1, 2, 3])
        .expect("serial in the crl");
    der[at + 2] ^= 1;
    let tampered = crate::testutil::der_to_pem("X509 CRL", &der);
    assert!(matches!(
        VerifiedCrl::parse(&tampered, ours.cert_pem()),
        Err(PkiError::CrlSignature)
    ));
    assert!(VerifiedCrl::parse("not a crl", ours.cert_pem()).is_err());
}

#[test]
fn serials_parse_from_hex_with_or_without_colons() {
    assert_eq!(parse_serial_hex("4A:01").unwrap(), vec![0x4a, 0x01]);
    assert_eq!(parse_serial_hex("0a01").unwrap(), vec![0x0a, 0x01]);
    assert_eq!(parse_serial_hex("a01").unwrap(), vec![0x0a, 0x01]);
    for bad in ["", "00", "xyz", &"ab".repeat(21)] {
        assert!(parse_serial_hex(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn reasons_parse_from_their_cli_names() {
    for r in RevocationReason::ALL {
        assert_eq!(r.as_str().parse::<RevocationReason>().unwrap(), r);
    }
    assert!("stolen".parse::<RevocationReason>().is_err());
}

#[test]
fn the_reloadable_verifier_refuses_a_certificate_revoked_after_it_was_built() {
    let ca = ca();
    let server = server_cert(&ca);
    let revoked = enroll(&ca, "dev-revoked", Validity::days(1));
    let other = enroll(&ca, "dev-other", Validity::days(1));
    let verifier = ReloadableClientVerifier::new(ca.cert_pem(), Vec::new()).unwrap();
    let config =
        || server_config_reloadable(verifier.clone(), &server.cert_pem, &server.key_pem).unwrap();
    let client = |d: &crate::testutil::Enrolled| {
        client_config(ca.cert_pem(), &d.cert_pem, &d.key_pem).unwrap()
    };
    let server_side = handshake(client(&revoked), config()).unwrap();
    let der = server_side.peer_certificates().unwrap()[0].clone();
    assert_eq!(parse_identity(&der).unwrap().id, "dev-revoked");

    let mut state = RevocationState::default();
    state.revoke(
        &cert_serial(&revoked.cert_pem).unwrap(),
        RevocationReason::KeyCompromise,
        None,
        0,
    );
    let crl = VerifiedCrl::parse(&state.sign_crl(&ca, 7, now()).unwrap(), ca.cert_pem()).unwrap();
    verifier.set_crls(vec![crl.der]).unwrap();

    let err = handshake(client(&revoked), config()).unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        ),
        "{err:?}"
    );
    assert!(handshake(client(&other), config()).is_ok());
}

#[test]
fn files_are_replaced_atomically_and_keep_their_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crl.pem");
    write_file_atomically(&path, b"one", 0o600).unwrap();
    write_file_atomically(&path, b"two", 0o600).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"two");
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
