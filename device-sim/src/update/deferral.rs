//! (1.5) How the agent applies a manifest's preconditions: it asks its [`Environment`] at the
//! download and install gates, reports `deferred` with the reason when a condition does not
//! hold (once per reason), keeps what it has downloaded, checks again every
//! [`AgentConfig::precondition_recheck_ms`], and goes on (`downloading` again, or straight
//! into `installing`) once they hold. The judgement itself is [`preconditions::check`].

use super::preconditions::{self, Stage, Unmet};
use super::*;

impl UpdateAgent {
    /// The download gate's verdict, if one is due: the manifest gates the download (a metered
    /// limit, or install conditions checked early) and the last check is a recheck interval
    /// old. Sets the next check time.
    pub(super) fn download_verdict(&mut self, now: u64) -> Option<Result<(), Unmet>> {
        let (Some(cur), Some(s)) = (&self.record.current, &self.session) else {
            return None;
        };
        let p = s.preconditions.as_ref()?;
        if p.max_metered_bytes.is_none() && !p.check_before_download {
            return None;
        }
        if self.precondition_check_at.is_some_and(|t| now < t) {
            return None;
        }
        self.precondition_check_at = Some(now.saturating_add(self.cfg.precondition_recheck_ms));
        let missing = u64::from(cur.written.len().saturating_sub(cur.written.count()));
        let remaining_bytes = missing
            .saturating_mul(u64::from(s.manifest.chunk_size))
            .min(s.manifest.image_size);
        let c = self.env.conditions(now);
        Some(preconditions::check(
            p,
            &c,
            Stage::Download { remaining_bytes },
        ))
    }

    /// While downloading: stops the download (keeping its chunks) when the gate closes, and
    /// resumes it when it opens again.
    pub(super) fn download_gate(&mut self, now: u64) {
        match self.download_verdict(now) {
            Some(Err(unmet)) => self.defer(unmet),
            Some(Ok(())) => self.resume_download(),
            None => {}
        }
    }

    /// Ends a deferral of the download: the orchestrator learns the device downloads again
    /// (it serves chunks only then), and requests wait until that report is out.
    pub(super) fn resume_download(&mut self) {
        let Some(cur) = &mut self.record.current else {
            return;
        };
        if cur.deferred.take().is_none() {
            return;
        }
        info!(device = %self.cfg.device, campaign = %cur.campaign, "preconditions hold; download resumes");
        if let Some(s) = &mut self.session {
            s.requests_enabled = false;
        }
        self.report(DeviceState::Downloading, None, None);
    }

    /// The image is downloaded and verified: whether it may be installed now. A deferred
    /// image is checked again only once its recheck time has come.
    pub(super) fn install_gate(&mut self, now: u64) -> bool {
        let (Some(cur), Some(s)) = (&self.record.current, &self.session) else {
            return true;
        };
        let Some(p) = s.preconditions.clone() else {
            return true;
        };
        let deferred = cur.deferred.is_some();
        if deferred && self.precondition_check_at.is_some_and(|t| now < t) {
            return false;
        }
        self.precondition_check_at = Some(now.saturating_add(self.cfg.precondition_recheck_ms));
        let c = self.env.conditions(now);
        match preconditions::check(&p, &c, Stage::Install) {
            Ok(()) => {
                if let Some(cur) = &mut self.record.current {
                    if cur.deferred.take().is_some() {
                        info!(device = %self.cfg.device, campaign = %cur.campaign, "preconditions hold; installing");
                        self.dirty(Persist::Now);
                    }
                }
                true
            }
            Err(unmet) => {
                self.defer(unmet);
                false
            }
        }
    }

    /// Reports `deferred` with `unmet`'s reason, unless that reason is already reported; the
    /// phase and everything written stay.
    pub(super) fn defer(&mut self, unmet: Unmet) {
        let Some(cur) = &mut self.record.current else {
            return;
        };
        if cur.deferred == Some(unmet.reason) {
            return;
        }
        cur.deferred = Some(unmet.reason);
        info!(device = %self.cfg.device, campaign = %cur.campaign, reason = %unmet.reason, detail = %unmet.detail, "update deferred");
        if let Some(s) = &mut self.session {
            s.forget_outstanding();
        }
        self.stats.deferrals += 1;
        self.report(
            DeviceState::Deferred,
            Some(unmet.reason),
            Some(clip(unmet.detail)),
        );
    }
}
