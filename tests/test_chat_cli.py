"""`tinylm chat` driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

import json
import sys

import pexpect
import pytest

from tinylm import config as configlib
from tinylm.stages import pretrain, sft
from tinylm.stages.pretrain import PretrainConfig

from .conftest import TINY_OVERRIDES
from .stages.test_sft import conversations


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(m["content"] + " " for c in conversations()
                              for m in c["messages"]) * 10)
    pretrain.run(configlib.load(PretrainConfig, None, [
        f"out='{root / 'pre'}'", f"data.corpus='{corpus}'", *TINY_OVERRIDES,
        "model.block_size=96", "train.steps=40"]))
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in conversations()))
    sft.run(configlib.load(sft.SFTConfig, "sft-tinystories", [
        f"init='{root / 'pre'}'", f"data.path='{chats}'", f"out='{root / 'sft'}'",
        "train.steps=80", "train.batch_size=8", "train.progress=false",
        "train.dtype='float32'", "train.lr=3e-3", "train.muon_lr=0.02"]))
    return root


def spawn(run) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "tinylm", "chat", "--run", str(run),
                                           "--temperature", "0", "--max-new-tokens", "24",
                                           "--system", "Answer in one sentence."],
                          encoding="utf-8", timeout=60, env={"TINYLM_KERNELS": "0",
                                                             "OMP_NUM_THREADS": "1",
                                                             "PATH": "/usr/bin:/bin"})
    child.expect("you> ")
    return child


def answer(child, text: str) -> str:
    child.sendline(text)
    child.expect("assistant> ")
    child.expect("you> ")
    return child.before.strip()


def test_chat_answers_remembers_and_obeys_commands(chat_run):
    child = spawn(chat_run / "sft")
    first = answer(child, "Where is the cat?")
    assert first.startswith("The cat is in the"), first  # learned from the dialogues
    child.sendline("/explain")
    child.expect("runners-up")
    child.expect("you> ")
    assert "'c'" in child.before and "'<|end|>'" in child.before  # one row per token
    child.sendline("/temperature hot")
    child.expect("error: /temperature takes a number")
    child.expect("you> ")
    child.sendline("/reset")
    child.expect(r"\(the conversation is forgotten\)")
    child.expect("you> ")
    assert answer(child, "Where is the cat?") == first  # greedy, same empty history
    child.sendline("/system Be brief.")
    child.expect("system message: 'Be brief.'")
    child.expect("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_program(chat_run):
    child = spawn(chat_run / "sft")
    child.sendline("Where is the dog?")
    child.expect("assistant> ")
    child.sendintr()  # at once: the answer is cut, or had already ended
    child.expect("you> ")
    assert answer(child, "Where is the fox?")  # the program is still there
    child.sendeof()
    child.expect(pexpect.EOF)


def test_a_pretrained_run_is_refused_with_the_fix(chat_run, capsys, error_of):
    err = error_of(["chat", "--run", str(chat_run / "pre")], capsys)
    assert "has no chat template" in err and "tinylm sft --init" in err
