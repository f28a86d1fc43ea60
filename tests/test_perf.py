"""Fast paths are chosen by measuring this machine, and the answer is cached per machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tinylm import perf
from tinylm.train.optim import orthogonalize


def test_bf16_speed_is_measured_once_and_cached_per_machine():
    path = Path(os.environ["TINYLM_CACHE"]) / "perf.json"
    path.unlink(missing_ok=True)
    measured = perf.cpu_bf16_is_fast.__wrapped__()
    entry = json.loads(path.read_text())[perf._machine_key()]
    assert entry["bf16_fast"] == measured == (entry["bf16_flops"] > 1.2 * entry["fp32_flops"])
    # A later process reads the cache instead of measuring again (so a run and its --resume
    # take the same path even when a new measurement would come out the other way).
    entry["bf16_fast"] = not measured
    path.write_text(json.dumps({perf._machine_key(): entry}))
    assert perf.cpu_bf16_is_fast.__wrapped__() is (not measured)


def test_newton_schulz_orthogonalizes_in_fp32_and_bf16():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        x = orthogonalize(g, dtype=dtype).float()
        singular = torch.linalg.svdvals(x)
        assert x.dtype == torch.float32 and singular.min() > 0.5 and singular.max() < 1.5


def test_mfu_peak_is_the_best_measured_on_this_machine():
    """A peak measured under other processes' load would make MFU read above 1 later: the
    loop divides by the best peak this machine has shown, and a better measurement replaces
    a worse one."""
    path = Path(os.environ["TINYLM_CACHE"]) / "perf.json"
    key, name = perf._machine_key(), f"peak {torch.float32} 64"
    path.write_text(json.dumps({key: {name: 1e18}}))
    assert perf.matmul_peak_flops.__wrapped__(torch.float32, "cpu", 64, 0.02) == 1e18
    path.write_text(json.dumps({key: {name: 1.0}}))
    measured = perf.matmul_peak_flops.__wrapped__(torch.float32, "cpu", 64, 0.02)
    assert 1.0 < measured == json.loads(path.read_text())[key][name]
