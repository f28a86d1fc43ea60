"""The fast path of generation: a GPT's forward pass as one flat function over weights
prepared for inference.

`GPT.forward` is written to be read and trained: a module per idea, q, k and v as three
matmuls, positions recomputed in every layer. Decoding one token per row spends its time
elsewhere than in arithmetic: at every step the CPU reads all the weights from memory (50 MB
for a 12M model in fp32, more than its caches hold), and Python and PyTorch's dispatcher pay a
few microseconds for each of a few hundred small calls. `FastGPT` computes the same function
with less of both:

- fewer bytes: the weights are cast once to the chosen dtype. bf16 halves them; int8 (one
  scale per output row, bf16 activations) quarters them. On a CPU they are packed once into
  oneDNN's blocked layout, where a one-row bf16 matmul runs about 2.6x faster than bf16
  `F.linear` on the same weights;
- fewer calls: q, k and v are one matmul, as are SwiGLU's gate and up projections; the MLP's
  activation and both residual adds run inside the matmuls (oneDNN post-ops); positions, rotary
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

from tinylm.errors import UserError
from tinylm.files import atomic_write_text
from tinylm.infer import kernels
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
    (docs/inference.md): on a CPU with native bf16, int8 or bf16 weights, whichever ran a
    decode step's matmuls of this model's shapes faster here (measured once per machine and
    shape, `auto_cpu_dtype`); bf16 on a GPU; else fp32."""
    device = next(model.parameters()).device
    if dtype is None:
        return next(model.parameters()).dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if not native_bf16(device):
            return torch.float32
        if device.type != "cpu":
            return torch.bfloat16
        return auto_cpu_dtype(model.config) if isinstance(model, GPT) else torch.int8
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto, fp32, bf16, fp16 or int8")
    if DTYPES[dtype] == torch.int8 and device.type != "cpu":
        raise UserError("int8 weights run on the CPU only; use bf16 on a GPU")
    return DTYPES[dtype]


AUTO_FILE = "auto-dtype.json"  # in kernels.cache_root(): {machine and shape key: "int8" | "bf16"}


def auto_cpu_dtype(c: GPTConfig) -> torch.dtype:
    """int8 or bf16, whichever `race_int8_bf16` finds faster for models of `c`'s shapes on
    this CPU; measured once (about a second) and cached per machine, torch version and shape.
    Which wins is not a CPU flag: int8 reads half the bytes, but PyTorch's int8 kernel
    computes slower than oneDNN's bf16 one, which on a CPU with AMX is fast enough that bf16
    won on a 135M model (issue 13) while int8 won on 12M models elsewhere."""
    path = kernels.cache_root() / AUTO_FILE
    key = hashlib.sha256("|".join(map(str, (
        torch.__version__, kernels.cpu_id(), c.d_model, c.hidden, c.kv_heads * c.head_dim,
        c.mlp, c.n_layer, c.vocab_size))).encode()).hexdigest()[:16]
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    if table.get(key) not in ("int8", "bf16"):
        table[key] = race_int8_bf16(c)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(table, indent=2))
        except OSError:
            pass  # a read-only cache: measured again next time, never wrong
    return torch.int8 if table[key] == "int8" else torch.bfloat16


def race_int8_bf16(c: GPTConfig, repeats: int = 5) -> str:
    """'int8' or 'bf16': which weights run one row through the matmuls of `c`'s decode step
    faster (random weights of its shapes; the best of `repeats` passes). Enough layers to
    hold at least 64 MB in bf16, as a real model's weights are, out of the CPU's caches."""
    C, kv = c.d_model, c.kv_heads * c.head_dim
    up = 2 * c.hidden if c.mlp == "swiglu" else c.hidden
    shapes = [(C + 2 * kv, C), (C, C), (up, C), (C, c.hidden)]
    per_layer = sum(a * b for a, b in shapes)
    layers = max(1, min(c.n_layer, (32 << 20) // per_layer + 1))
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) * 0.02 for s in shapes * layers]
    weights.append(torch.randn(c.vocab_size, C, generator=gen) * 0.02)  # the head
    inputs = {n: torch.randn(1, n, generator=gen).bfloat16() for n in (C, c.hidden)}
    best = {}
    for name, dtype in (("bf16", torch.bfloat16), ("int8", torch.int8)):
        linears = [Linear(w, None, dtype) for w in weights]
        best[name] = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for lin, w in zip(linears, weights):
                lin(inputs[w.shape[1]])
            best[name] = min(best[name], time.perf_counter() - t)
    return min(best, key=best.get)


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


class Linear:
    """y = x @ weight.T + bias [, activation] [+ residual], with the weight stored the way the
    matmul library runs it fastest.

    dtype int8 keeps the weight as int8 with one scale per output row (absmax / 127), and the
    activations in bf16. PyTorch's int8 kernel reads a quarter of fp32's bytes, but does not
    reuse them across rows: from about 5 rows (a batch, a prompt) the same int8 weights,
    widened once to bf16, run faster."""

    INT8_MAX_ROWS = 4

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.int8 = None
        w = weight.detach()
        # PyTorch's int8 kernel reads wrong bytes (or crashes) unless in_features is a
        # multiple of 16 (measured on 2.13): other widths keep only the bf16 form.
        if dtype == torch.int8 and w.shape[1] % 16 == 0:
            scale = w.float().abs().amax(1).clamp(min=1e-12) / 127  # (N,)
            q = (w.float() / scale[:, None]).round().to(torch.int8).contiguous()
            self.int8 = (q, scale.to(torch.bfloat16))
            w = q.float() * scale[:, None]
        if dtype == torch.int8:
            dtype = torch.bfloat16
        w = w.to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.packed = _can_pack(w)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w) if self.packed else w

    def __call__(self, x: torch.Tensor, act: str = "none",
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (rows, in_features). `act` and `residual` are never both given."""
        if self.int8 is not None and x.shape[0] <= self.INT8_MAX_ROWS:
            y = torch._weight_int8pack_mm(x, *self.int8)
            if self.bias is not None:
                y += self.bias
        elif not self.packed:
            y = F.linear(x, self.weight, self.bias)
        elif residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight,
                                                             self.bias, "add")
        else:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, act, [],
                                                      "tanh" if act == "gelu" else "")
        if act != "none":
            y = _ACTIVATIONS[act](y)
        return y if residual is None else y.add_(residual)


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
        self.head = self._linear(model.lm_head.weight, None)

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        return Linear(weight, bias, self.weight_dtype)

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

        def cat(*mods):
            w = torch.cat([x.weight for x in mods])
            b = None if mods[0].bias is None else torch.cat([x.bias for x in mods])
            return self._linear(w, b)

        qk_norm = qk_heads = None
        if a.q_norm is not None:
            qk_norm = torch.stack([a.q_norm.weight, a.k_norm.weight]).detach().to(
                self.attn_dtype)
            H, Hk, D = a.n_head, a.n_kv_head, a.head_dim
            qk_heads = torch.cat([qk_norm[0].expand(H, D), qk_norm[1].expand(Hk, D)])
        return _Layer(
            norm1=self._norm(block.norm1), qkv=cat(a.q, a.k, a.v), qk_norm=qk_norm,
            qk_heads=qk_heads,
            qk_eps=a.q_norm.eps if a.q_norm is not None else 0.0,
            proj=self._linear(a.proj.weight, a.proj.bias), norm2=self._norm(block.norm2),
            up=cat(m.gate, m.fc) if m.kind == "swiglu" else self._linear(m.fc.weight, m.fc.bias),
            down=self._linear(m.proj.weight, m.proj.bias), mlp=m.kind)

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
        mask = cache.mask(T, idx.device)
        rotary = None
        if self.rope is not None:  # (B or 1, T, 1, D): broadcast over the q and k heads
            rotary = tuple(t[positions].view(-1, T, 1, D) for t in self.rope)
        # One decode step on the C kernel's cache: the kernel does all of attention after the
        # qkv matmul. It takes each row's first real position, and rotary rows (B or 1, D).
        kernel = self.c_attention and T == 1
        if kernel:
            start = cache.pad if cache.pad is not None else torch.zeros(B, dtype=torch.long)
            rope = None if rotary is None else tuple(t.view(-1, D) for t in rotary)
        x = F.embedding(idx.reshape(-1), self.tok_emb)  # (B*T, C)
        if self.pos_emb is not None:
            x = x + F.embedding(positions.expand(B, T).reshape(-1), self.pos_emb)
        for i, L in enumerate(self.layers):
            qkv = L.qkv(L.norm1(x))  # (B*T, (H + 2 Hk) D): q heads, then k, then v
            if kernel:
                y = kernels.decode_attention(qkv, cache, i, start, L.qk_norm, L.qk_eps, rope,
                                             H)
            else:
                y = self._attention(qkv.view(B, T, H + 2 * Hk, D), L, cache, i, rotary, mask)
            x = L.proj(y, residual=x)
            x = self._mlp(L, x)
        cache.advance(T)
        return self.norm_f(x).view(B, T, c.d_model)

    def _attention(self, qkv: torch.Tensor, L: _Layer, cache: KVCache, layer: int,
                   rotary: tuple[torch.Tensor, torch.Tensor] | None,
                   mask: torch.Tensor | None) -> torch.Tensor:
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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           enable_gqa=Hk < H)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B * T, H * D).to(self.dtype)

    @staticmethod
    def _mlp(L: _Layer, x: torch.Tensor) -> torch.Tensor:
        """x + MLP(norm2(x)), rows (N, C)."""
        h = L.norm2(x)
        if L.mlp == "swiglu":
            gate, up = L.up(h).chunk(2, dim=-1)
            h = F.silu(gate) * up
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
