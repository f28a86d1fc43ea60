"""What the engine's faster weight dtypes cost in quality, on a trained run.

For each dtype the engine offers (fp32, bf16, int8), runs the run's validation split through
the engine's model (FastGPT) and reports the mean next-token loss beside GPT.forward's: once
as a prefill over windows of block_size tokens, and once decoded one token at a time over
windows of 256 (the path generation takes, with its KV cache: bf16 for bf16 and int8 weights
on a CPU where the C kernel builds). Also how often greedy continuations of validation prompts
agree with fp32's token for token.

    python benchmarks/inference_quality.py [RUN] [--tokens 65536] [--decode-tokens 16384]
                                           [--quick]

Without RUN it uses runs/demo-tinystories (`make demo`), or first trains the tinystories-bpe
preset (its fixed 125 steps, about 3 minutes) into runs/bench-quality.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
import torch.nn.functional as F

import tinylm
from tinylm.data.text import load_text
from tinylm.data.tokens import TokenData, encode_cached
from tinylm.infer.engine import Engine, SamplingParams

DTYPES = ("fp32", "bf16", "int8")


def val_loss(net, data: TokenData, T: int, max_tokens: int, one_at_a_time: bool = False,
             batch: int = 8) -> float:
    """Mean next-token loss over validation windows of T, from one prefill per window, or
    (`one_at_a_time`) from T one-token decode steps, the path generation takes."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, y in data.val_batches(batch, T):
            cache = net.new_cache(x.shape[0], T)
            if one_at_a_time:
                logits = torch.cat([net.decode(x[:, t : t + 1], cache) for t in range(T)], 1)
            else:
                logits = net.decode(x, cache)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
            if count >= max_tokens:
                break
    return total / count


def default_run() -> str:
    if Path("runs/demo-tinystories/model.safetensors").is_file():
        return "runs/demo-tinystories"
    out = "runs/bench-quality"
    if not Path(out, "model.safetensors").is_file():
        print(f"no trained run yet: training tinystories-bpe (its 125 steps) into {out}")
        subprocess.run([sys.executable, "-m", "tinylm", "pretrain", "--config", "tinystories-bpe",
                        "--out", out], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="a GPT run dir (default: see above)")
    ap.add_argument("--tokens", type=int, default=65536, help="validation tokens to score")
    ap.add_argument("--decode-tokens", type=int, default=16384,
                    help="validation tokens to score one decode step at a time")
    ap.add_argument("--prompts", type=int, default=16, help="greedy continuations compared")
    ap.add_argument("--quick", action="store_true", help="few tokens and prompts: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.decode_tokens, args.prompts = 4096, 1024, 4
    args.run = args.run or default_run()
    torch.set_num_threads(1)
    model, tok = tinylm.load(args.run, family="gpt")
    corpus = tomllib.loads((Path(args.run) / "config.toml").read_text())["data"]["corpus"]
    data = TokenData(encode_cached(load_text(corpus), tok))
    T = model.config.block_size
    prompts = [data.val[i * 997 : i * 997 + 32].tolist() for i in range(args.prompts)]
    params = SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True)
    greedy = {d: [c.token_ids for c in Engine(model, dtype=d).generate(prompts, params)]
              for d in DTYPES}
    T_dec = min(T, 256)
    print(f"{args.run}: {model.num_params() / 1e6:.1f}M parameters; loss over "
          f"{args.tokens:,} validation tokens in windows of {T}, and over {args.decode_tokens:,} "
          f"decoded one at a time in windows of {T_dec}; greedy: {args.prompts} validation "
          f"prompts of 32 tokens, 64 new tokens")
    print("| weights | val loss | perplexity | decode loss | greedy tokens equal to fp32's "
          "| first token equal |")
    print("|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        ref = val_loss(model, data, T, args.tokens)
    ref_dec = val_loss(model, data, T_dec, args.decode_tokens, one_at_a_time=True)
    print(f"| GPT.forward fp32 | {ref:.4f} | {math.exp(ref):.2f} | {ref_dec:.4f} | | |")
    for d in DTYPES:
        net = Engine(model, dtype=d).net()
        loss = val_loss(net, data, T, args.tokens)
        dec = val_loss(net, data, T_dec, args.decode_tokens, one_at_a_time=True)
        pairs = list(zip(greedy["fp32"], greedy[d]))
        same = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                   for x, y in pairs) / sum(len(x) for x, _ in pairs)
        first = sum(x[0] == y[0] for x, y in pairs) / len(pairs)
        print(f"| engine {d} | {loss:.4f} | {math.exp(loss):.2f} | {dec:.4f} | {same:.0%} of the "
              f"tokens before the first difference | {first:.0%} |", flush=True)


if __name__ == "__main__":
    main()
