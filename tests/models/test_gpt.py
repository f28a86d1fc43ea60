import pytest
import torch

from tinylm.models.gpt import GPT, GPTConfig, gpt2_style
from tinylm.models.layers import Packed

VARIANTS = {
    "modern": GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32),
    "swiglu+softcap": GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32,
                                mlp="swiglu", logit_softcap=15.0, zero_init=False),
    "gpt2": gpt2_style(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_changing_a_future_token_never_changes_earlier_logits(name):
    torch.manual_seed(0)
    model = GPT(VARIANTS[name]).eval()
    for block in model.blocks:  # make the residual branches non-zero
        torch.nn.init.normal_(block.attn.proj.weight, std=0.1)
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 50
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-4)


@pytest.mark.parametrize("name", VARIANTS)
def test_tiny_model_overfits_a_tiny_batch(name):
    torch.manual_seed(0)
    model = GPT(VARIANTS[name])
    x = torch.randint(0, 50, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_depth_dial_derives_width_and_heads():
    c = GPTConfig(depth=4)
    assert (c.n_layer, c.d_model, c.n_head) == (4, 256, 4)


def test_flops_estimate_counts_weights_and_attention():
    model = GPT(GPTConfig(vocab_size=65, block_size=256))
    n = model.num_params(embeddings=False)
    assert model.flops_per_token() == 6 * n + 12 * 6 * 384 * 256


def test_tied_head_shares_the_embedding():
    model = GPT(VARIANTS["gpt2"])
    assert model.lm_head.weight is model.tok_emb.weight


def test_too_long_input_is_refused():
    model = GPT(VARIANTS["modern"])
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_ignored_targets_do_not_count():
    model = GPT(VARIANTS["modern"])
    x = torch.randint(0, 50, (1, 8))
    y = torch.full((1, 8), -100)
    y[0, 3] = 7
    full = model(x)
    expected = torch.nn.functional.cross_entropy(full[0, 3:4], torch.tensor([7]))
    assert torch.allclose(model(x, y), expected, atol=1e-6)


def test_grouped_query_attention_equals_attention_with_repeated_key_value_heads():
    """n_kv_head=2 of 4: k and v weights are half size, the cache holds 2 heads, and the
    logits equal those of plain attention whose k/v rows repeat each head for its group."""
    torch.manual_seed(0)
    base = dict(vocab_size=40, block_size=16, n_layer=2, n_head=4, d_model=32, mlp="swiglu",
                zero_init=False)
    gqa = GPT(GPTConfig(**base, n_kv_head=2)).eval()
    mha = GPT(GPTConfig(**base)).eval()
    sd = gqa.state_dict()
    for name, w in list(sd.items()):
        if name.endswith(("attn.k.weight", "attn.v.weight")):
            assert w.shape == (16, 32)
            sd[name] = w.unflatten(0, (2, 8)).repeat_interleave(2, 0).flatten(0, 1)
    mha.load_state_dict(sd)
    x = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)
        cache = gqa.new_cache(2, 12)
        gqa.decode(x[:, :9], cache)
        step = gqa.decode(x[:, 9:], cache)
    assert cache.k.shape == (2, 2, 2, 12, 8)  # (n_layer, B, n_kv_head, T, head_dim)
    torch.testing.assert_close(step[:, 0], mha(x)[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="n_kv_head=3 must divide n_head=4"):
        GPTConfig(**base, n_kv_head=3)


@pytest.mark.parametrize("name", ["modern", "gpt2"])
def test_packed_prefixes_give_the_plain_batchs_states_and_gradients(name):
    """Packing (each group's shared prefix once, several groups to a row) changes no number:
    the hidden states at every real position and the weights' gradients equal the plain
    right-padded batch's, with rotary and with learned positions."""
    torch.manual_seed(0)
    model = GPT(VARIANTS[name])
    for block in model.blocks:  # make the residual branches non-zero
        torch.nn.init.normal_(block.attn.proj.weight, std=0.1)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.1)
    seqs = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8], [1, 2, 3, 4],  # a prefix of the first
            [1, 2, 3, 7, 8],  # a duplicate
            [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9], [9, 9, 1],  # a long group
            [5, 6], [7], [4, 4, 4]]  # short blocks: they share rows
    groups = [[0, 1, 2, 3], [4, 5], [6], [7], [8]]
    T = 12
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    for n, s in enumerate(seqs):
        ids[n, : len(s)] = torch.tensor(s)
    packed = Packed.pack(seqs, groups, T, pad_id=0)
    assert packed.ids.shape[0] < len(groups)  # short blocks filled other rows' padding
    assert packed.tokens == 3 + (3 + 2 + 1 + 2) + 2 + (10 + 1) + 2 + 1 + 3  # prefixes once
    real = torch.zeros(len(seqs), T, dtype=torch.bool)
    for n, s in enumerate(seqs):
        real[n, : len(s)] = True
    weights = torch.randn(len(seqs), T, model.config.d_model)

    def states_and_grads(**kw):
        model.zero_grad()
        h = model.hidden_states(ids, **kw)  # (N, T, C)
        ((h * weights)[real]).sum().backward()
        return h[real].detach(), [p.grad.clone() for p in model.parameters()
                                  if p.grad is not None]

    plain, plain_grads = states_and_grads()
    got, got_grads = states_and_grads(packed=packed)
    assert torch.allclose(got, plain, atol=1e-5)
    assert len(got_grads) == len(plain_grads)
    for a, b in zip(got_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-4)
