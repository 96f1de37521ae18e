//! AFL++ target `signed`: see `aloft_fuzz::targets::signed`.

fn main() {
    let fx = aloft_fuzz::fixtures();
    let _ = &fx;
    afl::fuzz!(|data: &[u8]| {
        aloft_fuzz::targets::signed(data, fx);
    });
}
