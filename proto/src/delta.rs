//! Delta updates (PROTOCOL.md §5.10, 1.5): a patch that turns one known image (the *base*) into
//! the release's image, built by the operator's CLI and applied by a device that runs the base.
//!
//! A delta travels as a release of its own: the patch bytes are chunked, sealed and signed
//! exactly like an image, and its manifest carries a [`DeltaOf`] naming the base (SHA-256 and
//! version) and the target (SHA-256 and size). Nothing in the patch is trusted: a device rebuilds
//! the target and installs it only if its SHA-256 is the target's signed one, and falls back to
//! the full image otherwise. The patch format is bsdiff 4.x as `qbsdiff` writes it (bzip2
//! blocks); docs/BENCHMARKS.md says why it beat zstd's "patch from".

use std::io::Write;

use serde::{Deserialize, Serialize};

/// Largest image a patch is built against or applied to (the simulator's slots are 8 MiB; the
/// bound keeps a hostile patch from asking for unbounded output).
pub const MAX_DELTA_IMAGE_BYTES: u64 = 64 * 1024 * 1024;

/// What a delta release rebuilds: carried in the signed manifest of the patch (1.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaOf {
    /// SHA-256 of the base image the patch applies to, 64 lowercase hex digits.
    pub base_sha256: String,
    /// Human-facing version of the base image.
    pub base_version: String,
    /// Size of the base image in bytes (a device reads this much of its running slot).
    pub base_size: u64,
    /// SHA-256 of the image the patch rebuilds, 64 lowercase hex digits: the full release's
    /// `image_sha256`.
    pub target_sha256: String,
    /// Size of the rebuilt image in bytes: the full release's `image_size`.
    pub target_size: u64,
}

/// Why a patch could not be built or applied.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("image of {0} bytes is larger than a delta allows")]
    TooLarge(u64),
    #[error("patch is malformed: {0}")]
    Malformed(String),
    #[error("patch rebuilds {got} bytes, {want} expected")]
    WrongSize { got: u64, want: u64 },
    #[error("writing the rebuilt image: {0}")]
    Write(std::io::Error),
}

/// Builds the patch from `base` to `target`.
pub fn make_patch(base: &[u8], target: &[u8]) -> Result<Vec<u8>, DeltaError> {
    for len in [base.len(), target.len()] {
        if len as u64 > MAX_DELTA_IMAGE_BYTES {
            return Err(DeltaError::TooLarge(len as u64));
        }
    }
    let mut patch = Vec::new();
    qbsdiff::Bsdiff::new(base, target)
        .compare(std::io::Cursor::new(&mut patch))
        .map_err(DeltaError::Write)?;
    Ok(patch)
}

/// Rebuilds the target from `base` and `patch`, streaming it into `out` as it is produced (the
/// target is never held whole). The patch must declare exactly `target_size` bytes of output.
/// Returns the bytes written. Any malformed patch is an error, never a panic.
pub fn apply_patch(
    base: &[u8],
    patch: &[u8],
    target_size: u64,
    out: &mut dyn Write,
) -> Result<u64, DeltaError> {
    if target_size > MAX_DELTA_IMAGE_BYTES {
        return Err(DeltaError::TooLarge(target_size));
    }
    let patcher = qbsdiff::Bspatch::new(patch).map_err(|e| DeltaError::Malformed(e.to_string()))?;
    let declared = patcher.hint_target_size();
    if declared != target_size {
        return Err(DeltaError::WrongSize {
            got: declared,
            want: target_size,
        });
    }
    let mut counted = Counted { out, n: 0 };
    let written = patcher
        .apply(base, &mut counted)
        .map_err(|e| DeltaError::Malformed(e.to_string()))?;
    if written != target_size || counted.n != target_size {
        return Err(DeltaError::WrongSize {
            got: counted.n,
            want: target_size,
        });
    }
    Ok(written)
}

/// Stops a patch from writing more than it declared (a hostile header and body may disagree).
struct Counted<'a> {
    out: &'a mut dyn Write,
    n: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.n + buf.len() as u64 > MAX_DELTA_IMAGE_BYTES {
            return Err(std::io::Error::other("patch writes past the image bound"));
        }
        let n = self.out.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn image(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 7) as u8
            })
            .collect()
    }

    #[test]
    fn a_patch_rebuilds_its_target_exactly() {
        let base = image(1, 200_000);
        let mut target = base.clone();
        target[5_000..6_000].fill(9);
        target.splice(50_000..50_000, image(2, 3_000));
        let patch = make_patch(&base, &target).unwrap();
        assert!(patch.len() < target.len() / 10, "patch {}", patch.len());
        let mut out = Vec::new();
        apply_patch(&base, &patch, target.len() as u64, &mut out).unwrap();
        assert_eq!(out, target);
    }

    #[test]
    fn a_patch_declaring_another_size_is_refused() {
        let base = image(3, 10_000);
        let target = image(4, 12_000);
        let patch = make_patch(&base, &target).unwrap();
        let mut out = Vec::new();
        assert!(matches!(
            apply_patch(&base, &patch, 11_999, &mut out),
            Err(DeltaError::WrongSize { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn patches_round_trip(seed in any::<u64>(), len in 1usize..20_000, edits in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..40)) {
            let base = image(seed, len);
            let mut target = base.clone();
            for (at, b) in edits {
                let at = at as usize % target.len();
                target[at] = b;
            }
            let patch = make_patch(&base, &target).unwrap();
            let mut out = Vec::new();
            apply_patch(&base, &patch, target.len() as u64, &mut out).unwrap();
            prop_assert_eq!(out, target);
        }

        #[test]
        fn garbage_patches_never_panic(base in proptest::collection::vec(any::<u8>(), 0..2_000), patch in proptest::collection::vec(any::<u8>(), 0..2_000), size in 0u64..4_000) {
            let mut out = Vec::new();
            let _ = apply_patch(&base, &patch, size, &mut out);
        }

        #[test]
        fn a_damaged_patch_never_panics(seed in any::<u64>(), flip in any::<u16>()) {
            let base = image(seed, 5_000);
            let mut target = base.clone();
            target[100] ^= 0xff;
            let mut patch = make_patch(&base, &target).unwrap();
            let at = flip as usize % patch.len();
            patch[at] ^= 0x5a;
            let mut out = Vec::new();
            let _ = apply_patch(&base, &patch, target.len() as u64, &mut out);
        }
    }
}
