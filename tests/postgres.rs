//! The orchestrator on a PostgreSQL store (a throwaway cluster this test starts): a data
//! directory made with the default sled store moves into PostgreSQL the documented way (a
//! backup restored with `--store`), a campaign runs through the real engine, and a restart on
//! the same database finds everything the first run acknowledged.

use aloft_device::Fleet;
use aloft_e2e::{finished, wait_campaign, wait_registered, Lab, ReleaseSpec};
use aloft_orchestrator::backup;
use aloft_orchestrator::config::layout;
use aloft_orchestrator::store::pg_cluster::TempCluster;
use aloft_orchestrator::store::{Store, StoreLocation};
use aloft_proto::DeviceState;
use aloft_vault::{Protection, RecoveryKey, Unlock};

use crate::common::LIMIT;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_runs_on_a_postgresql_store_and_a_restart_finds_it_finished() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::create(tmp.path()).unwrap();
    let cluster = tokio::task::spawn_blocking(TempCluster::start)
        .await
        .unwrap()
        .unwrap();
    let at = StoreLocation::Postgres(cluster.create_database("e2e").unwrap());

    // sled → PostgreSQL: back up the data directory, restore it with the database as its store.
    let out = tmp.path().join("move.aloftbak");
    let rk = RecoveryKey::generate().unwrap();
    backup::create(&lab.data_dir, &out, &Protection::recovery_key(rk.clone())).unwrap();
    let r = backup::restore_at(&out, &lab.data_dir, &at, &Unlock::RecoveryKey(rk)).unwrap();
    assert!(r.records > 0);
    assert!(
        !lab.data_dir.join(layout::STORE_DIR).exists(),
        "the sled store went aside with the previous contents"
    );

    let mut cfg = lab.serve_config();
    let StoreLocation::Postgres(url) = &at else {
        unreachable!()
    };
    cfg.file.store = Some(url.clone());
    let running = aloft_orchestrator::start(cfg.clone()).await.unwrap();
    let admin = lab.operator(running.device_addr).await.unwrap();
    let devices = lab.enroll_fleet("dev", 6).unwrap();
    let fleet = Fleet::start(&lab.fleet_config(running.device_addr), devices).unwrap();
    wait_registered(&admin, 6, LIMIT).await.unwrap();
    let campaign = lab
        .release_to_all(&admin, &ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .await
        .unwrap();
    let s = wait_campaign(&admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 6, "{:?}", s.counts);
    fleet.shutdown().await;
    drop(admin);
    running.shutdown().await.unwrap();

    // What the engine acknowledged is in the database, under the data directory's key.
    let key = aloft_orchestrator::ops::open_keystore(&lab.data_dir, &lab.unlock()).unwrap();
    let check = at.clone();
    let campaign_id = campaign.clone();
    tokio::task::spawn_blocking(move || {
        let store = Store::open_at(&check, key).unwrap();
        let members = store.campaign_progress(&campaign_id).unwrap();
        assert_eq!(members.len(), 6);
        assert!(members
            .iter()
            .all(|(_, p)| p.state == DeviceState::Succeeded));
        assert!(store
            .devices()
            .unwrap()
            .iter()
            .all(|d| d.floor.map(|f| f.0) == Some(2)));
        assert!(store.verify_audit().unwrap().unwrap() >= 1);
    })
    .await
    .unwrap();

    // A new process on the same database picks the campaign up as it was left.
    let running = aloft_orchestrator::start(cfg).await.unwrap();
    let admin = lab.operator(running.device_addr).await.unwrap();
    let s = wait_campaign(&admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 6, "{:?}", s.counts);
    drop(admin);
    running.shutdown().await.unwrap();
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}
