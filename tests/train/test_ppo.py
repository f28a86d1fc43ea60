"""PPO's numerics (GAE, KL estimators, the end-of-answer penalty, padding, GRPO's baseline,
the adaptive KL coefficient) and a real learning signal in a tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tinylm.infer.engine import Engine
from tinylm.infer.fast import FastGPT
from tinylm.models.gpt import GPT, GPTConfig
from tinylm.models.heads import RewardConfig, RewardModel
from tinylm.train import ppo
from tinylm.train.loop import TrainConfig

V, END, PAD, FAVOURED = 12, 1, 0, 7


def test_gae_matches_a_hand_computed_case():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])  # 9.0: padding, ignored
    values = torch.tensor([[0.5, 0.2, 0.4], [0.1, 0.3, 7.0]])  # 7.0: padding, ignored
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: d2 = 1 - .4 = .6; d1 = .9*.4 - .2 = .16, A1 = .16 + .45*.6 = .43;
    #        d0 = .9*.2 - .5 = -.32, A0 = -.32 + .45*.43 = -.1265
    # row 1: the answer ends at t=1 (terminal): d1 = 2 - .3 = 1.7; d0 = .9*.3 - .1 = .17,
    #        A0 = .17 + .45*1.7 = .935
    assert torch.allclose(adv, torch.tensor([[-0.1265, 0.43, 0.6], [0.935, 1.7, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.3735, 0.63, 1.0], [1.035, 2.0, 0.0]]))


def test_kl_estimators_are_unbiased_on_known_distributions():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((p * (p / q).log()).sum())
    for est in ("k1", "k3"):
        k = ppo.kl_estimate(p.log(), q.log(), est)  # the estimate for each possible sample
        assert float((p * k).sum()) == pytest.approx(exact, abs=1e-6)  # E_p[k] = KL(p || q)
    k1, k3 = ppo.kl_estimate(p.log(), q.log(), "k1"), ppo.kl_estimate(p.log(), q.log(), "k3")
    assert (k1 < 0).any() and (k3 >= 0).all()  # k1 can be negative for a sample, k3 cannot
    # close distributions: k3 has the lower variance (Schulman's point)
    q2 = torch.tensor([0.45, 0.32, 0.17, 0.06])

    def var(k):
        return float((p * k**2).sum() - (p * k).sum() ** 2)

    assert var(ppo.kl_estimate(p.log(), q2.log(), "k3")) < var(
        ppo.kl_estimate(p.log(), q2.log(), "k1"))
    assert torch.equal(ppo.kl_estimate(p.log(), p.log(), "k3"), torch.zeros(4))


def test_missing_end_penalty_and_padding():
    scores = ppo.end_scores(torch.tensor([1.0, 2.0]), torch.tensor([True, False]), 0.5)
    assert scores.tolist() == [1.0, 1.5]
    kl = torch.tensor([[0.1, 0.2, 0.3, 50.0], [0.4, 0.5, 60.0, 70.0]])  # garbage on padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    r = ppo.token_rewards(scores, kl, mask, beta=0.1)
    # the score sits on the last real token, never on padding; padding earns nothing
    assert torch.allclose(r, torch.tensor([[-0.01, -0.02, 1.0 - 0.03, 0.0],
                                           [-0.04, 1.5 - 0.05, 0.0, 0.0]]))
    w = ppo.masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 99.0]]), mask[:1])
    assert w[0, 3] == 0 and float(w[0, :3].mean()) == pytest.approx(0, abs=1e-6)


def test_group_relative_advantages_on_a_hand_case():
    adv = ppo.group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), k=2)
    # group (1, 3): mean 2, std sqrt(2); group (2, 2): no spread, no signal
    s = 1 / math.sqrt(2)
    assert torch.allclose(adv, torch.tensor([-s, s, 0.0, 0.0]), atol=1e-5)
    # Dr. GRPO (scale=False): centred only, so a small spread gives a small advantage
    unscaled = ppo.group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.01]), k=2, scale=False)
    assert torch.allclose(unscaled, torch.tensor([-1.0, 1.0, -0.005, 0.005]), atol=1e-5)


def test_adaptive_kl_coefficient_moves_towards_the_target():
    cfg = ppo.PPOConfig(adaptive_kl=True, kl_coef=0.1, kl_target=6.0, kl_horizon=1000)
    up, down = ppo.KLController(cfg), ppo.KLController(cfg)
    up.update(kl=100.0, n=100)  # far above: the error is clipped at 0.2
    down.update(kl=3.0, n=100)  # half the target: e = -0.5, clipped to -0.2
    assert up.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    assert down.value == pytest.approx(0.1 * (1 - 0.2 * 100 / 1000))
    fixed = ppo.KLController(ppo.PPOConfig(kl_coef=0.1))
    fixed.update(kl=100.0, n=100)
    assert fixed.value == 0.1


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.5, -0.5]], requires_grad=True)  # ratios e^.5 = 1.65, e^-.5 = .61
    adv = torch.ones(1, 2)
    loss, st = ppo.policy_loss(new, old, adv, torch.ones(1, 2), clip=0.2)
    loss.backward()
    # a positive advantage past 1 + clip gives no gradient; the other token still learns
    assert new.grad[0, 0] == 0 and new.grad[0, 1] < 0
    assert float(st["clipfrac"]) == 0.5


# --- with a tiny model ----------------------------------------------------------------------------
def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, d_model=32,
                         zero_init=False))


def tiny_value(seed: int = 1) -> ppo.PerToken:
    """A value model as PPO makes one: a reward model (GPT + scalar head), read per token."""
    torch.manual_seed(seed)
    backbone = GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, d_model=32)
    return ppo.PerToken(RewardModel(RewardConfig(backbone=backbone)))


PROMPTS = [[2, 3, 4], [5, 6], [8, 9, 10, 11], [3, 3]]


def test_rollout_pads_after_the_end_and_keeps_the_engine_logprobs():
    model = tiny_gpt()
    cfg = ppo.PPOConfig(k=3, prompts_per_step=4, max_new_tokens=6)
    ro = ppo.rollout(Engine(model), PROMPTS, [0, 1, 2, 3], cfg, END, PAD, seed=3)
    assert ro.ended.any() and not ro.ended.all()  # some answers end, some are cut
    for i, c in enumerate(ro.completions):
        n, s = len(c.token_ids), int(ro.start[i])
        assert int(ro.mask[i].sum()) == n and bool(ro.ended[i]) == (c.token_ids[-1] == END)
        assert ro.ids[i, s : s + n].tolist() == c.token_ids
        assert (ro.ids[i, s + n :] == PAD).all() and (ro.logprobs[i, n:] == 0).all()
    # the training forward gives the engine's logprobs (so the rollout's can be used as old)
    logp, _ = ppo.answer_logprobs(model, ro.ids, ro.start, ro.mask, 1.0)
    assert torch.allclose(logp * ro.mask, ro.logprobs, atol=1e-4)
    # padding never changes a real token's logprob (right padding, causal model)
    other = ro.ids.clone()
    ends = ro.start + ro.mask.sum(1).long()  # (N,) where each row's padding begins
    other[torch.arange(other.shape[1]) >= ends[:, None]] = 5
    again, _ = ppo.answer_logprobs(model, other, ro.start, ro.mask, 1.0)
    assert torch.allclose(again * ro.mask, logp * ro.mask, atol=1e-5)
    # the K answers of a prompt share its positions in the training forward: the same numbers
    packed = ppo.shared_prompts(ro.ids, ro.start, ro.mask)
    assert packed.tokens == sum(map(len, PROMPTS)) + int(ro.mask.sum())  # each prompt once
    shared, _ = ppo.answer_logprobs(model, ro.ids, ro.start, ro.mask, 1.0, packed=packed)
    assert torch.allclose(shared * ro.mask, logp * ro.mask, atol=1e-5)
    critic = tiny_value()
    torch.nn.init.normal_(critic.rm.head.weight)  # not the zero start: values that differ
    for block in critic.rm.backbone.blocks:
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.1)
    values = ppo.answer_values(critic, ro.ids, ro.start, ro.mask.shape[1]) * ro.mask
    assert values.std() > 0.01
    got = ppo.answer_values(critic, ro.ids, ro.start, ro.mask.shape[1], packed) * ro.mask
    assert torch.allclose(got, values, atol=1e-5)  # on the answers; padding is never read


class Wrapped(torch.nn.Module):
    """A module whose forward is all it offers, as a DDP or compiled wrapper of a GPT."""

    def __init__(self, model: GPT):
        super().__init__()
        self.inner = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids)


def full_softmax_logprobs(model: GPT, ro: ppo.Rollout, temperature: float):
    """The textbook way: every position's log-softmax, then the answer tokens' entries."""
    pred, tok = ppo.answer_positions(ro.start, ro.mask.shape[1], ro.ids.shape[1])
    logp_all = (model(ro.ids) / temperature).log_softmax(-1)  # (N, L, V)
    logp_all = logp_all.gather(1, pred[..., None].expand(-1, -1, V))  # (N, R, V)
    logp = logp_all.gather(-1, ro.ids.gather(1, tok)[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp * ro.mask, entropy * ro.mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_answer_logprobs_on_the_answer_tokens_equal_the_full_softmax(temperature):
    """The head runs on the answer tokens only (GPT, its FastGPT twin, or any wrapper's full
    logits): the same logprobs, entropies and gradients as the full log-softmax."""
    model = tiny_gpt()
    cfg = ppo.PPOConfig(k=3, prompts_per_step=4, max_new_tokens=6)
    ro = ppo.rollout(Engine(model), PROMPTS, [0, 1, 2, 3], cfg, END, PAD, seed=3)
    want, want_h = full_softmax_logprobs(model, ro, temperature)
    weights = torch.randn(ro.mask.shape)  # any loss of the logprobs

    def grads(logp):
        model.zero_grad()
        (logp * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    want_grads = grads(want)
    twin = ppo.inference_twin(model)
    assert isinstance(twin, FastGPT) and ppo.inference_twin(Wrapped(model)).__class__ is Wrapped
    for m in (model, Wrapped(model), twin):
        logp, h = ppo.answer_logprobs(m, ro.ids, ro.start, ro.mask, temperature, entropy=True)
        assert torch.allclose(logp, want, atol=1e-5) and torch.allclose(h, want_h, atol=1e-5)
        assert (logp[ro.mask == 0] == 0).all() and not h.requires_grad
        if m is not twin:  # the twin has no gradient; the others the full softmax's
            for g, w in zip(grads(logp), want_grads):
                assert torch.allclose(g, w, atol=1e-5)


def favoured_share(answers) -> float:
    toks = [t for a in answers for t in a]
    return sum(t == FAVOURED for t in toks) / len(toks)


def reward_favouring(prompts, answers) -> torch.Tensor:
    return torch.tensor([sum(t == FAVOURED for t in a) / len(a) for a in answers])


def sampled_share(model: GPT) -> float:
    engine = Engine(model)
    cfg = ppo.PPOConfig(k=8, prompts_per_step=4, max_new_tokens=8)
    ro = ppo.rollout(engine, PROMPTS, [0, 1, 2, 3], cfg, END, PAD, seed=12345)
    return favoured_share([c.token_ids for c in ro.completions])


# grpo also runs at temperature 0.9: the policy is then the tempered distribution, whose
# logprobs are recomputed rather than taken from the engine; and in bf16, where rollouts, the
# reference and the recomputed logprobs run on bf16 twins (the training arithmetic)
@pytest.mark.parametrize("advantage,dtype", [("gae", "float32"), ("grpo", "float32"),
                                             ("grpo", "bfloat16")])
def test_ppo_raises_the_frequency_of_the_rewarded_token(tmp_path, advantage, dtype):
    policy = tiny_gpt()
    before = sampled_share(policy)
    models = ppo.Models(policy, copy.deepcopy(policy), reward_favouring,
                        tiny_value() if advantage == "gae" else None)
    cfg = ppo.PPOConfig(k=4, prompts_per_step=4, max_new_tokens=8, epochs=2,
                        advantage=advantage, kl_coef=0.01, missing_eos_penalty=0.0,
                        value_lr=3e-3, temperature=1.0 if advantage == "gae" else 0.9)
    tcfg = TrainConfig(steps=12, batch_size=8, optimizer="adamw", lr=3e-3, warmup_steps=1,
                       schedule="constant", dtype=dtype, device="cpu", progress=False,
                       log_every=1, grad_clip=1.0)
    def gold(index, texts):  # a labeler that cannot judge prompt 0's answers (NaN)
        return torch.tensor([float("nan") if i == 0 else 1.0 for i in index])

    trainer = ppo.PPOTrainer(models, PROMPTS, cfg, tcfg, tmp_path / "run", END, PAD,
                             gold=gold)
    arithmetic = getattr(torch, dtype)
    assert trainer.engine.dtype == trainer.ref_net.weight_dtype == arithmetic
    last = trainer.train()
    assert last["objective/gold"] == 1.0  # the mean over the answers it could judge
    after = sampled_share(policy)
    assert before < 0.2 and after > before + 0.25, (before, after)
    assert last["objective/kl"] > 0 and 0 <= last["policy/clipfrac_avg"] <= 1
    assert ("loss/value_avg" in last) == (advantage == "gae")
    assert (tmp_path / "run" / "model.safetensors").is_file()
