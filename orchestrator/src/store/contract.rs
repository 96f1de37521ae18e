//! The store's contract, written once and run on both engines: sled in a temporary directory,
//! and PostgreSQL in a throwaway cluster this test process starts itself (`pg_cluster`).
//! `contract_tests!` makes one `#[test]` per check and engine, so a failure names both.
//! PostgreSQL-only behaviour (migrations, a lost server, the database lock, the leader lease and
//! its fencing) follows.

use std::ops::Bound;

use aloft_proto::{ArtifactId, CampaignId, DeviceId, DeviceState, SecurityVersion};
use aloft_vault::MasterKey;

use super::kv::{Scan, Tree};
use super::pg_cluster::TempCluster;
use super::*;
use crate::fleet::state::Progress;

/// Where fresh, empty stores come from.
trait Backend {
    /// A location no store has used yet.
    fn fresh(&mut self) -> StoreLocation;
}

struct SledBackend {
    dir: tempfile::TempDir,
    n: u32,
}

impl SledBackend {
    fn new() -> Self {
        SledBackend {
            dir: tempfile::tempdir().unwrap(),
            n: 0,
        }
    }
}

impl Backend for SledBackend {
    fn fresh(&mut self) -> StoreLocation {
        self.n += 1;
        StoreLocation::Sled(self.dir.path().join(format!("store-{}", self.n)))
    }
}

struct PgBackend {
    cluster: TempCluster,
    n: u32,
}

impl PgBackend {
    fn new() -> Self {
        PgBackend {
            cluster: TempCluster::start().unwrap_or_else(|e| panic!("throwaway PostgreSQL: {e}")),
            n: 0,
        }
    }
}

impl Backend for PgBackend {
    fn fresh(&mut self) -> StoreLocation {
        self.n += 1;
        let url = self
            .cluster
            .create_database(&format!("contract_{}", self.n))
            .unwrap();
        StoreLocation::Postgres(url)
    }
}

fn device(id: &str, floor: Option<u64>) -> DeviceRecord {
    DeviceRecord {
        id: DeviceId::new(id).unwrap(),
        x25519_public: "00".repeat(32),
        cert_not_after: 0,
        cert_not_before: 0,
        cert_serial: String::new(),
        revoked: false,
        groups: vec!["g".into()],
        labels: Default::default(),
        registered_ms: 1,
        last_seen_ms: 2,
        floor: floor.map(SecurityVersion),
        installed_sequence: None,
        running_version: None,
    }
}

fn campaign(id: &str, devices: &[&str]) -> CampaignRecord {
    CampaignRecord {
        id: CampaignId::new(id).unwrap(),
        artifact: ArtifactId::new("fw-1").unwrap(),
        target: Target::All,
        devices: devices.iter().map(|d| DeviceId::new(*d).unwrap()).collect(),
        status: CampaignStatus::Active,
        created_by: aloft_proto::OperatorId::new("ops").unwrap(),
        created_ms: 3,
        finished_ms: None,
        policy: Default::default(),
        rollout: Default::default(),
        rolls_back: None,
        origin: None,
    }
}

fn progress(state: DeviceState, seq: u32, at: u64) -> Progress {
    let mut p = Progress::new(at);
    p.state = state;
    p.last_seq = seq;
    p
}

fn event(action: &str) -> AuditEvent {
    AuditEvent {
        actor: "alice".into(),
        action: action.into(),
        subject: "c-1".into(),
        outcome: "ok".into(),
    }
}

fn ids(devices: &[DeviceRecord]) -> Vec<&str> {
    devices.iter().map(|d| d.id.as_str()).collect()
}

/// Writes one record of every kind, flushed or not as `flush` says, and checks what reads return.
fn every_record_kind_reads_back(b: &mut dyn Backend) {
    let at = b.fresh();
    let key = MasterKey::generate().unwrap();
    let s = Store::create_at(&at, key).unwrap();
    // dev-10 sorts between dev-1 and dev-2, as in sled's byte order.
    for id in ["dev-2", "dev-1", "dev-10"] {
        s.put_device(&device(id, Some(1))).unwrap();
    }
    s.flush().unwrap();
    s.put_device(&device("dev-3", None)).unwrap();
    assert_eq!(
        ids(&s.devices().unwrap()),
        ["dev-1", "dev-10", "dev-2", "dev-3"]
    );
    let first = s.devices_page(None, 2).unwrap();
    assert_eq!(ids(&first), ["dev-1", "dev-10"]);
    let next = s.devices_page(Some(&first[1].id), 10).unwrap();
    assert_eq!(ids(&next), ["dev-2", "dev-3"]);
    assert_eq!(
        s.device(&DeviceId::new("dev-1").unwrap()).unwrap(),
        Some(device("dev-1", Some(1)))
    );
    assert_eq!(s.device(&DeviceId::new("dev-9").unwrap()).unwrap(), None);

    let clear = "cd".repeat(32);
    let r = super::tests::release_record("fw-1", &clear);
    s.put_release(&r).unwrap();
    let raw = s.kv.get(Tree::Releases, b"fw-1").unwrap().unwrap();
    assert!(
        !String::from_utf8_lossy(&raw).contains(&clear),
        "content key in clear"
    );
    let a = ArtifactId::new("fw-1").unwrap();
    assert_eq!(s.release(&a).unwrap().unwrap().content_key_hex, clear);
    assert_eq!(s.releases().unwrap().len(), 1);

    for i in [2u32, 0, 1, 300] {
        s.put_chunk(&a, i, &[i as u8; 100]).unwrap();
    }
    s.put_chunk(&ArtifactId::new("fw-10").unwrap(), 0, b"other")
        .unwrap();
    assert_eq!(s.chunk(&a, 300).unwrap().unwrap(), vec![44u8; 100]);
    assert_eq!(s.chunk(&a, 3).unwrap(), None);
    assert_eq!(s.chunk_count_stored(&a), 4);

    s.put_campaign(&campaign("c-2", &["dev-1"])).unwrap();
    s.put_campaign(&campaign("c-1", &["dev-1", "dev-2"]))
        .unwrap();
    let cs: Vec<_> = s.campaigns().unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(
        cs,
        [
            CampaignId::new("c-1").unwrap(),
            CampaignId::new("c-2").unwrap()
        ]
    );
    assert_eq!(s.campaigns_page(1).unwrap().len(), 1);
    assert_eq!(
        s.campaign(&CampaignId::new("c-2").unwrap()).unwrap(),
        Some(campaign("c-2", &["dev-1"]))
    );

    let c1 = CampaignId::new("c-1").unwrap();
    let d1 = DeviceId::new("dev-1").unwrap();
    let d2 = DeviceId::new("dev-2").unwrap();
    s.put_progress(&c1, &d1, &progress(DeviceState::Idle, 0, 10))
        .unwrap();
    s.put_progress(&c1, &d2, &progress(DeviceState::Idle, 0, 10))
        .unwrap();
    s.flush().unwrap();
    s.put_progress(&c1, &d1, &progress(DeviceState::Downloading, 2, 20))
        .unwrap();
    // A campaign whose id extends c-1's is not part of c-1's scan.
    s.put_progress(
        &CampaignId::new("c-10").unwrap(),
        &d1,
        &progress(DeviceState::Idle, 0, 5),
    )
    .unwrap();
    let all = s.campaign_progress(&c1).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((&all[0].0, all[0].1.state), (&d1, DeviceState::Downloading));
    assert_eq!(
        s.progress(&c1, &d2).unwrap().unwrap().state,
        DeviceState::Idle
    );
    let h = s.device_history(&d1, 10).unwrap();
    let seen: Vec<_> = h.iter().map(|t| (t.from, t.to, t.at_ms)).collect();
    assert_eq!(
        seen,
        [
            (DeviceState::Idle, DeviceState::Idle, 5),
            (DeviceState::Idle, DeviceState::Downloading, 20),
            (DeviceState::Idle, DeviceState::Idle, 10),
        ]
    );

    for a in ["campaign_create", "campaign_pause"] {
        s.append_audit(event(a), 7).unwrap();
    }
    s.flush().unwrap();
    s.append_audit(event("campaign_resume"), 8).unwrap();
    assert_eq!(s.verify_audit().unwrap(), Ok(3));
    let log = s.audit(2, 10).unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[1].prev, log[0].hash);
    assert_eq!(log[1].event.action, "campaign_resume");
}

/// Writes before a flush are seen by reads, overwrite flushed rows, and removals hide them.
fn pending_writes_are_read_before_the_flush(b: &mut dyn Backend) {
    let at = b.fresh();
    let s = Store::create_at(&at, MasterKey::generate().unwrap()).unwrap();
    let d = DeviceId::new("dev-1").unwrap();
    // More than the cap of entries in the history, half flushed: the oldest are removed by
    // writes not yet flushed, and the scan must not show them.
    for i in 0..(HISTORY_PER_DEVICE + 20) {
        let t = Transition {
            campaign: CampaignId::new("c").unwrap(),
            from: DeviceState::Idle,
            to: DeviceState::Notified,
            reason: None,
            at_ms: i,
        };
        s.append_history(&d, &t).unwrap();
        if i == HISTORY_PER_DEVICE / 2 {
            s.flush().unwrap();
        }
    }
    let h = s.device_history(&d, usize::MAX).unwrap();
    assert_eq!(h.len() as u64, HISTORY_PER_DEVICE);
    assert_eq!(h[0].at_ms, HISTORY_PER_DEVICE + 19);
    assert_eq!(h.last().unwrap().at_ms, 20);
    assert_eq!(
        s.device_history(&d, 3).unwrap()[2].at_ms,
        HISTORY_PER_DEVICE + 17
    );
    let keys = s.kv.scan(Tree::History, &Scan::all().keys_only()).unwrap();
    assert_eq!(keys.len() as u64, HISTORY_PER_DEVICE);

    s.put_device(&device("dev-1", Some(1))).unwrap();
    s.flush().unwrap();
    s.put_device(&device("dev-1", Some(2))).unwrap();
    assert_eq!(
        s.device(&d).unwrap().unwrap().floor,
        Some(SecurityVersion(2))
    );
    s.kv.remove(Tree::Devices, b"dev-1").unwrap();
    assert_eq!(s.device(&d).unwrap(), None);
    assert!(s.devices().unwrap().is_empty());
    s.flush().unwrap();
    assert!(s.devices().unwrap().is_empty());
    // A page that starts at a removed key, and a range that starts inside one.
    let from = Bound::Included(5u64.to_be_bytes().to_vec());
    assert!(s.audit(5, 10).unwrap().is_empty());
    assert!(s
        .kv
        .scan(Tree::Audit, &Scan::all().from(from))
        .unwrap()
        .is_empty());
}

/// What a flush returned for is there after a reopen; the key check refuses another key.
fn flushed_writes_survive_a_reopen_and_another_key_is_refused(b: &mut dyn Backend) {
    let at = b.fresh();
    let key = MasterKey::generate().unwrap();
    let c = CampaignId::new("c-1").unwrap();
    let d = DeviceId::new("dev-1").unwrap();
    {
        let s = Store::create_at(&at, key.clone()).unwrap();
        s.put_release(&super::tests::release_record("fw-1", &"ab".repeat(32)))
            .unwrap();
        let mut p = progress(DeviceState::Downloading, 4, 9);
        p.served = true;
        s.put_progress(&c, &d, &p).unwrap();
        s.append_audit(event("campaign_create"), 1).unwrap();
        s.flush().unwrap();
    }
    assert!(matches!(
        Store::create_at(&at, key.clone()),
        Err(StoreError::Exists(_) | StoreError::DatabaseExists(_))
    ));
    assert!(matches!(
        Store::open_at(&at, MasterKey::generate().unwrap()),
        Err(StoreError::WrongKey)
    ));
    let s = Store::open_at(&at, key).unwrap();
    let p = s.progress(&c, &d).unwrap().unwrap();
    assert_eq!(
        (p.state, p.last_seq, p.served),
        (DeviceState::Downloading, 4, true)
    );
    let a = ArtifactId::new("fw-1").unwrap();
    assert_eq!(
        s.release(&a).unwrap().unwrap().content_key_hex,
        "ab".repeat(32)
    );
    assert_eq!(s.verify_audit().unwrap(), Ok(1));
    assert_eq!(s.device_history(&d, 10).unwrap().len(), 1);
}

/// A job wrapped for one device, as the engine makes it (a real HPKE wrapping).
fn member_job(device: &DeviceId, deltas: usize) -> MemberJob {
    let public = aloft_proto::crypto::DeviceEncryptionKey::generate()
        .and_then(|k| k.public_bytes())
        .unwrap();
    let key = aloft_proto::crypto::ContentKey::from_bytes([7; 32]);
    let wrap = |artifact: &str| {
        let artifact = ArtifactId::new(artifact).unwrap();
        aloft_proto::crypto::wrap_content_key(&public, device, &artifact, &key).unwrap()
    };
    MemberJob {
        issued_at: 1_700_000_000,
        wrapped_key: wrap("fw-1"),
        deltas: (0..deltas)
            .map(|i| {
                let a = format!("fw-1-delta-{i}");
                (ArtifactId::new(&a).unwrap(), wrap(&a))
            })
            .collect(),
        root_version: 3,
        wrapped_to: hex::encode(public),
    }
}

/// A member's job (its wrapped keys) reads back as it was stored, before and after the flush
/// and across a reopen; a member without one (notified before jobs were stored) has none.
fn a_members_stored_job_round_trips(b: &mut dyn Backend) {
    let at = b.fresh();
    let key = MasterKey::generate().unwrap();
    let c = CampaignId::new("c-1").unwrap();
    let other = CampaignId::new("c-2").unwrap();
    let (d1, d2) = (
        DeviceId::new("dev-1").unwrap(),
        DeviceId::new("dev-2").unwrap(),
    );
    let (j1, j2) = (member_job(&d1, 0), member_job(&d2, 2));
    {
        let s = Store::create_at(&at, key.clone()).unwrap();
        for d in [&d1, &d2] {
            s.put_progress(&c, d, &progress(DeviceState::Notified, 0, 5))
                .unwrap();
        }
        s.put_member_job(&c, &d1, &j1).unwrap();
        s.flush().unwrap();
        s.put_member_job(&c, &d2, &j2).unwrap();
        assert_eq!(s.member_job(&c, &d2).unwrap().as_ref(), Some(&j2));
        s.put_progress(&other, &d1, &progress(DeviceState::Notified, 0, 5))
            .unwrap();
        s.flush().unwrap();
    }
    let s = Store::open_at(&at, key).unwrap();
    assert_eq!(s.member_job(&c, &d1).unwrap(), Some(j1.clone()));
    assert_eq!(
        s.campaign_jobs(&c).unwrap(),
        vec![(d1.clone(), j1), (d2.clone(), j2.clone())]
    );
    assert_eq!(s.member_job(&other, &d1).unwrap(), None);
    assert!(s.campaign_jobs(&other).unwrap().is_empty());
    // The progress row moving on leaves the job as it was.
    s.put_progress(&c, &d2, &progress(DeviceState::Downloading, 1, 6))
        .unwrap();
    s.flush().unwrap();
    assert_eq!(s.member_job(&c, &d2).unwrap(), Some(j2));
}

/// A flush larger than one statement takes (a restore, a long batch) lands whole.
fn a_large_flush_lands_whole(b: &mut dyn Backend) {
    let at = b.fresh();
    let key = MasterKey::generate().unwrap();
    let s = Store::create_at(&at, key.clone()).unwrap();
    let n = 5000;
    for i in 0..n {
        s.put_device(&device(&format!("dev-{i:05}"), Some(1)))
            .unwrap();
    }
    s.flush().unwrap();
    drop(s);
    let s = Store::open_at(&at, key).unwrap();
    let page = s
        .devices_page(Some(&DeviceId::new("dev-04990").unwrap()), 100)
        .unwrap();
    assert_eq!(
        ids(&page),
        (4991..n).map(|i| format!("dev-{i:05}")).collect::<Vec<_>>()
    );
    assert_eq!(s.devices().unwrap().len(), n);
}

/// A reader on another thread (the console) while the engine writes and flushes: reads never
/// fail, and every history entry starts where the one before it ended. (The race PostgreSQL's
/// `Overlay::epoch` guards, a read from the server noted after a commit overtook it, is too
/// narrow for this test to hit reliably: removing the guard did not fail it in three runs.)
fn a_reader_beside_the_writer_leaves_the_history_whole(b: &mut dyn Backend) {
    let at = b.fresh();
    let s = Store::create_at(&at, MasterKey::generate().unwrap()).unwrap();
    let c = CampaignId::new("c-1").unwrap();
    let devices: Vec<DeviceId> = (0..8)
        .map(|i| DeviceId::new(format!("dev-{i}")).unwrap())
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (s, c, devices, stop) = (s.clone(), c.clone(), devices.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for d in &devices {
                    s.progress(&c, d).unwrap();
                    s.device_history(d, 4).unwrap();
                }
                s.campaign_progress(&c).unwrap();
                reads += 1;
            }
            reads
        })
    };
    let states = DeviceState::SUCCESS_PATH;
    for round in 0..40u32 {
        for d in &devices {
            let state = states[round as usize % states.len()];
            s.put_progress(&c, d, &progress(state, round, u64::from(round)))
                .unwrap();
        }
        if round % 3 == 2 {
            s.flush().unwrap();
        }
    }
    s.flush().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    for d in &devices {
        let mut h = s.device_history(d, usize::MAX).unwrap();
        h.reverse();
        assert_eq!(h.len(), 40, "{d}: one entry per change of state");
        for pair in h.windows(2) {
            assert_eq!(pair[1].from, pair[0].to, "{d}: {pair:?}");
        }
        assert_eq!(s.progress(&c, d).unwrap().unwrap().last_seq, 39);
    }
}

/// An empty location is refused, never opened as a fresh store.
fn a_missing_store_is_refused(b: &mut dyn Backend) {
    let at = b.fresh();
    let err = Store::open_at(&at, MasterKey::generate().unwrap())
        .err()
        .unwrap();
    assert!(
        matches!(err, StoreError::Missing(_) | StoreError::MissingDatabase(_)),
        "{err}"
    );
}

/// A raw export imports into a new store of the other engine (or the same) record for record,
/// and the merge keeps the surviving store's higher security state.
fn raw_records_move_between_engines_and_merges_keep_the_higher_state(b: &mut dyn Backend) {
    let at = b.fresh();
    let key = MasterKey::generate().unwrap();
    let c = CampaignId::new("c-1").unwrap();
    let d = DeviceId::new("dev-1").unwrap();
    {
        let s = Store::create_at(&at, key.clone()).unwrap();
        s.put_device(&device("dev-1", Some(5))).unwrap();
        s.put_device(&device("dev-2", None)).unwrap();
        s.put_release(&super::tests::release_record("fw-1", &"ab".repeat(32)))
            .unwrap();
        s.put_chunk(&ArtifactId::new("fw-1").unwrap(), 0, b"sealed")
            .unwrap();
        s.put_progress(&c, &d, &progress(DeviceState::Installing, 9, 3))
            .unwrap();
        s.append_audit(event("a"), 1).unwrap();
        s.append_audit(event("b"), 2).unwrap();
        s.put_shared("crl.pem", b"the CRL in force now").unwrap();
        s.flush().unwrap();
    }
    let source = RawStore::open_at(&at).unwrap();
    assert!(source.holds_store().unwrap());
    let mut records = Vec::new();
    source
        .export(|r| {
            records.push(r);
            Ok::<(), StoreError>(())
        })
        .unwrap();
    // meta (key check, shared CRL), 2 devices, release, chunk, progress, 1 history entry,
    // 2 audit entries.
    assert_eq!(records.len(), 10);
    let dir = tempfile::tempdir().unwrap();
    let copy = RawStore::create(&dir.path().join("copy")).unwrap();
    for r in &records {
        copy.insert(r).unwrap();
    }
    copy.flush().unwrap();
    let mut again = Vec::new();
    copy.export(|r| {
        again.push(r);
        Ok::<(), StoreError>(())
    })
    .unwrap();
    assert_eq!(again, records);
    assert!(matches!(
        copy.insert(&RawRecord {
            tree: b"nonsense".to_vec(),
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        }),
        Err(StoreError::UnknownTree(_))
    ));

    // An older copy, restored: lower floor, earlier progress, shorter audit log.
    let old = RawStore::create(&dir.path().join("old")).unwrap();
    for r in &records {
        let mut r = r.clone();
        if r.tree == b"devices" && r.key == b"dev-1" {
            r.value = encode(&device("dev-1", Some(2)));
        }
        if r.tree == b"progress" {
            r.value = encode(&progress(DeviceState::Downloading, 3, 1));
        }
        if r.tree == b"audit" && r.key == 2u64.to_be_bytes() {
            continue;
        }
        if r.key == b"shared/crl.pem" {
            r.value = b"the CRL at the backup".to_vec();
        }
        old.insert(&r).unwrap();
    }
    let report = old.merge_security_state(&source).unwrap();
    assert_eq!(
        (
            report.floors_raised,
            report.progress_kept,
            report.audit_entries_kept,
            report.shared_kept
        ),
        (1, 1, 2, 1)
    );
    let mut shared = Vec::new();
    old.export(|r| {
        if r.key.starts_with(b"shared/") {
            shared.push(r.value);
        }
        Ok::<(), StoreError>(())
    })
    .unwrap();
    assert_eq!(shared, vec![b"the CRL in force now".to_vec()]);
    assert_eq!(
        old.device(&d).unwrap().unwrap().floor,
        Some(SecurityVersion(5))
    );
    assert_eq!(old.progress(&c, &d).unwrap().unwrap().last_seq, 9);

    // And the whole of it replaces a store of this engine in one step.
    let target_at = b.fresh();
    drop(Store::create_at(&target_at, MasterKey::generate().unwrap()));
    if target_at.is_postgres() {
        let target = RawStore::open_at(&target_at).unwrap();
        assert_eq!(target.replace_with(&old).unwrap(), 10);
        drop(target);
        let s = Store::open_at(&target_at, key).unwrap();
        assert_eq!(
            s.device(&d).unwrap().unwrap().floor,
            Some(SecurityVersion(5))
        );
        assert_eq!(s.verify_audit().unwrap(), Ok(2));
    }
}

macro_rules! contract_tests {
    ($backend:ident: $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                let mut b = super::$backend::new();
                super::$check(&mut b);
            }
        )*
    };
}

mod on_sled {
    contract_tests!(SledBackend:
        every_record_kind_reads_back,
        a_members_stored_job_round_trips,
        pending_writes_are_read_before_the_flush,
        flushed_writes_survive_a_reopen_and_another_key_is_refused,
        a_missing_store_is_refused,
        a_large_flush_lands_whole,
        a_reader_beside_the_writer_leaves_the_history_whole,
        raw_records_move_between_engines_and_merges_keep_the_higher_state,
    );
}

mod on_postgres {
    contract_tests!(PgBackend:
        every_record_kind_reads_back,
        a_members_stored_job_round_trips,
        pending_writes_are_read_before_the_flush,
        flushed_writes_survive_a_reopen_and_another_key_is_refused,
        a_missing_store_is_refused,
        a_large_flush_lands_whole,
        a_reader_beside_the_writer_leaves_the_history_whole,
        raw_records_move_between_engines_and_merges_keep_the_higher_state,
    );

    use super::*;

    #[test]
    fn a_fresh_database_is_migrated_and_a_newer_schema_is_refused() {
        let mut b = PgBackend::new();
        let at = b.fresh();
        let StoreLocation::Postgres(_) = &at else {
            unreachable!()
        };
        drop(Store::create_at(&at, MasterKey::generate().unwrap()).unwrap());
        let db = format!("contract_{}", b.n);
        let versions = b
            .cluster
            .psql(&db, "SELECT string_agg(version::text, ',' ORDER BY version) FROM aloft_schema_migrations")
            .unwrap();
        let all: Vec<String> = (1..=pg::SCHEMA_VERSION).map(|v| v.to_string()).collect();
        assert_eq!(versions, all.join(","));
        // Opening again applies nothing twice.
        drop(RawStore::open_at(&at).unwrap());
        b.cluster
            .psql(&db, "INSERT INTO aloft_schema_migrations (version, name) VALUES (999, 'from the future')")
            .unwrap();
        let err = Store::open_at(&at, MasterKey::generate().unwrap())
            .err()
            .unwrap();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found: 999, known, .. } if known == pg::SCHEMA_VERSION),
            "{err}"
        );
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn a_store_of_schema_3_is_migrated_and_its_members_load_without_a_stored_job() {
        let mut b = PgBackend::new();
        let at = b.fresh();
        let key = MasterKey::generate().unwrap();
        let c = CampaignId::new("c-1").unwrap();
        let d = DeviceId::new("dev-1").unwrap();
        {
            let s = Store::create_at(&at, key.clone()).unwrap();
            s.put_progress(&c, &d, &progress(DeviceState::Notified, 0, 5))
                .unwrap();
            s.flush().unwrap();
        }
        // Back to what schema 3 had: no jobs table (nor what later schemas added).
        let db = format!("contract_{}", b.n);
        b.cluster
            .psql(
                &db,
                "DROP TABLE aloft_jobs; DROP TABLE aloft_inbox; \
                 DELETE FROM aloft_schema_migrations WHERE version >= 4",
            )
            .unwrap();
        let s = Store::open_at(&at, key).unwrap();
        let versions = b
            .cluster
            .psql(
                &db,
                "SELECT max(version)::text FROM aloft_schema_migrations",
            )
            .unwrap();
        assert_eq!(versions, pg::SCHEMA_VERSION.to_string());
        assert_eq!(s.campaign_progress(&c).unwrap().len(), 1);
        assert_eq!(s.member_job(&c, &d).unwrap(), None);
        let job = member_job(&d, 1);
        s.put_member_job(&c, &d, &job).unwrap();
        s.flush().unwrap();
        assert_eq!(s.campaign_jobs(&c).unwrap(), vec![(d, job)]);
    }

    #[test]
    fn replicas_share_the_database_offline_tools_wait_and_a_commit_deletes_the_inbox_rows_it_applied(
    ) {
        let mut b = PgBackend::new();
        let at = b.fresh();
        let key = MasterKey::generate().unwrap();
        drop(Store::create_at(&at, key.clone()).unwrap());
        let leader = Store::open_sharing(&at, key.clone(), Sharing::Replica).unwrap();
        let other = Store::open_sharing(&at, key.clone(), Sharing::Replica).unwrap();
        let reader = Store::open_sharing(&at, key.clone(), Sharing::Reader).unwrap();
        // An offline tool takes the store alone: not while any replica holds it.
        let err = Store::open_at(&at, key.clone()).err().unwrap();
        assert!(matches!(err, StoreError::DatabaseInUse(_)), "{err}");
        assert!(reader.put_device(&device("dev-1", Some(1))).is_err());
        assert!(reader.consume_inbox(1).is_err());

        let db = format!("contract_{}", b.n);
        let first: i64 = b
            .cluster
            .psql(
                &db,
                "INSERT INTO aloft_inbox (kind, replica, topic, payload) \
                 VALUES (0, 'r1', 'a', '\\x00'), (0, 'r2', 'b', '\\x00') RETURNING id",
            )
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // A row applied alone still commits (its deletion is the commit's only write).
        leader.consume_inbox(first).unwrap();
        leader.flush().unwrap();
        let left = |b: &PgBackend| {
            b.cluster
                .psql(&db, "SELECT count(*)::text FROM aloft_inbox")
        };
        assert_eq!(left(&b).unwrap(), "1");
        // Applied with a transition: both are durable in one commit, and a reader (which
        // keeps no cache) sees the transition at once.
        let c = CampaignId::new("c-1").unwrap();
        let d = DeviceId::new("dev-1").unwrap();
        assert_eq!(reader.progress(&c, &d).unwrap(), None);
        leader.consume_inbox(first + 1).unwrap();
        leader
            .put_progress(&c, &d, &progress(DeviceState::Downloading, 0, 1))
            .unwrap();
        leader.flush().unwrap();
        assert_eq!(left(&b).unwrap(), "0");
        assert_eq!(
            reader.progress(&c, &d).unwrap().map(|p| p.state),
            Some(DeviceState::Downloading)
        );
        drop((leader, other, reader));
        assert!(Store::open_at(&at, key).is_ok());
    }

    #[test]
    fn a_second_process_is_kept_off_the_database_until_the_first_closes() {
        let mut b = PgBackend::new();
        let at = b.fresh();
        let key = MasterKey::generate().unwrap();
        let s = Store::create_at(&at, key.clone()).unwrap();
        let err = Store::open_at(&at, key.clone()).err().unwrap();
        assert!(matches!(err, StoreError::DatabaseInUse(_)), "{err}");
        assert!(matches!(
            RawStore::open_at(&at),
            Err(StoreError::DatabaseInUse(_))
        ));
        drop(s);
        assert!(Store::open_at(&at, key).is_ok());
    }

    #[test]
    fn a_process_whose_store_was_held_by_another_meanwhile_stops_instead_of_writing() {
        let mut b = PgBackend::new();
        let at = b.fresh();
        let key = MasterKey::generate().unwrap();
        let s = Store::create_at(&at, key.clone()).unwrap();
        let d = DeviceId::new("dev-1").unwrap();
        s.put_device(&device("dev-1", Some(1))).unwrap();
        s.flush().unwrap();

        b.cluster.stop().unwrap();
        s.put_device(&device("dev-1", Some(2))).unwrap();
        let err = s.flush().expect_err("the server is down");
        assert!(err.is_transient(), "{err}");
        b.cluster.start_server().unwrap();
        // While this process has no connection (and so no lock), another takes the store,
        // writes and leaves.
        let other = Store::open_at(&at, key.clone()).unwrap();
        other.put_device(&device("dev-1", Some(7))).unwrap();
        other.flush().unwrap();
        drop(other);

        let err = s
            .flush()
            .expect_err("the first process must not write over the other's");
        assert!(matches!(err, StoreError::DatabaseTakenOver { .. }), "{err}");
        assert!(!err.is_transient());
        assert!(err.to_string().contains("another process"), "{err}");
        drop(s);
        let s = Store::open_at(&at, key).unwrap();
        assert_eq!(
            s.device(&d).unwrap().unwrap().floor,
            Some(SecurityVersion(7)),
            "the other holder's write stands"
        );
    }

    #[test]
    fn a_stopped_server_fails_the_flush_and_a_restarted_one_takes_the_same_writes() {
        let mut b = PgBackend::new();
        let at = b.fresh();
        let key = MasterKey::generate().unwrap();
        let s = Store::create_at(&at, key.clone()).unwrap();
        let c = CampaignId::new("c-1").unwrap();
        let d = DeviceId::new("dev-1").unwrap();
        s.put_progress(&c, &d, &progress(DeviceState::Notified, 1, 1))
            .unwrap();
        s.flush().unwrap();

        b.cluster.stop().unwrap();
        // A write that needs no read is buffered; the flush cannot commit it.
        s.put_device(&device("dev-1", Some(4))).unwrap();
        let err = s
            .flush()
            .expect_err("a flush with the server down must fail");
        assert!(matches!(err, StoreError::Database { .. }), "{err}");
        assert!(
            s.flush().is_err(),
            "a second flush while the server is down"
        );
        // A transition reads the record it replaces, which this process committed itself: it
        // is known without the server, and the transition waits in the buffer with the rest.
        s.put_progress(&c, &d, &progress(DeviceState::Downloading, 2, 2))
            .unwrap();
        // A read only the server can answer fails, as an error, not a panic; the process
        // still reads its own pending writes.
        assert!(matches!(s.campaign(&c), Err(StoreError::Database { .. })));
        assert_eq!(
            s.device(&d).unwrap().unwrap().floor,
            Some(SecurityVersion(4))
        );
        assert_eq!(s.progress(&c, &d).unwrap().unwrap().last_seq, 2);

        b.cluster.start_server().unwrap();
        s.flush().unwrap();
        drop(s);
        let s = Store::open_at(&at, key).unwrap();
        assert_eq!(
            s.device(&d).unwrap().unwrap().floor,
            Some(SecurityVersion(4))
        );
        let p = s.progress(&c, &d).unwrap().unwrap();
        assert_eq!((p.state, p.last_seq), (DeviceState::Downloading, 2));
        assert_eq!(s.device_history(&d, 10).unwrap().len(), 2);
    }

    /// The lease's ttl in these tests: expiry is forced with an UPDATE, never waited for, so
    /// it only bounds each statement (a sixth of it).
    const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(6);

    fn lease_db(b: &mut PgBackend) -> (StoreLocation, String, String) {
        let at = b.fresh();
        let StoreLocation::Postgres(url) = &at else {
            unreachable!()
        };
        let url = url.clone();
        (at, url, format!("contract_{}", b.n))
    }

    fn expire(b: &PgBackend, db: &str) {
        b.cluster
            .psql(
                db,
                "UPDATE aloft_lease SET expires_at = now() - interval '1 second' WHERE id = 1",
            )
            .unwrap();
    }

    #[test]
    fn the_lease_is_granted_renewed_refused_to_another_and_taken_over_after_expiry() {
        use pg_lease::{Acquired, PgLease};
        let mut b = PgBackend::new();
        let (at, url, db) = lease_db(&mut b);
        drop(Store::create_at(&at, MasterKey::generate().unwrap()).unwrap());
        let mut a = PgLease::new(&url, "a#1".into(), LEASE_TTL).unwrap();
        let mut other = PgLease::new(&url, "b#1".into(), LEASE_TTL).unwrap();

        assert_eq!(
            a.acquire(),
            Acquired::Granted(1),
            "the first grant raises 0"
        );
        let live = "SELECT expires_at > now() + interval '5 seconds' FROM aloft_lease";
        assert_eq!(b.cluster.psql(&db, live).unwrap(), "t", "until now() + ttl");
        assert_eq!(
            a.acquire(),
            Acquired::Granted(1),
            "a renewal keeps the token"
        );
        assert_eq!(
            other.acquire(),
            Acquired::Refused {
                holder: "a#1".into(),
                token: 1
            },
            "refused while a's lease is live"
        );
        assert_eq!(
            b.cluster
                .psql(&db, "SELECT holder FROM aloft_lease")
                .unwrap(),
            "a#1"
        );

        expire(&b, &db);
        assert_eq!(
            other.acquire(),
            Acquired::Granted(2),
            "a takeover raises the token"
        );
        assert_eq!(
            a.acquire(),
            Acquired::Refused {
                holder: "b#1".into(),
                token: 2
            }
        );
        // A clean release lets the next holder in at once, with a new token.
        other.release(2).unwrap();
        assert_eq!(a.acquire(), Acquired::Granted(3));
        // A release by a holder that no longer holds the lease changes nothing.
        other.release(2).unwrap();
        assert_eq!(a.acquire(), Acquired::Granted(3));
    }

    #[test]
    fn a_fenced_flush_after_a_takeover_fails_with_lease_lost_and_commits_nothing() {
        use pg_lease::{Acquired, PgLease};
        let mut b = PgBackend::new();
        let (at, url, db) = lease_db(&mut b);
        let key = MasterKey::generate().unwrap();
        let s = Store::create_at(&at, key.clone()).unwrap();
        let d = DeviceId::new("dev-1").unwrap();
        let mut mine = PgLease::new(&url, "serve#1".into(), LEASE_TTL).unwrap();
        let Acquired::Granted(token) = mine.acquire() else {
            panic!("the lease is free")
        };
        s.lease_fence().unwrap().hold(token);
        s.put_device(&device("dev-1", Some(1))).unwrap();
        s.flush().unwrap();

        // This process stalls past its lease; another takes it over.
        expire(&b, &db);
        let mut next = PgLease::new(&url, "serve#2".into(), LEASE_TTL).unwrap();
        assert_eq!(next.acquire(), Acquired::Granted(token + 1));

        s.put_device(&device("dev-1", Some(2))).unwrap();
        let err = s.flush().expect_err("a fenced flush after a takeover");
        assert!(
            matches!(err, StoreError::LeaseLost { mine: Some(m), now: Some(n), .. } if m == token && n == token + 1),
            "{err}"
        );
        assert!(!err.is_transient(), "fatal, not waited out");
        assert!(err.to_string().contains("leader lease"), "{err}");
        // Lost for good: no later flush reaches the database either.
        let again = s.flush().expect_err("still lost");
        assert!(matches!(again, StoreError::LeaseLost { .. }), "{again}");
        assert_eq!(
            b.cluster
                .psql(&db, "SELECT count(*) FROM aloft_devices")
                .unwrap(),
            "1"
        );
        drop(s);
        let s = Store::open_at(&at, key).unwrap();
        assert_eq!(
            s.device(&d).unwrap().unwrap().floor,
            Some(SecurityVersion(1)),
            "nothing of the fenced flush was committed"
        );
    }

    #[test]
    fn a_store_without_a_lease_is_unfenced_and_sled_has_no_fence() {
        let mut b = PgBackend::new();
        let at = b.fresh();
        let s = Store::create_at(&at, MasterKey::generate().unwrap()).unwrap();
        s.put_device(&device("dev-1", Some(1))).unwrap();
        s.flush().unwrap();
        let mut sled = SledBackend::new();
        let s = Store::create_at(&sled.fresh(), MasterKey::generate().unwrap()).unwrap();
        assert!(s.lease_fence().is_none());
    }
}
