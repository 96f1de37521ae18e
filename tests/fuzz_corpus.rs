//! The fuzz corpus and every crasher the fuzzers found, replayed through the same target bodies
//! the AFL++ binaries run (`fuzz/src/targets.rs`): no input may panic, and the whole replay
//! stays fast. The fuzzers themselves run outside CI (fuzz/README.md).

#[path = "../fuzz/src/targets.rs"]
#[allow(dead_code)]
mod targets;

use std::path::{Path, PathBuf};

use targets::Fixtures;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every file under `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        let Ok(dir) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else {
            continue;
        };
        for entry in dir.flatten() {
            let path = entry.path();
            if path.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

fn fixtures() -> Fixtures {
    aloft_certs::tls::install_crypto_provider();
    let fx = Fixtures::load(&fuzz_dir().join("fixtures"));
    assert!(fx.root.is_some(), "fuzz/fixtures/root.json must pin");
    assert!(!fx.release_keys.is_empty() && !fx.ca_pem.is_empty());
    fx
}

/// Replays `target`'s inputs through `run`; a panic names the input that caused it.
fn replay(target: &str, min_seeds: usize, mut run: impl FnMut(&[u8])) {
    let all = inputs(target);
    assert!(
        all.len() >= min_seeds,
        "fuzz/corpus/{target} holds {} inputs",
        all.len()
    );
    for (path, bytes) in all {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&bytes)));
        assert!(result.is_ok(), "{} panicked", path.display());
    }
}

#[test]
fn the_mqtt_front_corpus_and_crashers_decode_without_panicking() {
    replay("mqtt_front", 2, targets::mqtt_front);
}

#[test]
fn the_message_corpus_and_crashers_decode_without_panicking() {
    replay("messages", 10, targets::messages);
}

#[test]
fn the_signed_manifest_and_root_corpus_and_crashers_verify_without_panicking() {
    let fx = fixtures();
    replay("signed", 4, |d| targets::signed(d, &fx));
}

#[test]
fn the_certificate_csr_and_crl_corpus_and_crashers_parse_without_panicking() {
    let fx = fixtures();
    replay("x509", 5, |d| targets::x509(d, &fx));
}

#[test]
fn the_sealed_file_and_stream_corpus_and_crashers_open_without_panicking() {
    let fx = fixtures();
    replay("vault", 4, |d| targets::vault(d, &fx));
}

#[test]
fn the_backup_corpus_and_crashers_restore_without_panicking() {
    let fx = fixtures();
    let scratch = tempfile::tempdir().unwrap();
    replay("backup", 1, |d| targets::backup(d, &fx, scratch.path()));
}

/// The seeds are real: each committed seed of a kind that must verify or open still does, so
/// a fixture change that silently voids the corpus fails here.
#[test]
fn the_seed_job_verifies_and_the_seed_backup_restores_with_the_fixtures() {
    let fx = fixtures();
    let job = std::fs::read(fuzz_dir().join("corpus/signed/seed-001")).unwrap();
    let job: aloft_proto::messages::Job = aloft_proto::messages::decode(&job[1..]).unwrap();
    assert!(job.manifest.verify(&fx.release_keys).is_ok());
    let scratch = tempfile::tempdir().unwrap();
    let file = fuzz_dir().join("corpus/backup/seed-001");
    let report =
        aloft_orchestrator::backup::restore(&file, &scratch.path().join("data"), &fx.unlock);
    assert!(report.is_ok(), "{report:?}");
}
