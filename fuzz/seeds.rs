//! Writes the fuzz fixtures (`fuzz/fixtures/`) and seed corpus (`fuzz/corpus/<target>/`).
//! Every seed is made by the project's own code paths, as in the demo: a data directory made
//! by `ops::init` (sealed CA key, server key and keystore), roots made and signed as `aloft
//! trust` does, a release built and signed as `aloft release build` does, device keys and
//! CSRs made device-side and certificates issued by the CA, a CRL signed by it, a real backup
//! of the data directory, the messages a device and an operator exchange, and the MQTT frames
//! carrying them (encoded by rumqttd's v5 codec, the one the front decodes with).
//!
//! Run: `cargo run --example fuzz_seeds` (from the repository root). The output replaces the
//! committed corpus; fixtures change too (new keys), so commit both together.

#[path = "src/targets.rs"]
#[allow(dead_code)]
mod targets;

use std::io::Write;
use std::path::Path;

use aloft_certs::Validity;
use aloft_e2e::Lab;
use aloft_orchestrator::admin::wire::{AdminBody, AdminRequest};
use aloft_orchestrator::ops;
use aloft_proto::crypto::{wrap_content_key, ContentKey, DeviceEncryptionKey};
use aloft_proto::manifest::{ReleaseSigningKey, SignedManifest};
use aloft_proto::messages::{self, *};
use aloft_proto::release::ReleaseMeta;
use aloft_proto::{chunkframe, topics, ArtifactId, CampaignId, DeviceId, DeviceState, OperatorId};
use aloft_proto::{Reason, SecurityVersion};
use aloft_vault::{MasterKey, Protection, RecoveryKey};
use anyhow::{Context, Result};
use base64::Engine as _;
use bytes::BytesMut;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    Connect, ConnectProperties, Disconnect, DisconnectReasonCode, Filter, Login, Packet, PingReq,
    Protocol, QoS, RetainForwardRule, Subscribe,
};

fn main() -> Result<()> {
    aloft_certs::tls::install_crypto_provider();
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = fuzz.join("corpus");
    let fixtures = fuzz.join("fixtures");
    let _ = std::fs::remove_dir_all(&corpus);
    std::fs::create_dir_all(&fixtures)?;
    let tmp = tempfile::tempdir()?;
    let data_dir = tmp.path().join("data");
    let recovery = RecoveryKey::parse(targets::RECOVERY_KEY_HEX).context("recovery key")?;
    let protection = Protection::recovery_key(recovery);

    // The orchestrator's data directory, its roots and a release, as `aloft init`, `aloft
    // trust` and `aloft release build` make them.
    let ca = ops::init(
        &data_dir,
        "Aloft Fuzz CA",
        &["localhost".into()],
        &protection,
    )?;
    let root_key = ReleaseSigningKey::generate()?;
    let release_key = ReleaseSigningKey::generate()?;
    let pinned = Lab::make_root(None, &[&root_key], &[&release_key], &[], &[&root_key])?;
    let next_key = ReleaseSigningKey::generate()?;
    let v2 = Lab::make_root(
        Some(&pinned),
        &[&root_key],
        &[&next_key],
        &[release_key.public().key_id()],
        &[&root_key],
    )?;
    ops::install_roots(&data_dir, vec![pinned.clone()])?;
    std::fs::write(fixtures.join("ca.crt"), ca.cert_pem())?;
    std::fs::write(
        fixtures.join("root.json"),
        serde_json::to_vec_pretty(&pinned)?,
    )?;
    std::fs::write(
        fixtures.join("release.pub"),
        release_key.public().to_hex() + "\n",
    )?;

    let image = tmp.path().join("image.bin");
    std::fs::write(&image, aloft_e2e::pseudo_random_image(3000, 7))?;
    let now = aloft_e2e::now_secs();
    let artifact = ArtifactId::new("fw-2.0.0")?;
    let meta = ReleaseMeta {
        artifact: artifact.clone(),
        version: "2.0.0".into(),
        security_version: SecurityVersion(2),
        hardware_model: aloft_e2e::HARDWARE_MODEL.into(),
        chunk_size: 1024,
        created_at: now,
        expires_at: now + 86_400,
        sequence: Some(aloft_e2e::next_sequence()),
        preconditions: None,
    };
    let bundle = tmp.path().join("bundle");
    ops::build_bundle(&image, &meta, &release_key, &bundle)?;
    let manifest_json = std::fs::read(bundle.join(ops::bundle::MANIFEST))?;
    let manifest: SignedManifest = serde_json::from_slice(&manifest_json)?;
    let content_key_hex = std::fs::read_to_string(bundle.join(ops::bundle::CONTENT_KEY))?;
    let chunks = std::fs::read(bundle.join(ops::bundle::CHUNKS))?;
    let sealed_chunk = &chunks[..(1024 + 16).min(chunks.len())];

    // A device, enrolled as device-sim does: keys made device-side, certificate from the CA.
    let device = DeviceId::new("dev-0001")?;
    let x25519 = DeviceEncryptionKey::generate()?;
    let csr = aloft_certs::device_csr(&device, &x25519.public_bytes()?)?;
    let cert_pem = ca.issue_device(&csr.csr_pem, Validity::days(30))?;
    let renewal = aloft_certs::device_renewal_csr(&device, &x25519.public_bytes()?, &csr.key_pem)?;
    let operator = ca.issue_operator(
        &OperatorId::new("ops-1")?,
        aloft_certs::OperatorRole::Operator,
        Validity::days(30),
    )?;
    let serial = aloft_certs::cert_serial(&cert_pem)?;
    let crl = ca.crl(&[serial], 2, 7)?;

    let campaign = CampaignId::new("c-0001")?;
    let content_key = ContentKey::from_bytes(
        hex::decode(content_key_hex.trim())?
            .try_into()
            .map_err(|_| anyhow::anyhow!("content key length"))?,
    );
    let job = Job {
        v: PROTOCOL_VERSION,
        campaign: campaign.clone(),
        manifest: manifest.clone(),
        wrapped_key: wrap_content_key(&x25519.public_bytes()?, &device, &artifact, &content_key)?,
        issued_at: now,
        roots: vec![v2.clone()],
        origin: None,
        deltas: Vec::new(),
    };
    let status = |seq, state, reason| StatusReport {
        v: PROTOCOL_VERSION,
        campaign: campaign.clone(),
        seq,
        state,
        reason,
        detail: reason.map(|_| "health check failed".into()),
        running_version: Some("1.0.0".into()),
    };
    let statuses = [
        status(1, DeviceState::Downloading, None),
        status(2, DeviceState::Verifying, None),
        status(3, DeviceState::Failed, Some(Reason::HealthCheckFailed)),
    ];
    let chunk_request = ChunkRequest {
        v: PROTOCOL_VERSION,
        campaign: campaign.clone(),
        artifact: artifact.clone(),
        ranges: vec![[0, 2], [2, 3]],
    };
    let heartbeat = Heartbeat {
        v: PROTOCOL_VERSION,
        campaign: Some(campaign.clone()),
        running_version: "2.0.0".into(),
        healthy: true,
        detail: None,
    };
    let renewal_req = RenewalRequest {
        v: PROTOCOL_VERSION,
        csr: renewal.csr_pem.clone(),
    };
    let admin = |id: &str, body| AdminRequest {
        v: PROTOCOL_VERSION,
        id: id.into(),
        body,
        auth: None,
    };
    let admins = [
        admin(
            "1",
            AdminBody::ReleasePut {
                manifest: manifest.clone(),
                content_key: content_key_hex.trim().into(),
            },
        ),
        admin(
            "2",
            AdminBody::ReleaseChunk {
                artifact: artifact.clone(),
                index: 0,
                data: base64::engine::general_purpose::STANDARD.encode(sealed_chunk),
            },
        ),
        admin(
            "3",
            AdminBody::CrlUpdate {
                crl: pem("X509 CRL", crl.as_ref()),
            },
        ),
        admin("4", AdminBody::CampaignList {}),
    ];
    let ack = StatusAck {
        v: PROTOCOL_VERSION,
        campaign: campaign.clone(),
        seq: 1,
        outcome: AckOutcome::Applied,
        state: DeviceState::Downloading,
        error: None,
    };
    let renewed = RenewalResponse {
        v: PROTOCOL_VERSION,
        cert: Some(cert_pem.clone()),
        error: None,
        detail: None,
    };

    // messages: selector byte, then the payload.
    let mut w = Writer::new(&corpus, "messages")?;
    for s in &statuses {
        w.put(0, &messages::encode(s))?;
    }
    w.put(1, &messages::encode(&chunk_request))?;
    w.put(2, &messages::encode(&heartbeat))?;
    w.put(3, &messages::encode(&renewal_req))?;
    for a in &admins[1..] {
        w.put(4, &serde_json::to_vec(a)?)?;
    }
    w.put(5, &messages::encode(&job))?;
    w.put(6, &messages::encode(&ack))?;
    w.put(6, &messages::encode(&renewed))?;
    w.put(7, &chunkframe::encode_data(&artifact, 0, 3, sealed_chunk))?;
    w.put(
        7,
        &chunkframe::encode_error(&artifact, 5, chunkframe::ChunkErrorCode::OutOfRange),
    )?;
    for t in [
        topics::status(&device),
        topics::chunk_request(&device),
        topics::health(&device),
        topics::csr(&device),
        topics::admin_request(&OperatorId::new("ops-1")?, "release_put"),
    ] {
        w.put(8, t.as_bytes())?;
    }

    // signed: job, manifest, root.
    let mut w = Writer::new(&corpus, "signed")?;
    w.put(0, &messages::encode(&job))?;
    w.put(1, &manifest_json)?;
    w.put(2, &serde_json::to_vec(&pinned)?)?;
    w.put(2, &serde_json::to_vec(&v2)?)?;

    // x509: certificates (DER), CSRs and CRLs (DER, wrapped in PEM by the target), PEM text.
    let mut w = Writer::new(&corpus, "x509")?;
    for c in [&cert_pem, &operator.cert_pem, ca.cert_pem()] {
        w.put(0, &der(c)?)?;
    }
    w.put(0x81, &der(&csr.csr_pem)?)?;
    w.put(0x81, &der(&renewal.csr_pem)?)?;
    w.put(0x82, crl.as_ref())?;
    w.put(0x01, renewal.csr_pem.as_bytes())?;
    w.put(0x03, cert_pem.as_bytes())?;

    // vault: the data directory's sealed files, a STREAM, key slots, unlock text.
    let mut w = Writer::new(&corpus, "vault")?;
    let ca_key = std::fs::read(data_dir.join("pki").join(aloft_certs::CA_KEY_FILE))?;
    w.put(0, &ca_key)?;
    w.put(0, &aloft_vault::seal(b"a small secret", &protection)?)?;
    let key = MasterKey::from_bytes(zeroize::Zeroizing::new(targets::STREAM_KEY));
    let mut sw = aloft_vault::stream::StreamWriter::new(
        &key,
        targets::STREAM_PREFIX,
        targets::STREAM_AAD.to_vec(),
        targets::STREAM_SEGMENT,
        Vec::new(),
    );
    sw.write_all(&aloft_e2e::pseudo_random_image(2500, 3))?;
    w.put(1, &sw.finish()?)?;
    // Key slots start after the 8-byte magic and the version byte.
    w.put(2, &ca_key[9..])?;
    w.put(3, targets::RECOVERY_KEY_HEX.as_bytes())?;

    // backup: a real backup of the data directory.
    let mut w = Writer::new(&corpus, "backup")?;
    let out = tmp.path().join("fleet.bak");
    aloft_orchestrator::backup::create(&data_dir, &out, &protection)?;
    w.raw(&std::fs::read(&out)?)?;

    // mqtt_front: the streams a device and an operator open with, frame after frame.
    let mut w = Writer::new(&corpus, "mqtt_front")?;
    let mut dev = vec![connect("dev-0001")?];
    dev.push(subscribe(&topics::device_subscription(&device))?);
    for s in &statuses[..2] {
        dev.push(publish(&topics::status(&device), messages::encode(s))?);
    }
    dev.push(publish(
        &topics::chunk_request(&device),
        messages::encode(&chunk_request),
    )?);
    dev.push(publish(
        &topics::health(&device),
        messages::encode(&heartbeat),
    )?);
    dev.push(publish(
        &topics::csr(&device),
        messages::encode(&renewal_req),
    )?);
    dev.push(frame(Packet::PingReq(PingReq))?);
    dev.push(frame(Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    ))?);
    w.put(0, &dev.concat())?;
    let ops_id = OperatorId::new("ops-1")?;
    let ops = [
        connect("ops-1")?,
        subscribe(&topics::operator_reply(&ops_id))?,
        publish(
            &topics::admin_request(&ops_id, "release_put"),
            serde_json::to_vec(&admins[0])?,
        )?,
    ];
    w.put(1, &ops.concat())?;
    println!(
        "fixtures in {}, corpus in {}",
        fixtures.display(),
        corpus.display()
    );
    Ok(())
}

/// Writes numbered seed files for one target.
struct Writer {
    dir: std::path::PathBuf,
    n: usize,
}

impl Writer {
    fn new(corpus: &Path, target: &str) -> Result<Self> {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, n: 0 })
    }
    fn put(&mut self, selector: u8, payload: &[u8]) -> Result<()> {
        self.raw(&[&[selector][..], payload].concat())
    }
    fn raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.n += 1;
        std::fs::write(self.dir.join(format!("seed-{:03}", self.n)), bytes)?;
        Ok(())
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
}

fn der(pem: &str) -> Result<Vec<u8>> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(body)?)
}

fn frame(p: Packet) -> Result<Vec<u8>> {
    let mut buf = BytesMut::new();
    V5.write(p, &mut buf)
        .map_err(|e| anyhow::anyhow!("encoding: {e:?}"))?;
    Ok(buf.to_vec())
}

fn connect(id: &str) -> Result<Vec<u8>> {
    frame(Packet::Connect(
        Connect {
            keep_alive: 30,
            client_id: id.into(),
            clean_session: true,
        },
        Some(ConnectProperties {
            session_expiry_interval: Some(3600),
            receive_maximum: Some(16),
            max_packet_size: Some(65536),
            topic_alias_max: None,
            request_response_info: None,
            request_problem_info: None,
            user_properties: vec![],
            authentication_method: None,
            authentication_data: None,
        }),
        None,
        None,
        None::<Login>,
    ))
}

fn subscribe(filter: &str) -> Result<Vec<u8>> {
    frame(Packet::Subscribe(
        Subscribe {
            pkid: 1,
            filters: vec![Filter {
                path: filter.into(),
                qos: QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            }],
        },
        None,
    ))
}

/// A QoS 1 PUBLISH as MQTT 5 frames it (rumqttd's constructor only takes static text).
fn publish(topic: &str, payload: Vec<u8>) -> Result<Vec<u8>> {
    let topic_len = u16::try_from(topic.len())?;
    let mut body = Vec::new();
    body.extend_from_slice(&topic_len.to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&2u16.to_be_bytes());
    body.push(0);
    body.extend_from_slice(&payload);
    let mut out = vec![0x32];
    let mut n = body.len();
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    Ok(out)
}
