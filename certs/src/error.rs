//! `PkiError`, the one error type of this crate: every way creating, loading, issuing, parsing or
//! configuring TLS can fail, named for what failed.

use std::path::PathBuf;

use aloft_proto::IdError;

/// Everything that can go wrong in the fleet PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating a p-256 key pair failed: {0}")]
    KeyGeneration(#[source] rcgen::Error),
    #[error("signing failed: {0}")]
    Signing(#[source] rcgen::Error),
    #[error("gathering randomness for a serial number failed: {0}")]
    Randomness(getrandom::Error),
    #[error("validity window is empty: not_after must be later than not_before")]
    EmptyValidity,
    #[error("ca common name must not be empty")]
    EmptyCaName,

    #[error("reading {path} failed: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path} failed: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite an existing ca")]
    AlreadyExists(PathBuf),
    #[error("ca key is not a usable p-256 private key: {0}")]
    CaKey(#[source] rcgen::Error),
    #[error("private key is not a usable p-256 key: {0}")]
    PrivateKey(#[source] rcgen::Error),
    #[error("ca key does not belong to the ca certificate")]
    CaKeyMismatch,
    #[error("ca certificate is not a ca (basic constraints missing or ca=false)")]
    NotACa,

    #[error("no {what} found in pem input")]
    PemMissing { what: &'static str },
    #[error("pem input holds {count} {what} blocks where exactly one is expected")]
    PemCount { what: &'static str, count: usize },
    #[error("{what} pem is malformed: {reason}")]
    PemMalformed { what: &'static str, reason: String },
    #[error("certificate is not valid x.509: {0}")]
    CertificateParse(String),
    #[error("bad signature: {0}")]
    BadSignature(&'static str),
    #[error("certificate signing request is not valid: {0}")]
    CsrParse(String),
    #[error("certificate signing request signature does not verify")]
    CsrSignature,
    #[error("{what} key is not ecdsa p-256")]
    KeyAlgorithm { what: &'static str },

    #[error("subject must hold exactly one common name, found {0}")]
    CommonNameCount(usize),
    #[error("subject must hold exactly one organizational unit, found {0}")]
    OrganizationalUnitCount(usize),
    #[error("subject {attribute} is not a readable string")]
    SubjectEncoding { attribute: &'static str },
    #[error("organizational unit {0:?} names no aloft role")]
    UnknownRole(String),
    #[error("unknown operator role {0:?} (expected viewer, operator or security-admin)")]
    UnknownOperatorRole(String),
    #[error("subject carries {0} role attributes (an operator certificate carries at most one, other certificates none)")]
    OperatorRoleCount(usize),
    #[error("common name is not a valid device id: {0}")]
    InvalidDeviceId(#[source] IdError),
    #[error("common name is not a valid operator id: {0}")]
    InvalidOperatorId(#[source] IdError),

    #[error("no urn:aloft:x25519 uri among the subject alternative names")]
    MissingX25519Key,
    #[error("more than one urn:aloft:x25519 uri among the subject alternative names")]
    DuplicateX25519Key,
    #[error("malformed x25519 uri {0:?}: expected urn:aloft:x25519: and 64 lowercase hex digits")]
    MalformedX25519Key(String),
    #[error("subject alternative name {0} is not allowed here")]
    UnexpectedSan(String),
    #[error("subject alternative names are malformed: {0}")]
    MalformedSan(String),

    #[error("a server certificate needs at least one hostname")]
    NoHostnames,
    #[error("hostname {0:?} is neither an ip address nor a dns name")]
    InvalidHostname(String),

    #[error("revocation state is not valid: {0}")]
    RevocationState(String),
    #[error("{0:?} is not a revocation reason (unspecified, key-compromise, affiliation-changed, superseded, cessation-of-operation)")]
    InvalidRevocationReason(String),
    #[error("{0:?} is not a certificate serial number (hex, up to 20 bytes, not zero)")]
    InvalidSerial(String),
    #[error("crl number cannot grow any further")]
    CrlNumberExhausted,
    #[error("crl is not valid: {0}")]
    InvalidCrl(String),
    #[error("crl was not issued by the fleet ca")]
    CrlIssuer,
    #[error("crl signature does not verify with the fleet ca's key")]
    CrlSignature,
    #[error("certificate does not hold the expected key or identity: {0}")]
    CertificateMismatch(&'static str),
    #[error("the csr carries another x25519 key than the device's current certificate; renewal keeps the x25519 key (rotate it by re-enrolling through the operator)")]
    X25519KeyChanged,
    #[error("the issuance ledger is not valid: {0}")]
    Ledger(String),

    #[error("building the tls configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("building the client certificate verifier failed: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
}
