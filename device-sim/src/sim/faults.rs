//! Fault injection: what can go wrong for a simulated device ([`Faults`], per-device
//! probabilities), the transport hooks that inject it (corrupted and slowed chunk frames, link
//! drops, power losses at a phase of an update) and the simulated health check (failing,
//! hanging, or an application that turns unhealthy after the confirm).

use super::*;

/// Faults to inject, all off by default. Probabilities are per device (a device's draws come
/// from its own RNG, seeded from `seed` and its index) and must lie in `[0, 1]`. As a table of
/// a TOML scenario file:
///
/// ```toml
/// [faults]
/// seed = 7
/// link_drop_probability = 0.2
/// power_loss_probability = 0.05
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    pub seed: u64,
    /// Each chunk frame is corrupted in transit (one byte of its sealed data flipped) with this
    /// probability; the agent must notice, re-request and still succeed.
    pub corrupt_chunk_probability: f64,
    /// Each health check after an update fails with this probability (the device rolls back,
    /// `health_check_failed`).
    pub health_check_failure_probability: f64,
    /// Each new image hangs at boot with this probability: its health check never finishes, so
    /// the confirm deadline passes and the device rolls back (`boot_failed`).
    pub boot_hang_probability: f64,
    /// A device is flaky with this probability: during downloads its link drops 1 to 3 times
    /// (seeded), each after a seeded number (1 to 8) of chunks received since the last drop; the
    /// transport reconnects with its usual backoff.
    pub link_drop_probability: f64,
    /// A device loses power once with this probability, at a seeded phase of its first update:
    /// while downloading, after the download (installed, before the reset into the new image),
    /// or after the reset before the image confirmed (then it falls back: `boot_failed`).
    pub power_loss_probability: f64,
    /// How long a device stays off after a power loss, at most (seeded, at least half of it).
    pub power_off_ms: u64,
    /// A device's inbound chunk bytes are capped at `slow_link_bytes_per_sec` with this
    /// probability (chunk frames reach its agent late).
    pub slow_link_probability: f64,
    pub slow_link_bytes_per_sec: u64,
    /// A device is offline (never connects) for `offline_ms` from the start with this
    /// probability.
    pub offline_probability: f64,
    pub offline_ms: u64,
    /// After each confirmed update, a device's application turns unhealthy with this
    /// probability, some seeded time up to `unhealthy_after_ms` later (at least half of it). It
    /// keeps the confirmed image and reports `healthy: false` in its heartbeats.
    pub unhealthy_after_confirm_probability: f64,
    pub unhealthy_after_ms: u64,
    /// (1.5) A device that takes a delta loses power once with this probability, when its
    /// rebuild is about to begin (the record says so); it resumes the rebuild from the intact
    /// patch. A rebuild torn halfway falls back to the full image (`update::delta_tests`).
    /// Ignored for a device whose `power_loss_probability` already drew a power loss.
    pub power_loss_in_rebuild_probability: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            seed: 0,
            corrupt_chunk_probability: 0.0,
            health_check_failure_probability: 0.0,
            boot_hang_probability: 0.0,
            link_drop_probability: 0.0,
            power_loss_probability: 0.0,
            power_off_ms: 1_000,
            slow_link_probability: 0.0,
            slow_link_bytes_per_sec: 64 * 1024,
            offline_probability: 0.0,
            offline_ms: 10_000,
            unhealthy_after_confirm_probability: 0.0,
            unhealthy_after_ms: 3_000,
            power_loss_in_rebuild_probability: 0.0,
        }
    }
}

impl Faults {
    /// Refuses probabilities outside `[0, 1]` and a zero rate for slow links.
    pub fn validate(&self) -> Result<()> {
        let probabilities = [
            ("corrupt_chunk_probability", self.corrupt_chunk_probability),
            (
                "health_check_failure_probability",
                self.health_check_failure_probability,
            ),
            ("boot_hang_probability", self.boot_hang_probability),
            ("link_drop_probability", self.link_drop_probability),
            ("power_loss_probability", self.power_loss_probability),
            ("slow_link_probability", self.slow_link_probability),
            ("offline_probability", self.offline_probability),
            (
                "power_loss_in_rebuild_probability",
                self.power_loss_in_rebuild_probability,
            ),
            (
                "unhealthy_after_confirm_probability",
                self.unhealthy_after_confirm_probability,
            ),
        ];
        for (name, p) in probabilities {
            if !(0.0..=1.0).contains(&p) {
                bail!("faults.{name} = {p}: must be between 0 and 1");
            }
        }
        if self.slow_link_probability > 0.0 && self.slow_link_bytes_per_sec == 0 {
            bail!("faults.slow_link_bytes_per_sec must be above 0");
        }
        Ok(())
    }
}

/// True with probability `p`; never draws when `p` is zero, so a fault that is off leaves its
/// RNG stream (and every later draw) as it was.
pub(super) fn chance(rng: &mut StdRng, p: f64) -> bool {
    if p.is_nan() || p <= 0.0 {
        false
    } else if p >= 1.0 {
        true
    } else {
        rng.gen_bool(p)
    }
}

/// A device's own seeded stream, made at its first draw: the same draws as a
/// `StdRng::seed_from_u64(seed)` made up front, but a fault that is off never draws, and
/// ChaCha's state and block buffer (about 330 bytes) are then never made. Five per device, made
/// up front, were 1.6 KiB of each simulated device's memory in a fleet without faults.
pub(super) struct LazyRng {
    seed: u64,
    rng: Option<Box<StdRng>>,
}

impl LazyRng {
    pub(super) fn new(seed: u64) -> Self {
        LazyRng { seed, rng: None }
    }

    pub(super) fn get(&mut self) -> &mut StdRng {
        let seed = self.seed;
        self.rng
            .get_or_insert_with(|| Box::new(StdRng::seed_from_u64(seed)))
    }

    /// [`chance`] from this stream: nothing is drawn (or made) when `p` is zero.
    pub(super) fn chance(&mut self, p: f64) -> bool {
        if p.is_nan() || p <= 0.0 {
            return false;
        }
        chance(self.get(), p)
    }
}

/// A seeded duration in `[max/2, max]` milliseconds.
pub(super) fn some_of(rng: &mut StdRng, max_ms: u64) -> Duration {
    Duration::from_millis(rng.gen_range(max_ms / 2..=max_ms))
}

/// Where in its first update a device loses power.
#[derive(Debug, Clone, Copy)]
pub(super) enum PowerLossAt {
    /// Once at least this fraction of the chunks is written.
    Downloading(f64),
    /// Installed, before the reset into the new image.
    Installing,
    /// Booted into the new image, before it confirmed.
    BeforeConfirm,
    /// (1.5) The delta's patch is verified and the rebuild marked begun.
    Rebuilding,
}

/// The transport hooks of one device; they outlive its power cycles.
pub(super) struct SimHooks {
    pub(super) view: Arc<Mutex<DeviceView>>,
    pub(super) counters: Arc<FleetCounters>,
    /// Draws for chunk corruption (its own stream, as before the other faults existed).
    pub(super) rng: LazyRng,
    pub(super) corrupt: f64,
    /// Draws for this device's other faults as they happen.
    pub(super) fault_rng: LazyRng,
    pub(super) link_drops_left: u32,
    /// Chunk frames still to receive before the next link drop.
    pub(super) frames_until_drop: u32,
    pub(super) power_loss: Option<PowerLossAt>,
    /// The inbound byte rate of a slow link, and when it is next free.
    pub(super) slow: Option<(u64, tokio::time::Instant)>,
    pub(super) chunks_fetched_total: u64,
    /// The agent counters of earlier power-ons.
    pub(super) stats_before: AgentStats,
}

impl SimHooks {
    fn view(&self) -> std::sync::MutexGuard<'_, DeviceView> {
        match self.view.lock() {
            Ok(v) => v,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The power went: the agent's counters are kept, the device shows as off.
    pub(super) fn powered_off(&mut self, agent: &UpdateAgent) {
        self.stats_before = self.stats_before.plus(agent.stats());
        let mut v = self.view();
        v.connected = false;
        v.powered = false;
        v.power_cycles += 1;
    }

    fn power_loss_due(&self, agent: &UpdateAgent) -> bool {
        let (Some(at), Some(cur)) = (self.power_loss, agent.record().current.as_ref()) else {
            return false;
        };
        let slots = &agent.record().slots;
        match at {
            PowerLossAt::Downloading(fraction) => {
                let total = cur.written.len();
                let threshold = ((f64::from(total) * fraction).ceil() as u32).max(1);
                // A download that completes within one step loses power just after it.
                cur.phase != DeviceState::Downloading || cur.written.count() >= threshold
            }
            PowerLossAt::Installing => {
                matches!(
                    cur.phase,
                    DeviceState::Downloaded | DeviceState::Installing | DeviceState::Rebooting
                ) && slots.running_slot() != slots.boot_slot()
            }
            PowerLossAt::BeforeConfirm => cur.phase == DeviceState::Verifying,
            PowerLossAt::Rebuilding => cur.delta.is_some_and(|d| d.rebuilding),
        }
    }
}

impl Hooks for SimHooks {
    fn observe(&mut self, agent: &UpdateAgent, connected: bool) {
        let record = agent.record();
        let stats = self.stats_before.plus(agent.stats());
        let fetched = self.chunks_fetched_total;
        let mut v = self.view();
        v.connected = connected;
        v.powered = true;
        // Runs after every step, every chunk included: the strings (versions, campaign ids)
        // are copied only when they changed, not cloned 640,000 times a 1 MiB campaign to
        // 10,000 devices to say the same.
        let running = record.running_version();
        if v.running_version != running {
            v.running_version = running.to_owned();
        }
        v.running_slot_valid = record.slots.running_meta().state == SlotState::Valid;
        v.has_valid_slot = record.slots.has_valid_slot();
        v.floor = record.floor.0;
        // A campaign counts as taken up when the view first names it, in progress or (one that
        // began and ended within a step) finished.
        let current = agent.current();
        let finished = record
            .finished
            .back()
            .map(|f| (&f.campaign, f.state, f.reason, f.acked));
        let named = |c: &CampaignId| {
            v.current.as_ref().is_some_and(|(was, _)| was == c)
                || v.last_finished.as_ref().is_some_and(|(was, ..)| was == c)
        };
        let current_new = current.is_some_and(|(c, _)| !named(c));
        let finished_new =
            finished.is_some_and(|(c, ..)| !named(c) && current.is_none_or(|(now, _)| now != c));
        let taken_up = u64::from(current_new) + u64::from(finished_new);
        if taken_up > 0 {
            self.counters
                .jobs_started
                .fetch_add(taken_up, Ordering::Relaxed);
        }
        if v.current.as_ref().map(|(c, s)| (c, *s)) != current {
            v.current = current.map(|(c, s)| (c.clone(), s));
        }
        let acked_new = finished.is_some_and(|(c, _, _, acked)| {
            acked
                && !v
                    .last_finished
                    .as_ref()
                    .is_some_and(|(was, _, _, was_acked)| was == c && *was_acked)
        });
        if acked_new {
            bump(&self.counters.finals_acked);
        }
        if v.last_finished.as_ref().map(|(c, s, r, a)| (c, *s, *r, *a)) != finished {
            v.last_finished = finished.map(|(c, s, r, a)| (c.clone(), s, r, a));
        }
        v.stats = stats;
        // A new agent after a power loss remembers no ack yet; the view keeps the last one.
        if let Some(acked) = agent.last_acked() {
            if v.last_acked.as_ref() != Some(acked) {
                v.last_acked = Some(acked.clone());
            }
        }
        v.outbox = record.outbox.len();
        v.chunks_fetched_total = fetched;
    }

    fn inbound_chunk(&mut self, frame: &mut Vec<u8>) {
        let is_data = frame.get(4) == Some(&0);
        if !is_data {
            return;
        }
        self.chunks_fetched_total += 1;
        self.frames_until_drop = self.frames_until_drop.saturating_sub(1);
        if self.rng.chance(self.corrupt) {
            // The last byte of a data frame is sealed data (the GCM tag).
            if let Some(b) = frame.last_mut() {
                *b ^= 0x5a;
                bump(&self.counters.chunks_corrupted);
            }
        }
    }

    fn chunk_delay(&mut self, len: usize) -> Duration {
        let Some((rate, free_at)) = &mut self.slow else {
            return Duration::ZERO;
        };
        let now = tokio::time::Instant::now();
        let start = (*free_at).max(now);
        let transfer = Duration::from_secs_f64(len as f64 / (*rate).max(1) as f64);
        *free_at = start + transfer;
        *free_at - now
    }

    fn after_step(&mut self, agent: &UpdateAgent) -> Intervention {
        if self.power_loss_due(agent) {
            self.power_loss = None;
            return Intervention::PowerLoss;
        }
        let downloading = agent
            .current()
            .is_some_and(|(_, p)| p == DeviceState::Downloading);
        if downloading && self.link_drops_left > 0 && self.frames_until_drop == 0 {
            self.link_drops_left -= 1;
            self.frames_until_drop = self.fault_rng.get().gen_range(1..=8);
            bump(&self.counters.link_drops);
            return Intervention::DropLink;
        }
        Intervention::None
    }

    fn connection(&mut self, up: bool) {
        let c = if up {
            &self.counters.sessions_up
        } else {
            &self.counters.sessions_down
        };
        bump(c);
    }

    fn dropped_publish(&mut self) {
        bump(&self.counters.publishes_dropped);
    }

    fn store_failed(&mut self, _error: &str) {
        bump(&self.counters.store_failures);
    }
}

/// What a simulated image's health check will say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Healthy,
    Unhealthy,
    /// Never finishes.
    Hang,
}

/// A device's simulated health: the health check of each new image and its application's health
/// afterwards. Shared between the device task, which resets it at each power-on, and the agent.
pub(super) struct HealthState {
    /// Draws for check failures (its own stream, as before the other faults existed).
    pub(super) fail_rng: LazyRng,
    pub(super) hang_rng: LazyRng,
    pub(super) app_rng: LazyRng,
    pub(super) failure_probability: f64,
    pub(super) hang_probability: f64,
    pub(super) unhealthy_probability: f64,
    pub(super) unhealthy_after_ms: u64,
    pub(super) check_ms: u64,
    /// The check running in this boot: for which campaign, since when, and what it will say.
    pub(super) check: Option<(CampaignId, u64, Verdict)>,
    /// When the last verdict was reached: `check_ms` after its check started, on the device's
    /// own time, however late the simulator got round to asking (see `HealthCheck::decided_at`).
    pub(super) decided_at: u64,
    /// When the application turns unhealthy, if it is going to.
    pub(super) unhealthy_at: Option<u64>,
    pub(super) counted_unhealthy: bool,
    pub(super) counters: Arc<FleetCounters>,
}

#[derive(Clone)]
pub(super) struct SimHealth(pub(super) Arc<Mutex<HealthState>>);

impl SimHealth {
    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        match self.0.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A new boot: whatever check was running died with the power.
    pub(super) fn power_on(&self) {
        self.state().check = None;
    }
}

impl HealthCheck for SimHealth {
    fn check(&mut self, now_ms: u64, campaign: &CampaignId, _version: &str) -> HealthStatus {
        let mut s = self.state();
        let s = &mut *s;
        let (started, verdict) = match &s.check {
            Some((c, started, verdict)) if c == campaign => (*started, *verdict),
            _ => {
                let fails = s.fail_rng.chance(s.failure_probability);
                let hangs = s.hang_rng.chance(s.hang_probability);
                let verdict = if hangs {
                    bump(&s.counters.boot_hangs);
                    Verdict::Hang
                } else if fails {
                    bump(&s.counters.health_check_failures);
                    Verdict::Unhealthy
                } else {
                    Verdict::Healthy
                };
                s.check = Some((campaign.clone(), now_ms, verdict));
                (now_ms, verdict)
            }
        };
        if verdict == Verdict::Hang || now_ms.saturating_sub(started) < s.check_ms {
            return HealthStatus::Pending;
        }
        s.check = None;
        s.decided_at = started.saturating_add(s.check_ms);
        if verdict == Verdict::Unhealthy {
            return HealthStatus::Unhealthy;
        }
        s.unhealthy_at = s.app_rng.chance(s.unhealthy_probability).then(|| {
            let after = some_of(s.app_rng.get(), s.unhealthy_after_ms);
            s.decided_at.saturating_add(after.as_millis() as u64)
        });
        s.counted_unhealthy = false;
        HealthStatus::Healthy
    }

    fn decided_at(&self, now_ms: u64) -> u64 {
        self.state().decided_at.min(now_ms)
    }

    fn ready_at(&self) -> Option<u64> {
        let s = self.state();
        match &s.check {
            Some((_, started, verdict)) if *verdict != Verdict::Hang => {
                Some(started.saturating_add(s.check_ms))
            }
            _ => None,
        }
    }

    fn app_health(&mut self, now_ms: u64) -> AppHealth {
        let mut s = self.state();
        if s.unhealthy_at.is_none_or(|t| now_ms < t) {
            return AppHealth::healthy();
        }
        if !s.counted_unhealthy {
            s.counted_unhealthy = true;
            bump(&s.counters.unhealthy_devices);
        }
        AppHealth {
            healthy: false,
            detail: Some("simulated fault: the application's main loop stalled".into()),
        }
    }
}
