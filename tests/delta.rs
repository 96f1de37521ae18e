//! Delta updates (1.5) with the real orchestrator and simulator: a mixed fleet where half the
//! devices run the delta's base and rebuild the new image from the delta, and the other half,
//! on another image, download the full one; the campaign summary counts both paths. Also with
//! a power loss at every rebuild (the seeded fault profile), which the devices resume.

use std::sync::atomic::Ordering;

use aloft_e2e::{create_campaign, finished, pseudo_random_image, wait_campaign, ReleaseSpec};
use aloft_orchestrator::ops;
use aloft_orchestrator::store::Target;
use aloft_proto::release::ReleaseMeta;
use aloft_proto::{ArtifactId, DeviceState, SecurityVersion};

use crate::common::{Env, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_takes_the_delta_on_its_base_and_the_full_image_elsewhere() {
    mixed_fleet(0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_at_every_rebuild_resumes_it_and_the_mixed_fleet_still_succeeds() {
    mixed_fleet(1.0).await;
}

async fn mixed_fleet(power_loss_in_rebuild: f64) {
    let env = Env::new(6).await;
    let mut cfg = env.fleet_config();
    cfg.faults.seed = 13;
    cfg.faults.power_loss_in_rebuild_probability = power_loss_in_rebuild;
    let fleet = env.start_fleet(&cfg).await;
    // Half the fleet moves to 2.0.0 first: that image is the delta's base.
    let base_size = 256 * 1024;
    let base_bundle = env
        .lab
        .build_release(&ReleaseSpec::new("2.0.0", 2, base_size))
        .unwrap();
    let v2 = ops::upload_bundle(&env.admin, &base_bundle, false)
        .await
        .unwrap();
    let on_base: Vec<_> = env.devices[..3].iter().map(|d| d.id.clone()).collect();
    let first = create_campaign(&env.admin, v2, Target::Devices(on_base))
        .await
        .unwrap();
    let s = wait_campaign(&env.admin, &first, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 3, "{:?}", s.counts);

    // 3.0.0: the base with a 2% change and a section shifted by an insertion.
    let base = std::fs::read(env.lab.root.join("releases/2.0.0/image.bin")).unwrap();
    let mut image = base.clone();
    let change = pseudo_random_image(base_size / 50, 99);
    image[10_000..10_000 + change.len()].copy_from_slice(&change);
    image.splice(100_000..100_000, pseudo_random_image(512, 7));
    let dir = env.lab.root.join("releases/3.0.0");
    std::fs::create_dir_all(&dir).unwrap();
    let (base_path, image_path) = (dir.join("base.bin"), dir.join("image.bin"));
    std::fs::write(&base_path, &base).unwrap();
    std::fs::write(&image_path, &image).unwrap();
    let now = aloft_e2e::now_secs();
    let meta = ReleaseMeta {
        artifact: ArtifactId::new("fw-3.0.0").unwrap(),
        version: "3.0.0".into(),
        security_version: SecurityVersion(3),
        hardware_model: aloft_e2e::HARDWARE_MODEL.into(),
        chunk_size: aloft_proto::manifest::DEFAULT_CHUNK_BYTES,
        created_at: now,
        expires_at: now + 86_400,
        sequence: Some(aloft_e2e::next_sequence()),
        preconditions: None,
    };
    let bundle = dir.join("bundle");
    ops::build_bundle(&image_path, &meta, &env.lab.release_key, &bundle).unwrap();
    let delta = ops::build_delta_bundle(
        &base_path,
        "2.0.0",
        &image_path,
        &meta,
        &env.lab.release_key,
        &bundle,
    )
    .unwrap();
    assert!(
        delta.image_size * 10 <= image.len() as u64,
        "a 2% change costs at most a tenth of the image: {} of {}",
        delta.image_size,
        image.len()
    );
    let v3 = ops::upload_bundle(&env.admin, &bundle, false)
        .await
        .unwrap();
    for d in ops::delta_bundles(&bundle) {
        ops::upload_bundle(&env.admin, &d, false).await.unwrap();
    }

    let second = create_campaign(&env.admin, v3, Target::All).await.unwrap();
    let s = wait_campaign(&env.admin, &second, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 6, "{:?}", s.counts);
    assert_eq!(s.paths.get("delta"), Some(&3), "{:?}", s.paths);
    assert_eq!(s.paths.get("full"), Some(&3), "{:?}", s.paths);
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "3.0.0" && v.outbox == 0)
            .await
    );
    let rebuilt: u64 = fleet
        .views()
        .iter()
        .map(|(_, v)| v.stats.delta_rebuilds)
        .sum();
    assert_eq!(rebuilt, 3, "each device on the base rebuilt the image once");
    let power_losses = fleet.counters.power_losses.load(Ordering::Relaxed);
    if power_loss_in_rebuild > 0.0 {
        assert_eq!(power_losses, 3, "each rebuild was interrupted once");
    } else {
        assert_eq!(power_losses, 0);
    }
    fleet.shutdown().await;
}
