"""Optimizers and the learning-rate schedule.

`build_optimizers` splits parameters the way modded-nanogpt does: the 2-D weight matrices
inside the network go to Muon (momentum, then orthogonalised by a Newton-Schulz iteration),
everything else (embeddings, the output head, norms, biases) goes to AdamW. Which tensor is
which, each model says itself (`model.optim_groups()`), not a match on parameter names. With
`optimizer = "adamw"` AdamW takes everything, with weight decay on matrices only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from tinylm.perf import fast_dtype

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


def decay_start(total: int, warmup: int, schedule: str, cooldown: float) -> float:
    """The step where the LR starts to fall: until then the LR does not depend on `total`,
    so a time budget may still move `total` without changing the steps already taken."""
    if schedule == "constant":
        return math.inf
    if schedule == "cosine":
        return warmup
    return max(warmup, total * (1 - cooldown))


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 5,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T, by a quintic Newton-Schulz iteration in `dtype`
    (bf16 is precise enough, and fast where the hardware has it; fp32 where it has not).

    The coefficients (3.4445, -4.7750, 2.0315) are Keller Jordan's: they push all singular
    values towards 1 fast, without needing them to converge exactly.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
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
                 weight_decay: float = 0.0, ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype = ns_dtype  # the Newton-Schulz iteration's

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
                update = orthogonalize(update, dtype=self.ns_dtype)
                update *= max(1.0, p.size(0) / p.size(1)) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """The optimizers for `model` under `cfg`, over the groups the model names itself
    (`model.optim_groups()`: 'matrix', 'embed', 'other'). Each param group keeps its name in
    'name' and its base LR in 'base_lr'."""
    groups = {name: ps for name, ps in model.optim_groups().items() if ps}
    fused = {"fused": True} if _fused_ok([p for ps in groups.values() for p in ps]) else {}
    betas = (cfg.beta1, cfg.beta2)

    def adam_groups(names: tuple[str, ...], decay: tuple[str, ...]) -> list[dict]:
        return [dict(name=n, params=groups[n], lr=cfg.lr,
                     weight_decay=cfg.weight_decay if n in decay else 0.0)
                for n in names if n in groups]

    if cfg.optimizer == "muon":
        opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(
            adam_groups(("embed", "other"), decay=()), betas=betas, eps=1e-10, **fused)]
        if "matrix" in groups:
            device = groups["matrix"][0].device
            opts.append(Muon([dict(name="matrix", params=groups["matrix"])], lr=cfg.muon_lr,
                             weight_decay=cfg.weight_decay, ns_dtype=fast_dtype(device)))
    elif cfg.optimizer == "adamw":  # weight decay on matrices only
        opts = [torch.optim.AdamW(adam_groups(("matrix", "embed", "other"),
                                              decay=("matrix", "embed")),
                                  betas=betas, eps=1e-8, **fused)]
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use adamw or muon")
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> dict[str, float]:
    """Every group's LR = its base LR * `factor`; returns {'lr_<group name>': LR} to log."""
    lrs = {}
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
            lrs[f"lr_{group['name']}"] = group["lr"]
    return lrs


def _fused_ok(params: list[torch.Tensor]) -> bool:
    # Fused AdamW exists for CPU and CUDA float tensors in recent PyTorch.
    return all(p.dtype in (torch.float32, torch.bfloat16) for p in params)
