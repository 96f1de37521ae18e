//! The delta benchmark of issue 13 (docs/BENCHMARKS.md): images made the way firmware changes,
//! a 4 MiB image (code, data, a compressed asset) with a 1, 2 and 5% code change, a section
//! shifted by an insertion, and a changed compressed asset. For each: the bytes a device
//! downloads for the delta and for the full image (sealed chunks, as on the wire), the build
//! time, the device's rebuild time, and the rebuild's peak heap (counted by this binary's
//! allocator). Run with `cargo run --release -p aloft-proto --example delta_bench`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use aloft_proto::delta::{apply_patch, make_patch};
use aloft_proto::manifest::ReleaseSigningKey;
use aloft_proto::release::{build_delta_release, build_release, ReleaseMeta};
use aloft_proto::{ArtifactId, SecurityVersion};

struct Counting;
static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let n = NOW.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(n, Ordering::Relaxed);
        // SAFETY: the caller's layout is passed on unchanged.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        NOW.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// xorshift64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Instruction-like words: a few opcodes, registers, mostly small immediates.
fn code(r: &mut Rng, n: usize) -> Vec<u8> {
    const OPS: [u8; 8] = [0x13, 0x33, 0x03, 0x23, 0x63, 0x6f, 0x67, 0x37];
    let mut v = Vec::with_capacity(n + 4);
    while v.len() < n {
        let imm = if r.below(10) < 7 {
            r.below(64) as u16
        } else {
            r.next() as u16
        };
        let op = OPS[r.below(OPS.len())];
        v.extend_from_slice(&[op, r.below(32) as u8, imm as u8, (imm >> 8) as u8]);
    }
    v.truncate(n);
    v
}

const SIZE: usize = 4 << 20;
const CODE: usize = SIZE * 3 / 4;
const DATA: usize = 64 * 1024;

/// 3 MiB of code, 64 KiB of tables, the rest a compressed asset (random-looking bytes).
fn base_image(r: &mut Rng) -> Vec<u8> {
    let mut v = code(r, CODE);
    v.extend((0..DATA).map(|i| (i % 251) as u8));
    v.extend((0..SIZE - CODE - DATA).map(|_| r.next() as u8));
    v
}

/// `pct`% of the code rewritten as 512-byte function edits, a 4 KiB insertion at a third of
/// the image (everything after it shifts), and the last 32 KiB of the asset recompressed.
fn changed(base: &[u8], pct: usize, r: &mut Rng) -> Vec<u8> {
    let mut new = base.to_vec();
    let mut done = 0;
    while done < SIZE * pct / 100 {
        let at = r.below(CODE - 512) & !3;
        new[at..at + 512].copy_from_slice(&code(r, 512));
        done += 512;
    }
    new.splice(SIZE / 3..SIZE / 3, code(r, 4096));
    let len = new.len();
    for b in &mut new[len - 32 * 1024..] {
        *b = r.next() as u8;
    }
    new
}

fn meta(artifact: &str) -> ReleaseMeta {
    ReleaseMeta {
        artifact: ArtifactId::new(artifact).unwrap_or_else(|e| panic!("{e}")),
        version: "2.0.0".into(),
        security_version: SecurityVersion(2),
        hardware_model: "sim-v1".into(),
        chunk_size: 16 * 1024,
        created_at: 1,
        expires_at: 2,
        sequence: Some(1),
        preconditions: None,
    }
}

fn main() {
    let key = ReleaseSigningKey::generate().unwrap_or_else(|e| panic!("{e}"));
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    let base = base_image(&mut r);
    println!("| change | full on the wire | delta on the wire | delta / full | delta build | device rebuild | rebuild peak heap |");
    println!("|---|---|---|---|---|---|---|");
    for pct in [1, 2, 5] {
        let target = changed(&base, pct, &mut r);
        let mut full_wire = 0usize;
        build_release(
            &mut target.as_slice(),
            target.len() as u64,
            &meta("fw-2"),
            &key,
            |_, c| {
                full_wire += c.len();
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let t = Instant::now();
        let mut delta_wire = 0usize;
        build_delta_release(&base, "1.0.0", &target, &meta("fw-2-d"), &key, |_, c| {
            delta_wire += c.len();
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let build = t.elapsed();
        let patch = make_patch(&base, &target).unwrap_or_else(|e| panic!("{e}"));
        // The device's side: the base and the patch in memory, the image streamed out (here
        // into a sink that hashes nothing and keeps nothing, as flash would).
        let before = NOW.load(Ordering::Relaxed);
        let (base_copy, patch_copy) = (base.clone(), patch.clone());
        PEAK.store(NOW.load(Ordering::Relaxed), Ordering::Relaxed);
        let t = Instant::now();
        apply_patch(
            &base_copy,
            &patch_copy,
            target.len() as u64,
            &mut std::io::sink(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let rebuild = t.elapsed();
        let peak = PEAK.load(Ordering::Relaxed) - before;
        drop((base_copy, patch_copy));
        println!(
            "| {pct}% code, shifted section, changed asset | {} | {} | {:.1}% | {:.2} s | {:.0} ms | {:.2} MiB |",
            full_wire,
            delta_wire,
            100.0 * delta_wire as f64 / full_wire as f64,
            build.as_secs_f64(),
            rebuild.as_secs_f64() * 1000.0,
            peak as f64 / (1 << 20) as f64
        );
    }
}
