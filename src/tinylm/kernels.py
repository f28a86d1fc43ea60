"""Small C kernels for the CPU (kernels.c): for inference (infer/fast.py), one decode step's
attention over a bf16 KV cache and matmuls by int8 or bf16 weights (one row, a batch's few, or
a prompt's hundreds: blocked as a matmul library blocks them); for inference and training
(models/layers.py RMSNorm), RMSNorm and its backward, each one loop. This module sits below
the models so that both can call it; it imports nothing of tinylm.

They are compiled with the system's C compiler on first use (about two seconds) into
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
from typing import Any

import torch

SOURCE = Path(__file__).with_name("kernels.c")
KEY_BLOCK = 16  # as in kernels.c: the cache stores keys in transposed blocks of 16 positions
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _cpu() -> str:
    """What -march=native compiles for: the CPU's flags (a shared home directory may be seen
    by machines with different CPUs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cache_root() -> Path:
    """$TINYLM_CACHE, default ~/.cache/tinylm: what is built or measured once per machine."""
    return Path(os.environ.get("TINYLM_CACHE") or Path.home() / ".cache" / "tinylm")


def cpu_id() -> str:
    """What identifies this machine's CPU for cached builds and measurements."""
    return _cpu()


def build_id() -> str:
    """What the library is built from (the source, the compiler, its flags, the CPU): a
    measurement of the kernels' speed is valid for this build only."""
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *FLAGS, _cpu()]).encode())
    return key.hexdigest()[:16]


@cache
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC", "cc")
    root = cache_root() / "kernels"
    lib = root / f"kernels-{build_id()}.so"
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
    dll.decode_attention.argtypes = ([ptr] + [i64] * 4 + [ptr, ctypes.c_float, ptr, ptr, i64]
                                     + [ptr] + [i64] * 2 + [ptr] + [i64] * 3 + [ptr] * 2
                                     + [ctypes.c_int])
    dll.decode_attention.restype = None
    dll.rms_norm.argtypes = [ptr] * 3 + [i64] * 4 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    dll.rms_norm.restype = None
    dll.rms_norm_backward.argtypes = [ptr] * 5 + [i64] * 2 + [ctypes.c_float] + [ctypes.c_int] * 2
    dll.rms_norm_backward.restype = None
    dll.int8_linear.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, ctypes.c_int,
                                ctypes.c_int, i64, ctypes.c_int]
    dll.int8_linear.restype = None
    dll.bf16_linear.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ptr, ctypes.c_int,
                                ctypes.c_int, i64, ctypes.c_int]
    dll.bf16_linear.restype = None
    return dll


def available() -> bool:
    """Whether the kernels are built and on (TINYLM_KERNELS=0 turns them off): a FastGPT made
    now uses them, and so does RMSNorm on a CPU."""
    return os.environ.get("TINYLM_KERNELS", "1") != "0" and _library() is not None


def decode_attention(qkv: torch.Tensor, cache: Any, layer: int, start: torch.Tensor,
                     qk_norm: torch.Tensor | None, eps: float,
                     rope: tuple[torch.Tensor, torch.Tensor] | None, n_head: int = 0
                     ) -> torch.Tensor:
    """One decode step's attention in `layer`, from the fused qkv projection's output
    qkv (B, (H + 2 Hk) D) bf16 (n_head = H query heads, then the cache's Hk key heads and Hk
    value heads; n_head 0 = Hk, plain multi-head) to the heads' outputs (B, H D) bf16:
    QK-norm with weights qk_norm (2, D)
    fp32 if given, rotary embedding with rope = (cos, signed sin) rows (B or 1, D) fp32 if
    given, k and v written into `cache` (bf16, `key_block=KEY_BLOCK`) at cache.pos, then
    attention over each row's positions start[b]..cache.pos. `cache` is a models.layers
    KVCache; the caller advances it."""
    ks, vs = cache.k_layers[layer], cache.v_layers[layer]  # (B, Hk, blocks, D, KEY_BLOCK)
    B, Hk, _, D, block = ks.shape
    H = n_head or Hk
    assert H % Hk == 0 and qkv.shape == (B, (H + 2 * Hk) * D)
    assert qkv.dtype == ks.dtype == vs.dtype == torch.bfloat16 and qkv.is_contiguous()
    assert block == KEY_BLOCK and ks.stride()[2:] == (D * block, block, 1)
    assert vs.stride()[2:] == (D, 1) and cache.pos < cache.max_len
    cos, sin = rope if rope is not None else (None, None)
    rows = 0 if cos is None or cos.shape[0] == 1 else D
    out = torch.empty(B, H * D, dtype=torch.bfloat16)
    _library().decode_attention(
        qkv.data_ptr(), B, H, Hk, D, _ptr(qk_norm), eps, _ptr(cos), _ptr(sin), rows,
        ks.data_ptr(), ks.stride(0), ks.stride(1),
        vs.data_ptr(), vs.stride(0), vs.stride(1), cache.pos, start.data_ptr(), out.data_ptr(),
        torch.get_num_threads())
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    assert t.dtype == torch.float32 and t.is_contiguous()
    return t.data_ptr()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dimension, weight fp32 (C,) or None, for bf16 or fp32 x of shape
    (N, G, C): N groups of G contiguous rows, the groups any stride apart (the q and k heads of
    a fused qkv output, read in place). Returns a contiguous (N, G, C) tensor of x's dtype."""
    N, G, C = x.shape
    assert x.dtype in (torch.float32, torch.bfloat16) and x.stride(2) == 1
    assert G == 1 or x.stride(1) == C
    out = torch.empty(N, G, C, dtype=x.dtype)
    _library().rms_norm(x.data_ptr(), out.data_ptr(), _ptr(weight),
                        N * G, C, G, x.stride(0), eps, x.dtype == torch.bfloat16,
                        torch.get_num_threads())
    return out


def rms_norm_backward(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradients (dx of x's dtype, dweight fp32 or None) of `rms_norm` over the last
    dimension of contiguous bf16 or fp32 x for the output's gradient g (made x's dtype and
    contiguous here), with weight fp32 (C,) or None."""
    assert x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()
    C = x.shape[-1]
    g = g.to(x.dtype).contiguous()
    threads = torch.get_num_threads()
    dx = torch.empty_like(x)
    dw = None if weight is None else torch.zeros(threads, C)
    _library().rms_norm_backward(x.data_ptr(), g.data_ptr(), _ptr(weight), dx.data_ptr(),
                                 _addr(dw), x.numel() // C, C, eps, x.dtype == torch.bfloat16,
                                 threads)
    return dx, None if dw is None else dw.sum(0)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                glu: bool = False, panel: int = 0) -> torch.Tensor:
    """x (rows, K) bf16 or fp32 times int8 weight (N, K) with fp32 scale (N,) per output row,
    plus fp32 bias (N,) and residual (rows, N) of x's dtype if given: (rows, N) of x's dtype,
    computed in fp32. Each weight is read from memory once for all rows, and the rows are
    blocked so that many (a prompt) run as fast as a few per row. With `glu`, the rows of
    weight are SwiGLU's gate and up projections interleaved (gate i at 2i, up i at 2i + 1)
    and the result is silu(gate) * up, (rows, N / 2). `panel`: weight rows per block (0: what
    fits in L2; 2: the order before blocking, for the tests)."""
    assert weight.dtype == torch.int8 and scale.shape == (weight.shape[0],)
    x, out, res = _matmul_args(x, weight, bias, residual, glu)
    rows, K = x.shape
    _library().int8_linear(x.data_ptr(), rows, K, weight.data_ptr(), _ptr(scale),
                           weight.shape[0], _ptr(bias), _addr(res), out.data_ptr(),
                           x.dtype == torch.bfloat16, glu, panel, torch.get_num_threads())
    return out


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, glu: bool = False,
                panel: int = 0) -> torch.Tensor:
    """As int8_linear, for bf16 weight (N, K) (no scale): each weight widened to fp32 in
    registers by a shift, multiplied into the rows of x in fp32."""
    assert weight.dtype == torch.bfloat16
    x, out, res = _matmul_args(x, weight, bias, residual, glu)
    rows, K = x.shape
    _library().bf16_linear(x.data_ptr(), rows, K, weight.data_ptr(), weight.shape[0],
                           _ptr(bias), _addr(res), out.data_ptr(), x.dtype == torch.bfloat16, glu,
                           panel, torch.get_num_threads())
    return out


def _matmul_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 residual: torch.Tensor | None, glu: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The checks both matmuls make; returns x, the output tensor and the residual, made
    contiguous (the caller holds it through the call)."""
    rows, K = x.shape
    N = weight.shape[0]
    assert x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()
    assert weight.shape[1] == K and weight.is_contiguous()
    assert bias is None or bias.shape == (N,)
    assert not (glu and (N % 2 or residual is not None))
    if residual is not None:
        assert residual.shape == (rows, N) and residual.dtype == x.dtype
        residual = residual.contiguous()
    out = torch.empty(rows, N // 2 if glu else N, dtype=x.dtype)
    return x, out, residual


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
