//! Admin requests from operators: release upload (signature verified here, against the trusted
//! release keys, before anything is stored), device registration, campaign creation and status.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use aloft_proto::crypto::{self, sha256};
use aloft_proto::manifest::ManifestError;
use aloft_proto::messages::{self, DecodeError};
use aloft_proto::{topics, ArtifactId, CampaignId, DeviceId, DeviceState, OperatorId};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::{now_ms, parse_key_hex, Engine, LiveCampaign};
use crate::admin::wire::{
    AdminBody, AdminError, AdminReply, AdminRequest, CampaignSummary, DeviceSummary, DryRun,
    WaveSummary,
};
use crate::fleet::state::Progress;
use crate::rollout::{Plan, RolloutPolicy, RolloutState};
use crate::store::{
    AuditEvent, CampaignRecord, CampaignStatus, DeviceRecord, ReleaseRecord, StoreError, Target,
};

type AdminResult = Result<Result<Value, AdminError>, StoreError>;

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

fn refuse(code: &str, message: impl Into<String>) -> AdminResult {
    Ok(Err(AdminError::new(code, message)))
}

impl Engine {
    pub(super) fn on_admin(
        &mut self,
        operator: OperatorId,
        payload: &[u8],
    ) -> Result<(), StoreError> {
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
                return Ok(());
            }
        };
        let id = req.id.clone();
        let key = (operator.clone(), id.clone());
        if let Some(reply) = self.admin_replies.get(&key) {
            self.metrics.rejected("admin", "duplicate");
            info!(%operator, request = %id, "duplicate admin request answered from cache");
            let reply = reply.clone();
            self.send(reply_topic, reply, false);
            return Ok(());
        }
        let audit = req.body.audit();
        let dry_run = matches!(
            req.body,
            AdminBody::CampaignCreate { dry_run: true, .. }
                | AdminBody::CampaignRollback { dry_run: true, .. }
        );
        let reply = match self.dispatch(&operator, req.body)? {
            Ok(result) => AdminReply::ok(id, result),
            Err(e) => {
                self.metrics.rejected("admin", "refused");
                warn!(%operator, code = %e.code, message = %e.message, "admin request refused");
                AdminReply::err(id, e)
            }
        };
        if let (Some((action, subject)), false) = (audit, dry_run) {
            let outcome = reply
                .error
                .as_ref()
                .map_or_else(|| "ok".to_owned(), |e| e.code.clone());
            let event = AuditEvent {
                actor: operator.to_string(),
                action: action.to_owned(),
                subject,
                outcome,
            };
            self.store.append_audit(event, now_ms())?;
            self.dirty = true;
        }
        let encoded = messages::encode(&reply);
        self.admin_replies.insert(key, encoded.clone());
        self.send(reply_topic, encoded, false);
        Ok(())
    }

    fn dispatch(&mut self, operator: &OperatorId, body: AdminBody) -> AdminResult {
        match body {
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
            AdminBody::TrustUpdate { roots } => self.trust_update(operator, &roots),
            AdminBody::TrustStatus {} => Ok(Ok(trust_status(&self.cfg.trust))),
            AdminBody::DeviceRegister { certs, groups } => self.device_register(&certs, &groups),
            AdminBody::DeviceList {} => {
                let devices = self.store.devices()?;
                Ok(Ok(json!(devices)))
            }
            AdminBody::DeviceLabel {
                devices,
                set,
                remove,
            } => self.device_label(&devices, &set, &remove),
            AdminBody::CrlUpdate { crl } => self.crl_update(operator, &crl),
            AdminBody::CampaignCreate {
                artifact,
                target,
                include,
                exclude,
                policy,
                dry_run,
            } => self.campaign_create(
                operator, &artifact, target, &include, &exclude, policy, dry_run,
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
                match self.campaigns.get(&campaign) {
                    Some(live) => Ok(Ok(json!(summary(live, devices)))),
                    None => refuse("unknown_campaign", format!("no campaign {campaign}")),
                }
            }
            AdminBody::AuditList { since, limit } => {
                let limit = limit.unwrap_or(100).min(1000) as usize;
                let entries = self.store.audit(since.unwrap_or(1), limit)?;
                let chain = match self.store.verify_audit()? {
                    Ok(n) => json!({"ok": true, "entries": n}),
                    Err(b) => json!({"ok": false, "broken": b.to_string()}),
                };
                Ok(Ok(json!({"entries": entries, "chain": chain})))
            }
            AdminBody::CampaignList {} => {
                let mut all: Vec<_> = self.campaigns.values().map(|l| summary(l, false)).collect();
                all.sort_by_key(|s| s.created_ms);
                Ok(Ok(json!(all)))
            }
        }
    }

    fn release_put(
        &mut self,
        operator: &OperatorId,
        signed: aloft_proto::manifest::SignedManifest,
        content_key: &str,
    ) -> AdminResult {
        if let Err(e) = self.cfg.trust.trusted.check_fresh(now_ms() / 1000) {
            self.metrics.rejected("release", "root_expired");
            return refuse("root_expired", format!("{e}; push a newer root first"));
        }
        let manifest = match self.cfg.trust.trusted.verify_manifest(&signed) {
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
        if let Some(existing) = self.store.release(&manifest.artifact)? {
            if existing.signed.payload != signed.payload {
                return refuse(
                    "conflict",
                    format!(
                        "artifact {} exists with another manifest",
                        manifest.artifact
                    ),
                );
            }
            return Ok(Ok(
                json!({"artifact": manifest.artifact, "complete": existing.complete}),
            ));
        }
        let artifact = manifest.artifact.clone();
        let record = ReleaseRecord {
            artifact: artifact.clone(),
            signed,
            manifest,
            content_key_hex: content_key.to_owned(),
            complete: false,
            uploaded_by: operator.clone(),
            uploaded_ms: now_ms(),
        };
        self.store.put_release(&record)?;
        self.dirty = true;
        self.uploads.insert(artifact.clone(), HashSet::new());
        info!(%operator, %artifact, version = %record.manifest.version, "release offered; signature verified");
        Ok(Ok(json!({"artifact": artifact, "complete": false})))
    }

    fn release_chunk(&mut self, artifact: &ArtifactId, index: u32, data: &str) -> AdminResult {
        let Some(mut record) = self.store.release(artifact)? else {
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
            return Ok(Ok(json!({"artifact": artifact, "complete": true})));
        }
        self.store.put_chunk(artifact, index, &sealed)?;
        self.dirty = true;
        let received = match self.uploads.get_mut(artifact) {
            Some(set) => set,
            None => {
                // After a restart: rebuild what was received from the store.
                let mut set = HashSet::new();
                for i in 0..count {
                    if self.store.chunk(artifact, i)?.is_some() {
                        set.insert(i);
                    }
                }
                self.uploads.entry(artifact.clone()).or_insert(set)
            }
        };
        received.insert(index);
        let complete = received.len() == count as usize;
        if complete {
            record.complete = true;
            self.store.put_release(&record)?;
            self.uploads.remove(artifact);
            info!(%artifact, chunks = count, "release complete");
        }
        Ok(Ok(json!({"artifact": artifact, "complete": complete})))
    }

    fn release_list(&self) -> AdminResult {
        let list: Vec<Value> = self
            .store
            .releases()?
            .into_iter()
            .map(|r| {
                json!({
                    "artifact": r.artifact,
                    "version": r.manifest.version,
                    "security_version": r.manifest.security_version,
                    "hardware_model": r.manifest.hardware_model,
                    "image_size": r.manifest.image_size,
                    "chunk_count": r.manifest.chunk_count,
                    "complete": r.complete,
                    "uploaded_by": r.uploaded_by,
                })
            })
            .collect();
        Ok(Ok(json!(list)))
    }

    fn device_register(&mut self, certs: &[String], groups: &[String]) -> AdminResult {
        if let Some(g) = groups.iter().find(|g| !valid_group(g)) {
            return refuse("invalid_group", format!("group {g:?} is not a valid name"));
        }
        // Fail closed: a CRL that cannot be read means nothing is registered, not that nothing
        // is revoked.
        let crl = match self.crl_for_registration() {
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
        let now = now_ms();
        for pem in certs {
            let identity =
                match aloft_certs::tls::verify_client_cert(&self.cfg.ca_pem, pem, crls.clone()) {
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
            let mut record = self.store.device(&id)?.unwrap_or(DeviceRecord {
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
            self.store.put_device(&record)?;
            registered.push(id);
        }
        self.dirty = true;
        Ok(Ok(json!({"registered": registered, "errors": errors})))
    }

    /// Resolves the membership, then (unless `dry_run`) stores the campaign and lets its
    /// rollout notify the first wave before this batch commits.
    #[allow(clippy::too_many_arguments)]
    fn campaign_create(
        &mut self,
        operator: &OperatorId,
        artifact: &ArtifactId,
        target: Target,
        include: &[DeviceId],
        exclude: &[DeviceId],
        policy: RolloutPolicy,
        dry_run: bool,
    ) -> AdminResult {
        let mut devices = match self.resolve(&target)? {
            Ok(d) => d,
            Err(e) => return Ok(Err(e)),
        };
        match self.resolve(&Target::Devices(include.to_vec()))? {
            Ok(extra) => devices.extend(extra),
            Err(e) => return Ok(Err(e)),
        }
        let excluded: HashSet<&DeviceId> = exclude.iter().collect();
        devices.retain(|d| !excluded.contains(d));
        devices.sort();
        devices.dedup();
        self.start_campaign(operator, artifact, target, devices, policy, dry_run, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_campaign(
        &mut self,
        operator: &OperatorId,
        artifact: &ArtifactId,
        target: Target,
        devices: Vec<DeviceId>,
        policy: RolloutPolicy,
        dry_run: bool,
        rolls_back: Option<CampaignId>,
    ) -> AdminResult {
        let Some(release) = self.store.release(artifact)? else {
            return refuse("unknown_artifact", format!("no release {artifact}"));
        };
        if !release.complete {
            return refuse(
                "incomplete_release",
                format!("release {artifact} is still uploading"),
            );
        }
        let Some(key) = parse_key_hex(&release.content_key_hex) else {
            return refuse("invalid_content_key", "stored content key is malformed");
        };
        if let Err(e) = self.cfg.trust.trusted.check_fresh(now_ms() / 1000) {
            return refuse("root_expired", format!("{e}; push a newer root first"));
        }
        // A key revoked (or a threshold raised) since the upload stops the release here too:
        // devices would refuse it anyway, one by one.
        if let Err(e) = self.cfg.trust.trusted.verify_manifest(&release.signed) {
            return refuse(
                "untrusted_release",
                format!(
                    "{artifact} no longer verifies under root version {}: {e}",
                    self.cfg.trust.trusted.version()
                ),
            );
        }
        if let Err(e) = policy.validate() {
            return refuse("invalid_policy", e.to_string());
        }
        // A device whose certificate is revoked never becomes a member: it would get no job.
        let mut devices = devices;
        let targeted = devices.len();
        devices.retain(|d| !self.revoked_devices.contains(d));
        let excluded_revoked = targeted - devices.len();
        if devices.is_empty() {
            let why = if excluded_revoked > 0 {
                format!("the target matches no registered device whose certificate is not revoked ({excluded_revoked} revoked)")
            } else {
                "the target matches no registered device".to_owned()
            };
            return refuse("empty_target", why);
        }
        if dry_run {
            let plan = Plan::new(artifact, &devices, &policy);
            return Ok(Ok(json!(DryRun {
                artifact: artifact.clone(),
                total: devices.len() as u32,
                policy,
                waves: plan.waves(),
            })));
        }
        let id = new_campaign_id();
        let now = now_ms();
        let record = CampaignRecord {
            id: id.clone(),
            artifact: artifact.clone(),
            target,
            devices: devices.clone(),
            status: CampaignStatus::Active,
            created_by: operator.clone(),
            created_ms: now,
            finished_ms: None,
            policy,
            rollout: RolloutState::default(),
            rolls_back,
        };
        self.store.put_campaign(&record)?;
        let mut progress = std::collections::HashMap::new();
        for d in &devices {
            let p = Progress::new(now);
            self.store.put_progress(&id, d, &p)?;
            progress.insert(d.clone(), p);
        }
        self.dirty = true;
        let live = LiveCampaign::new(record, release.manifest, release.signed, key, progress);
        let waves = live.rollout.waves().len();
        self.campaigns.insert(id.clone(), live);
        self.touched.insert(id.clone());
        info!(%operator, campaign = %id, %artifact, devices = devices.len(), waves, excluded_revoked, "campaign created");
        Ok(Ok(
            json!({"campaign": id, "devices": devices.len(), "waves": waves, "excluded_revoked": excluded_revoked}),
        ))
    }

    /// Pause, resume or abort, by an operator.
    fn campaign_control(
        &mut self,
        operator: &OperatorId,
        campaign: &CampaignId,
        verb: &str,
    ) -> AdminResult {
        let Some(live) = self.campaigns.get_mut(campaign) else {
            return refuse("unknown_campaign", format!("no campaign {campaign}"));
        };
        let result = match verb {
            "pause" => live.rollout.pause(format!("paused by {operator}")),
            "resume" => live.rollout.resume(),
            _ => live.rollout.abort(format!("aborted by {operator}")),
        };
        let actions = match result {
            Ok(a) => a,
            Err(e) => return refuse("wrong_status", e.to_string()),
        };
        info!(%operator, %campaign, verb, "campaign control");
        self.apply_rollout(campaign, actions, now_ms())?;
        self.touched.insert(campaign.clone());
        let status = self.campaigns.get(campaign).map(|l| l.record.status);
        Ok(Ok(json!({"campaign": campaign, "status": status})))
    }

    /// A new campaign that returns the devices that took `campaign`'s release to `to`.
    fn campaign_rollback(
        &mut self,
        operator: &OperatorId,
        campaign: &CampaignId,
        to: &ArtifactId,
        policy: RolloutPolicy,
        dry_run: bool,
    ) -> AdminResult {
        let Some(live) = self.campaigns.get(campaign) else {
            return refuse("unknown_campaign", format!("no campaign {campaign}"));
        };
        let Some(target) = self.store.release(to)? else {
            return refuse("unknown_artifact", format!("no release {to}"));
        };
        let from = &live.manifest;
        if target.manifest.hardware_model != from.hardware_model {
            return refuse(
                "wrong_hardware",
                format!(
                    "{to} is for {}, the campaign's devices are {}",
                    target.manifest.hardware_model, from.hardware_model
                ),
            );
        }
        // Devices raised their anti-rollback floor to the release's security version when they
        // confirmed it, and refuse anything lower: such a campaign could only fail.
        if target.manifest.security_version < from.security_version {
            return refuse(
                "downgrade_blocked",
                format!(
                    "{to} has security version {} but devices that took {} ({}) raised their floor to {}; \
                     sign the previous image again as a new release with security version >= {}",
                    target.manifest.security_version.0,
                    live.record.artifact,
                    from.version,
                    from.security_version.0,
                    from.security_version.0
                ),
            );
        }
        let devices: Vec<DeviceId> = live
            .progress
            .iter()
            .filter(|(_, p)| p.state == DeviceState::Succeeded)
            .map(|(d, _)| d.clone())
            .collect();
        if devices.is_empty() {
            return refuse(
                "empty_target",
                format!("no device of {campaign} took its release"),
            );
        }
        if !dry_run && !live.record.status.is_final() {
            let actions = match self.campaigns.get_mut(campaign) {
                Some(l) => l
                    .rollout
                    .abort(format!("rolled back by {operator}"))
                    .unwrap_or_default(),
                None => Vec::new(),
            };
            self.apply_rollout(campaign, actions, now_ms())?;
        }
        let target = Target::Devices(devices.clone());
        self.start_campaign(
            operator,
            to,
            target,
            devices,
            policy,
            dry_run,
            Some(campaign.clone()),
        )
    }

    /// New root metadata from an operator: accepted only if it walks forward from the root the
    /// orchestrator trusts (thresholds of the old and the new root keys, revocations kept), and
    /// written to the trust directory before it counts.
    fn trust_update(
        &mut self,
        operator: &OperatorId,
        roots: &[aloft_proto::trust::SignedRoot],
    ) -> AdminResult {
        let dir = self.cfg.trust_dir.clone();
        match self.cfg.trust.accept(roots, dir.as_deref()) {
            Ok(n) => {
                let version = self.cfg.trust.trusted.version();
                info!(%operator, version, accepted = n, "root of trust updated");
                Ok(Ok(json!({"version": version, "accepted": n})))
            }
            Err(e) => {
                self.metrics.rejected("admin", "untrusted_root");
                warn!(%operator, error = %e, "root update refused");
                refuse("untrusted_root", e.to_string())
            }
        }
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
            match self.store.device(d)? {
                Some(r) => records.push(r),
                None => return refuse("unknown_device", format!("device {d} is not registered")),
            }
        }
        for mut r in records {
            for k in remove {
                r.labels.remove(k);
            }
            r.labels
                .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
            self.store.put_device(&r)?;
        }
        self.dirty = true;
        Ok(Ok(json!({"labelled": devices.len()})))
    }

    fn resolve(&self, target: &Target) -> Result<Result<Vec<DeviceId>, AdminError>, StoreError> {
        let all = self.store.devices()?;
        let ids = match target {
            Target::All => all.into_iter().map(|d| d.id).collect(),
            Target::Group(g) => all
                .into_iter()
                .filter(|d| d.groups.contains(g))
                .map(|d| d.id)
                .collect(),
            Target::Labels(want) => all
                .into_iter()
                .filter(|d| want.iter().all(|(k, v)| d.labels.get(k) == Some(v)))
                .map(|d| d.id)
                .collect(),
            Target::Devices(ids) => {
                let known: HashSet<_> = all.into_iter().map(|d| d.id).collect();
                if let Some(missing) = ids.iter().find(|i| !known.contains(*i)) {
                    return Ok(Err(AdminError::new(
                        "unknown_device",
                        format!("device {missing} is not registered"),
                    )));
                }
                let mut v = ids.clone();
                v.sort();
                v.dedup();
                v
            }
        };
        Ok(Ok(ids))
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

/// Label keys and values: 1 to 63 characters of `a-z A-Z 0-9 . _ -`.
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

fn valid_label(k: &str, v: &str) -> bool {
    let ok = |s: &str| {
        (1..=63).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    ok(k) && ok(v)
}

fn summary(live: &LiveCampaign, with_devices: bool) -> CampaignSummary {
    let counts: BTreeMap<String, u32> = live
        .counts()
        .into_iter()
        .map(|(s, n)| (s.as_str().to_owned(), n))
        .collect();
    let mut reasons = BTreeMap::new();
    for p in live.progress.values() {
        if let Some(r) = p.reason {
            *reasons.entry(r.as_str().to_owned()).or_insert(0) += 1;
        }
    }
    let mut devices: Vec<DeviceSummary> = if with_devices {
        live.progress
            .iter()
            .map(|(d, p)| DeviceSummary {
                device: d.clone(),
                state: p.state,
                reason: p.reason,
                wave: live.rollout.wave_of(d).unwrap_or(0),
                unhealthy: p.unhealthy,
            })
            .collect()
    } else {
        Vec::new()
    };
    devices.sort_by(|a, b| a.device.cmp(&b.device));
    CampaignSummary {
        campaign: live.record.id.clone(),
        artifact: live.record.artifact.clone(),
        status: live.record.status,
        total: live.progress.len() as u32,
        counts,
        reasons,
        created_ms: live.record.created_ms,
        finished_ms: live.record.finished_ms,
        reason: live.rollout.state().reason.clone(),
        policy: live.record.policy.clone(),
        waves: live
            .rollout
            .waves()
            .iter()
            .enumerate()
            .map(|(w, c)| WaveSummary {
                wave: w as u32,
                counts: *c,
                opened_ms: live.rollout.state().opened_ms.get(w).copied(),
                finished_ms: live.rollout.state().finished_ms.get(w).copied(),
            })
            .collect(),
        unhealthy: live.progress.values().filter(|p| p.unhealthy).count() as u32,
        rolls_back: live.record.rolls_back.clone(),
        devices,
    }
}

fn valid_group(g: &str) -> bool {
    aloft_proto::CampaignId::new(g).is_ok()
}

fn new_campaign_id() -> CampaignId {
    let mut r = [0u8; 6];
    // Without OS randomness the id falls back to the clock alone, which is still unique enough
    // for one orchestrator creating campaigns one at a time.
    let _ = crypto::random_bytes(&mut r);
    let id = format!("c-{:x}-{}", now_ms() / 1000, hex::encode(r));
    // The format above only produces valid ids; the fallback keeps this free of panics.
    CampaignId::new(id).unwrap_or_else(|_| CampaignId::new("c-0").expect("literal id is valid"))
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
