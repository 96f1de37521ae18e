//! Rollouts under the simulator's faults: flaky links, power losses, corrupted chunks, slow links,
//! devices offline for the campaign, images that never confirm or turn unhealthy in the soak.
//! The devices run the real agent over real mTLS; faults are seeded, so a failure reproduces.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use aloft_e2e::{status, wait_campaign, ReleaseSpec};
use aloft_orchestrator::admin::wire::CampaignSummary;
use aloft_orchestrator::rollout::policy::{Size, Threshold};
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_orchestrator::store::CampaignStatus;
use aloft_proto::{CampaignId, DeviceState, Reason};

use crate::common::{waves, Env, LIMIT};

async fn ended(env: &Env, c: &CampaignId) -> CampaignSummary {
    wait_campaign(&env.admin, c, LIMIT, |s| s.status != CampaignStatus::Active)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_release_through_flaky_links_and_power_losses_succeeds_everywhere() {
    let env = Env::new(30).await;
    let mut cfg = env.fleet_config();
    cfg.faults.seed = 11;
    cfg.faults.link_drop_probability = 0.3;
    cfg.faults.power_loss_probability = 0.3;
    cfg.faults.power_off_ms = 500;
    cfg.faults.corrupt_chunk_probability = 0.02;
    let fleet = env.start_fleet(&cfg).await;
    let policy = RolloutPolicy {
        waves: waves(Size::Percent(10.0), &[50.0, 100.0]),
        pause_at: Some(Threshold {
            ratio: 0.3,
            min_sample: 3,
        }),
        concurrency: Some(10),
        device_timeout_secs: Some(120),
        ..RolloutPolicy::default()
    };
    let campaign = env
        .roll_out(&ReleaseSpec::new("2.0.0", 2, 256 * 1024), policy)
        .await;
    let s = ended(&env, &campaign).await;
    assert_eq!(s.status, CampaignStatus::Finished, "{:?}", s.reason);
    assert_eq!(s.count(DeviceState::Succeeded), 30, "{:?}", s.counts);
    assert!(fleet.counters.link_drops.load(Relaxed) > 0);
    assert!(fleet.counters.power_losses.load(Relaxed) > 0);
    assert!(fleet.counters.chunks_corrupted.load(Relaxed) > 0);

    // The orchestrator's record and the devices' own view agree, device by device.
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.outbox == 0 && v.powered && v.current.is_none())
            .await
    );
    let s = status(&env.admin, &campaign, true).await.unwrap();
    let mut seen = BTreeMap::new();
    for d in &s.devices {
        let v = fleet.view(&d.device).unwrap();
        let (c, state, reason, acked) = v.last_finished.clone().unwrap();
        assert_eq!(
            (&c, state, reason),
            (&campaign, d.state, d.reason),
            "{}",
            d.device
        );
        assert!(
            acked && v.has_valid_slot && v.running_slot_valid,
            "{}: {v:?}",
            d.device
        );
        assert_eq!(v.running_version, "2.0.0");
        *seen.entry(state.as_str().to_owned()).or_insert(0u32) += 1;
    }
    assert_eq!(seen, s.counts, "counts match the devices' view exactly");
    // What the bench's S3 waits for: every device's acknowledged end, counted once each
    // through the power losses.
    assert_eq!(fleet.counters.finals_acked.load(Relaxed), 30);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_resumes_from_its_verified_chunks_after_a_reconnect_and_a_power_loss() {
    let env = Env::new(1).await;
    let mut cfg = env.fleet_config();
    // 48 KiB/s against 32 chunks of 16 KiB: ten seconds of download to interrupt twice.
    cfg.faults.slow_link_probability = 1.0;
    cfg.faults.slow_link_bytes_per_sec = 48 * 1024;
    let fleet = env.start_fleet(&cfg).await;
    let id = env.devices[0].id.clone();
    let chunks = 32u64;
    let campaign = env
        .lab
        .release_to_all(&env.admin, &ReleaseSpec::new("2.0.0", 2, 512 * 1024))
        .await
        .unwrap();
    let fetched = || fleet.view(&id).unwrap().chunks_fetched_total;

    assert!(
        fleet
            .wait_one(&id, LIMIT, |v| v.chunks_fetched_total >= 8)
            .await
    );
    fleet.set_online(&id, false);
    assert!(fleet.wait_one(&id, LIMIT, |v| !v.connected).await);
    let before_drop = fetched();
    fleet.set_online(&id, true);

    assert!(
        fleet
            .wait_one(&id, LIMIT, |v| v.chunks_fetched_total >= before_drop + 8)
            .await
    );
    fleet.power_cycle(&id);
    assert!(fleet.wait_one(&id, LIMIT, |v| !v.powered).await);
    let before_power_loss = fetched();

    let s = wait_campaign(&env.admin, &campaign, LIMIT, |s| {
        s.status == CampaignStatus::Finished
    })
    .await
    .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 1);
    let total = fetched();
    // Restarting from zero after each interruption would fetch `chunks` more each time.
    assert!(
        total < before_power_loss + chunks,
        "{total} chunks fetched in all; {before_drop} before the drop, {before_power_loss} before the power loss"
    );
    assert!(total >= chunks);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offline_for_the_whole_rollout_finishes_when_it_comes_back() {
    let env = Env::new(10).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let late = env.devices[3].id.clone();
    fleet.set_online(&late, false);
    assert!(fleet.wait_one(&late, LIMIT, |v| !v.connected).await);
    let policy = RolloutPolicy {
        waves: waves(Size::Count(2), &[50.0, 100.0]),
        // Half of a wave finished is enough, wherever the absent device falls.
        advance_at: 0.5,
        ..RolloutPolicy::default()
    };
    let campaign = env
        .roll_out(&ReleaseSpec::new("2.0.0", 2, 64 * 1024), policy)
        .await;
    // Every wave opens and everyone else finishes; the campaign waits for the absent device.
    let s = wait_campaign(&env.admin, &campaign, LIMIT, |s| {
        s.count(DeviceState::Succeeded) == 9 && s.waves.iter().all(|w| w.opened_ms.is_some())
    })
    .await
    .unwrap();
    assert_eq!(s.status, CampaignStatus::Active);
    assert_eq!(s.count(DeviceState::Notified), 1);
    fleet.set_online(&late, true);
    let s = ended(&env, &campaign).await;
    assert_eq!(s.status, CampaignStatus::Finished);
    assert_eq!(s.count(DeviceState::Succeeded), 10);
    assert!(
        fleet
            .wait_one(&late, LIMIT, |v| v.running_version == "2.0.0")
            .await
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_never_confirms_rolls_back_by_itself() {
    let env = Env::new(2).await;
    let mut cfg = env.fleet_config();
    cfg.faults.boot_hang_probability = 1.0;
    cfg.confirm_deadline_ms = 1_000;
    let fleet = env.start_fleet(&cfg).await;
    let campaign = env
        .lab
        .release_to_all(&env.admin, &ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .await
        .unwrap();
    let s = ended(&env, &campaign).await;
    assert_eq!(s.count(DeviceState::RolledBack), 2, "{:?}", s.counts);
    assert_eq!(s.reasons.get(Reason::BootFailed.as_str()), Some(&2));
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "1.0.0"
                && v.running_slot_valid
                && v.floor == 1)
            .await
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_unhealthy_during_the_soak_fails_its_wave_and_pauses_the_rollout() {
    let env = Env::new(10).await;
    let mut cfg = env.fleet_config();
    cfg.faults.unhealthy_after_confirm_probability = 1.0;
    cfg.faults.unhealthy_after_ms = 500;
    cfg.heartbeat_ms = 300;
    let fleet = env.start_fleet(&cfg).await;
    let policy = RolloutPolicy {
        waves: waves(Size::Count(2), &[100.0]),
        // Long enough for the heartbeats to speak; the test never waits it out.
        soak_secs: 600,
        pause_at: Some(Threshold {
            ratio: 0.5,
            min_sample: 2,
        }),
        ..RolloutPolicy::default()
    };
    let campaign = env
        .roll_out(&ReleaseSpec::new("2.0.0", 2, 64 * 1024), policy)
        .await;
    let s = ended(&env, &campaign).await;
    assert_eq!(s.status, CampaignStatus::Paused, "{:?}", s.counts);
    assert!(s.unhealthy >= 1, "{s:?}");
    assert_eq!(
        s.count(DeviceState::Succeeded),
        2,
        "installed and confirmed, then unhealthy"
    );
    assert_eq!(s.count(DeviceState::Idle), 8, "the next wave never opened");
    assert!(s.waves[1].opened_ms.is_none());
    let s = status(&env.admin, &campaign, true).await.unwrap();
    assert!(s.devices.iter().any(|d| d.unhealthy));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status(&env.admin, &campaign, false)
            .await
            .unwrap()
            .count(DeviceState::Idle),
        8
    );
    fleet.shutdown().await;
}
