//! Weights repacked once at load for the AVX-512 VNNI kernels ([`super::packed_avx512`]) and
//! the AVX2 ones ([`super::packed_avx2`]): the column-interleaved layout of llama.cpp's
//! "repacked" CPU kernels.
//!
//! A part's weight rows (output columns) are cut into groups of [`GROUP`] = 16; a last short
//! group is padded with zero columns (scale 0, so padded lanes add exactly +0 and are never
//! stored). One group is `group_bytes` bytes, a multiple of 64, groups back to back, the
//! buffer 64-byte aligned:
//!
//! ```text
//! group g: [ quants of block 0 | block 1 | … | block nb−1 ][ scales of block 0 | … ][ pad ]
//! ```
//!
//! * Quants of a block are 64-byte chunks; 32-bit lane `c` of a chunk holds 4 bytes of
//!   column `c`, so `vpdpbusd(acc, chunk, broadcast(4 activation bytes))` gives 16 per-column
//!   partial sums in 16 lanes, with no horizontal reduction.
//!   - Q4_0 / Q4_1: 4 chunks; byte `t` of lane `c` of chunk `i` holds value `8i+t` of the
//!     block in its low nibble and value `8i+4+t` in its high nibble (both unsigned 0..15).
//!   - Q8_0: 8 chunks; byte `t` of lane `c` of chunk `i` is value `4i+t` biased to unsigned
//!     (`q + 128`); the kernel subtracts `128·Σx` per block (Q4_0 likewise `8·Σx`).
//! * Scales of a block: the 16 columns' f16 `d` (32 bytes), then for Q4_1 their f16 `m`.
//!
//! **Batch invariance:** every output lane accumulates, per block in block order, the exact
//! integer dot converted once to f32: `acc = fma(f32(isum), d_w·d_x, acc)` and for Q4_1
//! `acc = fma(m_w, s_x, acc)`. Whether a column is computed alone (m=1) or in a tile of rows,
//! by whichever thread, the operations on its lane are the same.

use bytemuck::{Pod, Zeroable};

use super::packed_float::PackedFloats;
use super::KernelPath;
use crate::kernels::dtype::WeightDType;
use crate::kernels::host::HostTensor;
use crate::kernels::KernelError;

/// Output columns per group: the 16 i32/f32 lanes of a 512-bit register.
pub(super) const GROUP: usize = 16;

/// A 64-byte aligned line of the packed buffer.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);
// SAFETY: a byte array with alignment 64 and size 64 has no padding and any bit pattern.
unsafe impl Zeroable for Line {}
// SAFETY: as above.
unsafe impl Pod for Line {}

/// The block formats that are repacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PackedKind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl PackedKind {
    fn of(dtype: WeightDType) -> Option<Self> {
        match dtype {
            WeightDType::Q4_0 => Some(Self::Q4_0),
            WeightDType::Q4_1 => Some(Self::Q4_1),
            WeightDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Quant bytes per block of a group.
    pub(super) fn quant_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 32 * GROUP,
            _ => 16 * GROUP,
        }
    }

    /// Scale bytes per block of a group.
    pub(super) fn scale_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 4 * GROUP,
            _ => 2 * GROUP,
        }
    }
}

/// One part's weights in the packed layout (see the module docs).
pub(super) struct PackedWeights {
    pub(super) kind: PackedKind,
    /// Output columns (weight rows), without padding.
    pub(super) rows: usize,
    /// Blocks of 32 along k.
    pub(super) nb: usize,
    pub(super) groups: Groups,
}

impl PackedWeights {
    /// Repacks `t`, or `None` when its dtype is not one of [`PackedKind`].
    fn new(t: &HostTensor) -> Option<Self> {
        let kind = PackedKind::of(t.dtype)?;
        let nb = t.cols / 32;
        let (qb, sb) = (kind.quant_bytes(), kind.scale_bytes());
        let groups = Groups::new(t.rows, nb * (qb + sb), |g, dst| {
            for c in 0..GROUP.min(t.rows - g * GROUP) {
                let row = t.row(g * GROUP + c);
                for b in 0..nb {
                    let blk = &row[b * t.dtype.block_bytes()..(b + 1) * t.dtype.block_bytes()];
                    let quants = &mut dst[b * qb..(b + 1) * qb];
                    pack_quants(kind, blk, c, quants);
                    let scales = &mut dst[nb * qb + b * sb..nb * qb + (b + 1) * sb];
                    // d (and m for Q4_1) stay f16, as stored: the kernel widens them.
                    scales[2 * c..2 * c + 2].copy_from_slice(&blk[0..2]);
                    if kind == PackedKind::Q4_1 {
                        scales[32 + 2 * c..32 + 2 * c + 2].copy_from_slice(&blk[2..4]);
                    }
                }
            }
        });
        Some(Self {
            kind,
            rows: t.rows,
            nb,
            groups,
        })
    }
}

/// A part's groups of [`GROUP`] columns, back to back in a 64-byte aligned buffer, each
/// group a whole number of 64-byte lines (what a packed layout leaves over is zero).
pub(super) struct Groups {
    pub(super) num_groups: usize,
    /// Bytes per group, a multiple of 64.
    pub(super) group_bytes: usize,
    lines: Vec<Line>,
}

impl Groups {
    /// The groups of `rows` columns, `bytes` each before rounding up, zeroed, then
    /// `pack(g, group)` fills group `g`.
    pub(super) fn new(rows: usize, bytes: usize, mut pack: impl FnMut(usize, &mut [u8])) -> Self {
        let group_bytes = bytes.next_multiple_of(64);
        let num_groups = rows.div_ceil(GROUP);
        let mut lines = vec![Line([0; 64]); num_groups * group_bytes / 64];
        let all: &mut [u8] = bytemuck::cast_slice_mut(&mut lines);
        for (g, dst) in all.chunks_exact_mut(group_bytes.max(1)).enumerate() {
            pack(g, dst);
        }
        Self {
            num_groups,
            group_bytes,
            lines,
        }
    }

    /// The bytes of group `g`.
    pub(super) fn group(&self, g: usize) -> &[u8] {
        let bytes: &[u8] = bytemuck::cast_slice(&self.lines);
        &bytes[g * self.group_bytes..(g + 1) * self.group_bytes]
    }

    /// Bytes held.
    pub(super) fn size(&self) -> usize {
        self.lines.len() * 64
    }
}

/// Writes column `c`'s quants of one GGML block into a group's block of chunks.
fn pack_quants(kind: PackedKind, blk: &[u8], c: usize, quants: &mut [u8]) {
    match kind {
        PackedKind::Q4_0 | PackedKind::Q4_1 => {
            let qs = if kind == PackedKind::Q4_0 {
                &blk[2..18]
            } else {
                &blk[4..20]
            };
            // GGML: byte j holds value j (low nibble) and value j+16 (high nibble).
            let value = |v: usize| if v < 16 { qs[v] & 0xF } else { qs[v - 16] >> 4 };
            for i in 0..4 {
                for t in 0..4 {
                    quants[64 * i + 4 * c + t] = value(8 * i + t) | (value(8 * i + 4 + t) << 4);
                }
            }
        }
        PackedKind::Q8_0 => {
            for i in 0..8 {
                for t in 0..4 {
                    quants[64 * i + 4 * c + t] = blk[2 + 4 * i + t] ^ 0x80;
                }
            }
        }
    }
}

/// `SLUICE_CPU_REPACK=0` turns repacking off (the raw-block kernels then run), to compare
/// the two end to end.
fn repack_enabled() -> bool {
    std::env::var("SLUICE_CPU_REPACK").map_or(true, |v| v != "0")
}

/// A part's repacked copy: quantized blocks for the integer kernels, or floats for the FMA
/// kernel.
pub(super) enum Repacked {
    Blocks(PackedWeights),
    Floats(PackedFloats),
}

impl Repacked {
    /// `t` repacked, or `None` when its dtype has no packed layout.
    fn new(t: &HostTensor) -> Option<Self> {
        (PackedWeights::new(t).map(Self::Blocks)).or_else(|| PackedFloats::new(t).map(Self::Floats))
    }

    fn groups(&self) -> &Groups {
        match self {
            Self::Blocks(w) => &w.groups,
            Self::Floats(w) => &w.groups,
        }
    }
}

/// One part of a [`PackedLinear`]: the tensor as loaded, and its packed copy where the
/// selected kernel path uses one.
pub(super) struct PackedPart {
    pub(super) raw: HostTensor,
    pub(super) packed: Option<Repacked>,
}

/// A linear layer's weights prepared once for [`super::linear_packed`]: the concatenation,
/// along the output dimension, of its parts (e.g. Q, K and V). Q4_0, Q4_1 and Q8_0 parts, and
/// float parts ([`super::packed_float`]), are repacked when the process runs the AVX-512 or
/// the AVX2 path; other dtypes are used as loaded.
pub struct PackedLinear {
    pub(super) parts: Vec<PackedPart>,
    rows: usize,
    cols: usize,
}

impl PackedLinear {
    /// Validates the parts' shapes and repacks those the selected kernel path can use.
    pub fn new(parts: Vec<HostTensor>) -> Result<Self, KernelError> {
        Self::with_path(KernelPath::selected(), parts)
    }

    /// [`new`](Self::new) for an explicit kernel path (the portable path does not repack).
    pub fn with_path(path: KernelPath, parts: Vec<HostTensor>) -> Result<Self, KernelError> {
        let cols = parts.first().map_or(0, |p| p.cols);
        if parts.is_empty() || parts.iter().any(|p| p.cols != cols) {
            return Err(KernelError::Invalid(
                "linear layer parts must share their input size".into(),
            ));
        }
        if let Some(p) = parts.iter().find(|p| p.cols % p.dtype.block_len() != 0) {
            return Err(KernelError::Invalid(format!(
                "input size {} is not a whole number of {} blocks",
                p.cols, p.dtype
            )));
        }
        if let Some(p) = parts
            .iter()
            .find(|p| p.bytes.len() != p.rows * p.row_bytes())
        {
            return Err(KernelError::Invalid(format!(
                "a {} part of {}×{} holds {} bytes, not {}",
                p.dtype,
                p.rows,
                p.cols,
                p.bytes.len(),
                p.rows * p.row_bytes()
            )));
        }
        let repack = path.repacks() && path.is_supported() && repack_enabled();
        Ok(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            parts: parts
                .into_iter()
                .map(|raw| PackedPart {
                    packed: repack.then(|| Repacked::new(&raw)).flatten(),
                    raw,
                })
                .collect(),
        })
    }

    /// Output features (Σ of the parts' rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Part `i` as loaded (e.g. to read embedding rows).
    pub fn raw_part(&self, i: usize) -> Option<&HostTensor> {
        self.parts.get(i).map(|p| &p.raw)
    }

    /// Bytes of repacked copies held beside the loaded tensors.
    pub fn packed_bytes(&self) -> usize {
        (self.parts.iter())
            .filter_map(|p| p.packed.as_ref())
            .map(|r| r.groups().size())
            .sum()
    }
}
