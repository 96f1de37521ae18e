//! Prints how fast content keys are wrapped and unwrapped (HPKE, PROTOCOL.md §Cryptography):
//! the orchestrator wraps one per campaign member, and each device unwraps its own, so at
//! 10,000 devices these two lines are most of a campaign's start (S2 in docs/BENCHMARKS.md).
//!
//! `cargo run --release -p aloft-proto --example key_wrap [-- COUNT]`

use std::time::Instant;

use aloft_proto::crypto::{unwrap_content_key, wrap_content_key, ContentKey, DeviceEncryptionKey};
use aloft_proto::{ArtifactId, DeviceId};

fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5_000);
    let artifact = ArtifactId::new("fw-bench").expect("a valid id");
    let key = ContentKey::generate().expect("a random key");
    let devices: Vec<(DeviceId, DeviceEncryptionKey)> = (0..count)
        .map(|i| {
            let id = DeviceId::new(format!("dev-{i:05}")).expect("a valid id");
            (id, DeviceEncryptionKey::generate().expect("a random key"))
        })
        .collect();
    let per_op = |label: &str, start: Instant| {
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{label:<28} {:8.1} µs each, {:8.0}/s",
            secs * 1e6 / count as f64,
            count as f64 / secs
        );
    };

    let start = Instant::now();
    let publics: Vec<[u8; 32]> = devices
        .iter()
        .map(|(_, k)| k.public_bytes().expect("a public key"))
        .collect();
    per_op("public key from secret", start);

    let start = Instant::now();
    let wrapped: Vec<_> = devices
        .iter()
        .zip(&publics)
        .map(|((id, _), public)| wrap_content_key(public, id, &artifact, &key).expect("wraps"))
        .collect();
    per_op("wrap (orchestrator)", start);

    let start = Instant::now();
    for ((id, secret), w) in devices.iter().zip(&wrapped) {
        let opened = unwrap_content_key(secret, id, &artifact, w).expect("unwraps");
        assert_eq!(opened.as_bytes(), key.as_bytes());
    }
    per_op("unwrap (device)", start);
}
