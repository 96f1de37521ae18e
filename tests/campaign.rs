//! Campaigns that should succeed: the main path at fleet scale, and with chunks corrupted in
//! transit.

use std::sync::atomic::Ordering;

use aloft_e2e::{finished, wait_campaign, ReleaseSpec};
use aloft_proto::DeviceState;

use crate::common::{Env, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_over_mtls_updates_fifty_devices() {
    let env = Env::new(50).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let campaign = env
        .lab
        .release_to_all(&env.admin, &ReleaseSpec::new("2.0.0", 2, 192 * 1024))
        .await
        .unwrap();
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 50, "{:?}", s.counts);
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "2.0.0"
                && v.floor == 2
                && v.outbox == 0)
            .await,
        "every device runs 2.0.0 with its floor raised and nothing left to report"
    );
    assert_eq!(
        env.running.metrics.rejected_count("status", "malformed"),
        0,
        "real devices send nothing malformed"
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_chunks_are_rejected_by_the_device_re_requested_and_the_campaign_succeeds() {
    let env = Env::new(4).await;
    let mut cfg = env.fleet_config();
    cfg.faults.seed = 7;
    cfg.faults.corrupt_chunk_probability = 0.25;
    let fleet = env.start_fleet(&cfg).await;
    let campaign = env
        .lab
        .release_to_all(&env.admin, &ReleaseSpec::new("2.0.0", 2, 256 * 1024))
        .await
        .unwrap();
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 4, "{:?}", s.counts);
    let corrupted = fleet.counters.chunks_corrupted.load(Ordering::Relaxed);
    let rejected: u64 = fleet
        .views()
        .iter()
        .map(|(_, v)| v.stats.chunks_rejected)
        .sum();
    assert!(corrupted > 0, "the fault injector corrupted some chunks");
    assert_eq!(
        rejected, corrupted,
        "every corrupted chunk was caught before decryption"
    );
    fleet.shutdown().await;
}
