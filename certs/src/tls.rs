//! rustls configurations for every Aloft TLS endpoint: the orchestrator's mTLS front (TLS 1.3,
//! client certificate required, verified against the fleet CA and its CRLs) and the clients,
//! device agent and operator CLI, which trust the fleet CA and nothing else; and, in
//! [`stream`], the TLS stream the front and the simulated devices run those configs over.

use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};

pub use crate::pem::{parse_cert, parse_certs, parse_crl, parse_private_key};
use crate::PkiError;

pub mod stream;

/// Makes aws-lc-rs the process-wide rustls provider, for code that builds its own configs.
/// Calling it again, or after someone else installed a provider, does nothing.
pub fn install_crypto_provider() {
    // The only error is "a provider is already installed", which is the state we want.
    let _ = aws_lc_rs::default_provider().install_default();
}

/// Our configs name their provider explicitly rather than relying on the process default, so
/// they behave the same whatever else the process has installed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// A trust store holding the fleet CA certificate(s) in `ca_pem` and nothing else.
fn fleet_roots(ca_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// Most plaintext bytes the orchestrator's listener puts in one TLS record (PROTOCOL.md §2.1).
/// TLS allows 16 KiB. With 4 KiB a device needs a TLS input buffer of only 4 KiB (mbedTLS's
/// `MBEDTLS_SSL_IN_CONTENT_LEN` on small parts; the TLS maximum-fragment-length extension,
/// which rustls does not offer, is how a device would otherwise ask for it), and the
/// simulator's rustls read buffers shrink with it: 5.5 KiB less per simulated device during a
/// campaign (docs/BENCHMARKS.md). The cost: about 3% more CPU for the whole fleet in paired
/// runs (four records to seal and open per 16 KiB chunk frame instead of two), and 66 bytes
/// of record overhead per frame.
pub const MAX_RECORD_PLAINTEXT: usize = 4096;

/// The orchestrator's listener: TLS 1.3 only, presenting `cert_pem`/`key_pem`, and requiring a
/// client certificate issued by the fleet CA and not revoked by any of `crls_der`.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    crls_der: Vec<CertificateRevocationListDer<'static>>,
) -> Result<ServerConfig, PkiError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(fleet_roots(ca_pem)?, provider.clone())
            .with_crls(crls_der)
            .build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(parse_certs(cert_pem)?, parse_private_key(key_pem)?)?;
    cfg.max_fragment_size = Some(MAX_RECORD_PLAINTEXT);
    Ok(cfg)
}

/// The front's client certificate verifier, whose CRLs can be replaced while the server runs:
/// every handshake that starts after [`ReloadableClientVerifier::set_crls`] returns is checked
/// against the new CRLs, with no restart and no new `ServerConfig`.
///
/// Design: rustls asks one `ClientCertVerifier` per handshake and offers no way to swap it in a
/// live `ServerConfig`, so this wrapper holds the current `WebPkiClientVerifier` behind a lock
/// and delegates to it. The lock is held only to clone an `Arc`, never across verification.
#[derive(Debug)]
pub struct ReloadableClientVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    /// The fleet CA's subject, offered to clients as the acceptable issuer. It does not change
    /// with the CRLs, so it is kept here where `root_hint_subjects` can lend it out.
    hints: Vec<DistinguishedName>,
    current: RwLock<Arc<dyn ClientCertVerifier>>,
}

impl ReloadableClientVerifier {
    /// A verifier for clients of the fleet CA in `ca_pem`, enforcing `crls_der`.
    pub fn new(
        ca_pem: &str,
        crls_der: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<Arc<Self>, PkiError> {
        let roots = fleet_roots(ca_pem)?;
        let provider = provider();
        let first = Self::build(&roots, &provider, crls_der)?;
        Ok(Arc::new(ReloadableClientVerifier {
            hints: first.root_hint_subjects().to_vec(),
            roots,
            provider,
            current: RwLock::new(first),
        }))
    }

    fn build(
        roots: &Arc<RootCertStore>,
        provider: &Arc<CryptoProvider>,
        crls_der: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
        Ok(
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .with_crls(crls_der)
                .build()?,
        )
    }

    /// Replaces the CRLs for every handshake from now on. On error the old ones stay.
    pub fn set_crls(
        &self,
        crls_der: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<(), PkiError> {
        let next = Self::build(&self.roots, &self.provider, crls_der)?;
        // A poisoned lock only means a panic elsewhere while swapping an Arc: the value is whole.
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// Verifies a DER client certificate that arrived outside a handshake (an operator's signed
    /// request) exactly as the next handshake would: chain to the fleet CA, validity now,
    /// client-auth usage, the CRLs in force. Returns the identity it asserts.
    pub fn verify_der(&self, cert_der: &[u8]) -> Result<crate::CertIdentity, PkiError> {
        let leaf = CertificateDer::from(cert_der);
        self.current()
            .verify_client_cert(&leaf, &[], rustls::pki_types::UnixTime::now())?;
        crate::parse_identity(cert_der)
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ClientCertVerifier for ReloadableClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// The orchestrator's listener like [`server_config`], verifying clients with `verifier`, whose
/// CRLs can be replaced later.
pub fn server_config_reloadable(
    verifier: Arc<ReloadableClientVerifier>,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ServerConfig, PkiError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(parse_certs(cert_pem)?, parse_private_key(key_pem)?)?;
    cfg.max_fragment_size = Some(MAX_RECORD_PLAINTEXT);
    Ok(cfg)
}

/// The console's client verifier: the front's (fleet CA, the CRLs in force, replaced with
/// them), except that a client may present no certificate at all; the console then asks for a
/// viewer token. A certificate that is presented must verify, or the handshake fails.
#[derive(Debug)]
struct OptionalClientCert(Arc<ReloadableClientVerifier>);

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The web console's HTTPS listener: TLS 1.3 only, the orchestrator's server certificate,
/// HTTP/1.1 by ALPN, and an optional client certificate checked like the front's (`verifier`,
/// CRLs included).
pub fn console_server_config(
    verifier: Arc<ReloadableClientVerifier>,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ServerConfig, PkiError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(OptionalClientCert(verifier)))
        .with_single_cert(parse_certs(cert_pem)?, parse_private_key(key_pem)?)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A device's or operator's connection: TLS 1.3 only, trusting only the fleet CA, presenting
/// `cert_pem`/`key_pem`.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ClientConfig, PkiError> {
    client_config_with(provider(), ca_pem, cert_pem, key_pem)
}

/// A TLS 1.3 client of the fleet CA presenting `cert_pem`, on `provider`'s suites and groups.
fn client_config_with(
    provider: Arc<CryptoProvider>,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ClientConfig, PkiError> {
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(fleet_roots(ca_pem)?)
        .with_client_auth_cert(parse_certs(cert_pem)?, parse_private_key(key_pem)?)?)
}

/// A simulated device's client: [`client_config`] offering only what microcontroller TLS stacks
/// (mbedTLS, wolfSSL) offer by default, TLS_AES_128_GCM_SHA256 over X25519 or P-256, instead
/// of rustls' defaults (AES-256 with SHA-384 first, and the X25519MLKEM768 hybrid). The server
/// still accepts every suite and group; this only makes a simulated handshake cost what a real
/// device's does: at 10,000 devices, SHA-384 without hardware support and the ML-KEM
/// key share were a tenth of the connect storm's CPU.
pub fn device_client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ClientConfig, PkiError> {
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
    provider.kx_groups = vec![aws_lc_rs::kx_group::X25519, aws_lc_rs::kx_group::SECP256R1];
    client_config_with(Arc::new(provider), ca_pem, cert_pem, key_pem)
}

/// A client that trusts the fleet CA but presents no certificate; the server must refuse it.
pub fn client_config_without_cert(ca_pem: &str) -> Result<ClientConfig, PkiError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(fleet_roots(ca_pem)?)
        .with_no_client_auth())
}

/// (1.5) A device's client for an untrusted download origin: trusts only the CA certificates
/// in `anchors_pem` (the device's origin trust anchors), presents no certificate, offers
/// HTTP/1.1, and accepts TLS 1.2 as well as 1.3 (CDNs and buckets are not all on 1.3; the
/// chunks' integrity rests on the signed manifest, not on this channel).
pub fn origin_client_config(anchors_pem: &str) -> Result<ClientConfig, PkiError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(fleet_roots(anchors_pem)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(4);
    Ok(cfg)
}

/// Verifies `cert_pem` exactly as the TLS front would verify a client certificate (chain to the
/// fleet CA, validity now, client-auth usage, not revoked by `crls_der`) and returns the identity
/// it asserts. Used where a certificate arrives outside a handshake, e.g. device registration.
pub fn verify_client_cert(
    ca_pem: &str,
    cert_pem: &str,
    crls_der: Vec<CertificateRevocationListDer<'static>>,
) -> Result<crate::CertIdentity, PkiError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(fleet_roots(ca_pem)?, provider())
        .with_crls(crls_der)
        .build()?;
    let certs = parse_certs(cert_pem)?;
    let Some((leaf, intermediates)) = certs.split_first() else {
        return Err(PkiError::Tls(rustls::Error::NoCertificatesPresented));
    };
    verifier.verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())?;
    crate::parse_identity(leaf)
}

#[cfg(test)]
mod tests;
