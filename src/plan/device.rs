//! Named GPUs for the roofline: memory, bandwidth and dense tensor throughput from the
//! vendors' datasheets (dense figures: the datasheets' "with sparsity" numbers halved).
//!
//! `memory_bytes` is what `nvidia-smi` reports as the card's total (MiB × 2^20), a little
//! less than the marketing GB; bandwidth and TFLOPS are peaks, so the roofline is a bound
//! that real kernels approach, never pass.

use super::PlanError;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct GpuSpec {
    /// the name `--device` takes
    pub name: &'static str,
    pub description: &'static str,
    /// in bytes
    pub memory_bytes: u64,
    /// peak memory bandwidth, in bytes per second
    pub bandwidth_bytes_s: f64,
    /// dense BF16/FP16 tensor throughput, in FLOP/s (what sluice's GPU matmuls run in)
    pub bf16_flops: f64,
    /// dense FP8 tensor throughput, in FLOP/s (`None`: the card has no FP8 tensor cores)
    pub fp8_flops: Option<f64>,
    /// dense INT8 tensor throughput, in OP/s
    pub int8_ops: f64,
}

const MIB: u64 = 1 << 20;
const TB: f64 = 1e12;
const T: f64 = 1e12;

/// The cards the planner knows. Sources: NVIDIA's H100, H200, A100, L40S, L4, A10 datasheets
/// and the Ada Lovelace architecture whitepaper (RTX 4090, appendix table).
pub const GPUS: &[GpuSpec] = &[
    GpuSpec {
        name: "h100-sxm",
        description: "NVIDIA H100 SXM5 80GB (HBM3)",
        memory_bytes: 81_559 * MIB,
        bandwidth_bytes_s: 3.35 * TB,
        bf16_flops: 989.5 * T,
        fp8_flops: Some(1979.0 * T),
        int8_ops: 1979.0 * T,
    },
    GpuSpec {
        name: "h100-pcie",
        description: "NVIDIA H100 PCIe 80GB (HBM2e)",
        memory_bytes: 81_559 * MIB,
        bandwidth_bytes_s: 2.0 * TB,
        bf16_flops: 756.5 * T,
        fp8_flops: Some(1513.0 * T),
        int8_ops: 1513.0 * T,
    },
    GpuSpec {
        name: "h200",
        description: "NVIDIA H200 SXM 141GB (HBM3e)",
        memory_bytes: 143_771 * MIB,
        bandwidth_bytes_s: 4.8 * TB,
        bf16_flops: 989.5 * T,
        fp8_flops: Some(1979.0 * T),
        int8_ops: 1979.0 * T,
    },
    GpuSpec {
        name: "a100-40gb",
        description: "NVIDIA A100 SXM4 40GB (HBM2)",
        memory_bytes: 40_960 * MIB,
        bandwidth_bytes_s: 1.555 * TB,
        bf16_flops: 312.0 * T,
        fp8_flops: None,
        int8_ops: 624.0 * T,
    },
    GpuSpec {
        name: "a100-80gb",
        description: "NVIDIA A100 SXM4 80GB (HBM2e)",
        memory_bytes: 81_920 * MIB,
        bandwidth_bytes_s: 2.039 * TB,
        bf16_flops: 312.0 * T,
        fp8_flops: None,
        int8_ops: 624.0 * T,
    },
    GpuSpec {
        name: "l40s",
        description: "NVIDIA L40S 48GB (GDDR6)",
        memory_bytes: 46_068 * MIB,
        bandwidth_bytes_s: 0.864 * TB,
        bf16_flops: 362.05 * T,
        fp8_flops: Some(733.0 * T),
        int8_ops: 733.0 * T,
    },
    GpuSpec {
        name: "l4",
        description: "NVIDIA L4 24GB (GDDR6)",
        memory_bytes: 23_034 * MIB,
        bandwidth_bytes_s: 0.300 * TB,
        bf16_flops: 121.0 * T,
        fp8_flops: Some(242.5 * T),
        int8_ops: 242.5 * T,
    },
    GpuSpec {
        // AWS's variant of the A10; NVIDIA publishes no A10G datasheet, so these are the
        // A10's (same memory and bandwidth; the A10G's tensor peak is reported lower).
        name: "a10g",
        description: "NVIDIA A10G 24GB (GDDR6; A10 datasheet figures)",
        memory_bytes: 23_028 * MIB,
        bandwidth_bytes_s: 0.600 * TB,
        bf16_flops: 125.0 * T,
        fp8_flops: None,
        int8_ops: 250.0 * T,
    },
    GpuSpec {
        name: "rtx-4090",
        description: "NVIDIA GeForce RTX 4090 24GB (GDDR6X)",
        memory_bytes: 24_564 * MIB,
        bandwidth_bytes_s: 1.008 * TB,
        // FP16/BF16 tensor with FP32 accumulate (what cuBLAS uses for bf16 GEMMs).
        bf16_flops: 165.2 * T,
        fp8_flops: Some(330.3 * T),
        int8_ops: 660.6 * T,
    },
];

/// The card named `name` (case and `_`/`-`/space insensitive: `H100_SXM`, `rtx 4090`).
pub fn find_gpu(name: &str) -> Result<&'static GpuSpec, PlanError> {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase()
    };
    let wanted = norm(name);
    GPUS.iter()
        .find(|g| norm(g.name) == wanted)
        .ok_or_else(|| PlanError::UnknownDevice {
            name: name.to_string(),
            known: GPUS.iter().map(|g| g.name).collect::<Vec<_>>().join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_loosely_and_unknown_ones_list_the_table() {
        assert_eq!(find_gpu("H100_SXM").unwrap().name, "h100-sxm");
        assert_eq!(find_gpu("RTX 4090").unwrap().name, "rtx-4090");
        let e = find_gpu("b200").unwrap_err().to_string();
        assert!(e.contains("b200") && e.contains("l40s"), "{e}");
    }

    #[test]
    fn the_table_is_consistent() {
        for g in GPUS {
            // Every card streams its own memory in well under a second, and INT8 is at
            // least BF16's rate on every generation listed.
            let sweep = g.memory_bytes as f64 / g.bandwidth_bytes_s;
            assert!(sweep > 0.01 && sweep < 0.1, "{}: {sweep}", g.name);
            assert!(g.int8_ops >= g.bf16_flops, "{}", g.name);
        }
    }
}
