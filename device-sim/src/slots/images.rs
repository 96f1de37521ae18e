//! One stored copy of each image's chunks for a whole simulated fleet, and the small map by
//! which a device's slot says which of those chunks it holds.
//!
//! Why: every device of a simulated campaign writes the same image. At 10,000 devices and
//! 1 MiB, writing each copy into the slot files (10 GiB into ext4's page cache, then handing it
//! to the disk and dropping it) was about a quarter of the simulator's CPU, on the two cores
//! the orchestrator needs (docs/BENCHMARKS.md, S3b). A chunk a download vouches for
//! ([`Known`](super::Known): the same sealed bytes under the same content key, so the same
//! plaintext) is written once to its image's file in `images/`, and the slot records one bit:
//! "chunk `i` of image `id` is what I hold at `i × chunk_size`". A slot reads those bytes from
//! the image's file, so what a device reads back is still what was written for it; anything
//! else (a chunk written plainly, a delta's rebuilt image) is written into the slot as before,
//! and a plain write over a referenced chunk first copies what it does not cover.
//!
//! Both live on disk, so a simulator restarted on its state directory reads every slot as it
//! was: an image's chunk is written before any slot's bit names it. A bit set is written to the
//! map file at the next [`SlotRefs::sync`], which the device's transport calls before it saves
//! the record that says the chunk is written (`Flash::sync`): one write per record saved
//! instead of one per chunk, which was 3% of a 10,000-device campaign's CPU. A simulator
//! killed in between loses only bits its saved records do not claim, whose chunks the devices
//! download again. Bits cleared (by a plain write over a named chunk) and headers are written
//! at once. Nothing is fsynced (as for the slot files): a simulated device's power loss does
//! not lose the machine's page cache.
//!
//! Map layout, [`MAP_STRIDE`] bytes per device, slot A then slot B at [`MAP_SLOT_BYTES`]:
//! a 64-byte header (`aloftref`, the image id, chunk size, chunk count and the last chunk's
//! length, little-endian) and a bitmap of one bit per chunk. A header without the magic (a new
//! device, or an update slot prepared for a new image) means the slot holds no references.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{FlashError, SlotId};

/// Bytes of the slot map a device takes in a map file.
pub const MAP_STRIDE: u64 = 4096;
/// Bytes of one slot's map: the header and a bitmap for [`MAX_CHUNKS`] chunks.
const MAP_SLOT_BYTES: u64 = 2048;
const HEADER_BYTES: usize = 64;
const MAGIC: &[u8; 8] = b"aloftref";
/// Chunks an image may have to be stored here (PROTOCOL.md §5.6 allows no more).
pub const MAX_CHUNKS: u32 = 8192;
/// Images a store keeps open at most; past it, a new image is written into the slots.
const MAX_OPEN: usize = 16;

/// Which image a chunk belongs to, and how it is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageKey {
    /// Names the image: a digest of the content key's fingerprint, the artifact and the
    /// manifest's sizes (`update::shared`).
    pub id: [u8; 32],
    pub chunk_size: u32,
    pub count: u32,
    /// Plaintext length of the last chunk.
    pub tail: u32,
}

impl ImageKey {
    /// The key of an image of `image_size` bytes in chunks of `chunk_size`, if it can be
    /// stored here.
    pub fn new(id: [u8; 32], chunk_size: u32, image_size: u64) -> Option<Self> {
        if chunk_size == 0 || image_size == 0 {
            return None;
        }
        let count = u32::try_from(image_size.div_ceil(u64::from(chunk_size))).ok()?;
        let tail = u32::try_from(image_size - u64::from(count - 1) * u64::from(chunk_size)).ok()?;
        (count <= MAX_CHUNKS).then_some(ImageKey {
            id,
            chunk_size,
            count,
            tail,
        })
    }

    /// Plaintext length of chunk `index`.
    pub(super) fn len(&self, index: u32) -> u64 {
        if index + 1 == self.count {
            u64::from(self.tail)
        } else {
            u64::from(self.chunk_size)
        }
    }

    fn start(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.chunk_size)
    }

    fn header(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[..8].copy_from_slice(MAGIC);
        h[8..40].copy_from_slice(&self.id);
        h[40..44].copy_from_slice(&self.chunk_size.to_le_bytes());
        h[44..48].copy_from_slice(&self.count.to_le_bytes());
        h[48..52].copy_from_slice(&self.tail.to_le_bytes());
        h
    }

    fn parse(h: &[u8; HEADER_BYTES]) -> Option<Self> {
        if &h[..8] != MAGIC {
            return None;
        }
        let u32_at = |at: usize| h.get(at..at + 4)?.try_into().ok().map(u32::from_le_bytes);
        let key = ImageKey {
            id: h[8..40].try_into().ok()?,
            chunk_size: u32_at(40)?,
            count: u32_at(44)?,
            tail: u32_at(48)?,
        };
        let sane = key.chunk_size > 0
            && (1..=MAX_CHUNKS).contains(&key.count)
            && (1..=key.chunk_size).contains(&key.tail);
        sane.then_some(key)
    }
}

/// The images of a fleet, one file each in a directory.
#[derive(Debug)]
pub struct ImageStore {
    dir: PathBuf,
    open: Mutex<HashMap<[u8; 32], Arc<StoredImage>>>,
}

/// One image's chunks, each at `index × chunk_size` of its file.
#[derive(Debug)]
pub struct StoredImage {
    key: ImageKey,
    file: File,
    /// Chunks this process has written (or found a slot naming): written once.
    stored: Vec<AtomicU64>,
}

impl ImageStore {
    /// The store in `dir`, created at the first image written.
    pub fn new(dir: &Path) -> Self {
        ImageStore {
            dir: dir.to_owned(),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, id: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}.chunks", hex::encode(id)))
    }

    /// The image of `key`: created when `create`, else it must exist. `None` when `create` and
    /// the store holds [`MAX_OPEN`] images in use.
    fn image(&self, key: ImageKey, create: bool) -> Result<Option<Arc<StoredImage>>, FlashError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = open.get(&key.id).filter(|i| i.key == key) {
            return Ok(Some(i.clone()));
        }
        if open.len() >= MAX_OPEN {
            open.retain(|_, i| Arc::strong_count(i) > 1);
        }
        let full = open.len() >= MAX_OPEN;
        if full && create {
            return Ok(None);
        }
        let path = self.path(&key.id);
        if create {
            fs::create_dir_all(&self.dir)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&path)?;
        let image = Arc::new(StoredImage {
            key,
            file,
            stored: (0..key.count.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        });
        if !full {
            open.insert(key.id, image.clone());
        }
        Ok(Some(image))
    }
}

impl StoredImage {
    fn has(&self, index: u32) -> bool {
        let (word, bit) = ((index / 64) as usize, index % 64);
        self.stored
            .get(word)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << bit) != 0)
    }

    /// Writes chunk `index`, unless it was already.
    fn put(&self, index: u32, data: &[u8]) -> Result<(), FlashError> {
        if self.has(index) {
            return Ok(());
        }
        // Two devices may write the same chunk at once: the same bytes, so either write wins.
        self.file.write_all_at(data, self.key.start(index))?;
        if let Some(w) = self.stored.get((index / 64) as usize) {
            w.fetch_or(1 << (index % 64), Ordering::Release);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of chunk `index` from `within` it.
    fn read(&self, index: u32, within: u64, buf: &mut [u8]) -> Result<(), FlashError> {
        self.file
            .read_exact_at(buf, self.key.start(index) + within)
            .map_err(|e| {
                FlashError::Io(std::io::Error::new(
                    e.kind(),
                    format!("stored image chunk {index} unreadable: {e}"),
                ))
            })
    }
}

/// One slot's map, as loaded.
#[derive(Debug, Default)]
struct SlotMap {
    /// The image the slot names chunks of, with its file once opened.
    image: Option<(ImageKey, Option<Arc<StoredImage>>)>,
    bits: Vec<u64>,
    /// Bitmap bytes with bits set since the last sync (first and last), not yet in the file.
    unsynced: Option<(u32, u32)>,
}

impl SlotMap {
    fn get(&self, index: u32) -> bool {
        self.bits
            .get((index / 64) as usize)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    fn set(&mut self, index: u32, on: bool) {
        if let Some(w) = self.bits.get_mut((index / 64) as usize) {
            if on {
                *w |= 1 << (index % 64);
            } else {
                *w &= !(1 << (index % 64));
            }
        }
    }

    fn bitmap_byte(&self, index: u32) -> u8 {
        let w = self.bits.get((index / 64) as usize).copied().unwrap_or(0);
        (w >> (8 * ((index % 64) / 8))) as u8
    }

    fn any(&self) -> bool {
        self.bits.iter().any(|&w| w != 0)
    }

    /// The image the slot names chunks of, and those of its chunks that `[offset, offset + len)`
    /// touches; `None` when it names none there.
    fn named(&self, offset: u64, len: u64) -> Option<(ImageKey, Vec<u32>)> {
        let (key, _) = self.image.as_ref().filter(|_| len > 0)?;
        let cs = u64::from(key.chunk_size);
        let first = (offset / cs).min(u64::from(u32::MAX)) as u32;
        let last = ((offset + len - 1) / cs).min(u64::from(key.count) - 1) as u32;
        let named: Vec<u32> = (first..=last).filter(|&i| self.get(i)).collect();
        (!named.is_empty()).then_some((*key, named))
    }

    /// The bitmap bytes `first..=last`, as the map file holds them.
    fn bitmap_bytes(&self, first: u32, last: u32) -> Vec<u8> {
        (first..=last).map(|b| self.bitmap_byte(b * 8)).collect()
    }
}

/// A device's slot maps in a fleet's map file, and the store they name images in.
#[derive(Debug)]
pub struct SlotRefs {
    store: Arc<ImageStore>,
    map: Arc<File>,
    base: u64,
    slots: [Option<SlotMap>; 2],
}

impl SlotRefs {
    /// The maps at `base` in `map`, naming images of `store`.
    pub fn new(store: Arc<ImageStore>, map: Arc<File>, base: u64) -> Self {
        SlotRefs {
            store,
            map,
            base,
            slots: [None, None],
        }
    }

    /// `slot`'s map, read from the map file the first time, beside the files it names.
    fn loaded(&mut self, slot: SlotId) -> Result<Loaded<'_>, FlashError> {
        let at = self.base + slot.index() as u64 * MAP_SLOT_BYTES;
        let SlotRefs {
            store, map, slots, ..
        } = self;
        let entry = &mut slots[slot.index()];
        let m = match entry {
            Some(m) => m,
            None => entry.insert(read_map(map, at)?),
        };
        Ok(Loaded { at, m, map, store })
    }

    /// The slot will hold a new image: it names nothing any more. A map that names nothing is
    /// not written: a campaign's 10,000 jobs would each have dirtied a page of the map file
    /// while the jobs still arrived (its first chunk writes the map anyway).
    pub fn clear(&mut self, slot: SlotId) -> Result<(), FlashError> {
        let Loaded { at, m, map, .. } = self.loaded(slot)?;
        if m.image.is_some() {
            *m = SlotMap::default();
            map.write_all_at(&[0u8; 8], at)?;
        }
        Ok(())
    }

    /// Records that `slot` holds chunk `index` of `key`'s image at `offset`: `data`, stored if
    /// the chunk is not yet, or (`None`) the chunk as stored already. `false` (nothing named)
    /// when it cannot: not that chunk's place and length, the slot names chunks of another
    /// image, the store is full, or without `data` the chunk is not stored.
    pub fn put(
        &mut self,
        slot: SlotId,
        offset: u64,
        data: Option<&[u8]>,
        key: ImageKey,
        index: u32,
    ) -> Result<bool, FlashError> {
        if index >= key.count
            || offset != key.start(index)
            || data.is_some_and(|d| d.len() as u64 != key.len(index))
        {
            return Ok(false);
        }
        let Loaded { at, m, map, store } = self.loaded(slot)?;
        match &m.image {
            Some((k, _)) if *k == key => {}
            Some(_) if m.any() => return Ok(false),
            _ => {
                // A new map: the header and a cleared bitmap in one write.
                let mut fresh = key.header().to_vec();
                fresh.resize(HEADER_BYTES + key.count.div_ceil(8) as usize, 0);
                map.write_all_at(&fresh, at)?;
                *m = SlotMap {
                    image: Some((key, None)),
                    bits: vec![0u64; key.count.div_ceil(64) as usize],
                    unsynced: None,
                };
            }
        }
        let Some(image) = opened(store, m, true)? else {
            return Ok(false);
        };
        match data {
            Some(data) => image.put(index, data)?,
            None if image.has(index) => {}
            None => return Ok(false),
        }
        m.set(index, true);
        let byte = index / 8;
        m.unsynced = Some(match m.unsynced {
            Some((first, last)) => (first.min(byte), last.max(byte)),
            None => (byte, byte),
        });
        Ok(true)
    }

    /// Writes the bits set since the last sync to the map file.
    pub fn sync(&mut self) -> Result<(), FlashError> {
        for slot in [SlotId::A, SlotId::B] {
            if self.slots[slot.index()].is_none() {
                continue;
            }
            let Loaded { at, m, map, .. } = self.loaded(slot)?;
            if let Some((first, last)) = m.unsynced.take() {
                write_bitmap(map, at, m, first, last)?;
            }
        }
        Ok(())
    }

    /// Before `len` bytes are written plainly at `offset` of `slot` (through `raw`, at `base`):
    /// every referenced chunk they touch stops being referenced, and the bytes of it they do
    /// not cover are first copied into the slot.
    pub fn before_plain_write(
        &mut self,
        slot: SlotId,
        offset: u64,
        len: u64,
        raw: &File,
        base: u64,
    ) -> Result<(), FlashError> {
        let Loaded { at, m, map, store } = self.loaded(slot)?;
        let Some((key, named)) = m.named(offset, len) else {
            return Ok(());
        };
        let image =
            opened(store, m, false)?.ok_or_else(|| std::io::Error::other("image store full"))?;
        let end = offset + len;
        for &i in &named {
            let (start, stop) = (key.start(i), key.start(i) + key.len(i));
            if start < offset || stop > end {
                let mut chunk = vec![0u8; key.len(i) as usize];
                image.read(i, 0, &mut chunk)?;
                raw.write_all_at(&chunk, base + start)?;
            }
            m.set(i, false);
        }
        let (first, last) = (named[0] / 8, named[named.len() - 1] / 8);
        write_bitmap(map, at, m, first, last)
    }

    /// Puts into `buf` (read plainly from `offset` of `slot`) the bytes of every chunk the slot
    /// names there.
    pub fn overlay(&mut self, slot: SlotId, offset: u64, buf: &mut [u8]) -> Result<(), FlashError> {
        let Loaded { m, store, .. } = self.loaded(slot)?;
        let Some((key, named)) = m.named(offset, buf.len() as u64) else {
            return Ok(());
        };
        let image =
            opened(store, m, false)?.ok_or_else(|| std::io::Error::other("image store full"))?;
        let end = offset + buf.len() as u64;
        for i in named {
            let from = key.start(i).max(offset);
            let to = (key.start(i) + key.len(i)).min(end);
            if from < to {
                let part = &mut buf[(from - offset) as usize..(to - offset) as usize];
                image.read(i, from - key.start(i), part)?;
            }
        }
        Ok(())
    }
}

/// One slot's map, where it is in the map file, and the files it is read and written with.
struct Loaded<'a> {
    at: u64,
    m: &'a mut SlotMap,
    map: &'a File,
    store: &'a ImageStore,
}

/// A slot's map as the map file holds it at `at` (none for a header without the magic).
fn read_map(map: &File, at: u64) -> Result<SlotMap, FlashError> {
    let mut h = [0u8; HEADER_BYTES];
    let n = map.read_at(&mut h, at)?;
    let mut m = SlotMap::default();
    if let Some(key) = (n == HEADER_BYTES).then(|| ImageKey::parse(&h)).flatten() {
        let mut bytes = vec![0u8; key.count.div_ceil(8) as usize];
        map.read_exact_at(&mut bytes, at + HEADER_BYTES as u64)?;
        m.bits = vec![0u64; key.count.div_ceil(64) as usize];
        for (i, b) in bytes.iter().enumerate() {
            m.bits[i / 8] |= u64::from(*b) << (8 * (i % 8));
        }
        m.image = Some((key, None));
    }
    Ok(m)
}

/// Writes bitmap bytes `first..=last` of `m`, whose map is at `at`.
fn write_bitmap(map: &File, at: u64, m: &SlotMap, first: u32, last: u32) -> Result<(), FlashError> {
    let bytes = m.bitmap_bytes(first, last);
    map.write_all_at(&bytes, at + HEADER_BYTES as u64 + u64::from(first))?;
    Ok(())
}

impl Drop for SlotRefs {
    fn drop(&mut self) {
        // A device let go of (a run's end): what it wrote is kept. A failure here is one a
        // sync the record waits for would have reported; nothing claims these bits yet.
        let _ = self.sync();
    }
}

/// The image `m` names chunks of, opened: created when `create`, else it must exist. `None`
/// when it names none, or when `create` and the store holds as many images as it may.
fn opened(
    store: &ImageStore,
    m: &mut SlotMap,
    create: bool,
) -> Result<Option<Arc<StoredImage>>, FlashError> {
    let Some((key, opened)) = &mut m.image else {
        return Ok(None);
    };
    if let Some(i) = opened {
        return Ok(Some(i.clone()));
    }
    Ok(store.image(*key, create)?.map(|i| opened.insert(i).clone()))
}
