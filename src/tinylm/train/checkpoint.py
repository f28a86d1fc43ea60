"""Run directories: atomic saves and verified loads.

Every file is written to a temporary name in the same folder and then renamed over the old
one, so a crash mid-save leaves the previous file intact. Weights are safetensors with plain
parameter names (we always save the unwrapped, uncompiled module); everything else is JSON.

    run/model.safetensors   weights          run/model.json   {"family", "config"}
    run/tokenizer.json      HF tokenizers    run/config.toml  resolved stage config
    run/state/step-N/       model + optimizer.safetensors + loop.json, for exact --resume
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tinylm.errors import UserError
from tinylm.models import FAMILIES, family_classes

KEEP_STATES = 2


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    tmp = _tmp(path)
    # clone: tied weights share storage, which safetensors refuses to write twice
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_model(run_dir: Path, model: nn.Module) -> None:
    model = unwrap(model)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(run_dir / "model.safetensors", model.state_dict())
    meta = {"family": model.family, "config": dataclasses.asdict(model.config)}
    atomic_write_text(run_dir / "model.json", json.dumps(meta, indent=2))


def read_model_meta(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} does not exist; train one first (tinylm pretrain)")
    meta_path = run_dir / "model.json"
    if not meta_path.is_file():
        raise UserError(f"{run_dir} holds no model.json; is it a tinylm run dir?")
    try:
        meta = json.loads(meta_path.read_text())
        family, config = meta["family"], meta["config"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{meta_path} is damaged; retrain or restore the run") from None
    if family not in FAMILIES:
        raise UserError(f"{run_dir}: unknown model family {family!r}")
    return {"family": family, "config": config}


def load_model(run_dir: Path, family: str | tuple[str, ...] | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """The model saved in `run_dir`, checked to be of `family` (one name or several)."""
    run_dir = Path(run_dir)
    meta = read_model_meta(run_dir)
    wanted = (family,) if isinstance(family, str) else family
    if wanted and meta["family"] not in wanted:
        raise UserError(f"{run_dir} holds a {meta['family']} model, but this command needs "
                        f"{' or '.join(wanted)}; pass a run dir of that family")
    model_cls, config_cls = family_classes(meta["family"])
    model = model_cls(config_cls(**meta["config"]))
    load_weights(model, run_dir / "model.safetensors")
    return model.to(device)


def load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path} is missing; the run has no saved weights yet")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is damaged or truncated ({e}); restore it or retrain") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not fit the model in model.json "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


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
               optimizers: list[torch.optim.Optimizer], loop: dict[str, Any]) -> None:
    """Weights + optimizer + loop state after `step` steps, into run/state/step-N, written as a
    temporary folder and renamed, so a resume never sees weights and moments out of step."""
    state_dir = Path(run_dir) / "state"
    final = state_dir / f"step-{step:08d}"
    tmp = state_dir / f".step-{step:08d}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    tensors, plains = {}, []
    for i, opt in enumerate(optimizers):
        t, p = _flatten_optimizer(opt, f"opt{i}")
        tensors.update(t)
        plains.append(p)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()},
              str(tmp / "optimizer.safetensors"))
    atomic_save_tensors(tmp / "model.safetensors", unwrap(model).state_dict())
    (tmp / "loop.json").write_text(json.dumps({"step": step, "optimizers": plains, **loop}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(state_dir.glob("step-*"))[:-KEEP_STATES]:
        shutil.rmtree(old, ignore_errors=True)


def latest_state(run_dir: Path) -> Path | None:
    steps = sorted((Path(run_dir) / "state").glob("step-*"))
    return steps[-1] if steps else None


def load_state(state_dir: Path, model: nn.Module,
               optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore weights and optimizers from a state dir; returns the loop dict (with 'step')."""
    load_weights(model, state_dir / "model.safetensors")
    try:
        loop = json.loads((state_dir / "loop.json").read_text())
        tensors = load_file(str(state_dir / "optimizer.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise UserError(f"{state_dir} is damaged ({e}); delete it to resume from an "
                        "earlier step") from None
    for i, (opt, plain) in enumerate(zip(optimizers, loop["optimizers"], strict=True)):
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            head, idx, name = key.split(".", 2)
            if head == f"opt{i}":
                state.setdefault(int(idx), {})[name] = value
        for idx, extra in plain["state"].items():
            state.setdefault(int(idx), {}).update(extra)
        opt.load_state_dict({"state": state, "param_groups": plain["param_groups"]})
    return loop
