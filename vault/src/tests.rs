//! Unit tests of the sealed file format, key slots, unlock parsing and STREAM. Real AES-GCM
//! and real Argon2id; recovery keys wherever the KDF is not what is tested, to stay fast.

use std::io::{Read, Write};

use super::*;
use crate::keys::KdfParams;
use crate::stream::{StreamReader, StreamWriter};

fn recovery() -> (RecoveryKey, Protection) {
    let k = RecoveryKey::generate().unwrap();
    (k.clone(), Protection::recovery_key(k))
}

#[test]
fn a_sealed_file_opens_with_its_recovery_key_and_is_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    let (k, p) = recovery();
    seal_file(&path, b"the secret", &p, false).unwrap();
    let opened = open_file(&path, &Unlock::RecoveryKey(k)).unwrap();
    assert_eq!(opened.as_slice(), b"the secret");
    let raw = std::fs::read(&path).unwrap();
    assert!(!raw.windows(10).any(|w| w == b"the secret"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[test]
fn a_sealed_file_opens_with_its_passphrase_or_its_recovery_key_and_refuses_a_wrong_one() {
    // The one test that pays for Argon2id (twice: right and wrong passphrase).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    let k = RecoveryKey::generate().unwrap();
    let p = Protection::passphrase(Passphrase::new("correct horse battery"))
        .and_recovery_key(k.clone());
    seal_file(&path, b"payload", &p, false).unwrap();
    let before = std::fs::read(&path).unwrap();
    let by_pass = open_file(
        &path,
        &Unlock::Passphrase(Passphrase::new("correct horse battery")),
    )
    .unwrap();
    assert_eq!(by_pass.as_slice(), b"payload");
    assert_eq!(
        open_file(&path, &Unlock::RecoveryKey(k))
            .unwrap()
            .as_slice(),
        b"payload"
    );
    let err = open_file(
        &path,
        &Unlock::Passphrase(Passphrase::new("wrong horse battery")),
    )
    .unwrap_err();
    assert!(matches!(err, VaultError::WrongSecret), "{err}");
    assert_eq!(err.to_string(), "wrong passphrase or recovery key");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "a failed open changes nothing"
    );
}

#[test]
fn a_wrong_recovery_key_is_refused_with_a_clear_error_and_the_file_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    let (_, p) = recovery();
    seal_file(&path, b"payload", &p, false).unwrap();
    let before = std::fs::read(&path).unwrap();
    let other = RecoveryKey::generate().unwrap();
    let err = open_file(&path, &Unlock::RecoveryKey(other)).unwrap_err();
    assert_eq!(err.to_string(), "wrong passphrase or recovery key");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn a_passphrase_cannot_open_a_recovery_key_only_file() {
    let (_, p) = recovery();
    let sealed = seal(b"x", &p).unwrap();
    let err = open_sealed(&sealed, &Unlock::Passphrase(Passphrase::new("whatever1"))).unwrap_err();
    assert!(matches!(err, VaultError::NoSlot("passphrase", _)), "{err}");
}

#[test]
fn files_with_kdf_parameters_below_rfc9106_are_refused_before_any_derivation() {
    for weak in [
        KdfParams {
            m_kib: 32 * 1024,
            t: 3,
            p: 4,
        },
        KdfParams {
            m_kib: 64 * 1024,
            t: 2,
            p: 4,
        },
        KdfParams {
            m_kib: 64 * 1024,
            t: 3,
            p: 1,
        },
        KdfParams {
            m_kib: 8,
            t: 1,
            p: 1,
        },
    ] {
        let mut p = Protection::passphrase(Passphrase::new("weak but valid"));
        p.kdf = weak;
        let sealed = seal(b"x", &p).unwrap();
        let err = open_sealed(
            &sealed,
            &Unlock::Passphrase(Passphrase::new("weak but valid")),
        )
        .unwrap_err();
        assert!(matches!(err, VaultError::WeakKdf(k) if k == weak), "{err}");
        assert!(err.to_string().contains("m=65536 KiB, t=3, p=4"), "{err}");
    }
}

#[test]
fn absurd_kdf_parameters_are_refused() {
    let huge = KdfParams {
        m_kib: u32::MAX,
        t: 3,
        p: 4,
    };
    assert!(matches!(huge.check(), Err(VaultError::KdfOutOfRange(_))));
    assert!(KdfParams::MIN.check().is_ok());
}

#[test]
fn every_flipped_byte_of_a_sealed_file_is_refused() {
    let (k, p) = recovery();
    let sealed = seal(b"some secret bytes", &p).unwrap();
    let unlock = Unlock::RecoveryKey(k);
    for i in 0..sealed.len() {
        let mut t = sealed.clone();
        t[i] ^= 0x01;
        assert!(
            open_sealed(&t, &unlock).is_err(),
            "flip at {i} went unnoticed"
        );
    }
    // Header bytes get a precise error rather than "wrong key".
    let mut t = sealed.clone();
    t[12] ^= 0x01; // inside the recovery slot's wrapped key
    assert!(matches!(
        open_sealed(&t, &unlock),
        Err(VaultError::HeaderDamaged)
    ));
    let mut t = sealed.clone();
    let last = t.len() - 1;
    t[last] ^= 0x01;
    assert!(matches!(
        open_sealed(&t, &unlock),
        Err(VaultError::Tampered)
    ));
    for cut in [0, 5, 20, sealed.len() - 1] {
        assert!(open_sealed(&sealed[..cut], &unlock).is_err());
    }
}

#[test]
fn a_key_in_clear_is_not_a_sealed_file() {
    let (k, _) = recovery();
    let err = open_sealed(b"-----BEGIN PRIVATE KEY-----", &Unlock::RecoveryKey(k)).unwrap_err();
    assert!(matches!(err, VaultError::NotSealed));
}

#[test]
fn seal_file_without_replace_leaves_an_existing_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    let (_, p) = recovery();
    seal_file(&path, b"one", &p, false).unwrap();
    let before = std::fs::read(&path).unwrap();
    assert!(seal_file(&path, b"two", &p, false).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    seal_file(&path, b"two", &p, true).unwrap();
    assert_ne!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn unlock_text_of_64_hex_digits_is_a_recovery_key_and_anything_else_a_passphrase() {
    let k = RecoveryKey::generate().unwrap();
    let hex = format!("{}\n", k.to_hex().as_str());
    assert!(matches!(Unlock::parse(&hex), Ok(Unlock::RecoveryKey(r)) if r == k));
    assert!(matches!(
        Unlock::parse(&hex.to_uppercase()),
        Ok(Unlock::RecoveryKey(_))
    ));
    match Unlock::parse("my pass phrase\n").unwrap() {
        Unlock::Passphrase(p) => assert_eq!(p, Passphrase::new("my pass phrase")),
        Unlock::RecoveryKey(_) => panic!("a passphrase"),
    }
    // 63 hex digits is a (poor) passphrase, not a malformed key.
    assert!(matches!(
        Unlock::parse(&hex[..63]),
        Ok(Unlock::Passphrase(_))
    ));
    assert!(Unlock::parse("\n").is_err());
    assert!(Passphrase::new("short").check_new().is_err());
}

#[test]
fn master_key_blobs_open_only_under_their_key_and_context() {
    let k = MasterKey::generate().unwrap();
    let blob = k.seal(b"release fw-1", b"content key").unwrap();
    assert_eq!(
        k.open(b"release fw-1", &blob).unwrap().as_slice(),
        b"content key"
    );
    assert!(k.open(b"release fw-2", &blob).is_err());
    assert!(MasterKey::generate()
        .unwrap()
        .open(b"release fw-1", &blob)
        .is_err());
}

fn encrypt(key: &MasterKey, data: &[u8], seg: usize) -> Vec<u8> {
    let mut w = StreamWriter::new(key, [7; 7], b"hdr".to_vec(), seg, Vec::new());
    // Uneven writes exercise the buffering.
    for part in data.chunks(37) {
        w.write_all(part).unwrap();
    }
    w.finish().unwrap()
}

fn decrypt(key: &MasterKey, data: &[u8], seg: usize) -> Result<Vec<u8>, VaultError> {
    let mut r = StreamReader::new(key, [7; 7], b"hdr".to_vec(), seg, data);
    let mut out = Vec::new();
    r.read_to_end(&mut out)
        .map_err(|e| match stream::vault_error(&e) {
            Some(VaultError::Truncated) => VaultError::Truncated,
            Some(VaultError::SegmentAuth(i)) => VaultError::SegmentAuth(*i),
            _ => VaultError::Malformed("other"),
        })?;
    Ok(out)
}

#[test]
fn stream_round_trips_at_and_around_segment_boundaries() {
    let key = MasterKey::generate().unwrap();
    for len in [0, 1, 99, 100, 101, 250, 300, 1000] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let ct = encrypt(&key, &data, 100);
        assert_eq!(decrypt(&key, &ct, 100).unwrap(), data, "len {len}");
    }
}

#[test]
fn stream_refuses_truncation_reordering_tampering_and_another_header() {
    let key = MasterKey::generate().unwrap();
    let data: Vec<u8> = (0..350u32).map(|i| i as u8).collect();
    let ct = encrypt(&key, &data, 100); // segments: 116, 116, 116, 66 bytes
    let seg = 116;
    // Cut at a segment boundary: the new last segment was sealed as a middle one.
    for cut in [seg, 2 * seg, 3 * seg] {
        assert!(
            matches!(decrypt(&key, &ct[..cut], 100), Err(VaultError::Truncated)),
            "cut {cut}"
        );
    }
    for cut in [0, 10, seg + 50, ct.len() - 1] {
        assert!(decrypt(&key, &ct[..cut], 100).is_err(), "cut {cut}");
    }
    let mut swapped = ct.clone();
    swapped[..seg].copy_from_slice(&ct[seg..2 * seg]);
    swapped[seg..2 * seg].copy_from_slice(&ct[..seg]);
    assert!(matches!(
        decrypt(&key, &swapped, 100),
        Err(VaultError::SegmentAuth(0))
    ));
    let mut flipped = ct.clone();
    flipped[2 * seg + 3] ^= 0x80;
    assert!(matches!(
        decrypt(&key, &flipped, 100),
        Err(VaultError::SegmentAuth(2))
    ));
    let mut longer = ct.clone();
    longer.push(0);
    assert!(decrypt(&key, &longer, 100).is_err());
    let mut r = StreamReader::new(&key, [7; 7], b"other".to_vec(), 100, ct.as_slice());
    assert!(r.read_to_end(&mut Vec::new()).is_err());
}
