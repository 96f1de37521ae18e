//! Data directory set-up as `aloft init` does it.

use std::sync::Arc;

use aloft_vault::{Protection, RecoveryKey};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{ServerName, UnixTime};

use super::init;
use crate::config::layout;

#[test]
fn a_data_directory_made_for_a_host_name_still_serves_localhost_and_127_0_0_1() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let protection = Protection::recovery_key(RecoveryKey::generate().unwrap());
    init(&data, "t", &["updates.example.com".to_owned()], &protection).unwrap();
    let pki = data.join(layout::PKI_DIR);
    let read = |f: &str| std::fs::read_to_string(pki.join(f)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(aloft_certs::tls::parse_cert(&read(aloft_certs::CA_CERT_FILE)).unwrap())
        .unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build()
    .unwrap();
    let server = aloft_certs::tls::parse_cert(&read(layout::SERVER_CERT)).unwrap();
    let verify = |name: &'static str| {
        verifier.verify_server_cert(
            &server,
            &[],
            &ServerName::try_from(name).unwrap(),
            &[],
            UnixTime::now(),
        )
    };
    for name in ["updates.example.com", "localhost", "127.0.0.1"] {
        assert!(
            verify(name).is_ok(),
            "the server certificate must carry {name}"
        );
    }
    assert!(verify("elsewhere.example.com").is_err());
}
