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
import torch.nn.functional as F
from torch import nn

from tinylm.feedback.preferences import ranked_pairs_mask, reward_forward, sequence_logprobs


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


# --- preferences: the reward model's K-wise ranking loss, DPO -------------------------------
def kwise_ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """InstructGPT's reward-model loss (Ouyang et al. 2022, eq. 1): for each prompt the mean
    of -log sigmoid(r_better - r_worse) over all its C(K, 2) ordered pairs, then the mean over
    prompts. Keeping a prompt's pairs together in one batch element (instead of shuffling
    pairs) costs one forward per answer, not one per pair, and does not overfit, as the paper
    notes. Tied pairs are skipped; a prompt with no ordered pair counts for nothing.
    rewards, ranks: (B, K)."""
    pairs = ranked_pairs_mask(ranks)  # (B, K, K)
    diff = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K): r_i - r_j
    losses = -F.logsigmoid(diff) * pairs  # (B, K, K)
    n = pairs.sum((1, 2))  # (B,)
    has = n > 0
    if not has.any():
        return rewards.sum() * 0.0  # a batch of ties only: no signal, but a graph to step
    return (losses.sum((1, 2))[has] / n[has]).mean()


def reward_ranking(model: nn.Module, batch: tuple[torch.Tensor, ...]
                   ) -> tuple[torch.Tensor, int]:
    """batch = (ids (B, K, T) right-padded, end (B, K): position of each answer's
    end-of-answer token, ranks (B, K)[, packed: the layers.Packed layout of ids, each prompt
    once]); the K answers of a prompt are one batch element. Throughput counts the tokens
    the trunk computes: the answers' (and each prompt's K times) unpacked, the packed rows'
    with packing."""
    ids, end, ranks, *packed = batch
    rewards = reward_forward(model, ids, end, packed, ids.device)  # (B, K)
    tokens = packed[0].tokens if packed else int(((end + 1) * (ranks >= 0)).sum())
    return kwise_ranking_loss(rewards, ranks), tokens


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7): -log sigmoid(beta *
    ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))), the sigmoid loss of
    TRL's DPOTrainer. Inputs are summed answer log-probs (B,). Returns (mean loss, the
    implicit reward margins (B,))."""
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))  # (B,)
    return -F.logsigmoid(margin).mean(), margin


def dpo(model: nn.Module, batch: tuple[torch.Tensor, ...], beta: float = 0.1,
        sft_weight: float = 0.0) -> tuple[torch.Tensor, int]:
    """batch = (x (R, T), y (R, T): the distinct answers of the batch's pairs, targets -100
    off the answers; ref (R,): the frozen reference's summed log-probs of the same rows,
    computed once before training; chosen (B,), rejected (B,): each pair's two rows[, packed:
    x's rows with each ranking's prompt once, layers.Packed]), as
    feedback.preferences.PairData draws it. An answer in several pairs is forwarded once;
    packed, the trunk computes each prompt once and short rows fill long rows' padding;
    unpacked, the rows go in two groups of similar lengths (about 15% fewer padded positions,
    15% faster on CPU at 16 pairs). Throughput counts the positions the trunk computes.
    `sft_weight` > 0 adds that times the chosen answers' mean negative log-likelihood per
    token, averaged over the pairs (RPO, Pang et al. 2024; TRL's `rpo_alpha`): DPO alone may
    lower both answers' likelihoods, this keeps the chosen ones likely. Bind beta and
    sft_weight with functools.partial."""
    x, y, ref, chosen, rejected, *packed = batch
    layout = packed[0] if packed else None
    logp = sequence_logprobs(model, x, y, groups=2, packed=layout)  # (R,)
    loss, _ = dpo_loss(logp[chosen], logp[rejected], ref[chosen], ref[rejected], beta)
    if sft_weight:
        per_token = logp / (y != -100).sum(1).clamp(min=1)  # (R,)
        loss = loss - sft_weight * per_token[chosen].mean()
    return loss, layout.tokens if layout else x.numel()
