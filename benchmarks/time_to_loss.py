"""Time to quality on tinyshakespeare (characters, last 10% held out).

1. `shakespeare-char-fast`: wall time (whole `pretrain` call: tokenizing, training, the
   final full validation pass) and the validation loss it reaches. Target: val loss <= 1.886
   in at most 51 s (nanoGPT's CPU settings: 1.8857 in 102 s on this machine).
2. nanoGPT's own CPU recipe run by tinylm (GPT-2 style, AdamW, 4x128, block 64, batch 12,
   2000 iterations, lr 1e-3), side by side, as the same-machine reference.
3. `shakespeare-char-10min`: validation loss after 10 minutes of training. Target: <= 1.55.

    python benchmarks/time_to_loss.py [--skip-10min] [--skip-nanogpt] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from tinylm import config as configlib
from tinylm.stages import pretrain
from tinylm.stages.pretrain import PretrainConfig

NANOGPT_CPU = [
    "model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.block_size=64",
    "model.mlp='gelu'", "model.norm='layer'", "model.pos='learned'", "model.qk_norm=false",
    "model.tie_embeddings=true", "model.zero_init=false", "model.dropout=0.0",
    "train.steps=2000", "train.time_budget=0.0", "train.batch_size=12",
    "train.optimizer='adamw'", "train.lr=1e-3", "train.beta2=0.99", "train.weight_decay=0.1",
    "train.warmup_steps=100", "train.schedule='cosine'", "train.min_lr_factor=0.1",
    "train.dtype='float32'",
]


def run(preset: str, overrides: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = configlib.load(PretrainConfig, preset,
                             [f"out='{tmp}/run'", "train.progress=false", *overrides])
        start = time.perf_counter()
        result = pretrain.run(cfg)
        return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-10min", action="store_true")
    ap.add_argument("--skip-nanogpt", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run (what `run_all.py --quick` passes): 12 fast steps")
    args = ap.parse_args()
    if args.quick:
        args.skip_10min = args.skip_nanogpt = True
    rows = []
    wall, r = run("shakespeare-char-fast", ["train.steps=12"] if args.quick else [])
    rows.append(("tinylm `shakespeare-char-fast`", wall, r, "<= 1.886 in <= 51 s"))
    if not args.skip_nanogpt:
        wall, r = run("nanogpt-shakespeare-char", NANOGPT_CPU)
        rows.append(("nanoGPT CPU recipe, run by tinylm", wall, r, "nanoGPT: 1.8857 in 102 s"))
    if not args.skip_10min:
        wall, r = run("shakespeare-char-10min", [])
        rows.append(("tinylm `shakespeare-char-10min`", wall, r, "<= 1.55"))
    print("\n| run | wall s | train s | steps | tokens | val loss | target |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, wall, r, target in rows:
        print(f"| {name} | {wall:.1f} | {r['train_time']:.1f} | {r['step']} | "
              f"{r['tokens']:,} | {r['val_loss']:.4f} | {target} |")


if __name__ == "__main__":
    main()
