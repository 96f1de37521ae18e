//! The orchestrator on a PostgreSQL store (a throwaway cluster each test starts): a data
//! directory made with the default sled store moves into PostgreSQL the documented way (a
//! backup restored with `--store`), a campaign runs through the real engine, a restart on the
//! same database finds everything the first run acknowledged, and `aloft serve --store` killed
//! with SIGKILL mid-campaign loses no acknowledged transition, and a serve whose leader lease
//! another holder took commits nothing more and stops.

use aloft_device::Fleet;
use aloft_e2e::{finished, wait_campaign, wait_registered, Lab, ReleaseSpec};
use aloft_orchestrator::admin::client::AdminClient;
use aloft_orchestrator::config::layout;
use aloft_orchestrator::store::pg_cluster::TempCluster;
use aloft_orchestrator::store::{Store, StoreLocation};
use aloft_proto::{CampaignId, DeviceId, DeviceState};

use crate::common::{exe, http_status, LIMIT};
use crate::restart::{acknowledged, rank};

/// A lab whose data directory's store was moved into a new database of `cluster`; its URL.
fn lab_on_postgres(tmp: &std::path::Path, cluster: &TempCluster) -> (Lab, StoreLocation) {
    let lab = Lab::create(tmp).unwrap();
    let url = cluster.create_database("e2e").unwrap();
    // sled → PostgreSQL: back up the data directory, restore it with the database as its store.
    lab.move_store_to_postgres(&url).unwrap();
    let at = StoreLocation::Postgres(url);
    assert!(
        !lab.data_dir.join(layout::STORE_DIR).exists(),
        "the sled store went aside with the previous contents"
    );
    (lab, at)
}

/// A throwaway PostgreSQL cluster, started off the runtime's threads.
pub(crate) async fn start_cluster() -> TempCluster {
    tokio::task::spawn_blocking(TempCluster::start)
        .await
        .unwrap()
        .unwrap()
}

/// [`lab_on_postgres`], with the database's URL.
pub(crate) fn lab_on_postgres_url(tmp: &std::path::Path, cluster: &TempCluster) -> (Lab, String) {
    match lab_on_postgres(tmp, cluster) {
        (lab, StoreLocation::Postgres(url)) => (lab, url),
        (_, other) => panic!("the lab's store is not in PostgreSQL: {other:?}"),
    }
}

/// `aloft serve --store URL` on the lab's data directory, as a child process listening at
/// `listen`. Its lease lasts 3 s: a process started after one was killed waits for the killed
/// one's lease to run out.
fn spawn_on(lab: &Lab, url: &str, listen: std::net::SocketAddr) -> aloft_e2e::OrchestratorProcess {
    let store_args = [
        std::ffi::OsStr::new("--store"),
        std::ffi::OsStr::new(url),
        std::ffi::OsStr::new("--lease-ttl-secs"),
        std::ffi::OsStr::new("3"),
    ];
    aloft_e2e::spawn_orchestrator_with(exe(), &lab.data_dir, &lab.unlock_file, listen, &store_args)
        .unwrap()
}

/// 20 devices of `lab` on the orchestrator at `addr`, registered, and a campaign of an image of
/// `image_kib` KiB (4 KiB chunks, window 2) to all of them, under way: 5 or more downloading.
async fn campaign_under_way(
    lab: &Lab,
    addr: std::net::SocketAddr,
    image_kib: usize,
) -> (AdminClient, Fleet, CampaignId) {
    let admin = lab.operator(addr).await.unwrap();
    let mut cfg = lab.fleet_config(addr);
    cfg.window = 2;
    let fleet = Fleet::start(&cfg, lab.enroll_fleet("dev", 20).unwrap()).unwrap();
    wait_registered(&admin, 20, LIMIT).await.unwrap();
    let mut spec = ReleaseSpec::new("2.0.0", 2, image_kib * 1024);
    spec.chunk_bytes = 4 * 1024;
    let campaign = lab.release_to_all(&admin, &spec).await.unwrap();
    wait_campaign(&admin, &campaign, LIMIT, |s| {
        s.count(DeviceState::Downloading) >= 5 && !finished(s)
    })
    .await
    .unwrap();
    (admin, fleet, campaign)
}

/// What an operator's pause answered, with the operator given back.
pub(crate) type PauseAnswer = (AdminClient, anyhow::Result<serde_json::Value>);

/// An operator's pause of `campaign`, asked from a task of its own. A pause needs a commit, so
/// while the store cannot commit, its answer is held.
pub(crate) fn pause_in_background(
    admin: AdminClient,
    campaign: &CampaignId,
) -> tokio::task::JoinHandle<PauseAnswer> {
    let body = aloft_orchestrator::admin::wire::AdminBody::CampaignPause {
        campaign: campaign.clone(),
    };
    tokio::spawn(async move {
        let answer = admin
            .call::<serde_json::Value>(body)
            .await
            .map_err(anyhow::Error::from);
        (admin, answer)
    })
}

/// Over a few seconds in which the store cannot commit: no device's acknowledged state moves
/// and `pause` stays unanswered (`why` names what the store is waiting for). Returns what each
/// device had acknowledged.
pub(crate) async fn assert_nothing_acknowledged(
    fleet: &Fleet,
    campaign: &CampaignId,
    pause: &tokio::task::JoinHandle<PauseAnswer>,
    why: &str,
) -> std::collections::HashMap<DeviceId, DeviceState> {
    let acked = acknowledged(fleet, campaign);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        acknowledged(fleet, campaign),
        acked,
        "acknowledged while {why}"
    );
    assert!(!pause.is_finished(), "the pause was answered while {why}");
    acked
}

/// Once the store commits again, the pause is answered (by the same process). Gives the
/// operator back.
pub(crate) async fn pause_answered(pause: tokio::task::JoinHandle<PauseAnswer>) -> AdminClient {
    let (admin, paused) = tokio::time::timeout(LIMIT, pause)
        .await
        .expect("the pause is answered once the store commits again")
        .unwrap();
    assert!(paused.is_ok(), "{paused:?}");
    admin
}

/// Resumes `campaign` and waits until it has finished with all `n` devices succeeded.
pub(crate) async fn resume_until_all_succeeded(admin: &AdminClient, campaign: &CampaignId, n: u32) {
    let _: serde_json::Value = admin
        .call(aloft_orchestrator::admin::wire::AdminBody::CampaignResume {
            campaign: campaign.clone(),
        })
        .await
        .unwrap();
    let s = wait_campaign(admin, campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), n, "{:?}", s.counts);
    assert_eq!(
        s.status,
        aloft_orchestrator::store::CampaignStatus::Finished
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_runs_on_a_postgresql_store_and_a_restart_finds_it_finished() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = start_cluster().await;
    let (lab, url) = lab_on_postgres_url(tmp.path(), &cluster);

    let mut cfg = lab.serve_config();
    cfg.file.store = Some(url.clone());
    let running = aloft_orchestrator::start(cfg.clone()).await.unwrap();
    let admin = lab.operator(running.device_addr).await.unwrap();
    let devices = lab.enroll_fleet("dev", 6).unwrap();
    let fleet = Fleet::start(&lab.fleet_config(running.device_addr), devices).unwrap();
    wait_registered(&admin, 6, LIMIT).await.unwrap();
    let campaign = lab
        .release_to_all(&admin, &ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .await
        .unwrap();
    let s = wait_campaign(&admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 6, "{:?}", s.counts);
    fleet.shutdown().await;
    drop(admin);
    running.shutdown().await.unwrap();

    // What the engine acknowledged is in the database, under the data directory's key.
    let key = aloft_orchestrator::ops::open_keystore(&lab.data_dir, &lab.unlock()).unwrap();
    let check = StoreLocation::Postgres(url.clone());
    let campaign_id = campaign.clone();
    tokio::task::spawn_blocking(move || {
        let store = Store::open_at(&check, key).unwrap();
        let members = store.campaign_progress(&campaign_id).unwrap();
        assert_eq!(members.len(), 6);
        assert!(members
            .iter()
            .all(|(_, p)| p.state == DeviceState::Succeeded));
        assert!(store
            .devices()
            .unwrap()
            .iter()
            .all(|d| d.floor.map(|f| f.0) == Some(2)));
        assert!(store.verify_audit().unwrap().unwrap() >= 1);
    })
    .await
    .unwrap();

    // A new process on the same database picks the campaign up as it was left.
    let running = aloft_orchestrator::start(cfg).await.unwrap();
    let admin = lab.operator(running.device_addr).await.unwrap();
    let s = wait_campaign(&admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 6, "{:?}", s.counts);
    drop(admin);
    running.shutdown().await.unwrap();
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_postgresql_killed_mid_campaign_loses_no_acknowledged_transition() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = start_cluster().await;
    let (lab, url) = lab_on_postgres_url(tmp.path(), &cluster);
    let spawn = |listen| spawn_on(&lab, &url, listen);
    let orch = spawn("127.0.0.1:0".parse().unwrap());
    let addr = orch.device_addr;
    let admin = lab.operator(addr).await.unwrap();
    let mut cfg = lab.fleet_config(addr);
    cfg.window = 2;
    let fleet = Fleet::start(&cfg, lab.enroll_fleet("dev", 30).unwrap()).unwrap();
    wait_registered(&admin, 30, LIMIT).await.unwrap();
    let mut spec = ReleaseSpec::new("2.0.0", 2, 512 * 1024);
    spec.chunk_bytes = 4 * 1024;
    let campaign = lab.release_to_all(&admin, &spec).await.unwrap();
    wait_campaign(&admin, &campaign, LIMIT, |s| {
        s.count(DeviceState::Downloading) >= 10 && !finished(s)
    })
    .await
    .unwrap();
    admin.disconnect().await;
    orch.kill9().unwrap();
    let acked = acknowledged(&fleet, &campaign);
    assert!(
        acked.values().any(|s| *s != DeviceState::Succeeded),
        "the kill landed mid-campaign"
    );

    // The killed process's session (and its lock) ends as the server notices the socket close.
    let orch = spawn(addr);
    let admin = lab.operator(orch.device_addr).await.unwrap();
    let after = aloft_e2e::status(&admin, &campaign, true).await.unwrap();
    for d in &after.devices {
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
    assert_eq!(s.count(DeviceState::Succeeded), 30, "{:?}", s.counts);
    fleet.shutdown().await;
    admin.disconnect().await;
    drop(orch);
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

/// PostgreSQL stopped mid-campaign: the orchestrator stays up and waits for it. Nothing is
/// acknowledged while it is down (a commit it needs, here an operator's pause, waits unanswered),
/// `/health` says the store is unreachable; once the database is back the same process commits
/// what waited, answers the pause, and the campaign, resumed, runs to its end with no
/// acknowledged transition lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_stopped_mid_campaign_holds_acknowledgements_until_it_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = start_cluster().await;
    let (lab, url) = lab_on_postgres_url(tmp.path(), &cluster);
    let spawn = |listen| spawn_on(&lab, &url, listen);
    let mut orch = spawn("127.0.0.1:0".parse().unwrap());
    let (admin, fleet, campaign) = campaign_under_way(&lab, orch.device_addr, 512).await;

    tokio::task::block_in_place(|| cluster.stop()).unwrap();
    // Devices whose next chunk is not in memory stall (a chunk read fails and they ask again),
    // so nothing may need a commit for a while. An operator's pause needs one: its flush
    // fails, and the engine waits for the database with the pause's reply held.
    let pause = pause_in_background(admin, &campaign);
    let metrics = orch.metrics_addr.expect("the orchestrator serves /metrics");
    let started = std::time::Instant::now();
    while aloft_e2e::scrape(metrics, "aloft_store_up").await != Some(0.0) {
        if started.elapsed() > LIMIT {
            let log = std::fs::read_to_string(lab.data_dir.with_file_name("orchestrator.log"));
            panic!("the lost database was not noticed: {log:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let health = http_status(metrics, "/health").await;
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    // Waiting, not gone: nothing is acknowledged, and what each device last had accepted
    // stays as it was.
    let acked =
        assert_nothing_acknowledged(&fleet, &campaign, &pause, "the database was down").await;
    assert!(
        orch.child.try_wait().unwrap().is_none(),
        "the orchestrator must wait for its database, not exit"
    );

    tokio::task::block_in_place(|| cluster.start_server()).unwrap();
    let admin = pause_answered(pause).await;
    assert_eq!(
        aloft_e2e::scrape(metrics, "aloft_store_up").await,
        Some(1.0)
    );
    assert!(http_status(metrics, "/health")
        .await
        .starts_with("HTTP/1.1 200"));
    let log = std::fs::read_to_string(lab.data_dir.with_file_name("orchestrator.log")).unwrap();
    assert!(log.contains("store cannot be reached"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    let after = aloft_e2e::status(&admin, &campaign, true).await.unwrap();
    for d in &after.devices {
        if let Some(a) = acked.get(&d.device) {
            assert!(
                rank(d.state) >= rank(*a),
                "{} was acknowledged in {a} but the orchestrator now says {}",
                d.device,
                d.state
            );
        }
    }
    resume_until_all_succeeded(&admin, &campaign, 20).await;
    fleet.shutdown().await;
    admin.disconnect().await;
    drop(orch);
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

/// A serve whose leader lease was taken by another holder (the test plays it: it takes the
/// row as an expired lease's next holder would) stops with a clear error, and what it would
/// have committed after (the devices that connect then) is not in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_whose_lease_another_holder_took_commits_nothing_more_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = start_cluster().await;
    let (lab, url) = lab_on_postgres_url(tmp.path(), &cluster);
    let mut orch = spawn_on(&lab, &url, "127.0.0.1:0".parse().unwrap());
    let metrics = orch.metrics_addr.expect("the orchestrator serves /metrics");
    assert_eq!(aloft_e2e::scrape(metrics, "aloft_leader").await, Some(1.0));
    let token = aloft_e2e::scrape(metrics, "aloft_lease_token")
        .await
        .expect("a PostgreSQL store's lease token");
    assert!(token >= 1.0);
    let psql = |sql: &'static str| {
        let c = &cluster;
        tokio::task::block_in_place(|| c.psql("e2e", sql)).unwrap()
    };
    let holder = psql("SELECT holder FROM aloft_lease");
    assert!(holder.contains('#'), "replica id and run mark: {holder}");

    // Another holder takes the lease over: a higher token, its own lease.
    psql(
        "UPDATE aloft_lease SET holder = 'intruder#00000000', token = token + 1, \
         expires_at = now() + interval '1 hour'",
    );
    // Devices connect: registering them would need a commit, which the fence refuses.
    let fleet = Fleet::start(
        &lab.fleet_config(orch.device_addr),
        lab.enroll_fleet("late", 3).unwrap(),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = orch.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < LIMIT,
            "the orchestrator went on after its lease was taken"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "a lost lease is an error: {status}");
    let log = std::fs::read_to_string(lab.data_dir.with_file_name("orchestrator.log")).unwrap();
    assert!(log.contains("leader lease"), "{log}");
    assert!(log.contains("commits nothing more"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        psql("SELECT count(*) FROM aloft_devices WHERE id LIKE 'late%'"),
        "0",
        "committed after the lease was lost"
    );
    assert_eq!(
        psql("SELECT holder FROM aloft_lease"),
        "intruder#00000000",
        "the stopped process released nothing of the other's"
    );
    fleet.shutdown().await;
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

/// PostgreSQL run with deploy/postgresql/aloft-primary.conf and a streaming standby named
/// `aloft_standby`: a transition is acknowledged only once the standby has flushed it. While
/// the standby is away the primary's commits wait, so the orchestrator acknowledges nothing and
/// holds an operator's reply; once the standby is back everything goes on, and the standby
/// holds every row the primary does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_deployed_settings_nothing_is_acknowledged_while_the_synchronous_standby_is_away()
{
    let tmp = tempfile::tempdir().unwrap();
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join("postgresql")
        .join("aloft-primary.conf");
    assert!(conf.is_file(), "{} is missing", conf.display());
    let include = vec![format!("include '{}'", conf.display())];
    // The standby first: with a synchronous standby named, the primary's every commit (the
    // database's creation included) waits for it.
    let primary = tokio::task::spawn_blocking(move || TempCluster::start_with(&include))
        .await
        .unwrap()
        .unwrap();
    let mut standby =
        tokio::task::block_in_place(|| TempCluster::standby_of(&primary, "aloft_standby", &[]))
            .unwrap();
    let (lab, url) = lab_on_postgres_url(tmp.path(), &primary);
    assert_eq!(
        primary
            .psql(
                "e2e",
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'aloft_standby'"
            )
            .unwrap(),
        "sync"
    );
    let orch = spawn_on(&lab, &url, "127.0.0.1:0".parse().unwrap());
    let (admin, fleet, campaign) = campaign_under_way(&lab, orch.device_addr, 256).await;

    tokio::task::block_in_place(|| standby.stop()).unwrap();
    let pause = pause_in_background(admin, &campaign);
    // A commit the standby confirmed just before it stopped may still have its acks on the
    // way to the devices. Once a commit waits for the standby (`SyncRep`), the engine is held
    // in it, and every earlier commit's acks were handed to the front before it began: after
    // a moment for those to arrive, nothing more may be acknowledged.
    let started = std::time::Instant::now();
    while primary
        .psql(
            "e2e",
            "SELECT count(*)::text FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        )
        .unwrap()
        == "0"
    {
        assert!(
            started.elapsed() < LIMIT,
            "no commit waited for the standby"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_nothing_acknowledged(
        &fleet,
        &campaign,
        &pause,
        "the synchronous standby was away",
    )
    .await;

    tokio::task::block_in_place(|| standby.start_server()).unwrap();
    let admin = pause_answered(pause).await;
    resume_until_all_succeeded(&admin, &campaign, 20).await;
    fleet.shutdown().await;
    admin.disconnect().await;
    drop(orch);
    // Every committed row is on the standby: synchronous_commit = on waits for its flush, and
    // the replay follows (read once it has caught up with the primary's last position).
    let rows = "SELECT (SELECT count(*) FROM aloft_progress) || ' ' || \
                (SELECT count(*) FROM aloft_history) || ' ' || (SELECT count(*) FROM aloft_audit)";
    let on_primary = primary.psql("e2e", rows).unwrap();
    let lsn = primary.psql("e2e", "SELECT pg_current_wal_lsn()").unwrap();
    let started = std::time::Instant::now();
    loop {
        let caught_up = standby
            .psql(
                "e2e",
                &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
            )
            .unwrap();
        if caught_up == "t" {
            break;
        }
        assert!(
            started.elapsed() < LIMIT,
            "the standby did not replay to {lsn}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(standby.psql("e2e", rows).unwrap(), on_primary);
    tokio::task::spawn_blocking(move || {
        drop(standby);
        drop(primary);
    })
    .await
    .unwrap();
}
