//! Unit tests of the slots: the slot table's moves, both flashes reading back what was
//! written, and the digests a file slot takes as it is written (by itself or from a shared
//! hash chain) against what it holds.

use super::*;

#[test]
fn install_reboot_and_confirm_moves_the_running_slot() {
    let mut t = SlotTable::factory("1.0", SecurityVersion(1));
    assert_eq!(t.update_slot(), SlotId::B);
    t.install_update("2.0", SecurityVersion(2));
    assert_eq!(t.boot_slot(), SlotId::B);
    assert_eq!(t.running_slot(), SlotId::A);
    t.reboot();
    assert_eq!(t.running_meta().state, SlotState::Unverified);
    assert!(t.has_valid_slot(), "the old slot stays as fallback");
    t.mark_running_slot_valid();
    assert_eq!(t.running_meta().version.as_deref(), Some("2.0"));
    assert_eq!(t.update_slot(), SlotId::A);
}

#[test]
fn roll_back_boots_the_old_slot_and_invalidates_the_new() {
    let mut t = SlotTable::factory("1.0", SecurityVersion(1));
    t.install_update("2.0", SecurityVersion(2));
    t.reboot();
    t.roll_back();
    assert_eq!(t.running_slot(), SlotId::A);
    assert_eq!(t.boot_slot(), SlotId::A);
    assert_eq!(t.meta(SlotId::B).state, SlotState::Invalid);
    assert_eq!(t.running_meta().state, SlotState::Valid);
}

#[test]
fn power_on_boots_an_installed_image_that_never_ran() {
    let mut t = SlotTable::factory("1.0", SecurityVersion(1));
    t.install_update("2.0", SecurityVersion(2));
    assert_eq!(t.power_on(1), PowerOn::BootedUpdate);
    assert_eq!(t.running_slot(), SlotId::B);
    assert_eq!(t.running_meta().state, SlotState::Unverified);
    assert!(t.has_valid_slot());
}

#[test]
fn power_on_falls_back_from_an_image_that_booted_but_never_confirmed() {
    let mut t = SlotTable::factory("1.0", SecurityVersion(1));
    t.install_update("2.0", SecurityVersion(2));
    t.reboot();
    assert_eq!(t.power_on(1), PowerOn::FellBack);
    assert_eq!((t.running_slot(), t.boot_slot()), (SlotId::A, SlotId::A));
    assert_eq!(t.meta(SlotId::B).state, SlotState::Invalid);
    assert_eq!(t.power_on(1), PowerOn::Unchanged, "stable from then on");
}

#[test]
fn an_unconfirmed_image_gets_its_boot_limit_then_falls_back() {
    let mut t = SlotTable::factory("1.0", SecurityVersion(1));
    t.install_update("2.0", SecurityVersion(2));
    t.reboot();
    assert_eq!(t.power_on(3), PowerOn::BootedAgain);
    assert_eq!(t.power_on(3), PowerOn::BootedAgain);
    assert_eq!(t.running_meta().boot_attempts, 3);
    assert_eq!(t.power_on(3), PowerOn::FellBack);
    assert_eq!(t.running_meta().version.as_deref(), Some("1.0"));
    assert!(t.has_valid_slot());
}

#[test]
fn power_on_keeps_a_confirmed_image() {
    let mut t = SlotTable::factory("1.0", SecurityVersion(1));
    assert_eq!(t.power_on(3), PowerOn::Unchanged);
    t.install_update("2.0", SecurityVersion(2));
    t.reboot();
    t.mark_running_slot_valid();
    assert_eq!(t.power_on(3), PowerOn::Unchanged);
    assert_eq!(t.running_meta().version.as_deref(), Some("2.0"));
}

fn exercise(flash: &mut dyn Flash) {
    flash.begin_update(SlotId::B, 100).unwrap();
    flash.write(SlotId::B, 10, b"hello").unwrap();
    let mut buf = [9u8; 20];
    flash.read(SlotId::B, 5, &mut buf).unwrap();
    assert_eq!(&buf[..5], &[0; 5]);
    assert_eq!(&buf[5..10], b"hello");
    assert_eq!(&buf[10..], &[0; 10]);
    assert!(flash.write(SlotId::B, 98, b"abc").is_err());
    assert!(flash.write(SlotId::A, u64::MAX, b"a").is_err());
    let mut a = [1u8; 4];
    flash.read(SlotId::A, 0, &mut a).unwrap();
    assert_eq!(a, [0; 4], "slot A untouched");
}

#[test]
fn memory_flash_reads_back_what_was_written() {
    exercise(&mut MemoryFlash::new(100));
}

#[test]
fn file_flash_reads_back_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = FileFlash::open(&dir.path().join("slots.bin"), 100);
    exercise(&mut f);
}

/// The digest taken while writing is the digest of what the slot holds, whatever the order
/// of the writes: in order (taken as written), out of order, or with a part written again
/// (both read back).
#[test]
fn file_flash_digest_is_the_digest_of_what_the_slot_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = FileFlash::open(&dir.path().join("slots.bin"), 64);
    let image: Vec<u8> = (0..40u8).collect();
    let sha = |b: &[u8]| -> [u8; 32] { Sha256::digest(b).into() };
    let mut mem = MemoryFlash::new(64);

    f.begin_update(SlotId::B, 40).unwrap();
    for part in image.chunks(16).enumerate() {
        f.write(SlotId::B, 16 * part.0 as u64, part.1).unwrap();
    }
    assert!(
        f.stream.is_some(),
        "written front to back: no read back needed"
    );
    assert_eq!(f.digest(SlotId::B, 40).unwrap(), sha(&image));
    assert_eq!(mem.digest(SlotId::B, 40).unwrap(), sha(&[0; 40]));

    // Written again after a power loss, with other bytes: the read back sees them.
    f.write(SlotId::B, 16, &[0xee; 16]).unwrap();
    assert!(f.stream.is_none());
    let mut changed = image.clone();
    changed[16..32].fill(0xee);
    assert_eq!(f.digest(SlotId::B, 40).unwrap(), sha(&changed));

    // Out of order.
    f.begin_update(SlotId::A, 40).unwrap();
    f.write(SlotId::A, 16, &image[16..32]).unwrap();
    f.write(SlotId::A, 0, &image[..16]).unwrap();
    f.write(SlotId::A, 32, &image[32..]).unwrap();
    assert_eq!(f.digest(SlotId::A, 40).unwrap(), sha(&image));
    // A shorter length than was streamed reads back too.
    f.begin_update(SlotId::B, 40).unwrap();
    f.write(SlotId::B, 0, &image).unwrap();
    assert_eq!(f.digest(SlotId::B, 16).unwrap(), sha(&image[..16]));
}

/// Two slots written with the same chunks vouched for by one chain: the second takes the
/// states the first recorded, and both digests are the image's. A chunk vouched for out of
/// order, by another chain, or written plainly in between, is hashed and still counts.
#[test]
fn file_flash_digest_from_a_hash_chain_is_the_digest_of_what_the_slot_holds() {
    let dir = tempfile::tempdir().unwrap();
    let image: Vec<u8> = (0..40u8).collect();
    let sha = |b: &[u8]| -> [u8; 32] { Sha256::digest(b).into() };
    let chain = Arc::new(HashChain::default());
    let known = |index: u32| Known {
        chain: &chain,
        index,
    };
    fn write_all<'a>(f: &mut FileFlash, image: &[u8], vouch: &dyn Fn(u32) -> Option<Known<'a>>) {
        f.begin_update(SlotId::B, 40).unwrap();
        for (i, part) in image.chunks(16).enumerate() {
            let at = 16 * i as u64;
            match vouch(i as u32) {
                Some(k) => f.write_known(SlotId::B, at, part, &k).unwrap(),
                None => f.write(SlotId::B, at, part).unwrap(),
            }
        }
    }
    for n in 0..2 {
        let mut f = FileFlash::open(&dir.path().join(format!("slots-{n}.bin")), 64);
        write_all(&mut f, &image, &|i| Some(known(i)));
        assert!(matches!(
            f.stream.as_ref().map(|s| &s.hash),
            Some(StreamHash::Chain(_, 3))
        ));
        assert_eq!(f.digest(SlotId::B, 40).unwrap(), sha(&image), "device {n}");
    }
    assert_eq!(chain.states.lock().unwrap().len(), 3, "recorded once");

    // Chunk 1 written plainly: hashed from the chain's state after chunk 0.
    let mut f = FileFlash::open(&dir.path().join("plain.bin"), 64);
    write_all(&mut f, &image, &|i| (i != 1).then(|| known(i)));
    assert!(matches!(
        f.stream.as_ref().map(|s| &s.hash),
        Some(StreamHash::Own(_))
    ));
    assert_eq!(f.digest(SlotId::B, 40).unwrap(), sha(&image));

    // Another chain, or the wrong index, from the second chunk on.
    let stranger = Arc::new(HashChain::default());
    let mut f = FileFlash::open(&dir.path().join("stranger.bin"), 64);
    write_all(&mut f, &image, &|i| match i {
        0 => Some(known(0)),
        1 => Some(Known {
            chain: &stranger,
            index: 1,
        }),
        _ => Some(known(1)),
    });
    assert_eq!(f.digest(SlotId::B, 40).unwrap(), sha(&image));
    assert!(stranger.states.lock().unwrap().is_empty());

    // A chunk written again after a power loss, vouched for: the slot is read back.
    f.write_known(SlotId::B, 16, &[0xee; 16], &known(1))
        .unwrap();
    let mut changed = image.clone();
    changed[16..32].fill(0xee);
    assert_eq!(f.digest(SlotId::B, 40).unwrap(), sha(&changed));
}
