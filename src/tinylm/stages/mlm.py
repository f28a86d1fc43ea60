"""Masked-LM pre-training: a bidirectional encoder (BERT) learns to fill in hidden tokens.

The data path is pre-training's: one token stream cut into random windows of block_size
tokens (the last val_fraction held out); each window is then masked by BERT's recipe, from the
same per-step generator that picked it, so --resume replays batches and masks exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tinylm import config as configlib
from tinylm import viz
from tinylm.data.mlm import Masker, MaskingConfig
from tinylm.data.tokens import DataConfig
from tinylm.errors import UserError
from tinylm.eval.mlm import mlm_metrics
from tinylm.models.bert import BertConfig, BertModel
from tinylm.stages.common import (
    batch_generator,
    build_or_init,
    prepare_run_dir,
    prepare_tokens,
)
from tinylm.train import objectives
from tinylm.train.loop import TrainConfig, train


def _default_data() -> DataConfig:
    # Word-sized candidates in fill-mask need BPE tokens; a character model fills in letters.
    return DataConfig(corpus="tinystories", tokenizer="bpe", vocab_size=4096)


@dataclass
class MLMConfig:
    out: str = "runs/bert"
    init: str = ""  # start from this BERT run's weights and tokenizer instead of from scratch
    model: BertConfig = field(default_factory=BertConfig)
    data: DataConfig = field(default_factory=_default_data)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def run(cfg: MLMConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) the masked LM described by `cfg`; returns the last metrics, with
    val_loss, val_ppl and val_acc (held-out masked-token accuracy) from the final eval."""
    run_dir = prepare_run_dir(cfg.out, resume)
    tok, data = prepare_tokens(run_dir, cfg.data, cfg.init, resume)
    if tok.pad_id != cfg.model.pad_id:
        raise UserError(f"model.pad_id={cfg.model.pad_id} is not the tokenizer's padding "
                        f"id {tok.pad_id}; leave it at its default")
    model, cfg.model = build_or_init(cfg.model, BertModel, cfg.init, tok, cfg.train.seed)
    T = cfg.model.block_size
    data.check_block(T)
    masker = Masker(tok, cfg.masking)

    if not resume:
        configlib.save(cfg, run_dir / "config.toml")
        tok.save(run_dir / "tokenizer.json")

    def batch_fn(step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = batch_generator(cfg.train.seed, step, k)
        windows, _ = data.batch(cfg.train.batch_size, T, gen)  # (B, T); next-token half unused
        return masker(windows, gen)

    def eval_fn(m: BertModel) -> dict[str, float]:
        windows = (x for x, _ in data.val_batches(cfg.data.eval_batch_size, T))
        return mlm_metrics(m, windows, masker, cfg.masking.eval_seed, cfg.data.eval_tokens)

    result = train(model, objectives.masked_lm, batch_fn, cfg.train, run_dir, eval_fn=eval_fn,
                   resume=resume, flops_per_token=model.flops_per_token(T))
    viz.plot_metrics(run_dir)
    return result
