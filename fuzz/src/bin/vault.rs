//! AFL++ target `vault`: see `aloft_fuzz::targets::vault`.

fn main() {
    let fx = aloft_fuzz::fixtures();
    let _ = &fx;
    afl::fuzz!(|data: &[u8]| {
        aloft_fuzz::targets::vault(data, fx);
    });
}
