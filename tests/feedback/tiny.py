"""A tiny chat run and story requests for the RLHF tests (feedback/, stages/ reward and dpo)."""

from __future__ import annotations

import json
from pathlib import Path

from tinylm import config as configlib
from tinylm import rundir
from tinylm.data import chat
from tinylm.stages import pretrain
from tinylm.stages.pretrain import PretrainConfig

from ..conftest import TINY_OVERRIDES, TINY_TEXT

NAMES = ["Lily", "Tom", "Sue", "Ben", "Max", "Mia"]
OBJECTS = ["ball", "kite", "cake", "hat", "box"]


def story_rows() -> list[dict]:
    """make-chat-shaped story rows: a request, an answer, task/name/object fields."""
    return [{"messages": [
        {"role": "user", "content": f"Tell me a story about a girl named {n} and a {o}."},
        {"role": "assistant", "content": f"{n} had a {o}. She liked it."}],
        "task": "story", "name": n, "object": o} for n in NAMES for o in OBJECTS]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_chat_run(out: Path, corpus: Path | None = None) -> Path:
    """A 2-layer char-level GPT with a 128-token window and tinylm's chat template (trained
    for a few steps: its answers are noise, which is all the plumbing tests need)."""
    if corpus is None:
        corpus = out.parent / "tiny-corpus.txt"
        corpus.write_text(TINY_TEXT)
    pretrain.run(configlib.load(PretrainConfig, None, [
        f"out='{out}'", f"data.corpus='{corpus}'", *TINY_OVERRIDES, "model.block_size=128",
        "train.steps=3"]))
    rundir.save_chat_template(out, chat.TEMPLATE)
    return out
