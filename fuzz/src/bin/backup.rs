//! AFL++ target `backup`: see `aloft_fuzz::targets::backup`.

fn main() {
    let fx = aloft_fuzz::fixtures();
    // A fresh scratch directory per fuzzing process (tmpfs if there is one: it is written per run).
    let base = std::path::Path::new("/dev/shm");
    let scratch = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    };
    let Ok(scratch) = scratch else {
        return;
    };
    afl::fuzz!(|data: &[u8]| {
        aloft_fuzz::targets::backup(data, fx, scratch.path());
    });
}
