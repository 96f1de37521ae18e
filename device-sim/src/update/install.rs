//! The phases after the download, as the bootloader and the device's own watchdog see them:
//! install into the boot slot, reset, verify the new image within its confirm deadline and boot
//! limit, confirm (raising the floor and the installed sequence) or fall back to the Valid slot;
//! what a power-on does to an update in flight; and the heartbeats a confirmed image sends.

use super::*;

impl UpdateAgent {
    /// Boots the slot the bootloader would, and ends a campaign whose new image was reset before
    /// it confirmed. An image installed but never booted is simply booted: `advance` verifies it.
    pub(super) fn power_on(&mut self) {
        let outcome = self.record.slots.power_on(self.cfg.boot_limit);
        if outcome == PowerOn::Unchanged {
            return;
        }
        self.dirty(Persist::Now);
        if outcome != PowerOn::FellBack {
            return;
        }
        let Some(phase) = self.current().map(|(_, p)| p) else {
            warn!(device = %self.cfg.device, "fell back from an unconfirmed image outside any campaign");
            return;
        };
        warn!(device = %self.cfg.device, %phase, "reset before the new image confirmed; the bootloader fell back");
        // The image runs only from `rebooting` on, so an earlier phase here means a record that
        // does not add up; `failed` is legal from every phase, `rolled_back` is not.
        let state = if phase >= DeviceState::Rebooting {
            DeviceState::RolledBack
        } else {
            DeviceState::Failed
        };
        self.finish(
            state,
            Some(Reason::BootFailed),
            Some("reset before the new image confirmed; booted the previous image".into()),
        );
    }

    /// A heartbeat, if one is due: only while a campaign's image runs confirmed.
    pub(super) fn publish_heartbeat(&mut self, now: u64, out: &mut Vec<Output>) {
        if self.cfg.heartbeat_ms == 0 || self.record.slots.running_meta().state != SlotState::Valid
        {
            return;
        }
        let Some(campaign) = &self.record.installed_by else {
            return;
        };
        let due = self
            .last_heartbeat
            .is_none_or(|t| now.saturating_sub(t) >= self.cfg.heartbeat_ms);
        if !due {
            return;
        }
        let app = self.health.app_health(now);
        let beat = Heartbeat {
            v: messages::PROTOCOL_VERSION,
            campaign: Some(campaign.clone()),
            running_version: self.record.running_version().to_owned(),
            healthy: app.healthy,
            detail: app.detail.map(clip),
        };
        out.push(Output::Publish {
            topic: OutTopic::Health,
            payload: messages::encode(&beat),
        });
        self.last_heartbeat = Some(now);
        self.stats.heartbeats_sent += 1;
    }

    /// (1.5) The patch of a delta is all written: check it, mark the rebuild begun (saved
    /// before the slot is overwritten), then rebuild the image over it. Returns true when the
    /// session now holds the full image (rebuilt, or a fresh download after a fallback) and
    /// `advance` should go on, false to wait for the next input (the record must be saved).
    fn advance_delta(&mut self, flash: &mut dyn Flash) -> bool {
        let (Some(cur), Some(session)) = (&mut self.record.current, &mut self.session) else {
            return false;
        };
        let Some(mut progress) = cur.delta else {
            return false;
        };
        let update = self.record.slots.update_slot();
        let running = self.record.slots.running_slot();
        // An intact patch is one whose signed digest still matches: after a power loss in the
        // rebuild it is not, and the device falls back instead of rebuilding from a torn patch.
        let intact = download::verify_image(flash, update, &session.manifest);
        flash.release();
        if !matches!(intact, Ok(true)) {
            let why = if progress.rebuilding {
                "the patch was overwritten by an interrupted rebuild"
            } else {
                "the patch does not match its digest"
            };
            return self.fall_back_to_full(why, flash);
        }
        if !progress.rebuilding {
            progress.rebuilding = true;
            cur.delta = Some(progress);
            self.dirty(Persist::Now);
            return false;
        }
        let full = match &self.trust {
            Ok(trust) => verify_signature(self.cfg.manifests.as_deref(), trust, &cur.job.manifest),
            Err(e) => Err(Refusal::new(Reason::UntrustedRoot, e)),
        };
        let full = match full {
            Ok(m) => m,
            Err(r) => {
                self.fail(r.reason, Some(r.detail));
                return true;
            }
        };
        let rebuilt = delta::rebuild(flash, running, update, &session.manifest, &full);
        flash.release();
        match rebuilt {
            Ok(_) => {
                info!(device = %self.cfg.device, campaign = %cur.campaign, "image rebuilt from the delta");
                self.stats.delta_rebuilds += 1;
                let mut written = ChunkBitmap::new(full.chunk_count);
                for i in 0..full.chunk_count {
                    written.set(i);
                }
                cur.written = written;
                cur.delta = None;
                let enabled = session.requests_enabled;
                let mut next = self.new_session(full, None);
                next.requests_enabled = enabled;
                self.session = Some(next);
                self.dirty(Persist::Now);
                true
            }
            Err(why) => self.fall_back_to_full(&why, flash),
        }
    }

    /// (1.5) Gives up a delta for the full image of the same campaign, which the job always
    /// offers: no report (the device is still `downloading`), a fresh download into the
    /// update slot, the running slot untouched.
    pub(super) fn fall_back_to_full(&mut self, why: &str, flash: &mut dyn Flash) -> bool {
        warn!(device = %self.cfg.device, why, "delta abandoned; downloading the full image");
        self.stats.delta_fallbacks += 1;
        let Some(cur) = &mut self.record.current else {
            return false;
        };
        cur.delta = None;
        let checked = match &self.trust {
            Ok(trust) => verify_signature(self.cfg.manifests.as_deref(), trust, &cur.job.manifest)
                .and_then(|m| {
                    unwrap_key(&self.key, &self.cfg.device, &cur.job, &m).map(|k| (m, k))
                }),
            Err(e) => Err(Refusal::new(Reason::UntrustedRoot, e)),
        };
        let (manifest, key) = match checked {
            Ok(x) => x,
            Err(r) => {
                self.fail(r.reason, Some(r.detail));
                return true;
            }
        };
        cur.written = ChunkBitmap::new(manifest.chunk_count);
        self.record.slots.invalidate_update_slot();
        let update = self.record.slots.update_slot();
        let prepared = flash.begin_update(update, manifest.image_size);
        flash.release();
        if let Err(e) = prepared {
            self.fail(Reason::InstallFailed, Some(e.to_string()));
            return true;
        }
        let enabled = self.session.as_ref().is_some_and(|s| s.requests_enabled);
        let mut next = self.new_session(manifest, Some(key));
        next.requests_enabled = enabled;
        self.session = Some(next);
        self.dirty(Persist::Now);
        false
    }

    /// Runs the phases after the download; each appends its report to the outbox.
    pub(super) fn advance(&mut self, now: u64, flash: &mut dyn Flash) {
        loop {
            let Some(cur) = &self.record.current else {
                return;
            };
            let (phase, complete, campaign) =
                (cur.phase, cur.written.is_complete(), cur.campaign.clone());
            // (1.5) The manifest's preconditions gate the download and the install.
            match phase {
                DeviceState::Downloading if !complete => {
                    self.download_gate(now);
                    return;
                }
                // Chunks in flight when the download was deferred may have completed it.
                DeviceState::Downloading => self.resume_download(),
                DeviceState::Downloaded if !self.install_gate(now) => return,
                _ => {}
            }
            let Some(session) = &mut self.session else {
                return;
            };
            let update = self.record.slots.update_slot();
            let version = session.manifest.version.clone();
            let security_version = session.manifest.security_version;
            let sequence = session.manifest.sequence;
            match phase {
                DeviceState::Downloading => {
                    if !complete {
                        return;
                    }
                    if session.manifest.delta.is_some() {
                        if self.advance_delta(flash) {
                            continue;
                        }
                        return;
                    }
                    session.drop_key();
                    let verified = download::verify_image(flash, update, &session.manifest);
                    flash.release();
                    match verified {
                        Ok(true) => self.enter(DeviceState::Downloaded),
                        Ok(false) => {
                            self.record.slots.mark_update_slot_invalid();
                            self.fail(Reason::ImageVerificationFailed, None);
                        }
                        Err(e) => self.fail(Reason::InstallFailed, Some(e.to_string())),
                    }
                }
                DeviceState::Downloaded => match flash.set_boot_slot(update) {
                    Ok(()) => {
                        let sha = session.manifest.image_sha256.clone();
                        self.record.slots.install_update(&version, security_version);
                        self.record.slots.set_update_image_sha256(&sha);
                        self.enter(DeviceState::Installing);
                    }
                    Err(e) => self.fail(Reason::InstallFailed, Some(e.to_string())),
                },
                DeviceState::Installing => {
                    // The report says what is about to happen, so it precedes the reset.
                    self.enter(DeviceState::Rebooting);
                    self.reboot_at = Some(now.saturating_add(self.cfg.reboot_delay_ms));
                }
                DeviceState::Rebooting => {
                    let slots = &mut self.record.slots;
                    if slots.running_slot() != slots.boot_slot() {
                        // Not reset yet. After a power-on the bootloader has already booted the
                        // new image, so a pending reset exists only in this process's memory.
                        if self.reboot_at.is_some_and(|t| now < t) {
                            return;
                        }
                        slots.reboot();
                        self.dirty(Persist::Now);
                    }
                    self.reboot_at = None;
                    if self.record.slots.running_meta().state != SlotState::Unverified {
                        // The boot slot never held the new image: nothing to verify.
                        self.fail(
                            Reason::InstallFailed,
                            Some("the new image is not in the boot slot".into()),
                        );
                        continue;
                    }
                    self.verifying_since = Some(now);
                    self.enter(DeviceState::Verifying);
                }
                DeviceState::Verifying => {
                    let since = *self.verifying_since.get_or_insert(now);
                    let deadline = since.saturating_add(self.cfg.confirm_deadline_ms);
                    // A watchdog resets a device that has not confirmed in time, whatever its
                    // check would say later; a verdict reached before the deadline stands even
                    // if this step comes after it (a simulated check keeps its own time, see
                    // `HealthCheck::decided_at`).
                    let status = self.health.check(now, &campaign, &version);
                    let in_time =
                        status != HealthStatus::Pending && self.health.decided_at(now) < deadline;
                    if !in_time {
                        if now < deadline {
                            return;
                        }
                        let detail = format!(
                            "not confirmed within {} ms of the reset",
                            self.cfg.confirm_deadline_ms
                        );
                        self.abandon_new_image(flash, Reason::BootFailed, Some(detail));
                        continue;
                    }
                    match status {
                        HealthStatus::Pending => return,
                        HealthStatus::Healthy => {
                            self.record.slots.mark_running_slot_valid();
                            // The floor rises only here, after a confirmed healthy boot: raising
                            // it earlier would leave a device whose new image fails unable to
                            // fall back.
                            self.record.floor = self.record.floor.max(security_version);
                            // Replay protection moves with the floor, for the same reason.
                            self.record.installed_sequence =
                                self.record.installed_sequence.max(sequence);
                            self.record.installed_by = Some(campaign.clone());
                            // The first heartbeat of the new image goes out at once.
                            self.last_heartbeat = None;
                            info!(device = %self.cfg.device, %campaign, %version, "update succeeded");
                            self.finish(DeviceState::Succeeded, None, None);
                        }
                        HealthStatus::Unhealthy => {
                            self.abandon_new_image(flash, Reason::HealthCheckFailed, None);
                        }
                    }
                }
                other => {
                    // Not a phase a record can hold; close the campaign rather than loop.
                    warn!(device = %self.cfg.device, state = %other, "campaign in an unexpected phase");
                    self.fail(
                        Reason::InstallFailed,
                        Some(format!("unexpected phase {other}")),
                    );
                }
            }
        }
    }

    /// Marks the running (new, unconfirmed) image invalid, boots back into the previous one and
    /// reports `rolled_back` with `reason`.
    fn abandon_new_image(&mut self, flash: &mut dyn Flash, reason: Reason, detail: Option<String>) {
        self.record.slots.roll_back();
        let old = self.record.slots.running_slot();
        if let Err(e) = flash.set_boot_slot(old) {
            warn!(device = %self.cfg.device, error = %e, "setting the boot slot back failed");
        }
        warn!(device = %self.cfg.device, reason = %reason, "new image abandoned; rolled back");
        self.finish(DeviceState::RolledBack, Some(reason), detail.map(clip));
    }
}
