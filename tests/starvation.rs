//! A starved update server must never cost a device its healthy image (issue 10: 2,000
//! simulated devices rolled back healthy images under load). The orchestrator, a separate
//! process, is stopped with SIGSTOP while devices install, for longer than their confirm
//! deadline: each device confirms on its own health check alone, and the campaign ends with
//! every device succeeded once the orchestrator goes on.

use std::time::Duration;

use aloft_device::{DeviceView, Fleet};
use aloft_e2e::scenario::{starve_during_installs, Starve};
use aloft_e2e::{wait_campaign, wait_registered, Lab, ReleaseSpec};
use aloft_orchestrator::store::CampaignStatus;
use aloft_proto::DeviceState;

use crate::common::{exe, spawned, Spawned, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_stopped_past_the_confirm_deadline_during_installs_rolls_back_no_device() {
    const DEVICES: usize = 30;
    const DEADLINE_MS: u64 = 1_000;
    let Spawned {
        tmp: _tmp,
        lab,
        orch,
        admin,
        fleet,
        ..
    } = spawned(DEVICES, |cfg| cfg.confirm_deadline_ms = DEADLINE_MS).await;
    let campaign = lab
        .release_to_all(&admin, &ReleaseSpec::new("2.0.0", 2, 256 * 1024))
        .await
        .unwrap();
    // Held three deadlines, and until every device caught installing has its own verdict.
    let spec = Starve {
        orchestrator_stop_secs: 3 * DEADLINE_MS / 1_000,
        after_downloaded_percent: 0.0,
    };
    let starved = starve_during_installs(&fleet, orch.child.id(), &spec, LIMIT)
        .await
        .unwrap();
    assert!(starved.installing_at_stop >= 1, "{starved:?}");
    assert_eq!(starved.rolled_back_while_stopped, 0, "{starved:?}");
    assert!(
        starved.confirmed_while_stopped >= starved.installing_at_stop,
        "the devices installing when the server stopped confirmed without it: {starved:?}"
    );

    let s = wait_campaign(&admin, &campaign, LIMIT, |s| {
        s.status != CampaignStatus::Active
    })
    .await
    .unwrap();
    assert_eq!(s.status, CampaignStatus::Finished, "{:?}", s.counts);
    assert_eq!(s.count(DeviceState::RolledBack), 0, "{:?}", s.counts);
    assert_eq!(
        s.count(DeviceState::Succeeded) as usize,
        DEVICES,
        "{:?}",
        s.counts
    );
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "2.0.0"
                && v.running_slot_valid)
            .await
    );
    fleet.shutdown().await;
}

/// The cause of issue 10's rollbacks, reproduced: the simulator's own scheduler starved its
/// agents (2,000 of them and the orchestrator on two cores), so a device in `verifying` was not
/// stepped again until after its confirm deadline, although its health check had finished. Here
/// the fleet runs on a runtime of its own, whose only thread is blocked for three deadlines as
/// soon as a device is verifying: every device must still confirm, as real devices would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulator_starved_past_the_confirm_deadline_during_verifying_rolls_back_no_device() {
    const DEVICES: usize = 30;
    const DEADLINE_MS: u64 = 1_000;
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::create(tmp.path()).unwrap();
    let orch = lab.spawn(exe(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let identities = lab.enroll_fleet("dev", DEVICES).unwrap();
    let mut cfg = lab.fleet_config(orch.device_addr);
    cfg.confirm_deadline_ms = DEADLINE_MS;

    // The simulator's runtime: one thread, driven until `done` fires.
    let sim = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = sim.handle().clone();
    let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
    let driver = std::thread::spawn(move || {
        let _ = sim.block_on(done_rx);
    });
    let fleet = {
        let _in_sim = handle.enter();
        Fleet::start(&cfg, identities).unwrap()
    };
    let admin = lab.operator(orch.device_addr).await.unwrap();
    wait_registered(&admin, DEVICES, LIMIT).await.unwrap();
    let campaign = lab
        .release_to_all(&admin, &ReleaseSpec::new("2.0.0", 2, 256 * 1024))
        .await
        .unwrap();

    let verifying = |v: &DeviceView| {
        v.current
            .as_ref()
            .is_some_and(|(_, p)| *p == DeviceState::Verifying)
    };
    let give_up = std::time::Instant::now() + LIMIT;
    while !fleet.views().iter().any(|(_, v)| verifying(v)) {
        assert!(
            std::time::Instant::now() < give_up,
            "no device reached verifying"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let starve = Duration::from_millis(3 * DEADLINE_MS);
    handle.spawn(async move { std::thread::sleep(starve) });

    let s = wait_campaign(&admin, &campaign, LIMIT, |s| {
        s.status != CampaignStatus::Active
    })
    .await
    .unwrap();
    assert_eq!(s.count(DeviceState::RolledBack), 0, "{:?}", s.counts);
    assert_eq!(s.status, CampaignStatus::Finished, "{:?}", s.counts);
    assert_eq!(
        s.count(DeviceState::Succeeded) as usize,
        DEVICES,
        "{:?}",
        s.counts
    );
    handle.spawn(fleet.shutdown()).await.unwrap();
    let _ = done.send(());
    driver.join().unwrap();
}
