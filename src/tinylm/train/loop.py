"""The one training loop. It knows nothing about GPT: it takes a model, an objective that
turns (model, batch) into (loss, tokens) (train/objectives.py), a function that yields the
batch for a given (step, micro-step), and an optional evaluation function.

`train()` reads top to bottom in a fixed order: set the LR, accumulated micro-steps, clip,
step, zero_grad, time and log, eval/save. Its two halves are functions of their own, so an
outer loop that is not "next batch, step" (PPO: rollouts, then epochs over them) calls the
same code: `setup()` (device, dtype, threads, process group, optimizers, resume, bf16 compute
copy, DDP, compile) and `optimizer_step()` (micro-steps, clipping, the bf16 master copy).

Exact resume comes from making every random choice a pure function of the step: batch
`(step, k)` is drawn from a generator seeded with (seed, step, k), dropout is reseeded each
step, and the LR schedule is a function of the step. A checkpoint therefore only needs the
weights, the optimizer state and the step.

Time budgets: with `train.time_budget` the number of steps is estimated from the measured step
times, first after a few steps, then again at every step of the stable phase (until the LR
starts to fall, the schedule does not depend on the total), so a run whose first seconds were
slow still ends on time. The estimate and whether it was made are part of the resume state.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from tinylm import kernels
from tinylm.errors import UserError
from tinylm.files import atomic_write_text
from tinylm.models.layers import by_hand_table
from tinylm.perf import matmul_peak_flops, pick_device, pick_dtype
from tinylm.rundir import save_model, unwrap
from tinylm.train import checkpoint
from tinylm.train.objectives import Objective
from tinylm.train.optim import build_optimizers, decay_start, lr_factor, set_lr


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
    keep_states: int = 2  # resume states kept in run/state (the newest ones)
    seed: int = 1337
    progress: bool = True

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be at least 1")
        if self.time_budget and self.warmup_steps < 3:
            raise ValueError("time_budget needs warmup_steps >= 3 (speed is measured then)")
        if self.keep_states < 1:
            raise ValueError("keep_states must be at least 1")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def seed_step(device: torch.device, seed: int) -> None:
    """Seed the generator dropout draws from. On a CPU only the CPU generator:
    `torch.manual_seed` also queues seeds for every accelerator backend, which costs about
    1 ms a call (measured), as much as a whole step of a small model."""
    if device.type == "cpu":
        torch.random.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


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
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        self.file = path.open("a")

    def write(self, **row: Any) -> None:
        if self.path is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()


@dataclass
class Setup:
    """What `setup()` prepared: the models, optimizers and numerics of one training run."""

    model: nn.Module  # what runs forward and backward: the bf16 copy, DDP- or compile-wrapped
    raw: nn.Module  # the plain fp32 model the optimizers update; evaluated and saved
    optimizers: list[torch.optim.Optimizer]
    device: torch.device
    dtype: torch.dtype
    dinfo: DistInfo
    local_accum: int  # micro-batches per step on this rank
    autocast: Any
    scaler: torch.amp.GradScaler
    resumed: dict[str, Any]  # the loop state of the resumed step; {} when starting fresh


def train_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The arithmetic of training on `device`: bf16 weights, or train.dtype's autocast."""
    return torch.bfloat16 if cfg.bf16_weights else pick_dtype(cfg.dtype, device)


def setup(model: nn.Module, cfg: TrainConfig, run_dir: Path | None = None,
          resume: bool = False) -> Setup:
    """Device, dtype, threads, process group, optimizers, the resumed state (from run_dir),
    the bf16 compute copy, DDP and compile, in the order they depend on each other."""
    device = pick_device(cfg.device)
    dtype = train_dtype(cfg, device)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    dinfo = init_distributed(device)
    if dinfo.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
        torch.cuda.set_device(device)
    if cfg.grad_accum % dinfo.world:
        raise UserError(f"train.grad_accum={cfg.grad_accum} must be a multiple of the "
                        f"{dinfo.world} processes")
    raw = model.to(device)
    optimizers = build_optimizers(raw, cfg)
    resumed: dict[str, Any] = {}
    if resume:
        found = checkpoint.latest_state(run_dir)
        if found is None:
            raise UserError(f"{run_dir} has no saved state to resume from; drop --resume")
        state, resumed = found
        checkpoint.load_state(state, resumed, raw, optimizers)
    if cfg.bf16_weights:
        model = copy.deepcopy(raw).to(torch.bfloat16)  # the compute copy
    if dinfo.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    autocast = (torch.autocast(device.type, dtype=dtype)
                if dtype != torch.float32 and not cfg.bf16_weights else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Setup(model, raw, optimizers, device, dtype, dinfo, cfg.grad_accum // dinfo.world,
                 autocast, scaler, resumed)


def optimizer_step(s: Setup, cfg: TrainConfig, objective: Objective,
                   batches: Iterable[tuple[torch.Tensor, ...]]) -> tuple[float, int]:
    """One optimizer step over this rank's micro-batches (the loss of each is divided by
    their number, so the step's gradient is their mean): backward, bf16 grads to the fp32
    master, clip, step, zero_grad, master back to the compute copy. Returns the mean loss
    (averaged over ranks) and the tokens this rank's micro-batches counted."""
    loss_sum = torch.zeros((), device=s.device)
    tokens = 0
    n = s.local_accum
    for k, batch in enumerate(batches):
        batch = tuple(t.to(s.device, non_blocking=True) for t in batch)
        sync = k == n - 1 or s.dinfo.world == 1
        ctx = s.model.no_sync() if not sync else contextlib.nullcontext()
        with ctx, s.autocast:
            loss, count = objective(s.model, batch)
            loss = loss / n
        s.scaler.scale(loss).backward()
        loss_sum += loss.detach()
        tokens += count
    if cfg.bf16_weights:
        _grads_to_master(unwrap(s.model), s.raw)
    if cfg.grad_clip > 0:
        for opt in s.optimizers:
            s.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(s.raw.parameters(), cfg.grad_clip)
    for opt in s.optimizers:
        s.scaler.step(opt)
    s.scaler.update()
    for opt in s.optimizers:
        opt.zero_grad(set_to_none=True)
    if cfg.bf16_weights:
        _master_to_compute(s.raw, unwrap(s.model))
    if s.dinfo.world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    return loss_sum.item(), tokens  # .item() syncs, so a caller's timing is honest


def train(model: nn.Module, objective: Objective,
          batch_fn: Callable[[int, int], tuple[torch.Tensor, ...]], cfg: TrainConfig,
          run_dir: Path, eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
          resume: bool = False, flops_per_token: float = 0.0) -> dict[str, Any]:
    """Train `model` for cfg.steps optimizer steps; returns the last metrics.

    batch_fn(step, k) gives micro-batch k (0 <= k < cfg.grad_accum) of `step`, which
    `objective(model, batch)` turns into (loss, tokens). eval_fn(model) returns named metrics
    (e.g. val_loss).
    """
    run_dir = Path(run_dir)
    s = setup(model, cfg, run_dir, resume)
    raw, dinfo = s.raw, s.dinfo
    start_step = s.resumed.get("step", 0)
    train_time, tokens_seen = s.resumed.get("train_time", 0.0), s.resumed.get("tokens", 0)
    total = s.resumed.get("total_steps", cfg.steps) if cfg.time_budget else cfg.steps
    calibrated = bool(s.resumed.get("calibrated", False))

    log = MetricsLog(run_dir / "metrics.jsonl" if dinfo.main else None, start_step)
    peak = matmul_peak_flops(s.dtype, s.device.type) if flops_per_token and dinfo.main else 0.0
    if cfg.time_budget and s.device.type == "cpu":  # a machine's first run builds the C
        kernels.available()  # kernels (~2 s) and times attention (~1-3 s): not on the clock
        by_hand_table(s.dtype)
    bar = tqdm(total=total, initial=start_step, disable=not (cfg.progress and dinfo.main),
               dynamic_ncols=True, leave=False)
    last: dict[str, Any] = {}

    def evaluate_and_save(step: int, with_eval: bool = True) -> None:
        nonlocal last
        if with_eval and eval_fn is not None and dinfo.main:
            raw.eval()
            with torch.no_grad(), s.autocast:
                metrics = eval_fn(raw)
            raw.train()
            log.write(step=step, **metrics)
            last |= metrics
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if dinfo.main:
            save_model(run_dir, raw)
            loop = {"train_time": train_time, "tokens": tokens_seen, "total_steps": total,
                    "calibrated": calibrated}
            checkpoint.save_state(run_dir, step, raw, s.optimizers, loop, cfg.keep_states)
        if dinfo.world > 1:
            dist.barrier()

    s.model.train()
    step = start_step
    window_tokens, window_time = 0, 0.0
    step_times: list[float] = []  # of this process: a resumed run measures afresh
    while step < total:
        t0 = time.perf_counter()
        if cfg.time_budget and len(step_times) >= 3 and (
                not calibrated or step < decay_start(total, cfg.warmup_steps, cfg.schedule,
                                                     cfg.cooldown)):
            total = _steps_for_budget(cfg, train_time, step, step_times, dinfo)
            calibrated = True
            bar.total = total
        factor = lr_factor(step, total, cfg.warmup_steps, cfg.schedule, cfg.cooldown,
                           cfg.min_lr_factor)
        lrs = set_lr(s.optimizers, factor)
        seed_step(s.device, cfg.seed * 1_000_003 + step * 101 + dinfo.rank)  # dropout
        micro = (batch_fn(step, dinfo.rank * s.local_accum + k) for k in range(s.local_accum))
        step_loss, step_tokens = optimizer_step(s, cfg, objective, micro)
        step += 1
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
            row = dict(step=step, loss=step_loss, lr_factor=factor, **lrs, tokens_per_s=tps,
                       mfu=mfu, train_time=train_time, tokens=tokens_seen)
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


def _steps_for_budget(cfg: TrainConfig, spent: float, step: int, times: list[float],
                      dinfo: DistInfo) -> int:
    """Total steps that fit the budget, from the median of the recent step times (the first,
    slow step of the process left out). Never so few that the LR decay would have begun
    already. Rank 0 decides and tells the others, so every rank stops together."""
    recent = sorted(times[1:][-BUDGET_WINDOW:])
    typical = recent[len(recent) // 2]
    total = step + max(1, int((cfg.time_budget - spent) / typical))
    if cfg.schedule == "wsd":
        total = max(total, math.ceil(step / (1 - cfg.cooldown)))
    total_t = torch.tensor(total)
    if dinfo.world > 1:
        dist.broadcast(total_t, src=0)
    return int(total_t)


BUDGET_WINDOW = 20  # step times the budget's estimate looks at: recent enough to follow load


@torch.no_grad()
def _grads_to_master(compute: nn.Module, master: nn.Module) -> None:
    for c, m in zip(compute.parameters(), master.parameters(), strict=True):
        m.grad = None if c.grad is None else c.grad.float()
        c.grad = None


@torch.no_grad()
def _master_to_compute(master: nn.Module, compute: nn.Module) -> None:
    for m, c in zip(master.parameters(), compute.parameters(), strict=True):
        c.copy_(m)
