//! What `sluice plan` prints: one `PlanReport`, as a table or as JSON (`--json`, the shape
//! documented in `docs/scale-out.md`; `version` changes if a field changes meaning).

use std::fmt::Write;

use serde::Serialize;

use super::{Footprint, Plan, StepCost};

/// The JSON document's version.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub path: String,
    pub source: &'static str,
    pub architecture: String,
    pub weights_dtype: String,
    pub num_params: u64,
    pub weights_bytes: u64,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// in tokens
    pub max_position_embeddings: usize,
    pub kv_bytes_per_token: u64,
}

impl ModelReport {
    pub fn new(path: &std::path::Path, fp: &Footprint) -> Self {
        let c = &fp.config;
        Self {
            path: path.display().to_string(),
            source: fp.source,
            architecture: c.architecture.clone(),
            weights_dtype: fp.weights_dtype.clone(),
            num_params: fp.num_params,
            weights_bytes: fp.weights_bytes,
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            max_position_embeddings: c.max_position_embeddings,
            kv_bytes_per_token: fp.kv_bytes_per_token(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    /// `cpu` or a GPU table name
    pub name: String,
    pub description: String,
    /// the memory planned for, in bytes
    pub memory_bytes: u64,
    /// `--memory`, `MemAvailable` (the CPU) or `datasheet` (a GPU)
    pub memory_source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub version: u32,
    pub model: ModelReport,
    pub device: DeviceReport,
    /// how step times were obtained: `measured` (this CPU) or `roofline` (a GPU's peaks)
    pub cost: StepCost,
    #[serde(flatten)]
    pub plan: Plan,
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

impl PlanReport {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let (m, d, p) = (&self.model, &self.device, &self.plan);
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "  {k:<34} {v}");
        };
        row(
            "model",
            format!("{} ({}, {})", m.path, m.source, m.weights_dtype),
        );
        row(
            "shape",
            format!(
                "{} layers, {} KV heads × {} dims, {:.1}M parameters",
                m.num_layers,
                m.num_kv_heads,
                m.head_dim,
                m.num_params as f64 / 1e6
            ),
        );
        row(
            "weights",
            format!("{} ({} bytes)", mib(m.weights_bytes), m.weights_bytes),
        );
        row(
            "KV cache per token (f16)",
            format!("{} bytes", m.kv_bytes_per_token),
        );
        row("device", format!("{} ({})", d.name, d.description));
        row(
            "memory",
            format!("{} ({})", mib(d.memory_bytes), d.memory_source),
        );
        let w = match p.request_rate {
            Some(r) => format!(
                "{} in + {} out tokens, {r} req/s → {} in flight (Little's law)",
                p.input_len, p.output_len, p.concurrency
            ),
            None => format!(
                "{} in + {} out tokens, {} in flight",
                p.input_len, p.output_len, p.concurrency
            ),
        };
        row("workload", w);
        let mem = &p.memory;
        row(
            "KV budget",
            format!(
                "{} = memory − weights − {} activations (estimate) − {} reserve",
                mib(mem.kv_budget_bytes),
                mib(mem.activation_bytes),
                mib(mem.reserve_bytes)
            ),
        );
        row(
            "blocks",
            format!(
                "{} of {} tokens ({} bytes); {} per sequence",
                mem.num_blocks, mem.block_size, mem.bytes_per_block, mem.blocks_per_seq
            ),
        );
        row(
            "largest concurrency that fits",
            format!(
                "{} sequences of {} tokens",
                mem.max_concurrency, p.context_len
            ),
        );
        let dec = &p.decode;
        let bound = match self.cost {
            StepCost::Measured(_) => "measured",
            StepCost::Roofline(_) => "roofline bound",
        };
        row(
            "decode, batch 1",
            format!("{:.1} tok/s ({bound})", dec.batch1_tok_s),
        );
        row(
            &format!("decode, batch {}", dec.batch),
            format!(
                "{:.1} tok/s in all, {:.1} per stream, {:.1} ms a step",
                dec.batch_tok_s, dec.per_stream_tok_s, dec.step_ms
            ),
        );
        row(
            "TTFT",
            format!(
                "{:.0} ms alone into the batch; {:.0} ms mean for {} at once ({} a step)",
                p.ttft.isolated_ms, p.ttft.burst_ms, dec.batch, p.ttft.prompts_per_step
            ),
        );
        if p.ttft.seat_wait_ms > 0.0 {
            row(
                "waiting for a seat",
                format!("{:.0} ms mean", p.ttft.seat_wait_ms),
            );
        }
        row("request, end to end", format!("{:.0} ms", p.e2e_ms));
        let _ = writeln!(
            s,
            "\nrecommended: sluice serve {}",
            p.flags.to_args().join(" ")
        );
        for w in &p.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}
