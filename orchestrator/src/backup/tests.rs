//! Unit tests of backups: real data directories (`ops::init`), real sled stores, real crypto.
//! Recovery keys everywhere except the one test of the passphrase (Argon2id) path.

use std::collections::BTreeMap;

use aloft_proto::{CampaignId, DeviceId, DeviceState, SecurityVersion};
use aloft_vault::{Passphrase, RecoveryKey};

use super::*;
use crate::fleet::state::Progress;
use crate::store::{DeviceRecord, Store};

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    data_dir: PathBuf,
    /// The data directory's own secret (not the backups').
    data_unlock: Unlock,
}

fn fixture() -> Fixture {
    aloft_certs::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let data_dir = root.join("data");
    let rk = RecoveryKey::generate().unwrap();
    crate::ops::init(
        &data_dir,
        "Test CA",
        &["localhost".into()],
        &Protection::recovery_key(rk.clone()),
    )
    .unwrap();
    Fixture {
        _tmp: tmp,
        root,
        data_dir,
        data_unlock: Unlock::RecoveryKey(rk),
    }
}

fn open_store(f: &Fixture, dir: &Path) -> Store {
    let key = crate::ops::open_keystore(dir, &f.data_unlock).unwrap();
    Store::open(&dir.join(layout::STORE_DIR), key).unwrap()
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

fn progress(state: DeviceState, last_seq: u32) -> Progress {
    let mut p = Progress::new(5);
    p.state = state;
    p.last_seq = last_seq;
    p
}

/// Fills the store: two devices, a progress record, and ~200 KiB of chunks so the backup spans
/// several 64 KiB segments.
fn populate(f: &Fixture) {
    let s = open_store(f, &f.data_dir);
    s.put_device(&device("dev-1", Some(3))).unwrap();
    s.put_device(&device("dev-2", None)).unwrap();
    let c = CampaignId::new("c-1").unwrap();
    s.put_progress(
        &c,
        &DeviceId::new("dev-1").unwrap(),
        &progress(DeviceState::Downloading, 4),
    )
    .unwrap();
    let a = aloft_proto::ArtifactId::new("fw-1").unwrap();
    for i in 0..13u32 {
        let chunk: Vec<u8> = (0..16 * 1024)
            .map(|j| (i as usize * 31 + j) as u8)
            .collect();
        s.put_chunk(&a, i, &chunk).unwrap();
    }
    s.flush().unwrap();
    std::fs::create_dir_all(f.data_dir.join(layout::TRUST_DIR)).unwrap();
    std::fs::write(
        f.data_dir.join(layout::TRUST_DIR).join("root-1.json"),
        "v1\n",
    )
    .unwrap();
}

fn recovery_protection() -> (Protection, Unlock) {
    let k = RecoveryKey::generate().unwrap();
    (Protection::recovery_key(k.clone()), Unlock::RecoveryKey(k))
}

/// Every file (bytes) and every store record of a data directory, to compare two of them.
fn snapshot(dir: &Path) -> (BTreeMap<String, Vec<u8>>, Vec<RawRecord>) {
    let mut files = BTreeMap::new();
    if dir.exists() {
        for rel in data_files(dir).unwrap() {
            files.insert(
                rel_to_string(&rel).unwrap(),
                std::fs::read(dir.join(&rel)).unwrap(),
            );
        }
    }
    let mut records = Vec::new();
    let store = dir.join(layout::STORE_DIR);
    if store.exists() {
        RawStore::open(&store)
            .unwrap()
            .export(|r| {
                records.push(r);
                Ok::<(), StoreError>(())
            })
            .unwrap();
    }
    // sled lists its trees in hash-map order, which differs between two databases holding the
    // same trees: compare records, not the order an export happens to visit them in.
    records.sort_by(|a, b| (&a.tree, &a.key).cmp(&(&b.tree, &b.key)));
    (files, records)
}

#[test]
fn a_backup_restored_into_a_fresh_directory_has_every_file_and_record() {
    let f = fixture();
    populate(&f);
    let out = f.root.join("b1.aloftbak");
    let (protection, unlock) = recovery_protection();
    let s = create(&f.data_dir, &out, &protection).unwrap();
    assert_eq!(s.seq, 1);
    assert!(s.bytes > 3 * SEGMENT_BYTES as u64, "spans several segments");
    let raw = std::fs::read(&out).unwrap();
    assert!(
        !raw.windows(8).any(|w| w == b"BEGIN CE"),
        "nothing in clear"
    );

    let fresh = f.root.join("restored");
    let r = restore(&out, &fresh, &unlock).unwrap();
    assert_eq!((r.seq, r.files, r.records), (1, s.files, s.records));
    assert!(r.previous.is_none());
    let (files_a, records_a) = snapshot(&f.data_dir);
    let (files_b, records_b) = snapshot(&fresh);
    assert_eq!(files_a, files_b);
    assert_eq!(records_a, records_b);
    // The restored store opens with the data directory's (not the backup's) secret.
    let store = open_store(&f, &fresh);
    assert_eq!(
        store
            .device(&DeviceId::new("dev-1").unwrap())
            .unwrap()
            .unwrap()
            .floor,
        Some(SecurityVersion(3))
    );
    assert_eq!(read_seq(&fresh).unwrap(), 1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out), 0o600);
        assert_eq!(mode(&fresh.join("pki").join("server.key")), 0o600);
        assert_eq!(mode(&fresh.join("pki")), 0o700);
    }
}

#[test]
fn backup_numbers_grow_and_the_header_tells_them_without_a_secret() {
    let f = fixture();
    let (p, _) = recovery_protection();
    create(&f.data_dir, &f.root.join("a"), &p).unwrap();
    create(&f.data_dir, &f.root.join("b"), &p).unwrap();
    assert_eq!(inspect(&f.root.join("b")).unwrap().seq, 2);
    assert!(matches!(
        create(&f.data_dir, &f.root.join("b"), &p),
        Err(BackupError::Exists(_))
    ));
}

#[test]
fn a_backup_of_a_running_orchestrators_store_is_refused() {
    let f = fixture();
    let _held = open_store(&f, &f.data_dir);
    let (p, _) = recovery_protection();
    let err = create(&f.data_dir, &f.root.join("x"), &p).unwrap_err();
    assert!(
        matches!(err, BackupError::Store(StoreError::Locked(_))),
        "{err}"
    );
    assert!(!f.root.join("x").exists());
}

/// Restores `bytes` as a backup into `target` and checks it is refused with nothing changed.
fn refused(f: &Fixture, bytes: &[u8], target: &Path, unlock: &Unlock) -> BackupError {
    let before = snapshot(target);
    let path = f.root.join("bad.aloftbak");
    std::fs::write(&path, bytes).unwrap();
    let err = restore(&path, target, unlock).unwrap_err();
    assert_eq!(
        snapshot(target),
        before,
        "a refused restore changed {}",
        target.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(target)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !leftovers
            .iter()
            .any(|n| n.to_string_lossy().starts_with(STAGING_PREFIX)),
        "staging left behind"
    );
    err
}

#[test]
fn truncated_backups_are_refused_at_every_cut_and_change_nothing() {
    let f = fixture();
    populate(&f);
    let out = f.root.join("b.aloftbak");
    let (p, unlock) = recovery_protection();
    create(&f.data_dir, &out, &p).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let header_len = inspect_len(&out);
    let seg = SEGMENT_BYTES + 16;
    let fresh = f.root.join("fresh");
    for cut in [
        0,
        10,
        header_len - 1,
        header_len,
        header_len + 100,
        header_len + seg, // exactly one whole segment: looks complete but is not final
        header_len + 2 * seg, // same at the next boundary
        header_len + 2 * seg + 7,
        bytes.len() - 1,
    ] {
        let err = refused(&f, &bytes[..cut], &fresh, &unlock);
        assert!(!fresh.exists(), "cut {cut}: a fresh target is not created");
        let msg = err.to_string();
        assert!(
            msg.contains("truncated")
                || msg.contains("not an aloft backup")
                || msg.contains("header"),
            "cut {cut}: {msg}"
        );
        // An existing data directory is left exactly as it was too.
        refused(&f, &bytes[..cut], &f.data_dir, &unlock);
    }
    let err = refused(&f, &bytes[..header_len + seg], &fresh, &unlock);
    assert!(
        matches!(err, BackupError::Vault(VaultError::Truncated)),
        "{err}"
    );
}

/// The header's length: the STREAM body starts after it.
fn inspect_len(path: &Path) -> usize {
    let mut f = BufReader::new(File::open(path).unwrap());
    read_header(&mut f, path).unwrap().bytes.len()
}

#[test]
fn flipped_bytes_in_header_or_body_and_reordered_segments_are_refused() {
    let f = fixture();
    populate(&f);
    let out = f.root.join("b.aloftbak");
    let (p, unlock) = recovery_protection();
    create(&f.data_dir, &out, &p).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let h = inspect_len(&out);
    let seg = SEGMENT_BYTES + 16;
    // Header: magic, format, time, sequence, segment size, nonce prefix, slot, digest.
    for at in [0, 9, 12, 20, 28, 31, 40, h - 1] {
        let mut t = bytes.clone();
        t[at] ^= 0x04;
        let err = refused(&f, &t, &f.data_dir, &unlock);
        assert!(
            matches!(
                err,
                BackupError::NotABackup
                    | BackupError::UnsupportedFormat(_)
                    | BackupError::HeaderDamaged
            ),
            "header byte {at}: {err}"
        );
    }
    for at in [h, h + seg + 5, bytes.len() - 1] {
        let mut t = bytes.clone();
        t[at] ^= 0x04;
        let err = refused(&f, &t, &f.data_dir, &unlock);
        assert!(
            matches!(err, BackupError::Vault(VaultError::SegmentAuth(_))),
            "body byte {at}: {err}"
        );
        assert!(err.to_string().contains("failed authentication"));
    }
    let mut swapped = bytes.clone();
    swapped[h..h + seg].copy_from_slice(&bytes[h + seg..h + 2 * seg]);
    swapped[h + seg..h + 2 * seg].copy_from_slice(&bytes[h..h + seg]);
    let err = refused(&f, &swapped, &f.data_dir, &unlock);
    assert!(
        matches!(err, BackupError::Vault(VaultError::SegmentAuth(0))),
        "{err}"
    );
    // A segment dropped from the middle.
    let mut dropped = bytes[..h + seg].to_vec();
    dropped.extend_from_slice(&bytes[h + 2 * seg..]);
    let err = refused(&f, &dropped, &f.data_dir, &unlock);
    assert!(
        matches!(err, BackupError::Vault(VaultError::SegmentAuth(1))),
        "{err}"
    );
}

#[test]
fn a_wrong_recovery_key_is_refused_and_changes_nothing() {
    let f = fixture();
    let out = f.root.join("b.aloftbak");
    let (p, _) = recovery_protection();
    create(&f.data_dir, &out, &p).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let err = refused(&f, &bytes, &f.data_dir, &f.data_unlock);
    assert_eq!(err.to_string(), "wrong passphrase or recovery key");
    let fresh = f.root.join("fresh");
    refused(&f, &bytes, &fresh, &f.data_unlock);
    assert!(!fresh.exists());
}

#[test]
fn a_passphrase_backup_opens_with_its_passphrase_or_recovery_key_and_refuses_a_wrong_one() {
    // The one backup test that pays for Argon2id (three derivations).
    let f = fixture();
    let out = f.root.join("b.aloftbak");
    let rk = RecoveryKey::generate().unwrap();
    let p =
        Protection::passphrase(Passphrase::new("backup passphrase")).and_recovery_key(rk.clone());
    create(&f.data_dir, &out, &p).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let wrong = Unlock::Passphrase(Passphrase::new("not the passphrase"));
    let err = refused(&f, &bytes, &f.data_dir, &wrong);
    assert_eq!(err.to_string(), "wrong passphrase or recovery key");
    restore(
        &out,
        &f.root.join("a"),
        &Unlock::Passphrase(Passphrase::new("backup passphrase")),
    )
    .unwrap();
    restore(&out, &f.root.join("b"), &Unlock::RecoveryKey(rk)).unwrap();
}

#[test]
fn restoring_an_old_backup_keeps_the_higher_floors_sequence_numbers_and_newer_crl() {
    aloft_certs::tls::install_crypto_provider();
    let f = fixture();
    populate(&f);
    let ca = crate::ops::load_ca(&f.data_dir.join("pki"), &f.data_unlock).unwrap();
    let crl_pem = |n: u64| {
        use base64::Engine as _;
        let der = ca.crl(&[], n, 30).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        format!("-----BEGIN X509 CRL-----\n{b64}\n-----END X509 CRL-----\n")
    };
    std::fs::write(f.data_dir.join(layout::CRL), crl_pem(1)).unwrap();
    std::fs::write(f.data_dir.join("root.json"), r#"{"signed":{"version":1}}"#).unwrap();
    let out = f.root.join("old.aloftbak");
    let (p, unlock) = recovery_protection();
    create(&f.data_dir, &out, &p).unwrap();

    // Life goes on after the backup: floors and sequence numbers rise, a device appears, a new
    // CRL and a new root are installed, a release key is distrusted.
    let c = CampaignId::new("c-1").unwrap();
    let d1 = DeviceId::new("dev-1").unwrap();
    {
        let s = open_store(&f, &f.data_dir);
        s.put_device(&DeviceRecord {
            installed_sequence: Some(42),
            ..device("dev-1", Some(7))
        })
        .unwrap();
        s.put_device(&device("dev-3", Some(2))).unwrap();
        s.put_progress(&c, &d1, &progress(DeviceState::Succeeded, 9))
            .unwrap();
        s.flush().unwrap();
    }
    std::fs::write(f.data_dir.join(layout::CRL), crl_pem(5)).unwrap();
    std::fs::write(f.data_dir.join("root.json"), r#"{"signed":{"version":2}}"#).unwrap();
    // A root the surviving directory accepted after the backup was taken.
    std::fs::write(
        f.data_dir.join(layout::TRUST_DIR).join("root-2.json"),
        "v2\n",
    )
    .unwrap();

    let r = restore(&out, &f.data_dir, &unlock).unwrap();
    assert_eq!(r.merged.floors_raised, 1);
    assert_eq!(r.merged.devices_added, 1);
    assert_eq!(r.merged.progress_kept, 1);
    assert!(r.previous.as_ref().is_some_and(|p| p.exists()));
    let s = open_store(&f, &f.data_dir);
    assert_eq!(
        s.device(&d1).unwrap().unwrap().floor,
        Some(SecurityVersion(7))
    );
    assert_eq!(s.device(&d1).unwrap().unwrap().installed_sequence, Some(42));
    assert_eq!(
        s.device(&DeviceId::new("dev-3").unwrap())
            .unwrap()
            .unwrap()
            .floor,
        Some(SecurityVersion(2))
    );
    let p = s.progress(&c, &d1).unwrap().unwrap();
    assert_eq!((p.state, p.last_seq), (DeviceState::Succeeded, 9));
    let crl = std::fs::read_to_string(f.data_dir.join(layout::CRL)).unwrap();
    assert_eq!(crl, crl_pem_number_check(&crl, 5));
    assert!(std::fs::read_to_string(f.data_dir.join("root.json"))
        .unwrap()
        .contains("\"version\":2"));
    let trust = f.data_dir.join(layout::TRUST_DIR);
    assert_eq!(
        std::fs::read_to_string(trust.join("root-1.json")).unwrap(),
        "v1\n"
    );
    assert_eq!(
        std::fs::read_to_string(trust.join("root-2.json")).unwrap(),
        "v2\n",
        "a root accepted after the backup survives the restore"
    );
    // The chunks the backup holds are back.
    assert_eq!(
        s.chunk_count_stored(&aloft_proto::ArtifactId::new("fw-1").unwrap()),
        13
    );
}

/// Returns `pem` after checking its CRL number is `n`.
fn crl_pem_number_check(pem: &str, n: u8) -> String {
    assert_eq!(aloft_certs::crl_number(pem).unwrap(), Some(vec![n]));
    pem.to_owned()
}

#[test]
fn paths_that_leave_the_data_directory_are_refused() {
    for bad in ["../x", "/etc/passwd", "store/db", "", "a/../../b"] {
        assert!(safe_rel(bad).is_err(), "{bad}");
    }
    assert!(safe_rel("pki/ca.key").is_ok());
}

#[test]
fn restoring_an_old_backup_keeps_certificates_issued_and_revoked_since() {
    use aloft_certs::ledger::{self, CaDirLock, Issued};
    use aloft_certs::revocation::{RevocationReason, RevocationState, Revoked};
    let f = fixture();
    populate(&f);
    let pki = f.data_dir.join(layout::PKI_DIR);
    let issued = |serial: &str| Issued {
        device: DeviceId::new("dev-9").unwrap(),
        serial: serial.into(),
        not_after: 1,
    };
    let revoked = |serial: &str| Revoked {
        serial: serial.into(),
        reason: RevocationReason::KeyCompromise,
        revoked_at: 1,
        subject: None,
    };
    ledger::append(&pki, &[issued("0a")], &CaDirLock::acquire(&pki).unwrap()).unwrap();
    RevocationState {
        crl_number: 1,
        revoked: vec![revoked("0c")],
        ..RevocationState::default()
    }
    .save(&pki)
    .unwrap();
    let out = f.root.join("old.aloftbak");
    let (p, unlock) = recovery_protection();
    create(&f.data_dir, &out, &p).unwrap();

    // After the backup: the device renews (a second certificate), then both are revoked and a
    // CRL numbered 3 is signed.
    ledger::append(&pki, &[issued("0b")], &CaDirLock::acquire(&pki).unwrap()).unwrap();
    RevocationState {
        crl_number: 3,
        revoked: vec![revoked("0a"), revoked("0b")],
        ..RevocationState::default()
    }
    .save(&pki)
    .unwrap();

    let r = restore(&out, &f.data_dir, &unlock).unwrap();
    assert!(r.kept_surviving.iter().any(|k| k.contains("issued.jsonl")));
    let serials = ledger::serials_of(&pki, &DeviceId::new("dev-9").unwrap()).unwrap();
    assert_eq!(
        serials,
        vec![vec![0x0a], vec![0x0b]],
        "the renewed certificate stays known"
    );
    let state = RevocationState::load(&pki).unwrap();
    assert_eq!(
        state.crl_number, 3,
        "the next CRL is numbered above the last one signed"
    );
    let mut serials: Vec<_> = state.revoked.iter().map(|r| r.serial.as_str()).collect();
    serials.sort();
    assert_eq!(
        serials,
        ["0a", "0b", "0c"],
        "a restore never un-revokes a certificate"
    );
}

/// The same guarantees with the store in PostgreSQL (a throwaway cluster): a backup of a
/// running store is refused, a restore keeps the surviving higher floors, sequence numbers and
/// longer audit log, keeps the database's previous records aside, and a fresh database (the
/// data directory and the database both lost) is restored whole.
#[test]
fn a_postgresql_store_is_backed_up_and_restored_without_lowering_security_state() {
    use crate::store::pg_cluster::TempCluster;
    use crate::store::{AuditEvent, StoreLocation};
    aloft_certs::tls::install_crypto_provider();
    let cluster = TempCluster::start().unwrap();
    let at = StoreLocation::Postgres(cluster.create_database("backup").unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let rk = RecoveryKey::generate().unwrap();
    crate::ops::init_at(
        &data_dir,
        &at,
        "Test CA",
        &["localhost".into()],
        &Protection::recovery_key(rk.clone()),
    )
    .unwrap();
    assert!(!data_dir.join(layout::STORE_DIR).exists());
    let data_unlock = Unlock::RecoveryKey(rk);
    let key = crate::ops::open_keystore(&data_dir, &data_unlock).unwrap();
    let c = CampaignId::new("c-1").unwrap();
    let d1 = DeviceId::new("dev-1").unwrap();
    let audit = |s: &Store, what: &str| {
        let e = AuditEvent {
            actor: "ops".into(),
            action: what.into(),
            subject: "c-1".into(),
            outcome: "ok".into(),
        };
        s.append_audit(e, 1).unwrap();
    };
    {
        let s = Store::open_at(&at, key.clone()).unwrap();
        s.put_device(&device("dev-1", Some(3))).unwrap();
        s.put_progress(&c, &d1, &progress(DeviceState::Downloading, 4))
            .unwrap();
        audit(&s, "campaign_create");
        s.flush().unwrap();
        // A running orchestrator's database is refused, as its sled directory is.
        let err = create_at(
            &data_dir,
            &at,
            &tmp.path().join("x"),
            &recovery_protection().0,
        )
        .unwrap_err();
        assert!(
            matches!(err, BackupError::Store(StoreError::DatabaseInUse(_))),
            "{err}"
        );
    }
    let out = tmp.path().join("pg.aloftbak");
    let (p, unlock) = recovery_protection();
    let summary = create_at(&data_dir, &at, &out, &p).unwrap();
    // The key check, a device, a progress record, its history entry and an audit entry.
    assert_eq!(summary.records, 5);

    {
        let s = Store::open_at(&at, key.clone()).unwrap();
        s.put_device(&device("dev-1", Some(7))).unwrap();
        s.put_progress(&c, &d1, &progress(DeviceState::Succeeded, 9))
            .unwrap();
        audit(&s, "campaign_pause");
        s.flush().unwrap();
    }
    let r = restore_at(&out, &data_dir, &at, &unlock).unwrap();
    assert_eq!(
        (
            r.merged.floors_raised,
            r.merged.progress_kept,
            r.merged.audit_entries_kept
        ),
        (1, 1, 2)
    );
    assert!(!data_dir.join(layout::STORE_DIR).exists());
    let previous = r.previous_store.expect("the database's previous records");
    let aside = RawStore::open(&previous.join(layout::STORE_DIR)).unwrap();
    assert_eq!(
        aside.device(&d1).unwrap().unwrap().floor,
        Some(SecurityVersion(7))
    );
    drop(aside);
    {
        let key = crate::ops::open_keystore(&data_dir, &data_unlock).unwrap();
        let s = Store::open_at(&at, key).unwrap();
        assert_eq!(
            s.device(&d1).unwrap().unwrap().floor,
            Some(SecurityVersion(7))
        );
        let p = s.progress(&c, &d1).unwrap().unwrap();
        assert_eq!((p.state, p.last_seq), (DeviceState::Succeeded, 9));
        assert_eq!(s.verify_audit().unwrap(), Ok(2));
    }

    // Disaster recovery: a new machine, a new empty database.
    let fresh = StoreLocation::Postgres(cluster.create_database("fresh").unwrap());
    let new_dir = tmp.path().join("new");
    let r = restore_at(&out, &new_dir, &fresh, &unlock).unwrap();
    assert_eq!(r.records, 5);
    assert!(r.previous_store.is_none());
    let key = crate::ops::open_keystore(&new_dir, &data_unlock).unwrap();
    let s = Store::open_at(&fresh, key).unwrap();
    assert_eq!(
        s.device(&d1).unwrap().unwrap().floor,
        Some(SecurityVersion(3))
    );
    assert_eq!(s.verify_audit().unwrap(), Ok(1));
}
