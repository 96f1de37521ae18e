//! Attacks on the update path, each refused, and each followed by a valid update succeeding on
//! the same device: a refusal must never wedge a device or its state.

use aloft_e2e::{create_campaign, finished, wait_campaign, ReleaseSpec};
use aloft_orchestrator::admin::client::ClientError;
use aloft_orchestrator::admin::wire::AdminBody;
use aloft_orchestrator::ops;
use aloft_orchestrator::store::Target;
use aloft_proto::manifest::{ReleaseSigningKey, SignedManifest};
use aloft_proto::{topics, DeviceState, Reason};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;

use crate::common::{
    close, device_client, forge_job, id, publish_and_settle, read_bundle, refused,
    valid_update_succeeds, Env, LIMIT,
};

/// A manifest whose payload was changed after signing (a different version claimed).
fn tamper(signed: &SignedManifest) -> SignedManifest {
    let mut m: Value =
        serde_json::from_slice(&B64.decode(signed.payload.as_bytes()).unwrap()).unwrap();
    m["version"] = Value::from("6.6.6");
    SignedManifest {
        payload: B64.encode(serde_json::to_vec(&m).unwrap()).into(),
        signatures: signed.signatures.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_jobs_from_a_compromised_server_are_refused_then_a_valid_update_succeeds() {
    let env = Env::new(2).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let bundle = env
        .lab
        .build_release(&ReleaseSpec::new("3.0.0", 3, 64 * 1024))
        .unwrap();
    let (signed, key) = read_bundle(&bundle);
    let rogue = ReleaseSigningKey::generate().unwrap();
    let forged_by_rogue = SignedManifest::sign(&signed.peek_unverified().unwrap(), &rogue);
    // dev-00000 gets a validly signed manifest altered afterwards; dev-00001 one signed by a
    // key it was never provisioned with.
    let cases = [
        ("dev-00000", tamper(&signed), Reason::BadSignature),
        ("dev-00001", forged_by_rogue, Reason::UnknownSigningKey),
    ];
    for (device, manifest, _) in &cases {
        forge_job(&env, &id(device), "forged-1", manifest, &key, Vec::new()).await;
    }
    for (device, _, reason) in &cases {
        assert!(
            refused(&fleet, &id(device), "forged-1", *reason).await,
            "{device} refused the forged job with {reason:?}: {:?}",
            fleet.view(&id(device))
        );
        let v = fleet.view(&id(device)).unwrap();
        assert_eq!(v.running_version, "1.0.0", "nothing was installed");
        assert_eq!(v.stats.chunks_received, 0, "nothing was downloaded");
    }
    valid_update_succeeds(&env, &fleet, "3.0.0", 3).await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_for_another_hardware_model_is_refused_then_a_valid_update_succeeds() {
    let env = Env::new(2).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let mut spec = ReleaseSpec::new("2.0.0-other", 2, 64 * 1024);
    spec.hardware_model = "other-board".into();
    let campaign = env.lab.release_to_all(&env.admin, &spec).await.unwrap();
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Failed), 2, "{:?}", s.counts);
    assert_eq!(s.reasons.get("wrong_hardware"), Some(&2), "{:?}", s.reasons);
    valid_update_succeeds(&env, &fleet, "2.0.0", 2).await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_security_version_is_refused_as_a_downgrade_then_a_valid_update_succeeds() {
    let env = Env::new(2).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    valid_update_succeeds(&env, &fleet, "3.0.0", 3).await;
    assert!(
        fleet.wait_all(LIMIT, |v| v.floor == 3).await,
        "floor raised after a healthy boot"
    );

    let campaign = env
        .lab
        .release_to_all(&env.admin, &ReleaseSpec::new("2.5.0", 2, 64 * 1024))
        .await
        .unwrap();
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Failed), 2, "{:?}", s.counts);
    assert_eq!(s.reasons.get("downgrade"), Some(&2), "{:?}", s.reasons);
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "3.0.0" && v.floor == 3)
            .await
    );

    valid_update_succeeds(&env, &fleet, "4.0.0", 4).await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_upload_with_a_bad_signature_is_refused_by_the_server() {
    let env = Env::new(1).await;
    let bundle = env
        .lab
        .build_release(&ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .unwrap();
    let (signed, key) = read_bundle(&bundle);
    let rogue = ReleaseSigningKey::generate().unwrap();
    let untrusted = SignedManifest::sign(&signed.peek_unverified().unwrap(), &rogue);
    for (manifest, code) in [
        (tamper(&signed), "bad_signature"),
        (untrusted, "unknown_signing_key"),
    ] {
        let r: Result<Value, _> = env
            .admin
            .call(AdminBody::ReleasePut {
                manifest,
                content_key: hex::encode(key.as_bytes()),
            })
            .await;
        match r {
            Err(ClientError::Refused(e)) => assert_eq!(e.code, code),
            other => panic!("upload was not refused with {code}: {other:?}"),
        }
    }
    let releases: Vec<Value> = env.admin.call(AdminBody::ReleaseList {}).await.unwrap();
    assert!(releases.is_empty(), "nothing was stored: {releases:?}");

    // The same bundle, untouched, is accepted and can be rolled out.
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let artifact = ops::upload_bundle(&env.admin, &bundle, false)
        .await
        .unwrap();
    let campaign = create_campaign(&env.admin, artifact, Target::All)
        .await
        .unwrap();
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 1, "{:?}", s.counts);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_truncated_and_oversized_payloads_are_counted_and_lose_nothing() {
    let env = Env::new(1).await;
    let metrics = env.running.metrics.clone();
    let device = env.devices[0].clone();
    let ca = env.lab.ca.cert_pem().to_owned();
    let status = topics::status(&device.id);
    let chunk_req = topics::chunk_request(&device.id);
    let valid_status =
        br#"{"v":1,"campaign":"c-1","seq":1,"state":"downloading","running_version":"1.0.0"}"#;
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\xff\xfe not json".to_vec()),
        ("truncated", valid_status[..valid_status.len() / 2].to_vec()),
        ("empty", Vec::new()),
        (
            "unknown field",
            br#"{"v":1,"campaign":"c-1","seq":1,"state":"downloading","x":1}"#.to_vec(),
        ),
        (
            "wrong version",
            br#"{"v":9,"campaign":"c-1","seq":1,"state":"downloading"}"#.to_vec(),
        ),
        ("too large for the message", vec![b' '; 8 * 1024]),
    ];
    {
        let (client, mut el) = device_client(env.running.device_addr, &ca, &device).await;
        for (_, payload) in &bad {
            for topic in [&status, &chunk_req] {
                publish_and_settle(&client, &mut el, topic.clone(), payload.clone(), false).await;
            }
        }
        close(client, el).await;
    }
    {
        // An operator's malformed admin requests get an error reply and change nothing.
        // A second operator: `ops` is connected already (as the test's admin client).
        let op = aloft_proto::OperatorId::new("ops2").unwrap();
        let profile = env.lab.root.join("ops2");
        ops::issue_operator_profile(
            &env.lab.ca,
            &op,
            aloft_certs::OperatorRole::Operator,
            &profile,
            1,
        )
        .unwrap();
        let topic = topics::admin_request(&op, "request");
        let (client, mut el) =
            crate::common::operator_client(env.running.device_addr, &profile).await;
        for payload in [
            b"{".to_vec(),
            b"[]".to_vec(),
            br#"{"v":1,"id":"x","op":"nope"}"#.to_vec(),
        ] {
            publish_and_settle(&client, &mut el, topic.clone(), payload, false).await;
        }
    }
    // The engine handles inbound messages asynchronously; wait for it to catch up. A PUBACK
    // says only that the broker has a message, so the operator's requests, published last, are
    // waited for too.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while tokio::time::Instant::now() < deadline {
        let s: u64 = ["malformed", "too_large", "unsupported_version", "invalid"]
            .iter()
            .map(|r| {
                metrics.rejected_count("status", r) + metrics.rejected_count("chunk_request", r)
            })
            .sum();
        let admin: u64 = ["malformed", "unsupported_version", "invalid"]
            .iter()
            .map(|r| metrics.rejected_count("admin", r))
            .sum();
        if s >= 2 * bad.len() as u64 && admin >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for topic in ["status", "chunk_request"] {
        let n: u64 = ["malformed", "too_large", "unsupported_version", "invalid"]
            .iter()
            .map(|r| metrics.rejected_count(topic, r))
            .sum();
        assert_eq!(n, bad.len() as u64, "every bad {topic} payload was counted");
    }
    let admin: u64 = ["malformed", "unsupported_version", "invalid"]
        .iter()
        .map(|r| metrics.rejected_count("admin", r))
        .sum();
    assert_eq!(admin, 3, "every bad admin request was counted");
    // Packets over the front's size limit never reach the engine: the front closes the
    // connection (orchestrator/broker/tests/front.rs covers that with raw frames).

    // Nothing was lost or wedged: the same device updates normally.
    let fleet = env.start_fleet(&env.fleet_config()).await;
    valid_update_succeeds(&env, &fleet, "2.0.0", 2).await;
    fleet.shutdown().await;
}

/// A member that reports the whole way to `succeeded` without ever asking for a chunk is still
/// counted as succeeded (the device is the authority on what it runs), but flagged: a counter,
/// and an audit entry naming it. A device that really downloaded is not flagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_report_for_an_image_never_served_is_flagged_and_a_real_one_is_not() {
    use aloft_orchestrator::engine::SUCCESS_WITHOUT_DOWNLOAD;
    use aloft_proto::messages::{self, AckOutcome, StatusAck, StatusReport, PROTOCOL_VERSION};
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::Event;

    let env = Env::new(2).await;
    let (honest, liar) = (env.devices[0].clone(), env.devices[1].clone());
    let ca = env.lab.ca.cert_pem().to_owned();
    // The liar registers by connecting, and listens for its job and its acks.
    let (client, mut el) = device_client(env.running.device_addr, &ca, &liar).await;
    for topic in [topics::job(&liar.id), topics::ack(&liar.id)] {
        client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    }
    let fleet = aloft_device::Fleet::start(&env.fleet_config(), vec![honest.clone()]).unwrap();
    aloft_e2e::wait_registered(&env.admin, 2, LIMIT)
        .await
        .unwrap();
    let campaign = env
        .lab
        .release_to_all(&env.admin, &ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .await
        .unwrap();

    // Notified (its job arrives), the liar reports every step to `succeeded`, each one
    // acknowledged `applied`, and never sends a chunk request.
    let mut next = 0usize;
    let steps = [
        DeviceState::Downloading,
        DeviceState::Downloaded,
        DeviceState::Installing,
        DeviceState::Rebooting,
        DeviceState::Verifying,
        DeviceState::Succeeded,
    ];
    tokio::time::timeout(LIMIT, async {
        loop {
            let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() else {
                continue;
            };
            // The job starts the sequence; each ack of the last report sends the next one.
            let send_next = if p.topic == topics::job(&liar.id) {
                next == 0 && !p.payload.is_empty()
            } else if p.topic == topics::ack(&liar.id) {
                let ack: StatusAck = messages::decode(&p.payload).unwrap();
                let current = ack.campaign == campaign && ack.seq == next as u32;
                if current {
                    assert_eq!(ack.outcome, AckOutcome::Applied, "{ack:?}");
                    if next == steps.len() {
                        return;
                    }
                }
                current
            } else {
                false
            };
            if !send_next {
                continue;
            }
            let report = StatusReport {
                v: PROTOCOL_VERSION,
                campaign: campaign.clone(),
                seq: next as u32 + 1,
                state: steps[next],
                reason: None,
                detail: None,
                running_version: None,
            };
            next += 1;
            client
                .publish(
                    topics::status(&liar.id),
                    QoS::AtLeastOnce,
                    false,
                    messages::encode(&report),
                )
                .await
                .unwrap();
        }
    })
    .await
    .unwrap();
    close(client, el).await;

    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 2, "{:?}", s.counts);
    assert_eq!(env.running.metrics.success_without_download_count(), 1);
    let audit: Value = env
        .admin
        .call(AdminBody::AuditList {
            since: None,
            limit: None,
        })
        .await
        .unwrap();
    let flagged: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == SUCCESS_WITHOUT_DOWNLOAD)
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert_eq!(flagged, [format!("{campaign}/{}", liar.id)], "{audit}");
    fleet.shutdown().await;
}
