"""FastGPT (the engine's inference twin of GPT) computes the same function as GPT."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F

import tinylm.infer.fast as fast
from tinylm import kernels
from tinylm.errors import UserError
from tinylm.infer.engine import Engine, SamplingParams
from tinylm.infer.fast import FastGPT, native_bf16
from tinylm.models.gpt import GPT, GPTConfig, gpt2_style

SMALL = dict(vocab_size=50, block_size=64, n_layer=2, n_head=2, d_model=128, zero_init=False)
CONFIGS = {
    "gpt2": gpt2_style(**SMALL),
    "qwen3-like": GPTConfig(**SMALL, mlp="swiglu", qk_norm=True, logit_softcap=15.0),
    "relu2-rope": GPTConfig(**SMALL | {"n_head": 4}, mlp="relu2", qk_norm=False),
    "relu-layernorm-bias": GPTConfig(**SMALL, mlp="relu", norm="layer", bias=True,
                                     tie_embeddings=True),
    # SmolLM2's switches: 4 query heads over 2 key/value heads, RMSNorm eps 1e-5, tied, and
    # Qwen2's q/k/v-only biases with a Llama 3.1 scaled rope
    "gqa-llama": GPTConfig(**SMALL | {"n_head": 4}, mlp="swiglu", qk_norm=False, n_kv_head=2,
                           norm_eps=1e-5, tie_embeddings=True, rope_theta=1e5),
    "mqa-qwen2-llama3-rope": GPTConfig(**SMALL | {"n_head": 4}, mlp="swiglu", qk_norm=False,
                                       n_kv_head=1, qkv_bias=True, rope_scaling="llama3",
                                       rope_factor=8.0, rope_original_max_len=16),
}


@pytest.fixture(params=[True, False], ids=["packed", "plain"])
def pack(request, monkeypatch):
    monkeypatch.setattr(fast, "PACK", request.param)
    return request.param


def prefill_then_decode(model, ids, pad, nxt):
    """Logits of a left-padded prefill (real positions only) and of one decode step."""
    cache = model.new_cache(ids.shape[0], 20, pad=pad)
    with torch.no_grad():
        first = model.decode(ids, cache)
        real = pad[:, None] <= torch.arange(ids.shape[1])
        return first[real], model.decode(nxt, cache)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_equal_the_models(name, pack):
    torch.manual_seed(0)
    model = GPT(CONFIGS[name]).eval()
    fast_model = FastGPT(model)
    assert all(layer.qkv.packed == pack for layer in fast_model.layers)
    ids, nxt = torch.randint(0, 50, (3, 10)), torch.randint(0, 50, (3, 1))
    pad = torch.tensor([0, 3, 5])
    want = prefill_then_decode(model, ids, pad, nxt)
    got = prefill_then_decode(fast_model, ids, pad, nxt)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen3-like", "gpt2"])
def test_answer_states_share_each_prompt_and_equal_the_full_rows(name):
    """K answers continue one cached copy of their prompt (prompts of different lengths, so
    left-padded): the states equal the model's on the full right-padded rows."""
    torch.manual_seed(0)
    model = GPT(CONFIGS[name]).eval()
    prompts = [[3, 4, 5, 6, 7], [8, 9], [3, 4, 5, 6, 7]]  # the first and last are one prompt
    answers = [[10, 11, 12], [13], [14, 15, 16, 17]]
    seqs = [p + a for p, a in zip(prompts, answers)]
    ids = torch.tensor([s + [0] * (9 - len(s)) for s in seqs])
    start, lengths = torch.tensor([5, 2, 5]), torch.tensor([3, 1, 4])
    with torch.no_grad():
        full = model.hidden_states(ids)  # (N, L, C)
        got = FastGPT(model).answer_states(ids, start, lengths)  # (N, 1 + R, C)
    assert got.shape == (3, 5, full.shape[-1])
    for n in range(3):
        s, a = int(start[n]), int(lengths[n])
        torch.testing.assert_close(got[n, : a + 1], full[n, s - 1 : s + a], atol=1e-5,
                                   rtol=1e-5)


# A value to try for each GPTConfig field that FastGPT takes in any value (a field missing here
# is tried at its default); a field with listed values is tried at each of them.
OTHER_VALUES = {"vocab_size": 60, "block_size": 32, "depth": 2, "n_layer": 1, "n_head": 4,
                "d_model": 64, "mlp_ratio": 2.5, "rope_theta": 500.0, "tie_embeddings": True,
                "logit_softcap": 5.0, "zero_init": True, "dropout": 0.1, "n_kv_head": 1,
                "norm_eps": 1e-3, "rope_factor": 4.0, "rope_low_freq_factor": 2.0,
                "rope_high_freq_factor": 8.0, "rope_original_max_len": 8}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(GPTConfig)])
def test_every_config_field_is_implemented_or_refused(field):
    """A GPTConfig field FastGPT lists computes GPT's logits at each value it lists (or, for
    "any", at a value other than the default); a field it does not list is refused."""
    base = GPTConfig(**SMALL)
    allowed = fast.SUPPORTED.get(field)
    if allowed is None:
        with pytest.raises(UserError, match=f"GPTConfig.{field}="):
            FastGPT(GPT(base))
        return
    if allowed == "any":
        allowed = [OTHER_VALUES.get(field, getattr(base, field))]
    torch.manual_seed(0)
    ids, nxt, pad = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 1)), torch.tensor([0, 2])
    for value in sorted(allowed):
        model = GPT(dataclasses.replace(base, **{field: value})).eval()
        with torch.no_grad():  # norm weights and biases away from ones and zeros
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        want = prefill_then_decode(model, ids, pad, nxt)
        got = prefill_then_decode(FastGPT(model), ids, pad, nxt)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"{field}={value!r}")


@dataclasses.dataclass
class ConfigWithANewSwitch(GPTConfig):
    parallel_blocks: bool = False  # a switch GPT might gain and FastGPT would not know


def test_what_fastgpt_does_not_implement_is_a_one_line_error_in_fastgpt_and_the_engine(
        monkeypatch):
    model = GPT(ConfigWithANewSwitch(**SMALL))
    for build in (FastGPT, Engine):
        with pytest.raises(UserError, match="ConfigWithANewSwitch.parallel_blocks=False") as e:
            build(model)
        assert "\n" not in str(e.value)
    monkeypatch.setitem(fast.SUPPORTED, "mlp", {"swiglu"})  # as if relu2 were not implemented
    with pytest.raises(UserError, match="GPTConfig.mlp='relu2'; use one of 'swiglu'"):
        Engine(GPT(GPTConfig(**SMALL, mlp="relu2")))
    with pytest.raises(UserError, match="GPT models only"):
        Engine(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("name", ["gpt2", "qwen3-like"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_close_to_fp32(name, dtype, pack):
    torch.manual_seed(0)
    model = GPT(CONFIGS[name]).eval()
    bf16 = FastGPT(model, dtype)
    packable = dtype == torch.bfloat16 and native_bf16(torch.device("cpu"))
    assert all(layer.qkv.packed == (pack and packable) for layer in bf16.layers)
    ids, nxt = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 1))
    pad = torch.tensor([0, 2])
    want = prefill_then_decode(model, ids, pad, nxt)
    got = prefill_then_decode(bf16, ids, pad, nxt)
    for w, g in zip(want, got):
        assert g.dtype == torch.float32
        assert (g - w).abs().max() < 0.02 * w.abs().max()  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("name", ["gpt2", "qwen3-like"])
@pytest.mark.parametrize("c_kernel", [True, False], ids=["c-int8", "torch-int8"])
def test_int8_logits_are_close_to_fp32_on_every_path(name, c_kernel, monkeypatch):
    """Decode rows run an int8 kernel (the C one, or PyTorch's where it cannot be built); a
    3x10-token prefill runs the wide path (the same int8 weights widened). All stay close to
    fp32, and with the C kernel the embedding shares the tied head's int8 rows."""
    if c_kernel and not kernels.available():
        pytest.skip("no C compiler here")
    if not c_kernel:
        monkeypatch.setattr(kernels, "available", lambda: False)
    # 16 rows on the kernel, whatever this machine measured: 30 prompt rows go wide, 3 not
    monkeypatch.setattr(fast, "kernel_max_rows", lambda c, d: dict.fromkeys(fast.ROLES, 16))
    torch.manual_seed(0)
    model = GPT(CONFIGS[name]).eval()
    int8 = FastGPT(model, torch.int8)
    kernel = "c_int8" if c_kernel else "int8"
    assert all(getattr(layer.qkv, kernel) is not None for layer in int8.layers)  # 128 wide
    assert int8.tok_emb is None and int8.emb_int8 is not None
    if c_kernel and model.config.tie_embeddings:
        assert int8.emb_int8 is int8.head.c_int8  # one int8 copy of the tied matrix
    ids, nxt = torch.randint(0, 50, (3, 10)), torch.randint(0, 50, (3, 1))
    pad = torch.tensor([0, 3, 5])
    want = prefill_then_decode(model, ids, pad, nxt)
    got = prefill_then_decode(int8, ids, pad, nxt)
    for w, g in zip(want, got):
        assert (g - w).abs().max() < 0.03 * w.abs().max()
    one = prefill_then_decode(int8, ids[:1], pad[:1], nxt[:1])[1]  # 1 row: the int8 kernel
    assert (one - want[1][:1]).abs().max() < 0.03 * want[1].abs().max()


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_on_each_side_of_max_rows_equals_the_dequantized_matmul(rows, dtype):
    """Up to max_rows rows run the C kernel, more the wide path: both compute x times the
    dequantized weights, plus bias and residual or activation, within rounding."""
    if not kernels.available():
        pytest.skip("no C compiler here")
    torch.manual_seed(0)
    w, b = torch.randn(48, 64), torch.randn(48)
    lin = fast.Linear(w, b, torch.int8)
    q, scale = lin.c_int8
    x, res = torch.randn(rows, 64).to(dtype), torch.randn(rows, 48).to(dtype)
    # Past max_rows on a CPU with native bf16 the wide path multiplies by int8's bf16 copy of
    # the dequantized weights, in bf16 whatever x's dtype; elsewhere by the weights widened.
    bf16_wide = rows > lin.max_rows and fast.native_bf16(x.device)
    deq = q.float() * scale[:, None]
    want = x.float() @ (deq.bfloat16().float() if bf16_wide else deq).T + b  # (rows, 48)
    tol = 1e-3 if dtype == torch.float32 and not bf16_wide else 3e-2
    got = lin(x, residual=res)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want + res.float(), atol=tol * 10, rtol=tol)
    torch.testing.assert_close(lin(x, act="relu").float(), want.relu(), atol=tol * 10, rtol=tol)
    glu = fast.Linear(w, b, torch.int8, glu=True)  # rows 0-23 gate, 24-47 up
    assert glu.c_int8 is None and glu.c_glu is not None  # one int8 copy, interleaved
    gate, up = want.chunk(2, dim=-1)
    torch.testing.assert_close(glu(x, act="swiglu").float(), F.silu(gate) * up,
                               atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
def test_bf16_linear_on_each_side_of_max_rows_equals_the_matmul(rows, monkeypatch):
    """Up to max_rows rows run the bf16 C kernel, more PyTorch's bf16 matmul on the kernel's
    own copy (no second one where bf16 is emulated): both compute x times the bf16 weights,
    plus bias and residual, activation, or SwiGLU from the interleaved gate and up rows."""
    if not kernels.available():
        pytest.skip("no C compiler here")
    calls = []
    real = kernels.bf16_linear
    monkeypatch.setattr(kernels, "bf16_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    w, b = torch.randn(48, 72), torch.randn(48)  # 72 wide: 8 past a multiple of 16
    lin = fast.Linear(w, b, torch.bfloat16, max_rows=16)
    assert lin.c_bf16 is not None and (lin.weight is None) == (not native_bf16(w.device))
    x, res = torch.randn(rows, 72).bfloat16(), torch.randn(rows, 48).bfloat16()
    want = x.float() @ w.bfloat16().float().T + b  # (rows, 48)
    tol = dict(atol=0.1, rtol=3e-2)  # bf16 outputs (and PyTorch's bf16 intermediate steps)
    got = lin(x, residual=res)
    assert got.dtype == torch.bfloat16 and len(calls) == (rows <= 16)
    torch.testing.assert_close(got.float(), want + res.float(), **tol)
    torch.testing.assert_close(lin(x, act="relu").float(), want.relu(), **tol)
    glu = fast.Linear(w, b, torch.bfloat16, max_rows=16, glu=True)  # 0-23 gate, 24-47 up
    gate, up = want.chunk(2, dim=-1)
    torch.testing.assert_close(glu(x, act="swiglu").float(), F.silu(gate) * up, **tol)
    assert fast.Linear(w, b, torch.bfloat16, max_rows=0).c_bf16 is None  # lost: no copy


def test_engine_on_the_bf16_kernel_equals_the_naive_reference_greedily(monkeypatch):
    """A tiny SwiGLU GQA model whose weights are bf16 values: the bf16 engine, its matmuls on
    the C kernel (prefill and decode, head and tied embedding sharing one bf16 copy), gives
    the full-forward fp32 reference's greedy tokens for a batch of prompts of different
    lengths; its activations are rounded to bf16 between matmuls, which the scaled weights'
    margins absorb."""
    from tinylm.infer.engine import naive_generate

    if not kernels.available():
        pytest.skip("no C compiler here")
    monkeypatch.setattr(fast, "kernel_max_rows", lambda c, d: dict.fromkeys(fast.ROLES, 64))
    calls = []
    real = kernels.bf16_linear
    monkeypatch.setattr(kernels, "bf16_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL | {"n_head": 4}, mlp="swiglu", n_kv_head=2, qk_norm=False,
                          norm_eps=1e-5, tie_embeddings=True)).eval()
    with torch.no_grad():  # far from uniform: the reference's top two logits are 0.12 or
        for p in model.parameters():  # more apart at every step, bf16's rounding ~0.02
            p.copy_((p * 4.0).bfloat16().float())
    net = FastGPT(model, torch.bfloat16)
    assert all(layer.up.c_bf16 is not None for layer in net.layers)
    assert net.tok_emb is net.head.c_bf16  # tied: one bf16 copy
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    for prompt, c in zip(prompts, Engine(model, dtype="bf16").generate(prompts, params)):
        ref = naive_generate(model, torch.tensor([prompt]), params)[0].tolist()
        assert c.prompt_ids + c.token_ids == ref
    assert len(calls) > 10 * 4 * 2  # every matmul of every step


def test_int8_widths_pytorchs_kernel_cannot_take(monkeypatch):
    """24 wide: not a multiple of 16, which PyTorch's int8 kernel needs (the C kernel takes any
    width); without the C kernel such a layer keeps only the bf16 form."""
    torch.manual_seed(0)
    model = GPT(gpt2_style(**SMALL | {"d_model": 24})).eval()
    want = prefill_then_decode(model, torch.tensor([[1, 2, 3]]), torch.tensor([0]),
                               torch.tensor([[4]]))[1]
    for c_kernel in ([True, False] if kernels.available() else [False]):
        monkeypatch.setattr(kernels, "available", lambda c=c_kernel: c)
        fast_model = FastGPT(model, torch.int8)
        assert all((layer.qkv.c_int8 is not None) == c_kernel and layer.qkv.int8 is None
                   for layer in fast_model.layers)
        got = prefill_then_decode(fast_model, torch.tensor([[1, 2, 3]]), torch.tensor([0]),
                                  torch.tensor([[4]]))[1]
        assert (got - want).abs().max() < 0.03 * want.abs().max()


def test_engine_sees_weights_changed_after_it_was_made():
    torch.manual_seed(0)
    model = GPT(CONFIGS["gpt2"]).eval()
    engine = Engine(model)
    p = SamplingParams(max_new_tokens=8, temperature=0)
    before = engine.generate([[1, 2, 3]], p)[0].token_ids
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn_like(w) * 0.5)  # in place, as an optimizer step is
    after = engine.generate([[1, 2, 3]], p)[0].token_ids
    assert after != before
    assert after == Engine(model).generate([[1, 2, 3]], p)[0].token_ids


def test_bf16_engine_mostly_agrees_with_fp32_greedy():
    """Rounding can flip a near-tie, after which the texts part; the first tokens agree."""
    torch.manual_seed(0)
    model = GPT(CONFIGS["qwen3-like"]).eval()
    p = SamplingParams(max_new_tokens=4, temperature=0)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    a = [c.token_ids for c in Engine(model).generate(prompts, p)]
    b = [c.token_ids for c in Engine(model, dtype="bf16").generate(prompts, p)]
    assert sum(x[0] == y[0] for x, y in zip(a, b)) >= 2


def test_unknown_dtype_is_a_user_error():
    model = GPT(CONFIGS["gpt2"])
    with pytest.raises(UserError, match="unknown dtype 'int3'"):
        Engine(model, dtype="int3")


def test_logit_bias_from_json_and_its_errors():
    p = SamplingParams.from_dict({"logit_bias": {"7": -100, "3": 2.5}})
    assert p.logit_bias == {7: -100.0, 3: 2.5}
    with pytest.raises(UserError, match="logit_bias"):
        SamplingParams.from_dict({"logit_bias": {"seven": 1}})
    with pytest.raises(UserError, match="outside the vocabulary"):
        Engine(GPT(CONFIGS["gpt2"])).generate([[1]], SamplingParams(4, logit_bias={50: 1.0}))
    torch.manual_seed(0)
    model = GPT(CONFIGS["gpt2"]).eval()
    forced = SamplingParams(max_new_tokens=3, temperature=0.8, logit_bias={9: 100.0})
    assert Engine(model).generate([[1, 2]], forced)[0].token_ids == [9, 9, 9]


def test_engine_with_grouped_query_attention_equals_the_naive_reference():
    """4 query heads over 2 key/value heads: the engine's caches hold 2 heads (half the bytes
    of plain attention, fp32 and the kernel's bf16 alike) and its greedy tokens equal the
    full-forward reference's, for a batch of 3 prompts of different lengths."""
    from tinylm.infer.engine import naive_generate
    from tinylm.tokenizer import train_char

    tok = train_char("the cat sat on the mat. a dog ran to the sun.\n" * 3)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL | {"n_head": 4, "vocab_size": tok.vocab_size}, mlp="swiglu",
                          n_kv_head=2, qk_norm=False, norm_eps=1e-5)).eval()
    with torch.no_grad():  # far from uniform, so greedy choices are not near-ties
        for p in model.parameters():
            p.mul_(3.0)
    for dtype in (None, torch.int8):
        cache = FastGPT(model, dtype).new_cache(2, 8)
        assert cache.k.shape[2] == cache.v.shape[2] == 2  # n_kv_head heads, not n_head
    prompts = ["the cat", "a dog ran to the", "s"]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    for prompt, c in zip(prompts, Engine(model, tok).generate(prompts, params)):
        ref = naive_generate(model, torch.tensor([tok.encode(prompt)]), params)[0].tolist()
        assert c.prompt_ids + c.token_ids == ref


def test_auto_picks_what_measured_faster_once_per_machine_and_shape(monkeypatch, tmp_path):
    """`auto` on a CPU keeps the weights `race` found fastest here for this shape, int8 if it
    won at batch 1 or 8, else batch 1's winner; the result is cached, so the race runs once
    per shape, and it is a measurement, not a CPU flag."""
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path))
    calls = []
    seconds = {"fp32": [1.0, 1.0], "bf16": [2.0, 0.5], "int8": [3.0, 3.0]}

    def race(c):
        calls.append(c.d_model)
        return {k: list(v) for k, v in seconds.items()}

    monkeypatch.setattr(fast, "race", race)
    model = GPT(CONFIGS["gqa-llama"])
    assert fast.resolve_dtype("auto", model) == torch.float32  # batch 1's winner
    assert fast.auto_plan(model.config)["by_batch"] == {"1": "fp32", "8": "bf16"}
    seconds["int8"] = [3.0, 0.1]  # a second call reads the cache and does not race again
    assert fast.resolve_dtype("auto", model) == torch.float32 and calls == [128]
    other = GPT(GPTConfig(**SMALL | {"d_model": 64}))
    assert fast.resolve_dtype("auto", other) == torch.int8  # another shape: int8 won at 8
    assert len(calls) == 2 and (tmp_path / fast.AUTO_FILE).is_file()


def test_the_race_runs_the_models_shapes_for_each_candidate():
    c = GPTConfig(**SMALL | {"n_head": 4}, mlp="swiglu", n_kv_head=2)
    seconds = fast.race(c, repeats=1)
    assert {"fp32", "int8"} <= set(seconds) and all(
        len(v) == len(fast.AUTO_BATCHES) and min(v) > 0 for v in seconds.values())
    bf16_runs = native_bf16(torch.device("cpu")) or kernels.available()  # natively or in C
    assert ("bf16" in seconds) == bf16_runs and len(seconds) == 2 + bf16_runs


def test_crossing_is_where_the_kernel_starts_to_lose():
    """The crossover is read off the two paths' times: the kernel's lead at the last row count
    it won and its loss at the next are interpolated; never losing gives every count
    (ALL_ROWS), losing at once gives 0 (every row on the other path), and a loss within
    CROSSOVER_MARGIN is a tie, not a loss."""
    rows = (1, 2, 4, 8, 16, 32)
    wide = [10.0] * 6
    assert fast.crossing(rows, [1, 2, 4, 8, 16, 32], wide) == 10  # the lines meet at 10
    assert fast.crossing(rows, [1, 2, 4, 9, 11, 20], wide) == 12  # halfway to 16
    assert fast.crossing(rows, [1.0] * 6, wide) == fast.ALL_ROWS  # every count, a prompt's too
    assert fast.crossing(rows, [11.0] * 6, wide) == 0
    assert fast.crossing(rows, [10.4] * 6, wide) == fast.ALL_ROWS  # 4% slower: noise, a tie


def test_int8_linears_run_the_crossover_measured_for_their_shape(monkeypatch, tmp_path):
    """FastGPT's int8 matmuls each take the crossover measured for their role, once per
    machine and shape: an explicit int8 run measures only the crossover, `auto` adds its race
    to the same cache entry without measuring the crossover again."""
    if not kernels.available():
        pytest.skip("no C compiler here")
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path))
    measured = []
    rows = dict(zip(fast.ROLES, (3, 5, 7, 9, 11)))

    def crossover(c, dtype):
        measured.append((c.d_model, dtype))
        return dict(rows)

    monkeypatch.setattr(fast, "crossover", crossover)
    monkeypatch.setattr(fast, "race", lambda c: {"fp32": [1.0, 1.0], "int8": [2.0, 0.5]})
    torch.manual_seed(0)
    model = GPT(CONFIGS["qwen3-like"]).eval()
    net = FastGPT(model, torch.int8)
    got = {role: getattr(net.layers[0], role).max_rows for role in ("qkv", "proj", "up", "down")}
    assert got | {"head": net.head.max_rows} == rows and measured == [(128, torch.int8)]
    assert fast.resolve_dtype("auto", model) == torch.int8 and len(measured) == 1
    assert fast.auto_plan(model.config)["int8_max_rows"] == rows
    x = torch.randn(12, 128).to(torch.bfloat16)
    calls = []
    real = kernels.int8_linear
    monkeypatch.setattr(kernels, "int8_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = net.layers[0]
    layer.qkv(x), layer.proj(x), net.head(x)  # 3, 5, 11 < 12: all wide
    assert calls == []
    net.head(x[:11])  # 11 rows: the head's kernel
    assert calls == [1]


def test_crossover_is_measured_on_the_models_shapes(monkeypatch):
    """On a tiny model the measured crossovers, int8's and bf16's, are row counts within
    CROSSOVER_ROWS' range, or every count; a C kernel made slower than any matmul loses at
    every count, so every role gets 0."""
    if not kernels.available():
        pytest.skip("no C compiler here")
    c = GPTConfig(**SMALL | {"n_head": 4}, mlp="swiglu", n_kv_head=2)
    for dtype in (torch.int8, torch.bfloat16):
        rows = fast.crossover(c, dtype, repeats=1)
        assert set(rows) == set(fast.ROLES)
        assert all(0 <= v <= fast.CROSSOVER_ROWS[-1] or v == fast.ALL_ROWS
                   for v in rows.values())
    real = kernels.int8_linear

    def slow(*args, **kwargs):
        time.sleep(0.002)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "int8_linear", slow)
    monkeypatch.setattr(fast, "CROSSOVER_ROWS", (1, 4))
    monkeypatch.setattr(fast, "CROSSOVER_MACS", 1)  # one call per timing
    assert fast.crossover(c, torch.int8, repeats=1) == dict.fromkeys(fast.ROLES, 0)
