"""What every stage does around the training loop: prepare the run dir, load its config,
seed batches, tokenize the corpus, build or --init the model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from tinylm import config as configlib
from tinylm.data.text import load_text
from tinylm.data.tokens import DataConfig, TokenData, encode_cached
from tinylm.errors import UserError
from tinylm.rundir import load_model
from tinylm.tokenizer import Tokenizer
from tinylm.tokenizer import train as train_tokenizer


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


def prepare_tokens(run_dir: Path, data_cfg: DataConfig, init: str, resume: bool
                   ) -> tuple[Tokenizer, TokenData]:
    """The corpus as cached token ids, with the tokenizer of the run (on resume), of the
    --init run, or freshly trained on the corpus. Returns (tokenizer, TokenData)."""
    text = load_text(data_cfg.corpus)
    if resume:
        tok = Tokenizer.load(run_dir / "tokenizer.json")
    elif init:
        tok = Tokenizer.load(Path(init) / "tokenizer.json")
    else:
        tok = train_tokenizer(text, data_cfg.tokenizer, data_cfg.vocab_size)
    return tok, TokenData(encode_cached(text, tok), data_cfg.val_fraction)


def build_or_init(model_cfg, model_cls, init: str, tok, seed: int):
    """A fresh `model_cls(model_cfg)` (vocab_size 0 = the tokenizer's), or the --init run's
    model with this config's block_size and dropout. Returns (model, resolved config)."""
    if init:
        model = load_model(Path(init), family=model_cls.family)
        old = model.config
        if model_cfg.block_size > old.block_size and old.pos == "learned":
            raise UserError(f"model.block_size={model_cfg.block_size} is over the "
                            f"{old.block_size} learned positions of {init}; use at most that")
        model.config = dataclasses.replace(old, block_size=model_cfg.block_size,
                                           dropout=model_cfg.dropout)
        return model, model.config
    if model_cfg.vocab_size == 0:
        model_cfg.vocab_size = tok.vocab_size
    if model_cfg.vocab_size < tok.vocab_size:
        raise UserError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                        f"tokenizer's {tok.vocab_size}; leave it at 0")
    torch.manual_seed(seed)
    return model_cls(model_cfg), model_cfg


def load_reference(run: str | Path, policy: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference: a GPT run with the policy's vocabulary (the KL compares their
    next-token distributions token by token)."""
    ref = load_model(Path(run), family="gpt")
    if ref.config.vocab_size != policy.config.vocab_size:
        raise UserError(f"the reference {run} has {ref.config.vocab_size} tokens, the policy "
                        f"{policy.config.vocab_size}: use a run of the same tokenizer")
    return ref


class BestWeights:
    """Early stopping without stopping, for stages whose eval_fn reports `key`: a CPU copy of
    the weights of the best evaluation so far (highest, or lowest with higher=False), which
    `restore` puts back after training. The LR schedule still runs to its end, so keeping
    them never changes what the later steps do."""

    def __init__(self, key: str, higher: bool = True) -> None:
        self.key, self.sign = key, 1.0 if higher else -1.0
        self.score = float("-inf")
        self.state: dict[str, torch.Tensor] | None = None
        self.metrics: dict[str, float] = {}

    def offer(self, model: torch.nn.Module, metrics: dict[str, float]) -> None:
        """Keep `model`'s weights when these metrics (maybe none: no held-out data) beat the
        best so far."""
        if self.key in metrics and self.sign * metrics[self.key] > self.score:
            self.score, self.metrics = self.sign * metrics[self.key], dict(metrics)
            self.state = {k: v.detach().to("cpu", copy=True)
                          for k, v in model.state_dict().items()}

    def restore(self, model: torch.nn.Module, run_dir: Path) -> dict[str, float] | None:
        """Load the kept weights into `model`; returns their metrics and `best_step` (the
        first step metrics.jsonl logs with that value; -1 if none), or None if none were
        kept."""
        if self.state is None:
            return None
        model.load_state_dict(self.state)
        path, step = run_dir / "metrics.jsonl", -1
        for line in path.read_text().splitlines() if path.is_file() else []:
            row = json.loads(line)
            if row.get(self.key) == self.metrics[self.key]:
                step = int(row["step"])
                break
        return self.metrics | {"best_step": step}
