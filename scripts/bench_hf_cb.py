#!/usr/bin/env python3
"""The serving load of issue 8 through Hugging Face transformers' own continuous batching
(`model.generate_batch`, transformers >= 5.10; the GPU machines have 5.17 and PyTorch 2.11):
random weights of a config.json (Llama-3-8B shape, bf16) on one GPU, NUM_REQUESTS prompts of
INPUT_LEN random token ids, OUTPUT_LEN new tokens each (no EOS stop), at most CONCURRENCY in
flight. Prints and writes output tokens/s, the figure `sluice bench serve` reports as
`output_throughput`.

Nothing is downloaded: the config is a local file and the weights are random (the GPU machine
has no network; carry only the config). Usage:
  python3 scripts/bench_hf_cb.py --config target/gpu-bin/models/llama3-8b/config.json \
      --concurrency 256 --input-len 200 --output-len 180 --num-requests 1024 --output hf.json
"""
import argparse
import dataclasses
import json
import random
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a Hugging Face config.json")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=180)
    p.add_argument("--num-requests", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the figures here as JSON")
    return p.parse_args()


def cb_config(ContinuousBatchingConfig, args):
    """A ContinuousBatchingConfig capped at `concurrency` requests, with whatever fields this
    transformers version names for that (printed, so the log says what was set)."""
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)} if dataclasses.is_dataclass(
        ContinuousBatchingConfig
    ) else set()
    wanted = {
        "max_batch_size": args.concurrency,
        "max_concurrent_requests": args.concurrency,
        "max_num_seqs": args.concurrency,
        "block_size": args.block_size,
        "max_batch_tokens": max(2048, args.concurrency * 8),
    }
    kwargs = {k: v for k, v in wanted.items() if k in fields}
    print(f"ContinuousBatchingConfig fields: {sorted(fields)}; set: {kwargs}")
    return ContinuousBatchingConfig(**kwargs)


def main():
    args = parse_args()
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.generation import GenerationConfig

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name(0)}")
    config = AutoConfig.from_pretrained(args.config)
    torch.manual_seed(args.seed)
    started = time.time()
    # Random weights made directly in bf16 on the GPU (an fp32 init of 8B would need 32 GB).
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    print(f"random {config.num_hidden_layers}-layer model ready in {time.time() - started:.1f} s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")

    rng = random.Random(args.seed)
    vocab = min(config.vocab_size, 32000)
    inputs = [[rng.randrange(100, vocab) for _ in range(args.input_len)]
              for _ in range(args.num_requests)]
    gen = GenerationConfig(
        max_new_tokens=args.output_len,
        min_new_tokens=args.output_len,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    kwargs = {}
    try:
        from transformers.generation import ContinuousBatchingConfig
        kwargs["continuous_batching_config"] = cb_config(ContinuousBatchingConfig, args)
    except ImportError:
        print("no ContinuousBatchingConfig in this version: generate_batch's defaults")
    if not hasattr(model, "generate_batch"):
        sys.exit(f"transformers {transformers.__version__} has no generate_batch")

    # Warm-up (kernels, CUDA graphs if it captures any), not timed.
    model.generate_batch(inputs[: min(8, len(inputs))], generation_config=gen, **kwargs)
    torch.cuda.synchronize()
    t = time.time()
    out = model.generate_batch(inputs, generation_config=gen, **kwargs)
    torch.cuda.synchronize()
    elapsed = time.time() - t
    generated = sum(len(o.generated_tokens) for o in out.values())
    result = {
        "engine": "transformers generate_batch",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
        "num_requests": len(out),
        "concurrency": args.concurrency,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "elapsed_s": elapsed,
        "total_output_tokens": generated,
        "output_throughput": generated / elapsed,
    }
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
