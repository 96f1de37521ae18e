//! (1.5) Scenario tests of the manifest's preconditions in the agent: each condition defers
//! with its reason, the device keeps what it downloaded, checks again on its own schedule and
//! installs once the conditions hold; the signature covers them.

use std::sync::{Arc, Mutex};

use aloft_proto::manifest::SignedManifest;
use aloft_proto::messages::AckOutcome;
use aloft_proto::precondition::{InstallWindow, Preconditions};
use aloft_proto::{DeviceState, Reason, SecurityVersion};
use base64::Engine;

use super::testkit::*;
use super::*;
use crate::slots::SlotState;
use crate::store::DeviceRecord;

use DeviceState::*;

/// An environment the test changes as it goes.
#[derive(Clone)]
struct Scripted(Arc<Mutex<Conditions>>);

impl Scripted {
    fn new(c: Conditions) -> Self {
        Scripted(Arc::new(Mutex::new(c)))
    }

    fn set(&self, change: impl FnOnce(&mut Conditions)) {
        change(&mut self.0.lock().unwrap());
    }
}

impl Environment for Scripted {
    fn conditions(&mut self, _now_ms: u64) -> Conditions {
        *self.0.lock().unwrap()
    }
}

/// A battery-powered device, idle, at 02:00 local time, plenty of storage, unmetered.
fn fine() -> Conditions {
    Conditions {
        battery_pct: 80,
        external_power: false,
        in_use: false,
        local_minute: 120,
        free_bytes: 1 << 30,
        metered: false,
    }
}

fn rig_in(fx: &Fixture, env: &Scripted) -> Rig {
    let record = DeviceRecord::factory("1.0.0", SecurityVersion(1));
    let agent = fx
        .agent(record, Box::new(FixedHealth(true)))
        .with_environment(Box::new(env.clone()));
    Rig::new(agent)
}

fn release_with(fx: &Fixture, p: Preconditions) -> TestRelease {
    fx.release(&ReleaseSpec {
        preconditions: Some(p),
        ..Default::default()
    })
}

fn finished(rig: &Rig, campaign: &str) -> Option<(DeviceState, Option<Reason>)> {
    let f = rig
        .agent
        .record()
        .finished
        .iter()
        .find(|f| f.campaign.as_str() == campaign)?;
    Some((f.state, f.reason))
}

fn deferral_reasons(rig: &Rig) -> Vec<Reason> {
    let mut seen: Vec<(u32, Reason)> = rig
        .reports()
        .into_iter()
        .filter(|r| r.state == Deferred)
        .map(|r| (r.seq, r.reason.expect("a deferral carries its reason")))
        .collect();
    seen.sort_by_key(|(s, _)| *s);
    seen.dedup();
    seen.into_iter().map(|(_, r)| r).collect()
}

fn with_deferral(before: &[DeviceState], after: &[DeviceState]) -> Vec<(u32, DeviceState)> {
    let all: Vec<DeviceState> = before.iter().chain(after).copied().collect();
    numbered(&all)
}

#[test]
fn an_image_outside_its_install_window_waits_downloaded_and_installs_inside_it() {
    let fx = Fixture::new();
    let rel = release_with(
        &fx,
        Preconditions {
            install_window: Some(InstallWindow::parse("01:00-05:00").unwrap()),
            ..Default::default()
        },
    );
    let env = Scripted::new(Conditions {
        local_minute: 22 * 60,
        ..fine()
    });
    let mut rig = rig_in(&fx, &env);
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);
    assert_eq!(
        rig.states_of("c-1"),
        numbered(&[Downloading, Downloaded, Deferred])
    );
    assert_eq!(deferral_reasons(&rig), [Reason::OutsideInstallWindow]);
    let detail = rig.reports().last().unwrap().detail.clone().unwrap();
    assert!(detail.contains("01:00-05:00"), "{detail}");
    let cur = rig.agent.record().current.clone().unwrap();
    assert_eq!(
        (cur.phase, cur.deferred),
        (Downloaded, Some(Reason::OutsideInstallWindow))
    );
    assert!(cur.written.is_complete(), "the downloaded image is kept");
    assert_eq!(rig.agent.record().running_version(), "1.0.0");

    // Still outside: checks again on its schedule, reports nothing new.
    rig.advance(120_000);
    rig.run(&rel, &mut vec![]);
    assert_eq!(rig.states_of("c-1").len(), 3);
    // The window opens; nothing happens before the next check, then the install goes on.
    env.set(|c| c.local_minute = 60);
    rig.advance(1_000);
    assert_eq!(rig.states_of("c-1").len(), 3, "waits for its recheck time");
    rig.settle(&rel);
    assert_eq!(
        rig.states_of("c-1"),
        with_deferral(&[Downloading, Downloaded, Deferred], &HAPPY[2..])
    );
    assert_eq!(finished(&rig, "c-1"), Some((Succeeded, None)));
    assert_eq!(rig.agent.record().running_version(), "2.0.0");
    let stats = rig.agent.stats();
    assert_eq!(
        (stats.chunks_received, stats.deferrals),
        (5, 1),
        "downloaded once"
    );
}

#[test]
fn each_install_condition_defers_with_its_reason_until_it_holds() {
    type Fix = fn(&mut Conditions);
    let cases: [(Preconditions, Fix, Fix, Reason); 3] = [
        (
            Preconditions {
                min_battery_pct: Some(30),
                ..Default::default()
            },
            |c| c.battery_pct = 12,
            |c| c.external_power = true,
            Reason::BatteryLow,
        ),
        (
            Preconditions {
                not_in_use: true,
                ..Default::default()
            },
            |c| c.in_use = true,
            |c| c.in_use = false,
            Reason::InUse,
        ),
        (
            Preconditions {
                min_free_bytes: Some(1 << 20),
                ..Default::default()
            },
            |c| c.free_bytes = 4096,
            |c| c.free_bytes = 2 << 20,
            Reason::StorageLow,
        ),
    ];
    for (p, break_it, fix_it, reason) in cases {
        let fx = Fixture::new();
        let rel = release_with(&fx, p);
        let env = Scripted::new(fine());
        env.set(break_it);
        let mut rig = rig_in(&fx, &env);
        rig.connect();
        rig.step(Input::Job(&fx.job("c-1", &rel)));
        rig.run(&rel, &mut vec![]);
        assert_eq!(deferral_reasons(&rig), [reason], "{reason}");
        assert_eq!(rig.agent.current().map(|(_, p)| p), Some(Downloaded));
        env.set(fix_it);
        rig.settle(&rel);
        assert_eq!(finished(&rig, "c-1"), Some((Succeeded, None)), "{reason}");
        assert_eq!(rig.agent.stats().chunks_received, 5, "{reason}");
    }
}

#[test]
fn a_metered_link_holds_the_download_and_a_partial_download_is_kept() {
    let fx = Fixture::new();
    let rel = release_with(
        &fx,
        Preconditions {
            max_metered_bytes: Some(1_000),
            ..Default::default()
        },
    );
    // Metered from the start: deferred before the first chunk, nothing requested.
    let env = Scripted::new(Conditions {
        metered: true,
        ..fine()
    });
    let mut rig = rig_in(&fx, &env);
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);
    assert_eq!(rig.states_of("c-1"), numbered(&[Deferred]));
    assert_eq!(deferral_reasons(&rig), [Reason::MeteredLink]);
    assert!(rig.requested.is_empty() && rig.agent.stats().chunks_received == 0);

    // Unmetered: the download starts, and two chunks arrive before the link turns metered.
    env.set(|c| c.metered = false);
    rig.advance(60_000);
    rig.ack_head(AckOutcome::Applied);
    assert_eq!(rig.states_of("c-1"), numbered(&[Deferred, Downloading]));
    for _ in 0..2 {
        let i = rig.requested.pop_front().unwrap();
        rig.step(Input::ChunkFrame(&rel.frame(i)));
    }
    rig.requested.clear();
    env.set(|c| c.metered = true);
    rig.advance(60_000);
    rig.run(&rel, &mut vec![]);
    assert_eq!(
        rig.states_of("c-1"),
        numbered(&[Deferred, Downloading, Deferred])
    );
    rig.advance(30_000);
    assert!(rig.requested.is_empty(), "no request while deferred");
    assert_eq!(
        rig.agent.record().current.as_ref().unwrap().written.count(),
        2
    );

    env.set(|c| c.metered = false);
    rig.settle(&rel);
    assert_eq!(finished(&rig, "c-1"), Some((Succeeded, None)));
    let stats = rig.agent.stats();
    assert_eq!(
        stats.chunks_received, 5,
        "the two kept chunks were not fetched again"
    );
    assert_eq!(
        rig.states_of("c-1"),
        with_deferral(&[Deferred, Downloading, Deferred], HAPPY)
    );
}

#[test]
fn install_conditions_gate_the_download_only_when_the_operator_asks() {
    let fx = Fixture::new();
    let p = Preconditions {
        min_battery_pct: Some(50),
        check_before_download: true,
        ..Default::default()
    };
    let rel = release_with(&fx, p);
    let env = Scripted::new(Conditions {
        battery_pct: 20,
        ..fine()
    });
    let mut rig = rig_in(&fx, &env);
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);
    assert_eq!(rig.states_of("c-1"), numbered(&[Deferred]));
    assert_eq!(deferral_reasons(&rig), [Reason::BatteryLow]);
    assert_eq!(rig.agent.stats().chunks_received, 0);
    env.set(|c| c.battery_pct = 90);
    rig.settle(&rel);
    assert_eq!(finished(&rig, "c-1"), Some((Succeeded, None)));
}

#[test]
fn a_device_deferred_across_a_power_loss_keeps_its_image_and_reports_once() {
    let fx = Fixture::new();
    let rel = release_with(
        &fx,
        Preconditions {
            not_in_use: true,
            ..Default::default()
        },
    );
    let env = Scripted::new(Conditions {
        in_use: true,
        ..fine()
    });
    let mut rig = rig_in(&fx, &env);
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);
    assert_eq!(deferral_reasons(&rig), [Reason::InUse]);

    let env2 = env.clone();
    rig.power_cycle(|record| {
        fx.agent(record, Box::new(FixedHealth(true)))
            .with_environment(Box::new(env2))
    });
    rig.connect();
    rig.advance(1_000);
    rig.run(&rel, &mut vec![]);
    assert_eq!(deferral_reasons(&rig), [Reason::InUse], "no second report");
    assert!(rig.requested.is_empty(), "nothing downloaded again");
    env.set(|c| c.in_use = false);
    rig.settle(&rel);
    assert_eq!(finished(&rig, "c-1"), Some((Succeeded, None)));
    assert_eq!(rig.agent.stats().chunks_received, 0, "after the restart");
}

#[test]
fn a_withdrawal_while_deferred_abandons_the_downloaded_image() {
    let fx = Fixture::new();
    let rel = release_with(
        &fx,
        Preconditions {
            install_window: Some(InstallWindow::parse("01:00-02:00").unwrap()),
            ..Default::default()
        },
    );
    let env = Scripted::new(Conditions {
        local_minute: 600,
        ..fine()
    });
    let mut rig = rig_in(&fx, &env);
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);
    // The campaign's deadline passed: the orchestrator timed the device out.
    let w = messages::encode(&messages::Withdrawal {
        v: messages::PROTOCOL_VERSION,
        withdrawn: messages::Withdrawn {
            campaign: aloft_proto::CampaignId::new("c-1").unwrap(),
            reason: Reason::TimedOut,
        },
    });
    rig.step(Input::Job(&w));
    assert_eq!(
        finished(&rig, "c-1"),
        Some((Failed, Some(Reason::Cancelled)))
    );
    env.set(|c| c.local_minute = 90);
    rig.advance(120_000);
    rig.run(&rel, &mut vec![]);
    let rec = rig.agent.record();
    assert!(rec.current.is_none());
    assert_eq!(rec.running_version(), "1.0.0");
    assert_eq!(rec.slots.running_meta().state, SlotState::Valid);
}

#[test]
fn preconditions_stripped_or_forged_by_the_server_break_the_signature() {
    let fx = Fixture::new();
    let rel = release_with(
        &fx,
        Preconditions {
            install_window: Some(InstallWindow::parse("01:00-05:00").unwrap()),
            ..Default::default()
        },
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut stripped = rel.manifest.clone();
    stripped.preconditions = None;
    let mut forged = rel.manifest.clone();
    forged.preconditions = Some(Preconditions {
        install_window: Some(InstallWindow::parse("00:00-23:59").unwrap()),
        ..Default::default()
    });
    for (i, m) in [stripped, forged].into_iter().enumerate() {
        let mut rel = release_with(&fx, rel.manifest.preconditions.clone().unwrap());
        rel.signed = SignedManifest {
            payload: b64.encode(serde_json::to_vec(&m).unwrap()).into(),
            signatures: rel.signed.signatures.clone(),
        };
        let env = Scripted::new(Conditions {
            local_minute: 22 * 60,
            ..fine()
        });
        let mut rig = rig_in(&fx, &env);
        rig.connect();
        let campaign = format!("c-{i}");
        rig.step(Input::Job(&fx.job(&campaign, &rel)));
        rig.run(&rel, &mut vec![]);
        assert_eq!(
            finished(&rig, &campaign),
            Some((Failed, Some(Reason::BadSignature)))
        );
        assert_eq!(rig.agent.stats().chunks_received, 0);
        assert_eq!(rig.agent.record().running_version(), "1.0.0");
    }
}

#[test]
fn a_signed_precondition_the_device_does_not_know_makes_it_refuse_the_manifest() {
    let fx = Fixture::new();
    let mut rel = release_with(
        &fx,
        Preconditions {
            min_battery_pct: Some(30),
            ..Default::default()
        },
    );
    // A later protocol's condition, properly signed: ignoring it could install when the
    // operator said not to, so the device refuses the whole manifest.
    let mut json = serde_json::to_value(&rel.manifest).unwrap();
    json["preconditions"]["max_temperature_c"] = serde_json::json!(40);
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut signed = SignedManifest {
        payload: b64.encode(serde_json::to_vec(&json).unwrap()).into(),
        signatures: Vec::new(),
    };
    signed.cosign(&fx.signing).unwrap();
    rel.signed = signed;
    let env = Scripted::new(fine());
    let mut rig = rig_in(&fx, &env);
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);
    assert_eq!(
        finished(&rig, "c-1"),
        Some((Failed, Some(Reason::MalformedJob)))
    );
    assert_eq!(rig.agent.stats().chunks_received, 0);
}

#[test]
fn a_manifest_without_preconditions_never_asks_the_environment() {
    struct Unreachable;
    impl Environment for Unreachable {
        fn conditions(&mut self, _: u64) -> Conditions {
            panic!("asked for conditions without preconditions")
        }
    }
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let record = DeviceRecord::factory("1.0.0", SecurityVersion(1));
    let agent = fx
        .agent(record, Box::new(FixedHealth(true)))
        .with_environment(Box::new(Unreachable));
    let mut rig = Rig::new(agent);
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.settle(&rel);
    assert_eq!(rig.states_of("c-1"), numbered(HAPPY));
}

mod properties {
    use super::*;
    use crate::update::preconditions::{check, Stage};
    use proptest::prelude::*;

    fn conditions() -> impl Strategy<Value = Conditions> {
        (
            0u8..=100,
            any::<bool>(),
            any::<bool>(),
            0u16..1440,
            any::<bool>(),
        )
            .prop_map(
                |(battery_pct, external_power, in_use, local_minute, metered)| Conditions {
                    battery_pct,
                    external_power,
                    in_use,
                    local_minute,
                    free_bytes: 1 << 30,
                    metered,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// However the device's conditions change, it installs only at a moment they hold,
        /// downloads every chunk once, and succeeds once they hold for good.
        #[test]
        fn a_device_installs_only_when_its_preconditions_hold_and_never_downloads_twice(
            early in any::<bool>(),
            script in proptest::collection::vec((conditions(), 0u64..5_000), 1..16),
        ) {
            let p = Preconditions {
                min_battery_pct: Some(30),
                not_in_use: true,
                install_window: Some(InstallWindow::parse("01:00-05:00").unwrap()),
                max_metered_bytes: Some(2_000),
                check_before_download: early,
                ..Default::default()
            };
            let fx = Fixture::new();
            let rel = release_with(&fx, p.clone());
            let env = Scripted::new(script[0].0);
            let mut rig = rig_in(&fx, &env);
            rig.connect();
            rig.step(Input::Job(&fx.job("c-1", &rel)));
            let installed = |rig: &Rig| {
                rig.agent.current().is_some_and(|(_, ph)| ph >= Installing)
                    || finished(rig, "c-1").is_some()
            };
            for (c, wait) in script {
                env.set(|now| *now = c);
                let before = installed(&rig);
                rig.run(&rel, &mut vec![]);
                rig.advance(wait);
                rig.run(&rel, &mut vec![]);
                if !before && installed(&rig) {
                    prop_assert!(check(&p, &c, Stage::Install).is_ok(), "installed under {c:?}");
                }
            }
            env.set(|c| *c = fine());
            rig.settle(&rel);
            prop_assert_eq!(finished(&rig, "c-1"), Some((Succeeded, None)));
            prop_assert_eq!(rig.agent.stats().chunks_received, 5);
            // The reports follow PROTOCOL.md §8.2 around deferrals.
            let states: Vec<DeviceState> = rig.states_of("c-1").into_iter().map(|(_, s)| s).collect();
            prop_assert!(matches!(states[0], Downloading | Deferred), "{states:?}");
            for w in states.windows(2) {
                let ok = match (w[0], w[1]) {
                    (Deferred, to) => matches!(to, Downloading | Installing | Deferred),
                    (from, Deferred) => matches!(from, Downloading | Downloaded),
                    _ => true,
                };
                prop_assert!(ok, "{} -> {} in {states:?}", w[0], w[1]);
            }
        }
    }
}
