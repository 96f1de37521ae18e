//! The rollout engine of one campaign, sans I/O: given the time, members' state changes,
//! heartbeats and operator actions, it decides whom to notify, whom to time out, when a wave
//! starts, and when the campaign pauses, aborts, expires or finishes. The engine
//! ([`crate::engine`]) persists and publishes what it decides; proptest drives it directly.
//!
//! ```text
//!            pause / threshold            abort / threshold
//!  Active ─────────────────────► Paused ─────────────────────► Aborted
//!    │  ◄───────── resume ─────────┘                              ▲
//!    ├──────────────────────────── abort / threshold ─────────────┘
//!    ├── deadline ──► Expired
//!    └── every wave open, every member finished, soak over ──► Finished
//! ```
//!
//! Waves open one at a time: wave `w+1` opens once `advance_at` of wave `w` has finished and
//! `soak_secs` have passed since. A member is notified only while the campaign is `Active`, its
//! wave is open, the schedule and maintenance window allow, and fewer than `concurrency` devices
//! are downloading. Thresholds are judged per wave on failed / finished, where a succeeded
//! device that reported itself unhealthy before its wave's soak ended counts as failed.
//!
//! (1.5) A `deferred` member (its manifest's preconditions do not hold yet) is in flight but
//! neither finished nor failed: thresholds ignore it, the silence timeout spares it (deferring
//! is waiting on purpose), it holds no download slot, and the campaign's deadline, or an abort,
//! ends it as `timed_out` or `cancelled`.

pub mod policy;
#[cfg(test)]
mod proptests;

use std::collections::HashMap;

use aloft_proto::{DeviceId, DeviceState};
use serde::{Deserialize, Serialize};

use crate::model::CampaignStatus;
pub use policy::{Plan, RolloutPolicy};

/// What a rollout keeps across restarts (stored with the campaign); members' states come from
/// their progress records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RolloutState {
    /// When each opened wave opened (Unix ms); its length is the number of open waves.
    pub opened_ms: Vec<u64>,
    /// When each wave reached `advance_at` (its soak started).
    pub finished_ms: Vec<u64>,
    /// Waves whose pause threshold an operator overrode by resuming.
    pub overridden: Vec<u32>,
    /// Why the campaign is paused, aborted or expired.
    pub reason: Option<String>,
}

/// Something the engine must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Move the member to `notified` and publish its job.
    Notify(DeviceId),
    /// Mark the member `failed` with `timed_out` and withdraw its job.
    TimeOut(DeviceId),
    /// Mark the member (notified, not started) `failed` with `cancelled` and withdraw its job.
    Cancel(DeviceId),
    /// Withdraw a downloading member's job; it stops and reports `cancelled` itself.
    Withdraw(DeviceId),
    /// Wave `n` (0-based) opened.
    WaveOpened(u32),
    /// The campaign's status changed (the reason is in the state).
    Status(CampaignStatus),
}

/// Per-wave counts, for thresholds and for the operator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveCounts {
    pub size: u32,
    pub notified: u32,
    pub downloading: u32,
    /// Downloaded, installing, rebooting or verifying.
    pub installing: u32,
    pub succeeded: u32,
    /// Succeeded, then reported unhealthy during the soak: a failure of the wave.
    pub unhealthy: u32,
    /// Failed or rolled back (timeouts and cancellations included).
    pub failed: u32,
    /// (1.5) Deferred by the manifest's preconditions: in flight, not a failure.
    #[serde(default)]
    pub deferred: u32,
}

impl WaveCounts {
    pub fn finished(&self) -> u32 {
        self.succeeded + self.unhealthy + self.failed
    }

    /// Failures as thresholds count them.
    pub fn failures(&self) -> u32 {
        self.failed + self.unhealthy
    }

    fn slot(&mut self, state: DeviceState, unhealthy: bool) -> Option<&mut u32> {
        use DeviceState::*;
        Some(match state {
            Idle => return None,
            Notified => &mut self.notified,
            Downloading => &mut self.downloading,
            Downloaded | Installing | Rebooting | Verifying => &mut self.installing,
            Succeeded if unhealthy => &mut self.unhealthy,
            Succeeded => &mut self.succeeded,
            Failed | RolledBack => &mut self.failed,
            Deferred => &mut self.deferred,
        })
    }

    fn add(&mut self, state: DeviceState, unhealthy: bool) {
        if let Some(n) = self.slot(state, unhealthy) {
            *n += 1;
        }
    }

    fn remove(&mut self, state: DeviceState, unhealthy: bool) {
        if let Some(n) = self.slot(state, unhealthy) {
            *n = n.saturating_sub(1);
        }
    }
}

#[derive(Debug, Clone)]
struct Member {
    id: DeviceId,
    wave: u32,
    state: DeviceState,
    since_ms: u64,
    /// The last sign of life (a state change, a report, a chunk request, a heartbeat): the
    /// device timeout measures silence from here. In memory only (see [`Rollout::recovered`]).
    active_ms: u64,
    unhealthy: bool,
}

/// A member's state as the store has it, for [`Rollout::new`].
#[derive(Debug, Clone)]
pub struct Known {
    pub state: DeviceState,
    pub since_ms: u64,
    pub unhealthy: bool,
}

/// Why an operator action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("campaign is {status}; cannot {action}")]
pub struct NotNow {
    pub status: CampaignStatus,
    pub action: &'static str,
}

/// The rollout of one campaign.
#[derive(Debug, Clone)]
pub struct Rollout {
    policy: RolloutPolicy,
    created_ms: u64,
    status: CampaignStatus,
    state: RolloutState,
    ends: Vec<u32>,
    /// In rank order, so waves are contiguous and notification order is wave order.
    members: Vec<Member>,
    index: HashMap<DeviceId, usize>,
    /// Every member before this has left `idle`.
    cursor: usize,
    waves: Vec<WaveCounts>,
    changed: bool,
    /// The last tick stopped notifying at [`NOTIFY_PER_TICK`] with members still to notify.
    more: bool,
}

/// At most this many members are notified per tick. Each notification is a durable write and
/// a content key wrapped for one device, all made before the batch's output leaves: a wave of
/// 10,000 opened at once held every job (and every other reply) for the whole of its commit,
/// about 1.5 s. In slices, the first devices have their jobs after one slice's commit, the
/// engine answers other events between slices, and the cost of one commit no longer grows
/// with the wave.
pub const NOTIFY_PER_TICK: u32 = 512;

impl Rollout {
    /// A rollout from its plan and stored state; members missing from `known` are idle.
    pub fn new(
        plan: Plan,
        policy: RolloutPolicy,
        created_ms: u64,
        status: CampaignStatus,
        state: RolloutState,
        known: &HashMap<DeviceId, Known>,
    ) -> Rollout {
        let mut waves: Vec<WaveCounts> = vec![WaveCounts::default(); plan.wave_count()];
        let mut members = Vec::with_capacity(plan.order.len());
        let mut index = HashMap::with_capacity(plan.order.len());
        let mut wave = 0u32;
        for (i, id) in plan.order.into_iter().enumerate() {
            while plan.ends.get(wave as usize).is_some_and(|e| i as u32 >= *e) {
                wave += 1;
            }
            let k = known.get(&id);
            let since_ms = k.map_or(created_ms, |k| k.since_ms);
            let m = Member {
                wave,
                state: k.map_or(DeviceState::Idle, |k| k.state),
                since_ms,
                active_ms: since_ms,
                unhealthy: k.is_some_and(|k| k.unhealthy),
                id: id.clone(),
            };
            if let Some(w) = waves.get_mut(wave as usize) {
                w.size += 1;
                w.add(m.state, m.unhealthy);
            }
            index.insert(id, i);
            members.push(m);
        }
        let mut r = Rollout {
            policy,
            created_ms,
            status,
            state,
            ends: plan.ends,
            members,
            index,
            cursor: 0,
            waves,
            changed: false,
            more: false,
        };
        r.skip_started();
        r
    }

    pub fn status(&self) -> CampaignStatus {
        self.status
    }

    pub fn state(&self) -> &RolloutState {
        &self.state
    }

    pub fn policy(&self) -> &RolloutPolicy {
        &self.policy
    }

    pub fn waves(&self) -> &[WaveCounts] {
        &self.waves
    }

    /// The wave a member belongs to.
    pub fn wave_of(&self, device: &DeviceId) -> Option<u32> {
        self.index.get(device).map(|i| self.members[*i].wave)
    }

    /// Whether the status or stored state changed since the last call; resets it.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    fn open_waves(&self) -> usize {
        self.state.opened_ms.len()
    }

    /// Members notified and not finished.
    fn in_flight(&self) -> u32 {
        self.waves
            .iter()
            .map(|w| w.notified + w.downloading + w.installing + w.deferred)
            .sum()
    }

    /// Nothing will ever change without a report: finished, or stopped for good with nobody in
    /// flight. The engine stops ticking such a rollout.
    pub fn settled(&self) -> bool {
        self.status == CampaignStatus::Finished || (self.status.is_final() && self.in_flight() == 0)
    }

    /// The last tick left members to notify that it could have notified but for
    /// [`NOTIFY_PER_TICK`]: tick again soon, without waiting for an event or the timer.
    pub fn more_to_notify(&self) -> bool {
        self.more
    }

    /// Moves the cursor past members that left `idle`. Members are notified in rank order
    /// only, so every member from the cursor on is idle, and loops over members that may be in
    /// flight stop at the cursor.
    fn skip_started(&mut self) {
        while self
            .members
            .get(self.cursor)
            .is_some_and(|m| m.state != DeviceState::Idle)
        {
            self.cursor += 1;
        }
    }

    fn set_state(&mut self, i: usize, state: DeviceState, now_ms: u64) {
        let m = &mut self.members[i];
        if m.state == state {
            return;
        }
        if let Some(w) = self.waves.get_mut(m.wave as usize) {
            w.remove(m.state, m.unhealthy);
            w.add(state, m.unhealthy);
        }
        m.state = state;
        m.since_ms = now_ms;
        m.active_ms = m.active_ms.max(now_ms);
    }

    /// A member showed a sign of life (a report, even a duplicate; a chunk request; a
    /// heartbeat) at `now_ms`: the device timeout starts again from here. O(1).
    pub fn touch(&mut self, device: &DeviceId, now_ms: u64) {
        if let Some(&i) = self.index.get(device) {
            let m = &mut self.members[i];
            m.active_ms = m.active_ms.max(now_ms);
        }
    }

    /// The orchestrator restarted at `now_ms`: what members did while it was down is unknown,
    /// so every member in flight is given a full device timeout from now rather than being
    /// timed out for a silence nobody observed.
    pub fn recovered(&mut self, now_ms: u64) {
        for m in &mut self.members[..self.cursor] {
            m.active_ms = m.active_ms.max(now_ms);
        }
    }

    /// A member's recorded state changed (a report was applied). Idempotent.
    pub fn observe(&mut self, device: &DeviceId, state: DeviceState, now_ms: u64) {
        if let Some(&i) = self.index.get(device) {
            self.set_state(i, state, now_ms);
        }
    }

    /// A heartbeat. Returns true if it made the member count as a failure of its wave: a
    /// succeeded member reporting unhealthy before its wave's soak ended. Sticky.
    pub fn observe_health(&mut self, device: &DeviceId, healthy: bool, now_ms: u64) -> bool {
        let Some(&i) = self.index.get(device) else {
            return false;
        };
        let m = &self.members[i];
        if healthy || m.unhealthy || m.state != DeviceState::Succeeded {
            return false;
        }
        let soak_end = self
            .state
            .finished_ms
            .get(m.wave as usize)
            .map(|t| t + self.policy.soak_secs * 1000);
        if soak_end.is_some_and(|end| now_ms >= end) {
            return false;
        }
        let w = m.wave as usize;
        if let Some(c) = self.waves.get_mut(w) {
            c.remove(DeviceState::Succeeded, false);
            c.add(DeviceState::Succeeded, true);
        }
        self.members[i].unhealthy = true;
        true
    }

    fn set_status(
        &mut self,
        status: CampaignStatus,
        reason: Option<String>,
        out: &mut Vec<Action>,
    ) {
        self.status = status;
        self.state.reason = reason;
        self.changed = true;
        out.push(Action::Status(status));
    }

    /// Operator: stop notifying. Devices in flight continue.
    pub fn pause(&mut self, why: String) -> Result<Vec<Action>, NotNow> {
        if self.status != CampaignStatus::Active {
            return Err(NotNow {
                status: self.status,
                action: "pause",
            });
        }
        let mut out = Vec::new();
        self.set_status(CampaignStatus::Paused, Some(why), &mut out);
        Ok(out)
    }

    /// Operator: continue. A threshold that paused an open wave is overridden for that wave
    /// (the operator judged it); the abort threshold still applies.
    pub fn resume(&mut self) -> Result<Vec<Action>, NotNow> {
        if self.status != CampaignStatus::Paused {
            return Err(NotNow {
                status: self.status,
                action: "resume",
            });
        }
        if let Some(t) = self.policy.pause_at {
            for (w, c) in self.waves.iter().enumerate().take(self.open_waves()) {
                let w = w as u32;
                if t.crossed(c.failures(), c.finished()) && !self.state.overridden.contains(&w) {
                    self.state.overridden.push(w);
                }
            }
        }
        let mut out = Vec::new();
        self.set_status(CampaignStatus::Active, None, &mut out);
        Ok(out)
    }

    /// Operator (or the abort threshold): members not started get nothing; notified members
    /// that have not started are cancelled; downloading members are told to stop. Members past
    /// the download finish their install (stopping halfway gains nothing).
    pub fn abort(&mut self, why: String) -> Result<Vec<Action>, NotNow> {
        if !matches!(self.status, CampaignStatus::Active | CampaignStatus::Paused) {
            return Err(NotNow {
                status: self.status,
                action: "abort",
            });
        }
        let mut out = Vec::new();
        self.set_status(CampaignStatus::Aborted, Some(why), &mut out);
        self.stop_in_flight(&mut out);
        Ok(out)
    }

    fn stop_in_flight(&mut self, out: &mut Vec<Action>) {
        // Timestamps of stopped members are not used again (they are final or nearly so).
        for i in 0..self.cursor {
            match self.members[i].state {
                // A deferred member has installed nothing, and may wait for hours: it is ended
                // here rather than left holding the campaign.
                DeviceState::Notified | DeviceState::Deferred => {
                    self.set_state(i, DeviceState::Failed, self.members[i].since_ms);
                    out.push(Action::Cancel(self.members[i].id.clone()));
                }
                DeviceState::Downloading => out.push(Action::Withdraw(self.members[i].id.clone())),
                _ => {}
            }
        }
    }

    /// Moves time forward to `now_ms`: timeouts, thresholds, waves, notifications. The
    /// timeouts pass over every member in flight: the engine's timer calls this, twice a
    /// second.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        self.advance(now_ms, true)
    }

    /// What reports can change (thresholds, waves, notifications), without the passes over the
    /// members that find timeouts: after a batch of events, whose cost must not grow with the
    /// campaign. Timeouts wait for the next [`Rollout::tick`], at most 500 ms later.
    pub fn step(&mut self, now_ms: u64) -> Vec<Action> {
        self.advance(now_ms, false)
    }

    fn advance(&mut self, now_ms: u64, timers: bool) -> Vec<Action> {
        let mut out = Vec::new();
        self.more = false;
        if self.settled() {
            return out;
        }
        if self.state.opened_ms.is_empty() && !self.ends.is_empty() {
            self.state.opened_ms.push(now_ms.max(self.start_ms()));
            self.changed = true;
            out.push(Action::WaveOpened(0));
        }
        if timers {
            self.time_out(now_ms, &mut out);
        }
        if let Some(deadline) = self.policy.deadline_secs {
            let active = matches!(self.status, CampaignStatus::Active | CampaignStatus::Paused);
            if active && now_ms >= self.start_ms() + deadline * 1000 {
                self.set_status(
                    CampaignStatus::Expired,
                    Some(format!("deadline of {deadline}s passed")),
                    &mut out,
                );
                for i in 0..self.cursor {
                    if self.members[i].state == DeviceState::Notified {
                        self.set_state(i, DeviceState::Failed, now_ms);
                        out.push(Action::TimeOut(self.members[i].id.clone()));
                    }
                }
            }
        }
        if timers && self.status == CampaignStatus::Expired {
            // Past the deadline a deferral has lasted too long, including one that began
            // after it (a member that was downloading when the deadline passed).
            self.time_out_deferred(now_ms, &mut out);
        }
        self.judge(&mut out);
        if self.status != CampaignStatus::Active {
            return out;
        }
        self.open_next_waves(now_ms, &mut out);
        if self.status == CampaignStatus::Active && self.may_start(now_ms) {
            self.notify(now_ms, &mut out);
        }
        out
    }

    fn start_ms(&self) -> u64 {
        self.created_ms
            .max(self.policy.start_at.unwrap_or(0).saturating_mul(1000))
    }

    fn may_start(&self, now_ms: u64) -> bool {
        now_ms >= self.start_ms() && self.policy.window.is_none_or(|w| w.allows(now_ms))
    }

    fn time_out_deferred(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        if self.waves.iter().all(|w| w.deferred == 0) {
            return;
        }
        for i in 0..self.cursor {
            if self.members[i].state == DeviceState::Deferred {
                self.set_state(i, DeviceState::Failed, now_ms);
                out.push(Action::TimeOut(self.members[i].id.clone()));
            }
        }
    }

    fn time_out(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let notified = self.policy.notified_timeout_secs.map(|s| s * 1000);
        let busy = self.policy.device_timeout_secs.map(|s| s * 1000);
        if notified.is_none() && busy.is_none() {
            return;
        }
        for i in 0..self.cursor {
            let m = &self.members[i];
            // A notified device is timed out for not starting; one that started, for falling
            // silent: a slow download that keeps asking for chunks is not stuck.
            let (limit, from) = match m.state {
                DeviceState::Notified => (notified, m.since_ms),
                // Waiting for its preconditions is not silence; the deadline bounds it.
                DeviceState::Deferred => (None, 0),
                s if s > DeviceState::Notified && !s.is_terminal() => (busy, m.active_ms),
                _ => (None, 0),
            };
            if limit.is_some_and(|l| now_ms.saturating_sub(from) > l) {
                let id = m.id.clone();
                self.set_state(i, DeviceState::Failed, now_ms);
                out.push(Action::TimeOut(id));
            }
        }
    }

    /// Checks every open wave against the thresholds.
    fn judge(&mut self, out: &mut Vec<Action>) {
        if !matches!(self.status, CampaignStatus::Active | CampaignStatus::Paused) {
            return;
        }
        for w in 0..self.open_waves() {
            let Some(c) = self.waves.get(w).copied() else {
                continue;
            };
            let (failed, finished) = (c.failures(), c.finished());
            let why = |verb: &str, t: policy::Threshold| {
                format!(
                    "{verb} by threshold: wave {w} has {failed} failed of {finished} finished, at or above {:.0}% (minimum sample {})",
                    t.ratio * 100.0,
                    t.min_sample
                )
            };
            if let Some(t) = self.policy.abort_at.filter(|t| t.crossed(failed, finished)) {
                self.set_status(CampaignStatus::Aborted, Some(why("aborted", t)), out);
                self.stop_in_flight(out);
                return;
            }
            let overridden = self.state.overridden.contains(&(w as u32));
            if let Some(t) = self.policy.pause_at.filter(|t| t.crossed(failed, finished)) {
                if self.status == CampaignStatus::Active && !overridden {
                    self.set_status(CampaignStatus::Paused, Some(why("paused", t)), out);
                }
            }
        }
    }

    fn wave_finished(&self, w: usize) -> bool {
        let Some(c) = self.waves.get(w) else {
            return false;
        };
        let need = (self.policy.advance_at * f64::from(c.size)).ceil() as u32;
        c.finished() >= need.min(c.size)
    }

    fn open_next_waves(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        loop {
            let w = self.open_waves() - 1;
            if self.state.finished_ms.len() <= w {
                if !self.wave_finished(w) {
                    return;
                }
                self.state.finished_ms.push(now_ms);
                self.changed = true;
            }
            let soaked = self.state.finished_ms[w] + self.policy.soak_secs * 1000;
            if now_ms < soaked {
                return;
            }
            if w + 1 >= self.ends.len() {
                let finished: u32 = self.waves.iter().map(WaveCounts::finished).sum();
                if finished as usize == self.members.len() {
                    self.set_status(CampaignStatus::Finished, None, out);
                }
                return;
            }
            self.state.opened_ms.push(now_ms);
            self.changed = true;
            out.push(Action::WaveOpened(w as u32 + 1));
        }
    }

    /// Devices holding a download slot: downloading, or notified within the grace time.
    fn busy(&self, now_ms: u64) -> u32 {
        let grace = self.policy.notify_grace_secs * 1000;
        let recent = self.members[..self.cursor]
            .iter()
            .filter(|m| {
                m.state == DeviceState::Notified && now_ms.saturating_sub(m.since_ms) < grace
            })
            .count() as u32;
        self.waves.iter().map(|w| w.downloading).sum::<u32>() + recent
    }

    fn notify(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let open_end = self
            .ends
            .get(self.open_waves().saturating_sub(1))
            .copied()
            .unwrap_or(0) as usize;
        let mut free = match self.policy.concurrency {
            Some(k) => k.saturating_sub(self.busy(now_ms)),
            None => u32::MAX,
        };
        let mut slice = NOTIFY_PER_TICK;
        while free > 0 && slice > 0 && self.cursor < open_end {
            let i = self.cursor;
            self.set_state(i, DeviceState::Notified, now_ms);
            out.push(Action::Notify(self.members[i].id.clone()));
            free -= 1;
            slice -= 1;
            self.skip_started();
        }
        self.more = slice == 0 && free > 0 && self.cursor < open_end;
    }
}
