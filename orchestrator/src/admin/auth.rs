//! Signed admin requests (1.5, PROTOCOL.md §11.1a): the operator signs each request with its
//! certificate's key and sends the certificate with it, so that the orchestrator knows the
//! operator's role from the request itself, not from a session it may no longer see.
//!
//! Why: with an external broker the orchestrator never sees the operator's handshake, and even
//! behind the embedded front the session that carried a request may be gone by the time the
//! engine reads it (a CLI publishes and disconnects). A signature also means that whoever runs
//! the broker cannot act as an operator: it can drop or replay requests, not forge them, and a
//! replay is refused by the window below.
//!
//! The client side is [`RequestSigner`]; the orchestrator side is [`Authenticator`], which runs
//! on the broker link's task (certificate and signature checks are kept off the engine's task)
//! and hands the engine an [`AdminAuth`] with each request.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use aloft_certs::tls::ReloadableClientVerifier;
use aloft_certs::{OperatorRole, PkiError};
use aloft_proto::OperatorId;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::wire::AdminBody;

/// How far a request's `ts` may be from the orchestrator's clock, either way.
pub const MAX_SKEW_MS: u64 = 5 * 60 * 1000;
/// Largest certificate a request may carry (DER; an operator certificate is under 1 KiB).
pub const MAX_CERT_BYTES: usize = 4096;
/// Most signed requests remembered for replay detection; beyond it new signed requests are
/// refused (`replay_window_full`) until old ones age out, rather than forgotten early.
pub const REPLAY_CAPACITY: usize = 200_000;
/// Most of them from one operator, so that one operator's flood (a stolen key) cannot lock the
/// others out: a release of 64 MiB in 16 KiB chunks is 4,096 requests.
pub const REPLAY_PER_OPERATOR: usize = 50_000;
/// Separates this signature from every other use of an operator key.
const DOMAIN: &[u8] = b"aloft-admin-request-v1";

/// The `auth` member of a signed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestAuth {
    /// The operator certificate, DER, standard base64.
    pub cert: String,
    /// When the request was signed, Unix milliseconds.
    pub ts: u64,
    /// ECDSA P-256 SHA-256 signature (ASN.1 DER), standard base64, over [`signing_input`].
    pub sig: String,
}

/// What the signature covers: the domain, the operator id of the request topic, the request id,
/// `ts` in decimal, and the `body` member exactly as it appears in the payload, each followed by
/// a line feed except the body.
pub fn signing_input(operator: &OperatorId, id: &str, ts: u64, body_json: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body_json.len() + 128);
    for part in [DOMAIN, operator.as_str().as_bytes(), id.as_bytes()] {
        m.extend_from_slice(part);
        m.push(b'\n');
    }
    m.extend_from_slice(ts.to_string().as_bytes());
    m.push(b'\n');
    m.extend_from_slice(body_json);
    m
}

/// What the engine learns about who sent an admin request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAuth {
    /// Unsigned (a client before 1.5): the role of the certificate of the operator's live front
    /// session, if there is one, else `None` (a viewer).
    Session(Option<OperatorRole>),
    /// Signed by a valid, unrevoked certificate of this operator, with this role. `repeat`: the
    /// same request (operator and id) was seen within the replay window: QoS 1 redelivery, or
    /// a replay. The engine answers it from its reply cache, or refuses it; never runs it again.
    Signed {
        role: Option<OperatorRole>,
        repeat: bool,
    },
    /// Signed, but not acceptably: refused with this reason, and nothing of it is run.
    Refused(&'static str),
}

/// Signs requests with an operator profile's certificate and key.
pub struct RequestSigner {
    operator: OperatorId,
    cert_b64: String,
    key: aloft_certs::signature::MessageKey,
}

impl RequestSigner {
    pub fn new(operator: OperatorId, cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let der = aloft_certs::tls::parse_cert(cert_pem)?;
        Ok(Self {
            operator,
            cert_b64: B64.encode(der.as_ref()),
            key: aloft_certs::signature::MessageKey::from_pem(key_pem)?,
        })
    }

    /// A signer for the profile directory `dir` (as `aloft pki issue-operator` writes it).
    pub fn from_profile(dir: &Path) -> anyhow::Result<Self> {
        use super::client::{PROFILE_CERT, PROFILE_KEY};
        let cert = std::fs::read_to_string(dir.join(PROFILE_CERT))?;
        let key = std::fs::read_to_string(dir.join(PROFILE_KEY))?;
        let der = aloft_certs::tls::parse_cert(&cert)?;
        let operator = aloft_certs::parse_identity(&der)?
            .operator_id()
            .ok_or_else(|| anyhow::anyhow!("{} is not an operator certificate", dir.display()))?;
        Ok(Self::new(operator, &cert, &key)?)
    }

    /// The `auth` for request `id` with `body`, signed now (`now_ms`).
    pub fn sign(&self, id: &str, body: &AdminBody, now_ms: u64) -> Result<RequestAuth, PkiError> {
        // The body's bytes inside the request are exactly its own compact serialization.
        let body_json = serde_json::to_vec(body)
            .map_err(|_| PkiError::BadSignature("the request body does not serialize"))?;
        let msg = signing_input(&self.operator, id, now_ms, &body_json);
        let sig = self.key.sign(&msg)?;
        Ok(RequestAuth {
            cert: self.cert_b64.clone(),
            ts: now_ms,
            sig: B64.encode(sig),
        })
    }
}

/// The members of a request the check needs, the body kept as the bytes that were signed.
#[derive(Deserialize)]
struct Envelope<'a> {
    id: String,
    #[serde(borrow)]
    body: &'a RawValue,
    #[serde(default)]
    auth: Option<RequestAuth>,
}

/// Checks signed requests on the broker link's task, before the engine sees them.
pub struct Authenticator {
    /// The same verifier, with the same CRLs, as the front's handshakes (embedded broker), or
    /// one of its own that the engine keeps up to date (external broker).
    verifier: Arc<ReloadableClientVerifier>,
    replay: Mutex<ReplayWindow>,
}

impl Authenticator {
    pub fn new(verifier: Arc<ReloadableClientVerifier>) -> Self {
        Self {
            verifier,
            replay: Mutex::new(ReplayWindow::default()),
        }
    }

    /// Replaces the CRLs certificates are checked against (the engine calls it with each CRL).
    pub fn set_crls(
        &self,
        crls: Vec<aloft_certs::CertificateRevocationListDer<'static>>,
    ) -> Result<(), PkiError> {
        self.verifier.set_crls(crls)
    }

    /// Who sent `payload` on `operator`'s request topic. A payload that does not parse is
    /// `Session(None)`: the engine refuses it as malformed with its own reason.
    pub fn check(&self, operator: &OperatorId, payload: &[u8], now_ms: u64) -> AdminAuth {
        let Ok(env) = serde_json::from_slice::<Envelope<'_>>(payload) else {
            return AdminAuth::Session(None);
        };
        let Some(auth) = env.auth else {
            return AdminAuth::Session(None);
        };
        match self.verify(operator, &env.id, env.body.get().as_bytes(), &auth, now_ms) {
            Ok(role) => {
                let repeat = self
                    .replay
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(operator, &env.id, now_ms);
                match repeat {
                    Ok(repeat) => AdminAuth::Signed { role, repeat },
                    Err(why) => AdminAuth::Refused(why),
                }
            }
            Err(why) => AdminAuth::Refused(why),
        }
    }

    fn verify(
        &self,
        operator: &OperatorId,
        id: &str,
        body: &[u8],
        auth: &RequestAuth,
        now_ms: u64,
    ) -> Result<Option<OperatorRole>, &'static str> {
        if auth.ts.abs_diff(now_ms) > MAX_SKEW_MS {
            return Err("stale_signature");
        }
        if auth.cert.len() > MAX_CERT_BYTES * 4 / 3 + 4 {
            return Err("bad_certificate");
        }
        let cert = B64.decode(&auth.cert).map_err(|_| "bad_certificate")?;
        let sig = B64.decode(&auth.sig).map_err(|_| "bad_signature")?;
        let identity = self
            .verifier
            .verify_der(&cert)
            .map_err(|_| "bad_certificate")?;
        if identity.operator_id().as_ref() != Some(operator) {
            return Err("certificate_of_another_operator");
        }
        let msg = signing_input(operator, id, auth.ts, body);
        aloft_certs::signature::verify_with_cert(&cert, &msg, &sig).map_err(|_| "bad_signature")?;
        Ok(identity.operator_role)
    }
}

/// Signed requests seen within the last `2 × MAX_SKEW_MS` (a request is acceptable until its
/// `ts` is `MAX_SKEW_MS` old, and its `ts` may be `MAX_SKEW_MS` ahead of its arrival).
#[derive(Default)]
struct ReplayWindow {
    seen: HashSet<(OperatorId, String)>,
    order: VecDeque<(u64, OperatorId, String)>,
    per_operator: HashMap<OperatorId, usize>,
}

impl ReplayWindow {
    /// Remembers the request; `Ok(true)` if it was already there.
    fn insert(
        &mut self,
        operator: &OperatorId,
        id: &str,
        now_ms: u64,
    ) -> Result<bool, &'static str> {
        while let Some((at, _, _)) = self.order.front() {
            if now_ms.saturating_sub(*at) <= 2 * MAX_SKEW_MS {
                break;
            }
            if let Some((_, op, id)) = self.order.pop_front() {
                if let Some(n) = self.per_operator.get_mut(&op) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_operator.remove(&op);
                    }
                }
                self.seen.remove(&(op, id));
            }
        }
        let key = (operator.clone(), id.to_owned());
        if self.seen.contains(&key) {
            return Ok(true);
        }
        let mine = self.per_operator.get(operator).copied().unwrap_or(0);
        if self.seen.len() >= REPLAY_CAPACITY || mine >= REPLAY_PER_OPERATOR {
            return Err("replay_window_full");
        }
        *self.per_operator.entry(operator.clone()).or_insert(0) += 1;
        self.order.push_back((now_ms, key.0.clone(), key.1.clone()));
        self.seen.insert(key);
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::wire::AdminRequest;
    use aloft_certs::{FleetCa, Validity};
    use aloft_proto::CampaignId;

    struct Fx {
        ca: FleetCa,
        auth: Authenticator,
        ops: OperatorId,
    }

    fn fx() -> Fx {
        aloft_certs::tls::install_crypto_provider();
        let ca = FleetCa::create("Test CA", 1).unwrap();
        let verifier = ReloadableClientVerifier::new(ca.cert_pem(), Vec::new()).unwrap();
        Fx {
            ca,
            auth: Authenticator::new(verifier),
            ops: OperatorId::new("ops").unwrap(),
        }
    }

    fn signer(ca: &FleetCa, ops: &OperatorId, role: OperatorRole) -> RequestSigner {
        let issued = ca.issue_operator(ops, role, Validity::days(1)).unwrap();
        RequestSigner::new(ops.clone(), &issued.cert_pem, &issued.key_pem).unwrap()
    }

    fn abort() -> AdminBody {
        AdminBody::CampaignAbort {
            campaign: CampaignId::new("c-1").unwrap(),
        }
    }

    fn payload(id: &str, body: AdminBody, auth: Option<RequestAuth>) -> Vec<u8> {
        aloft_proto::messages::encode(&AdminRequest {
            v: aloft_proto::messages::PROTOCOL_VERSION,
            id: id.into(),
            body,
            auth,
        })
    }

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn a_signed_request_carries_its_certificates_role_once_and_then_is_a_repeat() {
        let f = fx();
        let s = signer(&f.ca, &f.ops, OperatorRole::Operator);
        let p = payload("r-1", abort(), Some(s.sign("r-1", &abort(), NOW).unwrap()));
        let first = f.auth.check(&f.ops, &p, NOW);
        assert_eq!(
            first,
            AdminAuth::Signed {
                role: Some(OperatorRole::Operator),
                repeat: false
            }
        );
        let again = f.auth.check(&f.ops, &p, NOW + 1_000);
        assert_eq!(
            again,
            AdminAuth::Signed {
                role: Some(OperatorRole::Operator),
                repeat: true
            }
        );
        // Unsigned: the session decides.
        let unsigned = payload("r-2", abort(), None);
        assert_eq!(
            f.auth.check(&f.ops, &unsigned, NOW),
            AdminAuth::Session(None)
        );
    }

    #[test]
    fn every_forgery_is_refused_with_its_reason() {
        let f = fx();
        let s = signer(&f.ca, &f.ops, OperatorRole::Viewer);
        let good = s.sign("r-1", &abort(), NOW).unwrap();
        // The body changed after signing (a viewer's read turned into an abort, say).
        let other = AdminBody::CampaignAbort {
            campaign: CampaignId::new("c-2").unwrap(),
        };
        let p = payload("r-1", other, Some(good.clone()));
        assert_eq!(
            f.auth.check(&f.ops, &p, NOW),
            AdminAuth::Refused("bad_signature")
        );
        // Another id, or another operator's topic.
        let p = payload("r-9", abort(), Some(good.clone()));
        assert_eq!(
            f.auth.check(&f.ops, &p, NOW),
            AdminAuth::Refused("bad_signature")
        );
        let eve = OperatorId::new("eve").unwrap();
        let p = payload("r-1", abort(), Some(good.clone()));
        assert_eq!(
            f.auth.check(&eve, &p, NOW),
            AdminAuth::Refused("certificate_of_another_operator")
        );
        // Too old, too far ahead.
        for at in [NOW + MAX_SKEW_MS + 1, NOW - MAX_SKEW_MS - 1] {
            assert_eq!(
                f.auth.check(&f.ops, &p, at),
                AdminAuth::Refused("stale_signature")
            );
        }
        // A certificate of another CA, signing correctly with its own key.
        let other_ca = FleetCa::create("Other CA", 1).unwrap();
        let foreign = signer(&other_ca, &f.ops, OperatorRole::SecurityAdmin);
        let p = payload(
            "r-3",
            abort(),
            Some(foreign.sign("r-3", &abort(), NOW).unwrap()),
        );
        assert_eq!(
            f.auth.check(&f.ops, &p, NOW),
            AdminAuth::Refused("bad_certificate")
        );
        // The certificate of an admin of the same name, with the viewer's signature.
        let admin =
            f.ca.issue_operator(&f.ops, OperatorRole::SecurityAdmin, Validity::days(1))
                .unwrap();
        let admin_der = aloft_certs::tls::parse_cert(&admin.cert_pem).unwrap();
        let mut swapped = s.sign("r-4", &abort(), NOW).unwrap();
        swapped.cert = B64.encode(admin_der.as_ref());
        let p = payload("r-4", abort(), Some(swapped));
        assert_eq!(
            f.auth.check(&f.ops, &p, NOW),
            AdminAuth::Refused("bad_signature")
        );
        // Garbage.
        let mut junk = good;
        junk.cert = "!!".into();
        let p = payload("r-5", abort(), Some(junk));
        assert_eq!(
            f.auth.check(&f.ops, &p, NOW),
            AdminAuth::Refused("bad_certificate")
        );
    }

    #[test]
    fn a_revoked_certificate_no_longer_signs() {
        let f = fx();
        let issued =
            f.ca.issue_operator(&f.ops, OperatorRole::SecurityAdmin, Validity::days(1))
                .unwrap();
        let s = RequestSigner::new(f.ops.clone(), &issued.cert_pem, &issued.key_pem).unwrap();
        let serial = aloft_certs::cert_serial(&issued.cert_pem).unwrap();
        let mut state = aloft_certs::revocation::RevocationState::default();
        let now = time::OffsetDateTime::now_utc();
        state.revoke(
            &serial,
            aloft_certs::revocation::RevocationReason::KeyCompromise,
            Some("ops".into()),
            now.unix_timestamp(),
        );
        let crl = state.sign_crl(&f.ca, 2, now).unwrap();
        let crl = aloft_certs::revocation::VerifiedCrl::parse(&crl, f.ca.cert_pem()).unwrap();
        f.auth.set_crls(vec![crl.der.clone()]).unwrap();
        let p = payload("r-1", abort(), Some(s.sign("r-1", &abort(), NOW).unwrap()));
        assert_eq!(
            f.auth.check(&f.ops, &p, NOW),
            AdminAuth::Refused("bad_certificate")
        );
    }

    #[test]
    fn the_replay_window_forgets_after_twice_the_skew_and_is_bounded() {
        let mut w = ReplayWindow::default();
        let ops = OperatorId::new("ops").unwrap();
        assert_eq!(w.insert(&ops, "a", 0), Ok(false));
        assert_eq!(w.insert(&ops, "a", 2 * MAX_SKEW_MS), Ok(true));
        assert_eq!(w.insert(&ops, "a", 2 * MAX_SKEW_MS + 1), Ok(false));
        let t = 2 * MAX_SKEW_MS + 1;
        // One operator fills its share and no more; the others still get in.
        for i in 0..REPLAY_PER_OPERATOR - 1 {
            w.insert(&ops, &i.to_string(), t).unwrap();
        }
        assert_eq!(w.insert(&ops, "one-more", t), Err("replay_window_full"));
        let mut n = 0;
        'fill: for o in 0.. {
            let other = OperatorId::new(format!("op-{o}")).unwrap();
            for i in 0..REPLAY_PER_OPERATOR {
                if w.seen.len() >= REPLAY_CAPACITY {
                    break 'fill;
                }
                w.insert(&other, &i.to_string(), t).unwrap();
                n += 1;
            }
        }
        assert_eq!(n, REPLAY_CAPACITY - REPLAY_PER_OPERATOR);
        let late = OperatorId::new("late").unwrap();
        assert_eq!(w.insert(&late, "x", t), Err("replay_window_full"));
        // When the window has passed, everyone's share is free again.
        assert_eq!(
            w.insert(&ops, "one-more", t + 2 * MAX_SKEW_MS + 1),
            Ok(false)
        );
        assert_eq!(w.per_operator.len(), 1);
    }
}
