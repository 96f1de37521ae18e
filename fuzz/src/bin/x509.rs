//! AFL++ target `x509`: see `aloft_fuzz::targets::x509`.

fn main() {
    let fx = aloft_fuzz::fixtures();
    let _ = &fx;
    afl::fuzz!(|data: &[u8]| {
        aloft_fuzz::targets::x509(data, fx);
    });
}
