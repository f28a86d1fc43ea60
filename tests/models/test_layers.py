"""Shared layers: RMSNorm on a CPU (the C kernels' forward and backward) equals PyTorch's, and
falls back to PyTorch's without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinylm import kernels
from tinylm.models import layers
from tinylm.models.layers import RMSNorm


def norm_and_grads(norm, x, g):
    y = norm(x)
    return (y, *torch.autograd.grad(y, (x, norm.weight), g)), y.grad_fn.name()


@pytest.mark.skipif(not kernels.available(), reason="no C compiler here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_on_the_c_kernels_equals_pytorchs(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    base = torch.randn(3, 16, 5, dtype=dtype)  # normed through a transposed view, as QK-norm
    x = base.transpose(1, 2).requires_grad_()  # (3, 5, 16), not contiguous
    g = torch.randn(3, 5, 16, dtype=dtype)
    (y, gx, gw), path = norm_and_grads(norm, x, g)
    assert path.startswith("_RMSNormC")
    x2 = x.detach().float().requires_grad_()
    w2 = norm.weight.detach().clone().requires_grad_()
    y2 = F.rms_norm(x2, (16,), w2, 1e-6)  # autograd's own backward, in fp32
    gx2, gw2 = torch.autograd.grad(y2, (x2, w2), g.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert y.dtype == gx.dtype == dtype and gw.dtype == torch.float32
    assert y.shape == gx.shape == x.shape
    assert torch.allclose(y.float(), y2, atol=tol, rtol=tol)
    assert torch.allclose(gx.float(), gx2, atol=tol, rtol=tol)
    assert torch.allclose(gw, gw2, atol=tol * 4, rtol=tol)


def test_rmsnorm_without_the_kernels_is_pytorchs(monkeypatch):
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 16, requires_grad=True)
    g = torch.randn(4, 16)
    monkeypatch.setenv("TINYLM_KERNELS", "0")
    (y, gx, gw), path = norm_and_grads(norm, x, g)
    assert not path.startswith("_RMSNormC")
    want = F.rms_norm(x, (16,), norm.weight, 1e-6)
    assert torch.equal(y, want)
    assert torch.allclose(gx, torch.autograd.grad(want, x, g, retain_graph=True)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_on_attention_by_hand_equals_it_on_sdpa(dtype, monkeypatch):
    """Where by_hand_table sends causal rows by hand, the logits and every gradient are
    SDPA's (plain causal rows, and packed rows with their block mask)."""
    from tinylm.models.gpt import GPT, GPTConfig
    from tinylm.models.layers import Packed

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, d_model=64,
                          mlp="swiglu", qk_norm=True, zero_init=False)).to(dtype)
    ids = torch.randint(0, 40, (3, 12))
    packed = Packed.pack([[1, 2, 3, 4, 5], [1, 2, 3, 6], [7, 8]], [[0, 1], [2]], 8, 0)

    def run(by_hand):
        monkeypatch.setattr(layers, "by_hand_faster", lambda dt, S: by_hand)
        model.zero_grad()
        h = model.hidden_states(ids)
        plain = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 6, 0], [7, 8, 0, 0, 0]])
        hp = model.hidden_states(plain, packed=packed)
        (h.float().square().mean() + hp.float().square().mean()).backward()
        return [h, hp] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_by_hand_is_measured_once_per_machine_and_read_by_length(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path))
    races = []

    def race(dtype):  # by hand wins below 192 and at 320
        races.append(dtype)
        return {str(n): n < 192 or n == 320 for n in layers.BY_HAND_LENGTHS}

    monkeypatch.setattr(layers, "_by_hand_race", race)
    layers.by_hand_table.cache_clear()
    try:
        assert layers.by_hand_faster(torch.bfloat16, 176)  # the verdict at 160
        layers.by_hand_table.cache_clear()  # another process on the machine: reads the file
        assert not layers.by_hand_faster(torch.bfloat16, 235)  # 224's
        assert layers.by_hand_faster(torch.bfloat16, 10)  # below the first length: 64's
        assert layers.by_hand_faster(torch.bfloat16, 383)  # 320's
        assert not layers.by_hand_faster(torch.bfloat16, 4096)  # past the last: SDPA
        assert races == [torch.bfloat16] and (tmp_path / "perf.json").is_file()
    finally:
        layers.by_hand_table.cache_clear()
