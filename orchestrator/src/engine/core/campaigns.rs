//! Campaign operations from operators: create (membership, policy, dry run), pause, resume,
//! abort, roll back, and the summaries `campaign_status` and `campaign_list` return.

use super::*;
use crate::admin::wire::{AdminError, CampaignSummary, DeviceSummary, DryRun, WaveSummary};
use crate::rollout::{Plan, RolloutPolicy, RolloutState};
use crate::store::{CampaignRecord, Target};
use serde_json::json;

impl Core {
    /// Resolves the membership, then (unless `dry_run`) stores the campaign and lets its
    /// rollout notify the first wave before this batch commits.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn campaign_create(
        &mut self,
        operator: &OperatorId,
        artifact: &ArtifactId,
        target: Target,
        include: &[DeviceId],
        exclude: &[DeviceId],
        policy: RolloutPolicy,
        dry_run: bool,
        origin: Option<String>,
    ) -> AdminResult {
        if let Some(o) = &origin {
            if let Err(e) = aloft_proto::origin::validate_origin(o) {
                return refuse("invalid_origin", e.to_string());
            }
        }
        let mut devices = self.resolve(&target)?;
        devices.extend(self.resolve(&Target::Devices(include.to_vec()))?);
        let excluded: HashSet<&DeviceId> = exclude.iter().collect();
        devices.retain(|d| !excluded.contains(d));
        devices.sort();
        devices.dedup();
        self.start_campaign(
            operator, artifact, target, devices, policy, dry_run, None, origin,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_campaign(
        &mut self,
        operator: &OperatorId,
        artifact: &ArtifactId,
        target: Target,
        devices: Vec<DeviceId>,
        policy: RolloutPolicy,
        dry_run: bool,
        rolls_back: Option<CampaignId>,
        origin: Option<String>,
    ) -> AdminResult {
        let Some(release) = self.releases.get(artifact).cloned() else {
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
        if let Err(e) = self.trust.trusted.check_fresh(self.now / 1000) {
            return refuse("root_expired", format!("{e}; push a newer root first"));
        }
        // A key revoked (or a threshold raised) since the upload stops the release here too:
        // devices would refuse it anyway, one by one.
        if let Err(e) = self.trust.trusted.verify_manifest(&release.signed) {
            return refuse(
                "untrusted_release",
                format!(
                    "{artifact} no longer verifies under root version {}: {e}",
                    self.trust.trusted.version()
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
        if let Some(refusal) = self.replay_blocked(&release.manifest, &devices) {
            return Err(refusal);
        }
        if dry_run {
            let plan = Plan::new(artifact, &devices, &policy);
            return Ok(json!(DryRun {
                artifact: artifact.clone(),
                total: devices.len() as u32,
                policy,
                waves: plan.waves(),
            }));
        }
        let id = self.new_campaign_id();
        let now = self.now;
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
            origin,
        };
        self.write(Write::Campaign(record.clone()));
        let mut progress = std::collections::HashMap::new();
        for d in &devices {
            let p = Progress::new(now);
            self.put_progress(&id, d, &p);
            progress.insert(d.clone(), p);
        }
        let deltas = self.deltas_for(&release.manifest);
        let live = LiveCampaign::new(record, &release, key, progress, deltas);
        let waves = live.rollout.waves().len();
        self.campaigns.insert(id.clone(), live);
        self.touched.insert(id.clone());
        info!(%operator, campaign = %id, %artifact, devices = devices.len(), waves, excluded_revoked, "campaign created");
        Ok(
            json!({"campaign": id, "devices": devices.len(), "waves": waves, "excluded_revoked": excluded_revoked}),
        )
    }

    /// Pause, resume or abort, by an operator.
    pub(super) fn campaign_control(
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
        self.apply_rollout(campaign, actions, self.now);
        // An operator's pause is not one the rollout decided (the alert is for the latter).
        self.metrics
            .campaign_paused_by_rollout(campaign.as_str(), false);
        self.touched.insert(campaign.clone());
        let status = self.campaigns.get(campaign).map(|l| l.record.status);
        Ok(json!({"campaign": campaign, "status": status}))
    }

    /// A new campaign that returns the devices that took `campaign`'s release to `to`.
    pub(super) fn campaign_rollback(
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
        let Some(target) = self.releases.get(to) else {
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
        // Those devices also raised their installed sequence to the release's, and refuse a
        // manifest whose sequence is not above it, whatever its security version.
        if let (Some(old), Some(new)) = (from.sequence, target.manifest.sequence) {
            if new <= old {
                return refuse(
                    "replay_blocked",
                    format!(
                        "{to} has manifest sequence {new} but devices that took {} installed sequence {old}, \
                         and devices refuse a sequence not above the one they installed; {}",
                        live.record.artifact,
                        resign_hint(to)
                    ),
                );
            }
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
            self.apply_rollout(campaign, actions, self.now);
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
            // A rollback's release need not be exported: its devices use chunk requests.
            None,
        )
    }

    /// Refuses a release that members would refuse as a replay: its manifest sequence is not
    /// above the one a member last installed (as recorded when it reported `succeeded`).
    fn replay_blocked(&self, manifest: &Manifest, devices: &[DeviceId]) -> Option<AdminError> {
        let seq = manifest.sequence?;
        let mut blocked = Vec::new();
        let mut highest = 0;
        for d in devices {
            let installed = self.devices.get(d).and_then(|r| r.installed_sequence);
            if let Some(i) = installed.filter(|i| *i >= seq) {
                blocked.push(d.as_str());
                highest = highest.max(i);
            }
        }
        if blocked.is_empty() {
            return None;
        }
        let n = blocked.len();
        blocked.truncate(5);
        let more = if n > blocked.len() { ", …" } else { "" };
        Some(AdminError::new(
            "replay_blocked",
            format!(
                "{} has manifest sequence {seq} but {n} of the {} targeted devices ({}{more}) installed \
                 sequence {highest} or later, and devices refuse a sequence not above the one they \
                 installed; {}, or leave those devices out (--exclude)",
                manifest.artifact,
                devices.len(),
                blocked.join(", "),
                resign_hint(&manifest.artifact)
            ),
        ))
    }

    pub(super) fn resolve(&self, target: &Target) -> Result<Vec<DeviceId>, AdminError> {
        let all = self.devices.values();
        let ids = match target {
            Target::All => all.map(|d| d.id.clone()).collect(),
            Target::Group(g) => all
                .filter(|d| d.groups.contains(g))
                .map(|d| d.id.clone())
                .collect(),
            Target::Labels(want) => all
                .filter(|d| want.iter().all(|(k, v)| d.labels.get(k) == Some(v)))
                .map(|d| d.id.clone())
                .collect(),
            Target::Devices(ids) => {
                if let Some(missing) = ids.iter().find(|i| !self.devices.contains_key(*i)) {
                    return Err(AdminError::new(
                        "unknown_device",
                        format!("device {missing} is not registered"),
                    ));
                }
                let mut v = ids.clone();
                v.sort();
                v.dedup();
                v
            }
        };
        Ok(ids)
    }
}

/// A campaign's summary without what costs a pass over its members (per-device rows, failure
/// reasons, delivery paths): for the board, after every batch that touched the campaign.
pub(super) fn summary_light(live: &LiveCampaign) -> CampaignSummary {
    let waves: Vec<WaveSummary> = live
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
        .collect();
    CampaignSummary {
        campaign: live.record.id.clone(),
        artifact: live.record.artifact.clone(),
        status: live.record.status,
        total: live.progress.len() as u32,
        counts: live
            .counts()
            .into_iter()
            .map(|(s, n)| (s.as_str().to_owned(), n))
            .collect(),
        reasons: BTreeMap::new(),
        created_ms: live.record.created_ms,
        finished_ms: live.record.finished_ms,
        reason: live.rollout.state().reason.clone(),
        policy: live.record.policy.clone(),
        unhealthy: waves.iter().map(|w| w.counts.unhealthy).sum(),
        waves,
        rolls_back: live.record.rolls_back.clone(),
        paths: BTreeMap::new(),
        devices: Vec::new(),
    }
}

/// A campaign's full summary: the light one, and what costs a pass over its members.
pub(super) fn summary(live: &LiveCampaign, with_devices: bool) -> CampaignSummary {
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
        reasons,
        unhealthy: live.progress.values().filter(|p| p.unhealthy).count() as u32,
        paths: live.path_counts(),
        devices,
        ..summary_light(live)
    }
}

/// How an operator gets an old image past the devices' replay check.
fn resign_hint(artifact: &ArtifactId) -> String {
    format!(
        "re-sign the image as a new release with a fresh sequence \
         (`aloft release resign --bundle <bundle of {artifact}> --version <new version> --key <release key> --out-dir <dir>`), \
         upload it and use that"
    )
}
