"""The fast path of generation: a GPT's forward pass as one flat function over weights
prepared for inference.

`GPT.forward` is written to be read and trained: a module per idea, q, k and v as three
matmuls, positions recomputed in every layer. Decoding one token per row spends its time
elsewhere than in arithmetic: at every step the CPU reads all the weights from memory (50 MB
for a 12M model in fp32, more than its caches hold), and Python and PyTorch's dispatcher pay a
few microseconds for each of a few hundred small calls. `FastGPT` computes the same function
with less of both:

- fewer bytes: the weights are cast once to the chosen dtype. bf16 halves them; int8 (one
  scale per output row, bf16 activations) quarters them. On a CPU, int8 and bf16 matmuls,
  head included, run C kernels (kernels.int8_linear, kernels.bf16_linear) that read each
  weight once for all rows and block many rows (a prompt) as a matmul library does, up to
  the row count each measured faster than the path it replaces (`crossover`, cached); the
  token embedding reads the head's rows when the two are tied (one int8 or bf16 copy). fp32
  weights, and bf16 where bf16 is native, are packed once into oneDNN's blocked layout,
  where a one-row bf16 matmul runs about 2.6x faster than bf16 `F.linear`;
- fewer calls: q, k and v are one matmul, as are SwiGLU's gate and up projections; the MLP's
  activation and both residual adds run inside the matmuls (oneDNN post-ops, or the int8
  kernel, which also applies SwiGLU to its interleaved gate and up rows); positions, rotary
  cos/sin and the attention mask are computed once per step, not per layer; q and k are normed
  and rotated together;
- on a CPU with bf16 or int8 weights, the KV cache is bf16 (half the bytes of fp32, which at
  batch 8 are as many as the weights'), and everything in a decode step's attention after the
  qkv matmul (QK-norm, rotary, the cache write, attention) is one call of a C loop that reads
  bf16 and computes in fp32 (kernels.py): PyTorch's own attention is several times slower on
  bf16 than on fp32 there. RMSNorm is a C loop too. Without a C compiler the cache stays fp32
  and all of it runs as PyTorch ops.

In fp32 its logits equal `GPT.forward`'s up to float rounding (tests hold them to 1e-5, and the
engine's greedy tokens to the naive reference's). docs/inference.md measures what bf16 and int8
cost in validation loss (the fourth decimal on the demo run) and what they gain in speed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tinylm import kernels
from tinylm.errors import UserError
from tinylm.files import atomic_write_text
from tinylm.models.gpt import GPT, GPTConfig
from tinylm.models.layers import KVCache
from tinylm.perf import DTYPES

# Every GPTConfig field FastGPT computes as GPT does, with the values it implements ("any": all
# of them). A field missing here, such as a switch added to GPTConfig later, is refused until
# someone implements it here: the engine must never quietly run another function than GPT's.
SUPPORTED: dict[str, set | str] = {
    "vocab_size": "any", "block_size": "any", "depth": "any", "n_layer": "any",
    "n_head": "any", "d_model": "any", "mlp_ratio": "any", "rope_theta": "any",
    "rope_scaling": {"none", "linear", "llama3"},  # in the rotary table FastGPT copies
    "rope_factor": "any", "rope_low_freq_factor": "any", "rope_high_freq_factor": "any",
    "rope_original_max_len": "any",
    "n_kv_head": "any",  # grouped-query attention: n_kv_head heads in q/k/v, cache and kernel
    "norm_eps": "any",  # each norm's eps is read from the model's modules
    "qkv_bias": {True, False},
    "mlp": {"relu2", "swiglu", "gelu", "relu"},
    "norm": {"rms", "layer"},
    "pos": {"rope", "learned"},
    "qk_norm": {True, False},
    "bias": {True, False},
    "tie_embeddings": "any",  # the head's weight is copied, tied or not
    "logit_softcap": "any",
    "zero_init": "any",  # initialisation only
    "dropout": "any",  # inference has none, as GPT in eval mode
}


def check_supported(model: nn.Module) -> None:
    """A UserError unless `model` is a GPT whose every config value FastGPT implements."""
    if not isinstance(model, GPT):
        raise UserError(f"the engine runs GPT models only, not {type(model).__name__}")
    c = model.config
    for f in dataclasses.fields(c):
        value, allowed = getattr(c, f.name), SUPPORTED.get(f.name)
        if allowed is None:
            raise UserError(f"FastGPT does not implement {type(c).__name__}.{f.name}={value!r} "
                            "(a field it does not know); implement it in infer/fast.py")
        if allowed != "any" and value not in allowed:
            raise UserError(f"FastGPT does not implement {type(c).__name__}.{f.name}={value!r}; "
                            f"use one of {', '.join(repr(v) for v in sorted(allowed))}")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here (CUDA, or a CPU with AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(dtype: str | torch.dtype | None, model: nn.Module) -> torch.dtype:
    """None = the model's own dtype. 'auto' = the fastest of those that measured lossless
    (docs/inference.md): bf16 on a GPU; on a CPU the weights `auto_cpu_dtype` measured
    fastest here for this model's shapes (fp32, int8, or bf16 where it is native)."""
    device = next(model.parameters()).device
    if dtype is None:
        return next(model.parameters()).dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cpu":
            return torch.bfloat16 if native_bf16(device) else torch.float32
        return auto_cpu_dtype(model.config) if isinstance(model, GPT) else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto, fp32, bf16, fp16 or int8")
    if DTYPES[dtype] == torch.int8 and device.type != "cpu":
        raise UserError("int8 weights run on the CPU only; use bf16 on a GPU")
    return DTYPES[dtype]


AUTO_FILE = "auto-dtype.json"  # in kernels.cache_root(): {machine and shape key: measurement}
AUTO_BATCHES = (1, 8)  # the decode batches `auto` measures: one chat, and a busy server


def _auto_key(c: GPTConfig) -> str:
    return hashlib.sha256("|".join(map(str, (
        "race on 1 thread, blocked int8 and bf16 kernels, crossover to 256 rows, 5% margin",
        torch.__version__, kernels.cpu_id(), kernels.available() and kernels.build_id(),
        c.d_model, c.hidden, c.kv_heads * c.head_dim, c.mlp, c.n_layer,
        c.vocab_size))).encode()).hexdigest()[:16]


KERNEL_DTYPES = {torch.int8: "int8", torch.bfloat16: "bf16"}  # weights the C kernels take


def _plan(c: GPTConfig, race_dtypes: bool, kernel: torch.dtype | None) -> dict:
    """The cache entry for `c`'s shapes on this machine (see auto_plan), with the dtype race
    run if `race_dtypes` and not cached yet, and the crossover of the C kernel for `kernel`
    weights (int8 or bf16, or None) measured if not cached: an explicit int8 or bf16 run needs
    only its crossover, which takes a fraction of the race."""
    path = kernels.cache_root() / AUTO_FILE
    key = _auto_key(c)
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    plan = table.get(key)
    plan = dict(plan) if isinstance(plan, dict) else {}
    changed = False
    if race_dtypes and not (set(plan.get("by_batch", {}).values()) <= set(DTYPES)
                            and plan.get("by_batch")):
        seconds = race(c)
        plan.update(seconds=seconds, by_batch={
            str(b): min(seconds, key=lambda d: seconds[d][i]) for i, b in
            enumerate(AUTO_BATCHES)})
        changed = True
    field = f"{KERNEL_DTYPES[kernel]}_max_rows" if kernel is not None else None
    rows = plan.get(field) if field else {}
    if field and not (isinstance(rows, dict) and set(rows) == set(ROLES)
                      and all(isinstance(v, int) and v >= 0 for v in rows.values())):
        plan[field] = crossover(c, kernel)
        changed = True
    if changed:
        table[key] = plan
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(table, indent=2))
        except OSError:
            pass  # a read-only cache: measured again next time, never wrong
    return plan


def auto_plan(c: GPTConfig) -> dict:
    """What `race` and `crossover` measured for models of `c`'s shapes on this CPU, once per
    machine, torch version and shape (a few seconds), cached in $TINYLM_CACHE/auto-dtype.json:
    {"seconds": {dtype: [seconds at each of AUTO_BATCHES]}, "by_batch": {batch: fastest},
    "int8_max_rows": {role: the most rows the int8 C kernel takes for that matmul}}, and
    "bf16_max_rows" likewise once a bf16 engine was made."""
    return _plan(c, race_dtypes=True, kernel=torch.int8)


def kernel_max_rows(c: GPTConfig, dtype: torch.dtype) -> dict[str, int]:
    """For int8 or bf16 weights of `c`'s shapes on this CPU: per matmul role (ROLES), the most
    rows for which the C kernel beat the path it replaces (`crossover`; ALL_ROWS: every
    count), cached with `auto_plan`."""
    return _plan(c, race_dtypes=False, kernel=dtype)[f"{KERNEL_DTYPES[dtype]}_max_rows"]


def auto_cpu_dtype(c: GPTConfig) -> torch.dtype:
    """The weights to keep for `auto` on this CPU. Which is fastest is measured, not read off a
    CPU flag: int8 reads a quarter of fp32's bytes but must be widened before it is multiplied;
    bf16 reads half and is widened by a shift (the C kernel), or runs natively (AVX512-BF16,
    AMX: it beat int8 there on a 135M model, issue 13).

    The engine's batch changes under continuous batching, so `race` times each candidate at
    batch 1 and at batch 8. One copy of the weights is kept, so memory stays bounded: if int8
    is fastest at either batch it is int8, whose `Linear` then runs each batch on what is
    fastest for it (the int8 kernel up to the rows `crossover` measured, the wide path, bf16
    where native, above: at most int8 + bf16, 1.5 bytes per weight); otherwise the dtype that
    won at batch 1, a chat's, where a step's latency is felt the most."""
    by_batch = auto_plan(c)["by_batch"]
    names = [by_batch[str(b)] for b in AUTO_BATCHES]
    return DTYPES["int8" if "int8" in names else names[0]]


def race(c: GPTConfig, repeats: int = 3) -> dict[str, list[float]]:
    """Seconds (the best of `repeats`) for one decode step's matmuls of `c`'s shapes, head
    included, at each of AUTO_BATCHES rows, for each candidate dtype here: fp32, int8, and bf16
    where the C kernel is built or bf16 is native. Random weights of those shapes, enough
    layers to hold at least 64 MB in bf16 (out of the CPU's caches, as a real model's weights
    are), scaled to all n_layer layers; the candidates run in turns, so that a burst of load
    slows them alike.

    On one thread: with two on a loaded machine (seven processes on two cores, issue 13) a
    step took 4 s instead of 0.1, every OpenMP barrier waiting for a descheduled thread, and
    the scheduler, not the kernels, decided the race. One thread keeps the comparison of
    bytes read and instructions per weight; more threads share the bandwidth, which favours
    the dtype reading fewer bytes further still."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _race(c, repeats)
    finally:
        torch.set_num_threads(threads)


def _race(c: GPTConfig, repeats: int) -> dict[str, list[float]]:
    C, kv = c.d_model, c.kv_heads * c.head_dim
    up = 2 * c.hidden if c.mlp == "swiglu" else c.hidden
    shapes = [(C + 2 * kv, C), (C, C), (up, C), (C, c.hidden)]
    per_layer = sum(a * b for a, b in shapes)
    layers = max(1, min(c.n_layer, (32 << 20) // per_layer + 1))
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) * 0.02 for s in shapes * layers]
    head = torch.randn(c.vocab_size, C, generator=gen) * 0.02
    # bf16 on the C kernel where it can be built, and PyTorch's where bf16 is native (the two
    # timed apart, the faster kept: what FastGPT's measured crossover would pick per matmul)
    native = native_bf16(torch.device("cpu"))
    paths = {"fp32": ("fp32", None), "int8": ("int8", None)}
    if kernels.available():
        paths["bf16"] = ("bf16", ALL_ROWS)
    if native:
        paths["bf16 without the kernel" if kernels.available() else "bf16"] = ("bf16", 0)
    nets = {n: ([Linear(w, None, DTYPES[d], rows) for w in weights],
                Linear(head, None, DTYPES[d], rows)) for n, (d, rows) in paths.items()}
    best = {n: [float("inf")] * len(AUTO_BATCHES) for n in paths}
    for i, B in enumerate(AUTO_BATCHES):
        inputs = {k: torch.randn(B, k, generator=gen) for k in (C, c.hidden)}
        for _ in range(repeats):
            for n, (linears, head_linear) in nets.items():
                act = {k: x.to(torch.float32 if n == "fp32" else torch.bfloat16)
                       for k, x in inputs.items()}
                t = time.perf_counter()
                for lin, w in zip(linears, weights):
                    lin(act[w.shape[1]])
                layer_time = time.perf_counter() - t
                t = time.perf_counter()
                head_linear(act[C])
                total = layer_time * c.n_layer / layers + time.perf_counter() - t
                best[n][i] = min(best[n][i], total)
    if "bf16 without the kernel" in best:
        best["bf16"] = list(map(min, best["bf16"], best.pop("bf16 without the kernel")))
    return best


ROLES = ("qkv", "proj", "up", "down", "head")  # a model's matmuls, as FastGPT names them
CROSSOVER_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # row counts `crossover` times both at
CROSSOVER_MACS = 4 << 20  # multiply-adds per timing: calls are repeated up to this many
CROSSOVER_SECONDS = 0.05  # a pair of timings this long ends the measurement (see crossover)
ALL_ROWS = 1 << 30  # max_rows for a kernel that never lost: every row count
CROSSOVER_MARGIN = 0.05  # a kernel slower by less than this has not lost (see crossing)


def _role_shapes(c: GPTConfig) -> dict[str, tuple[tuple[int, int], bool]]:
    """Each role's (out, in) weight shape, and whether it is SwiGLU's fused [gate; up]."""
    C, kv = c.d_model, c.kv_heads * c.head_dim
    glu = c.mlp == "swiglu"
    return {"qkv": ((C + 2 * kv, C), False), "proj": ((C, C), False),
            "up": ((2 * c.hidden if glu else c.hidden, C), glu),
            "down": ((C, c.hidden), False), "head": ((c.vocab_size, C), False)}


def crossing(rows: tuple[int, ...], kernel: list[float], other: list[float]) -> int:
    """The most rows for which the C kernel is expected to beat the other path, from their
    seconds at each of `rows` (ascending): the last row count before the kernel first loses,
    moved towards the next one where the two lines (times are about linear in rows between
    neighbouring counts) cross; 0 if the kernel loses at rows[0], ALL_ROWS if it never loses
    (both are blocked matmuls, whose time per row is flat past a few dozen rows: the one ahead
    at the last count stays ahead). The kernel loses only by more than CROSSOVER_MARGIN:
    where both read memory as fast as it goes (one row by a large head) the two times are
    equal, and which is the lower is noise."""
    for i, (k, w) in enumerate(zip(kernel, other)):
        if _lost(k, w):
            if i == 0:
                return 0
            lead, loss = max(0.0, other[i - 1] - kernel[i - 1]), k - w  # loss > 0
            return int(rows[i - 1] + (rows[i] - rows[i - 1]) * lead / (lead + loss))
    return ALL_ROWS


def _lost(kernel: float, other: float) -> bool:
    return kernel > other * (1 + CROSSOVER_MARGIN)


def crossover(c: GPTConfig, dtype: torch.dtype = torch.int8, repeats: int = 3
              ) -> dict[str, int]:
    """Per role (ROLES), the most rows for which the C kernel for `dtype` weights (int8 or
    bf16) beats the path it replaces on this CPU: for int8 the wide path (a packed bf16 copy
    where bf16 is native, else the int8 weights widened to fp32 per call), for bf16 PyTorch's
    bf16 matmul (oneDNN's packed one where native). Timed at CROSSOVER_ROWS on random weights
    of `c`'s shapes, one thread as in `race`, the best of `repeats`, in turns.

    The kernels read each weight once per call and block their multiply-adds as a matmul
    library does, but do the arithmetic with AVX2 only; the other path may have native bf16
    or AMX, or pay a widening per call: which wins at which rows depends on the shape and the
    CPU, so it is measured. One role's weights at a time (freed after), each call repeated to
    CROSSOVER_MACS multiply-adds (4M, at most 64 calls) so that small shapes time above the
    clock's noise; a path timing over 20 ms is timed once; the counts past the first the
    kernel lost are not timed, nor those past a pair of timings of CROSSOVER_SECONDS (a large
    head's, or emulated bf16's: the times per row are flat by then). Without the C kernels
    there is nothing to choose: every role gets 0."""
    if not kernels.available():
        return dict.fromkeys(ROLES, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {role: _crossover(shape, glu, dtype, repeats)
                for role, (shape, glu) in _role_shapes(c).items()}
    finally:
        torch.set_num_threads(threads)


def _crossover(shape: tuple[int, int], glu: bool, dtype: torch.dtype, repeats: int) -> int:
    gen = torch.Generator().manual_seed(0)
    lin = Linear(torch.randn(shape, generator=gen) * 0.02, None, dtype, ALL_ROWS, glu=glu)
    act = "swiglu" if glu else "none"
    times: dict[int, list[float]] = {limit: [] for limit in (ALL_ROWS, 0)}
    for R in CROSSOVER_ROWS:
        x = torch.randn(R, shape[1], generator=gen).to(torch.bfloat16)
        best = dict.fromkeys(times, float("inf"))
        calls = max(1, min(64, CROSSOVER_MACS // (shape[0] * shape[1] * R)))
        for _ in range(repeats):
            for limit in times:  # in turns, so that a burst of load slows both alike
                lin.max_rows = limit  # the whole range on the kernel, or none of it
                t = time.perf_counter()
                for _ in range(calls):
                    lin(x, act)
                best[limit] = min(best[limit], time.perf_counter() - t)
            if max(best.values()) > 0.02:  # long enough to time once (a large head's)
                break
        for limit in times:
            times[limit].append(best[limit] / calls)
        if _lost(best[ALL_ROWS], best[0]) or sum(best.values()) > CROSSOVER_SECONDS:
            break  # the kernel lost (`crossing` reads no further), or the rest would take long
    kernel, other = times[ALL_ROWS], times[0]
    return crossing(CROSSOVER_ROWS[: len(kernel)], kernel, other)


# Packing into oneDNN's layout is used when it is there; PACK = False forces plain F.linear
# (the tests run both).
PACK = True


def _can_pack(w: torch.Tensor) -> bool:
    """Packing pays on a CPU for fp32 weights, and for bf16 where bf16 is native, from about
    128 x 128: below that oneDNN's ~13 us per call costs more than the matmul."""
    if not (PACK and w.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and w.numel() >= 128 * 128):
        return False
    return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and native_bf16(w.device))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": lambda y: F.gelu(y, approximate="tanh"),
}


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 (N, K) and fp32 scales (N,) with w ~ q * scale[:, None]: one scale per row, its
    absmax / 127 (so every row uses the whole int8 range)."""
    w = w.detach().float()
    scale = w.abs().amax(1).clamp(min=1e-12) / 127  # (N,)
    return (w / scale[:, None]).round().to(torch.int8).contiguous(), scale.contiguous()


class Linear:
    """y = x @ weight.T + bias [, activation] [+ residual], with the weight stored the way the
    matmul library runs it fastest.

    dtype int8 keeps the weight as int8 with one scale per output row (absmax / 127), and the
    activations in bf16. Up to `max_rows` rows (KERNEL_MAX_ROWS, or in FastGPT what
    `crossover` measured here for this matmul) run the C kernel (kernels.int8_linear),
    which reads each int8 weight once, widens it in registers and multiplies it into every
    row. More rows run the "wide" path: where bf16 is native, a packed bf16 copy kept beside
    the int8 one; elsewhere the int8 weights widened to fp32 for that one call and dropped
    (about a millisecond per layer, next to a prompt's tens), so that no second copy is kept.
    Without the C kernel, PyTorch's own int8 kernel takes the rows.

    dtype bf16 on a CPU with the C kernels runs up to `max_rows` rows on kernels.bf16_linear
    (each bf16 weight widened to fp32 in registers by a shift), more on the path it replaces
    (oneDNN's packed bf16 where bf16 is native, else PyTorch's bf16 matmul); a max_rows of 0
    (the kernel lost everywhere, `crossover`) keeps no copy for it."""

    KERNEL_MAX_ROWS = 16  # a Linear made alone; FastGPT's take what `crossover` measured

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 max_rows: int | None = None, glu: bool = False):
        """glu: weight is SwiGLU's [gate; up] (2 hidden, K), and act="swiglu" returns
        silu(gate) * up; the C kernels hold the two interleaved, row by row, and compute it
        in registers."""
        self.int8 = self.c_int8 = self.c_glu = self.c_glu_bias = self.c_bf16 = None
        self.k_pad = 0  # zero columns after c_int8's K (see below)
        self.max_rows = self.KERNEL_MAX_ROWS if max_rows is None else max_rows
        w = weight.detach()
        self.bias32 = None if bias is None else bias.detach().float().contiguous()
        c_kernels = w.device.type == "cpu" and kernels.available()
        if glu and c_kernels and dtype in (torch.int8, torch.bfloat16):
            b = self.bias32
            self.c_glu_bias = None if b is None else _interleave(b[:, None])[:, 0]
        if dtype == torch.int8:
            q, scale = quantize_rows(w)  # (N, K), (N,)
            w = q.float() * scale[:, None]
            dtype = torch.bfloat16
            if c_kernels:
                self.c_int8 = (q, scale)
                if glu:  # one int8 copy: the interleaved one
                    self.c_glu = (_interleave(q), _interleave(scale[:, None])[:, 0])
                    self.c_int8 = None
                elif q.shape[1] % 16:
                    # The kernel multiplies with AVX2 only when K % 16 == 0, else in a scalar
                    # loop that gains nothing from more rows (SwiGLU's down projection at
                    # hidden 680: 262 us at 8 rows, above the wide path's 100-170, so it took
                    # the wide path from 2 rows). Zero columns in the weight, and zeros
                    # appended to x per call, add nothing to any dot product.
                    self.k_pad = -q.shape[1] % 16
                    self.c_int8 = (F.pad(q, (0, self.k_pad)).contiguous(), scale)
            # PyTorch's int8 kernel reads wrong bytes (or crashes) unless in_features is a
            # multiple of 16 (measured on 2.13): other widths keep only the bf16 form.
            elif w.shape[1] % 16 == 0:
                self.int8 = (q, scale.to(torch.bfloat16))
        elif dtype == torch.bfloat16 and c_kernels and self.max_rows > 0:
            wb = w.to(torch.bfloat16)
            self.c_bf16 = (_interleave(wb) if glu else wb).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.weight, self.packed = None, False
        c_form = self.c_int8 is not None or self.c_glu is not None or self.c_bf16 is not None
        if not c_form or native_bf16(w.device):  # the wide path keeps its own copy
            w = w.to(dtype).contiguous()
            self.packed = _can_pack(w)
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w) if self.packed else w

    def __call__(self, x: torch.Tensor, act: str = "none",
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (rows, in_features). `act` and `residual` are never both given."""
        rows = x.shape[0]
        kernel = rows <= self.max_rows
        if act == "swiglu" and (self.c_glu is not None or self.c_bf16 is not None):
            if kernel and self.c_glu is not None:
                return kernels.int8_linear(x.contiguous(), *self.c_glu, self.c_glu_bias,
                                           glu=True)
            if kernel:
                return kernels.bf16_linear(x.contiguous(), self.c_bf16, self.c_glu_bias,
                                           glu=True)
            if self.weight is None:  # the wide path, from the interleaved rows
                if self.c_glu is not None:
                    y = _widened(x, *self.c_glu, self.c_glu_bias)
                else:
                    b = self.c_glu_bias
                    y = F.linear(x, self.c_bf16, None if b is None else b.to(x.dtype))
                return (F.silu(y[:, 0::2]) * y[:, 1::2]).to(x.dtype)
        if act == "swiglu":
            gate, up = self(x).chunk(2, dim=-1)
            return F.silu(gate) * up
        if self.c_bf16 is not None and kernel:
            y = kernels.bf16_linear(x.contiguous(), self.c_bf16, self.bias32, residual)
            return y if act == "none" else _ACTIVATIONS[act](y)
        if self.c_int8 is not None and (kernel or self.weight is None):
            if kernel:
                x = F.pad(x, (0, self.k_pad)) if self.k_pad else x.contiguous()
                y = kernels.int8_linear(x, *self.c_int8, self.bias32, residual)
                return y if act == "none" else _ACTIVATIONS[act](y)
            q, scale = self.c_int8  # the wide path without a kept copy: widened for this call
            q = q[:, : q.shape[1] - self.k_pad]
            y = _widened(x, q, scale, self.bias32).to(x.dtype)
            if act != "none":
                y = _ACTIVATIONS[act](y)
            return y if residual is None else y.add_(residual)
        return self._matmul(x, act, residual)

    def _matmul(self, x: torch.Tensor, act: str, residual: torch.Tensor | None) -> torch.Tensor:
        """PyTorch's and oneDNN's matmuls on the kept copy, in that copy's dtype: an fp32 x
        meeting int8's bf16 copy (kept where bf16 is native) is cast to it and back."""
        w = self.c_bf16 if self.weight is None else self.weight
        if x.dtype != w.dtype:
            res = None if residual is None else residual.to(w.dtype)
            return self._matmul(x.to(w.dtype), act, res).to(x.dtype)
        if self.int8 is not None and x.shape[0] <= 4:
            y = torch._weight_int8pack_mm(x, *self.int8)
            if self.bias is not None:
                y += self.bias
        elif not self.packed:  # also bf16 past the kernel's rows, on the kernel's copy
            y = F.linear(x, w, self.bias)
        elif residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight,
                                                             self.bias, "add")
        else:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, act, [],
                                                      "tanh" if act == "gelu" else "")
        if act != "none":
            y = _ACTIVATIONS[act](y)
        return y if residual is None else y.add_(residual)


def _interleave(w: torch.Tensor) -> torch.Tensor:
    """SwiGLU's [gate; up] rows (2 hidden, K) as gate 0, up 0, gate 1, up 1, ...: one tile of
    the C kernels computes both halves of an output column."""
    N, K = w.shape
    return w.view(2, N // 2, K).transpose(0, 1).reshape(N, K).contiguous()


def _widened(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """The wide path without a kept copy: x (rows, K) times int8 q (N, K) widened to fp32 for
    this call, each output column scaled after the matmul ((rows, N) multiplies) rather than
    each weight before it ((N, K), the larger pass for a prompt of fewer rows than K)."""
    y = F.linear(x.float(), q.float()).mul_(scale)  # (rows, N)
    return y if bias is None else y.add_(bias)


@dataclass
class _Layer:
    norm1: Callable
    qkv: Linear
    qk_norm: torch.Tensor | None  # (2, head_dim): q_norm's and k_norm's weights, stacked
    qk_heads: torch.Tensor | None  # (n_head + n_kv_head, head_dim): the same, one row per head
    qk_eps: float
    proj: Linear
    norm2: Callable
    up: Linear  # fc, or [gate; fc] for SwiGLU
    down: Linear
    mlp: str


class FastGPT:
    """A GPT's inference twin: `decode`, `hidden_states`, `logits` and `new_cache` as on
    `GPT`, over copies of its weights taken at construction (see `Engine`, which rebuilds it
    when the model's weights change). A config it does not implement is a UserError."""

    def __init__(self, model: GPT, dtype: torch.dtype | None = None):
        check_supported(model)
        c = self.config = model.config
        p = model.lm_head.weight
        self.device, self.weight_dtype = p.device, dtype or p.dtype
        # Every dtype and kernel is chosen here, once: the cache, the steps and the norms follow
        # these fields. Activations are bf16 for int8 weights, else in the weights' dtype.
        self.dtype = torch.bfloat16 if self.weight_dtype == torch.int8 else self.weight_dtype
        # On a CPU, q, k and v are computed in fp32 (PyTorch's bf16 attention is slow there).
        cpu = self.device.type == "cpu"
        self.attn_dtype = torch.float32 if cpu else self.dtype
        # The C loops (see module doc) run on a CPU where they could be built, on fp32 or bf16:
        # RMSNorm (PyTorch's is ~8 ops there), and, with bf16 activations, a decode step's
        # attention over a bf16 cache with keys in blocks. fp32 weights keep an fp32 cache, so
        # that their logits equal GPT's.
        fp32_or_bf16 = self.dtype in (torch.float32, torch.bfloat16)
        self.c_norms = cpu and fp32_or_bf16 and kernels.available()
        self.c_attention = self.c_norms and self.dtype == torch.bfloat16
        self.kv_dtype = torch.bfloat16 if self.c_attention else self.attn_dtype
        # int8 and bf16: each matmul's crossover between its C kernel and the other path,
        # measured here once per machine and shape (`crossover`); each call runs on the winner.
        self.max_rows = (kernel_max_rows(c, self.weight_dtype) if cpu and kernels.available()
                         and self.weight_dtype in KERNEL_DTYPES else {})
        self.head = self._linear(model.lm_head.weight, None, "head")
        # The token embedding takes the head's path: with int8 weights its rows are int8 too
        # (one scale per row), the head's own tensors when the two are tied, so a tied model
        # keeps one int8 copy of its largest matrix (49k x 576 in SmolLM2) and not a bf16 one.
        self.tok_emb = self.emb_int8 = None
        tied = model.tok_emb.weight is model.lm_head.weight
        if self.weight_dtype == torch.int8 and self.head.c_int8 is not None and tied:
            q, scale = self.emb_int8 = self.head.c_int8
            if self.head.k_pad:  # a view without the kernel's zero columns: still one copy
                self.emb_int8 = (q[:, : q.shape[1] - self.head.k_pad], scale)
        elif self.weight_dtype == torch.int8:
            self.emb_int8 = quantize_rows(model.tok_emb.weight)
        elif self.head.c_bf16 is not None and tied:  # the bf16 kernel's copy, shared too
            self.tok_emb = self.head.c_bf16
        else:
            self.tok_emb = model.tok_emb.weight.detach().to(self.dtype)
        self.pos_emb = None if model.pos_emb is None else model.pos_emb.weight.detach().to(
            self.dtype)
        self.rope = None
        rotary = model.blocks[0].attn.rotary
        if rotary is not None:
            # x rotated = x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1] is
            # x rolled by half a head with the first half's sign flipped: folded into sin.
            cos, sin = rotary.table(c.block_size, self.device)
            half = sin.shape[-1] // 2
            signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
            self.rope = cos.to(self.attn_dtype), signed_sin.to(self.attn_dtype)
        self.layers = [self._layer(b) for b in model.blocks]
        self.norm_f = self._norm(model.norm_f)

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None, role: str,
                glu: bool = False) -> Linear:
        return Linear(weight, bias, self.weight_dtype, self.max_rows.get(role), glu=glu)

    def _norm(self, m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The norm over rows (N, C) of the residual stream."""
        w = m.weight.detach().to(self.dtype)
        if isinstance(m, nn.LayerNorm):
            b = None if m.bias is None else m.bias.detach().to(self.dtype)
            return lambda x: F.layer_norm(x, m.normalized_shape, w, b, m.eps)
        eps = m.eps if m.eps is not None else torch.finfo(self.dtype).eps
        if self.c_norms:
            w32 = m.weight.detach().float().contiguous()
            return lambda x: kernels.rms_norm(x[:, None], w32, eps).view(x.shape)
        return lambda x: F.rms_norm(x, m.normalized_shape, w, eps)

    def _layer(self, block) -> _Layer:
        a, m = block.attn, block.mlp

        def cat(*mods, role, glu=False):
            w = torch.cat([x.weight for x in mods])
            b = None if mods[0].bias is None else torch.cat([x.bias for x in mods])
            return self._linear(w, b, role, glu=glu)

        qk_norm = qk_heads = None
        if a.q_norm is not None:
            qk_norm = torch.stack([a.q_norm.weight, a.k_norm.weight]).detach().to(
                self.attn_dtype)
            H, Hk, D = a.n_head, a.n_kv_head, a.head_dim
            qk_heads = torch.cat([qk_norm[0].expand(H, D), qk_norm[1].expand(Hk, D)])
        return _Layer(
            norm1=self._norm(block.norm1), qkv=cat(a.q, a.k, a.v, role="qkv"), qk_norm=qk_norm,
            qk_heads=qk_heads,
            qk_eps=a.q_norm.eps if a.q_norm is not None else 0.0,
            proj=self._linear(a.proj.weight, a.proj.bias, "proj"), norm2=self._norm(block.norm2),
            up=(cat(m.gate, m.fc, role="up", glu=True) if m.kind == "swiglu"
                else self._linear(m.fc.weight, m.fc.bias, "up")),
            down=self._linear(m.proj.weight, m.proj.bias, "down"), mlp=m.kind)

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        """A cache of `kv_dtype`; with keys in blocks when the C kernel's attention reads it."""
        c = self.config
        return KVCache(c.n_layer, batch, c.kv_heads, c.head_dim, max_len,
                       self.kv_dtype, self.device, pad,
                       key_block=kernels.KEY_BLOCK if self.c_attention else 0)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) for `idx` continuing what `cache` holds. The
        residual stream is kept as (B*T, C) rows, the shape the matmuls take."""
        c = self.config
        B, T = idx.shape
        H, Hk, D = c.n_head, c.kv_heads, c.head_dim
        positions = cache.positions(T, idx.device)  # (T,) or (B, T)
        # A fresh unpadded cache (a lone prompt's prefill) is plain causal attention: SDPA's
        # is_causal runs its flash kernel; an explicit mask sends it to the math path, which
        # on a 15-token prompt took 0.5 ms a layer, most of it checking for fully masked rows.
        causal = T > 1 and cache.pos == 0 and cache.pad is None
        mask = None if causal else cache.mask(T, idx.device)
        rotary = None
        if self.rope is not None:  # (B or 1, T, 1, D): broadcast over the q and k heads
            rotary = tuple(t[positions].view(-1, T, 1, D) for t in self.rope)
        # One decode step on the C kernel's cache: the kernel does all of attention after the
        # qkv matmul. It takes each row's first real position, and rotary rows (B or 1, D).
        kernel = self.c_attention and T == 1
        if kernel:
            start = cache.pad if cache.pad is not None else torch.zeros(B, dtype=torch.long)
            rope = None if rotary is None else tuple(t.view(-1, D) for t in rotary)
        x = self._embed(idx.reshape(-1))  # (B*T, C)
        if self.pos_emb is not None:
            x = x + F.embedding(positions.expand(B, T).reshape(-1), self.pos_emb)
        for i, L in enumerate(self.layers):
            qkv = L.qkv(L.norm1(x))  # (B*T, (H + 2 Hk) D): q heads, then k, then v
            if kernel:
                y = kernels.decode_attention(qkv, cache, i, start, L.qk_norm, L.qk_eps, rope,
                                             H)
            else:
                y = self._attention(qkv.view(B, T, H + 2 * Hk, D), L, cache, i, rotary, mask,
                                    causal)
            x = L.proj(y, residual=x)
            x = self._mlp(L, x)
        cache.advance(T)
        return self.norm_f(x).view(B, T, c.d_model)

    def answer_states(self, ids: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor
                      ) -> torch.Tensor:
        """Hidden states (N, 1 + R, C) of rows ids (N, L) that are a prompt (the first
        start[n] >= 1 tokens) and an answer (the next lengths[n]): [n, 0] at the prompt's last
        token, [n, 1 + j] at answer token j (R = the longest answer). So [n, j] is the state
        that predicts answer token j, and [n, lengths[n]] the one at the answer's last token.

        Each distinct prompt is computed once (left-padded, into a cache), which its rows
        then share: the K answers to a prompt continue one copy of it, as the engine samples
        them. The same numbers as the full rows, on a third fewer positions for a rollout of
        4 answers per prompt."""
        rows, st = ids.tolist(), start.tolist()
        groups: dict[tuple[int, ...], int] = {}
        index = [groups.setdefault(tuple(r[:s]), len(groups)) for r, s in zip(rows, st)]
        prompts = list(groups)
        Lp, R = max(map(len, prompts)), max(int(lengths.max()), 1)
        pad = torch.tensor([Lp - len(p) for p in prompts], device=ids.device)
        p_ids = torch.tensor([[0] * (Lp - len(p)) + list(p) for p in prompts],
                             device=ids.device)  # (P, Lp)
        cache = self.new_cache(len(prompts), Lp + R, pad if bool(pad.any()) else None)
        last = self.hidden_states(p_ids, cache)[:, -1]  # (P, C)
        g = torch.tensor(index, device=ids.device)  # (N,) each row's prompt
        cache.select(g)
        j = (start[:, None] + torch.arange(R, device=ids.device)).clamp(max=ids.shape[1] - 1)
        answers = self.hidden_states(ids.gather(1, j), cache)  # (N, R, C)
        return torch.cat((last[g, None], answers), 1)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (N, C) in the activations' dtype for token ids (N,)."""
        if self.emb_int8 is None:
            return F.embedding(ids, self.tok_emb)
        q, scale = self.emb_int8
        return (F.embedding(ids, q).float() * scale[ids, None]).to(self.dtype)

    def _attention(self, qkv: torch.Tensor, L: _Layer, cache: KVCache, layer: int,
                   rotary: tuple[torch.Tensor, torch.Tensor] | None,
                   mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
        """Attention with PyTorch's ops, from qkv (B, T, H + 2 Hk, D) (query heads, then key
        heads, then value heads) to rows (B*T, H*D): prompts, and every step where the C kernel
        does not run."""
        B, T, _, D = qkv.shape
        H, Hk = self.config.n_head, self.config.kv_heads
        qkv = qkv.to(self.attn_dtype)
        qk, v = qkv[:, :, : H + Hk], qkv[:, :, H + Hk :]  # q and k heads are normed together
        if L.qk_norm is not None and self.c_norms:  # q and k heads read in place
            qk = kernels.rms_norm(qk.view(B * T, H + Hk, D), None, L.qk_eps)
            qk = qk.view(B, T, H + Hk, D) * L.qk_heads  # (H + Hk, D): each head's weight
        elif L.qk_norm is not None:
            qk = F.rms_norm(qk, (D,), None, L.qk_eps) * L.qk_heads
        if rotary is not None:
            cos, sin = rotary
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (B, H or Hk, T, D)
        k, v = cache.append(layer, k, v.transpose(1, 2))
        # The kernel's cache is bf16: a prompt widens it once for PyTorch's attention.
        k, v = k.to(self.attn_dtype), v.to(self.attn_dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=Hk < H)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B * T, H * D).to(self.dtype)

    @staticmethod
    def _mlp(L: _Layer, x: torch.Tensor) -> torch.Tensor:
        """x + MLP(norm2(x)), rows (N, C)."""
        h = L.norm2(x)
        if L.mlp == "swiglu":
            h = L.up(h, act="swiglu")
        elif L.mlp == "relu2":
            h = L.up(h, act="relu").square()
        else:
            h = L.up(h, act=L.mlp)
        return L.down(h, residual=x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1).float()
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def decode(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, T, V) for `idx` continuing what `cache` already holds; fills the cache."""
        return self.logits(self.hidden_states(idx, cache))
