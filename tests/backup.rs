//! Backups end to end: the real orchestrator (a child process, stopped with SIGKILL, as in
//! `restart`), `backup::create` on its data directory, the directory wiped or moved on, then
//! `backup::restore` and the orchestrator started again. Restores keep the higher security
//! state, and damaged backups change nothing.

use aloft_e2e::{finished, wait_campaign, Lab, ReleaseSpec};
use aloft_orchestrator::admin::client::AdminClient;
use aloft_orchestrator::admin::wire::AdminBody;
use aloft_orchestrator::backup::{self, BackupError};
use aloft_orchestrator::store::DeviceRecord;
use aloft_proto::{DeviceState, SecurityVersion};
use aloft_vault::{Protection, RecoveryKey, Unlock};

use crate::common::{exe, spawned, Spawned, LIMIT};

/// A backup key as `aloft backup create --no-passphrase` makes one (a recovery key: no KDF).
fn backup_key() -> (Protection, Unlock) {
    let k = RecoveryKey::generate().unwrap();
    (Protection::recovery_key(k.clone()), Unlock::RecoveryKey(k))
}

async fn floors(admin: &AdminClient) -> Vec<Option<SecurityVersion>> {
    let devices: Vec<DeviceRecord> = admin
        .call(AdminBody::DeviceList {
            after: None,
            limit: None,
        })
        .await
        .unwrap();
    devices.into_iter().map(|d| d.floor).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_into_a_wiped_data_dir_resumes_its_campaign_and_later_updates_succeed() {
    let Spawned {
        tmp,
        lab,
        orch,
        admin,
        fleet,
        ..
    } = spawned(10, |cfg| cfg.window = 2).await;
    let addr = orch.device_addr;
    let first = lab
        .release_to_all(&admin, &ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .await
        .unwrap();
    let s = wait_campaign(&admin, &first, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 10);

    // A second campaign, stopped mid-way (small chunks so it takes a while).
    let mut spec = ReleaseSpec::new("3.0.0", 3, 512 * 1024);
    spec.chunk_bytes = 4 * 1024;
    let second = lab.release_to_all(&admin, &spec).await.unwrap();
    wait_campaign(&admin, &second, LIMIT, |s| {
        s.count(DeviceState::Downloading) >= 3 && !finished(s)
    })
    .await
    .unwrap();
    admin.disconnect().await;
    orch.kill9().unwrap();

    let out = tmp.path().join("aloft.backup");
    let (protection, unlock) = backup_key();
    let made = backup::create(&lab.data_dir, &out, &protection).unwrap();
    assert_eq!(made.seq, 1);
    std::fs::remove_dir_all(&lab.data_dir).unwrap();
    let restored = backup::restore(&out, &lab.data_dir, &unlock).unwrap();
    assert!(restored.previous.is_none(), "the directory was wiped");
    assert_eq!(restored.records, made.records);

    // The data directory's own recovery key (the lab's) unlocks the restored keys.
    let orch = lab.spawn(exe(), addr).unwrap();
    let admin = lab.operator(orch.device_addr).await.unwrap();
    let s = wait_campaign(&admin, &second, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 10, "{:?}", s.counts);
    let third = lab
        .release_to_all(&admin, &ReleaseSpec::new("4.0.0", 4, 64 * 1024))
        .await
        .unwrap();
    let s = wait_campaign(&admin, &third, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 10, "{:?}", s.counts);
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "4.0.0")
            .await
    );
    assert!(floors(&admin)
        .await
        .iter()
        .all(|f| *f == Some(SecurityVersion(4))));
    // The audit log came back with the store and goes on: both releases before the backup and
    // the one after, in one chain that verifies.
    let audit: serde_json::Value = admin
        .call(AdminBody::AuditList {
            since: None,
            limit: None,
        })
        .await
        .unwrap();
    assert_eq!(audit["chain"]["ok"], true, "{audit}");
    let creates = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "campaign_create")
        .count();
    assert_eq!(creates, 3, "{audit}");
    fleet.shutdown().await;
    drop(orch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_an_older_backup_does_not_lower_a_devices_floor() {
    let Spawned {
        tmp,
        lab,
        orch,
        admin,
        fleet,
        ..
    } = spawned(3, |_| {}).await;
    let addr = orch.device_addr;
    let c = lab
        .release_to_all(&admin, &ReleaseSpec::new("2.0.0", 2, 32 * 1024))
        .await
        .unwrap();
    wait_campaign(&admin, &c, LIMIT, finished).await.unwrap();
    admin.disconnect().await;
    orch.kill9().unwrap();
    let old = tmp.path().join("old.backup");
    let (protection, unlock) = backup_key();
    backup::create(&lab.data_dir, &old, &protection).unwrap();

    // After the backup the fleet moves on to security version 5.
    let orch = lab.spawn(exe(), addr).unwrap();
    let admin = lab.operator(orch.device_addr).await.unwrap();
    let c = lab
        .release_to_all(&admin, &ReleaseSpec::new("5.0.0", 5, 32 * 1024))
        .await
        .unwrap();
    wait_campaign(&admin, &c, LIMIT, finished).await.unwrap();
    assert!(floors(&admin)
        .await
        .iter()
        .all(|f| *f == Some(SecurityVersion(5))));
    admin.disconnect().await;
    orch.kill9().unwrap();

    // The old backup goes back onto the surviving data directory.
    let report = backup::restore(&old, &lab.data_dir, &unlock).unwrap();
    assert_eq!(report.merged.floors_raised, 3, "{report:?}");
    let orch = lab.spawn(exe(), addr).unwrap();
    let admin = lab.operator(orch.device_addr).await.unwrap();
    assert!(
        floors(&admin)
            .await
            .iter()
            .all(|f| *f == Some(SecurityVersion(5))),
        "the restore lowered a floor"
    );
    // The campaign the backup does not know is gone, but the orchestrator works: a valid
    // update at the floor's level succeeds on the same devices.
    let c = lab
        .release_to_all(&admin, &ReleaseSpec::new("5.0.1", 5, 32 * 1024))
        .await
        .unwrap();
    let s = wait_campaign(&admin, &c, LIMIT, finished).await.unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 3, "{:?}", s.counts);
    fleet.shutdown().await;
    drop(orch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_truncated_backups_are_refused_and_the_orchestrator_still_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::create(tmp.path()).unwrap();
    let out = tmp.path().join("aloft.backup");
    let (protection, unlock) = backup_key();
    backup::create(&lab.data_dir, &out, &protection).unwrap();
    let good = std::fs::read(&out).unwrap();
    let server_key = std::fs::read(lab.data_dir.join("pki/server.key")).unwrap();

    let bad = tmp.path().join("bad.backup");
    let mut tampered = good.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 0x20;
    std::fs::write(&bad, &tampered).unwrap();
    let err = backup::restore(&bad, &lab.data_dir, &unlock).unwrap_err();
    assert!(err.to_string().contains("failed authentication"), "{err}");

    std::fs::write(&bad, &good[..good.len() - 10]).unwrap();
    let err = backup::restore(&bad, &lab.data_dir, &unlock).unwrap_err();
    assert!(matches!(err, BackupError::Vault(_)), "{err}");

    let fresh = tmp.path().join("fresh");
    let err = backup::restore(&out, &fresh, &lab.unlock()).unwrap_err();
    assert_eq!(err.to_string(), "wrong passphrase or recovery key");
    assert!(!fresh.exists());

    assert_eq!(
        std::fs::read(lab.data_dir.join("pki/server.key")).unwrap(),
        server_key
    );
    let running = lab.start().await.unwrap();
    let admin = lab.operator(running.device_addr).await.unwrap();
    let _: serde_json::Value = admin
        .call(AdminBody::DeviceList {
            after: None,
            limit: None,
        })
        .await
        .unwrap();
    admin.disconnect().await;
    running.shutdown().await.unwrap();
}
