"""Objectives: what the training loop minimises. An objective turns (model, batch) into
(loss, tokens): the mean loss of the micro-batch, and how many tokens it counts towards
throughput (tokens_per_s, MFU, the `tokens` metric).

The loop knows nothing else about a batch, so an objective is free in what the batch holds
and in how the loss is computed: a model's own `forward(x, targets)` (causal LM, masked LM,
seq2seq), or something the model's forward does not do (SFT's assistant-only loss, a reward
model's ranking of K answers, DPO's comparison with a frozen reference).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor, int]: ...


def causal_lm(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, int]:
    """Next-token prediction: batch = (x, y), y is x shifted by one (-100 = no target)."""
    x, y = batch
    return model(x, y), y.numel()


# Supervised fine-tuning is causal_lm too: its batches (data.chat.ChatData) carry -100 targets
# wherever the next token is not the assistant's, so the loss is the assistant tokens' only.


def masked_lm(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, int]:
    """BERT's objective: batch = (masked input, targets at masked positions, -100 elsewhere).
    Throughput counts every input position (the model reads them all)."""
    x, targets = batch
    return model(x, targets), x.numel()


def seq2seq(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
            ) -> tuple[torch.Tensor, int]:
    """Teacher forcing: batch = (source, BOS + target, target + EOS); throughput counts the
    decoder's positions."""
    src, tgt_in, tgt_out = batch
    return model(src, tgt_in, tgt_out), tgt_out.numel()
