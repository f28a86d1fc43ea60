"""Direct Preference Optimization: the SFT model learns from rankings without a reward model.

    tinylm dpo --init runs/sft-tinystories --data rankings.jsonl --out runs/dpo

Every ordered pair of every ranking (ties skipped) is one (chosen, rejected) example; both
answers are rendered through the init run's chat template and scored by their summed
log-probabilities over the answer's tokens (content and end token). The loss is DPO's sigmoid
loss with `beta` (train/objectives.py), against a frozen reference: the --init run.

How it departs from the textbook algorithm (Rafailov et al. 2023) and from TRL's default:
- The reference's log-probabilities are computed once, before training, for every pair (TRL's
  `precompute_ref_log_probs`), not by a second model at every step: the reference is frozen
  and dropout is off, so the numbers are the same, at half the forward passes and without a
  second model in memory. A resumed run recomputes them from the --init run.
- The K-wise rankings become all their ordered pairs, so a prompt with K = 4 strict answers
  gives 6 pairs, drawn independently into batches of `train.batch_size` pairs as TRL draws
  them; a batch forwards each of its distinct answers once (an answer in two of its pairs is
  one row, its ranking's prompt laid out once beside its other answers: data.pack,
  models/layers.py Packed), and the LM head and its logsumexp run only on answer positions
  (feedback/preferences.py sequence_logprobs). With `by_ranking` the pairs of a step are
  instead all the pairs of randomly drawn rankings (a random part of the last one's), so
  each answer serves all its pairs at once: with K = 4 and the `request` labeler's ties
  about 18 rows for 16 pairs instead of about 30, 1.6x faster a step (CPU, before packing;
  benchmarks/trl_compare.py's model). The loss of each pair is the same, but the pairs of a
  step share prompts: over 8 seeds of that benchmark's 8-step run the held-out accuracy was
  0.548 +- 0.080 by ranking against 0.575 +- 0.035 independently (held-out loss 0.683
  against 0.680), hence not the default.

Held out by prompt: `val_loss` (the DPO loss), `val_accuracy` (the share of pairs whose
implicit reward margin is positive: TRL's rewards/accuracies) and `val_margin`. With
`keep_best` the saved weights are those of the evaluation with the lowest held-out loss (the
loss, not the accuracy: a few dozen held-out pairs make the accuracy jump by whole pairs),
as stages/reward.py does it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinylm import config as configlib
from tinylm import rundir, viz
from tinylm.errors import UserError
from tinylm.feedback.io import read_rankings
from tinylm.feedback.preferences import PairData, sequence_logprobs, split_rows
from tinylm.models.gpt import GPT
from tinylm.stages.common import BestWeights, batch_generator, load_reference, prepare_run_dir
from tinylm.stages.reward import RankingDataConfig
from tinylm.tokenizer import Tokenizer
from tinylm.train import objectives
from tinylm.train.loop import TrainConfig, train


@dataclass
class DPOConfig:
    out: str = "runs/dpo"
    init: str = ""  # the SFT run: the policy's start and the frozen reference (required)
    beta: float = 0.1  # the strength of the pull towards the reference (DPO's beta)
    sft_weight: float = 0.0  # > 0: + this x the chosen answers' mean token NLL (RPO; TRL's
    # rpo_alpha), which keeps them likely where DPO alone lowers both answers' likelihoods
    keep_best: bool = True  # save the weights of the evaluation with the lowest val_loss
    by_ranking: bool = False  # true: a step's pairs come ranking by ranking, each answer
    # forwarded once (about 18 rows for 16 pairs, 1.6x faster a step) but noisier held-out
    # accuracy early on (docstring); false: independent pairs, TRL's way (about 30 rows)
    ref: str = ""  # the frozen reference; "" = init (tinylm rlhf: the SFT run in every round)
    data: RankingDataConfig = field(default_factory=RankingDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta} must be > 0")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight={self.sft_weight} must be >= 0")


@torch.no_grad()
def dpo_metrics(model: GPT, data: PairData, batch_size: int, beta: float) -> dict[str, float]:
    """Held-out DPO loss, the share of pairs with a positive implicit margin, the mean margin."""
    device = next(model.parameters()).device
    losses, margins = [], []
    for x, y, ref, chosen, rejected, *packed in data.batches(batch_size):
        layout = packed[0].to(device) if packed else None
        logp = sequence_logprobs(model, x.to(device), y.to(device), groups=2,
                                 packed=layout).cpu()  # (R,)
        loss, margin = objectives.dpo_loss(logp[chosen], logp[rejected], ref[chosen],
                                           ref[rejected], beta)  # margin (b,)
        losses.append(float(loss) * len(chosen))
        margins.append(margin.float())
    m = torch.cat(margins)
    return {"val_loss": sum(losses) / len(m), "val_accuracy": int((m > 0).sum()) / len(m),
            "val_margin": float(m.mean())}


def run(cfg: DPOConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) with DPO; returns the last metrics (val_loss, val_accuracy, ...)."""
    if not cfg.init:
        raise UserError("dpo needs the SFT run to start from: pass --init RUN")
    if not cfg.data.path:
        raise UserError("dpo needs rankings: pass --data FILE (from `tinylm feedback export`, "
                        "or TRL pairs JSONL)")
    run_dir = prepare_run_dir(cfg.out, resume)
    source = run_dir if resume else Path(cfg.init)
    model = rundir.load_model(Path(cfg.init), family="gpt")  # resume: weights from state/
    tok = Tokenizer.load(source / rundir.TOKENIZER)
    template = rundir.chat_template(source, required=True)
    T = model.config.block_size
    train_rows, held_rows = split_rows(read_rankings(cfg.data.path), cfg.data.val_fraction,
                                       cfg.data.split_seed)
    data, held = (PairData(train_rows, tok, template, T, cfg.data.pack),
                  PairData(held_rows, tok, template, T, cfg.data.pack))
    if not len(data):
        raise UserError(f"no ranking of {cfg.data.path} gives an ordered pair that fits the "
                        f"model's {T}-token window")
    print(f"dpo: {len(data)} training and {len(held)} held-out pairs"
          + (f" ({data.dropped_pairs} too long dropped)" if data.dropped_pairs else ""))
    if cfg.ref:
        reference = load_reference(cfg.ref, model)
    else:
        reference = model if not resume else rundir.load_model(Path(cfg.init), family="gpt")
    for d in (data, held):
        d.set_reference(reference, cfg.data.eval_batch_size)
    del reference
    if not resume:
        configlib.save(cfg, run_dir / "config.toml")
        rundir.save_tokenizers(run_dir, tok)
        rundir.save_chat_template(run_dir, template)

    def batch_fn(step: int, k: int):
        return data.batch(cfg.train.batch_size, batch_generator(cfg.train.seed, step, k),
                          cfg.by_ranking)

    best = BestWeights("val_loss", higher=False)

    def eval_fn(m: GPT) -> dict[str, float]:
        metrics = dpo_metrics(m, held, cfg.data.eval_batch_size, cfg.beta) if len(held) else {}
        best.offer(m, metrics)
        return metrics

    objective = functools.partial(objectives.dpo, beta=cfg.beta, sft_weight=cfg.sft_weight)
    result = train(model, objective, batch_fn, cfg.train, run_dir, eval_fn, resume=resume,
                   flops_per_token=model.flops_per_token(T))
    if cfg.keep_best and (kept := best.restore(model, run_dir)) is not None:
        rundir.save_model(run_dir, model)
        result |= kept
        print(f"dpo: keeping the weights of step {kept['best_step']} (lowest held-out loss "
              f"{kept['val_loss']:.4f})")
    viz.plot_metrics(run_dir)
    if "val_accuracy" in result:
        print(f"dpo: held-out pairs with a positive implicit margin {result['val_accuracy']:.3f}"
              f", mean margin {result['val_margin']:.3f}, loss {result['val_loss']:.4f} "
              f"(log 2 = {math.log(2):.4f} at the start)")
    return result
