//! Vetting a certificate signing request before the CA signs anything: the signature must verify,
//! the key must be P-256, the subject must hold exactly one CN, and the requested SANs are read
//! out for the caller to judge. Nothing else a CSR asks for is ever looked at, let alone copied.

use rcgen::{PublicKeyData, SubjectPublicKeyInfo, PKCS_ECDSA_P256_SHA256};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_PKCS9_EXTENSION_REQUEST, OID_X509_EXT_SUBJECT_ALT_NAME};
use x509_parser::prelude::FromDer;

use crate::profile::{only_value, SanName};
use crate::{pem, PkiError};

/// What a CSR that passed vetting contributes to a certificate.
pub(crate) struct VettedCsr {
    /// The subject's only common name, not yet validated as any kind of id.
    pub common_name: String,
    /// Every requested subject alternative name, in order.
    pub sans: Vec<SanName>,
    /// The requester's P-256 public key, proven held by the CSR's signature.
    pub public_key: SubjectPublicKeyInfo,
}

/// Parses `csr_pem` and checks its signature, key algorithm and common name.
pub(crate) fn vet(csr_pem: &str) -> Result<VettedCsr, PkiError> {
    let der = pem::parse_csr(csr_pem)?;
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| PkiError::CsrParse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::CsrParse(
            "trailing bytes after the request".into(),
        ));
    }
    csr.verify_signature().map_err(|_| PkiError::CsrSignature)?;

    let info = &csr.certification_request_info;
    let key_error = || PkiError::KeyAlgorithm {
        what: "certificate signing request",
    };
    let public_key =
        SubjectPublicKeyInfo::from_der(info.subject_pki.raw).map_err(|_| key_error())?;
    if public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(key_error());
    }
    let common_name = only_value(
        info.subject.iter_common_name(),
        "common name",
        PkiError::CommonNameCount,
    )?;

    Ok(VettedCsr {
        common_name: common_name.to_owned(),
        sans: requested_sans(&csr)?,
        public_key,
    })
}

fn requested_sans(csr: &X509CertificationRequest<'_>) -> Result<Vec<SanName>, PkiError> {
    let mut sans = Vec::new();
    let mut extension_requests = 0;
    for attribute in csr.certification_request_info.iter_attributes() {
        if attribute.oid != OID_PKCS9_EXTENSION_REQUEST {
            continue;
        }
        extension_requests += 1;
        let ParsedCriAttribute::ExtensionRequest(request) = attribute.parsed_attribute() else {
            return Err(PkiError::CsrParse("unreadable extension request".into()));
        };
        for extension in &request.extensions {
            if extension.oid != OID_X509_EXT_SUBJECT_ALT_NAME {
                continue;
            }
            let ParsedExtension::SubjectAlternativeName(san) = extension.parsed_extension() else {
                return Err(PkiError::MalformedSan(
                    "unreadable subject alternative name".into(),
                ));
            };
            sans.extend(san.general_names.iter().map(|name| match name {
                GeneralName::URI(uri) => SanName::Uri((*uri).to_owned()),
                other => SanName::Other(other.to_string()),
            }));
        }
    }
    // Two extension requests could be read differently by two parsers; refuse the ambiguity.
    if extension_requests > 1 {
        return Err(PkiError::CsrParse("more than one extension request".into()));
    }
    Ok(sans)
}
