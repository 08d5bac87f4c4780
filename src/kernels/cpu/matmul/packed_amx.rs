//! AMX-INT8 kernels over packed weights (4-bit and Q8_0; layout in [`super::packed`]), for batches of
//! 16 rows or more on CPUs with AMX (Sapphire Rapids and later); see [`runs_on_amx`].
//!
//! The packed layout is already AMX's "B" tile layout: a 64-byte chunk is one tile row of 16
//! columns × 4 consecutive k values. Per 32-value block and 16-row × 16-column tile, one
//! `tdpbsud` (signed activations × unsigned weights) gives the exact integer sums that
//! [`super::packed_avx512`] builds with 8–16 `vpdpbusd` per row; the per-block epilogue
//! (bias, one int→float convert, the same FMAs) is that kernel's, operation for operation.
//!
//! **Batch invariance:** the integer sums are exact and the float operations on each output
//! lane are the VNNI kernel's in the same order, so a column's value is bit-identical whether
//! its row ran alone (VNNI, m = 1) or in a tile here (tested in `packed_tests`).
//!
//! Tile state is per thread: each call configures the tiles and releases them before it
//! returns.
#![allow(clippy::incompatible_msrv)]

use std::arch::asm;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use super::packed::{PackedKind, PackedWeights, GROUP};
use super::packed_acts::PackedActs;
use super::packed_avx512::{self, PackedChunk};

/// Rows a tile holds.
pub(super) const TILE_ROWS: usize = 16;

/// Linux `arch_prctl` request for permission to use an extended state component.
const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
/// The AMX tile data state component.
const XFEATURE_XTILEDATA: libc::c_ulong = 18;

/// Whether AMX-INT8 can run in this process: the CPU has it, the kernel granted the tile state
/// (asked once per process) and `SLUICE_CPU_AMX` is not `0`.
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var("SLUICE_CPU_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
        // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
        let edx = __cpuid_count(7, 0).edx;
        if edx & (3 << 24) != 3 << 24 {
            return false;
        }
        // SAFETY: a plain system call with integer arguments.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        } == 0;
        if !granted {
            tracing::info!("the CPU has AMX but the kernel refused its tile state: using VNNI");
        }
        granted
    })
}

/// `ldtilecfg`'s 64-byte operand (palette 1).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    /// tmm0–3: C, 16 rows × 16 i32 (one block each); tmm4, tmm6: A, 16 rows × 32 i8 (one
    /// block of activations); tmm5, tmm7: B, 8 rows × 64 u8 (one block of a group's weights).
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let (cc, aa, bb) = ((TILE_ROWS, 64u16), (TILE_ROWS, 32), (8, 64));
        for (t, (rows, colsb)) in [cc, cc, cc, cc, aa, bb, aa, bb].into_iter().enumerate() {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            c[48 + t] = rows as u8;
        }
        Self(c)
    }
}

#[repr(C, align(64))]
struct Aligned<T>(T);

/// Whether an `m`-row product with `w` runs here. Measured with `amx_probe` (AMX and VNNI
/// interleaved in one run): 4-bit weights gain 1.3–1.5× from one whole tile of rows (16) up;
/// Q8_0 (the default model's tied LM head) streams twice the weight bytes per MAC and only
/// gains 1.1× from 64 rows (0.95–1.0× at 16–32).
pub(super) fn runs_on_amx(w: &PackedWeights, m: usize) -> bool {
    let rows = if w.kind == PackedKind::Q8_0 {
        64
    } else {
        TILE_ROWS
    };
    m >= rows && available()
}

/// Runs the chunk on AMX tiles; the caller checked [`runs_on_amx`].
pub(super) fn packed_chunk(c: &PackedChunk, acts: &PackedActs) {
    // SAFETY: `available()` implies AMX-INT8 with its state granted; packed weights exist only
    // where the AVX-512 path is supported.
    unsafe { chunk_impl(c, acts) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn chunk_impl(c: &PackedChunk, acts: &PackedActs) {
    let cfg = TileConfig::new();
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    match c.w.kind {
        PackedKind::Q4_0 => chunk_kind::<0>(c, acts),
        PackedKind::Q4_1 => chunk_kind::<1>(c, acts),
        PackedKind::Q8_0 => chunk_kind::<2>(c, acts),
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// `KIND`: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0. Whole tiles of 16 rows run here; the rows past the last
/// whole tile run the VNNI kernel (the same bits, and a tile costs as much for 1 row as for 16).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn chunk_kind<const KIND: u8>(c: &PackedChunk, acts: &PackedActs) {
    let whole = c.m / TILE_ROWS * TILE_ROWS;
    assert!(
        c.g1 <= c.w.groups.num_groups
            && acts.nb == c.w.nb
            && acts.qs.len() >= c.m * acts.k
            && acts.d.len() >= c.m * acts.nb
    );
    for r0 in (0..whole).step_by(TILE_ROWS) {
        for g in c.g0..c.g1 {
            let valid = c.w.rows - g * GROUP;
            let mask: __mmask16 = if valid >= GROUP { !0 } else { (1 << valid) - 1 };
            let col = (g - c.g0) * GROUP;
            tile::<KIND>(c.w.groups.group(g).as_ptr(), acts, r0, |r, acc| {
                // SAFETY: row r0+r < m and the masked lanes are this task's columns.
                _mm512_mask_storeu_ps(c.out.at(r0 + r, col), mask, acc)
            });
        }
    }
    if whole < c.m {
        packed_avx512::packed_chunk_rows(c, acts, whole);
    }
}

/// Blocks whose tile products are issued back to back before their epilogues (one C tile
/// each), so the tile unit's latency overlaps.
const QUAD: usize = 4;

/// One group (16 columns) against activation rows `r0..r0 + 16`; hands each row's 16 outputs
/// to `store`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn tile<const KIND: u8>(
    w: *const u8,
    a: &PackedActs,
    r0: usize,
    store: impl Fn(usize, __m512),
) {
    let (k, nb) = (a.k, a.nb);
    let qb = if KIND == 2 { 32 * GROUP } else { 16 * GROUP };
    let scales = w.add(nb * qb);
    let low4 = _mm512_set1_epi8(0x0F);
    // Scratch the tiles write before anything reads it: left uninitialized (zeroing it cost
    // more than the tile products).
    let mut unpacked = MaybeUninit::<Aligned<[u8; QUAD * 8 * 64]>>::uninit();
    let mut sums = MaybeUninit::<Aligned<[i32; QUAD * TILE_ROWS * GROUP]>>::uninit();
    let (unpacked, sums) = (
        unpacked.as_mut_ptr() as *mut u8,
        sums.as_mut_ptr() as *mut i32,
    );
    let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
    let xa = a.qs.as_ptr().add(r0 * k);
    let mut b0 = 0;
    while b0 < nb {
        let count = (nb - b0).min(QUAD);
        // B of block b: Q8_0 blocks are tile rows as packed; a 4-bit chunk splits into two
        // tile rows (low nibbles: k = 8i..8i+3, high nibbles: k = 8i+4..8i+7).
        let mut bt = [unpacked as *const u8; QUAD];
        for (j, bt) in bt.iter_mut().enumerate() {
            let q = w.add((b0 + j.min(count - 1)) * qb);
            if KIND == 2 {
                *bt = q;
                continue;
            }
            let dst = unpacked.add(512 * j.min(count - 1));
            *bt = dst;
            if j < count {
                for i in 0..4 {
                    let v = _mm512_load_si512(q.add(64 * i) as *const _);
                    let d = dst.add(128 * i);
                    _mm512_store_si512(d as *mut _, _mm512_and_si512(v, low4));
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4);
                    _mm512_store_si512(d.add(64) as *mut _, hi);
                }
            }
        }
        let at = |j: usize| xa.add(32 * (b0 + j.min(count - 1)));
        let c = sums;
        // SAFETY: A reads 16 rows (r0 + 16 <= m) of 32 bytes at stride k; B reads 8 rows of 64 bytes; C writes 16 × 64 bytes each.
        // A short last quad repeats its last block (results unused).
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{b0} + {s64}*1]",
            "tdpbsud tmm0, tmm4, tmm5",
            "tileloadd tmm6, [{a1} + {sa}*1]",
            "tileloadd tmm7, [{b1} + {s64}*1]",
            "tdpbsud tmm1, tmm6, tmm7",
            "tileloadd tmm4, [{a2} + {sa}*1]",
            "tileloadd tmm5, [{b2} + {s64}*1]",
            "tdpbsud tmm2, tmm4, tmm5",
            "tileloadd tmm6, [{a3} + {sa}*1]",
            "tileloadd tmm7, [{b3} + {s64}*1]",
            "tdpbsud tmm3, tmm6, tmm7",
            "tilestored [{c0} + {s64}*1], tmm0",
            "tilestored [{c1} + {s64}*1], tmm1",
            "tilestored [{c2} + {s64}*1], tmm2",
            "tilestored [{c3} + {s64}*1], tmm3",
            a0 = in(reg) at(0),
            a1 = in(reg) at(1),
            a2 = in(reg) at(2),
            a3 = in(reg) at(3),
            sa = in(reg) k,
            b0 = in(reg) bt[0],
            b1 = in(reg) bt[1],
            b2 = in(reg) bt[2],
            b3 = in(reg) bt[3],
            s64 = in(reg) 64usize,
            c0 = in(reg) c,
            c1 = in(reg) c.add(256),
            c2 = in(reg) c.add(512),
            c3 = in(reg) c.add(768),
            options(nostack),
        );
        for j in 0..count {
            let b = b0 + j;
            let (dw, mw) = packed_avx512::block_scales::<KIND>(scales, b);
            let sums = sums.add(j * TILE_ROWS * GROUP) as *const i32;
            for (r, acc) in acc.iter_mut().enumerate() {
                let is = _mm512_load_si512(sums.add(r * GROUP) as *const _);
                packed_avx512::add_block::<KIND>(acc, is, dw, mw, a, (r0 + r) * nb + b);
            }
        }
        b0 += count;
    }
    for (r, acc) in acc.iter().enumerate() {
        store(r, *acc);
    }
}
