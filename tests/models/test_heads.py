"""The reward model's read-outs (models/heads.py): where the score is read, and what it sees."""

from __future__ import annotations

import pytest
import torch

from tinylm import rundir
from tinylm.models.gpt import GPTConfig
from tinylm.models.heads import RewardConfig, RewardModel


def tiny(readout: str, seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    backbone = GPTConfig(vocab_size=40, block_size=24, n_layer=2, n_head=2, d_model=32,
                         zero_init=False)
    model = RewardModel(RewardConfig(backbone=backbone, readout=readout))
    torch.nn.init.normal_(model.head.weight)  # a head at zero would make every reward 0
    return model.eval()


PROMPT = [3, 4, 5, 6]
ANSWERS = [[7, 8, 9, 2], [10, 2], [11, 12, 13, 14, 15, 2]]  # 2: the end-of-answer token


def rows(pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt + each answer, right-padded with `pad` extra pad tokens; end positions."""
    seqs = [PROMPT + a for a in ANSWERS]
    T = max(map(len, seqs)) + pad
    ids = torch.ones((len(seqs), T), dtype=torch.long)  # 1: padding
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) - 1 for s in seqs])  # (N, T), (N,)


@torch.no_grad()
def test_end_readout_is_the_head_at_the_end_token():
    model = tiny("end")
    ids, end = rows()
    assert torch.allclose(model(ids, end), model.values(ids)[torch.arange(3), end])


@torch.no_grad()
def test_sum_readout_adds_the_head_up_to_the_end_token_and_ignores_padding():
    model = tiny("sum")
    ids, end = rows()
    v = model.values(ids)  # (N, T)
    want = torch.stack([v[i, : e + 1].sum() for i, e in enumerate(end.tolist())])
    assert torch.allclose(model(ids, end), want, atol=1e-5)
    more, _ = rows(pad=5)  # more padding after the end changes nothing
    assert torch.allclose(model(more, end), model(ids, end), atol=1e-5)


@torch.no_grad()
def test_sum_readout_orders_answers_of_one_prompt_by_their_own_tokens():
    """The prompt's positions add the same constant to every answer of the prompt (a causal
    backbone gives them the same states), so a difference of rewards is a difference of the
    answers' per-token sums, whatever the prompt's own values are."""
    model = tiny("sum")
    ids, end = rows()
    v = model.values(ids)  # (N, T)
    P = len(PROMPT)
    assert torch.allclose(v[:, :P], v[:1, :P].expand(3, P), atol=1e-5)
    r = model(ids, end)
    answer_sums = torch.stack([v[i, P: e + 1].sum() for i, e in enumerate(end.tolist())])
    assert torch.allclose(r - r[0], answer_sums - answer_sums[0], atol=1e-4)
    assert not torch.allclose(r, answer_sums, atol=1e-3)  # the prompt's constant is there


def test_the_readout_is_saved_and_old_runs_without_one_read_at_the_end(tmp_path):
    model = tiny("sum")
    rundir.save_model(tmp_path / "new", model)
    loaded = rundir.load_model(tmp_path / "new", family="reward")
    ids, end = rows()
    with torch.no_grad():
        assert loaded.config.readout == "sum"
        assert torch.allclose(loaded.eval()(ids, end), model(ids, end), atol=1e-5)
    assert RewardConfig().readout == "end"  # what a model.json from before the key means
    with pytest.raises(ValueError, match="readout"):
        RewardConfig(readout="mean")
