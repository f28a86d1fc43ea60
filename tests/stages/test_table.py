"""The stage table: every stage runs on a tiny config through the same entry point, and the
CLI's training commands are the table's."""

from __future__ import annotations

import json

import pytest

from tinylm import config as configlib
from tinylm.cli import build_parser
from tinylm.stages import STAGES

from ..feedback.tiny import story_rows, tiny_chat_run, write_rows

COMMON = ["train.steps=3", "train.batch_size=4", "train.warmup_steps=1",
          "train.progress=false", "train.dtype=float32"]
STACK = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.block_size=16"]
# Each stage's tiny shape; a stage added to the table without one here fails the test below.
TINY = {
    "pretrain": STACK + ["data.corpus={corpus}"],
    "mlm": STACK + ["data.corpus={corpus}", "data.vocab_size=300"],
    "seq2seq": ["transformer.n_layer=1", "transformer.n_head=2", "transformer.d_model=32",
                "data.pairs={pairs}", "data.val_fraction=0.25", "decode.beam_size=1",
                "decode.samples=1"],
    "sft": ["init='{init}'", "data.path='{chats}'", "data.val_fraction=0.25"],
    "reward": ["init='{init}'", "data.path='{rankings}'", "data.val_fraction=0.25"],
    "dpo": ["init='{init}'", "data.path='{rankings}'", "data.val_fraction=0.25"],
    "ppo": ["init='{init}'", "reward='{rm}'", "data.prompts='{prompts}'",
            "ppo.prompts_per_step=2", "ppo.k=2", "ppo.max_new_tokens=8", "data.eval_prompts=0",
            "train.batch_size=2"],
}
NEEDS_CHAT_RUN = ("sft", "reward", "dpo", "ppo")  # fine-tuning stages start from a chat run


def test_every_stage_has_a_tiny_config():
    assert set(TINY) == set(STAGES)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_runs_on_a_tiny_config(name, tiny_corpus, tmp_path):
    stage = STAGES[name]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("I am cold.\tJ'ai froid.\nGo.\tVa !\nHi.\tSalut.\nRun!\tCours !\n" * 5)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Hi {i}."},
        {"role": "assistant", "content": "The cat."}]}) + "\n" for i in range(8)))
    init, rm = tmp_path / "init", tmp_path / "rm"
    rankings = write_rows(tmp_path / "rankings.jsonl", [
        {"messages": r["messages"][:1], "answers": [r["messages"][1]["content"], "No.", "A cat."],
         "ranks": [0, 2, 1]} for r in story_rows()])
    prompts = write_rows(tmp_path / "prompts.jsonl", story_rows())
    if name in NEEDS_CHAT_RUN:
        tiny_chat_run(init, tiny_corpus)
    if name == "ppo":  # PPO scores answers with a reward model trained first
        STAGES["reward"].run(configlib.load(STAGES["reward"].config_cls, "reward-tinystories", [
            f"init='{init}'", f"data.path='{rankings}'", f"out='{rm}'", *COMMON]))
    sets = [s.format(corpus=tiny_corpus, pairs=pairs, chats=chats, init=init, rm=rm,
                     rankings=rankings, prompts=prompts) for s in TINY[name]] + COMMON
    cfg = configlib.load(stage.config_cls, stage.preset, sets + [f"out='{tmp_path / 'run'}'"])
    metrics = stage.run(cfg)
    assert metrics["step"] == 3
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["weights"]["size"] > 0
    assert (tmp_path / "run" / "config.toml").is_file()
    again = stage.run(cfg, resume=True)  # every stage resumes alike; here nothing is left
    assert again["step"] == 3


def test_the_cli_builds_a_training_command_per_stage():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, stage in STAGES.items():
        assert sub.choices[name].get_default("config") == stage.preset
