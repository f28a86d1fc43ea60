"""The one training loop. It knows nothing about GPT: it takes a model whose
`model(*batch)` returns a scalar loss, a function that yields the batch for a given
(step, micro-step), and an optional evaluation function.

Exact resume comes from making every random choice a pure function of the step: batch
`(step, k)` is drawn from a generator seeded with (seed, step, k), dropout is reseeded each
step, and the LR schedule is a function of the step. A checkpoint therefore only needs the
weights, the optimizer state and the step.

Distributed: under `torchrun` every rank takes `grad_accum / world_size` of the global
micro-batches (rank r takes micro-steps r*A/W ...), DDP averages the gradients, and only rank 0
logs and saves. One process with the same `grad_accum` sees the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from tinylm.errors import UserError
from tinylm.perf import matmul_peak_flops, pick_device, pick_dtype
from tinylm.train import checkpoint
from tinylm.train.optim import build_optimizers, lr_factor


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (global, across all ranks)
    optimizer: str = "muon"  # muon (matrices) + adamw (rest) | adamw
    lr: float = 3e-3  # AdamW learning rate
    muon_lr: float = 0.02
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 50
    schedule: str = "wsd"  # cosine | wsd | constant
    cooldown: float = 0.4  # wsd: fraction of steps spent decaying
    min_lr_factor: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast)
    bf16_weights: bool = False  # run forward/backward on a bf16 copy of the weights; the
    # optimizer keeps updating the fp32 weights (no per-layer casts: faster on CPU)
    compile: bool = False
    device: str = "auto"
    threads: int = 0  # torch intra-op threads on CPU; 0 = PyTorch's default
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    log_every: int = 10
    time_budget: float = 0.0  # > 0: train for about this many seconds; `steps` is then set
    # from the speed measured during warm-up (so the LR schedule still ends on time)
    time_limit: float = 0.0  # seconds of training after which to stop early; 0 = none
    stop_after: int = 0  # pause (save and exit) after this step, to --resume later; 0 = none
    seed: int = 1337
    progress: bool = True

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be at least 1")
        if self.time_budget and self.warmup_steps < 3:
            raise ValueError("time_budget needs warmup_steps >= 3 (speed is measured then)")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


class MetricsLog:
    """metrics.jsonl writer (rank 0 only; other ranks get a no-op instance)."""

    def __init__(self, path: Path | None, resume_step: int = 0):
        self.path = path
        if path is None:
            return
        kept = []
        if resume_step and path.is_file():  # drop lines from beyond the resumed step
            kept = [ln for ln in path.read_text().splitlines()
                    if ln and json.loads(ln).get("step", 0) <= resume_step]
        checkpoint.atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        self.file = path.open("a")

    def write(self, **row: Any) -> None:
        if self.path is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()


def train(model: nn.Module, cfg: TrainConfig, run_dir: Path,
          batch_fn: Callable[[int, int], tuple[torch.Tensor, ...]],
          eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
          resume: bool = False, flops_per_token: float = 0.0) -> dict[str, Any]:
    """Train `model` for cfg.steps optimizer steps; returns the last metrics.

    batch_fn(step, k) gives micro-batch k (0 <= k < cfg.grad_accum) of `step` as a tuple that
    `model(*batch)` turns into a loss. eval_fn(model) returns named metrics (e.g. val_loss).
    """
    run_dir = Path(run_dir)
    device = pick_device(cfg.device)
    dtype = torch.bfloat16 if cfg.bf16_weights else pick_dtype(cfg.dtype, device)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    dinfo = init_distributed(device)
    if dinfo.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
        torch.cuda.set_device(device)
    if cfg.grad_accum % dinfo.world:
        raise UserError(f"train.grad_accum={cfg.grad_accum} must be a multiple of the "
                        f"{dinfo.world} processes")
    local_accum = cfg.grad_accum // dinfo.world
    model.to(device)
    raw_model = model
    optimizers = build_optimizers(raw_model, cfg)

    start_step, train_time, tokens_seen, total = 0, 0.0, 0, cfg.steps
    if resume:
        state = checkpoint.latest_state(run_dir)
        if state is None:
            raise UserError(f"{run_dir} has no saved state to resume from; drop --resume")
        loop = checkpoint.load_state(state, raw_model, optimizers)
        start_step, train_time = loop["step"], loop.get("train_time", 0.0)
        tokens_seen = loop.get("tokens", 0)
        total = loop.get("total_steps", total) if cfg.time_budget else total

    if cfg.bf16_weights:
        model = copy.deepcopy(raw_model).to(torch.bfloat16)  # the compute copy
    if dinfo.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    log = MetricsLog(run_dir / "metrics.jsonl" if dinfo.main else None, start_step)
    peak = matmul_peak_flops(dtype, device.type) if flops_per_token and dinfo.main else 0.0
    autocast = (torch.autocast(device.type, dtype=dtype)
                if dtype != torch.float32 and not cfg.bf16_weights else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    bar = tqdm(total=total, initial=start_step, disable=not (cfg.progress and dinfo.main),
               dynamic_ncols=True, leave=False)
    last: dict[str, Any] = {}

    def evaluate_and_save(step: int, with_eval: bool = True) -> None:
        nonlocal last
        if with_eval and eval_fn is not None and dinfo.main:
            raw_model.eval()
            with torch.no_grad(), autocast:
                metrics = eval_fn(raw_model)
            raw_model.train()
            log.write(step=step, **metrics)
            last |= metrics
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if dinfo.main:
            checkpoint.save_model(run_dir, raw_model)
            loop = {"train_time": train_time, "tokens": tokens_seen, "total_steps": total}
            checkpoint.save_state(run_dir, step, raw_model, optimizers, loop)
        if dinfo.world > 1:
            dist.barrier()

    model.train()
    step = start_step
    window_tokens, window_time = 0, 0.0
    calibrate_at = min(10, cfg.warmup_steps - 1) if cfg.time_budget and not resume else -1
    step_times: list[float] = []
    while step < total:
        t0 = time.perf_counter()
        if step == calibrate_at:
            total = _steps_for_budget(cfg.time_budget, train_time, step, step_times, dinfo)
            bar.total = total
        factor = lr_factor(step, total, cfg.warmup_steps, cfg.schedule, cfg.cooldown,
                           cfg.min_lr_factor)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
        torch.manual_seed(cfg.seed * 1_000_003 + step * 101 + dinfo.rank)  # dropout, per step
        loss_sum = torch.zeros((), device=device)
        step_tokens = 0
        for k in range(local_accum):
            batch = tuple(t.to(device, non_blocking=True)
                          for t in batch_fn(step, dinfo.rank * local_accum + k))
            step_tokens += batch[-1].numel()
            sync = k == local_accum - 1 or dinfo.world == 1
            ctx = model.no_sync() if not sync else contextlib.nullcontext()
            with ctx, autocast:
                loss = model(*batch) / local_accum
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if cfg.bf16_weights:
            _grads_to_master(checkpoint.unwrap(model), raw_model)
        if cfg.grad_clip > 0:
            for opt in optimizers:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if cfg.bf16_weights:
            _master_to_compute(raw_model, checkpoint.unwrap(model))
        if dinfo.world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        step += 1
        step_loss = loss_sum.item()  # syncs, so the timing below is honest
        if not math.isfinite(step_loss):
            raise UserError(f"loss became {step_loss} at step {step}; lower train.lr or "
                            "train.muon_lr, or raise train.warmup_steps")
        dt = time.perf_counter() - t0
        train_time += dt
        step_times.append(dt)
        step_tokens *= dinfo.world
        tokens_seen += step_tokens
        window_tokens += step_tokens
        window_time += dt
        if step % cfg.log_every == 0 or step == total:
            tps = window_tokens / window_time
            mfu = tps * flops_per_token / peak if peak else 0.0
            row = dict(step=step, loss=step_loss, lr=factor, tokens_per_s=tps, mfu=mfu,
                       train_time=train_time, tokens=tokens_seen)
            log.write(**row)
            last |= row
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.0%}")
            window_tokens, window_time = 0, 0.0
        bar.update(1)
        out_of_time = (cfg.time_limit and train_time >= cfg.time_limit) or step == cfg.stop_after
        if out_of_time or step == total or (cfg.eval_every and step % cfg.eval_every == 0):
            evaluate_and_save(step)
        elif cfg.save_every and step % cfg.save_every == 0:
            evaluate_and_save(step, with_eval=False)
        if out_of_time:
            break
    bar.close()
    if step == start_step and start_step >= total:
        bar.write(f"already trained for {start_step} steps; raise train.steps to go on")
    last |= {"step": step, "train_time": train_time, "tokens": tokens_seen}
    return last


def _steps_for_budget(budget: float, spent: float, step: int, times: list[float],
                      dinfo: DistInfo) -> int:
    """Total steps that fit `budget` seconds, from the step times so far (the first, slow
    step left out). Rank 0 decides and tells the others, so every rank stops together."""
    typical = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    total = torch.tensor(step + max(1, int((budget - spent) / typical)))
    if dinfo.world > 1:
        dist.broadcast(total, src=0)
    return int(total)


@torch.no_grad()
def _grads_to_master(compute: nn.Module, master: nn.Module) -> None:
    for c, m in zip(compute.parameters(), master.parameters(), strict=True):
        m.grad = None if c.grad is None else c.grad.float()
        c.grad = None


@torch.no_grad()
def _master_to_compute(master: nn.Module, compute: nn.Module) -> None:
    for m, c in zip(master.parameters(), compute.parameters(), strict=True):
        c.copy_(m)
