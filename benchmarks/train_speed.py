"""Training throughput and MFU on the nanoGPT `train_shakespeare_char` shape.

Runs the real training loop (tinylm.stages.pretrain) for a few steps per setting and reads
tokens/s from its metrics; MFU = model FLOPs per second / the matmul peak of the dtype used,
measured here by the script itself. nanoGPT's figure on this 2-core machine (CPU, fp32, no
compile) is about 1,600 tokens/s; the target is at least 2x that and MFU of at least 50%.

    python benchmarks/train_speed.py [--steps 8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from tinylm import config as configlib
from tinylm.perf import matmul_peak_flops
from tinylm.stages import pretrain
from tinylm.stages.pretrain import PretrainConfig

NANOGPT_TOKENS_PER_S = 1600.0


def measure(overrides: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = configlib.load(PretrainConfig, "nanogpt-shakespeare-char",
                             [f"out='{tmp}/run'", f"train.steps={steps}", "train.log_every=1",
                              "train.eval_every=0", "data.eval_tokens=1", "train.progress=false",
                              *overrides])
        pretrain.run(cfg)
        rows = [json.loads(x) for x in (Path(tmp) / "run/metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]  # skip warm-up steps
    return {"tokens_per_s": statistics.median(rates), "mfu": statistics.median(
        r["mfu"] for r in rows if "mfu" in r)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="tiny batch, for a smoke run")
    args = ap.parse_args()
    extra = ["train.batch_size=4"] if args.quick else []
    settings = {  # the preset is nanoGPT's recipe: AdamW, dropout 0.2
        "fp32, dropout 0.2 (nanoGPT's setting)": ["train.dtype='float32'"],
        "bf16 autocast, dropout 0.2": ["train.dtype='bfloat16'"],
        "bf16 autocast, dropout 0": ["train.dtype='bfloat16'", "model.dropout=0.0"],
        "bf16 weights, dropout 0": ["train.bf16_weights=true", "model.dropout=0.0"],
    }
    print(f"matmul peak: fp32 {matmul_peak_flops(torch.float32) / 1e9:.0f} GFLOP/s, "
          f"bf16 {matmul_peak_flops(torch.bfloat16) / 1e9:.0f} GFLOP/s", flush=True)
    print("\n| setting | tokens/s | vs nanoGPT (1,600 tok/s) | MFU |")
    print("|---|---:|---:|---:|")
    for name, overrides in settings.items():
        r = measure(overrides + extra, args.steps)
        ratio = r["tokens_per_s"] / NANOGPT_TOKENS_PER_S
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {ratio:.2f}x | {r['mfu']:.0%} |",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
