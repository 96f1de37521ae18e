//! The root of trust and the CRL in force, shared by replicas through the database.
//!
//! A single process keeps both in its data directory (`trust/root-*.json`, `crl.pem`), and
//! `trust_update` and `crl_update` write them there. Replicas on separate hosts each have their
//! own data directory, so the leader also writes each accepted root and each CRL it applies to
//! the store (`Store::put_shared`), and a replica that becomes the leader first brings the two
//! up to date both ways: whichever is newer, its files or the database, wins and is written to
//! the other. Nothing is taken on the database's word: roots must walk forward from the
//! replica's own pinned root under the root role's thresholds (`TrustState::accept`), and a
//! CRL must be signed by the fleet CA (`VerifiedCrl::parse`); a newer CRL wins by its number.
//! So a takeover never lowers security state (an older root, a CRL that un-revokes).

use std::path::Path;

use aloft_certs::revocation::{write_file_atomically, VerifiedCrl};
use aloft_proto::trust::SignedRoot;
use tracing::{info, warn};

use crate::store::Store;
use crate::trust::TrustState;

/// The CRL in force, as PEM.
const CRL: &str = "crl.pem";
/// Every accepted root above the pinned one, as a JSON array, oldest first.
const ROOTS: &str = "roots";

fn shared_roots(store: &Store) -> Result<Vec<SignedRoot>, String> {
    match store.shared(ROOTS).map_err(|e| e.to_string())? {
        None => Ok(Vec::new()),
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("the shared roots: {e}")),
    }
}

fn version(root: &SignedRoot) -> u64 {
    root.peek_unverified().map(|r| r.version).unwrap_or(0)
}

/// What the files and the database agree on after [`sync`].
pub struct Synced {
    pub trust: TrustState,
    pub crl: Option<VerifiedCrl>,
}

/// Writes roots the leader accepted (`trust_update`) for the other replicas, beside those
/// already there.
pub fn share_roots(store: &Store, roots: &[SignedRoot]) -> Result<(), String> {
    let mut all = shared_roots(store).unwrap_or_else(|e| {
        warn!(error = %e, "unreadable roots in the database; replaced");
        Vec::new()
    });
    let before = all.len();
    for root in roots {
        if !all.iter().any(|r| version(r) == version(root)) {
            all.push(root.clone());
        }
    }
    if all.len() == before {
        return Ok(());
    }
    all.sort_by_key(version);
    let bytes = serde_json::to_vec(&all).map_err(|e| e.to_string())?;
    store.put_shared(ROOTS, &bytes).map_err(|e| e.to_string())
}

/// Writes the CRL the leader put in force (`crl_update`) for the other replicas.
pub fn share_crl(store: &Store, pem: &str) -> Result<(), String> {
    store
        .put_shared(CRL, pem.as_bytes())
        .map_err(|e| e.to_string())
}

/// Brings the trust directory, `crl.pem` and the database up to date with each other, and
/// returns what is in force. Blocking (files and the store): call off the runtime's threads.
/// The store's writes are flushed before it returns.
pub fn sync(
    store: &Store,
    trust_dir: &Path,
    crl_path: &Path,
    ca_pem: &str,
) -> Result<Synced, String> {
    let mut trust = TrustState::load(trust_dir).map_err(|e| e.to_string())?;
    let from_db = shared_roots(store).unwrap_or_else(|e| {
        warn!(error = %e, "unreadable roots in the database; ours stay and replace them");
        Vec::new()
    });
    let before = trust.trusted.version();
    match trust.accept(&from_db, Some(trust_dir)) {
        Ok(0) => {}
        Ok(_) => info!(
            from = before,
            to = trust.trusted.version(),
            "newer roots from the database written to the trust directory"
        ),
        // A root that does not walk forward from ours is not taken: ours stay in force.
        Err(e) => warn!(error = %e, "the database's roots do not follow ours; ours stay"),
    }
    share_roots(store, trust.chain())?;

    let parse = |pem: &str, from: &str| match VerifiedCrl::parse(pem, ca_pem) {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, from, "a CRL that does not verify against the fleet CA; skipped");
            None
        }
    };
    let local_pem = match std::fs::read_to_string(crl_path) {
        Ok(p) => Some(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("reading {}: {e}", crl_path.display())),
    };
    let local = local_pem.as_deref().and_then(|p| parse(p, "crl.pem"));
    let db_pem = store
        .shared(CRL)
        .map_err(|e| e.to_string())?
        .and_then(|v| String::from_utf8(v).ok());
    let db = db_pem.as_deref().and_then(|p| parse(p, "the database"));
    let crl = match (local, db) {
        (Some(l), Some(d)) if d.number > l.number => {
            take_crl(crl_path, &d, db_pem.as_deref())?;
            Some(d)
        }
        (None, Some(d)) => {
            take_crl(crl_path, &d, db_pem.as_deref())?;
            Some(d)
        }
        (Some(l), d) => {
            if d.is_none_or(|d| d.number < l.number) {
                if let Some(pem) = &local_pem {
                    share_crl(store, pem)?;
                }
            }
            Some(l)
        }
        (None, None) => None,
    };
    store.flush().map_err(|e| e.to_string())?;
    Ok(Synced { trust, crl })
}

/// Puts the database's newer CRL in force here: written to `crl.pem` before it counts.
fn take_crl(path: &Path, crl: &VerifiedCrl, pem: Option<&str>) -> Result<(), String> {
    let Some(pem) = pem else { return Ok(()) };
    write_file_atomically(path, pem.as_bytes(), 0o600).map_err(|e| e.to_string())?;
    info!(
        crl_number = crl.number,
        "a newer CRL from the database is in force"
    );
    Ok(())
}
