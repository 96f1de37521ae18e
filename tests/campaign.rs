//! Campaigns that should succeed: the main path at fleet scale, with chunks corrupted in
//! transit, and with a device that comes online only after the campaign started.

use std::sync::atomic::Ordering;

use aloft_device::Fleet;
use aloft_e2e::{finished, wait_campaign, wait_registered, ReleaseSpec};
use aloft_orchestrator::admin::wire::AdminBody;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offline_when_the_campaign_starts_gets_its_job_when_it_connects() {
    let env = Env::new(3).await;
    let (online, offline) = env.devices.split_at(2);
    // The offline device was registered by an operator from its certificate; it never connected.
    let registered: serde_json::Value = env
        .admin
        .call(AdminBody::DeviceRegister {
            certs: vec![offline[0].cert_pem.clone()],
            groups: Vec::new(),
        })
        .await
        .unwrap();
    let fleet = Fleet::start(&env.fleet_config(), online.to_vec()).unwrap();
    wait_registered(&env.admin, 3, LIMIT).await.unwrap();
    let campaign = env
        .lab
        .release_to_all(&env.admin, &ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .await
        .unwrap();
    let s = wait_campaign(&env.admin, &campaign, LIMIT, |s| {
        s.count(DeviceState::Succeeded) == 2
    })
    .await
    .unwrap();
    assert_eq!(s.total, 3, "the offline device is a member: {registered}");
    assert!(
        !finished(&s),
        "the campaign waits for the offline device: {:?}",
        s.counts
    );

    let late = Fleet::start(&env.fleet_config(), offline.to_vec()).unwrap();
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 3, "{:?}", s.counts);
    assert!(late.wait_all(LIMIT, |v| v.running_version == "2.0.0").await);
    fleet.shutdown().await;
    late.shutdown().await;
}
