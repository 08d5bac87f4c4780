//! GGUF files made from the default model for tests: the same metadata (copied byte for byte),
//! tensors converted to another storage type where a rule says so (dequantized, then
//! quantized with sluice's simple quantizers, or written as f32).

use std::path::Path;

use sluice::gguf::{GgufFile, GgufTensorInfo};
use sluice::kernels::cpu::matmul::quantize_weights::quantize_row;
use sluice::kernels::dtype::WeightDType;

/// Writes `src` to `dst` with each tensor in `convert(tensor)`'s type (or its own).
pub fn rewrite(src: &Path, dst: &Path, convert: impl Fn(&GgufTensorInfo) -> Option<WeightDType>) {
    let bytes = std::fs::read(src).expect("reading the GGUF");
    let file = GgufFile::open(src).expect("opening the GGUF");
    let kv_end = metadata_end(&bytes);
    let align = file
        .get("general.alignment")
        .and_then(|v| v.as_u64())
        .unwrap_or(32) as usize;
    let mut infos: Vec<&GgufTensorInfo> = file.tensors.values().collect();
    infos.sort_by_key(|t| t.offset);
    let mut out = bytes[..kv_end].to_vec();
    let mut data: Vec<u8> = Vec::new();
    for info in infos {
        let t = file.tensor(&info.name).expect("a tensor");
        let dtype = convert(info).unwrap_or(info.dtype);
        let blob = if dtype == info.dtype {
            t.bytes.to_vec()
        } else {
            let values = t.to_f32();
            values
                .chunks_exact(t.cols)
                .flat_map(|row| quantize_row(dtype, row))
                .collect()
        };
        data.resize(data.len().next_multiple_of(align), 0);
        out.extend_from_slice(&(info.name.len() as u64).to_le_bytes());
        out.extend_from_slice(info.name.as_bytes());
        out.extend_from_slice(&(info.dims.len() as u32).to_le_bytes());
        for &d in &info.dims {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&dtype.ggml_id().to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        data.extend_from_slice(&blob);
    }
    out.resize(out.len().next_multiple_of(align), 0);
    out.extend_from_slice(&data);
    let tmp = crate::api_support::venv::scratch_beside(dst, "partial");
    std::fs::write(&tmp, &out).expect("writing the GGUF");
    std::fs::rename(&tmp, dst).expect("renaming the GGUF");
}

/// The offset where the tensor infos start: past the header and every metadata pair.
fn metadata_end(b: &[u8]) -> usize {
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
    assert_eq!(&b[..4], b"GGUF");
    let n_kv = u64_at(16);
    // A value of GGUF type `ty` at `p`; returns the position after it.
    fn skip(b: &[u8], ty: u32, p: usize) -> usize {
        let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
        match ty {
            0 | 1 | 7 => p + 1,
            2 | 3 => p + 2,
            4..=6 => p + 4,
            10..=12 => p + 8,
            8 => p + 8 + u64_at(p),
            9 => {
                let elem = u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
                let n = u64_at(p + 4);
                (0..n).fold(p + 12, |q, _| skip(b, elem, q))
            }
            _ => panic!("GGUF value type {ty}"),
        }
    }
    let mut p = 24;
    for _ in 0..n_kv {
        p += 8 + u64_at(p); // the key
        let ty = u32_at(p);
        p = skip(b, ty, p + 4);
    }
    p
}
