"""Reward model: the SFT backbone with a scalar head learns to order answers as labelers did.

    tinylm reward --init runs/sft-tinystories --data rankings.jsonl --out runs/reward

Reads K-wise rankings (`tinylm feedback export`) or TRL pairs (a ranking of K = 2); every
answer is rendered through the init run's chat template and scored at its end-of-answer token
(models/heads.py). The loss is InstructGPT's: all C(K, 2) ordered pairs of a prompt, kept
together in one batch element, ties skipped (train/objectives.py). A micro-batch is
`train.batch_size` prompts, so K x batch_size sequences.

Held out by prompt (data.val_fraction): pairwise accuracy (`val_accuracy`) and mean margin
(`val_margin`) at every evaluation. After training, the mean and standard deviation of the
rewards over the training answers go into the model's config (model.json), for normalising.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinylm import config as configlib
from tinylm import rundir, viz
from tinylm.errors import UserError
from tinylm.feedback.io import read_rankings
from tinylm.feedback.preferences import RankingData, reward_metrics, reward_stats, split_rows
from tinylm.models.heads import RewardModel
from tinylm.stages.common import batch_generator, prepare_run_dir
from tinylm.tokenizer import Tokenizer
from tinylm.train import objectives
from tinylm.train.loop import TrainConfig, train


@dataclass
class RankingDataConfig:
    path: str = ""  # rankings JSONL (tinylm feedback export) or TRL pairs JSONL
    val_fraction: float = 0.1  # held-out prompts
    split_seed: int = 0
    eval_batch_size: int = 8  # prompts per evaluation batch


@dataclass
class RewardStageConfig:
    out: str = "runs/reward"
    init: str = ""  # the SFT run whose backbone the reward model starts from (required)
    data: RankingDataConfig = field(default_factory=RankingDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_rankings(cfg: RankingDataConfig, tok: Tokenizer, template: str, block_size: int
                  ) -> tuple[RankingData, RankingData]:
    """(train, held-out) RankingData from cfg.path, split by prompt."""
    rows = read_rankings(cfg.path)
    train_rows, held_rows = split_rows(rows, cfg.val_fraction, cfg.split_seed)
    data = RankingData(train_rows, tok, template, block_size)
    held = RankingData(held_rows, tok, template, block_size)
    if not len(data):
        raise UserError(f"no ranking of {cfg.path} has two differently ranked answers that fit "
                        f"the model's {block_size}-token window")
    return data, held


def run(cfg: RewardStageConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) a reward model; returns the last metrics with val_accuracy,
    val_margin, reward_mean and reward_std."""
    if not cfg.init:
        raise UserError("reward needs the SFT run to start from: pass --init RUN")
    if not cfg.data.path:
        raise UserError("reward needs rankings: pass --data FILE (from `tinylm feedback "
                        "export`, or TRL pairs JSONL)")
    run_dir = prepare_run_dir(cfg.out, resume)
    source = run_dir if resume else Path(cfg.init)
    model = RewardModel.from_gpt(rundir.load_model(Path(cfg.init), family="gpt"))
    tok = Tokenizer.load(source / rundir.TOKENIZER)
    template = rundir.chat_template(source, required=True)
    data, held = load_rankings(cfg.data, tok, template, model.config.block_size)
    print(f"reward: {len(data)} training rankings ({data.n_pairs()} ordered pairs), "
          f"{len(held)} held-out ({held.n_pairs()} pairs)"
          + (f"; dropped {data.dropped_answers + held.dropped_answers} answers too long for "
             f"the window" if data.dropped_answers + held.dropped_answers else ""))
    if not resume:
        configlib.save(cfg, run_dir / "config.toml")
        rundir.save_tokenizers(run_dir, tok)
        rundir.save_chat_template(run_dir, template)

    def batch_fn(step: int, k: int):
        return data.batch(cfg.train.batch_size, batch_generator(cfg.train.seed, step, k))

    def eval_fn(m: RewardModel) -> dict[str, float]:
        return reward_metrics(m, held, cfg.data.eval_batch_size) if len(held) else {}

    T = model.config.block_size
    result = train(model, objectives.reward_ranking, batch_fn, cfg.train, run_dir, eval_fn,
                   resume=resume, flops_per_token=model.flops_per_token(T))
    model.eval()
    with torch.no_grad():
        model.config.mean, model.config.std = reward_stats(model, data,
                                                           cfg.data.eval_batch_size)
    rundir.save_model(run_dir, model)  # with the normalisers in model.json
    viz.plot_metrics(run_dir)
    result |= {"reward_mean": model.config.mean, "reward_std": model.config.std}
    if "val_accuracy" in result:
        print(f"reward: held-out pairwise accuracy {result['val_accuracy']:.3f}, margin "
              f"{result['val_margin']:.3f} over {int(result['val_pairs'])} pairs")
    print(f"reward: rewards on the training answers: mean {model.config.mean:.3f}, std "
          f"{model.config.std:.3f} (in {run_dir / rundir.META})")
    return result
