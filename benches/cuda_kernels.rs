//! First GPU figures (issue 7), each beside the card's device-to-device copy bandwidth measured
//! in the same run:
//!
//! * `attention`: one paged decode-attention call (RoPE + K/V store + decode kernels) at batch
//!   64, context 4,096, 32 query / 8 KV heads, head dim 128, bf16 KV, block size 16: achieved
//!   GB/s of K and V read (1 GiB per call).
//! * `decode8b`: a Llama-3-8B-shaped model with seeded dummy bf16 weights, batch 1: time per
//!   output token (a whole `Llama::forward` decode step, logits downloaded) against
//!   (weight + KV bytes) / copy bandwidth.
//!
//! * `gemv` (benches/cuda/gemv.rs): the quantized decode GEMV at Llama-3-8B's shapes, batch 1
//!   and 8, GB/s of weights read.
//! * `decode135m` (benches/cuda/decode.rs): the default model's shape, batch 1, with and
//!   without CUDA graphs, bf16 against Q4_0/Q8_0 twins.
//! * `profile`: the 8B shape at batch 1 and 64, graphs on and off (`SLUICE_PROFILE_STEPS`
//!   timed steps each, default 30; `SLUICE_PROFILE_BATCH=1|64` keeps one batch size), for
//!   `ncu` (scripts/profile_gpu.sh).
//!
//! Copy bandwidth counts bytes read plus written (the usual convention), so it is what a kernel
//! streaming its operands from HBM could reach. Times are medians of repeated, synchronized
//! batches. Run: `cargo bench --features cuda --bench cuda_kernels [-- attention|decode8b]`,
//! or the carried binary (`scripts/bench_gpu.sh`). Without a usable GPU it prints why and exits.

use std::time::Instant;

#[path = "cuda/decode.rs"]
mod decode;
#[path = "cuda/gemv.rs"]
mod gemv;

use sluice::kernels::cuda::{CudaBackend, KvDType};
use sluice::kernels::dtype::{KvCacheDtype, WeightDType};
use sluice::kernels::{AttentionShape, Backend, BatchSeq, ForwardBatch, KvCacheShape, Rope};
use sluice::model::config::{Llama3RopeScaling, ModelConfig, RopeStyle};
use sluice::model::llama::Llama;
use sluice::model::weights::DummyWeights;

const GIB: usize = 1 << 30;

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds per call of `f` over `reps` batches of `per_batch` calls (after one warm-up
/// batch), each batch ended by `sync`.
pub fn time_calls(reps: usize, per_batch: usize, mut f: impl FnMut(), sync: impl Fn()) -> f64 {
    let mut run = || {
        let t = Instant::now();
        for _ in 0..per_batch {
            f();
        }
        sync();
        t.elapsed().as_secs_f64() / per_batch as f64
    };
    run();
    median((0..reps).map(|_| run()).collect())
}

pub fn sync(g: &CudaBackend) {
    if let Err(e) = g.synchronize() {
        panic!("a CUDA op failed: {e}");
    }
}

/// Device-to-device copy bandwidth in bytes/s (read + written) over 1 GiB buffers.
fn copy_bandwidth(g: &CudaBackend) -> f64 {
    let stream = &g.gpu().stream;
    let src = stream.alloc_zeros::<u8>(GIB).expect("1 GiB");
    let mut dst = stream.alloc_zeros::<u8>(GIB).expect("1 GiB");
    let t = time_calls(
        9,
        10,
        || stream.memcpy_dtod(&src, &mut dst).expect("cuMemcpyDtoD"),
        || sync(g),
    );
    2.0 * GIB as f64 / t
}

/// Random bf16 bits in ±[0.5, 1) from a xorshift stream (values do not change the speed).
pub fn random_bf16(len: usize, mut s: u64) -> Vec<u16> {
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let r = s as u16;
            (r & 0x8000) | 0x3f00 | (r & 0x7f)
        })
        .collect()
}

fn attention(g: &CudaBackend, copy_bw: f64) {
    let (seqs, ctx, heads, kv_heads, d, bs) = (64, 4096, 32, 8, 128, 16);
    let blocks_per_seq = ctx / bs;
    let shape = KvCacheShape {
        num_layers: 1,
        num_blocks: seqs * blocks_per_seq,
        block_size: bs,
        num_kv_heads: kv_heads,
        head_dim: d,
    };
    let mut kv = g.kv_cache(shape).expect("KV cache");
    let len = shape.num_blocks * kv_heads * bs * d;
    g.write_kv_layer(&mut kv, 0, &random_bf16(len, 1), &random_bf16(len, 2))
        .expect("filling the KV cache");
    let batch = ForwardBatch {
        token_ids: vec![0; seqs],
        positions: vec![ctx as u32 - 1; seqs],
        slot_mapping: (0..seqs)
            .map(|s| ((s * blocks_per_seq + blocks_per_seq - 1) * bs + bs - 1) as u32)
            .collect(),
        seqs: (0..seqs)
            .map(|s| BatchSeq {
                query_start: s,
                query_len: 1,
                context_len: ctx,
                block_table: (s * blocks_per_seq..(s + 1) * blocks_per_seq)
                    .map(|b| b as u32)
                    .collect(),
                prompt_len: 0,
            })
            .collect(),
        logits_rows: (0..seqs as u32).collect(),
        hidden_rows: Vec::new(),
    };
    let rope = Rope {
        inv_freqs: (0..d / 2)
            .map(|i| 500_000f32.powf(-2.0 * i as f32 / d as f32))
            .collect(),
        interleaved: false,
        theta_base: 500_000.0,
        freq_factors: None,
    };
    let step = g.prepare_step(&batch, &rope);
    let cols = (heads + 2 * kv_heads) * d;
    let q: Vec<f32> = (0..seqs * cols)
        .map(|i| ((i % 97) as f32 - 48.0) / 48.0)
        .collect();
    let mut qkv = g.upload_tensor(seqs, cols, &q).expect("qkv");
    let mut out = g.tensor();
    let a = AttentionShape {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        window: None,
        softcap: None,
    };
    let t = time_calls(
        15,
        20,
        || g.attention(&mut qkv, a, 0, &mut kv, &step, &mut out),
        || sync(g),
    );
    let kv_bytes = (2 * seqs * ctx * kv_heads * d * 2) as f64;
    println!(
        "attention  batch {seqs}, context {ctx}, {heads}/{kv_heads} heads, d {d}, bf16 KV: \
         {:.1} us/call, {:.0} GB/s of KV read = {:.0}% of copy bandwidth ({:.0} GB/s)",
        t * 1e6,
        kv_bytes / t / 1e9,
        100.0 * kv_bytes / t / copy_bw,
        copy_bw / 1e9
    );
}

pub fn llama3_8b_config() -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        hidden_size: 4096,
        intermediate_size: 14336,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 128_256,
        max_position_embeddings: 8192,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_style: RopeStyle::Halves,
        rope_scaling: Some(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }),
        tie_word_embeddings: false,
        attention_bias: false,
        sliding_window: None,
        gemma2: None,
    }
}

/// `decode8b`, or with `profile_only` just the batch-1/64 profile on the same model.
fn decode_8b(copy_bw: f64, profile_only: bool) {
    const PROMPT: usize = 512;
    const STEPS: usize = 64;
    const BLOCK: usize = 16;
    let c = llama3_8b_config();
    let backend = match CudaBackend::new(0, KvDType::BF16) {
        Ok(b) => b,
        Err(e) => panic!("second GPU context: {e}"),
    };
    let started = Instant::now();
    let weights = DummyWeights::new(c.clone(), WeightDType::BF16, 8).expect("dummy weights");
    let mut model = Llama::load(c.clone(), &weights, backend).expect("loading the dummy 8B");
    println!(
        "decode8b   dummy bf16 weights generated and uploaded in {:.1?}",
        started.elapsed()
    );
    if profile_only {
        decode::profile(&mut model, "8B bf16");
        return;
    }
    let num_blocks = (PROMPT + STEPS + 1).div_ceil(BLOCK);
    let mut kv = model.kv_cache(num_blocks, BLOCK).expect("KV cache");
    let table: Vec<u32> = (0..num_blocks as u32).collect();
    let batch = |from: usize, n: usize| ForwardBatch {
        token_ids: (from..from + n)
            .map(|i| (i * 7919 % c.vocab_size) as u32)
            .collect(),
        positions: (from as u32..(from + n) as u32).collect(),
        slot_mapping: (from as u32..(from + n) as u32).collect(),
        seqs: vec![BatchSeq {
            query_start: 0,
            query_len: n,
            context_len: from + n,
            block_table: table[..(from + n).div_ceil(BLOCK)].to_vec(),
            prompt_len: 0,
        }],
        logits_rows: vec![n as u32 - 1],
        hidden_rows: Vec::new(),
    };
    let t = Instant::now();
    model.forward(&batch(0, PROMPT), &mut kv);
    let prefill = t.elapsed().as_secs_f64();
    let mut times = Vec::with_capacity(STEPS);
    for s in 0..STEPS {
        let b = batch(PROMPT + s, 1);
        let t = Instant::now();
        let logits = model.forward(&b, &mut kv);
        times.push(t.elapsed().as_secs_f64());
        assert_eq!(logits.len(), c.vocab_size);
    }
    let t = median(times);
    let (h, kvh, d, hid, inter) = (
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.hidden_size,
        c.intermediate_size,
    );
    let per_layer = hid * (h + 2 * kvh) * d + h * d * hid + 3 * hid * inter;
    let weight_bytes = 2.0 * (c.num_layers * per_layer + c.vocab_size * hid) as f64;
    let kv_bytes = (c.kv_bytes_per_token(KvCacheDtype::F16) * (PROMPT + STEPS / 2)) as f64;
    let ideal = (weight_bytes + kv_bytes) / copy_bw;
    println!(
        "decode8b   Llama-3-8B shape, dummy bf16, batch 1, context {PROMPT}..{}: \
         {:.2} ms/token ({:.1} tokens/s); (weights {:.2} GB + KV {:.3} GB) / copy bandwidth = \
         {:.2} ms, so {:.0}% of the bound; prefill of {PROMPT} tokens {:.1} ms",
        PROMPT + STEPS,
        t * 1e3,
        1.0 / t,
        weight_bytes / 1e9,
        kv_bytes / 1e9,
        ideal * 1e3,
        100.0 * ideal / t,
        prefill * 1e3
    );
}

/// `--export-tokenizer MODEL.gguf OUT.json`: writes a GGUF's tokenizer as a `tokenizer.json`
/// (scripts/bench_gpu.sh carries it to the GPU machine, where the 98 MB GGUF cannot go).
fn export_tokenizer(args: &[String]) -> bool {
    let Some(i) = args.iter().position(|a| a == "--export-tokenizer") else {
        return false;
    };
    let (Some(src), Some(dst)) = (args.get(i + 1), args.get(i + 2)) else {
        eprintln!("usage: --export-tokenizer MODEL.gguf OUT.json");
        std::process::exit(2);
    };
    let t = sluice::tokenizer::Tokenizer::from_path(std::path::Path::new(src))
        .unwrap_or_else(|e| panic!("reading the tokenizer of {src}: {e}"));
    t.hf_tokenizer()
        .save(dst, false)
        .unwrap_or_else(|e| panic!("writing {dst}: {e}"));
    println!("{dst}: {} tokens", t.vocab_size());
    true
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if export_tokenizer(&args) {
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let g = match CudaBackend::new(0, KvDType::BF16) {
        Ok(g) => g,
        Err(e) => {
            println!("skipped: no GPU ({e})");
            return;
        }
    };
    println!("{}", g.describe());
    let copy_bw = copy_bandwidth(&g);
    println!(
        "copy       cuMemcpyDtoD 1 GiB: {:.0} GB/s (read + written)",
        copy_bw / 1e9
    );
    if wants("attention") {
        attention(&g, copy_bw);
    }
    if wants("gemv") {
        gemv::run(&g, copy_bw);
    }
    drop(g);
    if wants("decode135m") {
        decode::decode_135m();
    }
    if wants("decode8b") {
        decode_8b(copy_bw, false);
    }
    if wants("profile") {
        decode_8b(copy_bw, true);
    }
}
