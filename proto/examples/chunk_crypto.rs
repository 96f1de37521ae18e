//! Prints how fast chunks are sealed, checked and opened: the work a device does per chunk
//! (SHA-256 of the sealed chunk, then AES-256-GCM open), on 16 KiB chunks of a 1 MiB image.
//!
//! `cargo run --release -p aloft-proto --example chunk_crypto [-- ROUNDS]`

use std::time::Instant;

use aloft_proto::crypto::{open_chunk, seal_chunk, sha256, ChunkCipher, ContentKey};
use aloft_proto::ArtifactId;

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let key = ContentKey::generate().expect("a random key");
    let artifact = ArtifactId::new("fw-bench").expect("a valid id");
    let chunk = vec![0x5au8; 16 * 1024];
    let count = 64u32;
    let sealed: Vec<Vec<u8>> = (0..count)
        .map(|i| seal_chunk(&key, &artifact, i, count, &chunk))
        .collect();
    let mib = (rounds * count as usize * chunk.len()) as f64 / (1024.0 * 1024.0);
    let rate = |label: &str, f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        let secs = start.elapsed().as_secs_f64();
        println!("{label:<22} {:8.0} MiB/s", mib / secs);
    };
    rate("seal", &mut || {
        for _ in 0..rounds {
            for i in 0..count {
                std::hint::black_box(seal_chunk(&key, &artifact, i, count, &chunk));
            }
        }
    });
    rate("sha256", &mut || {
        for _ in 0..rounds {
            for s in &sealed {
                std::hint::black_box(sha256(s));
            }
        }
    });
    let cipher = ChunkCipher::new(&key);
    rate("open, key set up once", &mut || {
        for _ in 0..rounds {
            for (i, s) in sealed.iter().enumerate() {
                let plain = cipher.open(&artifact, i as u32, count, s);
                std::hint::black_box(plain.expect("opens"));
            }
        }
    });
    rate("open", &mut || {
        for _ in 0..rounds {
            for (i, s) in sealed.iter().enumerate() {
                let plain = open_chunk(&key, &artifact, i as u32, count, s);
                std::hint::black_box(plain.expect("opens"));
            }
        }
    });
}
