//! Campaigns that should succeed: the main path at fleet scale, with chunks corrupted in
//! transit, and with a device that comes online only after the campaign started.

use std::sync::atomic::Ordering;

use aloft_device::Fleet;
use aloft_e2e::{finished, wait_campaign, wait_registered, ReleaseSpec};
use aloft_orchestrator::admin::wire::{AdminBody, AdminRequest};
use aloft_orchestrator::store::Target;
use aloft_proto::DeviceState;

use crate::common::{Broker, Env, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_over_mtls_updates_fifty_devices() {
    campaign_updates_fifty_devices(Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_through_mosquitto_updates_fifty_devices() {
    campaign_updates_fifty_devices(Broker::Mosquitto).await;
}

async fn campaign_updates_fifty_devices(broker: Broker) {
    let env = Env::with(broker, 50).await;
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
    if broker == Broker::Embedded {
        // 192 KiB in 16 KiB chunks to 50 devices: every frame went past the broker, on the
        // devices' own connections.
        assert!(env.running.metrics.direct_delivered() >= 50 * 12);
    }
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
    offline_device_catches_up(Broker::Embedded).await;
}

/// Beside Mosquitto the job waits for the device as a retained message on the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_mosquitto_a_device_offline_when_the_campaign_starts_gets_its_job_when_it_connects()
{
    offline_device_catches_up(Broker::Mosquitto).await;
}

async fn offline_device_catches_up(broker: Broker) {
    let env = Env::with(broker, 3).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_campaign_create_creates_one_campaign() {
    let env = Env::new(1).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let bundle = env
        .lab
        .build_release(&ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .unwrap();
    let artifact = aloft_orchestrator::ops::upload_bundle(&env.admin, &bundle, false)
        .await
        .unwrap();
    // A second operator sends the same request twice, as QoS 1 redelivery would.
    let op = aloft_proto::OperatorId::new("ops2").unwrap();
    let profile = env.lab.root.join("ops2");
    aloft_orchestrator::ops::issue_operator_profile(
        &env.lab.ca,
        &op,
        aloft_certs::OperatorRole::Operator,
        &profile,
        1,
    )
    .unwrap();
    let (client, mut el) = crate::common::operator_client(env.running.device_addr, &profile).await;
    // Signed, as the CLI signs: the role comes with the request, whatever became of the
    // session by the time the engine reads it.
    let signer = aloft_orchestrator::admin::auth::RequestSigner::from_profile(&profile).unwrap();
    let body = AdminBody::CampaignCreate {
        artifact,
        target: Target::All,
        include: Vec::new(),
        exclude: Vec::new(),
        policy: Default::default(),
        dry_run: false,
        origin: None,
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let request = AdminRequest {
        v: 1,
        id: "create-once".into(),
        auth: Some(signer.sign("create-once", &body, now_ms).unwrap()),
        body,
    };
    let topic = aloft_proto::topics::admin_request(&op, "request");
    for _ in 0..2 {
        let payload = aloft_proto::messages::encode(&request);
        crate::common::publish_and_settle(&client, &mut el, topic.clone(), payload, false).await;
    }
    crate::common::close(client, el).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let campaigns = loop {
        let c: Vec<serde_json::Value> = env.admin.call(AdminBody::CampaignList {}).await.unwrap();
        if !c.is_empty() || tokio::time::Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // Both copies were handled before the list (one engine, one queue, in order).
    assert_eq!(campaigns.len(), 1, "{campaigns:?}");
    assert_eq!(env.running.metrics.rejected_count("admin", "duplicate"), 1);
    fleet.shutdown().await;
}
