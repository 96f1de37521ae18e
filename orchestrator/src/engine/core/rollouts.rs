//! Carrying out rollouts: each campaign's `Rollout` is moved forward after every batch that
//! touched it and on the engine's tick; its actions become progress writes, job orders and
//! withdrawals, and its own status changes go to the audit log.

use super::*;

impl Core {
    /// Publishes the job of every member in flight again: the embedded broker keeps no retained
    /// messages across restarts. Members of a final campaign get nothing new.
    pub(super) fn republish_jobs(&mut self, id: &CampaignId) {
        let now = self.now;
        let Some(live) = self.campaigns.get(id) else {
            return;
        };
        if live.record.status.is_final() {
            return;
        }
        let jobs: Vec<DeviceId> = live
            .progress
            .iter()
            .filter(|(_, p)| p.state != DeviceState::Idle && !p.state.is_terminal())
            .map(|(d, _)| d.clone())
            .collect();
        for device in jobs {
            self.publish_job(id, &device, now);
        }
    }

    /// Orders one member's job: the one stored for it if it has one (republished byte for
    /// byte), else a new one, whose content key the shell wraps for it alone and stores before
    /// the job leaves.
    pub(super) fn publish_job(&mut self, id: &CampaignId, device: &DeviceId, now: u64) {
        let Some(record) = self.devices.get(device) else {
            warn!(%device, "campaign member is not registered; no job");
            return;
        };
        if self.is_revoked(record) {
            // Fail closed: no content key is ever wrapped to a revoked certificate's key, and
            // a job stored before the revocation is not published again either.
            self.metrics.rejected("job", "revoked");
            warn!(%device, campaign = %id, "device certificate is revoked; no job, member failed");
            self.move_member(id, device, DeviceState::Failed, Some(Reason::Revoked), now);
            self.withdraw_job(device, id, Reason::Revoked);
            self.touched.insert(id.clone());
            return;
        }
        let public: Option<[u8; 32]> = hex::decode(&record.x25519_public)
            .ok()
            .and_then(|b| b.try_into().ok());
        let Some(x25519_public) = public else {
            warn!(%device, "cannot wrap the content key for device: its recorded x25519 key is malformed");
            return;
        };
        let Some(live) = self.campaigns.get(id) else {
            return;
        };
        let wrapped_to = hex::encode(x25519_public);
        let stored = match live.jobs.get(device) {
            Some(job) if job.wrapped_to == wrapped_to => Some(job.clone()),
            Some(_) => {
                // Registered again with another key: the stored keys cannot be opened by it.
                info!(%device, campaign = %id, "device's key changed since its job was made; a new job is made");
                None
            }
            None => None,
        };
        let (template, roots) = match &stored {
            Some(job) => {
                let Some(template) = self.template_of(live, job) else {
                    warn!(%device, campaign = %id, "a delta release of the stored job is missing; no job");
                    return;
                };
                (template, self.roots_at(job.root_version))
            }
            None => (live.job.clone(), self.roots.clone()),
        };
        let order = JobOrder {
            device: device.clone(),
            x25519_public,
            template,
            roots,
            root_version: self.trust.trusted.version(),
            issued_at_ms: now,
            stored,
        };
        self.fx.after_commit.push(Out::Job(order));
    }

    /// The campaign's part of a stored job: the campaign's template, unless the job was made
    /// with other delta offers than the template holds now (a delta release uploaded or a root
    /// accepted since); then a template with exactly the job's. `None` if one of its delta
    /// releases is gone.
    fn template_of(&self, live: &LiveCampaign, job: &MemberJob) -> Option<Arc<JobTemplate>> {
        let same = job.deltas.len() == live.job.deltas.len()
            && job
                .deltas
                .iter()
                .zip(&live.job.deltas)
                .all(|((artifact, _), d)| artifact == &d.artifact);
        if same {
            return Some(live.job.clone());
        }
        let mut deltas = Vec::with_capacity(job.deltas.len());
        for (artifact, _) in &job.deltas {
            let release = self.releases.get(artifact)?;
            deltas.push(DeltaTemplate {
                artifact: artifact.clone(),
                signed: release.signed.clone(),
                key: parse_key_hex(&release.content_key_hex)?,
                chunk_count: release.manifest.chunk_count,
            });
        }
        let mut template = (*live.job).clone();
        template.deltas = deltas;
        Some(Arc::new(template))
    }

    /// The chain of roots a job made when `version` was the newest carries.
    fn roots_at(&self, version: u64) -> Arc<Vec<SignedRoot>> {
        if version == self.trust.trusted.version() {
            self.roots.clone()
        } else {
            Arc::new(self.trust.job_chain_at(version))
        }
    }

    /// Withdraws a device's job (PROTOCOL.md §5.2): a device downloading stops. First the empty
    /// payload that clears the retained job, which connected devices of every version act on;
    /// then a retained `Withdrawal`, which a device subscribing later (offline now) receives.
    pub(super) fn withdraw_job(
        &mut self,
        device: &DeviceId,
        campaign: &CampaignId,
        reason: Reason,
    ) {
        let topic = topics::job(device);
        self.send(topic.clone(), Vec::new(), true);
        let w = messages::Withdrawal {
            v: PROTOCOL_VERSION,
            withdrawn: messages::Withdrawn {
                campaign: campaign.clone(),
                reason,
            },
        };
        self.send(topic, messages::encode(&w), true);
    }

    /// Moves a campaign's rollout to `now` and carries out what it decides.
    /// With `timers` (the engine's timer went off since the last settle) it looks for
    /// timeouts too, a pass over the members in flight; after events alone it does not.
    pub(super) fn tick_rollout(&mut self, id: &CampaignId, now: u64, timers: bool) {
        let Some(live) = self.campaigns.get_mut(id) else {
            return;
        };
        let actions = if timers {
            live.rollout.tick(now)
        } else {
            live.rollout.step(now)
        };
        // A status the rollout reached by itself (a threshold, the deadline, the end) goes to
        // the audit log; operators' own actions are logged with their request.
        let reason = live.rollout.state().reason.clone().unwrap_or_default();
        for a in &actions {
            if let Action::Status(status) = a {
                self.audit(AuditEvent {
                    actor: "orchestrator".into(),
                    action: format!("campaign_{status}"),
                    subject: id.to_string(),
                    outcome: reason.clone(),
                });
            }
        }
        self.apply_rollout(id, actions, now);
        // The rest of a wave larger than one tick's slice follows at the next settle, which
        // the shell runs without waiting (`Core::has_more`).
        if self
            .campaigns
            .get(id)
            .is_some_and(|l| l.rollout.more_to_notify())
        {
            self.touched.insert(id.clone());
        }
    }

    /// Carries out a rollout's decisions, then stores its state if it changed.
    pub(super) fn apply_rollout(&mut self, id: &CampaignId, actions: Vec<Action>, now: u64) {
        for action in actions {
            match action {
                Action::Notify(d) => {
                    self.notified_at.insert((id.clone(), d.clone()), now);
                    self.move_member(id, &d, DeviceState::Notified, None, now);
                    self.publish_job(id, &d, now);
                }
                Action::TimeOut(d) => {
                    self.move_member(id, &d, DeviceState::Failed, Some(Reason::TimedOut), now);
                    self.withdraw_job(&d, id, Reason::TimedOut);
                }
                Action::Cancel(d) => {
                    self.move_member(id, &d, DeviceState::Failed, Some(Reason::Cancelled), now);
                    self.withdraw_job(&d, id, Reason::Cancelled);
                }
                Action::Withdraw(d) => self.withdraw_job(&d, id, Reason::Cancelled),
                Action::WaveOpened(n) => {
                    self.metrics.wave_opened(id.as_str(), n);
                    info!(campaign = %id, wave = n, "wave opened");
                }
                Action::Status(status) => {
                    // A pause the rollout decides itself; `campaign_control` clears the gauge
                    // again when an operator's command caused it.
                    self.metrics.campaign_paused_by_rollout(
                        id.as_str(),
                        status == crate::model::CampaignStatus::Paused,
                    );
                    let reason = self
                        .campaigns
                        .get(id)
                        .and_then(|l| l.rollout.state().reason.clone())
                        .unwrap_or_default();
                    info!(campaign = %id, %status, %reason, "campaign status changed");
                }
            }
        }
        let Some(live) = self.campaigns.get_mut(id) else {
            return;
        };
        if live.rollout.take_changed() {
            let status = live.rollout.status();
            if status.is_final() && live.record.finished_ms.is_none() {
                live.record.finished_ms = Some(now);
                info!(campaign = %id, counts = ?live.counts(), %status, "campaign ended");
            }
            live.record.status = status;
            live.record.rollout = live.rollout.state().clone();
            let record = live.record.clone();
            self.write(Write::Campaign(record));
        }
        self.refresh_gauges(id);
        self.publish_board(id);
    }

    /// Puts the campaign's summary on the board (O(states + waves)), for the console.
    fn publish_board(&self, id: &CampaignId) {
        let Some(live) = self.campaigns.get(id) else {
            return;
        };
        self.board.publish(super::campaigns::summary_light(live));
    }

    /// The orchestrator's own transition of a member (notify, time out, cancel).
    pub(super) fn move_member(
        &mut self,
        id: &CampaignId,
        device: &DeviceId,
        to: DeviceState,
        reason: Option<Reason>,
        now: u64,
    ) {
        let Some(live) = self.campaigns.get_mut(id) else {
            return;
        };
        let Some(next) = live
            .progress
            .get(device)
            .and_then(|p| state::advance(p, to, reason, now))
        else {
            return;
        };
        live.set(device, next.clone());
        self.put_progress(id, device, &next);
        if let Some(r) = reason {
            self.notified_at.remove(&(id.clone(), device.clone()));
            self.chunk_high.remove(device);
            self.metrics.failure(r.as_str());
            info!(%device, campaign = %id, reason = %r, "device stopped by the orchestrator");
        }
    }

    /// Re-exports a campaign's gauges.
    pub(super) fn refresh_gauges(&self, id: &CampaignId) {
        let Some(live) = self.campaigns.get(id) else {
            return;
        };
        let status = live.rollout.status();
        self.metrics.campaign_status(
            id.as_str(),
            status.as_str(),
            &crate::model::CampaignStatus::ALL.map(|s| s.as_str()),
        );
        let counts = live.counts();
        for s in DeviceState::ALL {
            let n = counts.get(&s).copied().unwrap_or(0);
            self.metrics
                .set_device_state(id.as_str(), s.as_str(), i64::from(n));
        }
    }
}
