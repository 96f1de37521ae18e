//! A starved update server must never cost a device its healthy image (issue 10: 2,000
//! simulated devices rolled back healthy images under load). The orchestrator, a separate
//! process, is stopped with SIGSTOP while devices install, for longer than their confirm
//! deadline: each device confirms on its own health check alone, and the campaign ends with
//! every device succeeded once the orchestrator goes on.

use std::time::Duration;

use aloft_e2e::scenario::starve_during_installs;
use aloft_e2e::{wait_campaign, ReleaseSpec};
use aloft_orchestrator::store::CampaignStatus;
use aloft_proto::DeviceState;

use crate::common::{spawned, Spawned, LIMIT};

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
    } = spawned(DEVICES, |cfg| cfg.confirm_deadline_ms = DEADLINE_MS).await;
    let campaign = lab
        .release_to_all(&admin, &ReleaseSpec::new("2.0.0", 2, 256 * 1024))
        .await
        .unwrap();
    // Held three deadlines, and until every device caught installing has its own verdict.
    let hold = Duration::from_millis(3 * DEADLINE_MS);
    let starved = starve_during_installs(&fleet, orch.child.id(), hold, LIMIT)
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
