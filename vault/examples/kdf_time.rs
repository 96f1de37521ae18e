//! Prints how long one Argon2id derivation with the parameters Aloft requires (RFC 9106's
//! second recommendation: m = 64 MiB, t = 3, p = 4) takes here: opening a passphrase-sealed
//! file costs exactly one. `cargo run --release -p aloft-vault --example kdf_time`.

use std::time::Instant;

use aloft_vault::{open_sealed, seal, KdfParams, Passphrase, Protection, Unlock};

fn main() -> Result<(), aloft_vault::VaultError> {
    let pass = Passphrase::new("correct horse battery staple");
    let sealed = seal(b"x", &Protection::passphrase(pass.clone()))?;
    let unlock = Unlock::Passphrase(pass);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        open_sealed(&sealed, &unlock)?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let k = KdfParams::MIN;
    println!(
        "Argon2id m={} KiB t={} p={}: median {:.0} ms (min {:.0}, max {:.0}) over {} runs",
        k.m_kib,
        k.t,
        k.p,
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        times.len()
    );
    Ok(())
}
