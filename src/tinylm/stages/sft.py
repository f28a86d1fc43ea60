"""Supervised fine-tuning: a pre-trained GPT learns to answer, on conversations.

    tinylm sft --init runs/tinystories-bpe --data chats.jsonl --out runs/sft

Every conversation is rendered through the run's chat template (data/chat.py: tinylm's own
over its role tokens, or an imported model's) and the loss is the next-token loss on the
assistant's tokens only (each turn's content and its end token); system and user turns are
read, never learned. Batches are right-padded conversations (no packing). The held-out split
is scored by the same assistant-only loss (val_loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinylm import config as configlib
from tinylm import rundir, viz
from tinylm.data import chat
from tinylm.errors import UserError
from tinylm.eval.chat import assistant_loss
from tinylm.models.gpt import GPT
from tinylm.stages.common import batch_generator, prepare_run_dir
from tinylm.tokenizer import Tokenizer
from tinylm.train import objectives
from tinylm.train.loop import TrainConfig, train


@dataclass
class ChatDataConfig:
    path: str = ""  # JSONL, one {"messages": [{"role", "content"}, ...]} per line
    val_fraction: float = 0.1  # held-out conversations
    split_seed: int = 0
    eval_batch_size: int = 16


@dataclass
class SFTConfig:
    out: str = "runs/sft"
    init: str = ""  # the pre-trained GPT run to fine-tune (required)
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def run(cfg: SFTConfig, resume: bool = False) -> dict[str, Any]:
    """Fine-tune (or resume) on cfg.data.path; returns the last metrics, with val_loss (the
    held-out assistant-token loss) and val_ppl."""
    if not cfg.init:  # a resumed run's config.toml holds its init
        raise UserError("sft needs a pre-trained run: pass --init RUN (e.g. runs/tinystories-bpe)")
    if not cfg.data.path:
        raise UserError("sft needs conversations: pass --data FILE (JSONL of "
                        '{"messages": [...]} lines)')
    run_dir = prepare_run_dir(cfg.out, resume)
    source = run_dir if resume else Path(cfg.init)
    model = rundir.load_model(Path(cfg.init), family="gpt")  # resume: weights from state/
    tok = Tokenizer.load(source / rundir.TOKENIZER)
    template = rundir.chat_template(source)
    conversations = chat.read_conversations(cfg.data.path)
    train_c, held_c = chat.split(conversations, cfg.data.val_fraction, cfg.data.split_seed)
    T = model.config.block_size

    def encode(cs):
        return chat.ChatData([chat.render(tok, c, template) for c in cs], T, tok.pad_id)

    data, held = encode(train_c), encode(held_c)
    if not len(data):
        raise UserError(f"no conversation of {cfg.data.path} has an assistant token within "
                        f"the model's {T}-token window")
    print(f"sft: {len(data)} training and {len(held)} held-out conversations"
          + (f" ({data.dropped} with no assistant token in the window dropped)"
             if data.dropped else ""))

    if not resume:
        configlib.save(cfg, run_dir / "config.toml")
        rundir.save_tokenizers(run_dir, tok)
        rundir.save_chat_template(run_dir, template)

    def batch_fn(step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return data.batch(cfg.train.batch_size, batch_generator(cfg.train.seed, step, k))

    def eval_fn(m: GPT) -> dict[str, float]:
        return {"val_loss": assistant_loss(m, held, cfg.data.eval_batch_size)} if len(held) else {}

    result = train(model, objectives.causal_lm, batch_fn, cfg.train, run_dir, eval_fn,
                   resume=resume, flops_per_token=model.flops_per_token(T))
    viz.plot_metrics(run_dir)
    if "val_loss" in result:
        result["val_ppl"] = math.exp(result["val_loss"])
    return result
