//! The orchestrator's root of trust on disk: every root it accepted, as `trust/root-<N>.json`
//! (signed root metadata, `aloft_proto::trust`). The lowest file is pinned as installed by the
//! operator; each later one must walk forward from it, exactly as on a device. The newest root
//! decides which release keys (and how many) must sign an upload, and the roots above version 1
//! travel in every job so devices can walk forward too.

use std::path::{Path, PathBuf};

use aloft_proto::trust::{SignedRoot, TrustError, TrustedRoot, MAX_ROOT_CHAIN};

/// Why the trust directory could not be used. Start-up refuses to run without a root.
#[derive(Debug, thiserror::Error)]
pub enum TrustStoreError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not signed root metadata: {error}")]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("no root metadata in {0}: install one with `aloft trust install`")]
    Empty(PathBuf),
    #[error(transparent)]
    Trust(#[from] TrustError),
}

fn io(path: &Path, error: std::io::Error) -> TrustStoreError {
    TrustStoreError::Io {
        path: path.to_owned(),
        error,
    }
}

/// The accepted roots, newest trusted.
#[derive(Debug, Clone)]
pub struct TrustState {
    pub trusted: TrustedRoot,
    /// Accepted roots above the pinned one, oldest first.
    chain: Vec<SignedRoot>,
}

impl TrustState {
    /// Pins the lowest of `roots` and walks forward through the others.
    pub fn from_roots(mut roots: Vec<SignedRoot>) -> Result<Self, TrustStoreError> {
        let version = |s: &SignedRoot| s.peek_unverified().map(|r| r.version).unwrap_or(0);
        roots.sort_by_key(version);
        let mut it = roots.into_iter();
        let Some(first) = it.next() else {
            return Err(TrustStoreError::Empty(PathBuf::new()));
        };
        let mut state = TrustState {
            trusted: TrustedRoot::pin(first)?,
            chain: Vec::new(),
        };
        let rest: Vec<SignedRoot> = it.collect();
        // Walk in bounded steps: an orchestrator may have accepted more roots over its life
        // than one device update allows.
        for window in rest.chunks(MAX_ROOT_CHAIN) {
            state.trusted.update(window)?;
        }
        state.chain = rest;
        Ok(state)
    }

    /// Reads `dir/root-*.json`.
    pub fn load(dir: &Path) -> Result<Self, TrustStoreError> {
        let mut roots = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TrustStoreError::Empty(dir.to_owned()))
            }
            Err(e) => return Err(io(dir, e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| io(dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !(name.starts_with("root-") && name.ends_with(".json")) {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
            let signed: SignedRoot = serde_json::from_slice(&bytes)
                .map_err(|error| TrustStoreError::Parse { path, error })?;
            roots.push(signed);
        }
        Self::from_roots(roots).map_err(|e| match e {
            TrustStoreError::Empty(_) => TrustStoreError::Empty(dir.to_owned()),
            other => other,
        })
    }

    /// Walks forward through `roots`; with `dir`, writes each accepted root there (atomically)
    /// before it counts. Returns how many were accepted; on error nothing changes.
    pub fn accept(
        &mut self,
        roots: &[SignedRoot],
        dir: Option<&Path>,
    ) -> Result<usize, TrustStoreError> {
        let mut next = self.trusted.clone();
        let n = next.update(roots)?;
        if n == 0 {
            return Ok(0);
        }
        let mut accepted: Vec<SignedRoot> = roots
            .iter()
            .filter(|s| {
                s.peek_unverified()
                    .is_ok_and(|r| r.version > self.trusted.version())
            })
            .cloned()
            .collect();
        accepted.sort_by_key(|s| s.peek_unverified().map(|r| r.version).unwrap_or(0));
        if let Some(dir) = dir {
            for s in &accepted {
                write_root(dir, s)?;
            }
        }
        self.trusted = next;
        self.chain.extend(accepted);
        Ok(n)
    }

    /// Every accepted root above the pinned one, oldest first.
    pub fn chain(&self) -> &[SignedRoot] {
        &self.chain
    }

    /// What a job carries: the newest accepted roots above the pinned one, at most
    /// [`MAX_ROOT_CHAIN`] (a device further behind must be re-provisioned).
    pub fn job_chain(&self) -> &[SignedRoot] {
        let skip = self.chain.len().saturating_sub(MAX_ROOT_CHAIN);
        &self.chain[skip..]
    }

    /// What a job carried when `version` was the newest root: [`Self::job_chain`] as it was
    /// then (roots accepted later left out).
    pub fn job_chain_at(&self, version: u64) -> Vec<SignedRoot> {
        let upto: Vec<&SignedRoot> = self
            .chain
            .iter()
            .filter(|s| s.peek_unverified().is_ok_and(|r| r.version <= version))
            .collect();
        let skip = upto.len().saturating_sub(MAX_ROOT_CHAIN);
        upto[skip..].iter().map(|s| (*s).clone()).collect()
    }
}

/// Writes `dir/root-<version>.json` atomically (temp file, fsync, rename, directory fsync).
pub fn write_root(dir: &Path, signed: &SignedRoot) -> Result<PathBuf, TrustStoreError> {
    let version = signed.peek_unverified()?.version;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let path = dir.join(format!("root-{version}.json"));
    let bytes = serde_json::to_vec_pretty(signed).unwrap_or_default();
    aloft_vault::write_atomic(&path, &bytes, 0o644, true)
        .map_err(|e| io(&path, std::io::Error::other(e.to_string())))?;
    Ok(path)
}

/// Installs roots into a data directory's trust dir (offline, before `aloft serve`): the first
/// install pins the lowest; later installs must walk forward from what is there.
pub fn install(dir: &Path, roots: Vec<SignedRoot>) -> Result<u64, TrustStoreError> {
    match TrustState::load(dir) {
        Ok(mut state) => {
            state.accept(&roots, Some(dir))?;
            Ok(state.trusted.version())
        }
        Err(TrustStoreError::Empty(_)) => {
            let state = TrustState::from_roots(roots.clone())?;
            for s in &roots {
                write_root(dir, s)?;
            }
            Ok(state.trusted.version())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_proto::manifest::ReleaseSigningKey;
    use aloft_proto::trust::{Role, Root, ROOT_FORMAT};
    use std::collections::BTreeMap;

    fn root(version: u64, root_key: &ReleaseSigningKey, release: &ReleaseSigningKey) -> SignedRoot {
        let keys: BTreeMap<String, String> = [root_key, release]
            .iter()
            .map(|k| (k.public().key_id(), k.public().to_hex()))
            .collect();
        let r = Root {
            v: ROOT_FORMAT,
            version,
            issued_at: 1,
            expires_at: u64::MAX,
            keys,
            root: Role {
                keyids: vec![root_key.public().key_id()],
                threshold: 1,
            },
            release: Role {
                keyids: vec![release.public().key_id()],
                threshold: 1,
            },
            revoked: Vec::new(),
        };
        let mut s = SignedRoot::new(&r);
        s.sign(root_key).unwrap();
        s
    }

    #[test]
    fn installed_roots_load_back_and_only_forward() {
        let dir = tempfile::tempdir().unwrap();
        let (rk, rel) = (
            ReleaseSigningKey::generate().unwrap(),
            ReleaseSigningKey::generate().unwrap(),
        );
        assert!(matches!(
            TrustState::load(dir.path()),
            Err(TrustStoreError::Empty(_))
        ));
        assert_eq!(install(dir.path(), vec![root(1, &rk, &rel)]).unwrap(), 1);
        assert_eq!(
            install(dir.path(), vec![root(2, &rk, &rel), root(3, &rk, &rel)]).unwrap(),
            3
        );
        let state = TrustState::load(dir.path()).unwrap();
        assert_eq!(state.trusted.version(), 3);
        assert_eq!(state.job_chain().len(), 2);
        // A root signed by a stranger does not walk forward, and nothing is written.
        let stranger = ReleaseSigningKey::generate().unwrap();
        assert!(install(dir.path(), vec![root(4, &stranger, &rel)]).is_err());
        assert!(!dir.path().join("root-4.json").exists());
    }
}
