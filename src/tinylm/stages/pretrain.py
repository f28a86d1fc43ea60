"""Pre-training: next-token prediction on raw text (GPT)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tinylm import config as configlib
from tinylm import viz
from tinylm.data.tokens import DataConfig, TokenData
from tinylm.models.gpt import GPT, GPTConfig
from tinylm.stages.common import (
    batch_generator,
    build_or_init,
    prepare_run_dir,
    prepare_tokens,
)
from tinylm.train import objectives
from tinylm.train.loop import TrainConfig, train


@dataclass
class PretrainConfig:
    out: str = "runs/gpt"
    init: str = ""  # start from this run's weights and tokenizer instead of from scratch
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def val_loss(model: GPT, data: TokenData, cfg: DataConfig, T: int) -> float:
    """Mean next-token loss over the validation split (token-weighted)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in data.val_batches(cfg.eval_batch_size, T):
        total += model(x.to(device), y.to(device)).item() * y.numel()
        count += y.numel()
        if cfg.eval_tokens and count >= cfg.eval_tokens:
            break
    return total / max(count, 1)


def run(cfg: PretrainConfig, resume: bool = False) -> dict[str, Any]:
    """Pre-train (or resume) the GPT described by `cfg`; returns the last metrics, with
    val_loss and val_ppl from the final eval."""
    run_dir = prepare_run_dir(cfg.out, resume)
    tok, data = prepare_tokens(run_dir, cfg.data, cfg.init, resume)
    model, cfg.model = build_or_init(cfg.model, GPT, cfg.init, tok, cfg.train.seed)
    T = cfg.model.block_size
    data.check_block(T)

    if not resume:
        configlib.save(cfg, run_dir / "config.toml")
        tok.save(run_dir / "tokenizer.json")

    def batch_fn(step: int, k: int):
        return data.batch(cfg.train.batch_size, T, batch_generator(cfg.train.seed, step, k))

    result = train(model, objectives.causal_lm, batch_fn, cfg.train, run_dir,
                   eval_fn=lambda m: {"val_loss": val_loss(m, data, cfg.data, T)},
                   resume=resume, flops_per_token=model.flops_per_token(T))
    viz.plot_metrics(run_dir)
    if "val_loss" in result:
        result["val_ppl"] = math.exp(result["val_loss"])
    return result
