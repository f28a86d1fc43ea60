"""Hardware facts the loop and the benchmarks need: device, default dtype, matmul peak."""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

from tinylm.files import atomic_write_text

# Every dtype name tinylm takes, for training (pick_dtype) and for inference weights
# (infer/fast.py). int8 is inference's only: weights quantized per output row.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "int8": torch.int8}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _machine_key() -> str:
    """What a measured speed depends on: the CPU model, PyTorch's version, the threads."""
    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor()}|torch {torch.__version__}|{torch.get_num_threads()}"


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether bf16 matmuls beat fp32 ones on this CPU, measured (never read off CPU flags:
    with AVX512-BF16 or AMX bf16 runs 2-10x faster, without them 10-50x slower) on the
    256-wide matrices a small model multiplies, with a margin so noise cannot flip it. The
    answer is cached per machine in $TINYLM_CACHE/perf.json, so every process on the machine
    (a run and its --resume) takes the same path."""
    key = _machine_key()
    cached = _read_cache()
    if "bf16_fast" not in cached.get(key, {}):
        bf16 = matmul_peak_flops(torch.bfloat16, "cpu", 256, 0.1)
        fp32 = matmul_peak_flops(torch.float32, "cpu", 256, 0.1)
        cached = _read_cache()  # the peaks above wrote their entries
        cached.setdefault(key, {}).update(bf16_fast=bf16 > 1.2 * fp32, bf16_flops=bf16,
                                          fp32_flops=fp32)
        _write_cache(cached)
    return bool(cached[key]["bf16_fast"])


def measured(name: str, measure):
    """`measure()`'s result (JSON), measured once per machine (_machine_key) and cached under
    `name` in $TINYLM_CACHE/perf.json, so every process on the machine takes the same path."""
    key = _machine_key()
    cached = _read_cache()
    if name not in cached.get(key, {}):
        value = measure()
        cached = _read_cache()  # what the measurement itself may have written
        cached.setdefault(key, {})[name] = value
        _write_cache(cached)
    return cached[key][name]


def fast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it is the faster matmul (CUDA, and CPUs where it measured faster), else
    fp32: for arithmetic whose precision bf16 is enough for (Muon's Newton-Schulz)."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16_is_fast() else torch.float32


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 autocast where bf16 matmuls measured faster (for models of ~10M
    parameters; see docs/training.md), fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return fast_dtype(device)
    if name not in DTYPES or DTYPES[name] == torch.int8:  # int8: for inference, not training
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


@functools.cache
def matmul_peak_flops(dtype: torch.dtype, device_type: str = "cpu", n: int = 1024,
                      seconds: float = 0.5) -> float:
    """FLOP/s of square n x n matmuls in `dtype`: the denominator of MFU. The best of short
    bursts, not their mean, so that other processes' load during part of the measurement
    does not lower it; on CPU also the best ever measured on this machine (the cache of
    cpu_bf16_is_fast), since a run started under load would otherwise divide by a low peak
    and report an MFU above 1 once the load goes."""
    device = torch.device(device_type)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    if device.type != "cpu":
        return best
    return _best_cached(f"peak {dtype} {n}", best)


def _cache_path() -> Path:
    path = Path(os.environ.get("TINYLM_CACHE") or Path.home() / ".cache" / "tinylm")
    return path / "perf.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_cache(cached: dict) -> None:
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(cached, indent=2))


def _best_cached(name: str, value: float) -> float:
    """max(value, the best `name` cached for this machine), the new best written back."""
    cached = _read_cache()
    entry = cached.setdefault(_machine_key(), {})
    if value > entry.get(name, 0.0):
        entry[name] = value
        _write_cache(cached)
    return entry[name]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
