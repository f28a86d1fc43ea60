"""Hardware facts the loop and the benchmarks need: device, default dtype, matmul peak."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

# Every dtype name tinylm takes, for training (pick_dtype) and for inference weights
# (infer/fast.py). int8 is inference's only: weights quantized per output row.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "int8": torch.int8}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU does bf16 arithmetic natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 autocast where the hardware has it (measured faster for models of ~10M
    parameters; see docs/training.md), fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in DTYPES or DTYPES[name] == torch.int8:  # int8: for inference, not training
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


@functools.cache
def matmul_peak_flops(dtype: torch.dtype, device_type: str = "cpu", n: int = 1024,
                      seconds: float = 0.5) -> float:
    """Measured FLOP/s of square n x n matmuls in `dtype`: the denominator of MFU."""
    device = torch.device(device_type)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            a @ b
        reps += 4
        _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
