//! The store's two engines behind one small set of ordered key-value operations: sled trees
//! (the embedded default) or PostgreSQL tables (`pg`). `Store`, `RawStore`, the audit chain,
//! the history and the merge of a restore are written once on top of [`Kv`], so both engines
//! keep the same records the same way (content keys sealed, the key check, the chain).
//!
//! Keys are sled's byte strings everywhere above this module: text ids, a NUL between parts,
//! numbers big-endian. [`Tree::layout`] says how each tree's key splits into parts, which the
//! PostgreSQL engine keeps as explicit key columns ordered exactly as the bytes are.

use std::ops::Bound;
use std::sync::Arc;

use super::closing::Sled;
use super::pg::Pg;
use super::StoreError;

/// Every tree (sled) or table (PostgreSQL) of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Tree {
    Meta,
    Devices,
    Releases,
    Chunks,
    Campaigns,
    Progress,
    History,
    Audit,
    /// Each member's own part of its job (`MemberJob`), beside its progress row.
    Jobs,
}

/// One part of a key, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// UTF-8 text without NUL; followed by a NUL unless it is the key's last part.
    Text,
    /// A big-endian u32 (kept as a bigint in PostgreSQL).
    U32,
    /// A big-endian u64 below 2^63 (a bigint).
    U64,
}

impl Tree {
    pub(crate) const ALL: [Tree; 9] = [
        Tree::Meta,
        Tree::Devices,
        Tree::Releases,
        Tree::Chunks,
        Tree::Campaigns,
        Tree::Progress,
        Tree::History,
        Tree::Audit,
        Tree::Jobs,
    ];

    /// The sled tree's name, which is also the tree's name in a backup.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Tree::Meta => "meta",
            Tree::Devices => "devices",
            Tree::Releases => "releases",
            Tree::Chunks => "chunks",
            Tree::Campaigns => "campaigns",
            Tree::Progress => "progress",
            Tree::History => super::HISTORY_TREE,
            Tree::Audit => super::AUDIT_TREE,
            Tree::Jobs => "jobs",
        }
    }

    pub(crate) fn from_name(name: &[u8]) -> Option<Tree> {
        Tree::ALL.into_iter().find(|t| t.name().as_bytes() == name)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// How the tree's keys split into parts (see the module docs).
    pub(crate) fn layout(self) -> &'static [Part] {
        match self {
            Tree::Meta | Tree::Devices | Tree::Releases | Tree::Campaigns => &[Part::Text],
            Tree::Chunks => &[Part::Text, Part::U32],
            Tree::Progress | Tree::Jobs => &[Part::Text, Part::Text],
            Tree::History => &[Part::Text, Part::U64],
            Tree::Audit => &[Part::U64],
        }
    }
}

/// A range of one tree: keys starting with `prefix`, from `from` on, in key order (or reversed),
/// at most `limit`.
#[derive(Debug, Clone)]
pub(crate) struct Scan {
    pub prefix: Vec<u8>,
    pub from: Bound<Vec<u8>>,
    pub rev: bool,
    pub limit: usize,
    /// `false`: values are left empty (counting, listing keys).
    pub values: bool,
}

impl Scan {
    /// Every key starting with `prefix`, in order.
    pub(crate) fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        Scan {
            prefix: prefix.into(),
            from: Bound::Unbounded,
            rev: false,
            limit: usize::MAX,
            values: true,
        }
    }

    pub(crate) fn all() -> Self {
        Self::prefix(Vec::new())
    }

    pub(crate) fn from(mut self, from: Bound<Vec<u8>>) -> Self {
        self.from = from;
        self
    }

    pub(crate) fn rev(mut self) -> Self {
        self.rev = true;
        self
    }

    pub(crate) fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    pub(crate) fn keys_only(mut self) -> Self {
        self.values = false;
        self
    }

    /// The range's bounds in sled's terms: from the later of `prefix` and `from`, up to the
    /// first key past the prefix.
    pub(crate) fn bounds(&self) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
        let lower = match &self.from {
            Bound::Included(f) if f.as_slice() > self.prefix.as_slice() => {
                Bound::Included(f.clone())
            }
            Bound::Excluded(f) if f.as_slice() >= self.prefix.as_slice() => {
                Bound::Excluded(f.clone())
            }
            _ => Bound::Included(self.prefix.clone()),
        };
        let upper = match prefix_successor(&self.prefix) {
            Some(s) => Bound::Excluded(s),
            None => Bound::Unbounded,
        };
        (lower, upper)
    }
}

/// The first key after every key starting with `prefix` (`None`: no such key bounds it).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < u8::MAX {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

/// A record as a scan returns it.
pub(crate) type Entry = (Vec<u8>, Vec<u8>);

/// Every sled handle of a store.
pub(crate) struct SledTrees {
    db: sled::Db,
    trees: Vec<sled::Tree>,
}

/// The engine a store runs on. Clones share it.
#[derive(Clone)]
pub(crate) enum Kv {
    Sled(Arc<Sled<SledTrees>>),
    Pg(Pg),
}

impl Kv {
    /// Opens every tree of a sled database.
    pub(crate) fn sled(db: Sled<sled::Db>) -> Result<Self, StoreError> {
        let trees = db.try_map(|db| {
            let trees = Tree::ALL
                .iter()
                .map(|t| db.open_tree(t.name()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(SledTrees { db, trees })
        })?;
        Ok(Kv::Sled(Arc::new(trees)))
    }

    pub(crate) fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.trees[tree.index()].get(key)?.map(|v| v.to_vec())),
            Kv::Pg(pg) => pg.get(tree, key),
        }
    }

    /// Writes a record; durable at the next [`Kv::flush`], visible to reads at once.
    pub(crate) fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        match self {
            Kv::Sled(s) => {
                s.trees[tree.index()].insert(key, value)?;
                Ok(())
            }
            Kv::Pg(pg) => pg.write(tree, key.to_vec(), Some(value.to_vec())),
        }
    }

    /// [`Kv::insert`], returning the record it replaced. sled finds it on the way (a separate
    /// [`Kv::get`] first walked the tree twice: a third of the cost of recording a member's
    /// progress while a campaign's jobs went out); PostgreSQL reads it first.
    pub(crate) fn replace(
        &self,
        tree: Tree,
        key: &[u8],
        value: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.trees[tree.index()]
                .insert(key, value)?
                .map(|v| v.to_vec())),
            Kv::Pg(pg) => {
                let before = pg.get(tree, key)?;
                pg.write(tree, key.to_vec(), Some(value.to_vec()))?;
                Ok(before)
            }
        }
    }

    pub(crate) fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        match self {
            Kv::Sled(s) => {
                s.trees[tree.index()].remove(key)?;
                Ok(())
            }
            Kv::Pg(pg) => pg.write(tree, key.to_vec(), None),
        }
    }

    /// Removes every record of `tree`.
    pub(crate) fn clear(&self, tree: Tree) -> Result<(), StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.trees[tree.index()].clear()?),
            Kv::Pg(pg) => pg.clear(tree),
        }
    }

    pub(crate) fn scan(&self, tree: Tree, scan: &Scan) -> Result<Vec<Entry>, StoreError> {
        match self {
            Kv::Sled(s) => {
                let range = s.trees[tree.index()].range(scan.bounds());
                let take =
                    |it: &mut dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>| {
                        it.take(scan.limit)
                            .map(|kv| {
                                let (k, v) = kv?;
                                let v = if scan.values { v.to_vec() } else { Vec::new() };
                                Ok((k.to_vec(), v))
                            })
                            .collect::<Result<Vec<_>, StoreError>>()
                    };
                if scan.rev {
                    take(&mut range.rev())
                } else {
                    take(&mut { range })
                }
            }
            Kv::Pg(pg) => pg.scan(tree, scan),
        }
    }

    /// Makes every earlier write durable; on an error, none of the writes since the last
    /// successful flush is known to be.
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        match self {
            Kv::Sled(s) => {
                s.db.flush()?;
                Ok(())
            }
            Kv::Pg(pg) => pg.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_successor_bounds_exactly_the_keys_with_that_prefix() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b"\xff\xff"), None);
        assert_eq!(prefix_successor(b""), None);
    }

    #[test]
    fn every_tree_is_found_by_its_name() {
        for t in Tree::ALL {
            assert_eq!(Tree::from_name(t.name().as_bytes()), Some(t));
            assert_eq!(Tree::ALL[t.index()], t);
        }
        assert_eq!(Tree::from_name(b"__sled__default"), None);
    }
}
