"""`tinylm reward`: a reward model learns the labelers' order, through the one loop."""

from __future__ import annotations

import json

import pytest
import torch

import tinylm
from tinylm import config as configlib
from tinylm import rundir
from tinylm.cli import main
from tinylm.eval.winrate import reward_judge
from tinylm.feedback.io import read_rankings
from tinylm.feedback.preferences import RankingData, reward_metrics, split_rows
from tinylm.models.heads import RewardModel
from tinylm.stages import reward
from tinylm.tokenizer import Tokenizer

from ..feedback.tiny import tiny_chat_run, write_rows

ANIMALS = ["cat", "dog", "bird", "fox", "cow", "pig", "hen", "owl", "bee", "ant", "elk", "yak"]


def rankings() -> list[dict]:
    """A preference the model can learn from the answers alone: happy > here > sad."""
    return [{"messages": [{"role": "user", "content": f"Tell me about the {a}."}],
             "answers": [f"The {a} is sad.", f"The {a} is happy.", f"The {a} is here."],
             "ranks": [2, 0, 1]} for a in ANIMALS]


@pytest.fixture(scope="module")
def init_run(tmp_path_factory):
    return tiny_chat_run(tmp_path_factory.mktemp("reward") / "chat")


@pytest.fixture
def data(tmp_path):
    return write_rows(tmp_path / "rankings.jsonl", rankings())


def reward_cfg(init, data, out, *extra):
    return configlib.load(reward.RewardStageConfig, "reward-tinystories", [
        f"init='{init}'", f"data.path='{data}'", f"out='{out}'", "data.val_fraction=0.25",
        "train.steps=40", "train.batch_size=4", "train.progress=false", "train.eval_every=0",
        "train.dtype='float32'", "train.lr=3e-3", "train.muon_lr=0.02", *extra])


def test_reward_model_learns_the_order_of_held_out_answers(init_run, data, tmp_path):
    result = reward.run(reward_cfg(init_run, data, tmp_path / "rm"))
    assert result["val_accuracy"] >= 0.75, result  # 0.5 before training (all rewards 0)
    assert result["val_margin"] > 0 and result["val_pairs"] == 3 * 3  # 3 prompts x C(3,2)
    model, tok = tinylm.load(tmp_path / "rm")
    assert isinstance(model, RewardModel) and tok.vocab_size > 0
    meta = json.loads((tmp_path / "rm" / "model.json").read_text())
    assert meta["family"] == "reward" and meta["config"]["readout"] == "sum"  # the default
    assert meta["config"]["std"] == pytest.approx(result["reward_std"]) and result[
        "reward_std"] > 0
    rows = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r for r in rows)
    judge = reward_judge(tmp_path / "rm")  # what `eval winrate --judge reward:RUN` scores by
    row = {"messages": [{"role": "user", "content": "Tell me about the gnu."}]}
    assert judge("The gnu is happy.", row) > judge("The gnu is sad.", row)


def test_the_cli_trains_from_init_and_data(init_run, data, tmp_path, capsys):
    assert main(["reward", "--init", str(init_run), "--data", str(data), "--out",
                 str(tmp_path / "rm"), "--set", "train.steps=2", "--set",
                 "train.progress=false", "--set", "data.val_fraction=0.25"]) == 0
    out = capsys.readouterr().out
    assert "training a reward model into" in out and "held-out pairwise accuracy" in out


def test_a_heldout_file_keeps_its_prompts_out_of_training(init_run, tmp_path):
    """With data.heldout the held-out rankings are that file's, and every ranking of one of
    its prompts in data.path (here a second ranking of other answers) is left out of
    training, however many rankings are added to data.path."""
    rows = rankings()
    again = [{**r, "answers": [a.replace(" is ", " was ") for a in r["answers"]]}
             for r in rows[:3]]
    path = write_rows(tmp_path / "all.jsonl", rows + again)
    held = write_rows(tmp_path / "held.jsonl", rows[:3])
    cfg = reward_cfg(init_run, path, tmp_path / "rm", f"data.heldout='{held}'").data
    tok = Tokenizer.load(init_run / rundir.TOKENIZER)
    train_data, held_data = reward.load_rankings(cfg, tok, rundir.chat_template(init_run), 128)
    assert (len(train_data), len(held_data)) == (len(rows) - 3, 3)

    def texts(data: RankingData) -> list[str]:
        return [tok.decode(ids) for ex in data.examples for ids, _, _ in ex]

    assert all(any(f"the {a}." in t for t in texts(held_data)) for a in ANIMALS[:3])
    assert not any(f"the {a}." in t for t in texts(train_data) for a in ANIMALS[:3])
    assert sum(f"the {a}." in t for t in texts(train_data) for a in ANIMALS[3:]) == 9 * 3


def test_reward_bad_input_is_a_one_line_error(init_run, data, tmp_path, capsys, error_of):
    base = ["reward", "--init", str(init_run), "--out", str(tmp_path / "x")]
    assert "no such rankings file" in error_of(base + ["--data", str(tmp_path / "no")],
                                               capsys)
    bad = write_rows(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "a"}],
                                               "answers": ["x", "y"], "ranks": [0]}])
    assert "bad.jsonl:1" in error_of(base + ["--data", str(bad)], capsys)
    tied = write_rows(tmp_path / "tied.jsonl", [
        {"messages": [{"role": "user", "content": f"q{i}"}], "answers": ["x", "y"],
         "ranks": [0, 0]} for i in range(8)])
    assert "two differently ranked answers" in error_of(base + ["--data", str(tied)], capsys)
    assert "pass --init RUN" in error_of(["reward", "--set", "init=''", "--data", str(data),
                                          "--out", str(tmp_path / "y")], capsys)
    assert "readout='mean'" in error_of(base + ["--data", str(data), "--set",
                                                "readout='mean'"], capsys)


def test_keep_best_saves_the_best_evaluation_and_freezing_keeps_lower_weights(
        init_run, data, tmp_path):
    """The saved weights are those of the evaluation with the highest held-out accuracy (the
    loop evaluates every 5 steps), not the last step's; frozen blocks keep their SFT weights.
    (Read at the end token, the other read-out, which the reloaded model keeps.)"""
    out = tmp_path / "rm"
    result = reward.run(reward_cfg(init_run, data, out, "train.eval_every=5",
                                   "freeze_layers=1", "dropout=0.1", "readout='end'"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    accs = [r["val_accuracy"] for r in rows if "val_accuracy" in r]
    assert len(accs) == 8 and result["val_accuracy"] == max(accs)
    assert result["best_step"] == 5 * (accs.index(max(accs)) + 1)
    model, tok = tinylm.load(out, family="reward")
    model.eval()
    _, held_rows = split_rows(read_rankings(data), 0.25, 0)
    held = RankingData(held_rows, tok, rundir.chat_template(out), model.config.block_size)
    with torch.no_grad():  # the saved weights score the held-out pairs as the best eval did
        assert reward_metrics(model, held, 8)["val_accuracy"] == pytest.approx(max(accs))
    sft, _ = tinylm.load(init_run, family="gpt")

    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(),
                                                     strict=True))

    assert same(model.backbone.blocks[0], sft.blocks[0])
    assert same(model.backbone.tok_emb, sft.tok_emb)
    assert not same(model.backbone.blocks[-1], sft.blocks[-1])
    config = json.loads((out / "model.json").read_text())["config"]
    assert config["backbone"]["dropout"] == 0 and config["readout"] == "end"



@pytest.mark.parametrize("readout", ["sum", "end"])
def test_packed_batches_score_answers_as_the_plain_batch_does(init_run, readout):
    """A batch with each prompt laid out once (layers.Packed) gives every answer the reward
    the plain batch gives it, missing answers included, on fewer positions."""
    model, tok = tinylm.load(init_run, family="gpt")
    rm = RewardModel.from_gpt(model, readout)
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    rows = read_rankings(write_rows(init_run.parent / "packed.jsonl", rankings()[:4] + [
        {"messages": [{"role": "user", "content": "Tell me about the emu."}],
         "answers": ["The emu runs.", "The emu is here."], "ranks": [0, 1]}]))  # K = 2 of 3
    data = RankingData(rows, tok, rundir.chat_template(init_run), model.config.block_size)
    ids, end, ranks, packed = data.collate(range(len(data)))
    B, K, T = ids.shape
    with torch.no_grad():
        plain = rm(ids.view(B * K, T), end.view(-1)).view(B, K)
        got = rm(ids.view(B * K, T), end.view(-1), packed).view(B, K)
    present = ranks >= 0
    assert int((~present).sum()) == 1
    assert torch.allclose(got[present], plain[present], atol=1e-4)
    assert packed.tokens < int((ids != tok.pad_id).sum())
