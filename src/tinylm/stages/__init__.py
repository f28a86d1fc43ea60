"""The stages: one entry point each, `run(cfg, resume=False) -> metrics`, listed in one table
that the CLI builds its training commands from (and the pipeline will read).

Each stage reads its config (a dataclass), writes a run dir, and returns its last metrics.
The table names modules and classes as strings, as models.FAMILIES does, so listing the stages
(`tinylm --help`) imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI subcommand
    module: str  # tinylm.stages.<module>, which defines run(cfg, resume=False)
    config_name: str  # the config dataclass in that module
    preset: str  # the default --config
    help: str
    doing: str  # what it prints before it starts: "{doing} into runs/x"
    data_key: str  # the config key that `--data FILE` sets
    flags: tuple[tuple[str, str, str], ...] = ()  # more (--flag, config key, help) pairs
    int_flags: tuple[str, ...] = ()  # those of `flags` that take a whole number

    @property
    def config_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_name)

    @property
    def run(self) -> Callable[..., dict[str, Any]]:
        return importlib.import_module(self.module).run


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("pretrain", "tinylm.stages.pretrain", "PretrainConfig", "shakespeare-char",
          "pre-train a GPT on raw text", "pretraining", "data.corpus"),
    Stage("mlm", "tinylm.stages.mlm", "MLMConfig", "mlm-tinystories",
          "train a masked language model (BERT)", "training a masked LM", "data.corpus"),
    Stage("seq2seq", "tinylm.stages.seq2seq", "Seq2SeqConfig", "seq2seq-transformer",
          "train an encoder-decoder (Transformer or RNN) on pairs",
          "training an encoder-decoder", "data.pairs"),
    Stage("sft", "tinylm.stages.sft", "SFTConfig", "sft-tinystories",
          "fine-tune a pre-trained GPT on conversations (assistant-only loss)",
          "fine-tuning on conversations", "data.path"),
    Stage("reward", "tinylm.stages.reward", "RewardStageConfig", "reward-tinystories",
          "train a reward model on rankings (an SFT backbone + a scalar head)",
          "training a reward model", "data.path"),
    Stage("dpo", "tinylm.stages.dpo", "DPOConfig", "dpo-tinystories",
          "fine-tune on rankings by Direct Preference Optimization", "training with DPO",
          "data.path"),
    Stage("ppo", "tinylm.stages.ppo", "PPOStageConfig", "ppo-tinystories",
          "PPO of a chat model against a reward model (--policy SFT_RUN --reward RM_RUN)",
          "PPO", "data.prompts",
          (("--policy", "init", "the SFT run to improve (the same as --init)"),
           ("--reward", "reward", "the reward-model run (tinylm reward) that scores answers"))),
]}

# Rounds of RLHF (stages/rlhf.py) take the same CLI shape (--config, --set, --out, --resume,
# --init) but are a loop over the stages above, writing a folder of run dirs rather than one
# model: kept out of STAGES, which lists the stages that each train one model.
RLHF = Stage("rlhf", "tinylm.stages.rlhf", "RLHFConfig", "rlhf-request",
             "RLHF in rounds: sample, rank, reward model, PPO or DPO, evaluate (--rounds N)",
             "RLHF rounds", "data.prompts",
             (("--rounds", "rounds", "rounds in all (with --resume: the total to reach)"),),
             int_flags=("--rounds",))
