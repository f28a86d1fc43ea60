"""What every stage does around the training loop: prepare the run dir, seed batches."""

from __future__ import annotations

from pathlib import Path

import torch

from tinylm import config as configlib
from tinylm.errors import UserError


def prepare_run_dir(out: str | Path, resume: bool) -> Path:
    """The run dir to write; refuses to overwrite a finished run unless resuming."""
    run_dir = Path(out)
    if resume:
        if not (run_dir / "config.toml").is_file():
            raise UserError(f"cannot resume: {run_dir} holds no config.toml; drop --resume")
    elif (run_dir / "model.safetensors").exists():
        raise UserError(f"{run_dir} already holds a model; pass --resume to continue it, or "
                        "--out to write elsewhere")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def load_stage_config(cls, path: str | None, overrides: list[str], out: str | None,
                      resume: bool):
    """Config from a preset/file + overrides; on --resume the run's own config.toml is the
    base, so a run continues as it started (overrides such as train.steps still apply)."""
    if resume and out and (Path(out) / "config.toml").is_file():
        data = configlib.read_toml(Path(out) / "config.toml")
        if path:
            data = configlib.merge(configlib.read_toml(configlib.preset_path(path)), data)
    else:
        data = configlib.read_toml(configlib.preset_path(path)) if path else {}
    data = configlib.merge(data, configlib.parse_overrides(overrides))
    if out:
        data["out"] = out
    return configlib.build(cls, data)


def batch_generator(seed: int, step: int, k: int) -> torch.Generator:
    """The RNG for micro-batch k of `step`: a pure function of (seed, step, k)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + k)
