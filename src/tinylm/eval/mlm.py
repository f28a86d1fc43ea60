"""Held-out scores of a masked language model: masked-token accuracy and perplexity.

Both are taken over the chosen positions only (BERT's 15%, whichever of mask / random / keep
they got), the same positions the training loss covers, so val_loss is directly comparable to
the training loss. Perplexity is exp(mean cross-entropy) over those positions: how many
equally likely candidates the model is torn between when filling a blank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from tinylm.data.mlm import IGNORE, Masker


@torch.no_grad()
def mlm_metrics(model, windows: Iterable[torch.Tensor], masker: Masker, seed: int,
                max_tokens: int = 0) -> dict[str, float]:
    """val_loss, val_ppl and val_acc of `model` on `windows` ((B, T) id tensors), each masked
    from one generator seeded with `seed`, so repeated calls score identical masks.
    max_tokens > 0 stops after about that many input tokens."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    loss_sum, correct, count, seen = 0.0, 0, 0, 0
    for ids in windows:
        inputs, targets = masker(ids, gen)
        picked = targets != IGNORE  # (B, T)
        h = model.hidden_states(inputs.to(device))  # (B, T, C)
        logits = model.mlm_head(h[picked.to(device)]).float()  # (N, V)
        truth = targets[picked].to(device)  # (N,)
        loss_sum += F.cross_entropy(logits, truth, reduction="sum").item()
        correct += int((logits.argmax(-1) == truth).sum())
        count += truth.numel()
        seen += ids.numel()
        if max_tokens and seen >= max_tokens:
            break
    loss = loss_sum / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(loss), "val_acc": correct / max(count, 1)}
