"""Resume state: what `--resume` needs beyond the run dir's model (tinylm.rundir).

    run/state/step-00000040/
        model.safetensors       the weights after step 40
        optimizer.safetensors   every optimizer's tensors (moments, momentum buffers)
        loop.json               step, loop counters, the optimizers' plain state, and a
                                manifest: the size and sha256 of both safetensors files

A state is written into a hidden temporary folder, every file and the folder fsynced, then
renamed into place, so a crash leaves the previous states untouched. A load checks the
manifest first: a truncated or corrupted latest state is reported in one line, and the newest
intact one is used instead (randomness is a function of the step, so a resume from an earlier
state ends in the same weights). The last `keep` states are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tinylm.errors import UserError
from tinylm.files import atomic_save_tensors, check_entry, fsync_dir, manifest_entry
from tinylm.rundir import load_weights, unwrap

TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")


def _flatten_optimizer(opt: torch.optim.Optimizer, prefix: str):
    sd = opt.state_dict()
    tensors, plain = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{name}"] = value
            else:
                plain["state"].setdefault(str(idx), {})[name] = value
    return tensors, plain


def save_state(run_dir: Path, step: int, model: nn.Module,
               optimizers: list[torch.optim.Optimizer], loop: dict[str, Any],
               keep: int = 2) -> Path:
    """Weights + optimizers + loop state after `step` steps, into run/state/step-N; keeps the
    newest `keep` states."""
    state_dir = Path(run_dir) / "state"
    final = state_dir / f"step-{step:08d}"
    tmp = state_dir / f".step-{step:08d}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors, plains = {}, []
    for i, opt in enumerate(optimizers):
        t, p = _flatten_optimizer(opt, f"opt{i}")
        tensors.update(t)
        plains.append(p)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()},
              str(tmp / "optimizer.safetensors"))
    atomic_save_tensors(tmp / "model.safetensors", unwrap(model).state_dict())
    manifest = {name: manifest_entry(tmp / name) for name in TENSOR_FILES}
    with open(tmp / "loop.json", "w") as f:
        json.dump({"step": step, "optimizers": plains, **loop, "manifest": manifest}, f)
        f.flush()
        os.fsync(f.fileno())
    with open(tmp / "optimizer.safetensors", "rb") as f:
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(state_dir)
    for old in sorted(state_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_state(state_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(loop dict, '') for an intact state, or (None, what is wrong with it)."""
    try:
        loop = json.loads((state_dir / "loop.json").read_text())
        manifest = loop["manifest"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        return None, f"loop.json is unreadable ({e.__class__.__name__})"
    for name in TENSOR_FILES:
        problem = check_entry(state_dir / name, manifest[name]) if name in manifest else (
            f"the manifest lacks {name}")
        if problem:
            return None, problem
    return loop, ""


def latest_state(run_dir: Path, report=None) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact state and its loop dict, or None when there is no state at all.
    Each damaged newer state is reported through `report` (one line each; stderr by default).
    A UserError when states exist but none is intact."""
    report = report or (lambda line: print(line, file=sys.stderr))
    states = sorted((Path(run_dir) / "state").glob("step-*"), reverse=True)
    for i, state in enumerate(states):
        loop, problem = check_state(state)
        if loop is not None:
            return state, loop
        after = (f"resuming from {states[i + 1].name}" if i + 1 < len(states)
                 else "no earlier state is left")
        report(f"warning: {state} is damaged: {problem}; {after}")
    if states:
        raise UserError(f"every saved state in {Path(run_dir) / 'state'} is damaged; drop "
                        "--resume and train from the start")
    return None


def load_state(state_dir: Path, loop: dict[str, Any], model: nn.Module,
               optimizers: list[torch.optim.Optimizer]) -> None:
    """Restore weights and optimizers from a state `latest_state` found intact."""
    load_weights(model, state_dir / "model.safetensors")
    try:
        tensors = load_file(str(state_dir / "optimizer.safetensors"))
    except (OSError, SafetensorError) as e:
        raise UserError(f"{state_dir} is damaged ({e}); delete it to resume from an "
                        "earlier step") from None
    if len(loop["optimizers"]) != len(optimizers):
        raise UserError(f"{state_dir} holds {len(loop['optimizers'])} optimizers' state but "
                        f"train.optimizer makes {len(optimizers)}; resume with the run's "
                        "own train.optimizer")
    for i, (opt, plain) in enumerate(zip(optimizers, loop["optimizers"], strict=True)):
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            head, idx, name = key.split(".", 2)
            if head == f"opt{i}":
                state.setdefault(int(idx), {})[name] = value
        for idx, extra in plain["state"].items():
            state.setdefault(int(idx), {}).update(extra)
        opt.load_state_dict({"state": state, "param_groups": plain["param_groups"]})
