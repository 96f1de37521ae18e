//! The fuzz targets' bodies: each takes the bytes a peer or a file feeds and hands them to the
//! project's real parsing entry points. Shared, through `#[path]`, by the AFL binaries in
//! `fuzz/src/bin/` and by the regression test in the normal suite (`tests/fuzz_corpus.rs`),
//! which replays every committed corpus entry and crasher through the same functions.
//!
//! Every target must return without panicking, hanging or allocating without bound, whatever
//! the bytes. A leading selector byte picks one of several closely related parsers where they
//! share one target (said in each function's doc).

use std::io::Read;
use std::path::{Path, PathBuf};

use aloft_proto::manifest::{ReleasePublicKey, SignedManifest};
use aloft_proto::messages::{
    self, ChunkRequest, Heartbeat, Job, RenewalRequest, RenewalResponse, StatusAck, StatusReport,
};
use aloft_proto::trust::{SignedRoot, TrustedRoot};
use aloft_vault::{KeySlots, MasterKey, RecoveryKey, Unlock};
use base64::Engine as _;

/// The recovery key that seals the vault and backup seeds. Not a secret: fuzzing only.
pub const RECOVERY_KEY_HEX: &str =
    "6675e2a5c0ffee00112233445566778899aabbccddeeff00f00dfeedfacecafe";

/// The stream key, nonce prefix and associated data of the raw STREAM seeds.
pub const STREAM_KEY: [u8; 32] = [7; 32];
pub const STREAM_PREFIX: [u8; 7] = [1, 2, 3, 4, 5, 6, 7];
pub const STREAM_AAD: &[u8] = b"aloft-fuzz-stream";
/// A small segment so that short inputs still span several segments.
pub const STREAM_SEGMENT: usize = 1024;

/// What the targets trust: the real CA certificate, the pinned root and the release key the
/// seeds were made with (`fuzz/fixtures/`, written by the `seeds` tool).
pub struct Fixtures {
    pub ca_pem: String,
    pub root: Option<TrustedRoot>,
    pub release_keys: Vec<ReleasePublicKey>,
    pub unlock: Unlock,
}

impl Fixtures {
    pub fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
    }

    /// Loads the fixtures from `dir`. A missing fixture makes the targets that need it do less;
    /// it never makes them panic.
    pub fn load(dir: &Path) -> Fixtures {
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let root = serde_json::from_str::<SignedRoot>(&read("root.json"))
            .ok()
            .and_then(|s| TrustedRoot::pin(s).ok());
        let release_keys = read("release.pub")
            .lines()
            .filter_map(|l| ReleasePublicKey::from_hex(l.trim()).ok())
            .collect();
        let unlock = RecoveryKey::parse(RECOVERY_KEY_HEX)
            .map(Unlock::RecoveryKey)
            .unwrap_or_else(|| Unlock::Passphrase(aloft_vault::Passphrase::new("x")));
        Fixtures {
            ca_pem: read("ca.crt"),
            root,
            release_keys,
            unlock,
        }
    }
}

/// The front's MQTT framing, CONNECT/PUBLISH/SUBSCRIBE decoding and ACL checks over a client
/// byte stream (first byte: device or operator size cap).
pub fn mqtt_front(data: &[u8]) {
    let _ = aloft_broker::front::fuzzing::fuzz_client_stream(data);
}

/// Selector byte, then the payload: the JSON messages a device or an operator sends (status,
/// chunk request, heartbeat, renewal, admin request), those a device receives (job, ack,
/// renewal response), chunk frames, and inbound topic names.
pub fn messages(data: &[u8]) {
    let Some((&sel, payload)) = data.split_first() else {
        return;
    };
    match sel % 9 {
        0 => {
            if let Ok(m) = messages::decode::<StatusReport>(payload) {
                let _ = messages::encode(&m);
            }
        }
        1 => {
            if let Ok(m) = messages::decode::<ChunkRequest>(payload) {
                // Validated requests are bounded: walking their indices must be cheap.
                let _ = m.indices().count();
            }
        }
        2 => {
            let _ = messages::decode::<Heartbeat>(payload);
        }
        3 => {
            if let Ok(m) = messages::decode::<RenewalRequest>(payload) {
                let _ = aloft_certs::vet_device_csr(&m.csr);
            }
        }
        4 => {
            let _ = messages::decode::<aloft_orchestrator::admin::wire::AdminRequest>(payload);
        }
        5 => {
            let _ = messages::decode::<Job>(payload);
        }
        6 => {
            let _ = messages::decode::<StatusAck>(payload);
            let _ = messages::decode::<RenewalResponse>(payload);
        }
        7 => {
            if let Ok(aloft_proto::chunkframe::ChunkFrame::Data { sealed, .. }) =
                aloft_proto::chunkframe::decode(payload)
            {
                let _ = sealed.len();
            }
        }
        _ => {
            if let Ok(topic) = std::str::from_utf8(payload) {
                let _ = aloft_proto::topics::parse_inbound(topic);
            }
        }
    }
}

/// Selector byte, then JSON: a job (roots walked from the pinned root, then its manifest
/// verified, as a device does), a signed manifest (verified, and peeked as the orchestrator
/// displays it), or a signed root (pinned, and offered as the next root).
pub fn signed(data: &[u8], fx: &Fixtures) {
    let Some((&sel, payload)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => {
            let Ok(job) = messages::decode::<Job>(payload) else {
                return;
            };
            if let Some(root) = &fx.root {
                let mut trust = root.clone();
                let _ = trust.update(&job.roots);
                let _ = trust.check_fresh(0);
                let _ = trust.verify_manifest(&job.manifest);
            }
            manifest(&job.manifest, fx);
        }
        1 => {
            if payload.len() > messages::MAX_JOB_BYTES {
                return;
            }
            if let Ok(m) = serde_json::from_slice::<SignedManifest>(payload) {
                manifest(&m, fx);
            }
        }
        _ => {
            if payload.len() > messages::MAX_JOB_BYTES {
                return;
            }
            let Ok(signed) = serde_json::from_slice::<SignedRoot>(payload) else {
                return;
            };
            let _ = signed.peek_unverified();
            if let Some(root) = &fx.root {
                let mut trust = root.clone();
                let _ = trust.update(std::slice::from_ref(&signed));
            }
            let _ = TrustedRoot::pin(signed);
        }
    }
}

fn manifest(m: &SignedManifest, fx: &Fixtures) {
    let _ = m.verify(&fx.release_keys);
    if let Ok(peeked) = m.peek_unverified() {
        // Peeked, not validated: what `aloft release upload` and the audit log see.
        let _ = peeked.validate();
        let _ = peeked.chunk_digests();
        let _ = peeked.image_digest();
        for i in [0, peeked.chunk_count.saturating_sub(1), peeked.chunk_count] {
            let _ = peeked.chunk_digest(i);
            let _ = peeked.sealed_len(i);
        }
    }
}

/// Selector byte, then bytes: a certificate as the front and the identity code read it (DER),
/// a CSR as renewal vets it, a CRL as the front verifies it against the real CA, and PEM
/// certificate text. The high bit of the selector wraps DER input in PEM, so that the fuzzer
/// mutates the DER rather than the base64.
pub fn x509(data: &[u8], fx: &Fixtures) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let text = |label: &str| -> String {
        if sel & 0x80 != 0 {
            let b64 = base64::engine::general_purpose::STANDARD.encode(body);
            format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
        } else {
            String::from_utf8_lossy(body).into_owned()
        }
    };
    match sel & 0x7F {
        s if s % 4 == 0 => {
            if let Ok(id) = aloft_certs::parse_identity(body) {
                let _ = id.device_id();
                let _ = id.operator_id();
                let _ = id.serial_hex();
            }
            let _ = aloft_broker::front::Peer::from_certificate(body);
        }
        s if s % 4 == 1 => {
            let _ = aloft_certs::vet_device_csr(&text("CERTIFICATE REQUEST"));
        }
        s if s % 4 == 2 => {
            if let Ok(crl) =
                aloft_certs::revocation::VerifiedCrl::parse(&text("X509 CRL"), &fx.ca_pem)
            {
                let _ = crl.is_revoked(&[1, 2, 3]);
            }
        }
        _ => {
            let pem = text("CERTIFICATE");
            let _ = aloft_certs::cert_serial(&pem);
            let _ = aloft_certs::cert_public_key_matches(&pem, &pem);
        }
    }
}

/// Selector byte, then bytes: a sealed key file opened with the recovery key, a STREAM
/// (the backup body's encryption) read to its end, key slots, and unlock text.
pub fn vault(data: &[u8], fx: &Fixtures) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match sel % 4 {
        0 => {
            let _ = aloft_vault::open_sealed(body, &fx.unlock);
        }
        1 => {
            let key = MasterKey::from_bytes(zeroize::Zeroizing::new(STREAM_KEY));
            let mut r = aloft_vault::stream::StreamReader::new(
                &key,
                STREAM_PREFIX,
                STREAM_AAD.to_vec(),
                STREAM_SEGMENT,
                body,
            );
            let mut sink = [0u8; 4096];
            while let Ok(n) = r.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        }
        2 => {
            if let Ok((slots, _)) = KeySlots::decode(body) {
                let _ = slots.kdf_params();
                let _ = slots.has_recovery_key();
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(body) {
                // Only the parse: a passphrase would cost an Argon2id derivation per input.
                let _ = Unlock::parse(text);
            }
        }
    }
}

/// A backup file: its header inspected, then restored (with the recovery key) into a fresh
/// data directory under `scratch`.
pub fn backup(data: &[u8], fx: &Fixtures, scratch: &Path) {
    let file = scratch.join("in.bak");
    let data_dir = scratch.join("data");
    let _ = std::fs::remove_dir_all(&data_dir);
    if std::fs::write(&file, data).is_err() {
        return;
    }
    let _ = aloft_orchestrator::backup::inspect(&file);
    let _ = aloft_orchestrator::backup::restore(&file, &data_dir, &fx.unlock);
    let _ = std::fs::remove_dir_all(&data_dir);
}
