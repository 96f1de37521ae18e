//! Where a simulated fleet keeps its devices' records and firmware slots: a few files shared by
//! all devices, each device at a fixed place, instead of two files per device.
//!
//! Why: a device creates its files when it accepts its first job, so a campaign's start created
//! 20,000 files in one directory at 10,000 devices. ext4's inode allocation under its locks
//! (`find_inode_bit`, `rwsem_spin_on_owner`) was about 60% of the simulator's CPU while the jobs
//! were delivered (docs/BENCHMARKS.md). Writing at an offset of a file that exists costs none
//! of that.
//!
//! Layout, in the simulator's state directory:
//! - `fleet.index`: which place each device id has, kept across runs (a device keeps its place
//!   when others join or leave), and the bytes each device's slots take;
//! - `records-NNNN.bin`, `slots-NNNN.bin` and `slotmaps-NNNN.bin`: [`DEVICES_PER_FILE`] places
//!   each (a bound on one file's size and extent tree), sparse, so only what was written takes
//!   disk;
//! - `images/`: each image the fleet's devices downloaded, stored once; a slot's map names the
//!   chunks of it that the slot holds (`slots::images` says why).
//!
//! A device whose own files an older simulator left (`{id}.rec`, `{id}.json`, `{id}.slots`)
//! keeps using them, so a campaign that began under that simulator goes on where it was.
//!
//! The slot files' pages are let go soon after they are written ([`FleetFiles::trim_slots`]).
//! A real device's image goes to its own flash; a simulator's 10,000 images went into the page
//! cache of one machine, 10 GiB for a 1 MiB campaign. On a virtual machine whose freed memory
//! goes back to the host, every new page-cache page is fresh memory that the host must fault
//! in: copying the images into the cache took a quarter of all CPU of a 10,000-device campaign
//! (`copy_folio_from_iter_atomic`, docs/BENCHMARKS.md). Pages dropped once on disk are reused
//! for the next images instead.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::slots::{FileFlash, Flash, ImageStore, SlotRefs, MAP_STRIDE};
use crate::store::{DeviceStore, RecordFileStore, RECORD_BYTES};

/// Devices per shared file.
pub const DEVICES_PER_FILE: u64 = 1024;

/// The least a device's slots take in a slot file: room for two 64 MiB slots (the simulator's
/// default), so a state directory made by a run with small slots (the bench's first fleet)
/// serves a later run with the default ones.
pub const MIN_SLOT_STRIDE: u64 = 128 * 1024 * 1024;

/// How often the slot files' written pages are handed to the disk and, once there, dropped
/// from memory: what a campaign writes in about two of these stays cached.
pub const TRIM_INTERVAL: Duration = Duration::from_millis(250);

const INDEX: &str = "fleet.index";
/// The directory of the fleet's stored images (`slots::images`).
const IMAGES: &str = "images";
const INDEX_MAGIC: &str = "aloft-sim-fleet 1";

/// The fleet's shared files, opened for the devices given to [`FleetFiles::open`].
pub struct FleetFiles {
    dir: PathBuf,
    /// Each device's place, in the order it was first given one.
    places: HashMap<String, u64>,
    /// Bytes a device's two slots take in a slot file.
    slot_stride: u64,
    /// Names in the directory at open, to find what an older simulator left.
    names: HashSet<OsString>,
    records: Vec<(Arc<File>, PathBuf)>,
    slots: Vec<(Arc<File>, PathBuf)>,
    /// Which stored image's chunks each slot holds (`slots::images`).
    slot_maps: Vec<(Arc<File>, PathBuf)>,
    images: Arc<ImageStore>,
    sync: bool,
}

impl FleetFiles {
    /// Opens (creating what is missing) the shared files of `dir` for `ids`, each slot of
    /// `slot_capacity` bytes. New ids get the next free places, recorded in the index before any
    /// device runs.
    pub fn open<'a>(
        dir: &Path,
        ids: impl IntoIterator<Item = &'a str>,
        slot_capacity: u64,
        sync: bool,
    ) -> anyhow::Result<Self> {
        let index_path = dir.join(INDEX);
        let (mut order, slot_stride) = match fs::read_to_string(&index_path) {
            Ok(text) => parse_index(&text).with_context(|| index_path.display().to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let stride = slot_capacity
                    .checked_mul(2)
                    .context("slot capacity too large")?
                    .max(MIN_SLOT_STRIDE);
                (Vec::new(), stride)
            }
            Err(e) => return Err(e).with_context(|| index_path.display().to_string()),
        };
        if slot_capacity.checked_mul(2).is_none_or(|b| b > slot_stride) {
            bail!(
                "{}: the fleet's slot files hold {} bytes per slot, this run asks for {slot_capacity}",
                index_path.display(),
                slot_stride / 2
            );
        }
        let mut places: HashMap<String, u64> = order
            .iter()
            .enumerate()
            .map(|(n, id)| (id.clone(), n as u64))
            .collect();
        let before = order.len();
        for id in ids {
            if id.is_empty() || id.contains(['\n', '\r']) {
                bail!("device id {id:?} cannot be written to the fleet index");
            }
            if !places.contains_key(id) {
                places.insert(id.to_owned(), order.len() as u64);
                order.push(id.to_owned());
            }
        }
        if order.len() != before || before == 0 {
            write_index(&index_path, &order, slot_stride, sync)?;
        }
        let names = fs::read_dir(dir)
            .with_context(|| dir.display().to_string())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<HashSet<_>, _>>()
            .with_context(|| dir.display().to_string())?;
        let files = (order.len() as u64).div_ceil(DEVICES_PER_FILE);
        let open = |kind: &str| -> anyhow::Result<Vec<(Arc<File>, PathBuf)>> {
            (0..files)
                .map(|n| {
                    let path = dir.join(format!("{kind}-{n:04}.bin"));
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&path)
                        .with_context(|| path.display().to_string())?;
                    Ok((Arc::new(f), path))
                })
                .collect()
        };
        Ok(FleetFiles {
            dir: dir.to_owned(),
            records: open("records")?,
            slots: open("slots")?,
            slot_maps: open("slotmaps")?,
            images: Arc::new(ImageStore::new(&dir.join(IMAGES))),
            places,
            slot_stride,
            names,
            sync,
        })
    }

    fn place(&self, id: &str) -> anyhow::Result<(usize, u64)> {
        let n = *self
            .places
            .get(id)
            .with_context(|| format!("{id} was not given a place in the fleet's files"))?;
        Ok(((n / DEVICES_PER_FILE) as usize, n % DEVICES_PER_FILE))
    }

    fn has(&self, name: &str) -> bool {
        self.names.contains(std::ffi::OsStr::new(name))
    }

    /// Where device `id` keeps its record.
    pub fn store(&self, id: &str) -> anyhow::Result<Box<dyn DeviceStore>> {
        let (own, legacy) = (format!("{id}.rec"), format!("{id}.json"));
        if self.has(&own) || self.has(&legacy) {
            return Ok(Box::new(
                RecordFileStore::new(self.dir.join(own), self.sync)
                    .with_legacy(self.dir.join(legacy)),
            ));
        }
        let (file, at) = self.place(id)?;
        let (f, path) = self
            .records
            .get(file)
            .context("fleet record file missing")?;
        Ok(Box::new(RecordFileStore::at(
            f.clone(),
            path,
            at * RECORD_BYTES,
            self.sync,
        )))
    }

    /// Starts a thread that, every [`TRIM_INTERVAL`], starts writing the slot files' dirty
    /// pages to disk and drops from memory those already written (the module doc says why).
    /// Nothing is lost: a dropped page is read from disk when it is next read. The thread ends
    /// when every device has let go of the files.
    pub fn trim_slots(&self) -> std::io::Result<std::thread::JoinHandle<()>> {
        let files: Vec<Weak<File>> = self.slots.iter().map(|(f, _)| Arc::downgrade(f)).collect();
        std::thread::Builder::new()
            .name("aloft-sim-trim".into())
            .spawn(move || loop {
                std::thread::sleep(TRIM_INTERVAL);
                let mut open = 0;
                for file in files.iter().filter_map(Weak::upgrade) {
                    open += 1;
                    drop_written_pages(&file);
                }
                if open == 0 {
                    return;
                }
            })
    }

    /// Where device `id` keeps its firmware slots, `capacity` bytes each.
    pub fn flash(&self, id: &str, capacity: u64) -> anyhow::Result<Box<dyn Flash>> {
        let own = format!("{id}.slots");
        if self.has(&own) {
            return Ok(Box::new(FileFlash::open(&self.dir.join(own), capacity)));
        }
        let (file, at) = self.place(id)?;
        let (f, path) = self.slots.get(file).context("fleet slot file missing")?;
        let (map, _) = self
            .slot_maps
            .get(file)
            .context("fleet slot map file missing")?;
        let refs = SlotRefs::new(self.images.clone(), map.clone(), at * MAP_STRIDE);
        Ok(Box::new(
            FileFlash::at(f.clone(), path, at * self.slot_stride, capacity).with_refs(refs),
        ))
    }
}

/// `POSIX_FADV_DONTNEED` over the whole file: Linux starts writeback of its dirty pages and
/// drops the clean ones; pages still dirty or being written stay, for the next call. The cost
/// follows the pages cached, not the file's (sparse) size. Advice only: a failure changes
/// nothing a device reads, so it is ignored.
fn drop_written_pages(file: &File) {
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
}

fn parse_index(text: &str) -> anyhow::Result<(Vec<String>, u64)> {
    let mut lines = text.lines();
    if lines.next() != Some(INDEX_MAGIC) {
        bail!("not a fleet index (first line is not {INDEX_MAGIC:?})");
    }
    let stride = lines
        .next()
        .and_then(|l| l.strip_prefix("slot-stride "))
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .context("second line is not `slot-stride <bytes>`")?;
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    for (n, id) in lines.enumerate() {
        if id.is_empty() || !seen.insert(id) {
            bail!("line {}: empty or repeated device id {id:?}", n + 3);
        }
        order.push(id.to_owned());
    }
    Ok((order, stride))
}

/// Replaces the index atomically: a crash leaves the old one or the new one.
fn write_index(path: &Path, order: &[String], stride: u64, sync: bool) -> anyhow::Result<()> {
    let mut text = format!("{INDEX_MAGIC}\nslot-stride {stride}\n");
    for id in order {
        text.push_str(id);
        text.push('\n');
    }
    let tmp = path.with_extension("index.tmp");
    let mut f = File::create(&tmp).with_context(|| tmp.display().to_string())?;
    f.write_all(text.as_bytes())
        .with_context(|| tmp.display().to_string())?;
    if sync {
        f.sync_data().with_context(|| tmp.display().to_string())?;
    }
    drop(f);
    fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::{FlashError, HashChain, ImageKey, Known, SlotId};
    use crate::store::DeviceRecord;
    use aloft_proto::SecurityVersion;
    use sha2::Digest;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn trimmed_slots_read_back_what_was_written_and_the_trim_ends_with_the_devices() {
        let dir = tempfile::tempdir().unwrap();
        let ids = ["dev-0", "dev-1"];
        let files = FleetFiles::open(dir.path(), ids, 1 << 20, false).unwrap();
        let trim = files.trim_slots().unwrap();
        let image: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let mut flashes: Vec<_> = ids
            .iter()
            .map(|id| files.flash(id, 1 << 20).unwrap())
            .collect();
        drop(files);
        for f in &mut flashes {
            f.begin_update(SlotId::B, image.len() as u64).unwrap();
            for (n, chunk) in image.chunks(16 * 1024).enumerate() {
                f.write(SlotId::B, (n * 16 * 1024) as u64, chunk).unwrap();
            }
        }
        // Trimmed at least twice: written back, then dropped; read from the disk again.
        std::thread::sleep(TRIM_INTERVAL * 3);
        for f in &mut flashes {
            let mut back = vec![0u8; image.len()];
            f.read(SlotId::B, 0, &mut back).unwrap();
            assert!(back == image, "a trimmed slot reads back what was written");
        }
        assert!(!trim.is_finished(), "the devices still hold the files");
        drop(flashes);
        trim.join().unwrap();
    }

    #[test]
    fn devices_keep_their_records_and_slots_apart_and_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..3).map(|n| format!("dev-{n}")).collect();
        let files = FleetFiles::open(dir.path(), ids.iter().map(String::as_str), 64, true).unwrap();
        for (n, id) in ids.iter().enumerate() {
            let mut s = files.store(id).unwrap();
            assert_eq!(s.load().unwrap(), None);
            s.save(&DeviceRecord::factory(id, SecurityVersion(n as u64)))
                .unwrap();
            let mut f = files.flash(id, 32).unwrap();
            f.begin_update(SlotId::B, 32).unwrap();
            f.write(SlotId::B, 0, &[n as u8 + 1; 32]).unwrap();
            f.write(SlotId::A, 0, &[n as u8 + 10; 32]).unwrap();
        }
        drop(files);
        // A restart with one device gone and one new: the others find what they wrote.
        let again = ["dev-new", "dev-2", "dev-0"];
        let files = FleetFiles::open(dir.path(), again, 64, true).unwrap();
        for (n, id) in [(0, "dev-0"), (2, "dev-2")] {
            let r = files.store(id).unwrap().load().unwrap().unwrap();
            assert_eq!(r.running_version(), id);
            let mut f = files.flash(id, 32).unwrap();
            let mut buf = [0u8; 32];
            f.read(SlotId::B, 0, &mut buf).unwrap();
            assert_eq!(buf, [n as u8 + 1; 32]);
            f.read(SlotId::A, 0, &mut buf).unwrap();
            assert_eq!(buf, [n as u8 + 10; 32]);
        }
        assert_eq!(files.store("dev-new").unwrap().load().unwrap(), None);
        assert_eq!(
            names(dir.path()),
            [
                "fleet.index",
                "records-0000.bin",
                "slotmaps-0000.bin",
                "slots-0000.bin"
            ]
        );
        let index = fs::read_to_string(dir.path().join(INDEX)).unwrap();
        assert!(index.ends_with("dev-0\ndev-1\ndev-2\ndev-new\n"), "{index}");
    }

    #[test]
    fn a_device_with_files_of_its_own_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let r = DeviceRecord::factory("2.0", SecurityVersion(7));
        RecordFileStore::new(dir.path().join("old.rec"), false)
            .save(&r)
            .unwrap();
        let mut own = FileFlash::open(&dir.path().join("old.slots"), 16);
        own.write(SlotId::B, 0, &[9; 16]).unwrap();
        drop(own);
        let files = FleetFiles::open(dir.path(), ["old"], 16, false).unwrap();
        assert_eq!(files.store("old").unwrap().load().unwrap(), Some(r));
        let mut buf = [0u8; 16];
        files
            .flash("old", 16)
            .unwrap()
            .read(SlotId::B, 0, &mut buf)
            .unwrap();
        assert_eq!(buf, [9; 16]);
    }

    #[test]
    fn a_larger_slot_than_the_files_were_made_for_is_refused_and_a_bad_index_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let big = MIN_SLOT_STRIDE;
        FleetFiles::open(dir.path(), ["a"], 64, false).unwrap();
        assert!(FleetFiles::open(dir.path(), ["a"], big / 2, false).is_ok());
        let err = FleetFiles::open(dir.path(), ["a"], big / 2 + 1, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&format!("{} bytes per slot", big / 2)),
            "{err}"
        );
        fs::write(
            dir.path().join(INDEX),
            "aloft-sim-fleet 1\nslot-stride 134217728\na\na\n",
        )
        .unwrap();
        let err = format!(
            "{:#}",
            FleetFiles::open(dir.path(), ["a"], 64, false)
                .err()
                .unwrap()
        );
        assert!(err.contains("repeated device id"), "{err}");
        assert!(FleetFiles::open(dir.path(), ["x\ny"], 64, false).is_err());
    }

    #[test]
    fn the_files_grow_a_file_per_thousand_and_twenty_four_devices() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..DEVICES_PER_FILE + 1).map(|n| format!("d{n}")).collect();
        let files = FleetFiles::open(dir.path(), ids.iter().map(String::as_str), 8, false).unwrap();
        let last = ids.last().unwrap();
        files
            .store(last)
            .unwrap()
            .save(&DeviceRecord::factory("1", SecurityVersion(1)))
            .unwrap();
        assert!(
            fs::metadata(dir.path().join("records-0001.bin"))
                .unwrap()
                .len()
                > 0
        );
        assert_eq!(
            fs::metadata(dir.path().join("records-0000.bin"))
                .unwrap()
                .len(),
            0
        );
    }

    /// An image of `len` bytes in chunks of 1,024, and the chain that vouches for its chunks.
    fn stored_image(len: usize, seed: u8) -> (Vec<u8>, Arc<HashChain>) {
        let image: Vec<u8> = (0..len)
            .map(|i| (i * 13 + usize::from(seed)) as u8)
            .collect();
        let key = ImageKey::new([seed; 32], 1024, len as u64);
        (image, Arc::new(HashChain::of_image(key)))
    }

    fn write_vouched(f: &mut dyn Flash, slot: SlotId, image: &[u8], chain: &Arc<HashChain>) {
        f.begin_update(slot, image.len() as u64).unwrap();
        for (i, part) in image.chunks(1024).enumerate() {
            let known = Known {
                chain,
                index: i as u32,
            };
            f.write_known(slot, 1024 * i as u64, part, &known).unwrap();
        }
    }

    fn read_all(f: &mut dyn Flash, slot: SlotId, len: usize) -> Vec<u8> {
        let mut back = vec![0u8; len];
        f.read(slot, 0, &mut back).unwrap();
        back
    }

    #[test]
    fn an_image_many_devices_write_is_stored_once_and_each_reads_it_back_after_a_restart() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let ids = ["dev-0", "dev-1", "dev-2"];
        let (image, chain) = stored_image(4500, 1);
        let sha: [u8; 32] = sha2::Sha256::digest(&image).into();
        let files = FleetFiles::open(dir.path(), ids, 1 << 20, false).unwrap();
        for id in ids {
            let mut f = files.flash(id, 1 << 20).unwrap();
            write_vouched(&mut *f, SlotId::B, &image, &chain);
            assert_eq!(read_all(&mut *f, SlotId::B, image.len()), image);
            assert_eq!(f.digest(SlotId::B, image.len() as u64).unwrap(), sha);
        }
        let slots = fs::metadata(dir.path().join("slots-0000.bin")).unwrap();
        assert_eq!(slots.blocks(), 0, "no device wrote its copy into its slot");
        let stored: Vec<_> = fs::read_dir(dir.path().join(IMAGES)).unwrap().collect();
        assert_eq!(stored.len(), 1);
        let one = stored[0].as_ref().unwrap().metadata().unwrap();
        assert_eq!(one.len(), image.len() as u64);
        drop(files);

        // Another process: nothing in memory, every slot read back from the files.
        let files = FleetFiles::open(dir.path(), ids, 1 << 20, false).unwrap();
        for id in ids {
            let mut f = files.flash(id, 1 << 20).unwrap();
            assert_eq!(read_all(&mut *f, SlotId::B, image.len()), image, "{id}");
            assert_eq!(f.digest(SlotId::B, image.len() as u64).unwrap(), sha);
            assert_eq!(
                read_all(&mut *f, SlotId::A, 16),
                [0; 16],
                "slot A holds nothing"
            );
        }
    }

    #[test]
    fn a_stored_chunk_is_named_without_its_bytes_only_where_a_write_of_them_would_store_it_so() {
        let dir = tempfile::tempdir().unwrap();
        let (image, chain) = stored_image(4500, 6);
        let sha: [u8; 32] = sha2::Sha256::digest(&image).into();
        let ids = ["first", "second", "late", "stranger"];
        let files = FleetFiles::open(dir.path(), ids, 1 << 20, false).unwrap();
        let known = |index: u32| Known {
            chain: &chain,
            index,
        };
        let mut first = files.flash("first", 1 << 20).unwrap();
        first.begin_update(SlotId::B, image.len() as u64).unwrap();
        assert!(
            !first.name_known(SlotId::B, 0, &known(0)).unwrap(),
            "nothing stored yet: the bytes are needed"
        );
        write_vouched(&mut *first, SlotId::B, &image, &chain);

        // Every chunk stored, and the chain holds every state: named, in order, unopened.
        let mut second = files.flash("second", 1 << 20).unwrap();
        second.begin_update(SlotId::B, image.len() as u64).unwrap();
        for i in 0..5u32 {
            assert!(second
                .name_known(SlotId::B, 1024 * u64::from(i), &known(i))
                .unwrap());
        }
        assert_eq!(read_all(&mut *second, SlotId::B, image.len()), image);
        assert_eq!(second.digest(SlotId::B, image.len() as u64).unwrap(), sha);

        // Not the chunk's place, or past the image: not named.
        let mut late = files.flash("late", 1 << 20).unwrap();
        late.begin_update(SlotId::B, image.len() as u64).unwrap();
        assert!(!late.name_known(SlotId::B, 1024, &known(0)).unwrap());
        assert!(!late.name_known(SlotId::B, 5 * 1024, &known(5)).unwrap());
        // A chunk written plainly first: the slot hashes its own bytes from there on, so the
        // next chunk's bytes are needed too; the image still reads back whole.
        late.write(SlotId::B, 0, &image[..1024]).unwrap();
        assert!(!late.name_known(SlotId::B, 1024, &known(1)).unwrap());
        for (i, part) in image.chunks(1024).enumerate().skip(1) {
            late.write_known(SlotId::B, 1024 * i as u64, part, &known(i as u32))
                .unwrap();
        }
        assert_eq!(late.digest(SlotId::B, image.len() as u64).unwrap(), sha);

        // Another key's chain names another stored image, which holds nothing.
        let other = Arc::new(HashChain::of_image(ImageKey::new([7; 32], 1024, 4500)));
        let mut stranger = files.flash("stranger", 1 << 20).unwrap();
        stranger
            .begin_update(SlotId::B, image.len() as u64)
            .unwrap();
        let theirs = Known {
            chain: &other,
            index: 0,
        };
        assert!(!stranger.name_known(SlotId::B, 0, &theirs).unwrap());
        assert_eq!(read_all(&mut *stranger, SlotId::B, 16), [0; 16]);

        // What was named survives a restart like what was written.
        second.sync().unwrap();
        drop((first, second, late, stranger));
        drop(files);
        let files = FleetFiles::open(dir.path(), ids, 1 << 20, false).unwrap();
        let mut second = files.flash("second", 1 << 20).unwrap();
        assert_eq!(read_all(&mut *second, SlotId::B, image.len()), image);
    }

    #[test]
    fn a_plain_write_over_stored_chunks_keeps_what_it_does_not_cover_and_a_new_image_forgets_them()
    {
        let dir = tempfile::tempdir().unwrap();
        let (image, chain) = stored_image(3000, 2);
        let files = FleetFiles::open(dir.path(), ["d"], 1 << 20, false).unwrap();
        let mut f = files.flash("d", 1 << 20).unwrap();
        write_vouched(&mut *f, SlotId::B, &image, &chain);
        // Across chunks 0 and 1, as a delta's rebuild or a test's corruption writes.
        f.write(SlotId::B, 1000, &[0xee; 100]).unwrap();
        let mut expected = image.clone();
        expected[1000..1100].fill(0xee);
        assert_eq!(read_all(&mut *f, SlotId::B, image.len()), expected);
        // A vouched chunk at a place or length that is not its own is written plainly.
        let known = Known {
            chain: &chain,
            index: 2,
        };
        f.write_known(SlotId::B, 2000, &image[..500], &known)
            .unwrap();
        expected[2000..2500].copy_from_slice(&image[..500]);
        assert_eq!(read_all(&mut *f, SlotId::B, image.len()), expected);
        drop(f);
        let mut f = files.flash("d", 1 << 20).unwrap();
        assert_eq!(read_all(&mut *f, SlotId::B, image.len()), expected);

        // The other slot updated meanwhile: slot B keeps its image.
        let (other, other_chain) = stored_image(2048, 3);
        write_vouched(&mut *f, SlotId::A, &other, &other_chain);
        assert_eq!(read_all(&mut *f, SlotId::A, other.len()), other);
        assert_eq!(read_all(&mut *f, SlotId::B, image.len()), expected);

        // Slot B prepared for an image written plainly: nothing of the stored one shows.
        f.begin_update(SlotId::B, 3000).unwrap();
        f.write(SlotId::B, 0, &[7; 3000]).unwrap();
        assert_eq!(read_all(&mut *f, SlotId::B, 3000), [7; 3000]);
        drop(f);
        drop(files);
        let files = FleetFiles::open(dir.path(), ["d"], 1 << 20, false).unwrap();
        let mut f = files.flash("d", 1 << 20).unwrap();
        assert_eq!(read_all(&mut *f, SlotId::B, 3000), [7; 3000]);
        assert_eq!(read_all(&mut *f, SlotId::A, other.len()), other);
    }

    #[test]
    fn a_slot_that_names_a_stored_image_that_is_gone_fails_its_read() {
        let dir = tempfile::tempdir().unwrap();
        let (image, chain) = stored_image(2048, 4);
        let files = FleetFiles::open(dir.path(), ["d"], 1 << 20, false).unwrap();
        write_vouched(
            &mut *files.flash("d", 1 << 20).unwrap(),
            SlotId::B,
            &image,
            &chain,
        );
        drop(files);
        fs::remove_dir_all(dir.path().join(IMAGES)).unwrap();
        let files = FleetFiles::open(dir.path(), ["d"], 1 << 20, false).unwrap();
        let mut f = files.flash("d", 1 << 20).unwrap();
        let err = f.read(SlotId::B, 0, &mut [0u8; 16]).unwrap_err();
        assert!(matches!(err, FlashError::Io(_)), "{err}");
    }

    #[test]
    fn the_bits_naming_stored_chunks_reach_the_map_file_at_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (image, chain) = stored_image(4096, 5);
        let ids = ["killed", "synced"];
        let files = FleetFiles::open(dir.path(), ids, 1 << 20, false).unwrap();
        for id in ids {
            let mut f = files.flash(id, 1 << 20).unwrap();
            write_vouched(&mut *f, SlotId::B, &image, &chain);
            if id == "synced" {
                f.sync().unwrap();
            }
            // The process dies: nothing of this device's flash runs again.
            std::mem::forget(f);
        }
        drop(files);
        let files = FleetFiles::open(dir.path(), ids, 1 << 20, false).unwrap();
        let mut f = files.flash("synced", 1 << 20).unwrap();
        assert_eq!(read_all(&mut *f, SlotId::B, image.len()), image);
        // Its record was never saved after these chunks (a save syncs first): they are
        // downloaded again, and the slot holds nothing the record claims.
        let mut f = files.flash("killed", 1 << 20).unwrap();
        assert_eq!(
            read_all(&mut *f, SlotId::B, image.len()),
            vec![0; image.len()]
        );
    }
}
