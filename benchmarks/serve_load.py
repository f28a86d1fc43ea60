"""Serving under load: `tinylm serve` vs `transformers serve --continuous-batching`.

Builds a GPT run (random weights: speed does not depend on them; char tokenizer), exports it
with `tinylm export-hf`'s function, and starts both servers as subprocesses on 127.0.0.1 over
the same weights. Then, for each number of concurrent clients (1, 4, 8, 16, 64), every client
streams chat completions (greedy, `max_tokens` new tokens) one after another until each has
sent `--requests`; measured from the client side:

- aggregate tokens/s: generated tokens of all clients (the usage counts of
  `stream_options.include_usage`) / wall time of the round,
- TTFT p50/p95: from sending a request to its first content chunk,
- ITL p50: time between two content chunks of one request.

Latencies are between content chunks (both servers send one per token that releases text).
Both servers are up together but are measured in turns, never at once (the idle one's CPU
meanwhile is printed), round by round so that load from elsewhere falls on both, with the same
number of intra-op threads (`--threads`, default all cores but one: what `tinylm serve` uses by
itself; PyTorch's default, all cores, makes every op of a decode step wait whenever the event
loop or this script's clients hold one of them).

`--workers 1,0` (the default) runs `tinylm serve` both ways in the same turns: with its decode
loop in a worker process (`tinylm serve --workers 1`) and in the server's own process
(`--workers 0`).
A server's CPU counts its children's (the worker's) too.

    python benchmarks/serve_load.py [--quick] [--clients 1,4,8,16,64] [--repeats 3] [--no-hf]
                                    [--workers 1,0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import safetensors.torch
import torch

from tinylm.hf import export_hf
from tinylm.models.gpt import GPT, GPTConfig
from tinylm.rundir import save_chat_template, save_model
from tinylm.tokenizer import train_char

TEXT = "The cat sat on the mat. A dog is chasing the ball in the park. " * 50
MESSAGES = [{"role": "user", "content": "Tell me a story about a cat and a dog."}]


def build_run(root: Path, d_model: int, n_layer: int) -> tuple[Path, Path]:
    tok = train_char(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=512, n_layer=n_layer,
                    n_head=max(1, d_model // 64), d_model=d_model, mlp="swiglu", qk_norm=True,
                    zero_init=False)
    torch.manual_seed(0)
    run = root / "run"
    run.mkdir(parents=True)
    save_model(run, GPT(cfg))
    tok.save(run / "tokenizer.json")
    from tinylm.data.chat import TEMPLATE

    save_chat_template(run, TEMPLATE)
    hf_dir = export_hf(run, root / "hf")
    return run, Path(hf_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, log: Path, timeout: float = 300,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TRANSFORMERS_OFFLINE": "1",
                                 "HF_HUB_OFFLINE": "1", **(env or {})})
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"{cmd} did not come up in {timeout} s")


class _Conn:
    """One keep-alive HTTP/1.1 connection that streams SSE responses, on asyncio's own streams.

    The clients run on the same cores as the servers, so what they cost is taken from the
    server being measured: an httpx client spends more CPU per streamed chunk than `tinylm
    serve` spends generating the token (measured: about 5 s of client CPU against 4.4 s of
    server CPU at 8 clients), which would measure the client. This one reads the chunked body
    and splits SSE events with a few bytes operations per chunk, the same for both servers."""

    def __init__(self, url: str):
        host_port = url.split("://", 1)[1]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, body: dict) -> AsyncIterator[bytes]:
        """POST `body` as JSON; yields the body's bytes as they arrive (chunked or not)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                          f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        status = int(head.split(None, 2)[1])
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {head[:200]}")
        if "transfer-encoding: chunked" in head:
            while (size := int((await self.reader.readline()).split(b";")[0], 16)):
                yield (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readline()  # the empty trailer
        else:
            length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
            yield await self.reader.readexactly(length)
        if "connection: close" in head:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def one_request(c: _Conn, model: str, max_tokens: int, out: dict) -> None:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last, chunks, counted, buf = None, 0, None, b""
    async for data in c.post_stream("/v1/chat/completions", body):
        buf += data
        *events, buf = buf.split(b"\n\n")
        now = time.perf_counter()
        for event in events:
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            chunk = json.loads(event[6:])
            if chunk.get("usage"):
                counted = chunk["usage"]["completion_tokens"]
            if not chunk.get("choices") or not chunk["choices"][0]["delta"].get("content"):
                continue
            if last is None:
                out["ttft"].append(now - t0)
            else:
                out["itl"].append(now - last)
            last = now
            chunks += 1
    # The usage count where the server reports one: a chunk whose token only completes a
    # character later carries no text, so chunks alone would undercount.
    out["tokens"] += counted if counted is not None else chunks


async def round_(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    out = {"ttft": [], "itl": [], "tokens": 0}
    conns = [_Conn(url) for _ in range(clients)]

    async def client(c: _Conn):
        for _ in range(requests):
            await one_request(c, model, max_tokens, out)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*[client(c) for c in conns])
    finally:
        for c in conns:
            c.close()
    wall = time.perf_counter() - t0
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else (xs or [0])[0]  # noqa: E731
    return {"tok/s": out["tokens"] / wall, "ttft p50": q(out["ttft"], 50),
            "ttft p95": q(out["ttft"], 95), "itl p50": q(out["itl"], 50), "wall": wall,
            "tokens": out["tokens"]}


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its living descendants (a server's
    decode worker), from Linux /proc; 0 elsewhere."""
    parents = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = (int(fields[1]), fields)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in parents:
            fields = parents[p][1]
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        todo += [c for c, (ppid, _) in parents.items() if ppid == p]
    return total


def measure(servers: dict[str, tuple[subprocess.Popen, str, str]], clients: list[int],
            args) -> dict[str, dict[int, dict]]:
    """Rounds of every server in turns (client count by client count, `--repeats` times), so
    that a burst of load from elsewhere falls on both rather than on one; each figure is the
    median over the repeats. The idle server's CPU during the other's rounds is printed: it
    must stay near zero for the turns to be fair."""
    for _, url, model in servers.values():
        asyncio.run(round_(url, model, 1, 1, 8))  # warm-up: first-use costs (kernels, caches)
    runs: dict[str, dict[int, list[dict]]] = {name: {} for name in servers}
    for _ in range(args.repeats):
        for n in clients:
            for name, (proc, url, model) in servers.items():
                others = [p.pid for other, (p, _, _) in servers.items() if other != name]
                idle, busy = sum(map(cpu_seconds, others)), cpu_seconds(proc.pid)
                r = asyncio.run(round_(url, model, n, args.requests, args.max_tokens))
                idle = sum(map(cpu_seconds, others)) - idle
                # CPU the server spent per generated token: unlike tokens/s, it barely moves
                # when other work on the machine takes cores away, so it shows what a change
                # to the server costs or saves even under load.
                r["cpu ms/tok"] = 1e3 * (cpu_seconds(proc.pid) - busy) / max(1, r["tokens"])
                runs[name].setdefault(n, []).append(r)
                print(f"  {name:>18} {n:>3} clients: {r['tok/s']:8.1f} tok/s  TTFT p50 "
                      f"{r['ttft p50'] * 1e3:7.1f} ms  p95 {r['ttft p95'] * 1e3:7.1f} ms  ITL "
                      f"p50 {r['itl p50'] * 1e3:6.1f} ms  CPU {r['cpu ms/tok']:.2f} ms/token  "
                      f"(idle server's CPU meanwhile: "
                      f"{100 * idle / r['wall']:.0f}%)", flush=True)
    return {name: {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                   for n, rs in by_n.items()} for name, by_n in runs.items()}


def table(results: dict[str, dict[int, dict]], clients: list[int]) -> None:
    print("\n| server | clients | tokens/s | TTFT p50 (ms) | TTFT p95 (ms) | ITL p50 (ms) | "
          "server CPU (ms/token) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rows in results.items():
        for n in clients:
            r = rows[n]
            print(f"| {name} | {n} | {r['tok/s']:.1f} | {r['ttft p50'] * 1e3:.1f} | "
                  f"{r['ttft p95'] * 1e3:.1f} | {r['itl p50'] * 1e3:.1f} | {r['cpu ms/tok']:.2f} |")
    hf = results.get("transformers serve")
    print()
    for name, tl in results.items():
        if not name.startswith("tinylm"):
            continue
        if 8 in tl and 1 in tl:
            print(f"{name} at 8 clients / its own 1 client: "
                  f"{tl[8]['tok/s'] / tl[1]['tok/s']:.2f}x")
        if hf and 8 in tl and 8 in hf:
            print(f"{name} / transformers serve at 8 clients: tokens/s "
                  f"{tl[8]['tok/s'] / hf[8]['tok/s']:.2f}x, TTFT p50 "
                  f"{tl[8]['ttft p50'] * 1e3:.0f} vs {hf[8]['ttft p50'] * 1e3:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model, fewer tokens")
    ap.add_argument("--clients", default="1,4,8,16,64")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per round")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds per server and client count (figures: their medians)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers serve")
    ap.add_argument("--dtype", default="auto", help="tinylm serve --dtype")
    ap.add_argument("--workers", default="1,0", help="tinylm serve --workers, one server per "
                    "value: 1 = decode in a worker process, 0 = in the server's process; the "
                    "default measures both in the same turns")
    ap.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1),
                    help="intra-op threads of both servers (OMP_NUM_THREADS); default: all "
                    "cores but one, tinylm serve's own default, which leaves a core to the "
                    "event loop and to this script's clients")
    ap.add_argument("--run", help="serve this trained chat run (e.g. runs/sft-tinystories) "
                    "instead of a freshly built one; an untrained model's bytes rarely form "
                    "text, so its stream is held back and TTFT/ITL read as the whole answer")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if args.quick:
        args.max_tokens = min(args.max_tokens, 32)
    root = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        if args.run:
            run, hf_dir = Path(args.run), export_hf(args.run, root / "hf")
        else:
            run, hf_dir = build_run(root, 128 if args.quick else 256, 2 if args.quick else 4)
        params = sum(t.numel() for t in safetensors.torch.load_file(
            run / "model.safetensors").values())
        print(f"model: {params / 1e6:.1f}M parameters; "
              f"{args.max_tokens} new tokens per request, {args.requests} requests per client; "
              f"{os.cpu_count()} CPUs (shared: numbers taken under whatever else runs); "
              f"{args.threads} intra-op thread(s) per server")
        threads = {"OMP_NUM_THREADS": str(args.threads)}
        servers: dict[str, tuple[subprocess.Popen, str, str]] = {}
        try:
            for w in args.workers.split(","):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                name = {"1": "tinylm serve (worker)", "0": "tinylm serve (in-process)"}[w]
                servers[name] = (start(
                    [sys.executable, "-m", "tinylm", "serve", "--run", str(run), "--port",
                     str(port), "--dtype", args.dtype, "--workers", w], url,
                    root / f"tinylm-{w}.log", env=threads), url, run.name)
            if not args.no_hf:
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                exe = shutil.which("transformers") or str(Path(sys.executable).parent /
                                                          "transformers")
                try:
                    servers["transformers serve"] = (start(
                        [exe, "serve", "--continuous-batching", "--device", "cpu", "--port",
                         str(port), str(hf_dir)], url, root / "hf.log", env=threads),
                        url, str(hf_dir))
                except RuntimeError as e:
                    print(f"transformers serve did not run here: {str(e)[-600:]}")
            results = measure(servers, clients, args)
        finally:
            for proc, _, _ in servers.values():
                proc.terminate()
                proc.wait(30)
        table(results, clients)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
