//! Random event sequences against the rollout engine, with a model fleet that obeys it: the
//! invariants of the issue (wave sizes, concurrency, nothing after abort, thresholds) must hold
//! after every step.

use std::collections::HashMap;

use aloft_proto::{ArtifactId, DeviceId, DeviceState};
use proptest::prelude::*;

use super::policy::{Growth, Size, Threshold, Waves};
use super::*;

/// A new, active rollout with nobody notified yet.
fn fresh(plan: Plan, policy: RolloutPolicy, created_ms: u64) -> Rollout {
    let known = HashMap::new();
    Rollout::new(
        plan,
        policy,
        created_ms,
        CampaignStatus::Active,
        RolloutState::default(),
        &known,
    )
}

#[derive(Debug, Clone)]
enum Event {
    /// Time passes by this many seconds.
    Tick(u64),
    /// The n-th started device (mod count) moves one step; `fail` picks failure when possible.
    Step(usize, bool),
    /// The n-th succeeded device reports unhealthy.
    Unhealthy(usize),
    Pause,
    Resume,
    Abort,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (0u64..120).prop_map(Event::Tick),
        10 => (any::<usize>(), proptest::bool::weighted(0.2)).prop_map(|(n, f)| Event::Step(n, f)),
        1 => any::<usize>().prop_map(Event::Unhealthy),
        1 => Just(Event::Pause),
        1 => Just(Event::Resume),
        1 => Just(Event::Abort),
    ]
}

fn policy() -> impl Strategy<Value = RolloutPolicy> {
    (
        1u32..5,
        prop_oneof![
            Just(Growth::Percent(vec![25.0, 60.0, 100.0])),
            Just(Growth::Exponential(2.0)),
        ],
        proptest::option::of((0.0f64..1.0, 1u32..5)),
        proptest::option::of((0.3f64..1.0, 1u32..8)),
        proptest::option::of(1u32..6),
        proptest::option::of(30u64..600),
        0u64..200,
        prop_oneof![Just(1.0), Just(0.75)],
    )
        .prop_map(
            |(canary, growth, pause, abort, conc, timeout, soak, advance)| RolloutPolicy {
                waves: Waves {
                    canary: Some(Size::Count(canary)),
                    growth,
                },
                soak_secs: soak,
                advance_at: advance,
                pause_at: pause.map(|(ratio, min_sample)| Threshold { ratio, min_sample }),
                abort_at: abort.map(|(ratio, min_sample)| Threshold { ratio, min_sample }),
                device_timeout_secs: timeout,
                notified_timeout_secs: timeout.map(|t| t * 3),
                concurrency: conc,
                // Longer than any run: every notified device holds its slot, so the
                // concurrency bound is exact.
                notify_grace_secs: 1_000_000,
                ..RolloutPolicy::default()
            },
        )
}

fn next_step(s: DeviceState, fail: bool) -> Option<DeviceState> {
    use DeviceState::*;
    Some(match (s, fail) {
        (Notified, false) => Downloading,
        (Downloading, false) => Downloaded,
        (Downloaded, false) => Installing,
        (Installing, false) => Rebooting,
        (Rebooting, false) => Verifying,
        (Verifying, false) => Succeeded,
        (Verifying | Rebooting, true) => RolledBack,
        (Notified | Downloading | Downloaded | Installing, true) => Failed,
        _ => return None,
    })
}

struct Harness {
    r: Rollout,
    plan: Plan,
    /// The model fleet: what the engine's store would hold.
    fleet: HashMap<DeviceId, DeviceState>,
    now: u64,
    stopped: bool,
}

impl Harness {
    fn apply(&mut self, actions: &[Action]) -> Result<(), TestCaseError> {
        for a in actions {
            match a {
                Action::Notify(d) => {
                    prop_assert!(!self.stopped, "notified {d} after the campaign stopped");
                    prop_assert_eq!(
                        self.r.status(),
                        CampaignStatus::Active,
                        "notified {} while not active",
                        d
                    );
                    prop_assert_eq!(
                        self.fleet.insert(d.clone(), DeviceState::Notified),
                        Some(DeviceState::Idle)
                    );
                }
                Action::TimeOut(d) | Action::Cancel(d) => {
                    self.fleet.insert(d.clone(), DeviceState::Failed);
                }
                Action::Withdraw(d) => {
                    // The device stops and reports `cancelled`.
                    self.fleet.insert(d.clone(), DeviceState::Failed);
                    self.r.observe(d, DeviceState::Failed, self.now);
                }
                Action::Status(
                    CampaignStatus::Aborted | CampaignStatus::Expired | CampaignStatus::Finished,
                ) => self.stopped = true,
                Action::Status(_) | Action::WaveOpened(_) => {}
            }
        }
        Ok(())
    }

    /// `ticked`: the rollout has just decided, so the threshold verdicts must be in force
    /// (between ticks, reports may cross a threshold that the next tick acts on).
    fn check(&self, ticked: bool) -> Result<(), TestCaseError> {
        let open = self.r.state().opened_ms.len();
        let open_end = if open == 0 {
            0
        } else {
            self.plan.ends[open - 1] as usize
        };
        for (i, d) in self.plan.order.iter().enumerate() {
            let s = self.fleet[d];
            if i >= open_end {
                prop_assert_eq!(
                    s,
                    DeviceState::Idle,
                    "{} outside the open waves was touched",
                    d
                );
            }
        }
        if let Some(k) = self.r.policy().concurrency {
            let busy = self
                .fleet
                .values()
                .filter(|s| matches!(s, DeviceState::Notified | DeviceState::Downloading))
                .count() as u32;
            prop_assert!(busy <= k, "{busy} downloading, limit {k}");
        }
        // Counts agree with the model fleet.
        let mut total = WaveCounts::default();
        for c in self.r.waves() {
            total.notified += c.notified;
            total.downloading += c.downloading;
            total.failed += c.failed;
            total.succeeded += c.succeeded + c.unhealthy;
        }
        let n = |s: DeviceState| self.fleet.values().filter(|x| **x == s).count() as u32;
        prop_assert_eq!(total.notified, n(DeviceState::Notified));
        prop_assert_eq!(total.downloading, n(DeviceState::Downloading));
        prop_assert_eq!(total.succeeded, n(DeviceState::Succeeded));
        prop_assert_eq!(
            total.failed,
            n(DeviceState::Failed) + n(DeviceState::RolledBack)
        );
        // Thresholds: an open wave past the pause threshold (not overridden) is not active;
        // past the abort threshold, the campaign no longer runs.
        for (w, c) in self
            .r
            .waves()
            .iter()
            .enumerate()
            .take(if ticked { open } else { 0 })
        {
            if let Some(t) = self.r.policy().abort_at {
                if t.crossed(c.failures(), c.finished()) {
                    prop_assert!(
                        !matches!(
                            self.r.status(),
                            CampaignStatus::Active | CampaignStatus::Paused
                        ),
                        "wave {w} crossed the abort threshold and the campaign runs on"
                    );
                }
            }
            if let Some(t) = self.r.policy().pause_at {
                let overridden = self.r.state().overridden.contains(&(w as u32));
                if t.crossed(c.failures(), c.finished()) && !overridden {
                    prop_assert_ne!(self.r.status(), CampaignStatus::Active);
                }
            }
        }
        // A wave opens only after the one before it finished.
        prop_assert!(self.r.state().finished_ms.len() + 1 >= open);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_rollout_keeps_its_invariants(
        n in 1usize..40,
        policy in policy(),
        events in proptest::collection::vec(event(), 1..200),
    ) {
        let c = ArtifactId::new("fw-prop").unwrap();
        let members: Vec<DeviceId> = (0..n).map(|i| DeviceId::new(format!("d{i}")).unwrap()).collect();
        let plan = Plan::new(&c, &members, &policy);
        let r = fresh(plan.clone(), policy, 0);
        let fleet = members.iter().map(|d| (d.clone(), DeviceState::Idle)).collect();
        let mut h = Harness { r, plan, fleet, now: 0, stopped: false };
        let a = h.r.tick(0);
        h.apply(&a)?;
        h.check(true)?;
        for e in events {
            let ticked = matches!(e, Event::Tick(_));
            match e {
                Event::Tick(s) => {
                    h.now += s * 1000;
                    let a = h.r.tick(h.now);
                    h.apply(&a)?;
                }
                Event::Step(k, fail) => {
                    let started: Vec<DeviceId> = h.plan.order.iter()
                        .filter(|d| next_step(h.fleet[*d], fail).is_some())
                        .cloned().collect();
                    if let Some(d) = started.get(k % started.len().max(1)) {
                        if let Some(s) = next_step(h.fleet[d], fail) {
                            h.fleet.insert(d.clone(), s);
                            h.r.observe(d, s, h.now);
                        }
                    }
                }
                Event::Unhealthy(k) => {
                    let done: Vec<DeviceId> = h.plan.order.iter()
                        .filter(|d| h.fleet[*d] == DeviceState::Succeeded).cloned().collect();
                    if let Some(d) = done.get(k % done.len().max(1)) {
                        h.r.observe_health(d, false, h.now);
                    }
                }
                Event::Pause => {
                    if let Ok(a) = h.r.pause("operator".into()) { h.apply(&a)?; }
                }
                Event::Resume => {
                    if let Ok(a) = h.r.resume() { h.apply(&a)?; }
                }
                Event::Abort => {
                    if let Ok(a) = h.r.abort("operator".into()) { h.apply(&a)?; }
                }
            }
            h.check(ticked)?;
        }
    }

    /// A restart rebuilds the same rollout from the plan, the stored state and the members'
    /// progress: it decides the same next step.
    #[test]
    fn a_rebuilt_rollout_decides_the_same(
        n in 1usize..30,
        policy in policy(),
        steps in proptest::collection::vec((any::<usize>(), any::<bool>(), 0u64..60), 1..60),
    ) {
        let c = ArtifactId::new("fw-restart").unwrap();
        let members: Vec<DeviceId> = (0..n).map(|i| DeviceId::new(format!("d{i}")).unwrap()).collect();
        let plan = Plan::new(&c, &members, &policy);
        let mut r = fresh(plan.clone(), policy.clone(), 0);
        let mut fleet: HashMap<DeviceId, (DeviceState, u64)> = members.iter().map(|d| (d.clone(), (DeviceState::Idle, 0))).collect();
        let mut now = 0;
        for (k, fail, dt) in steps {
            now += dt * 1000;
            for a in r.tick(now) {
                if let Action::Notify(d) | Action::TimeOut(d) | Action::Cancel(d) = &a {
                    let s = if matches!(a, Action::Notify(_)) { DeviceState::Notified } else { DeviceState::Failed };
                    fleet.insert(d.clone(), (s, now));
                }
            }
            let d = &plan.order[k % n];
            if let Some(s) = next_step(fleet[d].0, fail) {
                fleet.insert(d.clone(), (s, now));
                r.observe(d, s, now);
            }
        }
        let known = fleet.iter().map(|(d, (s, t))| (d.clone(), Known { state: *s, since_ms: *t, unhealthy: false })).collect();
        let mut rebuilt = Rollout::new(plan, policy, 0, r.status(), r.state().clone(), &known);
        prop_assert_eq!(r.waves(), rebuilt.waves());
        prop_assert_eq!(r.tick(now + 1000), rebuilt.tick(now + 1000));
    }
}

#[test]
fn a_failing_canary_pauses_before_anyone_else_is_notified() {
    let c = ArtifactId::new("fw-bad").unwrap();
    let members: Vec<DeviceId> = (0..100)
        .map(|i| DeviceId::new(format!("d{i}")).unwrap())
        .collect();
    let policy = RolloutPolicy {
        waves: Waves {
            canary: Some(Size::Percent(5.0)),
            growth: Growth::Percent(vec![50.0, 100.0]),
        },
        pause_at: Some(Threshold {
            ratio: 0.2,
            min_sample: 3,
        }),
        ..RolloutPolicy::default()
    };
    let plan = Plan::new(&c, &members, &policy);
    let mut r = fresh(plan.clone(), policy, 0);
    let notified: Vec<DeviceId> = r
        .tick(0)
        .into_iter()
        .filter_map(|a| match a {
            Action::Notify(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(notified, plan.waves()[0]);
    for d in &notified {
        r.observe(d, DeviceState::RolledBack, 1);
    }
    let after = r.tick(2);
    assert!(
        after.contains(&Action::Status(CampaignStatus::Paused)),
        "{after:?}"
    );
    assert!(!after
        .iter()
        .any(|a| matches!(a, Action::Notify(_) | Action::WaveOpened(_))));
    assert!(r
        .state()
        .reason
        .as_deref()
        .unwrap_or("")
        .contains("wave 0 has 5 failed of 5"));
    // Resuming overrides the canary's verdict and opens the next wave.
    r.resume().unwrap();
    let next = r.tick(3);
    assert!(next.contains(&Action::WaveOpened(1)), "{next:?}");
}

#[test]
fn unhealthy_during_soak_fails_the_wave_but_not_after() {
    let c = ArtifactId::new("fw-soak").unwrap();
    let members: Vec<DeviceId> = (0..4)
        .map(|i| DeviceId::new(format!("d{i}")).unwrap())
        .collect();
    let policy = RolloutPolicy {
        waves: Waves {
            canary: Some(Size::Count(2)),
            growth: Growth::default(),
        },
        soak_secs: 60,
        ..RolloutPolicy::default()
    };
    let plan = Plan::new(&c, &members, &policy);
    let mut r = fresh(plan.clone(), policy, 0);
    r.tick(0);
    let canary = plan.waves()[0].clone();
    for d in &canary {
        r.observe(d, DeviceState::Succeeded, 1_000);
    }
    r.tick(2_000); // the wave finished at 2 s; soak until 62 s
    assert!(r.observe_health(&canary[0], false, 30_000));
    assert_eq!(r.waves()[0].unhealthy, 1);
    assert!(!r.tick(61_000).contains(&Action::WaveOpened(1)));
    assert!(r.tick(62_000).contains(&Action::WaveOpened(1)));
    assert!(
        !r.observe_health(&canary[1], false, 70_000),
        "after the soak it no longer counts"
    );
}

fn members(n: usize) -> Vec<DeviceId> {
    (0..n)
        .map(|i| DeviceId::new(format!("d{i}")).unwrap())
        .collect()
}

fn notified(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Notify(_)))
        .count()
}

#[test]
fn nobody_starts_before_the_start_time_or_outside_the_window() {
    let day = 86_400_000u64;
    let at = |h: u64, m: u64| 20 * day + (h * 60 + m) * 60_000;
    let policy = RolloutPolicy {
        start_at: Some(at(2, 0) / 1000),
        window: Some(policy::MaintenanceWindow::parse("01:00-03:00").unwrap()),
        concurrency: Some(2),
        ..RolloutPolicy::default()
    };
    let m = members(5);
    let plan = Plan::new(&ArtifactId::new("fw-s").unwrap(), &m, &policy);
    let mut r = Rollout::new(
        plan,
        policy,
        at(0, 30),
        CampaignStatus::Active,
        RolloutState::default(),
        &HashMap::new(),
    );
    assert_eq!(
        notified(&r.tick(at(1, 30))),
        0,
        "inside the window, before the start"
    );
    let first = r.tick(at(2, 0));
    assert_eq!(notified(&first), 2, "started, capped by concurrency");
    for a in &first {
        if let Action::Notify(d) = a {
            r.observe(d, DeviceState::Succeeded, at(2, 1));
        }
    }
    assert_eq!(notified(&r.tick(at(3, 0))), 0, "outside the window");
    assert_eq!(
        notified(&r.tick(at(3, 0) + day - 3 * 3_600_000)),
        0,
        "00:00 next day"
    );
    assert_eq!(
        notified(&r.tick(at(1, 0) + day)),
        2,
        "the next night's window"
    );
}

#[test]
fn the_deadline_times_out_silent_devices_and_expires_the_campaign() {
    let policy = RolloutPolicy {
        deadline_secs: Some(60),
        ..RolloutPolicy::default()
    };
    let m = members(3);
    let plan = Plan::new(&ArtifactId::new("fw-d").unwrap(), &m, &policy);
    let mut r = fresh(plan, policy, 0);
    assert_eq!(notified(&r.tick(0)), 3);
    r.observe(&m[0], DeviceState::Succeeded, 1_000);
    r.observe(&m[1], DeviceState::Downloading, 1_000);
    let end = r.tick(60_000);
    assert!(
        end.contains(&Action::Status(CampaignStatus::Expired)),
        "{end:?}"
    );
    assert_eq!(
        end.iter()
            .filter(|a| matches!(a, Action::TimeOut(_)))
            .count(),
        1,
        "only the silent one"
    );
    assert!(end.contains(&Action::TimeOut(m[2].clone())));
    assert_eq!(r.state().reason.as_deref(), Some("deadline of 60s passed"));
    // The one downloading may still finish; nobody else is ever notified.
    r.observe(&m[1], DeviceState::Succeeded, 61_000);
    assert!(r.tick(120_000).is_empty());
}

#[test]
fn a_member_that_keeps_showing_progress_is_not_timed_out_and_a_silent_one_is() {
    let policy = RolloutPolicy {
        device_timeout_secs: Some(5),
        ..RolloutPolicy::default()
    };
    let m = members(2);
    let plan = Plan::new(&ArtifactId::new("fw-slow").unwrap(), &m, &policy);
    let mut r = fresh(plan, policy, 0);
    assert_eq!(notified(&r.tick(0)), 2);
    r.observe(&m[0], DeviceState::Downloading, 1_000);
    r.observe(&m[1], DeviceState::Downloading, 1_000);
    // m[0] asks for chunks every 2 s for a minute, twelve timeouts' worth of downloading.
    let mut now = 1_000;
    while now < 61_000 {
        now += 2_000;
        r.touch(&m[0], now);
        let a = r.tick(now);
        assert!(
            !a.contains(&Action::TimeOut(m[0].clone())),
            "timed out at {now} while it kept asking: {a:?}"
        );
        if now == 7_000 {
            assert!(a.contains(&Action::TimeOut(m[1].clone())), "{a:?}");
        }
    }
    assert_eq!(r.waves()[0].failed, 1, "only the silent one");
    // Once it falls silent, the timeout runs from its last sign of life.
    assert!(!r.tick(now + 5_000).contains(&Action::TimeOut(m[0].clone())));
    assert!(r.tick(now + 5_001).contains(&Action::TimeOut(m[0].clone())));
}

#[test]
fn a_restart_gives_members_in_flight_a_full_timeout_from_the_recovery() {
    let policy = RolloutPolicy {
        device_timeout_secs: Some(5),
        ..RolloutPolicy::default()
    };
    let m = members(1);
    let plan = Plan::new(&ArtifactId::new("fw-restart").unwrap(), &m, &policy);
    let known = HashMap::from([(
        m[0].clone(),
        Known {
            state: DeviceState::Downloading,
            since_ms: 1_000,
            unhealthy: false,
        },
    )]);
    let rebuild = || {
        Rollout::new(
            plan.clone(),
            policy.clone(),
            0,
            CampaignStatus::Active,
            RolloutState {
                opened_ms: vec![0],
                ..RolloutState::default()
            },
            &known,
        )
    };
    // Without the recovery, the downtime counts as silence.
    assert!(rebuild()
        .tick(60_000)
        .contains(&Action::TimeOut(m[0].clone())));
    let mut r = rebuild();
    r.recovered(60_000);
    assert!(!r.tick(65_000).contains(&Action::TimeOut(m[0].clone())));
    assert!(r.tick(65_001).contains(&Action::TimeOut(m[0].clone())));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whatever the pace, a started member showing a sign of life at least once per timeout is
    /// never timed out, and one silent for longer than the timeout always is.
    #[test]
    fn silence_not_slowness_times_a_member_out(
        gaps in proptest::collection::vec(1u64..=5, 1..60),
        silence in 6u64..30,
        state in prop_oneof![
            Just(DeviceState::Downloading),
            Just(DeviceState::Installing),
            Just(DeviceState::Verifying),
        ],
    ) {
        let policy = RolloutPolicy { device_timeout_secs: Some(5), ..RolloutPolicy::default() };
        let m = members(1);
        let plan = Plan::new(&ArtifactId::new("fw-pace").unwrap(), &m, &policy);
        let mut r = fresh(plan, policy, 0);
        r.tick(0);
        r.observe(&m[0], state, 0);
        let mut now = 0;
        for g in gaps {
            now += g * 1000;
            prop_assert!(!r.tick(now).contains(&Action::TimeOut(m[0].clone())), "at {}", now);
            r.touch(&m[0], now);
        }
        now += silence * 1000;
        prop_assert!(r.tick(now).contains(&Action::TimeOut(m[0].clone())));
    }
}

#[test]
fn a_large_wave_is_notified_in_slices_and_a_concurrency_limit_asks_for_no_more_ticks() {
    let slice = NOTIFY_PER_TICK as usize;
    let m = members(slice + 3);
    let policy = RolloutPolicy::default();
    let plan = Plan::new(&ArtifactId::new("fw-s").unwrap(), &m, &policy);
    let mut r = fresh(plan, policy, 0);
    assert_eq!(notified(&r.tick(1)), slice);
    assert!(r.more_to_notify(), "the rest of the wave is due now");
    assert_eq!(notified(&r.tick(1)), 3);
    assert!(!r.more_to_notify());
    r.tick(1);
    assert!(!r.more_to_notify());

    // Held back by concurrency, not by the slice: nothing to do until a device finishes.
    let policy = RolloutPolicy {
        concurrency: Some(NOTIFY_PER_TICK + 1),
        ..RolloutPolicy::default()
    };
    let m = members(slice + 50);
    let plan = Plan::new(&ArtifactId::new("fw-s").unwrap(), &m, &policy);
    let mut r = fresh(plan, policy, 0);
    assert_eq!(notified(&r.tick(1)), slice);
    assert!(r.more_to_notify());
    assert_eq!(notified(&r.tick(1)), 1);
    assert!(
        !r.more_to_notify(),
        "the concurrency limit is reached: wait"
    );
}

#[test]
fn only_the_timer_tick_looks_for_timeouts() {
    let policy = RolloutPolicy {
        device_timeout_secs: Some(5),
        ..RolloutPolicy::default()
    };
    let m = members(3);
    let plan = Plan::new(&ArtifactId::new("fw-s").unwrap(), &m, &policy);
    let mut r = fresh(plan, policy, 0);
    let first = r.tick(1_000);
    assert_eq!(notified(&first), 3);
    for a in &first {
        if let Action::Notify(d) = a {
            r.observe(d, DeviceState::Downloading, 1_000);
        }
    }
    let timed_out = |a: &[Action]| a.iter().filter(|a| matches!(a, Action::TimeOut(_))).count();
    assert_eq!(
        timed_out(&r.step(60_000)),
        0,
        "a batch of events finds none"
    );
    assert_eq!(timed_out(&r.tick(60_000)), 3, "the timer finds all three");
}
