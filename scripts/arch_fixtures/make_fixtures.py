"""Reference logits from Hugging Face `transformers` for small seeded models of each
architecture sluice claims (issue 28), written as committed fixtures so the test suite
(`tests/architectures.rs`) needs no torch.

Each model's weights are a pure function of (seed, tensor name, element index), the same one
`tests/architectures.rs` implements: sluice's test rebuilds the very same values and writes them
as safetensors (f32, f16, bf16; every value is exactly representable in all three). Here
`transformers` runs them in f32: 32 greedy tokens after a fixed prompt, then the teacher-forced
logits of every position of prompt + greedy.

    python make_fixtures.py OUT_DIR [NAME ...]   (run by scripts/arch_fixtures/make.sh; all
                                                   models, or those named)
"""

import json
import math
import sys

import numpy as np
import torch
import transformers

SEED = 20261207
PROMPT = [1, 17, 200, 5, 99, 42, 42, 7, 128, 64, 3, 250, 11, 90, 33, 2]
STEPS = 32
MASK = (1 << 64) - 1

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

# name -> (transformers config class, its extra settings)
MODELS = {
    # Llama 3.x: RoPE scaling with all three wavelength regimes at this head size (16).
    "llama3": (
        "LlamaConfig",
        dict(
            rope_theta=10000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
            tie_word_embeddings=False,
        ),
    ),
    # Qwen2/2.5: Q, K, V biases; small Qwen2.5 models tie the LM head, large ones do not.
    "qwen2_tied": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen2_untied": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=False)),
    # Mistral: a sliding window longer than these sequences (sluice serves up to the window).
    "mistral": (
        "MistralConfig",
        dict(rope_theta=10000.0, sliding_window=128, head_dim=16, tie_word_embeddings=False),
    ),
    # Sliding windows shorter than these sequences (16 + 32 tokens): Mistral's on every layer,
    # Qwen2's from `max_window_layers` on (layer 0 attends to everything, layer 1 to 8 keys).
    "mistral_window": (
        "MistralConfig",
        dict(rope_theta=10000.0, sliding_window=8, head_dim=16, tie_word_embeddings=False),
    ),
    "qwen2_window": (
        "Qwen2Config",
        dict(
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
        ),
    ),
    # Gemma 2: embeddings scaled by sqrt(hidden), sandwich norms with 1 + weight gains, GELU
    # (tanh), queries scaled by query_pre_attn_scalar (not head_dim), soft-capped attention
    # scores and logits (caps low enough to bite at these magnitudes), and the sliding window
    # on even layers only (layer 0 sees 8 keys, layer 1 everything). Tied LM head.
    "gemma2": (
        "Gemma2Config",
        dict(
            rope_theta=10000.0,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=8,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=8.0,
            tie_word_embeddings=True,
        ),
    ),
    # Phi-3: fused qkv_proj and gate_up_proj.
    "phi3": (
        "Phi3Config",
        dict(rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False, rope_scaling=None),
    ),
}


def fnv1a64(name: str) -> int:
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def codes(name: str, n: int) -> np.ndarray:
    """Integers in -127..127, element i from splitmix64's mix of (SEED ^ fnv(name)) + i·golden."""
    with np.errstate(over="ignore"):
        x = np.uint64(SEED ^ fnv1a64(name)) + np.arange(n, dtype=np.uint64) * np.uint64(
            0x9E3779B97F4A7C15
        )
        z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    k = (z >> np.uint64(56)).astype(np.int64) - 128
    return np.maximum(k, -127)


def values(name: str, shape, kind: str, exp: int) -> np.ndarray:
    n = int(np.prod(shape))
    k = codes(name, n)
    if kind == "norm":
        # 1 + j/128 for j in -16..15: norm weights near one.
        v = 1.0 + np.floor_divide(k, 8) / 128.0
    else:
        v = k * 2.0**-exp
    return v.astype(np.float32).reshape(shape)


def exponent(name: str, shape, tied: bool) -> int:
    """k·2^-e with std about 1/sqrt(fan-in) (the uniform codes' std is about 73); embeddings
    about 1, or a quarter of that when they are also the LM head (else the residual, the
    input token's own embedding, outweighs the layers and the model repeats its input);
    the LM head 4× wider, so that the top logits stand apart."""
    if name.endswith("embed_tokens.weight"):
        return 8 if tied else 6
    if name.endswith(".bias"):
        return 8
    e = round(math.log2(73.0 * math.sqrt(shape[-1])))
    return e - 2 if name == "lm_head.weight" else e


def build(name: str):
    cls, extra = MODELS[name]
    small = dict(SMALL)
    if cls == "Gemma2Config":
        # Gemma 2 reads `hidden_activation` (GELU, tanh), never `hidden_act`.
        del small["hidden_act"]
    config = getattr(transformers, cls)(**small, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    tensors = []
    state = {}
    tied = config.tie_word_embeddings
    for tname, param in model.state_dict().items():
        if tied and tname == "lm_head.weight":
            continue
        shape = list(param.shape)
        kind = "norm" if tname.endswith("norm.weight") else "scaled"
        exp = exponent(tname, shape, tied)
        if cls == "Gemma2Config" and tname.endswith("embed_tokens.weight"):
            # Gemma 2 multiplies the embeddings by sqrt(hidden) = 8: half the tied table's
            # usual size keeps the input token from outweighing the layers.
            exp += 1
        tensors.append(dict(name=tname, shape=shape, kind=kind, exp=exp))
        state[tname] = torch.from_numpy(values(tname, shape, kind, exp))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(m == "lm_head.weight" for m in missing), missing
    if tied:
        model.tie_weights()
        assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
    return config, model, tensors


def run(model):
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(STEPS):
            out = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(out)))
        logits = model(torch.tensor([ids[:-1]])).logits[0]
    return ids[len(PROMPT) :], logits.numpy()


def main(out_dir: str, names):
    for name in names or MODELS:
        config, model, tensors = build(name)
        greedy, logits = run(model)
        top2 = np.sort(logits, axis=1)[:, -2:]
        fixture = dict(
            name=name,
            made_by=f"transformers {transformers.__version__}, torch {torch.__version__}, f32",
            config=json.loads(config.to_json_string()),
            seed=SEED,
            tensors=tensors,
            prompt=PROMPT,
            greedy=greedy,
            min_top2_margin=float((top2[:, 1] - top2[:, 0]).min()),
            logits=[[float(f"{v:.6g}") for v in row] for row in logits],
        )
        path = f"{out_dir}/{name}.json"
        with open(path, "w") as f:
            json.dump(fixture, f, separators=(",", ":"))
            f.write("\n")
        print(f"{path}: greedy {greedy[:8]}..., min top-2 margin {fixture['min_top2_margin']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
