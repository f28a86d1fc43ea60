"""Decode speed: the tinylm engine vs the naive reference vs transformers' `generate`.

Builds GPT models of over 10M parameters (random weights: speed does not depend on them),
exports each with tinylm.hf to a temporary folder, loads that with transformers, and times all
three side by side in this process: prompt 32 tokens, 256 new tokens, greedy, batch 1 and 8.
Also the per-token decode time as the context grows (64, 256, 1024), the "matmul floor" (the
time of the model's weight matmuls alone for one token, which every implementation pays), the
tinystories-bpe preset's own 5M shape and an overhead probe with almost no arithmetic.
Results and their reading: docs/inference.md.

    python benchmarks/generate_speed.py [--quick] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from tinylm import kernels
from tinylm.hf import export_hf
from tinylm.infer.engine import Engine, SamplingParams, naive_generate
from tinylm.models.gpt import GPT, GPTConfig, gpt2_style
from tinylm.rundir import save_model
from tinylm.tokenizer import train_char

# Engine columns (tokens/s): weight dtype, and whether the C kernels (bf16 KV cache, decode
# attention, RMSNorm) may run. "int8 no C" is int8 on PyTorch alone, with an fp32 cache.
ENGINES = {"fp32": ("fp32", True), "bf16": ("bf16", True), "int8": ("int8", True),
           "int8 no C": ("int8", False)}
SHAPE = dict(vocab_size=4096, block_size=1024, n_layer=6, n_head=6, d_model=384)
MODELS = {
    "GPT-2 style": gpt2_style(**SHAPE),
    "default-preset switches (Qwen3)": GPTConfig(**SHAPE, mlp="swiglu", qk_norm=True,
                                                 zero_init=False),
    # The tinystories-bpe preset's own size (under 10M), where per-step overhead matters more.
    "tinystories-bpe preset shape": GPTConfig(vocab_size=4096, block_size=1024, n_layer=4,
                                              n_head=4, d_model=256, mlp="swiglu",
                                              qk_norm=True, zero_init=False),
    # Almost no arithmetic: what is left is each implementation's per-step overhead.
    "overhead probe: GPT-2 style, 6 layers x 12 wide": gpt2_style(**(SHAPE | {"d_model": 12})),
}


def best_of(repeats: int, fn, *args) -> float:
    """The fastest of a few runs of fn(*args): the machine is shared, and noise only ever
    adds time."""
    return race(repeats, {"": lambda: fn(*args)})[""]


def race(repeats: int, contenders: dict) -> dict:
    """Each contender's fastest of `repeats` runs, taken in turns (A, B, C, A, B, C, ...), so
    that a burst of load from the machine's other tenants slows all of them, not one."""
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def load_hf(cfg: GPTConfig, tmp: Path):
    """The model with random weights, and the same weights loaded by transformers."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    save_model(tmp / "run", model)
    train_char("abc").save(tmp / "run" / "tokenizer.json")
    export_hf(tmp / "run", tmp / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "hf"),
                                                           dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run the full length, as ignore_eos does
    return model, hf


def engine(model: GPT, name: str) -> Engine:
    """An engine with its inference twin built (once, not per request: not timed)."""
    dtype, kernel = ENGINES[name]
    e = Engine(model, dtype=dtype)
    os.environ["TINYLM_KERNELS"] = "1" if kernel else "0"
    e.net()
    del os.environ["TINYLM_KERNELS"]
    return e


def hf_generate(hf, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.inference_mode():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           do_sample=False, pad_token_id=0)


def matmul_floor(model: GPT, B: int, repeats: int) -> float:
    """Seconds per token of just the weight matmuls of one decode step (batch B)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(B, w.shape[1]) for w in weights}

    def step():
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    with torch.inference_mode():
        return best_of(repeats, lambda: [step() for _ in range(32)]) / 32


def agreement(model, prompts: torch.Tensor, ours: list[list[int]], theirs: list[list[int]]) -> str:
    """'yes' when the greedy tokens are the same; where they part, whether that was a near-tie
    (the two best logits closer than 1e-4, where fp32 rounding may pick either)."""
    notes = []
    for prompt, a, b in zip(prompts.tolist(), ours, theirs):
        if a == b:
            continue
        k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        with torch.no_grad():
            top = model(torch.tensor([prompt + a[:k]]))[0, -1].topk(2).values
        gap = (top[0] - top[1]).item()
        tie = gap < 1e-4
        notes.append(f"tie at token {k + 1} (gap {gap:.0e})" if tie else f"NO, token {k + 1}")
    return "; ".join(notes) or "yes"


def speed_table(name, model, hf, new: int, naive_new: int, repeats: int) -> list[str]:
    """One row per batch size: tokens/s of the engine at each weight dtype, of the naive
    reference, and of transformers in fp32 and bf16, all on the same weights."""
    rows = []
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    for B in (1, 8):
        ids = torch.randint(10, model.config.vocab_size, (B, 32))
        params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
        reference = Engine(model)
        out = [c.token_ids for c in reference.generate(ids.tolist(), params)]
        same = agreement(model, ids, out, hf_generate(hf, ids, new)[:, 32:].tolist())
        prompts = ids.tolist()
        t = race(repeats, {
            **{name: partial(engine(model, name).generate, prompts, params) for name in ENGINES},
            "hf": partial(hf_generate, hf, ids, new),
            "hf bf16": partial(hf_generate, hf_bf16, ids, new)})
        t_hf, t_hf_bf16 = t["hf"], t["hf bf16"]
        naive_params = SamplingParams(max_new_tokens=naive_new, temperature=0)
        t_naive = best_of(1, naive_generate, model, ids, naive_params)
        floor = matmul_floor(model, B, repeats)
        tps = [f"{B * new / t[d]:,.0f}" for d in ENGINES]
        rows.append(f"| {name} | {B} | " + " | ".join(tps) + f" | {B * naive_new / t_naive:,.0f} | "
                    f"{B * new / t_hf:,.0f} | {B * new / t_hf_bf16:,.0f} | "
                    f"{t_hf / t['fp32']:.2f}x | {t_hf_bf16 / t['bf16']:.2f}x | "
                    f"**{t_hf / t['int8']:.2f}x** | {t['int8'] / new * 1e3:.2f} | "
                    f"{floor * 1e3:.2f} | {same} |")
        print(rows[-1], flush=True)
    return rows


def context_table(model, hf, contexts: list[int], repeats: int) -> list[str]:
    """Decode ms/token for the 32 steps that end at each context length (prefill excluded:
    the time of generating 1 token is subtracted from that of 33)."""
    rows = []
    engines = {name: engine(model, name) for name in ("fp32", "int8", "int8 no C")}
    for ctx in contexts:
        ids = torch.randint(10, model.config.vocab_size, (1, ctx - 33))
        prompts = ids.tolist()
        contenders = {}
        for n in (33, 1):
            params = SamplingParams(n, 0, ignore_eos=True)
            contenders |= {(name, n): partial(e.generate, prompts, params)
                           for name, e in engines.items()}
            contenders[("hf", n)] = partial(hf_generate, hf, ids, n)
        t = race(repeats, contenders)
        per_token = [(t[(name, 33)] - t[(name, 1)]) / 32 for name in [*engines, "hf"]]
        rows.append(f"| {ctx} | " + " | ".join(f"{x * 1e3:.2f}" for x in per_token) + " |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few tokens, one repeat: a smoke run")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads; 0 = torch's default (a user's setting: one per core)")
    ap.add_argument("--json", help="also write the tables to this JSON file")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    new, naive_new, repeats = (16, 4, 1) if args.quick else (256, 32, 5)
    contexts = [64, 256] if args.quick else [64, 256, 1024]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); C kernels "
          f"{'built' if kernels.available() else 'NOT available'}; prompt 32 tokens, "
          f"{new} new tokens, greedy; tokens/s unless marked; naive reference timed on its "
          f"first {naive_new}")
    head = ["| model | batch | engine fp32 | engine bf16 | engine int8 | engine int8 no C "
            "| naive fp32 | HF fp32 "
            "| HF bf16 | fp32 vs HF fp32 | bf16 vs HF bf16 | int8 vs HF fp32 | int8 ms/step "
            "| fp32 matmul floor ms/step | same tokens as HF |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    print("\n".join(head))
    speed, ctx_rows = list(head), []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg) in enumerate(MODELS.items()):
            model, hf = load_hf(cfg, Path(tmp) / str(i))
            name = f"{name}, {model.num_params() / 1e6:.1f}M"
            speed += speed_table(name, model, hf, new, naive_new, repeats)
            if i == 0:
                ctx_model, ctx_hf = model, hf
        head = ["", "| context | engine fp32 ms/token | engine int8 ms/token | engine int8 no C "
                "ms/token | HF fp32 ms/token |", "|---:|---:|---:|---:|---:|"]
        print("\n".join(head))
        ctx_rows = head + context_table(ctx_model, ctx_hf, contexts, repeats)
    if args.json:
        Path(args.json).write_text(json.dumps({"speed": speed, "context": ctx_rows}, indent=2))


if __name__ == "__main__":
    main()
