//! Keys you can trust: root rotation reaching devices through their jobs, release-key
//! revocation, threshold signing, an expired root (freeze) and a replayed manifest, each refused
//! by the orchestrator and by the devices, and each followed by a valid update on the same
//! devices.

use aloft_e2e::{create_campaign, finished, wait_campaign, Lab, ReleaseSpec};
use aloft_orchestrator::admin::wire::AdminBody;
use aloft_orchestrator::ops;
use aloft_orchestrator::store::Target;
use aloft_proto::manifest::ReleaseSigningKey;
use aloft_proto::trust::{Root, SignedRoot};
use aloft_proto::{ArtifactId, DeviceState, Reason};
use serde_json::Value;

use crate::common::{forge_job, read_bundle, refused, valid_update_succeeds, Env, LIMIT};

async fn push(env: &Env, roots: Vec<SignedRoot>) -> Result<Value, String> {
    env.admin
        .call::<Value>(AdminBody::TrustUpdate { roots })
        .await
        .map_err(|e| e.to_string())
}

async fn upload(env: &Env, bundle: &std::path::Path) -> Result<(), String> {
    ops::upload_bundle(&env.admin, bundle, false)
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

/// Rolls an uploaded release out to every device and asserts every one installed it.
async fn installs_everywhere(env: &Env, artifact: &str) {
    let artifact = ArtifactId::new(artifact).unwrap();
    let campaign = create_campaign(&env.admin, artifact, Target::All)
        .await
        .unwrap();
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), s.total, "{:?}", s.reasons);
}

fn key() -> ReleaseSigningKey {
    ReleaseSigningKey::generate().unwrap()
}

/// Root metadata after `from`, changed by `edit`, signed by `signers`.
fn next_root(
    from: &SignedRoot,
    edit: impl FnOnce(&mut Root),
    signers: &[&ReleaseSigningKey],
) -> SignedRoot {
    let mut r = from.peek_unverified().unwrap();
    r.version += 1;
    r.issued_at = aloft_e2e::now_secs();
    r.expires_at = r.issued_at + 86_400;
    edit(&mut r);
    let mut s = SignedRoot::new(&r);
    for k in signers {
        s.sign(k).unwrap();
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_root_reaches_devices_and_a_revoked_release_key_is_refused_from_then_on() {
    let env = Env::new(2).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let lab = &env.lab;
    let (root2, rel2) = (key(), key());
    let old_rel = lab.release_key.public().key_id();
    let v2 = Lab::make_root(
        Some(&lab.pinned_root),
        &[&root2],
        &[&rel2],
        std::slice::from_ref(&old_rel),
        &[&root2],
    )
    .unwrap();
    let refused_push = push(&env, vec![v2]).await.unwrap_err();
    assert!(
        refused_push.contains("untrusted_root"),
        "the old root key must sign: {refused_push}"
    );
    let v2 = Lab::make_root(
        Some(&lab.pinned_root),
        &[&root2],
        &[&rel2],
        &[old_rel],
        &[&lab.root_key, &root2],
    )
    .unwrap();
    assert_eq!(push(&env, vec![v2]).await.unwrap()["version"], 2);

    // The orchestrator refuses an upload signed by the revoked key.
    let bundle = lab
        .build_release(&ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .unwrap();
    let e = upload(&env, &bundle).await.unwrap_err();
    assert!(e.contains("revoked_key"), "{e}");

    // Signed by the new release key, it installs: the devices walked to root 2 from the job.
    let bundle = lab
        .build_release_signed(&ReleaseSpec::new("2.1.0", 2, 64 * 1024), &[&rel2])
        .unwrap();
    upload(&env, &bundle).await.unwrap();
    installs_everywhere(&env, "fw-2.1.0").await;

    // A compromised server replaying a manifest signed by the revoked key, without any root:
    // the devices remember the revocation.
    let old = lab
        .build_release(&ReleaseSpec::new("3.0.0", 3, 64 * 1024))
        .unwrap();
    let (manifest, content) = read_bundle(&old);
    for d in &env.devices {
        forge_job(
            &env,
            &d.id,
            "forged-revoked",
            &manifest,
            &content,
            Vec::new(),
        )
        .await;
        assert!(
            refused(&fleet, &d.id, "forged-revoked", Reason::RevokedKey).await,
            "{:?}",
            fleet.view(&d.id)
        );
    }
    // And a valid update still succeeds.
    let bundle = lab
        .build_release_signed(&ReleaseSpec::new("3.1.0", 3, 64 * 1024), &[&rel2])
        .unwrap();
    upload(&env, &bundle).await.unwrap();
    installs_everywhere(&env, "fw-3.1.0").await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_release_threshold_is_refused_and_two_signatures_install() {
    let env = Env::new(2).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let lab = &env.lab;
    let second = key();
    let v2 = next_root(
        &lab.pinned_root,
        |r| {
            r.keys
                .insert(second.public().key_id(), second.public().to_hex());
            r.release.keyids.push(second.public().key_id());
            r.release.threshold = 2;
        },
        &[&lab.root_key],
    );
    push(&env, vec![v2.clone()]).await.unwrap();
    let spec = ReleaseSpec::new("2.0.0", 2, 64 * 1024);
    let one = lab.build_release(&spec).unwrap();
    let e = upload(&env, &one).await.unwrap_err();
    assert!(e.contains("below_threshold"), "{e}");
    // A compromised server sends the one-signature manifest anyway: devices refuse it too.
    let (manifest, content) = read_bundle(&one);
    for d in &env.devices {
        forge_job(
            &env,
            &d.id,
            "forged-one-sig",
            &manifest,
            &content,
            vec![v2.clone()],
        )
        .await;
        assert!(
            refused(&fleet, &d.id, "forged-one-sig", Reason::BelowThreshold).await,
            "{:?}",
            fleet.view(&d.id)
        );
    }
    // The second approver signs the same bundle; now it uploads and installs.
    assert_eq!(ops::cosign_bundle(&one, &second).unwrap(), 2);
    upload(&env, &one).await.unwrap();
    installs_everywhere(&env, "fw-2.0.0").await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_root_freezes_updates_until_a_newer_root_arrives() {
    let env = Env::new(2).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let lab = &env.lab;
    // A validly signed root that has already expired: what an attacker freezing the fleet on
    // old metadata would serve.
    let expired = next_root(
        &lab.pinned_root,
        |r| {
            r.issued_at -= 10_000;
            r.expires_at = r.issued_at + 60;
        },
        &[&lab.root_key],
    );
    push(&env, vec![expired.clone()]).await.unwrap();
    let bundle = lab
        .build_release(&ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .unwrap();
    let e = upload(&env, &bundle).await.unwrap_err();
    assert!(e.contains("root_expired"), "{e}");
    let (manifest, content) = read_bundle(&bundle);
    for d in &env.devices {
        forge_job(
            &env,
            &d.id,
            "forged-frozen",
            &manifest,
            &content,
            vec![expired.clone()],
        )
        .await;
        assert!(
            refused(&fleet, &d.id, "forged-frozen", Reason::RootExpired).await,
            "{:?}",
            fleet.view(&d.id)
        );
    }
    // A fresh root 3 thaws it: the same release now uploads and installs.
    let fresh = next_root(&expired, |_| {}, &[&lab.root_key]);
    assert_eq!(push(&env, vec![fresh]).await.unwrap()["version"], 3);
    upload(&env, &bundle).await.unwrap();
    installs_everywhere(&env, "fw-2.0.0").await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_old_manifest_is_refused() {
    let env = Env::new(2).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    valid_update_succeeds(&env, &fleet, "2.0.0", 2).await;
    let first = env.lab.root.join("releases").join("2.0.0").join("bundle");
    valid_update_succeeds(&env, &fleet, "2.0.1", 2).await;
    // Same security version, validly signed, older sequence: a replay.
    let (manifest, content) = read_bundle(&first);
    for d in &env.devices {
        forge_job(&env, &d.id, "replay-1", &manifest, &content, Vec::new()).await;
        assert!(
            refused(&fleet, &d.id, "replay-1", Reason::ReplayedManifest).await,
            "{:?}",
            fleet.view(&d.id)
        );
        assert_eq!(fleet.view(&d.id).unwrap().running_version, "2.0.1");
    }
    valid_update_succeeds(&env, &fleet, "2.0.2", 2).await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_walk_several_roots_at_once() {
    let env = Env::new(2).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let lab = &env.lab;
    let mut roots = Vec::new();
    let mut prev = lab.pinned_root.clone();
    for _ in 0..3 {
        let next = next_root(&prev, |_| {}, &[&lab.root_key]);
        roots.push(next.clone());
        prev = next;
    }
    // Pushed newest first: the orchestrator sorts them.
    roots.reverse();
    assert_eq!(push(&env, roots).await.unwrap()["version"], 4);
    let status: Value = env.admin.call(AdminBody::TrustStatus {}).await.unwrap();
    assert_eq!(status["job_chain"], serde_json::json!([2, 3, 4]));
    valid_update_succeeds(&env, &fleet, "2.0.0", 2).await;
    fleet.shutdown().await;
}
