//! The audit log: an append-only, hash-chained record of what operators did and what the
//! orchestrator decided on its own (a rollout pausing itself, a device timed out is not logged:
//! its progress record says so). Each entry's hash covers the previous entry's hash and the
//! entry itself, so a removed, reordered or edited entry breaks the chain from there on; the
//! chain is checked when it is read (`verify`). It lives in the store's `audit` tree, so backups
//! carry it and a restore keeps the longer of two logs.

use aloft_proto::crypto::sha256;
use serde::{Deserialize, Serialize};

use super::kv::{Scan, Tree};
use super::{decode, encode, Store, StoreError};

/// The tree holding the log; keys are big-endian sequence numbers.
pub const AUDIT_TREE: &str = "audit";

/// Entries read per page while the chain is verified.
const VERIFY_PAGE: usize = 1024;

/// What happened, before it is numbered and chained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// An operator id, or `orchestrator` for its own decisions.
    pub actor: String,
    /// The admin operation (`campaign_pause`, `trust_update`, ...) or the decision.
    pub action: String,
    /// What it was about: a campaign, an artifact, a root version (free text, short).
    pub subject: String,
    /// `ok` or the refusal's error code.
    pub outcome: String,
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at_ms: u64,
    #[serde(flatten)]
    pub event: AuditEvent,
    /// The previous entry's hash (64 zeros for the first).
    pub prev: String,
    /// SHA-256 over `prev` and this entry's other fields, hex.
    pub hash: String,
}

fn entry_hash(seq: u64, at_ms: u64, event: &AuditEvent, prev: &str) -> String {
    let body = serde_json::json!({
        "seq": seq, "at_ms": at_ms, "actor": event.actor, "action": event.action,
        "subject": event.subject, "outcome": event.outcome, "prev": prev,
    });
    hex::encode(sha256(body.to_string().as_bytes()))
}

/// Where the chain broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the audit log is broken at entry {seq}: {why}")]
pub struct AuditBreak {
    pub seq: u64,
    pub why: &'static str,
}

impl Store {
    /// Appends an entry (durable with the caller's next flush) and returns it.
    pub fn append_audit(&self, event: AuditEvent, at_ms: u64) -> Result<AuditEntry, StoreError> {
        let newest = self.kv.scan(Tree::Audit, &Scan::all().rev().limit(1))?;
        let (seq, prev) = match newest.first() {
            Some((k, v)) => {
                let last: AuditEntry = decode(k, v)?;
                (last.seq + 1, last.hash)
            }
            None => (1, "0".repeat(64)),
        };
        let hash = entry_hash(seq, at_ms, &event, &prev);
        let entry = AuditEntry {
            seq,
            at_ms,
            event,
            prev,
            hash,
        };
        self.kv
            .insert(Tree::Audit, &seq.to_be_bytes(), &encode(&entry))?;
        Ok(entry)
    }

    /// Entries from `since` (inclusive), at most `limit`.
    pub fn audit(&self, since: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let from = std::ops::Bound::Included(since.to_be_bytes().to_vec());
        self.scan(Tree::Audit, &Scan::all().from(from).limit(limit))
    }

    /// Walks the whole chain; returns the number of entries, or where it breaks.
    pub fn verify_audit(&self) -> Result<Result<u64, AuditBreak>, StoreError> {
        let mut prev = "0".repeat(64);
        let mut expected = 1u64;
        // A page at a time: the log grows without bound.
        let mut from = std::ops::Bound::Unbounded;
        loop {
            let page = self.kv.scan(
                Tree::Audit,
                &Scan::all().from(from.clone()).limit(VERIFY_PAGE),
            )?;
            let Some((last, _)) = page.last() else {
                break;
            };
            from = std::ops::Bound::Excluded(last.clone());
            for (k, v) in page {
                let e: AuditEntry = decode(&k, &v)?;
                let broken = |why| Ok(Err(AuditBreak { seq: e.seq, why }));
                if e.seq != expected || k[..] != e.seq.to_be_bytes() {
                    return broken("a sequence number is missing or out of place");
                }
                if e.prev != prev {
                    return broken("it does not follow the entry before it");
                }
                if e.hash != entry_hash(e.seq, e.at_ms, &e.event, &e.prev) {
                    return broken("its content does not match its hash");
                }
                prev = e.hash;
                expected += 1;
            }
        }
        Ok(Ok(expected - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str) -> AuditEvent {
        AuditEvent {
            actor: "alice".into(),
            action: action.into(),
            subject: "c-1".into(),
            outcome: "ok".into(),
        }
    }

    #[test]
    fn the_chain_verifies_and_any_edit_breaks_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::tests::new_store(dir.path());
        for a in ["campaign_create", "campaign_pause", "campaign_resume"] {
            store.append_audit(event(a), 7).unwrap();
        }
        assert_eq!(store.verify_audit().unwrap(), Ok(3));
        let all = store.audit(1, 10).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].prev, all[1].hash);
        assert_eq!(store.audit(2, 1).unwrap()[0].event.action, "campaign_pause");

        // Someone with write access to the store rewrites history.
        let mut forged = all[1].clone();
        forged.event.action = "campaign_resume".into();
        store
            .kv
            .insert(Tree::Audit, &2u64.to_be_bytes(), &encode(&forged))
            .unwrap();
        assert_eq!(store.verify_audit().unwrap().unwrap_err().seq, 2);
        // ... and removing an entry is noticed too.
        store.kv.remove(Tree::Audit, &2u64.to_be_bytes()).unwrap();
        assert_eq!(store.verify_audit().unwrap().unwrap_err().seq, 3);
    }
}
