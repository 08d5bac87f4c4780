//! The GGUF block formats against an outside reference: the `gguf` package (gguf-py, the
//! Python reader that ships with llama.cpp) dequantizes the same random blocks, in a Python
//! environment cached under the user's cache directory. For Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! IQ4_NL, Q3_K, Q4_K, Q5_K and Q6_K:
//!
//! * sluice's dequantizer gives gguf-py's values bit for bit;
//! * the CPU backend's matmul over those weights (its repacked or portable kernels, with
//!   8-bit activations) is the f64 product with gguf-py's weights within 5e-3 · Σ|x·w| per
//!   output (measured at most 9.6e-4; the activations' 8-bit rounding is the error).

use crate::api_support::venv;

use std::process::Command;

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice::kernels::cpu::{CpuBackend, CpuTensor};
use sluice::kernels::dtype::WeightDType;
use sluice::kernels::host::{HostTensor, WeightBytes};
use sluice::kernels::Backend;

const GGUF_PY: &str = "gguf==0.19.0";
const ROWS: usize = 48;
const COLS: usize = 512;
const ACTIVATION_ROWS: usize = 5;
const MATMUL_TOLERANCE: f64 = 5e-3;

/// (type, gguf-py's name, bytes per block, values per block, byte ranges of its f16 scales).
const TYPES: [(WeightDType, &str, usize, usize, &[usize]); 10] = [
    (WeightDType::Q4_0, "Q4_0", 18, 32, &[0]),
    (WeightDType::Q4_1, "Q4_1", 20, 32, &[0, 2]),
    (WeightDType::Q5_0, "Q5_0", 22, 32, &[0]),
    (WeightDType::Q5_1, "Q5_1", 24, 32, &[0, 2]),
    (WeightDType::Q8_0, "Q8_0", 34, 32, &[0]),
    (WeightDType::IQ4NL, "IQ4_NL", 18, 32, &[0]),
    (WeightDType::Q4K, "Q4_K", 144, 256, &[0, 2]),
    (WeightDType::Q6K, "Q6_K", 210, 256, &[208]),
    (WeightDType::Q5K, "Q5_K", 176, 256, &[0, 2]),
    (WeightDType::Q3K, "Q3_K", 110, 256, &[108]),
];

/// Random blocks whose f16 scales are finite and of a weight's size (random bytes elsewhere).
fn random_blocks(rng: &mut ChaCha8Rng, block_bytes: usize, scales: &[usize], n: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..block_bytes * n).map(|_| rng.random()).collect();
    for block in bytes.chunks_exact_mut(block_bytes) {
        for &at in scales {
            let v: f32 = rng.random_range(0.0005..0.02) * if rng.random() { 1.0 } else { -1.0 };
            block[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    bytes
}

/// gguf-py's dequantization of `rows` rows of `ty` blocks.
fn reference_dequantize(name: &str, bytes: &[u8], rows: usize) -> Vec<f32> {
    let python = venv::pip_venv("test-venv-gguf", GGUF_PY)
        .join("bin")
        .join("python");
    let dir = std::env::temp_dir().join(format!("sluice-quant-ref-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("blocks.bin"), dir.join("values.bin"));
    std::fs::write(&input, bytes).unwrap();
    let script = "import sys, numpy as np\n\
                  from gguf import quants, GGMLQuantizationType as T\n\
                  raw = np.fromfile(sys.argv[1], dtype=np.uint8).reshape(int(sys.argv[3]), -1)\n\
                  quants.dequantize(raw, T[sys.argv[2]]).astype('<f4').tofile(sys.argv[4])\n";
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(&input)
        .arg(name)
        .arg(rows.to_string())
        .arg(&output)
        .output()
        .expect("running gguf-py");
    assert!(
        out.status.success(),
        "gguf-py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let values = std::fs::read(&output).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    values
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn block_formats_match_gguf_py() {
    let cpu = CpuBackend::new(2);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut report = String::new();
    for (dtype, name, block_bytes, block_values, scales) in TYPES {
        let n = ROWS * COLS / block_values;
        let bytes = random_blocks(&mut rng, block_bytes, scales, n);
        let reference = reference_dequantize(name, &bytes, ROWS);
        assert_eq!(reference.len(), ROWS * COLS, "{name}");
        let weights = HostTensor {
            dtype,
            rows: ROWS,
            cols: COLS,
            bytes: WeightBytes::Owned(std::sync::Arc::new(bytes)),
        };

        // The dequantizer.
        let ours = weights.to_f32();
        let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        report += &format!("{name}: dequantized max |Δ| {worst:.1e} (values up to {scale:.2})\n");
        let differing = ours
            .iter()
            .zip(&reference)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differing, 0,
            "{name}: {differing} dequantized values differ from gguf-py's (max |Δ| {worst})"
        );

        // The matmul, against the f64 product with gguf-py's weights.
        let x: Vec<f32> = (0..ACTIVATION_ROWS * COLS)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let linear = cpu.linear(vec![weights]).unwrap();
        let input = CpuTensor {
            data: x.clone(),
            rows: ACTIVATION_ROWS,
            cols: COLS,
        };
        let mut out = cpu.tensor();
        cpu.matmul(&input, &linear, None, &mut out);
        assert_eq!((out.rows, out.cols), (ACTIVATION_ROWS, ROWS), "{name}");
        let mut worst_rel = 0.0f64;
        for r in 0..ACTIVATION_ROWS {
            for o in 0..ROWS {
                let (mut exact, mut magnitude) = (0.0f64, 0.0f64);
                for c in 0..COLS {
                    let p = x[r * COLS + c] as f64 * reference[o * COLS + c] as f64;
                    exact += p;
                    magnitude += p.abs();
                }
                let rel = (out.data[r * ROWS + o] as f64 - exact).abs() / magnitude;
                worst_rel = worst_rel.max(rel);
            }
        }
        report += &format!("{name}: matmul max |Δ| / Σ|x·w| {worst_rel:.1e}\n");
        assert!(
            worst_rel <= MATMUL_TOLERANCE,
            "{name}: matmul off by {worst_rel} of Σ|x·w|"
        );
    }
    eprintln!("{report}");
}
