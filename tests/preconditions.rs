//! (1.5) Device preconditions in the signed manifest, against the real orchestrator and
//! devices: a part of the fleet defers (battery low) and still completes without tripping a
//! threshold, and a deferral that outlasts the campaign's deadline ends `timed_out` with
//! nothing installed.

use aloft_device::ConditionModel;
use aloft_e2e::{wait_campaign, ReleaseSpec};
use aloft_orchestrator::rollout::policy::Threshold;
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_orchestrator::store::CampaignStatus;
use aloft_proto::precondition::Preconditions;
use aloft_proto::DeviceState;

use crate::common::{Env, LIMIT};

fn battery_release() -> ReleaseSpec {
    let mut spec = ReleaseSpec::new("2.0.0", 2, 40 * 1024);
    spec.preconditions = Some(Preconditions {
        min_battery_pct: Some(30),
        ..Default::default()
    });
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_of_the_fleet_defers_on_a_low_battery_and_the_campaign_still_finishes() {
    let env = Env::new(6).await;
    let mut cfg = env.fleet_config();
    let seed = 5;
    cfg.conditions = ConditionModel {
        seed,
        low_battery_probability: 0.34,
        low_battery_pct: 10,
        // From 10% to 30% in about four seconds.
        charge_pct_per_sec: 5.0,
        ..Default::default()
    };
    let fleet = env.start_fleet(&cfg).await;
    let constrained = fleet
        .counters
        .constrained_devices
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (1..6).contains(&constrained),
        "seed {seed}: {constrained} of 6 devices on a low battery; the test needs some, not all"
    );
    let threshold = Threshold {
        ratio: 0.1,
        min_sample: 1,
    };
    let policy = RolloutPolicy {
        pause_at: Some(threshold),
        abort_at: Some(threshold),
        deadline_secs: Some(600),
        ..RolloutPolicy::default()
    };
    let campaign = env.roll_out(&battery_release(), policy).await;
    let s = wait_campaign(&env.admin, &campaign, LIMIT, |s| s.status.is_final())
        .await
        .unwrap();
    assert_eq!(
        s.status,
        CampaignStatus::Finished,
        "seed {seed}: {:?}",
        s.counts
    );
    assert_eq!(
        s.count(DeviceState::Succeeded),
        6,
        "seed {seed}: {:?}",
        s.counts
    );

    let views = fleet.views();
    let deferred: Vec<_> = views
        .iter()
        .filter(|(_, v)| v.stats.deferrals > 0)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(
        deferred.len() as u64,
        constrained,
        "seed {seed}: every device on a low battery deferred, and only those"
    );
    for (id, v) in &views {
        assert_eq!(v.running_version, "2.0.0", "{id}");
        assert_eq!(
            v.stats.reports_rejected, 0,
            "{id}: the orchestrator accepted every report, deferred ones included"
        );
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferral_past_the_campaign_deadline_ends_timed_out_with_nothing_installed() {
    let env = Env::new(2).await;
    let mut cfg = env.fleet_config();
    cfg.conditions = ConditionModel {
        low_battery_probability: 1.0,
        low_battery_pct: 10,
        charge_pct_per_sec: 0.0,
        ..Default::default()
    };
    let fleet = env.start_fleet(&cfg).await;
    let policy = RolloutPolicy {
        deadline_secs: Some(3),
        ..RolloutPolicy::default()
    };
    let campaign = env.roll_out(&battery_release(), policy).await;
    let s = wait_campaign(&env.admin, &campaign, LIMIT, |s| {
        s.status.is_final() && s.terminal() == s.total
    })
    .await
    .unwrap();
    assert_eq!(s.status, CampaignStatus::Expired, "{:?}", s.counts);
    assert_eq!(s.count(DeviceState::Failed), 2, "{:?}", s.counts);
    assert_eq!(s.reasons.get("timed_out"), Some(&2), "{:?}", s.reasons);
    for (id, v) in fleet.views() {
        assert_eq!(v.running_version, "1.0.0", "{id} installed nothing");
    }
    fleet.shutdown().await;
}
