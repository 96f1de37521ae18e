//! Opening sled, and closing it for real: a store's sled handles live in a [`Sled`], whose
//! drop returns only once sled has closed its file and so released its lock, so the same
//! process can open the store again at once (a restore then `serve`, a test's reopen).

use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use fs2::FileExt;

use super::StoreError;

/// A store's sled handles (`H`: the `Db`, or the `Db` and its trees) and the wait for sled's
/// file lock, which runs when this is dropped.
///
/// Invariant: every sled handle of the store (`Db`, `Tree`, an iterator over one) lives in
/// `handles` or in a borrow of it that ends before the drop; one kept elsewhere would keep
/// sled's file open and the drop waiting for it.
pub(super) struct Sled<H> {
    /// Dropped first (a struct's fields drop in declaration order).
    handles: H,
    /// Dropped after every handle: waits until sled has closed its file.
    closed: CloseWait,
}

impl<H> Deref for Sled<H> {
    type Target = H;

    fn deref(&self) -> &H {
        &self.handles
    }
}

impl Sled<sled::Db> {
    /// Opens (or creates) the sled database in `dir`.
    pub(super) fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).open().map_err(|e| match &e {
            // sled reports a held lock as a generic I/O error; name it, because the fix is to
            // stop the other process.
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                StoreError::Locked(dir.to_owned())
            }
            _ => StoreError::Sled(e),
        })?;
        Ok(Self {
            handles: db,
            closed: CloseWait {
                db_file: dir.join("db"),
            },
        })
    }
}

impl<H> Sled<H> {
    /// Turns the handles into others (the `Db` into the `Db` and its trees). `f` owns the old
    /// handles: on an error it has dropped them all before the wait runs.
    pub(super) fn try_map<G>(
        self,
        f: impl FnOnce(H) -> Result<G, StoreError>,
    ) -> Result<Sled<G>, StoreError> {
        let Sled { handles, closed } = self;
        let handles = f(handles)?;
        Ok(Sled { handles, closed })
    }
}

/// Blocks, when dropped, until nobody holds the exclusive lock on sled's `db` file.
struct CloseWait {
    db_file: PathBuf,
}

impl Drop for CloseWait {
    fn drop(&mut self) {
        // Why the last handle's drop is not enough (measured, sled 0.34.7): `Db::flush` and
        // the flush in sled's own drop wait until the log is *stable*, and a log buffer is
        // written by a task on sled's I/O thread pool (`threadpool::spawn` in
        // `pagecache/iobuf.rs` `maybe_seal_and_write_iobuf`, and in `logger.rs`) that owns a
        // clone of `Arc<IoBufs>`, hence of the `RunningConfig` and its `Arc<File>`. That task
        // marks the buffer stable (waking the flush) and then goes on (`sa_stabilize`,
        // segment bookkeeping) before its closure, and with it the file, is dropped. So the
        // file and its `flock` outlive our last handle by that tail, up to milliseconds on a
        // busy machine: in a probe 8 to 15 of 500 open/write/flush/drop rounds found the lock
        // still held right after the drop, each time with exactly that write task alive (with
        // or without the periodic flusher, which sled joins on drop). The lock is an `flock`
        // on the open file, so a second open of the same file in this process conflicts with
        // it until sled's descriptor is closed: taking it blocking waits for exactly that
        // moment, no longer, and needs no retry. It is released again when `f` is closed.
        let Ok(f) = File::open(&self.db_file) else {
            // No file (a store never created, or removed): nothing is held.
            return;
        };
        if let Err(error) = f.lock_exclusive() {
            tracing::warn!(path = %self.db_file.display(), %error, "waiting for the store's lock to be released failed");
        }
    }
}
