import pytest
import torch
import torch.nn.functional as F

from tinylm.feedback.preferences import token_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [True, False])
def test_token_logprobs_and_their_gradient_equal_log_softmax_and_gather(dtype, entropy):
    """The fused log p(target), its one-pass backward and the entropies, against autograd
    through PyTorch's log-softmax and gather (bf16 logits: read in fp32, as autocast's cast
    then log-softmax do)."""
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(37, 101, generator=gen)).to(dtype)
    targets = torch.randint(101, (37,), generator=gen)
    g = torch.randn(37, generator=gen)

    a = logits.clone().requires_grad_()
    logp, ent = token_logprobs(a, targets, entropy)
    (logp * g).sum().backward()

    b = logits.clone().requires_grad_()
    ref_all = F.log_softmax(b.float(), -1)
    ref = ref_all.gather(-1, targets[:, None])[:, 0]
    (ref * g).sum().backward()

    assert logp.dtype == torch.float32 and a.grad.dtype == dtype
    torch.testing.assert_close(logp, ref.detach())
    tol = {} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)
    if entropy:
        want = -(ref_all.exp() * ref_all).sum(-1).detach()
        torch.testing.assert_close(ent, want)
        assert not ent.requires_grad
    else:
        assert ent is None
