//! Fixtures shared by the unit tests: a CA, enrolled devices, hand-made CSRs and certificates,
//! and an in-memory TLS handshake between a `ClientConnection` and a `ServerConnection`.

use std::sync::Arc;

use aloft_proto::DeviceId;
use base64::Engine;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use crate::{device_csr, FleetCa, IssuedKeyPair, Validity};

pub fn ca() -> FleetCa {
    FleetCa::create("Aloft Test Fleet CA", 30).expect("create test ca")
}

/// A recognisable X25519 public key for device number `n`.
pub fn x25519(n: u8) -> [u8; 32] {
    let mut key = [n; 32];
    key[0] = 0xa1;
    key
}

/// A device that went through enrollment: its key, its certificate, its X25519 key.
pub struct Enrolled {
    pub key_pem: String,
    pub cert_pem: String,
    pub x25519: [u8; 32],
}

pub fn enroll(ca: &FleetCa, id: &str, validity: Validity) -> Enrolled {
    let x25519 = x25519(7);
    let csr = device_csr(&DeviceId::new(id).expect("test id"), &x25519).expect("device csr");
    let cert_pem = ca
        .issue_device(&csr.csr_pem, validity)
        .expect("issue device");
    Enrolled {
        key_pem: csr.key_pem,
        cert_pem,
        x25519,
    }
}

pub fn server_cert(ca: &FleetCa) -> IssuedKeyPair {
    ca.issue_server(
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        Validity::days(1),
    )
    .expect("issue server")
}

pub fn p256_key() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("p-256 key")
}

/// Certificate parameters with the given subject attributes, in order. A `CustomDnType` with
/// the CN or OU OID gives a second CN or OU, which rcgen's typed API cannot express.
pub fn params_with_subject(attributes: &[(DnType, &str)]) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    for (ty, value) in attributes {
        dn.push(ty.clone(), *value);
    }
    params.distinguished_name = dn;
    params
}

pub fn csr_pem(params: &CertificateParams, key: &KeyPair) -> String {
    params
        .serialize_request(key)
        .expect("serialize csr")
        .pem()
        .expect("csr pem")
}

/// Signs `params` with the CA directly, bypassing the issuing checks: how a certificate that
/// Aloft would never issue reaches `parse_identity` in a test.
pub fn signed_by_ca(ca: &FleetCa, params: &CertificateParams) -> Vec<u8> {
    params
        .signed_by(&p256_key(), &ca.issuer)
        .expect("sign")
        .der()
        .to_vec()
}

pub fn pem_to_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("base64")
}

pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// Runs a TLS handshake between the two configs entirely in memory. Returns the server side on
/// success, so a test can read what the server learned; otherwise the first error either side
/// raised.
pub fn handshake(
    client: ClientConfig,
    server: ServerConfig,
) -> Result<ServerConnection, rustls::Error> {
    let name = ServerName::try_from("localhost").expect("server name");
    let mut client = Connection::Client(ClientConnection::new(Arc::new(client), name)?);
    let mut server = Connection::Server(ServerConnection::new(Arc::new(server))?);
    // A TLS 1.3 handshake with client auth takes two round trips; allow some slack.
    for _ in 0..8 {
        pump(&mut client, &mut server)?;
        pump(&mut server, &mut client)?;
        if !client.is_handshaking() && !server.is_handshaking() {
            let Connection::Server(server) = server else {
                unreachable!()
            };
            return Ok(server);
        }
    }
    panic!("handshake made no progress");
}

fn pump(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).expect("write to vec");
    }
    let mut slice = bytes.as_slice();
    while !slice.is_empty() {
        to.read_tls(&mut slice).expect("read from slice");
        to.process_new_packets()?;
    }
    Ok(())
}
