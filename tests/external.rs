//! Attacks on Mosquitto running the configuration `aloft broker-config mosquitto` generates:
//! every one refused by the broker, then a valid update succeeds on the same devices; and what
//! a device with a spoofed client id can and cannot do (SECURITY.md).

use std::sync::Arc;

use aloft_certs::{FleetCa, OperatorRole, Validity};
use aloft_proto::{topics, OperatorId};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};

use aloft_e2e::{finished, wait_campaign, ReleaseSpec};
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_proto::DeviceState;

use crate::common::{close, device_client, http_status, Broker, Env, LIMIT};

/// Subscribes to `filter` and returns the broker's answer, keeping the topics of the
/// publishes that arrive meanwhile in `seen`.
async fn suback(
    client: &AsyncClient,
    el: &mut EventLoop,
    filter: &str,
    seen: &mut Vec<String>,
) -> SubscribeReasonCode {
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(LIMIT, async {
        loop {
            match el.poll().await.unwrap() {
                Event::Incoming(Packet::SubAck(s)) => return s.return_codes[0],
                Event::Incoming(Packet::Publish(p)) => {
                    seen.push(String::from_utf8_lossy(&p.topic).into_owned())
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap()
}

/// Publishes at QoS 1 and returns the broker's PUBACK reason.
async fn puback(
    client: &AsyncClient,
    el: &mut EventLoop,
    topic: String,
    retain: bool,
) -> PubAckReason {
    client
        .publish(topic, QoS::AtLeastOnce, retain, b"{}".to_vec())
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, async {
        loop {
            if let Event::Incoming(Packet::PubAck(a)) = el.poll().await.unwrap() {
                return a.reason;
            }
        }
    })
    .await
    .unwrap()
}

/// Whether a TLS + MQTT connection with this client configuration gets a CONNACK.
async fn connects(addr: std::net::SocketAddr, tls: rustls::ClientConfig, id: &str) -> bool {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    let (_client, mut el) = AsyncClient::new(opts, 16);
    tokio::time::timeout(LIMIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_the_generated_config_refuses_every_attack_and_a_valid_update_succeeds_afterwards(
) {
    let env = Env::with(Broker::Mosquitto, 3).await;
    let addr = env.running.device_addr;
    let ca = env.lab.ca.cert_pem();
    let ops = OperatorId::new("ops").unwrap();

    // No certificate, another CA's, an expired one from the fleet CA: no session at all.
    let none = aloft_certs::tls::client_config_without_cert(ca).unwrap();
    assert!(!connects(addr, none, "dev-0000").await, "no certificate");
    let other = FleetCa::create("Other CA", 1).unwrap();
    let foreign = other
        .issue_operator(&ops, OperatorRole::Operator, Validity::days(1))
        .unwrap();
    let tls = aloft_certs::tls::client_config(ca, &foreign.cert_pem, &foreign.key_pem).unwrap();
    assert!(!connects(addr, tls, "ops").await, "another CA");
    let now = time::OffsetDateTime::now_utc();
    let expired = env
        .lab
        .ca
        .issue_operator(
            &ops,
            OperatorRole::Operator,
            Validity {
                not_before: now - time::Duration::days(3),
                not_after: now - time::Duration::days(1),
            },
        )
        .unwrap();
    let tls = aloft_certs::tls::client_config(ca, &expired.cert_pem, &expired.key_pem).unwrap();
    assert!(!connects(addr, tls, "ops").await, "expired certificate");

    // A device with its own, valid certificate reaches nothing but its own topics. The
    // campaign comes first, so that every device has a retained job another could try to read.
    let campaign = env
        .roll_out(
            &ReleaseSpec::new("2.0.0", 2, 64 * 1024),
            RolloutPolicy::default(),
        )
        .await;
    let (me, victim) = (&env.devices[0], &env.devices[1]);
    let (client, mut el) = device_client(addr, ca, me).await;
    // Its own job arrives (retained): the orchestrator has published every job.
    let mut seen = Vec::new();
    assert!(matches!(
        suback(&client, &mut el, &topics::job(&me.id), &mut seen).await,
        SubscribeReasonCode::Success(_)
    ));
    if seen.is_empty() {
        seen.push(next_publish(&mut el).await);
    }
    assert_eq!(seen, [topics::job(&me.id)]);
    seen.clear();
    // Mosquitto grants a SUBACK to wildcard filters and checks each message against the read
    // ACL instead; either way nothing of another device's or an operator's may arrive.
    let mut own_copies = 1; // the resubscription's, below
    for filter in [
        "#".to_owned(),
        "aloft/#".to_owned(),
        "aloft/v1/d/+/job".to_owned(),
        topics::job(&victim.id),
        topics::chunk_response(&victim.id),
        topics::operator_reply(&ops),
        "aloft/v1/admin/#".to_owned(),
    ] {
        let code = suback(&client, &mut el, &filter, &mut seen).await;
        // Filters that match its own job deliver that job (retained) once each if granted.
        let matches_own = ["#", "aloft/#", "aloft/v1/d/+/job"].contains(&filter.as_str());
        if matches_own && matches!(code, SubscribeReasonCode::Success(_)) {
            own_copies += 1;
        }
        assert!(
            matches!(
                code,
                SubscribeReasonCode::NotAuthorized | SubscribeReasonCode::Success(_)
            ),
            "subscribe {filter}: {code:?}"
        );
    }
    // Resubscribing to its own job sends it again: everything the filters above could have
    // delivered (retained jobs of every device) is queued before it.
    client.unsubscribe(topics::job(&me.id)).await.unwrap();
    client
        .subscribe(topics::job(&me.id), QoS::AtLeastOnce)
        .await
        .unwrap();
    let own = topics::device_prefix(&me.id);
    for topic in std::mem::take(&mut seen) {
        assert!(topic.starts_with(&own), "{topic} reached another device");
        if topic == topics::job(&me.id) {
            own_copies -= 1;
        }
    }
    while own_copies > 0 {
        let topic = next_publish(&mut el).await;
        assert!(topic.starts_with(&own), "{topic} reached another device");
        if topic == topics::job(&me.id) {
            own_copies -= 1;
        }
    }
    for (topic, retain) in [
        (topics::status(&victim.id), false),
        (topics::chunk_request(&victim.id), false),
        (topics::csr(&victim.id), false),
        (topics::job(&me.id), true),
        (topics::job(&victim.id), true),
        (topics::ack(&me.id), false),
        (topics::chunk_response(&me.id), false),
        (topics::admin_request(&ops, "campaign.list"), false),
        (
            topics::admin_request(&OperatorId::new(me.id.as_str()).unwrap(), "campaign.list"),
            false,
        ),
    ] {
        assert_eq!(
            puback(&client, &mut el, topic.clone(), retain).await,
            PubAckReason::NotAuthorized,
            "publish {topic}"
        );
    }
    close(client, el).await;

    // The same devices then update.
    let fleet = env.start_fleet(&env.fleet_config()).await;
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), s.total, "{:?}", s.counts);
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "2.0.0")
            .await
    );
    fleet.shutdown().await;
}

/// The topic of the next PUBLISH the broker sends.
async fn next_publish(el: &mut EventLoop) -> String {
    tokio::time::timeout(LIMIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                return String::from_utf8_lossy(&p.topic).into_owned();
            }
        }
    })
    .await
    .unwrap()
}

/// Mosquitto does not bind the client id to the certificate (the front does). A device that
/// connects under another device's client id takes that device's session over (it is
/// disconnected: a denial of service), but its rights stay those of its own certificate: it
/// can neither read nor write the other device's topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mosquitto_a_spoofed_client_id_can_knock_a_device_off_but_never_reach_its_topics() {
    let env = Env::with(Broker::Mosquitto, 2).await;
    let addr = env.running.device_addr;
    let ca = env.lab.ca.cert_pem();
    let (me, victim) = (&env.devices[0], &env.devices[1]);
    let (_victim_client, mut victim_el) = device_client(addr, ca, victim).await;

    // `me`'s certificate, `victim`'s client id.
    let tls = aloft_certs::tls::client_config(ca, &me.cert_pem, &me.key_pem).unwrap();
    let mut opts = MqttOptions::new(victim.id.as_str(), addr.ip().to_string(), addr.port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    let (client, mut el) = AsyncClient::new(opts, 16);
    tokio::time::timeout(LIMIT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await.unwrap() {
                return;
            }
        }
    })
    .await
    .unwrap();

    // What it can do: the victim's session is taken over (MQTT's rule for a repeated client
    // id), so the victim is disconnected.
    let taken_over = tokio::time::timeout(LIMIT, async {
        loop {
            match victim_el.poll().await {
                Ok(Event::Incoming(Packet::Disconnect(_))) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(taken_over, "the victim's session was taken over");

    // What it cannot do: the ACL follows the certificate's CN, not the client id (reading the
    // victim's topics is refused per message, as `#` is in the test above).
    assert_eq!(
        puback(&client, &mut el, topics::status(&victim.id), false).await,
        PubAckReason::NotAuthorized
    );
    close(client, el).await;
}

/// Mosquitto is killed (SIGKILL) in the middle of a campaign and started again on the same
/// port: the orchestrator says the broker is unreachable, then it and the devices reconnect
/// (jittered exponential backoff), the orchestrator republishes the jobs in flight, and the
/// campaign completes with every device updated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_killed_mid_campaign_and_restarted_on_its_port_the_campaign_completes() {
    let mut env = Env::with(Broker::Mosquitto, 24).await;
    // Links of 128 KiB/s: a download takes 8 s, so the campaign is caught mid-way. At full
    // speed 24 devices could take 1 MiB each between two status polls, and the broker was
    // killed after the campaign instead (the test then waited in vain for `downloading`).
    let mut cfg = env.fleet_config();
    cfg.faults.slow_link_probability = 1.0;
    cfg.faults.slow_link_bytes_per_sec = 128 * 1024;
    let fleet = env.start_fleet(&cfg).await;
    let campaign = env
        .roll_out(
            &ReleaseSpec::new("2.0.0", 2, 1024 * 1024),
            RolloutPolicy::default(),
        )
        .await;
    let s = wait_campaign(&env.admin, &campaign, LIMIT, |s| {
        s.count(DeviceState::Downloading) > 0 && !finished(s)
    })
    .await
    .unwrap();
    assert!(s.terminal() < s.total, "killed mid-campaign");
    let mut broker = env.mosquitto.take().unwrap();
    let addr = broker.addr;
    broker.kill9().unwrap();
    drop(broker);

    // The orchestrator notices, and says so on /metrics and /health.
    let metrics = env.running.metrics.clone();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while metrics.broker_link_is_up() {
        assert!(tokio::time::Instant::now() < deadline, "link loss not seen");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let metrics_addr = env.running.metrics_addr.unwrap();
    assert_eq!(
        aloft_e2e::scrape(metrics_addr, "aloft_broker_link_up").await,
        Some(0.0)
    );
    assert!(http_status(metrics_addr, "/health")
        .await
        .starts_with("HTTP/1.1 503"));

    env.mosquitto = Some(env.lab.restart_mosquitto(addr).await.unwrap());
    // The operator's client does not reconnect (a CLI is short-lived): a new one, once the
    // orchestrator has subscribed again (a request before that has no subscriber and is lost;
    // the CLI would time out and be run again).
    while !metrics.broker_link_is_up() {
        assert!(tokio::time::Instant::now() < deadline, "link not back");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    env.admin = env.lab.operator(addr).await.unwrap();
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 24, "{:?}", s.counts);
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "2.0.0")
            .await
    );
    assert!(metrics.broker_link_is_up());
    assert!(http_status(metrics_addr, "/health")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(aloft_e2e::scrape(metrics_addr, "aloft_broker_link_losses_total").await >= Some(1.0));
    fleet.shutdown().await;
}
