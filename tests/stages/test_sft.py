"""`tinylm sft`: assistant-only fine-tuning of a pre-trained run on conversations."""

from __future__ import annotations

import json

import pytest

from tinylm import config as configlib
from tinylm import rundir
from tinylm.cli import main
from tinylm.data import chat
from tinylm.eval.chat import assistant_loss
from tinylm.stages import pretrain, sft
from tinylm.stages.pretrain import PretrainConfig
from tinylm.tokenizer import Tokenizer

from ..conftest import TINY_OVERRIDES

ANIMALS = ["cat", "dog", "bird", "fox", "cow", "pig", "hen", "owl", "bee", "ant"]
PLACES = ["park", "mat", "tree", "ball", "house"]


def conversations() -> list[dict]:
    rows = []
    for a in ANIMALS:
        for p in PLACES:
            rows.append({"messages": [
                {"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": f"Where is the {a}?"},
                {"role": "assistant", "content": f"The {a} is in the {p}."}]})
    return rows


@pytest.fixture
def chats(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations()))
    return path


@pytest.fixture
def init_run(tiny_corpus, tmp_path):
    out = tmp_path / "pre"
    pretrain.run(configlib.load(PretrainConfig, None, [f"out='{out}'",
                                                       f"data.corpus='{tiny_corpus}'",
                                                       *TINY_OVERRIDES, "model.block_size=64",
                                                       "train.steps=30"]))
    return out


def sft_cfg(init, chats, out, *extra):
    return configlib.load(sft.SFTConfig, "sft-tinystories", [
        f"init='{init}'", f"data.path='{chats}'", f"out='{out}'", "data.val_fraction=0.2",
        "train.steps=60", "train.batch_size=8", "train.progress=false", "train.eval_every=0",
        "train.dtype='float32'", "train.lr=3e-3", "train.muon_lr=0.02", *extra])


def test_sft_lowers_the_held_out_assistant_loss(init_run, chats, tmp_path):
    cfg = sft_cfg(init_run, chats, tmp_path / "sft")
    tok = Tokenizer.load(init_run / "tokenizer.json")
    _, held = chat.split(chat.read_conversations(chats), 0.2, 0)
    held_data = chat.ChatData([chat.render(tok, c) for c in held], 64, tok.pad_id)
    model, _ = rundir.load(init_run)
    before = assistant_loss(model, held_data, 16)
    result = sft.run(cfg)
    assert result["val_loss"] < before - 1.0, (before, result["val_loss"])
    assert rundir.chat_template(tmp_path / "sft") == chat.TEMPLATE
    assert (tmp_path / "sft" / "chat_template.jinja").is_file()


def test_the_cli_takes_data_and_init(init_run, chats, tmp_path, capsys):
    assert main(["sft", "--init", str(init_run), "--data", str(chats), "--out",
                 str(tmp_path / "sft"), "--set", "train.steps=3", "--set",
                 "train.progress=false"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning on conversations into" in out and "45 training and 5 held-out" in out


def test_sft_without_data_or_init_is_a_one_line_error(init_run, chats, tmp_path, capsys,
                                                      error_of):
    err = error_of(["sft", "--init", str(init_run), "--set", "data.path=''", "--out",
                    str(tmp_path / "a")], capsys)
    assert "pass --data FILE" in err
    err = error_of(["sft", "--init", str(init_run), "--data", str(tmp_path / "none.jsonl"),
                    "--out", str(tmp_path / "a2")], capsys)
    assert "no such chat file" in err and "tinylm data make-chat" in err
    err = error_of(["sft", "--set", "init=''", "--data", str(chats), "--out",
                    str(tmp_path / "b")], capsys)
    assert "pass --init RUN" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    err = error_of(["sft", "--init", str(init_run), "--data", str(bad), "--out",
                    str(tmp_path / "c")], capsys)
    assert "bad.jsonl:1: the conversation has no assistant turn" in err


def test_eval_chat_scores_held_out_requests_through_the_template(init_run, chats, tmp_path,
                                                                  capsys):
    sft.run(sft_cfg(init_run, chats, tmp_path / "sft", "train.steps=5"))
    rows = [{"messages": [{"role": "user", "content": f"Tell me a story about a girl named {n} "
                                                      f"and a {o}."},
                          {"role": "assistant", "content": f"{n} had a {o}."}],
             "task": "story", "name": n, "object": o} for n, o in (("Mia", "kite"),
                                                                   ("Sue", "ball"))]
    rows.append({"messages": [{"role": "user", "content": "Translate to French: I am cold."},
                              {"role": "assistant", "content": "J'ai froid."}],
                 "task": "translate", "refs": ["J'ai froid."]})
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["eval-chat", "--run", str(tmp_path / "sft"), "--data", str(held)]) == 0
    out = capsys.readouterr().out
    m = json.loads(out.splitlines()[-1])
    assert (m["stories"], m["translations"]) == (2, 1)
    assert m["request_following"] == out.count("[ok]") / 2  # the guideline rule's verdicts
    model, tok = rundir.load(tmp_path / "sft")
    data = chat.ChatData([chat.render(tok, r["messages"]) for r in rows], 64, tok.pad_id)
    assert abs(m["assistant_loss"] - assistant_loss(model, data, 16)) < 1e-4
    assert main(["eval-chat", "--run", str(init_run), "--plain", "--data", str(held)]) == 0
    plain = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert "assistant_loss" not in plain and plain["stories"] == 2
