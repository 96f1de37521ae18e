//! Device certificates against the real orchestrator: a CRL pushed while it runs refuses the
//! revoked certificate at TLS and ends its live session; a revoked device gets no job and no
//! chunk while the others update; stale and foreign CRLs are refused; a revoked certificate
//! cannot be registered; and a device renews its certificate over MQTT, keeps its record, and
//! updates afterwards.

use std::sync::Arc;
use std::time::Duration;

use aloft_certs::revocation::{RevocationReason, RevocationState};
use aloft_certs::{cert_serial, FleetCa, Validity};
use aloft_device::DeviceIdentity;
use aloft_e2e::{finished, status, wait_campaign, ReleaseSpec};
use aloft_orchestrator::admin::client::ClientError;
use aloft_orchestrator::admin::wire::AdminBody;
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_orchestrator::store::Target;
use aloft_proto::crypto::DeviceEncryptionKey;
use aloft_proto::messages::{self, Job, RenewalError, RenewalRequest, RenewalResponse};
use aloft_proto::{topics, DeviceId, DeviceState, Reason};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::Value;

use crate::common::{device_client, Broker, Env, LIMIT};

/// Signs a CRL revoking `devices` (every revocation so far is in `state`).
fn crl_revoking(ca: &FleetCa, state: &mut RevocationState, devices: &[&DeviceIdentity]) -> String {
    for d in devices {
        state.revoke(
            &cert_serial(&d.cert_pem).unwrap(),
            RevocationReason::KeyCompromise,
            Some(d.id.to_string()),
            0,
        );
    }
    state
        .sign_crl(ca, 7, time::OffsetDateTime::now_utc())
        .unwrap()
}

async fn push_crl(env: &Env, crl: String) -> Result<Value, ClientError> {
    env.admin.call(AdminBody::CrlUpdate { crl }).await
}

/// The code of an admin refusal.
fn refusal_code(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Refused(e)) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Tries a TLS + MQTT connection as `device`; true if the orchestrator accepted it (CONNACK).
async fn can_connect(env: &Env, device: &DeviceIdentity) -> bool {
    let addr = env.running.device_addr;
    let tls =
        aloft_certs::tls::client_config(env.lab.ca.cert_pem(), &device.cert_pem, &device.key_pem)
            .unwrap();
    let mut opts = MqttOptions::new(device.id.as_str(), addr.ip().to_string(), addr.port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )))
    .set_outgoing_inflight_upper_limit(16);
    let (client, mut el) = AsyncClient::new(opts, 16);
    let accepted = tokio::time::timeout(LIMIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    if accepted {
        crate::common::close(client, el).await;
    }
    accepted
}

fn registered(v: &Value) -> Vec<String> {
    v["registered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect()
}

/// The orchestrator's record of one device.
async fn device_record(env: &Env, id: &str) -> Value {
    let devices: Vec<Value> = env
        .admin
        .call(AdminBody::DeviceList {
            after: None,
            limit: None,
        })
        .await
        .unwrap();
    devices
        .into_iter()
        .find(|d| d["id"] == id)
        .unwrap_or_else(|| panic!("{id} is not registered"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_pushed_while_running_refuses_the_revoked_device_at_tls_and_ends_its_session() {
    let env = Env::new(3).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    assert!(fleet.wait_all(LIMIT, |v| v.connected).await);
    let revoked = &env.devices[0];
    let mut state = RevocationState::default();

    let reply = push_crl(&env, crl_revoking(&env.lab.ca, &mut state, &[revoked]))
        .await
        .unwrap();
    assert_eq!(reply["crl_number"], 1);
    assert_eq!(reply["devices_revoked"], serde_json::json!([revoked.id]));
    assert_eq!(
        reply["sessions_dropped"],
        serde_json::json!([format!("device {}", revoked.id)])
    );

    // Its live session is ended, and every reconnection fails the handshake: no restart.
    assert!(fleet.wait_one(&revoked.id, LIMIT, |v| !v.connected).await);
    assert!(!can_connect(&env, revoked).await);
    let front = env.running.metrics.front_snapshot().unwrap();
    assert_eq!(front.sessions_revoked, 1);
    assert!(front.handshakes_failed >= 1);
    assert!(device_record(&env, revoked.id.as_str()).await["revoked"] == true);

    // The others never noticed, and an update still reaches them.
    for d in &env.devices[1..] {
        assert!(fleet.view(&d.id).unwrap().connected, "{} was dropped", d.id);
    }
    let campaign = env
        .roll_out(
            &ReleaseSpec::new("2.0.0", 2, 32 * 1024),
            RolloutPolicy::default(),
        )
        .await;
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.total, 2, "the revoked device is not a member");
    assert_eq!(s.count(DeviceState::Succeeded), 2);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_gets_no_job_and_no_chunk_while_the_others_update() {
    revoked_device_gets_no_job_and_no_chunk(Broker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_gets_no_job_and_no_chunk_from_beside_mosquitto_and_mosquitto_refuses_it()
{
    revoked_device_gets_no_job_and_no_chunk(Broker::Mosquitto).await;
}

async fn revoked_device_gets_no_job_and_no_chunk(broker: Broker) {
    let env = Env::with(broker, 3).await;
    let revoked = &env.devices[0];
    // Registered and targeted before the revocation (with Mosquitto, `Env` registered them).
    if broker == Broker::Embedded {
        let certs = env.devices.iter().map(|d| d.cert_pem.clone()).collect();
        let v: Value = env
            .admin
            .call(AdminBody::DeviceRegister {
                certs,
                groups: Vec::new(),
            })
            .await
            .unwrap();
        assert_eq!(registered(&v).len(), 3);
    }
    // With an external broker the revoked device keeps a session opened before the CRL (the
    // broker checks certificates at the handshake only): it speaks for itself below.
    let live = match broker {
        Broker::Mosquitto => {
            Some(device_client(env.running.device_addr, env.lab.ca.cert_pem(), revoked).await)
        }
        Broker::Embedded => None,
    };
    let first = env
        .roll_out(
            &ReleaseSpec::new("2.0.0", 2, 32 * 1024),
            RolloutPolicy::default(),
        )
        .await;

    let mut state = RevocationState::default();
    let reply = push_crl(&env, crl_revoking(&env.lab.ca, &mut state, &[revoked]))
        .await
        .unwrap();
    assert_eq!(reply["members_failed"], 1);
    let s = status(&env.admin, &first, true).await.unwrap();
    let member = s.devices.iter().find(|d| d.device == revoked.id).unwrap();
    assert_eq!(
        (member.state, member.reason),
        (DeviceState::Failed, Some(Reason::Revoked))
    );

    // A chunk request in its name (only a compromised server could still send one) is refused
    // and counted.
    let req = format!(r#"{{"v":1,"campaign":"{first}","artifact":"fw-2.0.0","ranges":[[0,2]]}}"#);
    match (&env.running.devices, live) {
        (Some(road), _) => assert!(
            road.submit(aloft_broker::DeviceMessage {
                device: revoked.id.clone(),
                topic: aloft_broker::DeviceTopic::ChunkRequest,
                payload: req.into_bytes().into(),
            })
            .await
        ),
        (None, Some((client, mut el))) => {
            let topic = topics::chunk_request(&revoked.id);
            crate::common::publish_and_settle(&client, &mut el, topic, req.into_bytes(), false)
                .await;
            crate::common::close(client, el).await;
            // Mosquitto reloads the CRL the orchestrator rewrote on SIGHUP: new handshakes
            // of the revoked certificate fail once it has.
            let deadline = tokio::time::Instant::now() + LIMIT;
            while can_connect(&env, revoked).await {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "mosquitto still accepts the revoked certificate"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        (None, None) => unreachable!("an external broker always has a live session here"),
    }
    let metrics = env.running.metrics.clone();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while metrics.rejected_count("chunk_request", "revoked") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "chunk request not refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metrics.chunk_bytes_served(), 0);

    // The others update; the revoked device cannot even connect.
    let fleet = aloft_device::Fleet::start(&env.fleet_config(), env.devices.clone()).unwrap();
    let s = wait_campaign(&env.admin, &first, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 2);
    assert_eq!(s.reasons.get("revoked"), Some(&1));
    assert!(!fleet.view(&revoked.id).unwrap().connected);
    assert_eq!(fleet.view(&revoked.id).unwrap().running_version, "1.0.0");

    // A new campaign leaves it out, and says so.
    let artifact = env
        .lab
        .upload(&env.admin, &ReleaseSpec::new("3.0.0", 3, 32 * 1024))
        .await
        .unwrap();
    let v: Value = env
        .admin
        .call(AdminBody::CampaignCreate {
            artifact,
            target: Target::All,
            include: Vec::new(),
            exclude: Vec::new(),
            policy: RolloutPolicy::default(),
            dry_run: false,
            origin: None,
        })
        .await
        .unwrap();
    assert_eq!(
        (v["devices"].as_u64(), v["excluded_revoked"].as_u64()),
        (Some(2), Some(1))
    );
    let second = aloft_proto::CampaignId::new(v["campaign"].as_str().unwrap()).unwrap();
    let s = wait_campaign(&env.admin, &second, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 2);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crls_that_are_older_or_not_signed_by_the_fleet_ca_are_refused() {
    let env = Env::new(2).await;
    let mut state = RevocationState::default();
    let first = crl_revoking(&env.lab.ca, &mut state, &[&env.devices[0]]);
    let second = crl_revoking(&env.lab.ca, &mut state, &[&env.devices[1]]);
    assert_eq!(
        push_crl(&env, second.clone()).await.unwrap()["crl_number"],
        2
    );

    // Never backwards: number 1 after number 2.
    assert_eq!(refusal_code(push_crl(&env, first).await), "stale_crl");
    // The same CRL again changes nothing.
    assert_eq!(push_crl(&env, second).await.unwrap()["unchanged"], true);
    // A CRL from a CA with the very same name but another key, numbered higher.
    let impostor = FleetCa::create("Aloft Lab CA", 30).unwrap();
    let mut other = RevocationState {
        crl_number: 99,
        ..RevocationState::default()
    };
    let forged = crl_revoking(&impostor, &mut other, &[]);
    assert_eq!(refusal_code(push_crl(&env, forged).await), "invalid_crl");
    assert_eq!(
        refusal_code(push_crl(&env, "garbage".into()).await),
        "invalid_crl"
    );

    // The file on disk is still CRL number 2, and revokes both.
    let on_disk = std::fs::read_to_string(env.lab.data_dir.join("crl.pem")).unwrap();
    let on_disk =
        aloft_certs::revocation::VerifiedCrl::parse(&on_disk, env.lab.ca.cert_pem()).unwrap();
    assert_eq!(on_disk.number, 2);
    assert_eq!(on_disk.revoked.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_revoked_certificate_is_refused_and_an_unreadable_crl_refuses_all() {
    let env = Env::new(2).await;
    let (revoked, fine) = (&env.devices[0], &env.devices[1]);
    let mut state = RevocationState::default();
    push_crl(&env, crl_revoking(&env.lab.ca, &mut state, &[revoked]))
        .await
        .unwrap();
    let v: Value = env
        .admin
        .call(AdminBody::DeviceRegister {
            certs: vec![revoked.cert_pem.clone(), fine.cert_pem.clone()],
            groups: Vec::new(),
        })
        .await
        .unwrap();
    assert_eq!(registered(&v), vec![fine.id.to_string()]);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("revoked"),
        "{errors:?}"
    );

    // Fail closed: a crl.pem that cannot be read is not "nothing revoked".
    std::fs::write(env.lab.data_dir.join("crl.pem"), "not a crl").unwrap();
    let r: Result<Value, _> = env
        .admin
        .call(AdminBody::DeviceRegister {
            certs: vec![fine.cert_pem.clone()],
            groups: Vec::new(),
        })
        .await;
    assert_eq!(refusal_code(r), "crl_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_renews_its_certificate_over_mqtt_keeps_its_record_and_updates_afterwards() {
    renewal_keeps_the_record(Broker::Embedded).await;
}

/// Beside Mosquitto the orchestrator never sees the reconnect: the record follows the
/// certificate at issuance, and Mosquitto accepts the renewed certificate (same fleet CA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_mosquitto_a_device_renews_its_certificate_keeps_its_record_and_updates_afterwards()
{
    renewal_keeps_the_record(Broker::Mosquitto).await;
}

async fn renewal_keeps_the_record(broker: Broker) {
    let env = Env::with(broker, 2).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let first = env
        .roll_out(
            &ReleaseSpec::new("2.0.0", 2, 32 * 1024),
            RolloutPolicy::default(),
        )
        .await;
    wait_campaign(&env.admin, &first, LIMIT, |s| {
        s.count(DeviceState::Succeeded) == 2
    })
    .await
    .unwrap();
    let dev = &env.devices[0].id;
    assert!(
        fleet
            .wait_one(dev, LIMIT, |v| v.floor == 2 && v.outbox == 0)
            .await
    );
    let renewer = fleet.renewer(dev).unwrap();
    let old_serial = renewer.serial_hex();
    assert_eq!(
        device_record(&env, dev.as_str()).await["cert_serial"],
        old_serial
    );

    // Far from expiry: the device may renew only because an operator allows it, once.
    allow_renewal(&env, dev).await;
    assert!(fleet.force_renewal(dev));
    let deadline = tokio::time::Instant::now() + LIMIT;
    while renewer.renewed() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no renewal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new_serial = renewer.serial_hex();
    assert_ne!(new_serial, old_serial);
    // Saved where the device keeps it.
    let on_disk =
        std::fs::read_to_string(aloft_device::identity::cert_path(&env.lab.fleet_dir(), dev))
            .unwrap();
    assert_eq!(on_disk, renewer.cert_pem());

    // It reconnected with the new certificate, and the orchestrator follows it.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while device_record(&env, dev.as_str()).await["cert_serial"] != new_serial {
        assert!(
            tokio::time::Instant::now() < deadline,
            "registry not updated"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fleet.wait_one(dev, LIMIT, |v| v.connected).await);
    // Its update record is untouched.
    let v = fleet.view(dev).unwrap();
    assert_eq!((v.floor, v.running_version.as_str()), (2, "2.0.0"));
    assert_eq!(env.running.metrics.renewal_count("issued"), 1);

    // And a campaign afterwards succeeds on it (its jobs are wrapped to the same X25519 key).
    let second = env
        .roll_out(
            &ReleaseSpec::new("3.0.0", 3, 32 * 1024),
            RolloutPolicy::default(),
        )
        .await;
    let s = wait_campaign(&env.admin, &second, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 2);
    assert!(fleet.wait_one(dev, LIMIT, |v| v.floor == 3).await);
    fleet.shutdown().await;
}

/// Sends a renewal request as `device` (its real certificate) and returns the answer.
async fn renewal_answer(env: &Env, device: &DeviceIdentity, csr: String) -> RenewalResponse {
    let (client, mut el): (AsyncClient, EventLoop) =
        device_client(env.running.device_addr, env.lab.ca.cert_pem(), device).await;
    client
        .subscribe(topics::cert(&device.id), QoS::AtLeastOnce)
        .await
        .unwrap();
    let request = messages::encode(&RenewalRequest { v: 1, csr });
    let mut sent = false;
    let answer = tokio::time::timeout(LIMIT, async {
        loop {
            match el.poll().await.unwrap() {
                Event::Incoming(Packet::SubAck(_)) if !sent => {
                    sent = true;
                    client
                        .publish(
                            topics::csr(&device.id),
                            QoS::AtLeastOnce,
                            false,
                            request.clone(),
                        )
                        .await
                        .unwrap();
                }
                Event::Incoming(Packet::Publish(p)) if p.topic == topics::cert(&device.id) => {
                    return messages::decode::<RenewalResponse>(&p.payload).unwrap();
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    crate::common::close(client, el).await;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_naming_another_device_is_refused_and_renewal_needs_the_online_ca() {
    let env = Env::new(2).await;
    let (me, other) = (&env.devices[0], &env.devices[1]);
    let v: Value = env
        .admin
        .call(AdminBody::DeviceRegister {
            certs: vec![me.cert_pem.clone()],
            groups: Vec::new(),
        })
        .await
        .unwrap();
    assert_eq!(registered(&v).len(), 1);

    // Far from expiry: each attempt below needs an operator's leave (and spends it).
    let theirs = aloft_certs::device_csr(&other.id, &[9; 32]).unwrap();
    allow_renewal(&env, &me.id).await;
    let answer = renewal_answer(&env, me, theirs.csr_pem).await;
    assert_eq!(answer.error, Some(RenewalError::IdentityMismatch));
    assert!(answer.cert.is_none());
    allow_renewal(&env, &me.id).await;
    let garbage = renewal_answer(&env, me, "not a csr".into()).await;
    assert_eq!(garbage.error, Some(RenewalError::InvalidCsr));

    // The CA key moved offline: renewal says it needs the online CA.
    let pki = env.lab.data_dir.join("pki");
    std::fs::rename(pki.join("ca.key"), env.lab.root.join("ca.key.offline")).unwrap();
    let x25519 = me.encryption_key.public_bytes().unwrap();
    let mine = aloft_certs::device_renewal_csr(&me.id, &x25519, &me.key_pem).unwrap();
    let answer = renewal_answer(&env, me, mine.csr_pem.clone()).await;
    assert_eq!(answer.error, Some(RenewalError::CaOffline));
    assert!(answer.detail.unwrap().contains("online ca"));

    // Back online, the same request is granted.
    std::fs::rename(env.lab.root.join("ca.key.offline"), pki.join("ca.key")).unwrap();
    allow_renewal(&env, &me.id).await;
    let answer = renewal_answer(&env, me, mine.csr_pem).await;
    let cert = answer.cert.expect("a certificate");
    let identity =
        aloft_certs::tls::verify_client_cert(env.lab.ca.cert_pem(), &cert, Vec::new()).unwrap();
    assert_eq!(identity.id, me.id.as_str());
    assert_eq!(identity.x25519, Some(x25519));
    assert_eq!(env.running.metrics.renewal_count("identity_mismatch"), 1);
}

/// An operator allows `device` one early renewal (`aloft device renew-allow`).
async fn allow_renewal(env: &Env, device: &DeviceId) {
    let v: Value = env
        .admin
        .call(AdminBody::DeviceRenewAllow {
            device: device.clone(),
        })
        .await
        .unwrap();
    assert_eq!(v["allowed"], true);
}

/// A device `id` whose certificate (from the lab's CA, recorded in the issuance ledger as
/// `aloft pki issue-devices` does) is inside its renewal window: 20 days old, 5 days left.
fn due_device(env: &Env, id: &str) -> DeviceIdentity {
    let id = DeviceId::new(id).unwrap();
    let encryption_key = DeviceEncryptionKey::generate().unwrap();
    let csr = aloft_certs::device_csr(&id, &encryption_key.public_bytes().unwrap()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let validity = Validity {
        not_before: now - time::Duration::days(20),
        not_after: now + time::Duration::days(5),
    };
    let cert_pem = env.lab.ca.issue_device(&csr.csr_pem, validity).unwrap();
    aloft_certs::ledger::record_certs(&env.lab.data_dir.join("pki"), &[&cert_pem]).unwrap();
    DeviceIdentity {
        id,
        key_pem: csr.key_pem,
        cert_pem,
        encryption_key,
    }
}

/// Connects as `device`, takes its retained job, and disconnects.
async fn retained_job(env: &Env, device: &DeviceIdentity) -> Job {
    let (client, mut el) =
        device_client(env.running.device_addr, env.lab.ca.cert_pem(), device).await;
    client
        .subscribe(topics::job(&device.id), QoS::AtLeastOnce)
        .await
        .unwrap();
    let job = tokio::time::timeout(LIMIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                if p.topic == topics::job(&device.id) && !p.payload.is_empty() {
                    return messages::decode::<Job>(&p.payload).unwrap();
                }
            }
        }
    })
    .await
    .unwrap();
    crate::common::close(client, el).await;
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thief_with_only_the_tls_key_cannot_renew_with_its_own_x25519_key_and_jobs_stay_wrapped_to_the_device(
) {
    let env = Env::new(0).await;
    let device = due_device(&env, "dev-stolen");
    // The thief holds the TLS key and the certificate, not the X25519 key; the real device is
    // offline. Its certificate is due, so no operator's leave is needed.
    let thief_key = DeviceEncryptionKey::generate().unwrap();
    let thief_x25519 = thief_key.public_bytes().unwrap();
    let csr = aloft_certs::device_renewal_csr(&device.id, &thief_x25519, &device.key_pem).unwrap();
    let answer = renewal_answer(&env, &device, csr.csr_pem).await;
    assert_eq!(answer.error, Some(RenewalError::X25519KeyChanged));
    assert!(answer.cert.is_none());
    assert_eq!(env.running.metrics.renewal_count("x25519_key_changed"), 1);
    assert_eq!(env.running.metrics.renewal_count("issued"), 0);
    let audit: Value = env
        .admin
        .call(AdminBody::AuditList {
            since: None,
            limit: None,
        })
        .await
        .unwrap();
    assert!(
        audit["entries"].as_array().unwrap().iter().any(|e| {
            e["action"] == "certificate_renewal" && e["outcome"] == "x25519_key_changed"
        }),
        "{audit}"
    );
    // Asking again at once is refused before the CSR is even read.
    let again =
        aloft_certs::device_renewal_csr(&device.id, &thief_x25519, &device.key_pem).unwrap();
    let answer = renewal_answer(&env, &device, again.csr_pem).await;
    assert_eq!(answer.error, Some(RenewalError::RateLimited));

    // A job created afterwards is wrapped to the device's own key, and useless to the thief.
    let campaign = env
        .roll_out(
            &ReleaseSpec::new("2.0.0", 2, 32 * 1024),
            RolloutPolicy::default(),
        )
        .await;
    let job = retained_job(&env, &device).await;
    assert_eq!(job.campaign, campaign);
    let artifact = job.manifest.peek_unverified().unwrap().artifact;
    assert!(aloft_proto::crypto::unwrap_content_key(
        &device.encryption_key,
        &device.id,
        &artifact,
        &job.wrapped_key
    )
    .is_ok());
    assert!(aloft_proto::crypto::unwrap_content_key(
        &thief_key,
        &device.id,
        &artifact,
        &job.wrapped_key
    )
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_original_certificate_revokes_the_renewed_one_and_ends_its_session() {
    let env = Env::new(2).await;
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let original = &env.devices[0];
    let dev = &original.id;
    allow_renewal(&env, dev).await;
    assert!(fleet.force_renewal(dev));
    let renewer = fleet.renewer(dev).unwrap();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while renewer.renewed() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no renewal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renewed_serial = renewer.serial_hex();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while device_record(&env, dev.as_str()).await["cert_serial"] != renewed_serial {
        assert!(tokio::time::Instant::now() < deadline, "not reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fleet.wait_one(dev, LIMIT, |v| v.connected).await);

    // README procedure 4 with the certificate file the operator has: the original one.
    let pki = env.lab.data_dir.join("pki");
    let original_file = env.lab.root.join("stolen.crt");
    std::fs::write(&original_file, &original.cert_pem).unwrap();
    aloft_orchestrator::cli::pki::revoke(aloft_orchestrator::cli::pki::RevokeArgs {
        ca_dir: pki.clone(),
        cert: Some(original_file),
        serial: None,
        device: None,
        reason: "key-compromise".into(),
    })
    .unwrap();
    let (crl, _) = aloft_certs::revocation::sign_next_crl(
        &pki,
        &env.lab.ca,
        7,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let reply = push_crl(&env, crl).await.unwrap();
    assert_eq!(reply["devices_revoked"], serde_json::json!([dev]));
    assert_eq!(
        reply["sessions_dropped"],
        serde_json::json!([format!("device {dev}")])
    );

    // The renewed certificate's live session is ended and it is refused at connect; so is the
    // original. No restart.
    assert!(fleet.wait_one(dev, LIMIT, |v| !v.connected).await);
    let renewed = DeviceIdentity {
        cert_pem: renewer.cert_pem(),
        ..original.clone()
    };
    assert!(!can_connect(&env, &renewed).await);
    assert!(!can_connect(&env, original).await);
    assert!(fleet.view(&env.devices[1].id).unwrap().connected);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_renewal_requests_from_one_device_issue_one_certificate_and_another_device_is_still_answered(
) {
    let env = Env::new(1).await;
    let flooder = due_device(&env, "dev-flood");
    let other = &env.devices[0];
    let addr = env.running.device_addr;
    let (a, mut a_el) = device_client(addr, env.lab.ca.cert_pem(), &flooder).await;
    let (b, mut b_el) = device_client(addr, env.lab.ca.cert_pem(), other).await;
    a.subscribe(topics::cert(&flooder.id), QoS::AtLeastOnce)
        .await
        .unwrap();
    b.subscribe(topics::ack(&other.id), QoS::AtLeastOnce)
        .await
        .unwrap();
    // Both subscriptions stand before anything is sent.
    for el in [&mut a_el, &mut b_el] {
        tokio::time::timeout(LIMIT, async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
                    return;
                }
            }
        })
        .await
        .unwrap();
    }
    let x25519 = flooder.encryption_key.public_bytes().unwrap();
    let csr = aloft_certs::device_renewal_csr(&flooder.id, &x25519, &flooder.key_pem).unwrap();
    let request = messages::encode(&RenewalRequest {
        v: 1,
        csr: csr.csr_pem,
    });
    const FLOOD: usize = 40;
    let started = std::time::Instant::now();
    for _ in 0..FLOOD {
        a.publish(
            topics::csr(&flooder.id),
            QoS::AtLeastOnce,
            false,
            request.clone(),
        )
        .await
        .unwrap();
    }
    // The other device reports (for a campaign it is not in: still acknowledged) while the
    // flood is under way, and again once it has been answered.
    let report = br#"{"v":1,"campaign":"c-none","seq":1,"state":"downloading"}"#.to_vec();
    b.publish(
        topics::status(&other.id),
        QoS::AtLeastOnce,
        false,
        report.clone(),
    )
    .await
    .unwrap();
    let mut answers: Vec<RenewalResponse> = Vec::new();
    let mut ack_at = None;
    tokio::time::timeout(LIMIT, async {
        while answers.len() < FLOOD || ack_at.is_none() {
            tokio::select! {
                ev = a_el.poll() => {
                    if let Event::Incoming(Packet::Publish(p)) = ev.unwrap() {
                        answers.push(messages::decode(&p.payload).unwrap());
                    }
                }
                ev = b_el.poll() => {
                    if let Event::Incoming(Packet::Publish(p)) = ev.unwrap() {
                        if p.topic == topics::ack(&other.id) && ack_at.is_none() {
                            ack_at = Some((started.elapsed(), answers.len()));
                        }
                    }
                }
            }
        }
    })
    .await
    .unwrap();
    let all_answered = started.elapsed();
    let (ack_rtt, answered_before_ack) = ack_at.unwrap();
    let issued = answers.iter().filter(|r| r.cert.is_some()).count();
    let limited = answers
        .iter()
        .filter(|r| r.error == Some(RenewalError::RateLimited))
        .count();
    println!(
        "other device's ack after {ack_rtt:?} ({answered_before_ack} of {FLOOD} renewal answers before it); all {FLOOD} answered after {all_answered:?}"
    );
    let errors: Vec<_> = answers.iter().map(|r| r.error).collect();
    assert_eq!((issued, limited), (1, FLOOD - 1), "{errors:?}");
    assert_eq!(env.running.metrics.renewal_count("issued"), 1);
    assert_eq!(
        env.running.metrics.renewal_count("rate_limited"),
        (FLOOD - 1) as u64
    );

    // Renewals from it are still refused, and the other device is still answered at once.
    a.publish(topics::csr(&flooder.id), QoS::AtLeastOnce, false, request)
        .await
        .unwrap();
    let sent = std::time::Instant::now();
    b.publish(topics::status(&other.id), QoS::AtLeastOnce, false, report)
        .await
        .unwrap();
    let (mut refused, mut acked) = (false, false);
    tokio::time::timeout(LIMIT, async {
        while !(refused && acked) {
            tokio::select! {
                ev = a_el.poll() => {
                    if let Event::Incoming(Packet::Publish(p)) = ev.unwrap() {
                        let r: RenewalResponse = messages::decode(&p.payload).unwrap();
                        assert_eq!(r.error, Some(RenewalError::RateLimited));
                        refused = true;
                    }
                }
                ev = b_el.poll() => {
                    if let Event::Incoming(Packet::Publish(p)) = ev.unwrap() {
                        acked |= p.topic == topics::ack(&other.id);
                    }
                }
            }
        }
    })
    .await
    .unwrap();
    println!("second ack round trip {:?}", sent.elapsed());
    assert_eq!(env.running.metrics.renewal_count("issued"), 1);
    crate::common::close(a, a_el).await;
    crate::common::close(b, b_el).await;
}
