//! Crash safety: the orchestrator is killed with SIGKILL mid-campaign and started again on the
//! same data directory. The embedded broker keeps nothing, so everything devices need must come
//! back from the store, and no transition the orchestrator acknowledged may be lost. The first
//! two tests run on both set-ups: beside Mosquitto the devices stay connected to the broker
//! while the orchestrator is gone, and their reports meet no subscriber until it is back.

use std::collections::HashMap;

use aloft_device::Fleet;
use aloft_e2e::{finished, status, wait_campaign, ReleaseSpec};
use aloft_proto::{CampaignId, DeviceId, DeviceState};

use crate::common::{exe, spawned, spawned_on, start_child, Broker, Spawned, LIMIT};

/// Position of a state along the success path, for "did not go backwards"; every terminal
/// state counts as the end.
pub(crate) fn rank(s: DeviceState) -> usize {
    DeviceState::SUCCESS_PATH
        .iter()
        .position(|p| *p == s)
        .unwrap_or(DeviceState::SUCCESS_PATH.len() - 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_killed_mid_campaign_resumes_and_loses_no_acknowledged_transition() {
    orchestrator_killed_mid_campaign(Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_beside_mosquitto_killed_mid_campaign_resumes_and_loses_no_acknowledged_transition(
) {
    orchestrator_killed_mid_campaign(Broker::Mosquitto).await;
}

async fn orchestrator_killed_mid_campaign(broker: Broker) {
    // Small chunks and a small window: the campaign takes long enough to be caught mid-way.
    let Spawned {
        tmp: _tmp,
        lab,
        orch,
        admin,
        fleet,
        mosquitto,
    } = spawned_on(broker, 50, |cfg| cfg.window = 2).await;
    let addr = orch.device_addr;
    let mut spec = ReleaseSpec::new("2.0.0", 2, 512 * 1024);
    spec.chunk_bytes = 4 * 1024;
    let campaign = lab.release_to_all(&admin, &spec).await.unwrap();

    // Wait until devices are downloading (their `downloading` reports acknowledged), then kill
    // without warning, well before the campaign can finish.
    wait_campaign(&admin, &campaign, LIMIT, |s| {
        s.count(DeviceState::Downloading) >= 10 && !finished(s)
    })
    .await
    .unwrap();
    let before = status(&admin, &campaign, false).await.unwrap();
    admin.disconnect().await;
    orch.kill9().unwrap();
    // Devices cannot get acknowledgements any more: what each last had accepted is now fixed.
    let acked = acknowledged(&fleet, &campaign);
    assert!(!before.counts.is_empty());
    assert!(
        acked.values().any(|s| *s != DeviceState::Succeeded),
        "the kill landed mid-campaign: {:?}",
        before.counts
    );

    let orch = start_child(&lab, mosquitto.as_ref(), addr);
    let admin = lab.operator(orch.device_addr).await.unwrap();
    let after_restart = status(&admin, &campaign, true).await.unwrap();
    for d in &after_restart.devices {
        if let Some(a) = acked.get(&d.device) {
            assert!(
                rank(d.state) >= rank(*a),
                "{} was acknowledged in {a} but the restarted orchestrator says {}",
                d.device,
                d.state
            );
        }
    }
    let s = wait_campaign(&admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 50, "{:?}", s.counts);
    // Devices served before the kill that report `succeeded` after it are not flagged: "served"
    // was durable before their first chunk left.
    let metrics = orch
        .metrics_addr
        .expect("the spawned orchestrator serves metrics");
    assert_eq!(
        aloft_e2e::scrape(metrics, "aloft_success_without_download_total").await,
        Some(0.0)
    );
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "2.0.0")
            .await
    );
    fleet.shutdown().await;
    drop(orch);
}

/// Each device's last acknowledged state in `campaign`.
pub(crate) fn acknowledged(fleet: &Fleet, campaign: &CampaignId) -> HashMap<DeviceId, DeviceState> {
    fleet
        .views()
        .into_iter()
        .filter_map(|(id, v)| match v.last_acked {
            Some((c, s)) if &c == campaign => Some((id, s)),
            _ => None,
        })
        .collect()
}

/// A campaign that paused itself stays paused across a SIGKILL: the rollout's state (open waves,
/// status, why) comes back from the store, nobody new is notified, and the thresholds still hold
/// when an operator resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_rollout_stays_paused_across_a_crash_and_its_thresholds_still_hold() {
    paused_rollout_survives_a_crash(Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_mosquitto_a_paused_rollout_stays_paused_across_a_crash_and_its_thresholds_still_hold(
) {
    paused_rollout_survives_a_crash(Broker::Mosquitto).await;
}

async fn paused_rollout_survives_a_crash(broker: Broker) {
    use aloft_e2e::create_rollout;
    use aloft_orchestrator::admin::wire::AdminBody;
    use aloft_orchestrator::rollout::policy::{Growth, Size, Threshold, Waves};
    use aloft_orchestrator::rollout::RolloutPolicy;
    use aloft_orchestrator::store::{CampaignStatus, Target};

    let Spawned {
        tmp: _tmp,
        lab,
        orch,
        admin,
        fleet,
        mosquitto,
    } = spawned_on(broker, 10, |cfg| {
        cfg.faults.health_check_failure_probability = 1.0
    })
    .await;
    let addr = orch.device_addr;
    let artifact = lab
        .upload(&admin, &ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .await
        .unwrap();
    let policy = RolloutPolicy {
        waves: Waves {
            canary: Some(Size::Count(2)),
            growth: Growth::Percent(vec![50.0, 100.0]),
        },
        pause_at: Some(Threshold {
            ratio: 0.5,
            min_sample: 2,
        }),
        ..RolloutPolicy::default()
    };
    let campaign = create_rollout(&admin, artifact, Target::All, policy)
        .await
        .unwrap();
    let paused = wait_campaign(&admin, &campaign, LIMIT, |s| {
        s.status == CampaignStatus::Paused && s.waves[0].counts.finished() == 2
    })
    .await
    .unwrap();
    admin.disconnect().await;
    orch.kill9().unwrap();

    let orch = start_child(&lab, mosquitto.as_ref(), addr);
    let admin = lab.operator(orch.device_addr).await.unwrap();
    let after = status(&admin, &campaign, false).await.unwrap();
    assert_eq!(after.status, CampaignStatus::Paused);
    assert_eq!(after.reason, paused.reason);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let later = status(&admin, &campaign, false).await.unwrap();
    assert_eq!(
        later.count(DeviceState::Idle),
        8,
        "nobody notified after the restart"
    );

    // Resuming overrides the canary's verdict; wave 1 fails too and pauses the campaign again.
    let _: serde_json::Value = admin
        .call(AdminBody::CampaignResume {
            campaign: campaign.clone(),
        })
        .await
        .unwrap();
    let again = wait_campaign(&admin, &campaign, LIMIT, |s| {
        s.status == CampaignStatus::Paused && s.reason.as_deref().unwrap_or("").contains("wave 1")
    })
    .await
    .unwrap();
    assert_eq!(
        again.count(DeviceState::Idle),
        5,
        "wave 2 never opened: {:?}",
        again.counts
    );
    fleet.shutdown().await;
    drop(orch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_timed_out_while_offline_learns_of_it_even_after_the_orchestrator_restarted() {
    let Spawned {
        tmp: _tmp,
        lab,
        orch,
        admin,
        fleet,
        ..
    } = spawned(1, |cfg| {
        cfg.faults.slow_link_probability = 1.0;
        cfg.faults.slow_link_bytes_per_sec = 16 * 1024;
    })
    .await;
    let addr = orch.device_addr;
    let id = fleet.ids().next().unwrap().clone();
    let artifact = lab
        .upload(&admin, &ReleaseSpec::new("2.0.0", 2, 256 * 1024))
        .await
        .unwrap();
    let policy = aloft_orchestrator::rollout::RolloutPolicy {
        device_timeout_secs: Some(3),
        ..Default::default()
    };
    let campaign = aloft_e2e::create_rollout(
        &admin,
        artifact,
        aloft_orchestrator::store::Target::All,
        policy,
    )
    .await
    .unwrap();
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
    wait_campaign(&admin, &campaign, LIMIT, |s| {
        s.reasons.get("timed_out") == Some(&1)
    })
    .await
    .unwrap();
    // The retained withdrawal dies with the embedded broker.
    admin.disconnect().await;
    orch.kill9().unwrap();
    let orch = lab.spawn(exe(), addr).unwrap();
    let admin = lab.operator(orch.device_addr).await.unwrap();
    fleet.set_online(&id, true);
    // Its next chunk request is refused and answered with the withdrawal.
    assert!(
        fleet
            .wait_one(&id, LIMIT, |v| v.current.is_none() && v.outbox == 0)
            .await,
        "{:?}",
        fleet.view(&id)
    );
    let v = fleet.view(&id).unwrap();
    assert_eq!(
        v.last_finished.map(|f| (f.0, f.1)),
        Some((campaign, DeviceState::Failed))
    );
    assert_eq!(v.running_version, "1.0.0");
    admin.disconnect().await;
    fleet.shutdown().await;
    drop(orch);
}

/// The next non-empty publish on `device`'s job topic that `el` receives (a retained job on
/// subscribe, or one published live).
async fn next_job(
    el: &mut rumqttc::v5::EventLoop,
    device: &aloft_device::DeviceIdentity,
) -> Vec<u8> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::Event;
    let topic = aloft_proto::topics::job(&device.id);
    tokio::time::timeout(LIMIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p)))
                    if p.topic == topic.as_bytes() && !p.payload.is_empty() =>
                {
                    return p.payload.to_vec();
                }
                Ok(_) => {}
                Err(e) => panic!("{}: {e}", device.id),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{}: no job", device.id))
}

/// Connects as each device with its own certificate and subscribes to its job topic.
async fn job_listeners(
    addr: std::net::SocketAddr,
    lab: &aloft_e2e::Lab,
    devices: &[aloft_device::DeviceIdentity],
) -> Vec<(rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop)> {
    let mut listeners = Vec::new();
    for d in devices {
        let (client, el) = crate::common::device_client(addr, lab.ca.cert_pem(), d).await;
        client
            .subscribe(
                aloft_proto::topics::job(&d.id),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        listeners.push((client, el));
    }
    listeners
}

/// A job is made once (issue 12). Its wrapped key is HPKE with a fresh ephemeral
/// key, so a job made again would be another job; the orchestrator stores each member's part
/// and republishes from it after a crash, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gets_the_same_job_byte_for_byte_from_an_orchestrator_killed_and_restarted_mid_campaign(
) {
    let tmp = tempfile::tempdir().unwrap();
    let lab = aloft_e2e::Lab::create(tmp.path()).unwrap();
    let orch = start_child(&lab, None, "127.0.0.1:0".parse().unwrap());
    let addr = orch.device_addr;
    let devices = lab.enroll_fleet("dev", 2).unwrap();
    let admin = lab.operator(addr).await.unwrap();
    // The devices register by connecting, and stay notified: they never report, so the
    // campaign is mid-way when the orchestrator dies.
    let mut listeners = job_listeners(addr, &lab, &devices).await;
    aloft_e2e::wait_registered(&admin, devices.len(), LIMIT)
        .await
        .unwrap();
    let campaign = lab
        .release_to_all(&admin, &ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .await
        .unwrap();
    let mut before = Vec::new();
    for ((_, el), d) in listeners.iter_mut().zip(&devices) {
        before.push(next_job(el, d).await);
    }
    let job: aloft_proto::messages::Job = aloft_proto::messages::decode(&before[0]).unwrap();
    assert_eq!(job.campaign, campaign);
    assert_ne!(
        before[0], before[1],
        "each device's key is wrapped for it alone"
    );
    for (client, el) in listeners {
        crate::common::close(client, el).await;
    }
    admin.disconnect().await;
    orch.kill9().unwrap();

    let orch = lab.spawn(exe(), addr).unwrap();
    let mut listeners = job_listeners(orch.device_addr, &lab, &devices).await;
    for (i, ((_, el), d)) in listeners.iter_mut().zip(&devices).enumerate() {
        let after = next_job(el, d).await;
        assert!(
            after == before[i],
            "{}: the job after the restart differs from the one before it",
            d.id
        );
    }
    for (client, el) in listeners {
        crate::common::close(client, el).await;
    }
    drop(orch);
}
