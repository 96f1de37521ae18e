//! AFL++ target `mqtt_front`: see `aloft_fuzz::targets::mqtt_front`.

fn main() {
    let fx = aloft_fuzz::fixtures();
    let _ = &fx;
    afl::fuzz!(|data: &[u8]| {
        aloft_fuzz::targets::mqtt_front(data);
    });
}
