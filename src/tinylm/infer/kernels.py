"""Two small C kernels for CPU inference (kernels.c): one decode step's attention over a bf16
KV cache, and RMSNorm in one loop.

They are compiled with the system's C compiler on first use (about a quarter of a second) into
$TINYLM_CACHE/kernels (default ~/.cache/tinylm), keyed by the source, the flags and the CPU, and
called through ctypes: no PyTorch headers, so no half-minute extension build. Where there is no
compiler, or TINYLM_KERNELS=0, `available()` is False and `FastGPT` keeps an fp32 cache and
PyTorch's attention and norms instead: slower, never wrong.

The library is built with -fopenmp and so links libgomp.so.1, the same runtime PyTorch's CPU
build has already loaded: the kernels' threads are PyTorch's threads, not a second pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _cpu() -> str:
    """What -march=native compiles for: the CPU's flags (a shared home directory may be seen
    by machines with different CPUs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@cache
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *FLAGS, _cpu()]).encode())
    root = Path(os.environ.get("TINYLM_CACHE") or Path.home() / ".cache" / "tinylm") / "kernels"
    lib = root / f"kernels-{key.hexdigest()[:16]}.so"
    try:
        if not lib.exists():
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root) as tmp:  # built aside, then renamed
                built = Path(tmp) / lib.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True,
                               capture_output=True, timeout=120)
                os.replace(built, lib)
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError):
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    dll.decode_attention.argtypes = [ptr] * 5 + [i64] * 11 + [ctypes.c_float, ctypes.c_int]
    dll.decode_attention.restype = None
    dll.rms_norm.argtypes = [ptr] * 3 + [i64] * 4 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    dll.rms_norm.restype = None
    return dll


def available() -> bool:
    """Whether FastGPT built now will use the kernel (TINYLM_KERNELS=0 turns it off)."""
    return os.environ.get("TINYLM_KERNELS", "1") != "0" and _library() is not None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     start: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for one query per row, over positions start[b]: of keys and
    values (B, H, S, D) in bf16: views of a `KVCache(transpose_k=True)`, so k has unit stride
    over S and v over D. q: (B, H, 1, D) fp32; start: (B,) int64.
    Returns (B, H*D) fp32, the rows `proj` takes."""
    B, H, S, D = k.shape
    assert q.dtype == torch.float32 and k.dtype == v.dtype == torch.bfloat16
    assert k.stride(2) == 1 and v.stride()[2:] == (D, 1) and q.stride(3) == 1
    out = torch.empty(B, H * D)
    _library().decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), start.data_ptr(),
                                out.data_ptr(), B, H, S, D, q.stride(0), q.stride(1),
                                k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1),
                                D ** -0.5, torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dimension, weight fp32 (C,) or None, for bf16 or fp32 x of shape
    (N, G, C): N groups of G contiguous rows, the groups any stride apart (the q and k heads of
    a fused qkv output, read in place). Returns a contiguous (N, G, C) tensor of x's dtype."""
    N, G, C = x.shape
    assert x.dtype in (torch.float32, torch.bfloat16) and x.stride(2) == 1
    assert (G == 1 or x.stride(1) == C) and (weight is None or weight.dtype == torch.float32)
    out = torch.empty(N, G, C, dtype=x.dtype)
    _library().rms_norm(x.data_ptr(), out.data_ptr(), 0 if weight is None else weight.data_ptr(),
                        N * G, C, G, x.stride(0), eps, x.dtype == torch.bfloat16,
                        torch.get_num_threads())
    return out
