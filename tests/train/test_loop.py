"""The training loop: exact resume, checkpoints, and torchrun equivalence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tinylm
from tinylm import config as configlib
from tinylm.stages import pretrain
from tinylm.stages.pretrain import PretrainConfig
from tinylm.train.optim import lr_factor

TINY = [
    "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.block_size=32",
    "train.steps=6", "train.batch_size=4", "train.warmup_steps=2", "train.progress=false",
    "train.log_every=1", "train.dtype='float32'",
]


def tiny_cfg(corpus: Path, out: Path, *extra: str) -> PretrainConfig:
    return configlib.load(PretrainConfig, None, [f"out='{out}'", f"data.corpus='{corpus}'",
                                                 *TINY, *extra])


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_save_then_load_gives_identical_logits(tiny_corpus, tmp_path):
    pretrain.run(tiny_cfg(tiny_corpus, tmp_path / "run"))
    model, tok = tinylm.load(tmp_path / "run")
    x = torch.tensor([tok.encode("The sun is shining")])
    again, _ = tinylm.load(tmp_path / "run")
    assert torch.equal(model(x), again(x))
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("optimizer", ["muon", "adamw", "adamw-bf16-weights"])
def test_resume_is_bit_exact(tiny_corpus, tmp_path, optimizer):
    common = [f"train.optimizer='{optimizer.split('-')[0]}'", "model.dropout=0.1",
              "train.grad_accum=2", f"train.bf16_weights={str('bf16' in optimizer).lower()}"]
    pretrain.run(tiny_cfg(tiny_corpus, tmp_path / "full", "train.steps=8", *common))
    pretrain.run(tiny_cfg(tiny_corpus, tmp_path / "half", "train.steps=8", "train.stop_after=4",
                      *common))
    cfg = tiny_cfg(tiny_corpus, tmp_path / "half", "train.steps=8", *common)
    pretrain.run(cfg, resume=True)
    assert losses(tmp_path / "full") == losses(tmp_path / "half")
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_is_not_overwritten(tiny_corpus, tmp_path):
    pretrain.run(tiny_cfg(tiny_corpus, tmp_path / "run"))
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(tinylm.errors.UserError, match="already holds a model"):
        pretrain.run(tiny_cfg(tiny_corpus, tmp_path / "run"))
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


def test_schedules_are_pure_functions_of_the_step():
    assert lr_factor(0, 100, 10, "cosine", 0.2, 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine", 0.2, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine", 0.2, 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "wsd", 0.2, 0.0) == 1.0
    assert lr_factor(90, 100, 10, "wsd", 0.2, 0.0) == pytest.approx(0.5)


def test_torchrun_two_processes_match_one(tiny_corpus, tmp_path):
    """Same global batch (grad_accum=2): 1 process x 2 micro-batches == 2 ranks x 1."""
    args = [f"--set=data.corpus='{tiny_corpus}'", *(f"--set={o}" for o in TINY),
            "--set=train.grad_accum=2", "--set=train.optimizer='adamw'"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = [sys.executable, "-m", "tinylm", "pretrain", "--out", str(tmp_path / "one"), *args]
    subprocess.run(single, check=True, env=env, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_port=29517", "-m", "tinylm", "pretrain", "--out",
                str(tmp_path / "two"), *args]
    done = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5)


def test_bf16_weights_train_like_fp32(tiny_corpus, tmp_path):
    pretrain.run(tiny_cfg(tiny_corpus, tmp_path / "a", "train.steps=30"))
    pretrain.run(tiny_cfg(tiny_corpus, tmp_path / "b", "train.steps=30", "train.bf16_weights=true"))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert b[-1] < b[0] - 1.0  # it learns
    assert b[-1] == pytest.approx(a[-1], abs=0.1)  # about as well as fp32
    model, _ = tinylm.load(tmp_path / "b")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # saved as fp32


def test_metrics_log_each_groups_actual_learning_rate(tiny_corpus, tmp_path):
    pretrain.run(tiny_cfg(tiny_corpus, tmp_path / "run", "train.lr=0.004",
                          "train.muon_lr=0.05"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert {"lr_factor", "lr_matrix", "lr_embed", "lr_other"} <= rows[0].keys()
    for r in rows:
        assert r["lr_matrix"] == pytest.approx(0.05 * r["lr_factor"])
        assert r["lr_embed"] == r["lr_other"] == pytest.approx(0.004 * r["lr_factor"])
    assert rows[0]["lr_factor"] < rows[2]["lr_factor"]  # warm-up: the schedule moves


@pytest.mark.parametrize("family", ["gpt", "bert", "transformer", "rnn"])
def test_models_put_every_parameter_in_exactly_one_optimizer_group(family):
    from tinylm.models import family_classes

    model_cls, config_cls = family_classes(family)
    model = model_cls(config_cls(vocab_size=50))
    groups = model.optim_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert all(p.ndim == 2 for p in groups["matrix"]) and groups["matrix"]
    assert all(p.ndim == 1 for p in groups["other"])
