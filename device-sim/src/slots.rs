//! A/B firmware slots, named as esp-idf-svc names them: the *running* slot executes now, the
//! *boot* slot is what the next reset starts, the *update* slot is the other one, where a new
//! image is written. [`SlotTable`] is the small metadata (persisted with the device record);
//! [`Flash`] is the byte storage behind the slots, with a sparse-file and an in-memory
//! implementation; [`images`] keeps a simulated fleet's images once for all its devices.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aloft_proto::SecurityVersion;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod images;
pub use images::{ImageKey, ImageStore, SlotRefs, MAP_STRIDE};

/// One of the two firmware slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SlotId {
    A,
    B,
}

impl SlotId {
    /// The other slot.
    pub fn other(self) -> SlotId {
        match self {
            SlotId::A => SlotId::B,
            SlotId::B => SlotId::A,
        }
    }

    fn index(self) -> usize {
        match self {
            SlotId::A => 0,
            SlotId::B => 1,
        }
    }
}

/// Whether a slot's image may be booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SlotState {
    /// Booted and confirmed healthy.
    Valid,
    /// Installed, or booted but not yet confirmed: the bootloader falls back if it fails.
    Unverified,
    /// Empty, partially written, or failed: never booted.
    Invalid,
}

/// What a slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMeta {
    pub state: SlotState,
    /// The firmware version of the image in the slot, if it holds one.
    pub version: Option<String>,
    /// The anti-rollback counter of that image.
    pub security_version: SecurityVersion,
    /// Boots of this image while Unverified (U-Boot's `bootcount`): a power loss before the
    /// confirm costs one, and the bootloader gives up on the image after its boot limit.
    #[serde(default)]
    pub boot_attempts: u8,
    /// SHA-256 of the image in the slot (lowercase hex), when known: what a delta's base must
    /// match (1.5). Set when a verified image is installed, or at provisioning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
}

impl SlotMeta {
    fn empty() -> Self {
        SlotMeta {
            state: SlotState::Invalid,
            version: None,
            security_version: SecurityVersion(0),
            boot_attempts: 0,
            image_sha256: None,
        }
    }
}

/// The boot control block: which slot runs, which boots next, and what each holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotTable {
    running: SlotId,
    boot: SlotId,
    slots: [SlotMeta; 2],
}

impl SlotTable {
    /// A factory-fresh device: slot A holds a valid image of `version`, slot B is empty.
    pub fn factory(version: &str, security_version: SecurityVersion) -> Self {
        SlotTable {
            running: SlotId::A,
            boot: SlotId::A,
            slots: [
                SlotMeta {
                    state: SlotState::Valid,
                    version: Some(version.to_owned()),
                    security_version,
                    boot_attempts: 0,
                    image_sha256: None,
                },
                SlotMeta::empty(),
            ],
        }
    }

    pub fn running_slot(&self) -> SlotId {
        self.running
    }

    pub fn boot_slot(&self) -> SlotId {
        self.boot
    }

    /// The slot a new image is written to: whichever is not running.
    pub fn update_slot(&self) -> SlotId {
        self.running.other()
    }

    pub fn meta(&self, slot: SlotId) -> &SlotMeta {
        &self.slots[slot.index()]
    }

    pub fn running_meta(&self) -> &SlotMeta {
        self.meta(self.running)
    }

    /// Forgets the update slot's image before it is overwritten.
    pub fn invalidate_update_slot(&mut self) {
        self.slots[self.update_slot().index()] = SlotMeta::empty();
    }

    /// Marks the update slot Invalid, keeping what it was meant to hold for diagnosis.
    pub fn mark_update_slot_invalid(&mut self) {
        self.slots[self.update_slot().index()].state = SlotState::Invalid;
    }

    /// Records a freshly installed image in the update slot and makes it the next boot slot.
    pub fn install_update(&mut self, version: &str, security_version: SecurityVersion) {
        let update = self.update_slot();
        self.slots[update.index()] = SlotMeta {
            state: SlotState::Unverified,
            version: Some(version.to_owned()),
            security_version,
            boot_attempts: 0,
            image_sha256: None,
        };
        self.boot = update;
    }

    /// Records the SHA-256 of the image just installed in the update slot (after
    /// [`install_update`](Self::install_update)).
    pub fn set_update_image_sha256(&mut self, sha256: &str) {
        let update = self.update_slot();
        self.slots[update.index()].image_sha256 = Some(sha256.to_owned());
    }

    /// Records the SHA-256 of the factory image in the running slot (provisioning).
    pub fn set_running_image_sha256(&mut self, sha256: &str) {
        let running = self.running_slot();
        self.slots[running.index()].image_sha256 = Some(sha256.to_owned());
    }

    /// A reset: the boot slot becomes the running slot. The previous one stays as the fallback.
    pub fn reboot(&mut self) {
        self.running = self.boot;
        self.count_boot();
    }

    fn count_boot(&mut self) {
        let m = &mut self.slots[self.running.index()];
        if m.state == SlotState::Unverified {
            m.boot_attempts = m.boot_attempts.saturating_add(1);
        }
    }

    /// Confirms the running image (esp-idf's `mark_running_slot_valid`).
    pub fn mark_running_slot_valid(&mut self) {
        self.slots[self.running.index()].state = SlotState::Valid;
    }

    /// Gives up on the running image: marks it Invalid and boots back into the other slot.
    pub fn roll_back(&mut self) {
        self.slots[self.running.index()].state = SlotState::Invalid;
        self.running = self.running.other();
        self.boot = self.running;
    }

    /// True if some slot holds a confirmed image the bootloader can always fall back to.
    pub fn has_valid_slot(&self) -> bool {
        self.slots.iter().any(|s| s.state == SlotState::Valid)
    }

    /// What the bootloader does when power comes back (or after any reset it did not ask for),
    /// as U-Boot's `bootcount`/`bootlimit` does for RAUC, Mender and SWUpdate (with
    /// `boot_limit` 1 it is esp-idf's rollback: no second chance):
    ///
    /// - the running image was booted but never confirmed (Unverified): if it has been booted
    ///   `boot_limit` times it is abandoned, marked Invalid, and the other slot, Valid, boots;
    ///   otherwise it boots again and must confirm in this boot;
    /// - an installed image waits in the boot slot and was never booted: it boots now, still
    ///   Unverified, and must confirm in this boot;
    /// - otherwise the running slot boots again.
    ///
    /// A Valid slot is never given up, so a device always keeps one to fall back to.
    pub fn power_on(&mut self, boot_limit: u8) -> PowerOn {
        let other = self.running.other();
        if self.running_meta().state == SlotState::Unverified
            && self.meta(other).state == SlotState::Valid
        {
            if self.running_meta().boot_attempts < boot_limit.max(1) {
                self.count_boot();
                return PowerOn::BootedAgain;
            }
            self.roll_back();
            return PowerOn::FellBack;
        }
        if self.boot != self.running && self.meta(self.boot).state == SlotState::Unverified {
            self.running = self.boot;
            self.count_boot();
            return PowerOn::BootedUpdate;
        }
        // A boot slot that holds nothing bootable is ignored: the running slot boots again.
        self.boot = self.running;
        PowerOn::Unchanged
    }
}

/// What [`SlotTable::power_on`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOn {
    /// The same slot runs again.
    Unchanged,
    /// The installed image was booted for the first time; it runs Unverified.
    BootedUpdate,
    /// The unconfirmed image was booted once more (within its boot limit); it runs Unverified.
    BootedAgain,
    /// The unconfirmed image was abandoned; the previous, Valid image runs again.
    FellBack,
}

/// Why a slot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("write of {len} bytes at {offset} exceeds the slot capacity of {capacity}")]
    OutOfBounds {
        offset: u64,
        len: usize,
        capacity: u64,
    },
    #[error("slot storage i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The bytes of the two slots. The update logic writes only the update slot and reads it back to
/// verify; a real device implements this over its flash partitions and bootloader.
pub trait Flash: Send {
    /// Bytes one slot can hold.
    fn capacity(&self) -> u64;
    /// Prepares `slot` for an image of `size` bytes, discarding what it held.
    fn begin_update(&mut self, slot: SlotId, size: u64) -> Result<(), FlashError>;
    fn write(&mut self, slot: SlotId, offset: u64, data: &[u8]) -> Result<(), FlashError>;
    /// [`Flash::write`] of `data` that is, byte for byte, chunk `known.index` of the content
    /// `known.chain` names: storage that hashes what it is given may take the image's hash
    /// state from the chain instead of hashing `data` again.
    fn write_known(
        &mut self,
        slot: SlotId,
        offset: u64,
        data: &[u8],
        known: &Known<'_>,
    ) -> Result<(), FlashError> {
        let _ = known;
        self.write(slot, offset, data)
    }
    /// Records that `slot` holds, at `offset`, chunk `known.index` of the content `known.chain`
    /// names, without being given its bytes: only storage that keeps a fleet's images once
    /// (`images`) can, when it holds that chunk already and its hash state is the chain's.
    /// `false` when it cannot (nothing is written), and the caller writes the bytes.
    fn name_known(
        &mut self,
        slot: SlotId,
        offset: u64,
        known: &Known<'_>,
    ) -> Result<bool, FlashError> {
        let _ = (slot, offset, known);
        Ok(false)
    }
    /// Fills `buf` from `offset`; bytes never written read as zero.
    fn read(&mut self, slot: SlotId, offset: u64, buf: &mut [u8]) -> Result<(), FlashError>;
    /// Tells the bootloader which slot to start next. Simulated storage needs nothing here: the
    /// [`SlotTable`] records it.
    fn set_boot_slot(&mut self, _slot: SlotId) -> Result<(), FlashError> {
        Ok(())
    }
    /// Nothing more will be read or written for a while (an image was prepared for, or read
    /// back): storage may let go of what it holds open. The next access opens it again.
    fn release(&mut self) {}
    /// Makes every write so far survive a restart of the process. The device's record, which
    /// says which chunks are written, is saved only after it. A real flash is durable when a
    /// write returns; a simulated slot keeps the bits naming stored chunks in memory until
    /// then (`images`).
    fn sync(&mut self) -> Result<(), FlashError> {
        Ok(())
    }
    /// SHA-256 of the first `len` bytes of `slot`. Reads them back, like a device checking the
    /// image its flash holds before it boots it.
    fn digest(&mut self, slot: SlotId, len: u64) -> Result<[u8; 32], FlashError> {
        read_back_digest(self, slot, len)
    }
}

/// The SHA-256 states of one sequence of chunks hashed in order: entry `i` is the state after
/// chunks `0..=i`. Whoever holds a [`Known`] for a chain vouches that its bytes are the chain's
/// chunk; every device of a simulated campaign writes the same image, and the first to write a
/// chunk hashes it for the others (the module doc of `update::shared` says who may vouch).
#[derive(Debug, Default)]
pub struct HashChain {
    states: Mutex<Vec<Option<Sha256>>>,
    /// The image whose chunks these are, for slots that store each chunk once ([`images`]).
    image: Option<ImageKey>,
}

impl HashChain {
    /// The chain of `image`'s chunks.
    pub fn of_image(image: Option<ImageKey>) -> Self {
        HashChain {
            states: Mutex::default(),
            image,
        }
    }

    /// The image whose chunks these are, if it can be stored once for a fleet.
    pub fn image(&self) -> Option<ImageKey> {
        self.image
    }

    /// The state after chunks `0..n` (the empty state for `n == 0`), if it was taken.
    fn after(&self, n: u32) -> Option<Sha256> {
        let Some(last) = n.checked_sub(1) else {
            return Some(Sha256::new());
        };
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.get(last as usize).cloned().flatten()
    }

    /// Whether the state after chunks `0..n` was taken (without copying it).
    fn has(&self, n: u32) -> bool {
        let Some(last) = n.checked_sub(1) else {
            return true;
        };
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.get(last as usize).is_some_and(Option::is_some)
    }

    /// Records the state after chunks `0..=index`.
    fn record(&self, index: u32, state: &Sha256) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let i = index as usize;
        if states.len() <= i {
            states.resize(i + 1, None);
        }
        if states[i].is_none() {
            states[i] = Some(state.clone());
        }
    }
}

/// Chunk `index` of the content `chain` names (see [`Flash::write_known`]).
///
/// Borrowed: a download vouches for every chunk it writes, and a shared count touched per chunk
/// by every device would bounce between the cores.
#[derive(Debug, Clone, Copy)]
pub struct Known<'a> {
    pub chain: &'a Arc<HashChain>,
    pub index: u32,
}

/// Bytes read back at a time by [`Flash::digest`].
const DIGEST_BLOCK_BYTES: usize = 16 * 1024;

/// SHA-256 of the first `len` bytes of `slot`, read back from `flash`.
fn read_back_digest<F: Flash + ?Sized>(
    flash: &mut F,
    slot: SlotId,
    len: u64,
) -> Result<[u8; 32], FlashError> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; DIGEST_BLOCK_BYTES];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(DIGEST_BLOCK_BYTES as u64) as usize;
        flash.read(slot, offset, &mut buf[..n])?;
        hash.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(hash.finalize().into())
}

fn check_bounds(capacity: u64, offset: u64, len: usize) -> Result<(), FlashError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(FlashError::OutOfBounds {
            offset,
            len,
            capacity,
        }),
    }
}

/// Slots held in memory, for tests. Each slot grows only as far as it is written.
#[derive(Debug, Default)]
pub struct MemoryFlash {
    capacity: u64,
    slots: [Vec<u8>; 2],
}

impl MemoryFlash {
    pub fn new(capacity: u64) -> Self {
        MemoryFlash {
            capacity,
            slots: [Vec::new(), Vec::new()],
        }
    }

    /// Test access to a slot's raw bytes.
    pub fn slot_bytes_mut(&mut self, slot: SlotId) -> &mut Vec<u8> {
        &mut self.slots[slot.index()]
    }
}

impl Flash for MemoryFlash {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn begin_update(&mut self, slot: SlotId, size: u64) -> Result<(), FlashError> {
        check_bounds(self.capacity, 0, size as usize)?;
        self.slots[slot.index()] = Vec::new();
        Ok(())
    }

    fn write(&mut self, slot: SlotId, offset: u64, data: &[u8]) -> Result<(), FlashError> {
        check_bounds(self.capacity, offset, data.len())?;
        let bytes = &mut self.slots[slot.index()];
        let start = offset as usize;
        let end = start + data.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(data);
        Ok(())
    }

    fn read(&mut self, slot: SlotId, offset: u64, buf: &mut [u8]) -> Result<(), FlashError> {
        check_bounds(self.capacity, offset, buf.len())?;
        let bytes = &self.slots[slot.index()];
        buf.fill(0);
        let start = (offset as usize).min(bytes.len());
        let end = (start + buf.len()).min(bytes.len());
        buf[..end - start].copy_from_slice(&bytes[start..end]);
        Ok(())
    }
}

/// Both slots in one sparse file: slot A at the base, slot B at base + `capacity`. Sparse, so a
/// fleet of simulated devices costs disk only for the images actually written.
///
/// The file is the device's own ([`open`](FileFlash::open), base 0), open only while an image is
/// being written and read back ([`Flash::release`] closes it): a simulator of 10,000 devices
/// that kept every slot file open used 10,000 descriptors besides its 10,000 sockets, and hit
/// the process's limit. Or it is a file shared by many devices, each at its own base
/// ([`at`](FileFlash::at)), held open by all of them: creating a slot file per device at its
/// first job cost more than the job itself (see `fleet_files`).
#[derive(Debug)]
pub struct FileFlash {
    path: PathBuf,
    file: Option<File>,
    /// A file shared with other devices, and this device's base in it.
    shared: Option<(Arc<File>, u64)>,
    capacity: u64,
    /// The digest of the image being written, while it is written front to back.
    stream: Option<Stream>,
    /// Where the slots name chunks of a fleet's stored images instead of holding them.
    refs: Option<SlotRefs>,
}

/// SHA-256 of what an update slot received since `begin_update`, as long as every write
/// continued where the last one ended. Reading each written image back to hash it again cost a
/// simulated campaign about 7% of its CPU; this is the same digest of the same bytes, taken as
/// they are written. Anything else (a write out of order, a
/// chunk written again after a power loss) drops it, and [`Flash::digest`] reads back.
#[derive(Debug)]
struct Stream {
    slot: SlotId,
    written: u64,
    hash: StreamHash,
}

/// How a [`Stream`] knows the digest of what it was given.
#[derive(Debug)]
enum StreamHash {
    /// Hashed here, every byte.
    Own(Sha256),
    /// Everything written is chunks `0..n` of `chain`, in order: the state is the chain's.
    Chain(Arc<HashChain>, u32),
}

impl StreamHash {
    /// Adds `data` to the hash: taken from the chain when `data` is its next chunk, hashed here
    /// otherwise. `None` when the chain lost the state this stream stands at (it never drops
    /// one, so only a chain mix-up could): the digest is then read back.
    fn add(self, data: &[u8], known: Option<&Known<'_>>) -> Option<StreamHash> {
        match (self, known) {
            (StreamHash::Chain(c, n), Some(k)) if Arc::ptr_eq(&c, k.chain) && k.index == n => {
                if !c.has(n + 1) {
                    let mut state = c.after(n)?;
                    state.update(data);
                    c.record(n, &state);
                }
                Some(StreamHash::Chain(c, n + 1))
            }
            (StreamHash::Chain(c, n), _) => {
                let mut state = c.after(n)?;
                state.update(data);
                Some(StreamHash::Own(state))
            }
            (StreamHash::Own(mut h), _) => {
                h.update(data);
                Some(StreamHash::Own(h))
            }
        }
    }

    /// The chain this stream follows and how many of its chunks it holds, given that it holds
    /// `written` bytes and `known` is the chunk written next: a stream that has written nothing
    /// yet joins the chain of its first chunk. `None` when it hashes on its own.
    fn on_chain<'s>(
        &'s self,
        written: u64,
        known: Option<&Known<'s>>,
    ) -> Option<(&'s Arc<HashChain>, u32)> {
        match (self, known) {
            (StreamHash::Chain(c, n), _) => Some((c, *n)),
            (StreamHash::Own(_), Some(k)) if written == 0 && k.index == 0 => Some((k.chain, 0)),
            (StreamHash::Own(_), _) => None,
        }
    }

    /// What [`StreamHash::add`] would make of `known`'s chunk, if it needs none of its bytes:
    /// the chain's state after it, when the chain has it. `written` is what the stream holds.
    fn without_bytes(&self, written: u64, known: &Known<'_>) -> Option<StreamHash> {
        let (chain, n) = self.on_chain(written, Some(known))?;
        (Arc::ptr_eq(chain, known.chain) && n == known.index && chain.has(n + 1))
            .then(|| StreamHash::Chain(chain.clone(), n + 1))
    }

    fn finalize(&self) -> Option<[u8; 32]> {
        match self {
            StreamHash::Own(h) => Some(h.clone().finalize().into()),
            StreamHash::Chain(c, n) => c.after(*n).map(|s| s.finalize().into()),
        }
    }
}

impl FileFlash {
    /// The slot file at `path`, created at its first use. Nothing is opened here: a simulator
    /// starting 10,000 devices spent a quarter of a second of its connect storm creating empty
    /// slot files, most of which a short run never writes.
    pub fn open(path: &Path, capacity: u64) -> Self {
        FileFlash {
            path: path.to_owned(),
            file: None,
            shared: None,
            capacity,
            stream: None,
            refs: None,
        }
    }

    /// Slots of `capacity` bytes each at `base` in `file`, a file shared with other devices
    /// (`2 * capacity` bytes each), named `path` in errors.
    pub fn at(file: Arc<File>, path: &Path, base: u64, capacity: u64) -> Self {
        FileFlash {
            path: path.to_owned(),
            file: None,
            shared: Some((file, base)),
            capacity,
            stream: None,
            refs: None,
        }
    }

    /// The slot file, opened if it is not.
    fn file(&mut self) -> Result<&File, FlashError> {
        if let Some((f, _)) = &self.shared {
            return Ok(f);
        }
        if self.file.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)?;
            self.file = Some(file);
        }
        self.file
            .as_ref()
            .ok_or_else(|| FlashError::from(std::io::Error::other("slot file not open")))
    }

    /// The same slots, where a chunk vouched for by a chain of a stored image is kept once in
    /// `refs`' store and named in its map (see [`images`]).
    pub fn with_refs(mut self, refs: SlotRefs) -> Self {
        self.refs = Some(refs);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn base(&self, slot: SlotId) -> u64 {
        self.shared.as_ref().map_or(0, |(_, base)| *base) + slot.index() as u64 * self.capacity
    }
}

impl FileFlash {
    /// Writes `data` and adds it to the stream's digest when it continues the stream.
    fn write_streamed(
        &mut self,
        slot: SlotId,
        offset: u64,
        data: &[u8],
        known: Option<&Known<'_>>,
    ) -> Result<(), FlashError> {
        check_bounds(self.capacity, offset, data.len())?;
        // This slot's stream is taken before the write: if the write fails, what the slot
        // holds is unknown. Another slot's stays.
        let ours = self.stream.as_ref().is_some_and(|s| s.slot == slot);
        let continued = ours
            .then(|| self.stream.take())
            .flatten()
            .filter(|s| s.written == offset);
        let vouched = known.and_then(|k| Some((k.chain.image()?, k.index)));
        self.put(slot, offset, data, vouched)?;
        if !ours {
            return Ok(());
        }
        self.stream = continued.and_then(|s| {
            let joined = s
                .hash
                .on_chain(s.written, known)
                .map(|(c, n)| (c.clone(), n));
            let hash = match joined {
                Some((c, n)) => StreamHash::Chain(c, n),
                None => s.hash,
            };
            Some(Stream {
                slot: s.slot,
                written: s.written + data.len() as u64,
                hash: hash.add(data, known)?,
            })
        });
        Ok(())
    }

    /// Writes `data` at `offset` of `slot`: named in the slot's map when it is `vouched` chunk
    /// (index) of a stored image, into the slot otherwise.
    fn put(
        &mut self,
        slot: SlotId,
        offset: u64,
        data: &[u8],
        vouched: Option<(ImageKey, u32)>,
    ) -> Result<(), FlashError> {
        use std::os::unix::fs::FileExt;
        let base = self.base(slot);
        if let (Some(refs), Some((raw, _))) = (&mut self.refs, &self.shared) {
            if let Some((key, index)) = vouched {
                if refs.put(slot, offset, Some(data), key, index)? {
                    return Ok(());
                }
            }
            refs.before_plain_write(slot, offset, data.len() as u64, raw, base)?;
        }
        self.file()?.write_all_at(data, base + offset)?;
        Ok(())
    }
}

impl Flash for FileFlash {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn begin_update(&mut self, slot: SlotId, size: u64) -> Result<(), FlashError> {
        check_bounds(self.capacity, 0, size as usize)?;
        // Punching holes portably is not possible with std; when the update slot is the last
        // one of its own file, truncating to its start frees it, otherwise stale bytes are
        // simply overwritten (every byte of the new image is written before it is read back).
        if slot == SlotId::B && self.shared.is_none() {
            let base = self.base(SlotId::B);
            self.file()?.set_len(base)?;
        }
        if let Some(refs) = &mut self.refs {
            refs.clear(slot)?;
        }
        self.stream = Some(Stream {
            slot,
            written: 0,
            hash: StreamHash::Own(Sha256::new()),
        });
        Ok(())
    }

    fn release(&mut self) {
        self.file = None;
    }

    fn sync(&mut self) -> Result<(), FlashError> {
        match &mut self.refs {
            Some(refs) => refs.sync(),
            None => Ok(()),
        }
    }

    fn write(&mut self, slot: SlotId, offset: u64, data: &[u8]) -> Result<(), FlashError> {
        self.write_streamed(slot, offset, data, None)
    }

    fn write_known(
        &mut self,
        slot: SlotId,
        offset: u64,
        data: &[u8],
        known: &Known<'_>,
    ) -> Result<(), FlashError> {
        self.write_streamed(slot, offset, data, Some(known))
    }

    fn name_known(
        &mut self,
        slot: SlotId,
        offset: u64,
        known: &Known<'_>,
    ) -> Result<bool, FlashError> {
        let (Some(refs), Some(key)) = (&mut self.refs, known.chain.image()) else {
            return Ok(false);
        };
        if known.index >= key.count {
            return Ok(false);
        }
        let len = key.len(known.index);
        check_bounds(self.capacity, offset, len as usize)?;
        // This slot's stream, as a write of the bytes would leave it; the bytes are needed
        // when it would hash them.
        let stream = match self.stream.as_ref().filter(|s| s.slot == slot) {
            None => None,
            Some(s) if s.written != offset => Some(None),
            Some(s) => match s.hash.without_bytes(s.written, known) {
                Some(hash) => Some(Some(Stream {
                    slot,
                    written: s.written + len,
                    hash,
                })),
                None => return Ok(false),
            },
        };
        let named = refs.put(slot, offset, None, key, known.index);
        if let Some(stream) = stream {
            // After a failed write what the slot holds is unknown: its stream goes.
            match &named {
                Ok(true) => self.stream = stream,
                Ok(false) => {}
                Err(_) => self.stream = None,
            }
        }
        named
    }

    fn digest(&mut self, slot: SlotId, len: u64) -> Result<[u8; 32], FlashError> {
        let streamed = match &self.stream {
            Some(s) if s.slot == slot && s.written == len => s.hash.finalize(),
            _ => None,
        };
        match streamed {
            Some(d) => Ok(d),
            None => read_back_digest(self, slot, len),
        }
    }

    fn read(&mut self, slot: SlotId, offset: u64, buf: &mut [u8]) -> Result<(), FlashError> {
        use std::os::unix::fs::FileExt;
        check_bounds(self.capacity, offset, buf.len())?;
        let at = self.base(slot) + offset;
        let file = self.file()?;
        let mut done = 0;
        while done < buf.len() {
            let n = file.read_at(&mut buf[done..], at + done as u64)?;
            if n == 0 {
                // Past the end of the file: never written, reads as zero like a hole.
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        if let Some(refs) = &mut self.refs {
            refs.overlay(slot, offset, buf)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
