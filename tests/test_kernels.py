"""The C kernels (decode attention, RMSNorm, matmuls by int8 and bf16 weights) compute what
PyTorch does, and generation falls back to PyTorch when they cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinylm import kernels
from tinylm.infer.engine import Engine, SamplingParams
from tinylm.infer.fast import FastGPT
from tinylm.models.gpt import GPT, GPTConfig, gpt2_style
from tinylm.models.layers import KVCache

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C compiler here")
GPT2_SMALL = dict(vocab_size=50, block_size=64, n_layer=2, n_head=2, d_model=128,
                  zero_init=False)
SMALL = GPTConfig(**GPT2_SMALL, mlp="swiglu", qk_norm=True)


@pytest.fixture(params=["missing", "failing"])
def no_compiler(request, monkeypatch, tmp_path):
    """A fresh kernel cache, and a compiler that does not exist or that fails."""
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc") if request.param == "missing"
                       else "false")
    kernels._library.cache_clear()
    yield
    kernels._library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("qk_norm,rope,shared_rope", [(True, True, False), (False, False, False),
                                                      (False, True, True)])
@pytest.mark.parametrize("pos,D", [(0, 64), (36, 64), (17, 32), (40, 128), (299, 80), (4, 8)])
@pytest.mark.parametrize("Hk", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_decode_attention_kernel_equals_pytorch(qk_norm, rope, shared_rope, pos, D, Hk):
    """QK-norm, rotary embedding, the cache write at `pos` and attention over each row's
    positions start..pos, against the same steps in PyTorch (fp32 over the bf16 cache), with
    4 query heads over 4, 2 or 1 key/value heads (grouped-query attention: the cache holds Hk
    heads, each shared by H / Hk query heads)."""
    torch.manual_seed(0)
    B, H = 3, 4
    qkv = torch.randn(B, H + 2 * Hk, D).bfloat16()
    qk_w = torch.rand(2, D) + 0.5 if qk_norm else None
    rows = 1 if shared_rope else B
    cos_sin = (torch.randn(rows, D), torch.randn(rows, D)) if rope else None
    cache = KVCache(1, B, Hk, D, 400, torch.bfloat16, key_block=kernels.KEY_BLOCK)
    old_keys, old_values = cache.append(0, *(torch.randn(B, Hk, pos, D) for _ in "kv"))
    cache.advance(pos)
    start = torch.tensor([0, pos // 2, pos])

    q, k, v = qkv[:, :H].float(), qkv[:, H : H + Hk].float(), qkv[:, H + Hk :]  # (B, heads, D)
    if qk_norm:
        q, k = F.rms_norm(q, (D,), qk_w[0], 1e-6), F.rms_norm(k, (D,), qk_w[1], 1e-6)
    if rope:
        cos, sin = (t[:, None] for t in cos_sin)
        q, k = (x * cos + x.roll(D // 2, dims=-1) * sin for x in (q, k))
    keys = torch.cat([old_keys.float(), k.bfloat16().float()[:, :, None]], 2)
    values = torch.cat([old_values.float(), v[:, :, None].float()], 2)
    keys, values = (x.repeat_interleave(H // Hk, 1) for x in (keys, values))  # (B, H, S, D)
    allowed = (torch.arange(pos + 1) >= start[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=allowed)

    got = kernels.decode_attention(qkv.view(B, -1), cache, 0, start, qk_w, 1e-6, cos_sin, H)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.reshape(B, H * D), atol=2e-2, rtol=2e-2)
    new_keys = cache.keys(0, pos + 1)
    assert torch.equal(new_keys[:, :, :pos], old_keys)
    torch.testing.assert_close(new_keys[:, :, pos].float(), k, atol=2e-2, rtol=2e-2)
    assert cache.k.shape[2] == cache.v.shape[2] == Hk
    assert torch.equal(cache.v[0, :, :, pos], v)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_rms_norm_equals_pytorchs_on_rows_and_on_q_and_k_inside_a_fused_qkv(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(5, 96).to(dtype) * 0.05, torch.rand(96) + 0.5
    want = F.rms_norm(x.float(), (96,), w, 1e-6)
    got = kernels.rms_norm(x[:, None], w, 1e-6).view(5, 96)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    qkv = torch.randn(2, 3, 3, 4, 16).to(dtype)  # (B, T, q/k/v, H, D); q and k are 8 of 12 rows
    qk = qkv[:, :, :2]
    got = kernels.rms_norm(qk.view(6, 8, 16), None, 1e-6).view(qk.shape)
    torch.testing.assert_close(got.float(), F.rms_norm(qk.float(), (16,), None, 1e-6),
                               atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("rows,threads", [(5, 2), (300, 1), (300, 2)])
def test_c_rms_norm_backward_equals_autograds(dtype, weighted, rows, threads, monkeypatch):
    """dx and the weight's gradient, summed over rows in per-thread partial sums when the
    rows are many enough to split between threads."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(0)
    x, g = torch.randn(rows, 80).to(dtype), torch.randn(rows, 80).to(dtype)
    w = torch.rand(80) + 0.5 if weighted else None
    xf = x.float().requires_grad_()
    wf = w.clone().requires_grad_() if weighted else None
    want = torch.autograd.grad(F.rms_norm(xf, (80,), wf, 1e-6), [xf] + [wf] * weighted,
                               g.float())
    dx, dw = kernels.rms_norm_backward(x, g, w, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert dx.dtype == dtype
    torch.testing.assert_close(dx.float(), want[0], atol=tol, rtol=tol)
    if weighted:
        torch.testing.assert_close(dw, want[1], atol=1e-3, rtol=1e-4)
    else:
        assert dw is None


@needs_kernel
@pytest.mark.parametrize("config", [SMALL, gpt2_style(**GPT2_SMALL),
                                    GPTConfig(**GPT2_SMALL | {"n_head": 4}, mlp="swiglu",
                                              n_kv_head=2, qk_norm=True)],
                         ids=["qwen3-like", "gpt2", "gqa"])
def test_int8_decode_on_the_bf16_cache_matches_the_fp32_cache(monkeypatch, config):
    """The kernel's only difference from PyTorch's path is keys and values rounded to bf16."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    ids, nxt, pad = torch.randint(0, 50, (3, 10)), torch.randint(0, 50, (3, 1)), torch.tensor(
        [0, 3, 5])

    def decode_step(net):
        cache = net.new_cache(3, 20, pad=pad)
        net.decode(ids, cache)
        return cache.k.dtype, net.decode(nxt, cache)

    kv_dtype, got = decode_step(FastGPT(model, torch.int8))
    plain = FastGPT(model, torch.int8)  # the same matmuls, PyTorch's attention on fp32
    plain.c_attention, plain.kv_dtype = False, torch.float32
    fp32_kv, want = decode_step(plain)
    assert (kv_dtype, fp32_kv) == (torch.bfloat16, torch.float32)
    assert (got - want).abs().max() < 0.01 * want.abs().max()


def test_without_a_compiler_generation_keeps_pytorchs_attention(no_compiler):
    assert not kernels.available()
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    assert FastGPT(model, torch.int8).kv_dtype == torch.float32
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    out = Engine(model, dtype="int8").generate([[1, 2, 3], [4]], params)
    assert [len(c.token_ids) for c in out] == [5, 5]


def test_tinylm_kernels_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("TINYLM_KERNELS", "0")
    assert not kernels.available()
    assert FastGPT(GPT(SMALL), torch.int8).kv_dtype == torch.float32


def test_a_blocked_key_cache_holds_the_same_keys_through_append_and_select():
    plain, blocked = (KVCache(2, 3, 4, 8, 40, torch.bfloat16, key_block=b) for b in (0, 16))
    assert blocked.k.shape == (2, 3, 4, 3, 8, 16)  # 40 positions in 3 blocks of 16
    end = 0
    for T in (5, 1, 20, 1, 13):  # prefills and steps that cross block boundaries
        k, v = torch.randn(3, 4, T, 8), torch.randn(3, 4, T, 8)
        for layer in (0, 1):
            for a, b in zip(plain.append(layer, k, v), blocked.append(layer, k, v)):
                assert torch.equal(a, b)
        plain.advance(T), blocked.advance(T)
        end += T
    rows = torch.tensor([2, 0])
    plain.select(rows), blocked.select(rows)
    for layer in (0, 1):
        assert torch.equal(plain.keys(layer, end), blocked.keys(layer, end))
    assert torch.equal(plain.v, blocked.v)


@needs_kernel
@pytest.mark.parametrize("K", [24, 64, 4096], ids=["scalar-loop", "int16-rows", "wide-k"])
@pytest.mark.parametrize("rows", [1, 3, 9, 37])
def test_int8_linear_kernel_equals_the_dequantized_matmul(K, rows):
    """Any width (24: the plain loop; multiples of 16: activations rounded to int16, whose
    step shrinks for large K so that int32 sums cannot overflow), any row count, an odd
    number of output rows, bias and residual, SwiGLU's interleaved pairs, bf16 and fp32."""
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (37, K), dtype=torch.int8)
    scale, bias = torch.rand(37) / 100, torch.randn(37)
    x = torch.randn(rows, K) * 4
    x[0, 0] = 100.0  # an outlier sets its row's int16 step
    want = x @ (q.float() * scale[:, None]).T + bias
    for dtype in (torch.float32, torch.bfloat16):
        res = torch.randn(rows, 37).to(dtype)
        got = kernels.int8_linear(x.to(dtype), q, scale, bias, res)
        assert got.dtype == dtype and got.shape == (rows, 37)
        ref = x.to(dtype).float() @ (q.float() * scale[:, None]).T + bias  # (rows, 37)
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), ref + res.float(),
                                   atol=tol * want.abs().max().item(), rtol=tol)
        glu = kernels.int8_linear(x.to(dtype), q[:36], scale[:36], bias[:36], glu=True)
        gate, up = ref[:, 0:36:2], ref[:, 1:36:2]  # rows 2i and 2i + 1: gate and up of i
        torch.testing.assert_close(glu.float(), F.silu(gate) * up,
                                   atol=tol * (want.abs().max().item() ** 2), rtol=tol)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_int8_kernel_is_bit_identical_to_the_unblocked_loop_order(threads, monkeypatch):
    """The blocked loop nest (panels of weight rows, each met by every group of rows of x)
    against the order before blocking (`panel=2`: all of x past each pair of weight rows):
    integer sums do not depend on the order they are added in, and the epilogues are the same,
    so every output is the same bit for bit, on 1 or 2 threads, whatever the panels' size and
    however the rows, the output rows and the threads' ranges end."""
    torch.manual_seed(0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    for K, N, rows, dtype in [(48, 37, 1, torch.bfloat16), (48, 38, 5, torch.float32),
                              (160, 37, 13, torch.bfloat16), (64, 64, 37, torch.float32),
                              (40, 37, 7, torch.bfloat16)]:  # K = 40: the plain fp32 loop
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        scale, bias = torch.rand(N) / 100, torch.randn(N)
        x, res = (torch.randn(rows, K) * 3).to(dtype), torch.randn(rows, N).to(dtype)
        for extra in ({"bias": bias, "residual": res}, {"bias": bias[: N // 2 * 2],
                                                        "glu": True}):
            w, s = (q, scale) if "residual" in extra else (q[: N // 2 * 2], scale[: N // 2 * 2])
            old = kernels.int8_linear(x, w, s, **extra, panel=2)
            for panel in (0, 6, 10):  # what fits in L2 (one panel here), or several and a tail
                assert torch.equal(kernels.int8_linear(x, w, s, **extra, panel=panel), old)


@needs_kernel
@pytest.mark.parametrize("K", [8, 40, 64, 93], ids=["short", "k40", "k64", "k93"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 37])
def test_bf16_linear_kernel_equals_pytorch(K, rows):
    """bf16 weights times fp32 or bf16 rows, computed in fp32: the matmul of the same values
    in PyTorch, for widths that are and are not multiples of 16 (the tail after the last 16 is
    a scalar loop), an odd number of output rows, every row count of a tile and a few tiles,
    with bias and residual, or SwiGLU on interleaved gate and up rows."""
    torch.manual_seed(0)
    w, bias = torch.randn(37, K).bfloat16(), torch.randn(37)
    for dtype in (torch.float32, torch.bfloat16):
        x, res = torch.randn(rows, K).to(dtype), torch.randn(rows, 37).to(dtype)
        ref = x.float() @ w.float().T + bias  # (rows, 37)
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output
        scale = ref.abs().max().item()
        got = kernels.bf16_linear(x, w, bias, res)
        assert got.dtype == dtype and got.shape == (rows, 37)
        torch.testing.assert_close(got.float(), ref + res.float(), atol=tol * scale, rtol=tol)
        plain = kernels.bf16_linear(x, w)
        torch.testing.assert_close(plain.float(), ref - bias, atol=tol * scale, rtol=tol)
        glu = kernels.bf16_linear(x, w[:36], bias[:36], glu=True)
        gate, up = ref[:, 0:36:2], ref[:, 1:36:2]
        torch.testing.assert_close(glu.float(), F.silu(gate) * up, atol=tol * scale ** 2,
                                   rtol=tol)
