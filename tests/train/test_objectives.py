"""The preference objectives: InstructGPT's K-wise ranking loss and DPO's loss."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from tinylm.models.gpt import GPT, GPTConfig
from tinylm.models.heads import RewardModel
from tinylm.train import objectives


def pairwise_loss(r_better: torch.Tensor, r_worse: torch.Tensor) -> torch.Tensor:
    """The K = 2 case by hand: -log sigmoid(r_w - r_l)."""
    return -F.logsigmoid(r_better - r_worse)


def test_kwise_loss_equals_the_mean_of_its_pairwise_losses():
    torch.manual_seed(0)
    rewards = torch.randn(1, 4)
    ranks = torch.tensor([[2, 0, 1, 3]])
    by_hand = [pairwise_loss(rewards[0, i], rewards[0, j]) if ranks[0, i] < ranks[0, j]
               else pairwise_loss(rewards[0, j], rewards[0, i])
               for i, j in combinations(range(4), 2)]
    assert len(by_hand) == math.comb(4, 2)
    got = objectives.kwise_ranking_loss(rewards, ranks)
    assert got == pytest.approx(float(torch.stack(by_hand).mean()), abs=1e-6)
    # and each pair as its own K = 2 batch element gives the same mean
    pairs = [(i, j) if ranks[0, i] < ranks[0, j] else (j, i) for i, j in combinations(range(4), 2)]
    as_pairs = objectives.kwise_ranking_loss(
        torch.stack([rewards[0, [i, j]] for i, j in pairs]),
        torch.tensor([[0, 1]] * len(pairs)))
    assert as_pairs == pytest.approx(float(got), abs=1e-6)


def test_ties_and_missing_answers_are_skipped():
    rewards = torch.tensor([[1.0, -2.0, 5.0, 0.3]])
    ranks = torch.tensor([[0, 1, 1, -1]])  # answers 1 and 2 tied; slot 3 empty
    want = (pairwise_loss(rewards[0, 0], rewards[0, 1])
            + pairwise_loss(rewards[0, 0], rewards[0, 2])) / 2
    assert objectives.kwise_ranking_loss(rewards, ranks) == pytest.approx(float(want))
    all_tied = objectives.kwise_ranking_loss(rewards, torch.tensor([[0, 0, 0, -1]]))
    assert float(all_tied) == 0.0


def test_each_prompt_weighs_the_same_however_many_pairs_it_has():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    ranks = torch.tensor([[0, 1, 2], [1, 0, -1]])
    first = objectives.kwise_ranking_loss(rewards[:1], ranks[:1])
    second = objectives.kwise_ranking_loss(rewards[1:], ranks[1:])
    both = objectives.kwise_ranking_loss(rewards, ranks)
    assert both == pytest.approx(float(first + second) / 2)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, d_model=16))


@torch.no_grad()
def test_reward_objective_starts_at_log_2_and_reads_the_end_token():
    rm = RewardModel.from_gpt(tiny_gpt())
    ids = torch.randint(0, 50, (2, 3, 10))  # (B, K, T)
    end = torch.tensor([[9, 5, 7], [3, 9, 9]])
    ranks = torch.tensor([[0, 1, 2], [0, 0, 1]])
    loss, tokens = objectives.reward_ranking(rm, (ids, end, ranks))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)  # the head starts at zero
    assert tokens == int((end + 1).sum())
    torch.nn.init.normal_(rm.head.weight)
    r = rm(ids.view(6, 10), end.view(6))
    ids2 = ids.clone()
    ids2[0, 1, 6:] = 0  # after answer 1's end: must not change its reward (causal model)
    assert rm(ids2.view(6, 10), end.view(6))[1] == pytest.approx(float(r[1]), abs=1e-6)


@torch.no_grad()
def test_dpo_loss_at_initialisation_is_log_2():
    model = tiny_gpt()
    x = torch.randint(0, 50, (3, 12))  # the 3 answers of one ranking
    y = torch.randint(0, 50, (3, 12))
    y[:, :5] = -100  # the prompt carries no target
    ref = objectives.sequence_logprobs(model, x, y)  # the reference: the same weights
    chosen, rejected = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])  # its C(3, 2) pairs
    loss, _ = objectives.dpo(model, (x, y, ref, chosen, rejected), beta=0.1)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_on_the_distinct_answers_equals_dpo_on_both_rows_of_every_pair():
    """Forwarding each answer once for all its pairs changes no pair's loss or gradient."""
    model = tiny_gpt()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # not zero: a real gradient
    x = torch.randint(0, 50, (3, 12))
    y = torch.randint(0, 50, (3, 12))
    y[:, :5] = -100
    y[2, 9:] = -100  # a shorter answer: padding carries no target either
    ref = torch.tensor([-40.0, -42.0, -39.0])
    chosen, rejected = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    got, _ = objectives.dpo(model, (x, y, ref, chosen, rejected), beta=0.1)
    g_got = torch.autograd.grad(got, model.lm_head.weight)[0]
    rows = torch.cat([chosen, rejected])  # 6 rows: the chosen answers, then the rejected ones
    want, _ = objectives.dpo(model, (x[rows], y[rows], ref[rows], torch.arange(3),
                                     torch.arange(3, 6)), beta=0.1)
    g_want = torch.autograd.grad(want, model.lm_head.weight)[0]
    assert got.item() == pytest.approx(want.item(), abs=1e-6) and got.item() != math.log(2)
    assert torch.allclose(g_got, g_want, atol=1e-6)


@torch.no_grad()
def test_dpo_with_sft_weight_adds_the_chosen_answers_mean_token_nll():
    """RPO: DPO's loss plus alpha times each pair's chosen answer's NLL per answer token, the
    NLL computed here from the full log-softmax, not through sequence_logprobs."""
    model = tiny_gpt()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    x = torch.randint(0, 50, (3, 12))
    y = torch.randint(0, 50, (3, 12))
    y[:, :5] = -100
    y[1, 8:] = -100  # answer 1 is shorter: 3 tokens, the others 7
    ref = torch.tensor([-40.0, -42.0, -39.0])
    chosen, rejected = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    plain, _ = objectives.dpo(model, (x, y, ref, chosen, rejected), beta=0.1)
    rpo, _ = objectives.dpo(model, (x, y, ref, chosen, rejected), beta=0.1, sft_weight=0.5)
    logp = model(x).log_softmax(-1)  # (3, 12, V)
    keep = y != -100
    nll = -(logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * keep).sum(1) / keep.sum(1)
    assert rpo.item() == pytest.approx(plain.item() + 0.5 * nll[chosen].mean().item(), abs=1e-5)


def test_dpo_loss_falls_as_the_chosen_answer_gains_probability():
    chosen, rejected = torch.tensor([-10.0]), torch.tensor([-12.0])
    ref_c, ref_r = torch.tensor([-11.0]), torch.tensor([-11.0])
    loss, margin = objectives.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5)
    assert float(margin) == pytest.approx(0.5 * (1 - (-1)))
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    assert float(loss) < math.log(2)


@torch.no_grad()
def test_sequence_logprobs_in_length_groups_equal_one_padded_batch():
    model = tiny_gpt()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    x = torch.randint(0, 50, (5, 12))
    y = torch.randint(0, 50, (5, 12))
    y[:, :3] = -100
    for row, end in enumerate([12, 6, 9, 4, 3]):  # the last row has no target at all
        y[row, end:] = -100
    want = objectives.sequence_logprobs(model, x, y)
    assert want[4] == 0 and want[:4].abs().min() > 0
    for groups in (2, 3, 5):
        got = objectives.sequence_logprobs(model, x, y, groups=groups)
        assert torch.allclose(got, want, atol=1e-5), groups


@torch.no_grad()
def test_sequence_logprobs_sum_the_answer_tokens_only():
    model = tiny_gpt()
    x = torch.randint(0, 50, (1, 8))
    y = torch.full((1, 8), -100)
    y[0, 5:] = torch.tensor([3, 4, 5])
    logp = torch.log_softmax(model(x), -1)[0]
    want = logp[5, 3] + logp[6, 4] + logp[7, 5]
    assert objectives.sequence_logprobs(model, x, y) == pytest.approx(float(want), abs=1e-5)
