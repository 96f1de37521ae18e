use rustls::{CertificateError, ProtocolVersion};
use time::{Duration, OffsetDateTime};

use super::*;
use crate::testutil::{ca, enroll, handshake, server_cert};
use crate::{cert_serial, parse_identity, FleetCa, Role, Validity};

fn front(ca: &FleetCa, crls: Vec<CertificateRevocationListDer<'static>>) -> ServerConfig {
    let server = server_cert(ca);
    server_config(ca.cert_pem(), &server.cert_pem, &server.key_pem, crls).unwrap()
}

fn rejected_cert(result: Result<rustls::ServerConnection, rustls::Error>) -> rustls::Error {
    match result {
        Ok(_) => panic!("handshake succeeded"),
        Err(err) => err,
    }
}

#[test]
fn device_completes_tls13_handshake_and_the_server_learns_its_identity() {
    let ca = ca();
    let device = enroll(&ca, "dev-042", Validity::days(1));
    let client = client_config(ca.cert_pem(), &device.cert_pem, &device.key_pem).unwrap();

    let server = handshake(client, front(&ca, Vec::new())).unwrap();
    assert_eq!(server.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    let peer = server.peer_certificates().unwrap();
    let identity = parse_identity(&peer[0]).unwrap();
    assert_eq!(identity.role, Role::Device);
    assert_eq!(identity.id, "dev-042");
    assert_eq!(identity.x25519, Some(device.x25519));
}

#[test]
fn operator_completes_the_handshake_too() {
    let ca = ca();
    let op = ca
        .issue_operator(
            &aloft_proto::OperatorId::new("alice").unwrap(),
            crate::OperatorRole::Operator,
            Validity::days(1),
        )
        .unwrap();
    let client = client_config(ca.cert_pem(), &op.cert_pem, &op.key_pem).unwrap();
    let server = handshake(client, front(&ca, Vec::new())).unwrap();
    let identity = parse_identity(&server.peer_certificates().unwrap()[0]).unwrap();
    assert_eq!(identity.operator_id().unwrap().as_str(), "alice");
}

#[test]
fn client_without_a_certificate_is_refused() {
    let ca = ca();
    let client = client_config_without_cert(ca.cert_pem()).unwrap();
    let err = rejected_cert(handshake(client, front(&ca, Vec::new())));
    assert!(
        matches!(err, rustls::Error::NoCertificatesPresented),
        "{err:?}"
    );
}

/// Other CAs to test against: one with its own name, and an impostor that copies our CA's name,
/// which webpki then rejects on the signature instead of the issuer name.
fn other_cas() -> [FleetCa; 2] {
    [
        FleetCa::create("Someone Else's CA", 30).unwrap(),
        FleetCa::create("Aloft Test Fleet CA", 30).unwrap(),
    ]
}

fn is_foreign(err: &rustls::Error) -> bool {
    matches!(
        err,
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature
        )
    )
}

#[test]
fn cert_from_another_ca_fails_the_handshake() {
    let ours = ca();
    for theirs in other_cas() {
        let intruder = enroll(&theirs, "dev-042", Validity::days(1));
        // The intruder even trusts our CA, so only its own certificate can fail it.
        let client = client_config(ours.cert_pem(), &intruder.cert_pem, &intruder.key_pem).unwrap();
        let err = rejected_cert(handshake(client, front(&ours, Vec::new())));
        assert!(is_foreign(&err), "{err:?}");
    }
}

#[test]
fn expired_cert_fails_the_handshake() {
    let ca = ca();
    let now = OffsetDateTime::now_utc();
    let past = Validity {
        not_before: now - Duration::days(10),
        not_after: now - Duration::days(1),
    };
    let device = enroll(&ca, "dev-042", past);
    let client = client_config(ca.cert_pem(), &device.cert_pem, &device.key_pem).unwrap();
    let err = rejected_cert(handshake(client, front(&ca, Vec::new())));
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[test]
fn revoked_cert_fails_the_handshake_and_others_still_pass() {
    let ca = ca();
    let revoked = enroll(&ca, "dev-lost", Validity::days(1));
    let kept = enroll(&ca, "dev-kept", Validity::days(1));
    let crl = ca
        .crl(&[cert_serial(&revoked.cert_pem).unwrap()], 1, 7)
        .unwrap();

    let client = client_config(ca.cert_pem(), &revoked.cert_pem, &revoked.key_pem).unwrap();
    let err = rejected_cert(handshake(client, front(&ca, vec![crl.clone()])));
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        ),
        "{err:?}"
    );

    let client = client_config(ca.cert_pem(), &kept.cert_pem, &kept.key_pem).unwrap();
    assert!(handshake(client, front(&ca, vec![crl])).is_ok());
}

#[test]
fn client_refuses_a_server_from_another_ca() {
    let ours = ca();
    let device = enroll(&ours, "dev-042", Validity::days(1));
    for theirs in other_cas() {
        let client = client_config(ours.cert_pem(), &device.cert_pem, &device.key_pem).unwrap();
        let err = rejected_cert(handshake(client, front(&theirs, Vec::new())));
        assert!(is_foreign(&err), "{err:?}");
    }
}

#[test]
fn device_cert_cannot_serve_as_the_server() {
    let ca = ca();
    let device = enroll(&ca, "dev-042", Validity::days(1));
    let impostor =
        server_config(ca.cert_pem(), &device.cert_pem, &device.key_pem, Vec::new()).unwrap();
    let client = client_config(ca.cert_pem(), &device.cert_pem, &device.key_pem).unwrap();
    assert!(handshake(client, impostor).is_err());
}

#[test]
fn server_refuses_a_tls12_client() {
    let ca = ca();
    let device = enroll(&ca, "dev-042", Validity::days(1));
    let tls12 = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(fleet_roots(ca.cert_pem()).unwrap())
        .with_client_auth_cert(
            parse_certs(&device.cert_pem).unwrap(),
            parse_private_key(&device.key_pem).unwrap(),
        )
        .unwrap();
    let err = rejected_cert(handshake(tls12, front(&ca, Vec::new())));
    assert!(matches!(err, rustls::Error::PeerIncompatible(_)), "{err:?}");
}

#[test]
fn bad_pem_inputs_give_clear_errors() {
    let ca = ca();
    let device = enroll(&ca, "dev-042", Validity::days(1));
    assert!(matches!(
        client_config("", &device.cert_pem, &device.key_pem),
        Err(PkiError::PemMissing {
            what: "certificate"
        })
    ));
    assert!(matches!(
        client_config(ca.cert_pem(), &device.cert_pem, ca.cert_pem()),
        Err(PkiError::PemMissing {
            what: "private key"
        })
    ));
}

#[test]
fn installing_the_crypto_provider_twice_is_harmless() {
    install_crypto_provider();
    install_crypto_provider();
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
}

#[test]
fn verify_client_cert_accepts_fleet_devices_and_refuses_strangers() {
    let ca = crate::testutil::ca();
    let dev = crate::testutil::enroll(&ca, "dev-1", crate::Validity::days(1));
    let id = super::verify_client_cert(ca.cert_pem(), &dev.cert_pem, Vec::new()).unwrap();
    assert_eq!(id.device_id().unwrap().as_str(), "dev-1");
    let other = crate::testutil::ca();
    assert!(super::verify_client_cert(other.cert_pem(), &dev.cert_pem, Vec::new()).is_err());
}

/// PROTOCOL.md §2.1: the listener's records carry at most `MAX_RECORD_PLAINTEXT` bytes, so a
/// device with a 4 KiB TLS input buffer receives a 16 KiB chunk frame.
#[test]
fn the_listener_sends_records_of_at_most_4_kib() {
    use std::io::Write;
    let ca = ca();
    let device = enroll(&ca, "dev-042", Validity::days(1));
    let client = client_config(ca.cert_pem(), &device.cert_pem, &device.key_pem).unwrap();
    let mut server = handshake(client, front(&ca, Vec::new())).unwrap();
    server.writer().write_all(&[7u8; 16 * 1024]).unwrap();
    let mut wire = Vec::new();
    while server.wants_write() {
        server.write_tls(&mut wire).unwrap();
    }
    // TLS 1.3 records: type, version, 2-byte length, then the sealed inner plaintext (content,
    // its type byte, a 16-byte tag).
    let mut lengths = Vec::new();
    let mut rest = wire.as_slice();
    while rest.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        lengths.push(len);
        rest = &rest[5 + len..];
    }
    assert!(rest.is_empty());
    assert!(lengths.len() >= 4, "{lengths:?}");
    assert!(
        lengths.iter().all(|&l| l <= MAX_RECORD_PLAINTEXT + 1 + 16),
        "{lengths:?}"
    );
}
