"""Continuous batching: aggregate tokens/s of the Scheduler with 1, 4, 8 and 16 concurrent
clients, side by side in this process, on the same engine and the same requests.

Each client is an asyncio task (as the server's are) that sends its requests one after the
other and streams each one's events: prompts of 16 to 64 random tokens, 32 to 128 new tokens
(greedy, EOS ignored), the same list of requests for every client count, so requests start and
end at different steps and rows join and leave a running batch all the time. A GPT of the
tinystories-bpe preset's shape with random weights (speed does not depend on them).

The client counts run in turns (1, 4, 8, 16, then again), and each keeps its best round: the
machine is shared, and a burst of load from other tenants should slow all of them, not one.
Reported: generated tokens per second over the whole run, time to first token (submit to first
event) p50/p95, inter-token latency p50, and the aggregate's ratio to one client's. Results and
their reading: docs/inference.md.

    python benchmarks/scheduler_speed.py [--quick] [--dtype auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import torch

from tinylm import kernels
from tinylm.infer.engine import Engine, SamplingParams, Scheduler
from tinylm.models.gpt import GPT, GPTConfig

SHAPE = GPTConfig(vocab_size=4096, block_size=1024, n_layer=4, n_head=4, d_model=256,
                  mlp="swiglu", qk_norm=True, zero_init=False)


def requests(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab) for _ in range(rng.randint(16, 64))],
             SamplingParams(max_new_tokens=rng.randint(32, 128), temperature=0, ignore_eos=True))
            for _ in range(n)]


async def client(s: Scheduler, work: list, stats: dict) -> None:
    """Send `work` one request after the other, streaming each."""
    for prompt, params in work:
        req = s.submit(prompt, params)[0]
        last = None
        async for _ in req:
            now = time.perf_counter()
            if last is None:
                stats["ttft"].append(now - req.t_submit)
            else:
                stats["itl"].append(now - last)
            last = now
            stats["tokens"] += 1


async def load(s: Scheduler, work: list, clients: int) -> dict:
    """Requests dealt round-robin to `clients` concurrent clients; returns the statistics."""
    stats = {"ttft": [], "itl": [], "tokens": 0}
    start = time.perf_counter()
    await asyncio.gather(*(client(s, work[i::clients], stats) for i in range(clients)))
    stats["seconds"] = time.perf_counter() - start
    return stats


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests, one round: a smoke run")
    ap.add_argument("--rounds", type=int, default=3, help="turns of every client count")
    ap.add_argument("--dtype", default="auto", help="engine weights: auto, fp32, bf16, int8")
    ap.add_argument("--json", help="also write the table to this JSON file")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT(SHAPE).eval()
    engine = Engine(model, dtype=args.dtype)
    engine.net()  # the inference twin is built once, before timing
    n_requests, rounds = (8, 1) if args.quick else (16, args.rounds)
    counts = (1, 4, 8, 16)
    work = requests(n_requests, SHAPE.vocab_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); C kernels "
          f"{'built' if kernels.available() else 'NOT available'}; weights {engine.dtype}; "
          f"{model.num_params() / 1e6:.1f}M params; {n_requests} requests, greedy; best of "
          f"{rounds} rounds")
    head = ["| clients | tokens/s | vs 1 client | TTFT p50 ms | TTFT p95 ms | ITL p50 ms |",
            "|---:|---:|---:|---:|---:|---:|"]
    best: dict[int, dict] = {}
    with Scheduler(engine) as s:
        asyncio.run(load(s, work[:2], 2))  # warm-up: first calls, allocations
        for r in range(rounds):
            for clients in counts:
                st = asyncio.run(load(s, work, clients))
                st["tps"] = st["tokens"] / st["seconds"]
                print(f"round {r + 1}, {clients} clients: {st['tps']:,.0f} tokens/s", flush=True)
                if clients not in best or st["tps"] > best[clients]["tps"]:
                    best[clients] = st
    print("\n".join(head))
    rows = list(head)
    for clients in counts:
        st, base = best[clients], best[1]["tps"]
        rows.append(f"| {clients} | {st['tps']:,.0f} | {st['tps'] / base:.2f}x | "
                    f"{pct(st['ttft'], 50) * 1e3:.1f} | {pct(st['ttft'], 95) * 1e3:.1f} | "
                    f"{pct(st['itl'], 50) * 1e3:.2f} |")
        print(rows[-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"scheduler": rows}, indent=2))


if __name__ == "__main__":
    main()
