//! Rollouts that protect the fleet: waves, the automatic pause, operator pause/resume/abort,
//! timeouts, rollback campaigns and dry runs, against the real orchestrator and devices.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use aloft_device::Fleet;
use aloft_e2e::{finished, status, wait_campaign, wait_registered, ReleaseSpec};
use aloft_orchestrator::admin::wire::{AdminBody, CampaignSummary, DryRun};
use aloft_orchestrator::ops;
use aloft_orchestrator::rollout::policy::{Size, Threshold};
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_orchestrator::store::{CampaignStatus, Target};
use aloft_proto::{ArtifactId, CampaignId, DeviceId, DeviceState, Reason};

use crate::common::{waves, Broker, Env, LIMIT};

async fn wait_status(env: &Env, c: &CampaignId, want: CampaignStatus) -> CampaignSummary {
    wait_campaign(&env.admin, c, LIMIT, |s| s.status == want)
        .await
        .unwrap()
}

/// Devices of the campaign by the orchestrator's recorded state.
fn members_in(s: &CampaignSummary, pred: impl Fn(DeviceState) -> bool) -> HashSet<DeviceId> {
    s.devices
        .iter()
        .filter(|d| pred(d.state))
        .map(|d| d.device.clone())
        .collect()
}

/// Registers devices from their certificates without running them: they stay offline.
async fn register_offline(env: &Env, devices: &[aloft_device::DeviceIdentity]) {
    let certs = devices.iter().map(|d| d.cert_pem.clone()).collect();
    let _: serde_json::Value = env
        .admin
        .call(AdminBody::DeviceRegister {
            certs,
            groups: Vec::new(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_its_health_check_pauses_at_the_canary_and_touches_no_one_else() {
    failing_canary_pauses(Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_mosquitto_a_release_failing_its_health_check_pauses_at_the_canary_and_touches_no_one_else(
) {
    failing_canary_pauses(Broker::Mosquitto).await;
}

async fn failing_canary_pauses(broker: Broker) {
    let env = Env::with(broker, 20).await;
    let mut cfg = env.fleet_config();
    cfg.faults.health_check_failure_probability = 1.0;
    let fleet = env.start_fleet(&cfg).await;
    let policy = RolloutPolicy {
        waves: waves(Size::Count(4), &[50.0, 100.0]),
        pause_at: Some(Threshold {
            ratio: 0.5,
            min_sample: 2,
        }),
        ..RolloutPolicy::default()
    };
    let campaign = env
        .roll_out(&ReleaseSpec::new("2.0.0", 2, 64 * 1024), policy)
        .await;
    wait_status(&env, &campaign, CampaignStatus::Paused).await;
    // The canary devices in flight when it paused finish (and roll back) on their own.
    wait_campaign(&env.admin, &campaign, LIMIT, |s| {
        s.waves[0].counts.finished() == 4
    })
    .await
    .unwrap();
    let s = status(&env.admin, &campaign, true).await.unwrap();
    assert_eq!(s.status, CampaignStatus::Paused, "{:?}", s.reason);
    assert!(
        s.reason.as_deref().unwrap_or("").contains("wave 0"),
        "{:?}",
        s.reason
    );
    let canary: HashSet<DeviceId> = s
        .devices
        .iter()
        .filter(|d| d.wave == 0)
        .map(|d| d.device.clone())
        .collect();
    assert_eq!(canary.len(), 4);
    assert_eq!(
        members_in(&s, |st| st != DeviceState::Idle),
        canary,
        "nobody outside the canary was notified"
    );
    for d in &s.devices {
        if d.wave == 0 {
            assert_eq!(d.state, DeviceState::RolledBack, "{d:?}");
            assert_eq!(d.reason, Some(Reason::HealthCheckFailed));
        }
    }
    // The devices' own view: the canary is back on 1.0.0 and reported it; the others never
    // saw a job.
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "1.0.0" && v.outbox == 0)
            .await
    );
    for (id, v) in fleet.views() {
        if canary.contains(&id) {
            let f = v.last_finished.expect("the canary finished a campaign");
            assert_eq!(
                (f.1, f.2, f.3),
                (
                    DeviceState::RolledBack,
                    Some(Reason::HealthCheckFailed),
                    true
                )
            );
        } else {
            assert!(
                v.last_finished.is_none() && v.current.is_none(),
                "{id} was touched: {v:?}"
            );
        }
    }
    // The orchestrator logged its own decision.
    let audit: serde_json::Value = env
        .admin
        .call(AdminBody::AuditList {
            since: None,
            limit: None,
        })
        .await
        .unwrap();
    assert!(
        audit["entries"].as_array().unwrap().iter().any(|e| {
            e["actor"] == "orchestrator"
                && e["action"] == "campaign_paused"
                && e["subject"] == campaign.as_str()
        }),
        "{audit}"
    );
    // Still paused a moment later: no tick notifies anyone while paused.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = status(&env.admin, &campaign, false).await.unwrap();
    assert_eq!(again.status, CampaignStatus::Paused);
    assert_eq!(again.count(DeviceState::Idle), 16);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_abort_mid_wave() {
    pause_resume_and_abort(Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_mosquitto_pause_resume_and_abort_mid_wave() {
    pause_resume_and_abort(Broker::Mosquitto).await;
}

async fn pause_resume_and_abort(broker: Broker) {
    // Six devices run; four are registered but offline, so some notified devices stay in
    // flight and the abort has someone to cancel.
    let env = Env::with(broker, 10).await;
    let (online, offline) = env.devices.split_at(6);
    register_offline(&env, offline).await;
    let fleet = Fleet::start(&env.fleet_config(), online.to_vec()).unwrap();
    wait_registered(&env.admin, 10, LIMIT).await.unwrap();
    let policy = RolloutPolicy {
        waves: waves(Size::Count(2), &[60.0, 100.0]),
        // Offline devices must not hold the rollout.
        advance_at: 0.5,
        ..RolloutPolicy::default()
    };
    let campaign = env
        .roll_out(&ReleaseSpec::new("2.0.0", 2, 64 * 1024), policy)
        .await;
    let _: serde_json::Value = env
        .admin
        .call(AdminBody::CampaignPause {
            campaign: campaign.clone(),
        })
        .await
        .unwrap();
    let paused = status(&env.admin, &campaign, false).await.unwrap();
    assert_eq!(paused.status, CampaignStatus::Paused);
    assert_eq!(
        paused.count(DeviceState::Idle),
        8,
        "the canary of 2 was notified at creation"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = status(&env.admin, &campaign, false).await.unwrap();
    assert_eq!(
        still.count(DeviceState::Idle),
        8,
        "a paused campaign notifies nobody new: {:?}",
        still.counts
    );
    // Pausing twice is refused with a reason, not ignored.
    let again = env
        .admin
        .call::<serde_json::Value>(AdminBody::CampaignPause {
            campaign: campaign.clone(),
        })
        .await;
    assert!(again.is_err());

    let _: serde_json::Value = env
        .admin
        .call(AdminBody::CampaignResume {
            campaign: campaign.clone(),
        })
        .await
        .unwrap();
    // Wave 1 opens once half the canary finished; then abort while it runs.
    wait_campaign(&env.admin, &campaign, LIMIT, |s| {
        s.waves[1].opened_ms.is_some()
    })
    .await
    .unwrap();
    let _: serde_json::Value = env
        .admin
        .call(AdminBody::CampaignAbort {
            campaign: campaign.clone(),
        })
        .await
        .unwrap();
    let s = wait_status(&env, &campaign, CampaignStatus::Aborted).await;
    assert!(s.reason.as_deref().unwrap_or("").contains("aborted by"));
    // In flight: online devices finish or stop; offline notified ones are cancelled at once.
    wait_campaign(&env.admin, &campaign, LIMIT, |s| {
        s.count(DeviceState::Notified) == 0 && s.count(DeviceState::Downloading) == 0
    })
    .await
    .unwrap();
    let s = status(&env.admin, &campaign, true).await.unwrap();
    let idle = members_in(&s, |st| st == DeviceState::Idle);
    assert!(!idle.is_empty(), "wave 2 never started: {:?}", s.counts);
    for d in &s.devices {
        if d.state == DeviceState::Failed {
            assert_eq!(d.reason, Some(Reason::Cancelled), "{d:?}");
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = status(&env.admin, &campaign, false).await.unwrap();
    assert_eq!(
        later.count(DeviceState::Idle),
        idle.len() as u32,
        "nothing after abort"
    );
    // Every running device kept a bootable slot and runs one of the two releases; the ones
    // never notified never saw the job.
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.outbox == 0 && v.current.is_none())
            .await
    );
    for (id, v) in fleet.views() {
        assert!(["1.0.0", "2.0.0"].contains(&v.running_version.as_str()));
        if idle.contains(&id) {
            assert!(v.last_finished.is_none(), "{id} was notified after all");
        }
    }
    // Resuming an aborted campaign is refused.
    assert!(env
        .admin
        .call::<serde_json::Value>(AdminBody::CampaignResume {
            campaign: campaign.clone()
        })
        .await
        .is_err());
    // The audit log has every operator action, refusals included, in a chain that verifies.
    let audit: serde_json::Value = env
        .admin
        .call(AdminBody::AuditList {
            since: None,
            limit: None,
        })
        .await
        .unwrap();
    assert_eq!(audit["chain"]["ok"], true, "{audit}");
    let seen: Vec<(String, String)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject"] == campaign.as_str() || e["action"] == "campaign_create")
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or("").to_owned();
            (s("action"), s("outcome"))
        })
        .collect();
    let want = [
        ("campaign_create", "ok"),
        ("campaign_pause", "ok"),
        ("campaign_pause", "wrong_status"),
        ("campaign_resume", "ok"),
        ("campaign_abort", "ok"),
        ("campaign_resume", "wrong_status"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, o)| ((*a).to_owned(), (*o).to_owned()))
        .collect();
    assert_eq!(seen, want);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_is_timed_out_and_counts_as_a_failure() {
    let env = Env::new(3).await;
    let (online, offline) = env.devices.split_at(2);
    register_offline(&env, offline).await;
    let fleet = Fleet::start(&env.fleet_config(), online.to_vec()).unwrap();
    wait_registered(&env.admin, 3, LIMIT).await.unwrap();
    let policy = RolloutPolicy {
        notified_timeout_secs: Some(2),
        ..RolloutPolicy::default()
    };
    let campaign = env
        .roll_out(&ReleaseSpec::new("2.0.0", 2, 64 * 1024), policy)
        .await;
    let s = wait_status(&env, &campaign, CampaignStatus::Finished).await;
    assert_eq!(s.count(DeviceState::Succeeded), 2, "{:?}", s.counts);
    assert_eq!(s.count(DeviceState::Failed), 1);
    assert_eq!(s.reasons.get("timed_out"), Some(&1));
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_campaign_returns_devices_only_where_the_floor_allows() {
    let env = Env::new(3).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let first = env
        .lab
        .release_to_all(&env.admin, &ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .await
        .unwrap();
    wait_campaign(&env.admin, &first, LIMIT, finished)
        .await
        .unwrap();
    // The old image re-signed under its old security version: every device raised its floor
    // to 2, so the orchestrator refuses up front rather than failing on every device.
    let old = env
        .lab
        .upload(&env.admin, &ReleaseSpec::new("1.9.0", 1, 64 * 1024))
        .await
        .unwrap();
    let refused = env
        .admin
        .call::<serde_json::Value>(AdminBody::CampaignRollback {
            campaign: first.clone(),
            to: old,
            policy: RolloutPolicy::default(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("downgrade_blocked"),
        "{refused}"
    );
    let back = env
        .lab
        .upload(&env.admin, &ReleaseSpec::new("1.9.1", 2, 64 * 1024))
        .await
        .unwrap();
    let v: serde_json::Value = env
        .admin
        .call(AdminBody::CampaignRollback {
            campaign: first.clone(),
            to: back,
            policy: RolloutPolicy::default(),
            dry_run: false,
        })
        .await
        .unwrap();
    let rollback = CampaignId::new(v["campaign"].as_str().unwrap()).unwrap();
    let s = wait_campaign(&env.admin, &rollback, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 3, "{:?}", s.counts);
    assert_eq!(s.rolls_back.as_ref(), Some(&first));
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "1.9.1")
            .await
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_select_the_target_and_a_dry_run_touches_nothing() {
    let env = Env::new(12).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let ids: Vec<DeviceId> = env.devices.iter().map(|d| d.id.clone()).collect();
    let (eu, rest) = ids.split_at(8);
    let _: serde_json::Value = env
        .admin
        .call(AdminBody::DeviceLabel {
            devices: eu.to_vec(),
            set: BTreeMap::from([("region".into(), "eu".into())]),
            remove: Vec::new(),
        })
        .await
        .unwrap();
    let artifact = env
        .lab
        .upload(&env.admin, &ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .await
        .unwrap();
    let policy = RolloutPolicy {
        waves: waves(Size::Percent(25.0), &[100.0]),
        ..RolloutPolicy::default()
    };
    let create = |dry_run| AdminBody::CampaignCreate {
        artifact: artifact.clone(),
        target: Target::Labels(BTreeMap::from([("region".into(), "eu".into())])),
        include: vec![rest[0].clone()],
        exclude: vec![eu[0].clone()],
        policy: policy.clone(),
        dry_run,
        origin: None,
    };
    let plan: DryRun = env.admin.call(create(true)).await.unwrap();
    assert_eq!(plan.total, 8, "7 labelled + 1 included");
    assert_eq!(plan.waves.iter().map(Vec::len).collect::<Vec<_>>(), [2, 6]);
    let planned: HashSet<DeviceId> = plan.waves.iter().flatten().cloned().collect();
    assert!(planned.contains(&rest[0]) && !planned.contains(&eu[0]));
    let campaigns: Vec<serde_json::Value> =
        env.admin.call(AdminBody::CampaignList {}).await.unwrap();
    assert!(campaigns.is_empty(), "a dry run creates nothing");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fleet.count(|v| v.current.is_some() || v.last_finished.is_some()),
        0
    );

    let v: serde_json::Value = env.admin.call(create(false)).await.unwrap();
    let campaign = CampaignId::new(v["campaign"].as_str().unwrap()).unwrap();
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 8);
    let s = status(&env.admin, &campaign, true).await.unwrap();
    let members: HashSet<DeviceId> = s.devices.iter().map(|d| d.device.clone()).collect();
    assert_eq!(members, planned, "the dry run named exactly the members");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_to_an_older_build_is_refused_as_a_replay_until_the_image_is_signed_again() {
    let env = Env::new(4).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    // Built first, so its manifest sequence (the build time) is below 2.0.0's; the same
    // security version, so the floor allows it.
    let old_bundle = env
        .lab
        .build_release(&ReleaseSpec::new("1.9.1", 2, 64 * 1024))
        .unwrap();
    let first = env
        .lab
        .release_to_all(&env.admin, &ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .await
        .unwrap();
    wait_campaign(&env.admin, &first, LIMIT, finished)
        .await
        .unwrap();
    let old = ops::upload_bundle(&env.admin, &old_bundle, false)
        .await
        .unwrap();
    let releases: Vec<serde_json::Value> = env.admin.call(AdminBody::ReleaseList {}).await.unwrap();
    let sequence = |a: &str| {
        releases
            .iter()
            .find(|r| r["artifact"] == a)
            .and_then(|r| r["sequence"].as_u64())
            .unwrap()
    };
    assert!(sequence("fw-1.9.1") < sequence("fw-2.0.0"), "{releases:?}");

    // Refused up front, dry run or not, rollback or plain campaign: no device is asked.
    let rollback = |to: ArtifactId, dry_run| AdminBody::CampaignRollback {
        campaign: first.clone(),
        to,
        policy: RolloutPolicy::default(),
        dry_run,
    };
    let create = AdminBody::CampaignCreate {
        artifact: old.clone(),
        target: Target::All,
        include: Vec::new(),
        exclude: Vec::new(),
        policy: RolloutPolicy::default(),
        dry_run: true,
        origin: None,
    };
    for body in [
        rollback(old.clone(), true),
        rollback(old.clone(), false),
        create,
    ] {
        let refused = env
            .admin
            .call::<serde_json::Value>(body)
            .await
            .unwrap_err()
            .to_string();
        assert!(refused.contains("replay_blocked"), "{refused}");
        assert!(refused.contains("release resign"), "{refused}");
    }
    let campaigns: Vec<serde_json::Value> =
        env.admin.call(AdminBody::CampaignList {}).await.unwrap();
    assert_eq!(campaigns.len(), 1, "nothing was created");
    assert_eq!(
        fleet.count(|v| v.running_version == "2.0.0" && v.current.is_none()),
        4
    );

    // The fix the message gives: the same image signed again as a new release.
    let new_bundle = env.lab.root.join("releases").join("1.9.1-r2");
    let now = aloft_e2e::now_secs();
    let resign = ops::Resign {
        artifact: ArtifactId::new("fw-1.9.1-r2").unwrap(),
        version: "1.9.1-r2".into(),
        security_version: None,
        created_at: now,
        expires_at: now + 86_400,
        sequence: aloft_e2e::next_sequence(),
    };
    let (_, m) =
        ops::resign_bundle(&old_bundle, &resign, &env.lab.release_key, &new_bundle).unwrap();
    assert_eq!(m.security_version.0, 2);
    let again = ops::upload_bundle(&env.admin, &new_bundle, false)
        .await
        .unwrap();
    let v: serde_json::Value = env.admin.call(rollback(again, false)).await.unwrap();
    let back = CampaignId::new(v["campaign"].as_str().unwrap()).unwrap();
    let s = wait_campaign(&env.admin, &back, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 4, "{:?}", s.reasons);
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "1.9.1-r2")
            .await
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_timed_out_while_offline_learns_of_the_withdrawal_when_it_reconnects() {
    let env = Env::new(1).await;
    let mut cfg = env.fleet_config();
    // Slow enough that the download is still going when the device drops off.
    cfg.faults.slow_link_probability = 1.0;
    cfg.faults.slow_link_bytes_per_sec = 16 * 1024;
    let fleet = env.start_fleet(&cfg).await;
    let id = env.devices[0].id.clone();
    let policy = RolloutPolicy {
        device_timeout_secs: Some(3),
        ..RolloutPolicy::default()
    };
    let campaign = env
        .roll_out(&ReleaseSpec::new("2.0.0", 2, 256 * 1024), policy)
        .await;
    assert!(
        fleet
            .wait_one(&id, LIMIT, |v| v
                .current
                .as_ref()
                .is_some_and(|c| c.1 == DeviceState::Downloading)
                && v.stats.chunks_received > 0)
            .await
    );
    fleet.set_online(&id, false);
    assert!(fleet.wait_one(&id, LIMIT, |v| !v.connected).await);
    let s = wait_campaign(&env.admin, &campaign, LIMIT, |s| {
        s.reasons.get("timed_out") == Some(&1)
    })
    .await
    .unwrap();
    assert_eq!(s.count(DeviceState::Failed), 1);
    assert_eq!(
        fleet.view(&id).unwrap().current.map(|c| c.1),
        Some(DeviceState::Downloading),
        "offline, it never heard of the time-out"
    );

    fleet.set_online(&id, true);
    // Back, it learns its job was withdrawn: it abandons the download, reports it, and is
    // idle on its old image, ready for the next campaign.
    assert!(
        fleet
            .wait_one(&id, LIMIT, |v| v.current.is_none() && v.outbox == 0)
            .await,
        "{:?}",
        fleet.view(&id)
    );
    let v = fleet.view(&id).unwrap();
    assert_eq!(
        v.last_finished.map(|f| (f.0, f.1, f.2)),
        Some((
            campaign.clone(),
            DeviceState::Failed,
            Some(Reason::Cancelled)
        ))
    );
    assert_eq!(v.running_version, "1.0.0");
    assert!(v.running_slot_valid);
    let next = env
        .roll_out(
            &ReleaseSpec::new("2.0.1", 2, 16 * 1024),
            RolloutPolicy::default(),
        )
        .await;
    let s = wait_campaign(&env.admin, &next, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 1, "{:?}", s.reasons);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_download_that_keeps_progressing_outlasts_the_device_timeout_and_succeeds() {
    let env = Env::new(1).await;
    let mut cfg = env.fleet_config();
    cfg.faults.slow_link_probability = 1.0;
    cfg.faults.slow_link_bytes_per_sec = 64 * 1024;
    let fleet = env.start_fleet(&cfg).await;
    let policy = RolloutPolicy {
        device_timeout_secs: Some(4),
        ..RolloutPolicy::default()
    };
    // About 8 s of downloading at 64 KiB/s, twice the timeout: a 16 KiB chunk and a new
    // request every 0.25 s. (The device is silent only while its last window of 8 chunks
    // arrives, 2 s, below the timeout.)
    let started = std::time::Instant::now();
    let campaign = env
        .roll_out(&ReleaseSpec::new("2.0.0", 2, 512 * 1024), policy)
        .await;
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 1, "{:?}", s.reasons);
    assert!(
        started.elapsed() > Duration::from_secs(6),
        "the link was not slow: {:?}",
        started.elapsed()
    );
    fleet.shutdown().await;
}
