//! The `device-sim` binary as README.md runs it. (Also why cargo builds `device-sim` whenever the
//! workspace's tests are built: tests/readme.rs runs it.)

use std::process::Command;

#[test]
fn enroll_writes_a_key_and_a_csr_per_device_numbered_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args(["enroll", "--count", "2", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in ["dev-00000", "dev-00001"] {
        let csr = dir.path().join("devices").join(format!("{id}.csr"));
        assert!(csr.exists(), "{} is missing", csr.display());
    }
}
