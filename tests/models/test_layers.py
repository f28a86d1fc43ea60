"""Shared layers: the CPU RMSNorm's written-out backward equals autograd's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinylm.models.layers import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_backward_by_hand_equals_autograds(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 16, dtype=dtype)
    y = norm(x)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), g)
    assert y.grad_fn.name().startswith("_RMSNormCPU")  # the written-out path ran
    x2 = x.detach().float().requires_grad_()
    w2 = norm.weight.detach().clone().requires_grad_()
    y2 = F.rms_norm(x2, (16,), w2, 1e-6)  # autograd's own backward, in fp32
    gx2, gw2 = torch.autograd.grad(y2, (x2, w2), g.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert gx.dtype == dtype and gw.dtype == torch.float32
    assert torch.allclose(y.float(), y2, atol=tol, rtol=tol)
    assert torch.allclose(gx.float(), gx2, atol=tol, rtol=tol)
    assert torch.allclose(gw, gw2, atol=tol * 4, rtol=tol)
    with torch.no_grad():  # inference keeps PyTorch's fused forward
        assert torch.equal(norm(x), y.detach())
