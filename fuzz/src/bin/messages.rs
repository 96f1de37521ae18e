//! AFL++ target `messages`: see `aloft_fuzz::targets::messages`.

fn main() {
    let fx = aloft_fuzz::fixtures();
    let _ = &fx;
    afl::fuzz!(|data: &[u8]| {
        aloft_fuzz::targets::messages(data);
    });
}
