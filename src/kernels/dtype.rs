//! Storage formats of weight tensors, named after GGML's types so that a GGUF file's tensors
//! can stay in memory exactly as they are stored.
//!
//! A quantized tensor is a sequence of rows; each row is a sequence of blocks of
//! `block_len()` values packed into `block_bytes()` bytes. Rows run along the input (K)
//! dimension of a linear layer, so one output feature's weights are one contiguous row.

use std::fmt;

/// IQ4_NL's 16 levels (ggml's `kvalues_iq4nl`), denser near zero where weights are.
pub const IQ4_NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightDType {
    F32,
    F16,
    BF16,
    /// 32 values: f16 scale, 16 bytes of 4-bit quants; `w = d * (q - 8)`.
    Q4_0,
    /// 32 values: f16 scale, f16 min, 16 bytes of 4-bit quants; `w = d * q + m`.
    Q4_1,
    /// 32 values: f16 scale, 32 signed bytes; `w = d * q`.
    Q8_0,
    /// 32 values: f16 scale, 4 bytes of fifth bits, 16 bytes of low 4 bits;
    /// `w = d * (q - 16)`, `q = lo | hi << 4` (value `j` and `j + 16` share byte `j`; bit `j`
    /// of the fifth bits is value `j`'s).
    Q5_0,
    /// 32 values: f16 scale, f16 min, then as Q5_0; `w = d * q + m`.
    Q5_1,
    /// 32 values: f16 scale, 16 bytes of 4-bit indices (as Q4_0's nibbles) into a fixed
    /// non-linear table of 16 levels ([`IQ4_NL_VALUES`]); `w = d * table[q]`.
    IQ4NL,
    /// 256 values: f16 d, f16 dmin, 12 bytes of packed 6-bit sub-block scales and mins,
    /// 128 bytes of 4-bit quants; `w = d * sc * q - dmin * m` per 32-value sub-block.
    Q4K,
    /// 256 values: f16 d, f16 dmin, 12 bytes of scales and mins as Q4_K's, 32 bytes of fifth
    /// bits (bit `i` of byte `l` is value `32·i + l`'s), 128 bytes of low 4 bits as Q4_K's;
    /// `w = d * sc * q - dmin * m` per 32-value sub-block.
    Q5K,
    /// 256 values: 32 bytes of high-bit masks, 64 bytes of low 2 bits, 12 bytes of 16 packed
    /// 6-bit sub-block scales, f16 d; `w = d * (sc - 32) * (q - 4)` per 16-value sub-block,
    /// `q = lo | hi << 2`.
    Q3K,
    /// 256 values: 128 bytes low 4 bits, 64 bytes high 2 bits, 16 signed sub-block scales,
    /// f16 d; `w = d * sc * (q - 32)` per 16-value sub-block.
    Q6K,
}

impl WeightDType {
    /// The GGML type id used in GGUF tensor infos.
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            20 => Self::IQ4NL,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The GGML type id (the inverse of [`Self::from_ggml_id`]).
    pub fn ggml_id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::IQ4NL => 20,
            Self::Q8_0 => 8,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
        }
    }

    /// Human name of a GGML type id, including the ones sluice does not support.
    pub fn ggml_name(id: u32) -> &'static str {
        match id {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            34 => "TQ1_0",
            35 => "TQ2_0",
            _ => "unknown",
        }
    }

    /// Number of values in one block.
    pub fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::IQ4NL => 32,
            Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => 256,
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::IQ4NL => 18,
            Self::Q8_0 => 34,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Multiplied against activations quantized in 8-bit blocks of 32 (the K-quants take
    /// blocks of 256, floats the f32 activations).
    pub fn takes_q8_blocks(self) -> bool {
        matches!(
            self,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::IQ4NL
        )
    }

    /// A K-quant: super-blocks of 256, multiplied against activations quantized in 8-bit
    /// blocks of 256 with the sums of each run of 16.
    pub fn is_k_quant(self) -> bool {
        matches!(self, Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K)
    }

    pub fn is_quantized(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// Bytes of a row of `len` values, or `None` when `len` is not a whole number of blocks.
    pub fn row_bytes(self, len: usize) -> Option<usize> {
        len.is_multiple_of(self.block_len())
            .then(|| len / self.block_len() * self.block_bytes())
    }
}

impl fmt::Display for WeightDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::IQ4NL => "IQ4_NL",
            Self::Q8_0 => "Q8_0",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        };
        f.write_str(s)
    }
}

/// Storage type of the KV cache's values (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// f16 values (bf16 on a GPU serving bf16 weights: the same size).
    #[default]
    F16,
    /// llama.cpp's q8_0: each 32 values of a token's K or V head as 32 signed bytes and one
    /// f16 scale (the CPU backend; `head_dim` must be a multiple of 32).
    Int8,
}

impl KvCacheDtype {
    /// Bytes that one token's K (or V) of one KV head of `head_dim` values takes.
    pub fn head_bytes(self, head_dim: usize) -> usize {
        match self {
            Self::F16 => 2 * head_dim,
            Self::Int8 => head_dim + 2 * head_dim.div_ceil(32),
        }
    }
}

impl fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F16 => "f16",
            Self::Int8 => "int8",
        })
    }
}
