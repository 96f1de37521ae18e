//! Admin requests from operators: decoding, the reply cache, dispatch and the audit entry of
//! each request; release upload (signatures verified against the root's release role before
//! anything is stored), the root of trust, device registration and labels. Campaign operations
//! are in `campaigns`, CRLs and renewals in `pki`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use aloft_certs::OperatorRole;
use aloft_proto::crypto::{self, sha256};
use aloft_proto::manifest::ManifestError;
use aloft_proto::messages::{self, DecodeError};
use aloft_proto::{topics, ArtifactId, CampaignId, DeviceId, OperatorId};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::campaigns::summary;
use super::{parse_key_hex, refuse, AdminResult, Core, Out, Pending, Write};
use crate::admin::auth::AdminAuth;
use crate::admin::wire::{AdminBody, AdminError, AdminReply, AdminRequest};
use crate::store::{AuditEvent, DeviceRecord, ReleaseRecord};

/// Replies to recent admin requests by (operator, request id), so a request delivered twice
/// (QoS 1 redelivery) is answered twice but carried out once: a campaign is created once.
#[derive(Default)]
pub(super) struct ReplyCache {
    replies: HashMap<(OperatorId, String), Vec<u8>>,
    order: VecDeque<(OperatorId, String)>,
}

impl ReplyCache {
    /// Requests remembered; older ones are forgotten first.
    const CAPACITY: usize = 4096;

    fn get(&self, key: &(OperatorId, String)) -> Option<&Vec<u8>> {
        self.replies.get(key)
    }

    fn insert(&mut self, key: (OperatorId, String), reply: Vec<u8>) {
        if self.replies.insert(key.clone(), reply).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.replies.remove(&old);
            }
        }
    }
}

/// Campaign summaries an operator asked for (`campaign_status`, `campaign_list`).
#[derive(Debug)]
pub(super) enum SummaryRead {
    One { campaign: CampaignId, devices: bool },
    All,
}

impl Core {
    pub(super) fn on_admin(&mut self, operator: OperatorId, auth: AdminAuth, payload: &[u8]) {
        let reply_topic = topics::operator_reply(&operator);
        let req: AdminRequest = match messages::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.rejected("admin", e.code());
                warn!(%operator, error = %e, "admin request refused");
                let reply = AdminReply::err(
                    loose_id(payload, &e),
                    AdminError::new("malformed", e.to_string()),
                );
                self.send(reply_topic, messages::encode(&reply), false);
                return;
            }
        };
        let id = req.id.clone();
        // A signature that does not hold: refused before anything else, the reply cache
        // included, and the refusal is not cached (a forgery must not pre-empt the real request
        // with its id).
        if let AdminAuth::Refused(why) = auth {
            self.metrics.rejected("admin", why);
            warn!(%operator, request = %id, reason = why, "admin request with an unacceptable signature refused");
            let op = req.body.op();
            self.audit(AuditEvent {
                actor: operator.to_string(),
                action: op.to_owned(),
                subject: req.body.audit().map(|(_, s)| s).unwrap_or_default(),
                outcome: "unauthenticated".into(),
            });
            let reply = AdminReply::err(
                id,
                AdminError::new(
                    "unauthenticated",
                    format!("the request's signature was refused ({why}): sign with a current, unrevoked certificate of this operator and a correct clock"),
                ),
            );
            self.send(reply_topic, messages::encode(&reply), false);
            return;
        }
        let key = (operator.clone(), id.clone());
        if let Some(reply) = self.admin_replies.get(&key) {
            self.metrics.rejected("admin", "duplicate");
            info!(%operator, request = %id, "duplicate admin request answered from cache");
            let reply = reply.clone();
            self.send(reply_topic, reply, false);
            return;
        }
        let role = match auth {
            // Seen before and no longer in the reply cache: a replay, or a redelivery so late
            // that the answer was forgotten. Either way it is not carried out twice.
            AdminAuth::Signed { repeat: true, .. } => {
                self.metrics.rejected("admin", "replayed");
                warn!(%operator, request = %id, "repeated signed admin request refused");
                let reply = AdminReply::err(
                    id,
                    AdminError::new(
                        "replayed",
                        "this request was already received; send a new one",
                    ),
                );
                self.send(reply_topic, messages::encode(&reply), false);
                return;
            }
            AdminAuth::Signed { role, .. } | AdminAuth::Session(role) => role,
            AdminAuth::Refused(_) => None,
        };
        // Fail closed: a certificate without a role (issued before 1.5) reads and does nothing
        // else; the holder of the CA issues a new one with `--role`.
        self.metrics.admin_request(req.body.op());
        let effective = role.unwrap_or(OperatorRole::Viewer);
        let needed = req.body.required_role();
        if !effective.allows(needed) {
            let op = req.body.op();
            self.metrics.admin_forbidden(op, effective.as_str());
            let subject = req.body.audit().map(|(_, s)| s).unwrap_or_default();
            let role_name = role.map_or("none (viewer)", OperatorRole::as_str);
            let pending = Pending {
                operator,
                id,
                audit: Some((op, subject)),
            };
            self.finish_admin(
                pending,
                refuse(
                    "forbidden",
                    format!("{op} needs the {needed} role; this certificate's role is {role_name}"),
                ),
            );
            return;
        }
        // Read from the store by the shell after the batch's commit, and not cached: it changes
        // nothing, so a redelivered request may be answered from a newer state.
        if let AdminBody::AuditList { since, limit } = req.body {
            self.fx.after_commit.push(Out::AuditReply {
                operator,
                id,
                since: since.unwrap_or(1),
                limit: limit.unwrap_or(100).min(1000) as usize,
            });
            return;
        }
        let audit = req.body.audit();
        let dry_run = matches!(
            req.body,
            AdminBody::CampaignCreate { dry_run: true, .. }
                | AdminBody::CampaignRollback { dry_run: true, .. }
        );
        let pending = Pending {
            operator: operator.clone(),
            id,
            audit: audit.filter(|_| !dry_run),
        };
        if let Some(answer) = self.dispatch(&operator, req.body, &pending) {
            self.finish_admin(pending, answer);
        }
    }

    /// Answers an operator request (now, or once the shell did what it was suspended for),
    /// completes its audit entry, and remembers the reply for redeliveries.
    pub(super) fn finish_admin(&mut self, pending: Pending, answer: AdminResult) {
        let Pending {
            operator,
            id,
            audit,
        } = pending;
        let reply = match answer {
            Ok(result) => AdminReply::ok(id.clone(), result),
            Err(e) => {
                self.metrics.rejected("admin", "refused");
                warn!(%operator, code = %e.code, message = %e.message, "admin request refused");
                AdminReply::err(id.clone(), e)
            }
        };
        if let Some((action, subject)) = audit {
            let outcome = reply
                .error
                .as_ref()
                .map_or_else(|| "ok".to_owned(), |e| e.code.clone());
            self.audit(AuditEvent {
                actor: operator.to_string(),
                action: action.to_owned(),
                subject,
                outcome,
            });
        }
        let encoded = messages::encode(&reply);
        self.admin_replies
            .insert((operator.clone(), id), encoded.clone());
        self.send(topics::operator_reply(&operator), encoded, false);
    }

    /// A summary read answered at the batch's settle, once the rollouts have moved.
    pub(super) fn summarize(&self, read: SummaryRead) -> AdminResult {
        match read {
            SummaryRead::One { campaign, devices } => match self.campaigns.get(&campaign) {
                Some(live) => Ok(json!(summary(live, devices))),
                None => refuse("unknown_campaign", format!("no campaign {campaign}")),
            },
            SummaryRead::All => {
                let mut all: Vec<_> = self.campaigns.values().map(|l| summary(l, false)).collect();
                all.sort_by_key(|s| s.created_ms);
                Ok(json!(all))
            }
        }
    }

    /// Carries out a request; `None`: suspended until the shell hands back what it needs, or
    /// until the batch's settle.
    fn dispatch(
        &mut self,
        operator: &OperatorId,
        body: AdminBody,
        pending: &Pending,
    ) -> Option<AdminResult> {
        Some(match body {
            AdminBody::ReleasePut {
                manifest,
                content_key,
            } => self.release_put(operator, manifest, &content_key),
            AdminBody::ReleaseChunk {
                artifact,
                index,
                data,
            } => self.release_chunk(&artifact, index, &data),
            AdminBody::ReleaseList {} => self.release_list(),
            AdminBody::TrustUpdate { roots } => {
                return self.trust_update(operator, &roots, pending)
            }
            AdminBody::TrustStatus {} => Ok(trust_status(&self.trust)),
            AdminBody::DeviceRegister { certs, groups } => {
                return self.device_register(certs, groups, pending)
            }
            AdminBody::DeviceList { after, limit } => Ok(self.device_list(after.as_ref(), limit)),
            AdminBody::DeviceCount {} => Ok(json!({ "registered": self.devices.len() })),
            AdminBody::DeviceLabel {
                devices,
                set,
                remove,
            } => self.device_label(&devices, &set, &remove),
            AdminBody::CrlUpdate { crl } => return self.crl_update(operator, &crl, pending),
            AdminBody::DeviceRenewAllow { device } => self.device_renew_allow(&device),
            AdminBody::CampaignCreate {
                artifact,
                target,
                include,
                exclude,
                policy,
                dry_run,
                origin,
            } => self.campaign_create(
                operator, &artifact, target, &include, &exclude, policy, dry_run, origin,
            ),
            AdminBody::CampaignPause { campaign } => {
                self.campaign_control(operator, &campaign, "pause")
            }
            AdminBody::CampaignResume { campaign } => {
                self.campaign_control(operator, &campaign, "resume")
            }
            AdminBody::CampaignAbort { campaign } => {
                self.campaign_control(operator, &campaign, "abort")
            }
            AdminBody::CampaignRollback {
                campaign,
                to,
                policy,
                dry_run,
            } => self.campaign_rollback(operator, &campaign, &to, policy, dry_run),
            AdminBody::CampaignStatus { campaign, devices } => {
                let read = SummaryRead::One { campaign, devices };
                self.summaries_due.push((pending.clone(), read));
                return None;
            }
            AdminBody::AuditList { .. } => {
                refuse("internal", "audit_list is answered by the shell")
            }
            AdminBody::CampaignList {} => {
                self.summaries_due.push((pending.clone(), SummaryRead::All));
                return None;
            }
        })
    }

    fn release_put(
        &mut self,
        operator: &OperatorId,
        signed: aloft_proto::manifest::SignedManifest,
        content_key: &str,
    ) -> AdminResult {
        if let Err(e) = self.trust.trusted.check_fresh(self.now / 1000) {
            self.metrics.rejected("release", "root_expired");
            return refuse("root_expired", format!("{e}; push a newer root first"));
        }
        let manifest = match self.trust.trusted.verify_manifest(&signed) {
            Ok(m) => m,
            Err(e) => {
                let code = manifest_error_code(&e);
                self.metrics.rejected("release", code);
                warn!(%operator, error = %e, "release refused: signature");
                return refuse(code, e.to_string());
            }
        };
        if parse_key_hex(content_key).is_none() {
            return refuse("invalid_content_key", "content_key must be 64 hex digits");
        }
        if let Some(existing) = self.releases.get(&manifest.artifact) {
            if existing.signed.payload != signed.payload {
                return refuse(
                    "conflict",
                    format!(
                        "artifact {} exists with another manifest",
                        manifest.artifact
                    ),
                );
            }
            return Ok(json!({"artifact": manifest.artifact, "complete": existing.complete}));
        }
        let artifact = manifest.artifact.clone();
        let record = ReleaseRecord {
            artifact: artifact.clone(),
            signed,
            manifest,
            content_key_hex: content_key.to_owned(),
            complete: false,
            uploaded_by: operator.clone(),
            uploaded_ms: self.now,
        };
        info!(%operator, %artifact, version = %record.manifest.version, "release offered; signature verified");
        self.put_release(record);
        self.uploads.insert(artifact.clone(), HashSet::new());
        Ok(json!({"artifact": artifact, "complete": false}))
    }

    fn release_chunk(&mut self, artifact: &ArtifactId, index: u32, data: &str) -> AdminResult {
        let Some(mut record) = self.releases.get(artifact).cloned() else {
            return refuse("unknown_artifact", format!("no release {artifact}"));
        };
        let Some(expected) = record.manifest.chunk_digest(index) else {
            return refuse("out_of_range", format!("chunk {index} is out of range"));
        };
        let Ok(sealed) = B64.decode(data) else {
            return refuse("malformed", "chunk data is not base64");
        };
        if sha256(&sealed) != expected {
            self.metrics.rejected("release", "chunk_digest");
            return refuse(
                "chunk_digest_mismatch",
                format!("chunk {index} does not match the manifest"),
            );
        }
        let Some(key) = parse_key_hex(&record.content_key_hex) else {
            return refuse("invalid_content_key", "stored content key is malformed");
        };
        let count = record.manifest.chunk_count;
        if crypto::open_chunk(&key, artifact, index, count, &sealed).is_err() {
            self.metrics.rejected("release", "content_key_mismatch");
            return refuse(
                "content_key_mismatch",
                format!("chunk {index} does not open with the offered content key"),
            );
        }
        if record.complete {
            return Ok(json!({"artifact": artifact, "complete": true}));
        }
        self.write(Write::Chunk {
            artifact: artifact.clone(),
            index,
            sealed,
        });
        // The shell loaded what was received before a restart (`Loaded::uploads`).
        let received = self.uploads.entry(artifact.clone()).or_default();
        received.insert(index);
        let complete = received.len() == count as usize;
        if complete {
            record.complete = true;
            self.put_release(record);
            self.uploads.remove(artifact);
            info!(%artifact, chunks = count, "release complete");
        }
        Ok(json!({"artifact": artifact, "complete": complete}))
    }

    /// Registered devices' records in id order (all, or the page of `limit` after `after`),
    /// each with (since 1.5) the campaign it was last made a member of and its state there
    /// (`campaign`, `state`; absent if no campaign targeted it). A page costs its own devices
    /// times the campaigns, not a pass over the fleet.
    fn device_list(&self, after: Option<&DeviceId>, limit: Option<u32>) -> Value {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let take = limit.map_or(usize::MAX, |l| {
            l.clamp(1, crate::admin::wire::MAX_DEVICE_PAGE) as usize
        });
        let mut campaigns: Vec<&super::LiveCampaign> = self.campaigns.values().collect();
        // Newest first: the first that has the device is its latest.
        campaigns.sort_by(|a, b| {
            (b.record.created_ms, &b.record.id).cmp(&(a.record.created_ms, &a.record.id))
        });
        let devices: Vec<Value> = self
            .devices
            .range::<DeviceId, _>((from, Bound::Unbounded))
            .take(take)
            .map(|(id, d)| {
                let mut v = json!(d);
                let latest = campaigns
                    .iter()
                    .find_map(|c| c.progress.get(id).map(|p| (&c.record.id, p.state)));
                if let (Some(obj), Some((campaign, state))) = (v.as_object_mut(), latest) {
                    obj.insert("campaign".into(), json!(campaign));
                    obj.insert("state".into(), json!(state));
                }
                v
            })
            .collect();
        Value::Array(devices)
    }

    fn release_list(&self) -> AdminResult {
        let list: Vec<Value> = self
            .releases
            .values()
            .map(|r| {
                json!({
                    "artifact": r.artifact,
                    "version": r.manifest.version,
                    "security_version": r.manifest.security_version,
                    "sequence": r.manifest.sequence,
                    "hardware_model": r.manifest.hardware_model,
                    "image_size": r.manifest.image_size,
                    "chunk_count": r.manifest.chunk_count,
                    "complete": r.complete,
                    "uploaded_by": r.uploaded_by,
                    "uploaded_ms": r.uploaded_ms,
                })
            })
            .collect();
        Ok(json!(list))
    }

    /// Checks the groups, then asks the shell for `crl.pem` (`register_with` goes on).
    fn device_register(
        &mut self,
        certs: Vec<String>,
        groups: Vec<String>,
        pending: &Pending,
    ) -> Option<AdminResult> {
        if let Some(g) = groups.iter().find(|g| !valid_group(g)) {
            return Some(refuse(
                "invalid_group",
                format!("group {g:?} is not a valid name"),
            ));
        }
        self.fx.now.push(Out::ReadCrl {
            certs,
            groups,
            pending: pending.clone(),
        });
        None
    }

    /// Registers the certificates that verify and are not revoked by the CRL in force or by
    /// `crl.pem` as the shell read it (`on_disk`).
    pub(super) fn register_with(
        &mut self,
        certs: &[String],
        groups: &[String],
        on_disk: Result<Option<aloft_certs::revocation::VerifiedCrl>, String>,
    ) -> AdminResult {
        // Fail closed: a CRL that cannot be read means nothing is registered, not that nothing
        // is revoked.
        let crl = match self.crl_for_registration(on_disk) {
            Ok(c) => c,
            Err(e) => {
                self.metrics.rejected("admin", "crl_unavailable");
                return refuse(
                    "crl_unavailable",
                    format!("the crl cannot be read, so no certificate is registered: {e}"),
                );
            }
        };
        let crls = crl.iter().map(|c| c.der.clone()).collect::<Vec<_>>();
        let mut registered = Vec::new();
        let mut errors = Vec::new();
        let now = self.now;
        for pem in certs {
            let identity =
                match aloft_certs::tls::verify_client_cert(&self.ca_pem, pem, crls.clone()) {
                    Ok(i) => i,
                    Err(e) => {
                        errors.push(e.to_string());
                        continue;
                    }
                };
            // The verifier consulted the CRL already; asking it directly as well costs nothing
            // and does not depend on how the verifier treats a CRL it finds.
            if crl.as_ref().is_some_and(|c| c.is_revoked(&identity.serial)) {
                errors.push(format!(
                    "{}: certificate {} is revoked",
                    identity.id,
                    identity.serial_hex()
                ));
                continue;
            }
            let (Some(id), Some(x)) = (identity.device_id(), identity.x25519) else {
                errors.push(format!("{} is not a device certificate", identity.id));
                continue;
            };
            let mut record = self.devices.get(&id).cloned().unwrap_or(DeviceRecord {
                id: id.clone(),
                x25519_public: String::new(),
                cert_not_after: 0,
                cert_not_before: 0,
                cert_serial: String::new(),
                revoked: false,
                groups: Vec::new(),
                labels: Default::default(),
                registered_ms: now,
                last_seen_ms: 0,
                floor: None,
                installed_sequence: None,
                running_version: None,
            });
            record.x25519_public = hex::encode(x);
            record.cert_not_after = identity.not_after;
            record.cert_not_before = identity.not_before;
            record.cert_serial = identity.serial_hex();
            for g in groups {
                if !record.groups.contains(g) {
                    record.groups.push(g.clone());
                }
            }
            self.set_revoked(&mut record);
            self.put_device(record, true);
            registered.push(id);
        }
        self.fx.flush = true;
        Ok(json!({"registered": registered, "errors": errors}))
    }

    /// New root metadata from an operator: accepted only if it walks forward from the root the
    /// orchestrator trusts (thresholds of the old and the new root keys, revocations kept), and
    /// written to the trust directory before it counts.
    /// Walks forward from the trusted root in memory; the roots it accepts count only once the
    /// shell has written them to the trust directory (`roots_stored`).
    fn trust_update(
        &mut self,
        operator: &OperatorId,
        roots: &[aloft_proto::trust::SignedRoot],
        pending: &Pending,
    ) -> Option<AdminResult> {
        let current = self.trust.trusted.version();
        let mut next = self.trust.clone();
        match next.accept(roots, None) {
            Ok(0) => Some(Ok(json!({"version": current, "accepted": 0}))),
            Ok(accepted) => {
                let mut newer: Vec<aloft_proto::trust::SignedRoot> = roots
                    .iter()
                    .filter(|s| s.peek_unverified().is_ok_and(|r| r.version > current))
                    .cloned()
                    .collect();
                newer.sort_by_key(|s| s.peek_unverified().map(|r| r.version).unwrap_or(0));
                self.fx.now.push(Out::StoreRoots {
                    roots: newer,
                    next: Box::new(next),
                    accepted,
                    pending: pending.clone(),
                });
                None
            }
            Err(e) => {
                self.metrics.rejected("admin", "untrusted_root");
                warn!(%operator, error = %e, "root update refused");
                Some(refuse("untrusted_root", e.to_string()))
            }
        }
    }

    /// The accepted roots are on disk (or could not be written: nothing changes).
    pub(super) fn roots_stored(
        &mut self,
        pending: &Pending,
        next: crate::trust::TrustState,
        accepted: usize,
        result: Result<(), String>,
    ) -> AdminResult {
        let operator = &pending.operator;
        if let Err(e) = result {
            self.metrics.rejected("admin", "untrusted_root");
            warn!(%operator, error = %e, "root update refused");
            return refuse("untrusted_root", e);
        }
        self.trust = next;
        self.roots = std::sync::Arc::new(self.trust.job_chain().to_vec());
        let version = self.trust.trusted.version();
        info!(%operator, version, accepted, "root of trust updated");
        Ok(json!({"version": version, "accepted": accepted}))
    }

    fn device_label(
        &mut self,
        devices: &[DeviceId],
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> AdminResult {
        if let Some((k, v)) = set.iter().find(|(k, v)| !valid_label(k, v)) {
            return refuse(
                "invalid_label",
                format!(
                    "label {k}={v} is not valid (keys and values: 1 to 63 of a-z A-Z 0-9 . _ -)"
                ),
            );
        }
        let mut records = Vec::with_capacity(devices.len());
        for d in devices {
            match self.devices.get(d) {
                Some(r) => records.push(r.clone()),
                None => return refuse("unknown_device", format!("device {d} is not registered")),
            }
        }
        for mut r in records {
            for k in remove {
                r.labels.remove(k);
            }
            r.labels
                .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
            self.put_device(r, true);
        }
        self.fx.flush = true;
        Ok(json!({"labelled": devices.len()}))
    }
}

/// What `trust_status` returns: the newest root, and the versions jobs carry.
fn trust_status(trust: &crate::trust::TrustState) -> Value {
    let root = trust.trusted.root();
    json!({
        "version": root.version,
        "issued_at": root.issued_at,
        "expires_at": root.expires_at,
        "root": root.root,
        "release": root.release,
        "revoked": trust.trusted.revoked,
        "job_chain": trust
            .job_chain()
            .iter()
            .filter_map(|s| s.peek_unverified().ok().map(|r| r.version))
            .collect::<Vec<_>>(),
    })
}

/// The admin error code of a manifest that failed verification.
fn manifest_error_code(e: &ManifestError) -> &'static str {
    match e {
        ManifestError::UnknownKey => "unknown_signing_key",
        ManifestError::BadSignature => "bad_signature",
        ManifestError::BelowThreshold { .. } => "below_threshold",
        ManifestError::RevokedKey => "revoked_key",
        _ => "invalid_manifest",
    }
}

/// Label keys and values: 1 to 63 characters of `a-z A-Z 0-9 . _ -`.
fn valid_label(k: &str, v: &str) -> bool {
    let ok = |s: &str| {
        (1..=63).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    ok(k) && ok(v)
}

fn valid_group(g: &str) -> bool {
    aloft_proto::CampaignId::new(g).is_ok()
}

/// The request id of a payload that failed to decode, if one can be read, so the operator's
/// client can still match the error to its request.
fn loose_id(payload: &[u8], _e: &DecodeError) -> String {
    if payload.len() > crate::admin::wire::MAX_ADMIN_BYTES {
        return String::new();
    }
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.get("id")?.as_str().map(|s| s.chars().take(64).collect()))
        .unwrap_or_default()
}
