"""Optimizers and the learning-rate schedule.

`build_optimizers` splits parameters the way modded-nanogpt does: the 2-D weight matrices
inside the network go to Muon (momentum, then orthogonalised by a Newton-Schulz iteration),
everything else (embeddings, the output head, norms, biases) goes to AdamW. With
`optimizer = "adamw"` AdamW takes everything, with weight decay on matrices only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tinylm.train.loop import TrainConfig


def lr_factor(step: int, total: int, warmup: int, schedule: str, cooldown: float,
              min_factor: float) -> float:
    """Multiplier on the base LR at `step` (a pure function of the step).

    cosine: linear warmup, then cosine decay to `min_factor`.
    wsd: linear warmup, flat, then linear decay over the last `cooldown` fraction of steps.
    constant: linear warmup, then flat.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "wsd":
        decay_start = total * (1 - cooldown)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1.0, total - decay_start)
        return 1.0 - (1 - min_factor) * min(1.0, progress)
    raise ValueError(f"unknown schedule {schedule!r}; use cosine, wsd or constant")


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T, by a quintic Newton-Schulz iteration in bf16.

    The coefficients (3.4445, -4.7750, 2.0315) are Keller Jordan's: they push all singular
    values towards 1 fast, without needing them to converge exactly.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz (Jordan et al. 2024), for 2-D matrices only.

    Update = orthogonalize(nesterov momentum of the gradient), scaled by sqrt(max(1, rows/cols))
    so every matrix moves by a similar RMS amount; decoupled weight decay as AdamW.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                buf = state["momentum"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])  # nesterov
                update = orthogonalize(update) * max(1.0, p.size(0) / p.size(1)) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 2 and not any(s in name for s in ("emb", "head", "lm_head", "generator"))


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """The optimizers for `model` under `cfg`; each param group keeps its base LR in 'base_lr'."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    seen: set[int] = set()
    unique = []
    for n, p in named:  # tied weights appear once
        if id(p) not in seen:
            seen.add(id(p))
            unique.append((n, p))
    matrices = [p for n, p in unique if _is_hidden_matrix(n, p)]
    embeds_heads = [p for n, p in unique if p.ndim == 2 and not _is_hidden_matrix(n, p)]
    others = [p for n, p in unique if p.ndim != 2]
    fused = {"fused": True} if _fused_ok(unique) else {}
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        adam = torch.optim.AdamW(
            [dict(params=embeds_heads, lr=cfg.lr, weight_decay=0.0),
             dict(params=others, lr=cfg.lr, weight_decay=0.0)],
            betas=betas, eps=1e-10, **fused)
        muon = Muon(matrices, lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
        opts: list[torch.optim.Optimizer] = [adam, muon]
    elif cfg.optimizer == "adamw":
        opts = [torch.optim.AdamW(
            [dict(params=matrices + embeds_heads, weight_decay=cfg.weight_decay),
             dict(params=others, weight_decay=0.0)],
            lr=cfg.lr, betas=betas, eps=1e-8, **fused)]
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use adamw or muon")
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def _fused_ok(named) -> bool:
    # Fused AdamW exists for CPU and CUDA float tensors in recent PyTorch.
    return all(p.dtype in (torch.float32, torch.bfloat16) for _, p in named)
