//! rustls configurations for every Aloft TLS endpoint: the orchestrator's mTLS front (TLS 1.3,
//! client certificate required, verified against the fleet CA and its CRLs) and the clients,
//! device agent and operator CLI, which trust the fleet CA and nothing else.

use std::sync::Arc;

use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::CertificateRevocationListDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub use crate::pem::{parse_cert, parse_certs, parse_crl, parse_private_key};
use crate::PkiError;

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
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(parse_certs(cert_pem)?, parse_private_key(key_pem)?)?)
}

/// A device's or operator's connection: TLS 1.3 only, trusting only the fleet CA, presenting
/// `cert_pem`/`key_pem`.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ClientConfig, PkiError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(fleet_roots(ca_pem)?)
        .with_client_auth_cert(parse_certs(cert_pem)?, parse_private_key(key_pem)?)?)
}

/// A client that trusts the fleet CA but presents no certificate; the server must refuse it.
pub fn client_config_without_cert(ca_pem: &str) -> Result<ClientConfig, PkiError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(fleet_roots(ca_pem)?)
        .with_no_client_auth())
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
