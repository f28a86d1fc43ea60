"""Reward model: the SFT backbone with a scalar head learns to order answers as labelers did.

    tinylm reward --init runs/sft-tinystories --data rankings.jsonl --out runs/reward

Reads K-wise rankings (`tinylm feedback export`) or TRL pairs (a ranking of K = 2); every
answer is rendered through the init run's chat template and scored at its end-of-answer token
(models/heads.py). The loss is InstructGPT's: all C(K, 2) ordered pairs of a prompt, kept
together in one batch element, ties skipped (train/objectives.py). A micro-batch is
`train.batch_size` prompts, so K x batch_size sequences.

Held out by prompt (data.val_fraction, or the rankings of data.heldout): pairwise accuracy
(`val_accuracy`) and mean margin (`val_margin`) at every evaluation. After training, the
mean and standard deviation of the rewards over the training answers go into the model's
config (model.json), for normalising.

Against overfitting (a few hundred prompts are learnt by heart long before the rule is):
- `keep_best`: the weights of the evaluation with the best held-out accuracy are the ones
  saved (early stopping without stopping: the LR schedule still runs to its end, so the
  choice never changes what the later steps do). The resume state keeps the last step's
  weights; a resumed run chooses among the evaluations it ran itself.
- `freeze_layers`: the token embeddings and the first N transformer blocks keep their SFT
  weights (the optimizer never sees them), so fewer weights can fit the training prompts.
- `dropout`: dropout in the backbone while training (off at every evaluation, and saved as
  0 in model.json, since whoever loads the reward model only reads it).
- `data.heldout`: a rankings file held out instead of a share of `data.path`, its prompts
  removed from training, so that rankings added to `data.path` keep the held-out set.

The read-out (`readout`, models/heads.py) is the head summed over every position up to the
end-of-answer token, not the head at that token alone: on the `request` rankings the model
read at one token learnt answer-only features (its rewards for an answer under its own and
under another request correlate 0.82, the labeler's 0.18) and reached 0.715; the summed
read-out, which can credit the token where the requested name or object occurs, reached
0.775 on the same data (docs/rlhf.md, "Why the reward model plateaued").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinylm import config as configlib
from tinylm import rundir, viz
from tinylm.errors import UserError
from tinylm.feedback.io import RankingRow, read_rankings
from tinylm.feedback.preferences import (
    RankingData,
    chat_key,
    reward_metrics,
    reward_stats,
    split_rows,
)
from tinylm.models.heads import READOUTS, RewardModel
from tinylm.stages.common import BestWeights, batch_generator, prepare_run_dir
from tinylm.tokenizer import Tokenizer
from tinylm.train import objectives
from tinylm.train.loop import TrainConfig, train


@dataclass
class RankingDataConfig:
    path: str = ""  # rankings JSONL (tinylm feedback export) or TRL pairs JSONL
    val_fraction: float = 0.1  # held-out prompts
    split_seed: int = 0
    heldout: str = ""  # rankings JSONL held out instead of a share of `path`: every prompt
    # in it is left out of training, so rankings added to `path` keep one held-out set
    eval_batch_size: int = 8  # prompts per evaluation batch
    pack: bool = True  # a batch's answers to one prompt share its positions (layers.Packed):
    # the same numbers on fewer positions; false: the plain right-padded batch


@dataclass
class RewardStageConfig:
    out: str = "runs/reward"
    init: str = ""  # the SFT run whose backbone the reward model starts from (required)
    keep_best: bool = True  # save the weights of the best held-out evaluation
    freeze_layers: int = 0  # token embeddings + this many lowest blocks stay frozen
    dropout: float = 0.0  # backbone dropout while training
    readout: str = "sum"  # "sum": the head summed over every position up to the
    # end-of-answer token; "end": the head at that token alone (models/heads.py)
    data: RankingDataConfig = field(default_factory=RankingDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.freeze_layers < 0 or not 0 <= self.dropout < 1:
            raise ValueError("freeze_layers must be >= 0 and dropout in [0, 1)")
        if self.readout not in READOUTS:
            raise ValueError(f"readout={self.readout!r}: use one of {', '.join(READOUTS)}")


def freeze_lower(model: RewardModel, n_layers: int) -> int:
    """Freeze the token embeddings and the first `n_layers` blocks; returns the number of
    weights left to train."""
    gpt = model.backbone
    if n_layers > len(gpt.blocks):
        raise UserError(f"freeze_layers={n_layers}: the model has only {len(gpt.blocks)} "
                        "blocks")
    if n_layers:
        for module in [gpt.tok_emb, *gpt.blocks[:n_layers]]:
            module.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Every dropout of `model` (and its config) at p."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
    model.config.backbone = dataclasses.replace(model.config.backbone, dropout=p)


def split_rankings(cfg: RankingDataConfig) -> tuple[list[RankingRow], list[RankingRow]]:
    """(train, held-out) rows of cfg.path, split by prompt; with cfg.heldout, that file's
    rows are the held-out ones and every row of cfg.path with one of its prompts is left out."""
    rows = read_rankings(cfg.path)
    if not cfg.heldout:
        return split_rows(rows, cfg.val_fraction, cfg.split_seed)
    held_rows = read_rankings(cfg.heldout)
    held_keys = {chat_key(r.messages) for r in held_rows}
    return [r for r in rows if chat_key(r.messages) not in held_keys], held_rows


def load_rankings(cfg: RankingDataConfig, tok: Tokenizer, template: str, block_size: int
                  ) -> tuple[RankingData, RankingData]:
    """(train, held-out) RankingData of `split_rankings`."""
    train_rows, held_rows = split_rankings(cfg)
    if cfg.heldout:
        print(f"reward: held out the {len(held_rows)} rankings of {cfg.heldout}; "
              f"{len(train_rows)} of {cfg.path} train")
    data = RankingData(train_rows, tok, template, block_size, cfg.pack)
    held = RankingData(held_rows, tok, template, block_size, cfg.pack)
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
    gpt = rundir.load_model(Path(cfg.init), family="gpt")
    gpt.config = dataclasses.replace(gpt.config, dropout=cfg.dropout)
    model = RewardModel.from_gpt(gpt, cfg.readout)  # a fresh GPT: dropout modules at p
    trainable = freeze_lower(model, cfg.freeze_layers)
    tok = Tokenizer.load(source / rundir.TOKENIZER)
    template = rundir.chat_template(source, required=True)
    data, held = load_rankings(cfg.data, tok, template, model.config.block_size)
    print(f"reward: {len(data)} training rankings ({data.n_pairs()} ordered pairs), "
          f"{len(held)} held-out ({held.n_pairs()} pairs); {trainable:,} weights trained; "
          f"read-out {cfg.readout}"
          + (f"; dropped {data.dropped_answers + held.dropped_answers} answers too long for "
             f"the window" if data.dropped_answers + held.dropped_answers else ""))
    if not resume:
        configlib.save(cfg, run_dir / "config.toml")
        rundir.save_tokenizers(run_dir, tok)
        rundir.save_chat_template(run_dir, template)

    def batch_fn(step: int, k: int):
        return data.batch(cfg.train.batch_size, batch_generator(cfg.train.seed, step, k))

    best = BestWeights("val_accuracy")

    def eval_fn(m: RewardModel) -> dict[str, float]:
        metrics = reward_metrics(m, held, cfg.data.eval_batch_size) if len(held) else {}
        best.offer(m, metrics)
        return metrics

    T = model.config.block_size
    result = train(model, objectives.reward_ranking, batch_fn, cfg.train, run_dir, eval_fn,
                   resume=resume, flops_per_token=model.flops_per_token(T))
    if cfg.keep_best and (kept := best.restore(model, run_dir)) is not None:
        last_accuracy = result.get("val_accuracy", kept["val_accuracy"])
        result |= kept | {"last_val_accuracy": last_accuracy}
        print(f"reward: keeping the weights of step {kept['best_step']} (best held-out "
              f"accuracy {kept['val_accuracy']:.3f}; the last step's {last_accuracy:.3f})")
    set_dropout(model, 0.0)
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
