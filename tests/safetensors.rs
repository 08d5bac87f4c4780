//! Hugging Face safetensors directories, end to end: the default model's weights written the
//! way `transformers` saves a Llama (its tensor names, Q and K rows in its rotate-half order,
//! `config.json`, `tokenizer.json`) in f32, f16 and bf16, loaded through `--model DIR`'s path, must
//! give the logits of the same weights read from the GGUF file (llama.cpp's names, Q and K
//! permuted for pairwise RoPE).
//!
//! The reference is the GGUF file's own tensors, dequantized to f32 (rounded to f16 or bf16 for
//! those directories), so both models run the same float kernels on the same values; they differ only
//! in the order of the head dimensions inside Q·K (the two RoPE layouts), which changes the
//! last bits of attention scores, and 30 layers carry that to the logits (measured: at most
//! 1.2e-2 in f32, 1.6e-2 in bf16, on logits of magnitude ~20). A wrong name, layout or RoPE
//! style gives logits that differ by whole units. Tolerance: every logit within `TOLERANCE`,
//! and the same argmax wherever the GGUF model's top two are further apart than twice that.
//!
//! The directories are made once into `<cache>/test-models/` (their names carry a format
//! version) and reused.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use sluice::gguf::GgufFile;
use sluice::kernels::cpu::CpuBackend;
use sluice::kernels::dtype::WeightDType;
use sluice::kernels::host::{HostTensor, WeightBytes};
use sluice::model::config::ModelConfig;
use sluice::model::llama::Llama;
use sluice::model::loader::{self, LoadFormat, ModelSpec};
use sluice::model::weights::WeightSource;
use sluice::model::ModelError;
use sluice::tokenizer::Tokenizer;

const TOLERANCE: f32 = 0.05;
/// Bump when the writer below changes, so stale directories are not reused.
const FORMAT: u32 = 1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

/// The GGUF file's tensors as f32 (rounded to `dtype` when that is narrower): the reference model's
/// weights, in llama.cpp's names and layout.
struct GgufAsFloat {
    file: GgufFile,
    dtype: Dtype,
}

fn round(values: Vec<f32>, dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => values,
        Dtype::F16 => values
            .into_iter()
            .map(|v| f16::from_f32(v).to_f32())
            .collect(),
        Dtype::Bf16 => values
            .into_iter()
            .map(|v| bf16::from_f32(v).to_f32())
            .collect(),
    }
}

impl WeightSource for GgufAsFloat {
    fn get(&self, name: &str) -> Result<Option<HostTensor>, ModelError> {
        let Some(t) = WeightSource::get(&self.file, name)? else {
            return Ok(None);
        };
        let values = round(t.to_f32(), self.dtype);
        Ok(Some(HostTensor {
            dtype: WeightDType::F32,
            rows: t.rows,
            cols: t.cols,
            bytes: WeightBytes::Owned(Arc::new(bytemuck::cast_slice(&values).to_vec())),
        }))
    }
    fn describe(&self) -> String {
        format!("{} as {:?}", self.file.path.display(), self.dtype)
    }
}

/// The Hugging Face name of a GGUF Llama tensor, as `transformers` writes it (written here
/// from transformers' naming, not from sluice's loader, so that the two are checked against
/// each other).
fn hf_name(gguf: &str) -> String {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return n.to_string();
    }
    let rest = gguf.strip_prefix("blk.").expect("a layer tensor");
    let (layer, tail) = rest.split_once('.').expect("blk.N.name");
    let tail = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        other => panic!("unexpected tensor {gguf} ({other})"),
    };
    format!("model.layers.{layer}.{tail}")
}

/// Undoes llama.cpp's converter permutation of Q/K rows: within each head, GGUF row `2i + j`
/// is Hugging Face row `j · head_dim/2 + i`.
fn unpermute(rows: &[f32], cols: usize, num_heads: usize) -> Vec<f32> {
    let head_dim = rows.len() / cols / num_heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; rows.len()];
    for h in 0..num_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_dim + 2 * i + j) * cols;
                let dst = (h * head_dim + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&rows[src..src + cols]);
            }
        }
    }
    out
}

fn tensor_names(c: &ModelConfig, file: &GgufFile) -> Vec<String> {
    let mut names = vec!["token_embd.weight".to_string(), "output_norm.weight".into()];
    if file.has_tensor("output.weight") {
        names.push("output.weight".into());
    }
    for l in 0..c.num_layers {
        for t in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            names.push(format!("blk.{l}.{t}.weight"));
        }
    }
    names
}

fn config_json(c: &ModelConfig, dtype: Dtype) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": false,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": match dtype {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::Bf16 => "bfloat16",
        },
    })
}

/// Writes (once) the default model as a Hugging Face directory of `dtype` weights.
fn hf_dir(dtype: Dtype) -> PathBuf {
    let cache = sluice::assets::cache_dir().expect("a cache directory");
    let dir = cache
        .join("test-models")
        .join(format!("smollm2-hf-{dtype:?}-v{FORMAT}").to_lowercase());
    if dir.join("model.safetensors").is_file() {
        return dir;
    }
    let file = common::default_gguf();
    let c = ModelConfig::from_gguf(&file).unwrap();
    let source = GgufAsFloat { file, dtype };
    let mut data: HashMap<String, (Vec<u8>, Vec<usize>)> = HashMap::new();
    for name in tensor_names(&c, &source.file) {
        let t = source.get(&name).unwrap().expect("a tensor the model has");
        let mut values = t.to_f32();
        if name.ends_with("attn_q.weight") {
            values = unpermute(&values, t.cols, c.num_heads);
        } else if name.ends_with("attn_k.weight") {
            values = unpermute(&values, t.cols, c.num_kv_heads);
        }
        let bytes = match dtype {
            Dtype::F32 => bytemuck::cast_slice(&values).to_vec(),
            Dtype::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::Bf16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        };
        let shape = if t.rows == 1 {
            vec![t.cols]
        } else {
            vec![t.rows, t.cols]
        };
        data.insert(hf_name(&name), (bytes, shape));
    }
    let st_dtype = match dtype {
        Dtype::F32 => safetensors::Dtype::F32,
        Dtype::F16 => safetensors::Dtype::F16,
        Dtype::Bf16 => safetensors::Dtype::BF16,
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, (b, s))| {
            let view = safetensors::tensor::TensorView::new(st_dtype, s.clone(), b).unwrap();
            (n.clone(), view)
        })
        .collect();
    let tmp = crate::api_support::venv::scratch_beside(&dir, "partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    safetensors::serialize_to_file(views, None, &tmp.join("model.safetensors")).unwrap();
    std::fs::write(tmp.join("config.json"), config_json(&c, dtype).to_string()).unwrap();
    Tokenizer::from_gguf(&source.file)
        .unwrap()
        .hf_tokenizer()
        .save(tmp.join("tokenizer.json"), false)
        .unwrap();
    // Another test process may have won the race: either directory is complete.
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

fn top2(row: &[f32]) -> (usize, f32) {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    (order[0], row[order[0]] - row[order[1]])
}

fn check(dtype: Dtype) {
    let dir = hf_dir(dtype);
    let opened = loader::open(&ModelSpec {
        path: dir.clone(),
        load_format: LoadFormat::Auto,
        dummy_dtype: WeightDType::F32,
        dummy_seed: 0,
        quantization: None,
    })
    .unwrap();
    let file = common::default_gguf();
    let gguf_config = ModelConfig::from_gguf(&file).unwrap();
    assert_eq!(opened.config.vocab_size, gguf_config.vocab_size);
    assert_ne!(opened.config.rope_style, gguf_config.rope_style);
    let mut hf = Llama::load(opened.config, &*opened.weights, CpuBackend::new(2)).unwrap();
    let reference = GgufAsFloat { file, dtype };
    let mut gguf = Llama::load(gguf_config, &reference, CpuBackend::new(2)).unwrap();

    let ids = common::teacher_forced_fixture().ids;
    let (a, b) = (
        common::all_logits(&mut hf, &ids),
        common::all_logits(&mut gguf, &ids),
    );
    let mut worst = 0.0f32;
    for (pos, (x, y)) in a.iter().zip(&b).enumerate() {
        let diff = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max);
        worst = worst.max(diff);
        let ((top_hf, _), (top_gguf, margin)) = (top2(x), top2(y));
        if margin > 2.0 * TOLERANCE {
            assert_eq!(
                top_hf, top_gguf,
                "{dtype:?}: position {pos}: argmax differs"
            );
        }
    }
    eprintln!("{dtype:?}: max |Δlogit| between the HF directory and the GGUF: {worst:.2e}");
    assert!(worst <= TOLERANCE, "{dtype:?}: logits differ by {worst}");

    // The directory's tokenizer.json gives llama.cpp's ids.
    let tokenizer = Tokenizer::from_path(Path::new(&dir)).unwrap();
    let fixtures = std::fs::read_to_string(common::fixtures_dir().join("tokenize.jsonl")).unwrap();
    for line in fixtures.lines().filter(|l| !l.trim().is_empty()) {
        let f: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = f["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(f["ids"].clone()).unwrap();
        assert_eq!(tokenizer.encode(text, false).unwrap(), want, "{text:?}");
    }
}

#[test]
fn an_f32_directory_gives_the_gguf_logits() {
    check(Dtype::F32);
}

#[test]
fn an_f16_directory_gives_the_gguf_logits() {
    check(Dtype::F16);
}

#[test]
fn a_bf16_directory_gives_the_gguf_logits() {
    check(Dtype::Bf16);
}
