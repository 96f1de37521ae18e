//! Aloft's fuzz targets (AFL++ through cargo-afl). The bodies live in `targets.rs`, shared with
//! the regression test in the normal suite; the binaries in `src/bin/` wrap them.

#[path = "targets.rs"]
pub mod targets;

pub use targets::Fixtures;

/// The fixtures next to this crate, loaded once per fuzzing process.
pub fn fixtures() -> &'static Fixtures {
    static FX: std::sync::OnceLock<Fixtures> = std::sync::OnceLock::new();
    FX.get_or_init(|| Fixtures::load(&Fixtures::dir()))
}
