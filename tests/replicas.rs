//! Replicas (issue 12): three `aloft serve` processes on one PostgreSQL store and one Mosquitto,
//! sharing the fleet through MQTT 5 shared subscriptions. A follower killed with SIGKILL
//! mid-campaign, then the leader, then both started again: the campaign completes, no
//! acknowledged transition is lost, no device is sent two different jobs for the campaign, no
//! wave opens twice, every member is notified once, and the audit chain verifies. PostgreSQL
//! stopped mid-campaign under three replicas: nothing is acknowledged until it is back, then
//! the campaign completes.

use std::collections::HashMap;
use std::net::SocketAddr;

use aloft_device::Fleet;
use aloft_e2e::{finished, wait_campaign, wait_registered, Lab, OrchestratorProcess, ReleaseSpec};
use aloft_orchestrator::ops;
use aloft_orchestrator::rollout::policy::Size;
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_orchestrator::store::{Sharing, Store, StoreLocation, Target};
use aloft_proto::{CampaignId, DeviceId, DeviceState};

use crate::common::{exe, waves, LIMIT};
use crate::postgres::{
    assert_nothing_acknowledged, lab_on_postgres_url, pause_answered, pause_in_background,
    resume_until_all_succeeded, start_cluster,
};
use crate::restart::{acknowledged, rank};

/// Devices in the campaign.
const DEVICES: usize = 500;

/// Replica `id` of `lab`, its lease 3 s long.
fn replica(lab: &Lab, url: &str, broker: SocketAddr, id: &str) -> OrchestratorProcess {
    replica_with_ttl(lab, url, broker, id, 3)
}

fn replica_with_ttl(
    lab: &Lab,
    url: &str,
    broker: SocketAddr,
    id: &str,
    ttl_secs: u32,
) -> OrchestratorProcess {
    lab.spawn_replica(exe(), broker, url, id, ttl_secs).unwrap()
}

/// Whether the replica whose metrics are at `addr` leads now (`aloft_leader`).
async fn leads(p: &OrchestratorProcess) -> bool {
    let Some(addr) = p.metrics_addr else {
        return false;
    };
    aloft_e2e::scrape(addr, "aloft_leader").await == Some(1.0)
}

/// Waits until exactly one of the running `replicas` leads and returns its index.
async fn leader(replicas: &[Option<OrchestratorProcess>]) -> usize {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let mut leading = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            if let Some(r) = r {
                if leads(r).await {
                    leading.push(i);
                }
            }
        }
        if let [one] = leading[..] {
            return one;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no single leader: {leading:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// What every replica test runs on: a lab whose store is in a throwaway PostgreSQL cluster,
/// and Mosquitto with the generated configuration.
struct Bed {
    tmp: tempfile::TempDir,
    cluster: aloft_orchestrator::store::pg_cluster::TempCluster,
    lab: Lab,
    url: String,
    mosquitto: aloft_e2e::bench::mosquitto::Mosquitto,
    broker: SocketAddr,
}

impl Bed {
    async fn new() -> Bed {
        let tmp = tempfile::tempdir().unwrap();
        let cluster = start_cluster().await;
        let (lab, url) = lab_on_postgres_url(tmp.path(), &cluster);
        let mosquitto = lab.start_mosquitto().await.unwrap();
        let broker = mosquitto.addr;
        Bed {
            tmp,
            cluster,
            lab,
            url,
            mosquitto,
            broker,
        }
    }

    /// `n` devices registered from their certificates, running with a chunk window of
    /// `window`, connected to the broker; and the operator.
    async fn fleet(
        &self,
        n: usize,
        window: u32,
    ) -> (aloft_orchestrator::admin::client::AdminClient, Fleet) {
        let admin = self.lab.operator(self.broker).await.unwrap();
        let identities = self.lab.enroll_fleet("dev", n).unwrap();
        self.lab.register(&admin, &identities).await.unwrap();
        let mut cfg = self.lab.fleet_config(self.broker);
        cfg.window = window;
        let fleet = Fleet::start(&cfg, identities).unwrap();
        wait_registered(&admin, n, LIMIT).await.unwrap();
        assert!(fleet.wait_all(LIMIT, |v| v.connected).await);
        (admin, fleet)
    }

    /// Stops the replicas, the broker and the database.
    async fn close(self, mut replicas: Vec<Option<OrchestratorProcess>>) {
        for p in &mut replicas {
            kill(p);
        }
        drop(self.mosquitto);
        let cluster = self.cluster;
        tokio::task::spawn_blocking(move || drop(cluster))
            .await
            .unwrap();
    }
}

fn kill(p: &mut Option<OrchestratorProcess>) {
    if let Some(p) = p.take() {
        p.kill9().unwrap();
    }
}

/// Every device's acknowledged state is still where it was acknowledged, or further on.
fn none_lost(acked: &HashMap<DeviceId, DeviceState>, now: &HashMap<DeviceId, DeviceState>) {
    for (d, a) in acked {
        let n = now.get(d).copied().unwrap_or(DeviceState::Idle);
        assert!(
            rank(n) >= rank(*a),
            "{d} was acknowledged in {a} but the orchestrator now says {n}"
        );
    }
}

async fn states(
    admin: &aloft_orchestrator::admin::client::AdminClient,
    campaign: &CampaignId,
) -> HashMap<DeviceId, DeviceState> {
    aloft_e2e::status(admin, campaign, true)
        .await
        .unwrap()
        .devices
        .into_iter()
        .map(|d| (d.device, d.state))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_lose_a_follower_then_the_leader_and_the_campaign_completes() {
    let bed = Bed::new().await;
    let (lab, url, broker) = (&bed.lab, &bed.url, bed.broker);
    let start = |id| Some(replica(lab, url, broker, id));
    let mut r = vec![start("r0"), None, None];
    assert_eq!(leader(&r).await, 0);
    r[1] = start("r1");
    r[2] = start("r2");
    assert_eq!(leader(&r).await, 0);

    let (admin, fleet) = bed.fleet(DEVICES, 4).await;

    // Two waves: a canary of 50, then the rest.
    let mut spec = ReleaseSpec::new("2.0.0", 2, 64 * 1024);
    spec.chunk_bytes = 4 * 1024;
    let artifact = lab.upload(&admin, &spec).await.unwrap();
    let policy = RolloutPolicy {
        waves: waves(Size::Count(50), &[100.0]),
        ..RolloutPolicy::default()
    };
    let campaign = aloft_e2e::create_rollout(&admin, artifact, Target::All, policy)
        .await
        .unwrap();
    wait_campaign(&admin, &campaign, LIMIT, |s| {
        s.count(DeviceState::Succeeded) >= 60 && !finished(s)
    })
    .await
    .unwrap();

    // A follower dies; the others go on.
    kill(&mut r[1]);
    let acked = acknowledged(&fleet, &campaign);
    let before = states(&admin, &campaign).await;
    none_lost(&acked, &before);
    let done = before
        .values()
        .filter(|s| **s == DeviceState::Succeeded)
        .count();
    wait_campaign(&admin, &campaign, LIMIT, |s| {
        s.count(DeviceState::Succeeded) as usize >= done + 50 && !finished(s)
    })
    .await
    .unwrap();

    // Then the leader, mid-campaign; the last replica takes over once its lease runs out.
    kill(&mut r[0]);
    let acked = acknowledged(&fleet, &campaign);
    assert!(
        acked.values().any(|s| *s != DeviceState::Succeeded),
        "the leader was killed mid-campaign"
    );
    assert_eq!(leader(&r).await, 2);
    none_lost(&acked, &states(&admin, &campaign).await);
    // Both come back, as followers.
    r[0] = start("r0");
    r[1] = start("r1");
    let s = wait_campaign(&admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(
        s.count(DeviceState::Succeeded),
        DEVICES as u32,
        "{:?}",
        s.counts
    );
    assert_eq!(leader(&r).await, 2);
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "2.0.0")
            .await
    );
    let differing: u64 = fleet
        .views()
        .iter()
        .map(|(_, v)| v.stats.jobs_differing)
        .sum();
    assert_eq!(differing, 0, "a device was sent two different jobs");
    fleet.shutdown().await;
    admin.disconnect().await;
    for p in &mut r {
        kill(p);
    }
    let url = url.clone();

    // What the store says: each wave opened once, each member notified once, the chain whole.
    let key = ops::open_keystore(&lab.data_dir, &lab.unlock()).unwrap();
    let at = StoreLocation::Postgres(url);
    let store = tokio::task::spawn_blocking(move || Store::open_sharing(&at, key, Sharing::Reader))
        .await
        .unwrap()
        .unwrap();
    let (record, notified, chain) = tokio::task::spawn_blocking(move || {
        let record = store.campaign(&campaign).unwrap().unwrap();
        let mut notified = 0;
        for d in &record.devices {
            notified += store
                .device_history(d, 64)
                .unwrap()
                .iter()
                .filter(|t| t.campaign == campaign && t.to == DeviceState::Notified)
                .count();
        }
        (record, notified, store.verify_audit().unwrap())
    })
    .await
    .unwrap();
    assert_eq!(record.rollout.opened_ms.len(), 2, "{:?}", record.rollout);
    assert_eq!(notified, DEVICES, "every member notified once");
    assert!(chain.is_ok(), "{chain:?}");
    bed.close(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_stopped_under_three_replicas_holds_acknowledgements_until_it_is_back() {
    let mut bed = Bed::new().await;
    // A lease longer than the outage: the leader still holds it when the database is back.
    let (lab, url, broker) = (&bed.lab, bed.url.clone(), bed.broker);
    let start = |id| Some(replica_with_ttl(lab, &url, broker, id, 15));
    let mut r = vec![start("r0"), None, None];
    assert_eq!(leader(&r).await, 0);
    r[1] = start("r1");
    r[2] = start("r2");

    let (admin, fleet) = bed.fleet(30, 2).await;
    let mut spec = ReleaseSpec::new("2.0.0", 2, 256 * 1024);
    spec.chunk_bytes = 4 * 1024;
    let campaign = lab.release_to_all(&admin, &spec).await.unwrap();
    wait_campaign(&admin, &campaign, LIMIT, |s| {
        s.count(DeviceState::Downloading) >= 5 && !finished(s)
    })
    .await
    .unwrap();

    tokio::task::block_in_place(|| bed.cluster.stop()).unwrap();
    // Whichever replica receives it cannot write it to the inbox, and the leader could not
    // commit it: the pause waits unanswered, and no device's acknowledged state moves. A
    // commit that the database confirmed just before it stopped may still have its acks on
    // the way through the broker; they are published at once after it, so a second covers
    // them, and nothing is acknowledged after that.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let pause = pause_in_background(admin, &campaign);
    let acked =
        assert_nothing_acknowledged(&fleet, &campaign, &pause, "the database was down").await;
    for p in r.iter_mut().flatten() {
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "a replica must wait for its database, not exit"
        );
    }

    tokio::task::block_in_place(|| bed.cluster.start_server()).unwrap();
    let admin = pause_answered(pause).await;
    assert_eq!(leader(&r).await, 0);
    none_lost(&acked, &states(&admin, &campaign).await);
    resume_until_all_succeeded(&admin, &campaign, 30).await;
    fleet.shutdown().await;
    admin.disconnect().await;
    bed.close(r).await;
}

/// A replica on another host has its own data directory, whose root of trust and CRL are the
/// ones it was set up with. The leader also writes each root it accepts and each CRL it applies
/// to the database, and a replica that takes over brings its files up to date from there first:
/// a takeover never un-revokes a device nor goes back to an older root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_its_own_data_directory_takes_over_with_the_newest_root_and_crl() {
    use aloft_certs::cert_serial;
    use aloft_certs::revocation::{RevocationReason, RevocationState};
    use aloft_orchestrator::admin::wire::AdminBody;

    let bed = Bed::new().await;
    let (lab, url, broker) = (&bed.lab, &bed.url, bed.broker);
    // The other host's copy, made before any root or CRL was pushed.
    let other = bed.tmp.path().join("other-host").join("data");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&lab.data_dir)
        .arg(&other)
        .status()
        .unwrap();
    assert!(copied.success());
    let mut r = vec![Some(replica(lab, url, broker, "r0")), None];
    assert_eq!(leader(&r).await, 0);
    r[1] = Some(
        lab.spawn_replica_in(&other, exe(), broker, url, "r1", 3)
            .unwrap(),
    );

    let admin = lab.operator(broker).await.unwrap();
    let devices = lab.enroll_fleet("dev", 2).unwrap();
    lab.register(&admin, &devices).await.unwrap();
    let v2 = Lab::make_root(
        Some(&lab.pinned_root),
        &[&lab.root_key],
        &[&lab.release_key],
        &[],
        &[&lab.root_key],
    )
    .unwrap();
    let pushed: serde_json::Value = admin
        .call(AdminBody::TrustUpdate { roots: vec![v2] })
        .await
        .unwrap();
    assert_eq!(pushed["version"], 2);
    let mut state = RevocationState::default();
    state.revoke(
        &cert_serial(&devices[0].cert_pem).unwrap(),
        RevocationReason::KeyCompromise,
        Some(devices[0].id.to_string()),
        0,
    );
    let crl = state
        .sign_crl(&lab.ca, 7, time::OffsetDateTime::now_utc())
        .unwrap();
    let _: serde_json::Value = admin.call(AdminBody::CrlUpdate { crl }).await.unwrap();
    assert!(
        !other.join("crl.pem").exists(),
        "the other host has no CRL yet"
    );

    kill(&mut r[0]);
    assert_eq!(leader(&r).await, 1);
    let status: serde_json::Value = admin.call(AdminBody::TrustStatus {}).await.unwrap();
    assert_eq!(status["version"], 2, "{status}");
    assert!(other.join("trust").join("root-2.json").exists());
    assert_eq!(
        std::fs::read_to_string(other.join("crl.pem")).unwrap(),
        std::fs::read_to_string(lab.data_dir.join("crl.pem")).unwrap(),
        "the new leader put the newest CRL in force"
    );
    let list: serde_json::Value = admin
        .call(AdminBody::DeviceList {
            after: None,
            limit: None,
        })
        .await
        .unwrap();
    let revoked: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["revoked"] == true)
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(revoked, vec![devices[0].id.as_str()], "{list}");
    admin.disconnect().await;
    bed.close(r).await;
}
