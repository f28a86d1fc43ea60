"""Shared layers: RMSNorm on a CPU (the C kernels' forward and backward) equals PyTorch's, and
falls back to PyTorch's without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinylm import kernels
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
